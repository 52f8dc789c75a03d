"""The ``spawn`` start method: a fresh interpreter that unpickles the process object."""

from __future__ import annotations

import os
import subprocess

from fabric.local import _launch
from fabric.local import process as _process
from fabric.local._popen_fork import PidfdPopen

_CODE = "from fabric.local._bootstrap import spawn_main; spawn_main()"


class SpawnPopen(PidfdPopen):
    """Start ``process_obj`` in a new interpreter, handing it the launch data and fds."""

    def __init__(self, process_obj: _process.Process, report_fd: int) -> None:
        data, fds = _launch.prepare(process_obj, report_fd)
        launch_fd = _launch.write_launch(data)
        try:
            command = [*_launch.python_command(_CODE), str(launch_fd), *map(str, fds)]
            self._proc = subprocess.Popen(
                command, pass_fds=[launch_fd, *fds], stdin=subprocess.DEVNULL
            )
        finally:
            os.close(launch_fd)
        super().__init__(self._proc.pid)

    def _reap(self) -> int | None:
        # subprocess owns the reaping, so its Popen never reports a lost child.
        return self._proc.poll()
