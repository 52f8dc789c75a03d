"""What a hosted method learns about its caller, and how a hosted method blocks.

Hosted built-in objects live in the object host's single event loop, so a method
that would block (``Lock.acquire``, ``Queue.get``...) must not block the loop. Such
a method is written as a generator: it ``yield``s its deadline (a
``time.monotonic()`` value, or None for no deadline) to park, and the host
resumes it with ``send(False)`` whenever the object changed, or with
``send(True)`` once the deadline passed. Its return value is the reply. When the
caller's session dies the host ``close()``s the generator, so ``finally``
blocks undo whatever the parked call had reserved.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import NamedTuple, TypeVar

T = TypeVar("T")

Owner = tuple[bytes, int]
Wait = Generator[float | None, bool, T]


class Ctx(NamedTuple):
    """The caller of a hosted method: session, thread tag, current time, fencing token sent."""

    session: bytes
    thread: int
    now: float
    token: int | None = None

    @property
    def owner(self) -> Owner:
        """Identify the calling thread of the calling session (lock ownership)."""
        return (self.session, self.thread)


def deadline(now: float, block: bool, timeout: float | None) -> float | None:
    """Turn ``(block, timeout)`` into an absolute deadline, the way queue.Queue reads them."""
    if not block:
        return now
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return now + timeout


def lock_deadline(now: float, blocking: bool, timeout: float) -> float | None:
    """Turn threading's ``acquire(blocking, timeout=-1)`` into a deadline."""
    if not blocking:
        if timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        return now
    if timeout == -1:
        return None
    if timeout < 0:
        raise ValueError("timeout value must be a non-negative number")
    return now + timeout
