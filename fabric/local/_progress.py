"""The optional progress bar of long maps, through tqdm (the ``progress`` extra)."""

from __future__ import annotations

import sys
from typing import Any, Literal

__all__ = ["Progress", "progress_bar"]

Progress = bool | Literal["force"]


def progress_bar(progress: Progress, total: int | None, desc: str) -> Any:
    """Return a tqdm bar, or None when ``progress`` is off or stderr is not a terminal.

    ``progress="force"`` shows the bar even when stderr is not a terminal.
    """
    if progress is False or progress is None:
        return None
    if progress not in (True, "force"):
        raise ValueError(f"progress must be True, False or 'force', not {progress!r}")
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
