"""The task process of a worker node: read a task from a pipe, run it, write the result back.

Started by the node as ``python -m fabric.remote._taskproc TASK_FD RESULT_FD``.
It never touches the network itself (proxies a task uses open their own
connection). It dies with its node (PR_SET_PDEATHSIG) and leaves Ctrl-C and
SIGTERM to the node, which decides whether to drain or stop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from fabric.remote._pipes import FrameReader, write_frame
from fabric.remote._runner import TaskRunner

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed task pipe still ends us
        pass
    if os.getppid() != parent:  # the node died before prctl took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    """Serve tasks until the node closes the task pipe."""
    task_fd, result_fd, parent = (int(a) for a in argv[:3])
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    runner, tasks = TaskRunner(), FrameReader(task_fd)
    while (payload := tasks.read()) is not None:
        ok, result = runner.run(payload)
        write_frame(result_fd, b"\1" if ok else b"\0", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
