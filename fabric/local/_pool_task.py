"""What the pool engine moves around: tasks, and the records it reports."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from typing import Any, NamedTuple

__all__ = ["DEFAULT_RETRIES", "Statistics", "Task", "TerminatedError"]

DEFAULT_RETRIES = 1  # a task may take down 1 + DEFAULT_RETRIES workers before it fails
_task_ids = itertools.count(1)


class TerminatedError(BrokenExecutor):
    """The pool was terminated (or collected) before the task finished."""


class Statistics(NamedTuple):
    """A snapshot of a pool's counters."""

    workers: int  # live worker processes
    pending: int  # tasks queued in the parent
    running: int  # tasks sent to a worker and not yet answered
    done: int  # tasks that returned
    failed: int  # tasks that raised, could not travel, or were lost
    workers_lost: int  # workers that died with tasks (or an error exit code)
    retries: int  # tasks run again after their worker died


class Task:
    """One unit sent to a worker; subclasses say where its result goes."""

    __slots__ = ("args", "attempts", "fn", "id", "kind", "kwargs", "payload")

    def __init__(self, fn: Callable[..., Any], kind: int, args: Any, kwargs: Any = None) -> None:
        self.id = next(_task_ids)
        self.fn = fn
        self.kind = kind
        self.args = args
        self.kwargs = kwargs
        # Set when first sent (pickled, or plain values as they are); kept for a retry.
        self.payload: bytes | tuple[Any, ...] | list[Any] | None = None
        self.attempts = 0  # workers this task took down

    def claim(self) -> bool:
        """Return False if the task was cancelled and must not run."""
        return True

    def deliver(self, ok: bool, value: Any, seconds: float) -> Callable[[], object] | None:
        """Hand over the result (``ok``) or the exception; called once, on the loop.

        May return a callable that wakes whoever waits for the outcome; the loop
        calls it once (however many tasks returned it) after dispatching what it
        can: a consumer waiting for many tasks is woken once per batch, and finds
        the GIL free.
        """
        raise NotImplementedError

    def describe(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        return f"task {self.id} ({name})"
