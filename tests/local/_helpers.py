"""Cross-process helpers for the Process tests that need nothing from fabric but Process.

A :class:`Gate` is a pipe whose ends a child reopens through ``/proc/<pid>/fd``,
so it works under every start method without relying on the primitives under test.
"""

from __future__ import annotations

import contextlib
import os
import select
from dataclasses import dataclass


@dataclass(frozen=True)
class _End:
    pid: int
    fd: int
    flags: int

    def open(self) -> int:
        if os.getpid() == self.pid:
            return os.dup(self.fd)
        return os.open(f"/proc/{self.pid}/fd/{self.fd}", self.flags | os.O_CLOEXEC)


class Gate:
    """A one-shot signal between processes: ``open()`` on one side, ``wait()`` on the other."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        self.read_end = _End(os.getpid(), self._r, os.O_RDONLY)
        self.write_end = _End(os.getpid(), self._w, os.O_WRONLY)

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


def signal_gate(end: _End) -> None:
    """Open the gate whose write end is ``end`` (from any process)."""
    fd = end.open()
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def wait_gate(end: _End, timeout: float | None = None) -> bool:
    """Wait until the gate whose read end is ``end`` is opened; return False on timeout."""
    fd = end.open()
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)
