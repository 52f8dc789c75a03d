"""The optional progress bar of long maps, through tqdm (the ``progress`` extra).

The same switch as the local layer's (``progress=True`` shows a bar on a terminal,
``"force"`` always), kept here so the remote layer never imports ``fabric.local``.
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal

Progress = bool | Literal["force"]


def check(progress: Progress) -> None:
    """Raise ValueError for a ``progress`` that is not True, False or "force"."""
    if progress not in (True, False, "force"):
        raise ValueError(f"progress must be True, False or 'force', not {progress!r}")


def progress_bar(progress: Progress, total: int, desc: str) -> Any:
    """Return a tqdm bar, or None when ``progress`` is off or stderr is not a terminal."""
    check(progress)
    if progress is False:
        return None
    if progress is True and not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm: pip install 'taskfabric[progress]'") from exc
    # No monitor: tqdm's class-wide monitor thread would outlive the bar, and every
    # later fork() would warn that the process has threads. A map updates its bar
    # often enough without one.
    quiet_tqdm = type("FabricBar", (tqdm,), {"monitor_interval": 0})
    return quiet_tqdm(total=total, desc=desc, file=sys.stderr, unit="task")


def track(
    futures: Sequence[cf.Future[Any]], sizes: Sequence[int], progress: Progress, desc: str
) -> None:
    """Advance a bar by ``sizes[i]`` as ``futures[i]`` finishes; close it after the last."""
    bar = progress_bar(progress, sum(sizes), desc)
    if bar is None:
        return
    left = [len(futures)]
    lock = threading.Lock()

    def advance(n: int) -> Callable[[cf.Future[Any]], None]:
        def done(future: cf.Future[Any]) -> None:
            with lock:
                bar.update(n)
                left[0] -= 1
                if left[0] == 0:
                    bar.close()

        return done

    if not futures:
        bar.close()
    for future, n in zip(futures, sizes, strict=True):
        future.add_done_callback(advance(n))
