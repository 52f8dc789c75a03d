"""The rest of the multiprocessing namespace, so ``import fabric.local as multiprocessing`` works.

These are the standard library's own objects where fabric has nothing better
to offer (the exception classes, logging helpers, the manager), so code that
catches ``multiprocessing.ProcessError`` keeps catching what fabric raises.
"""

from __future__ import annotations

import builtins
import multiprocessing
import multiprocessing.managers
from typing import Any

__all__ = [
    "AuthenticationError",
    "BufferTooShort",
    "Manager",
    "ProcessError",
    "TimeoutError",
    "allow_connection_pickling",
    "freeze_support",
    "get_logger",
    "log_to_stderr",
]

ProcessError = multiprocessing.ProcessError
BufferTooShort = multiprocessing.BufferTooShort
AuthenticationError = multiprocessing.AuthenticationError
get_logger = multiprocessing.get_logger
log_to_stderr = multiprocessing.log_to_stderr


class TimeoutError(builtins.TimeoutError, multiprocessing.TimeoutError):
    """A timed wait for a result ran out: catch it as either ``TimeoutError``."""


def Manager() -> multiprocessing.managers.SyncManager:
    """Start and return the standard library's ``SyncManager`` (a server process).

    For shared objects reachable from other machines (and named across
    programs), use ``fabric.remote.Manager`` instead.
    """
    manager = multiprocessing.managers.SyncManager()
    manager.start()
    return manager


def freeze_support() -> None:
    """Do nothing: only frozen Windows executables need it, and fabric is POSIX-only."""


def allow_connection_pickling(*_: Any) -> None:
    """Do nothing: fabric's Connections always pickle (kept for multiprocessing's API)."""
