"""Hosted synchronisation primitives: leases with fencing tokens, run in the host's loop.

Every lock-like object records which session holds it. When a session dies the
host calls ``session_lost``: its holdings are released, the fencing token of
its grant is marked revoked (so a late ``release`` quoting it raises
``LeaseLostError`` instead of releasing someone else's lock), and the next
acquirer is told ``owner_lost``.
Acquire replies are ``(acquired, token, owner_lost)``; proxies unpack them.
Blocking methods are generators (see ``_ctx``).
"""

from __future__ import annotations

import threading
from collections import deque

from fabric.remote._ctx import Ctx, Owner, Wait, deadline, lock_deadline
from fabric.remote._errors import LeaseLostError

Grant = tuple[bool, int, bool]
_REFUSED: Grant = (False, 0, False)


class _Lease:
    """Fencing token and owner-lost flag shared by every lock-like type."""

    def __init__(self) -> None:
        self._token = 0
        self._owner_lost = False
        self._revoked: set[int] = set()

    def _grant(self) -> Grant:
        self._token += 1
        lost, self._owner_lost = self._owner_lost, False
        return (True, self._token, lost)

    def _revoke(self, tokens: set[int]) -> None:
        self._revoked |= tokens
        self._owner_lost = True

    def _check_token(self, ctx: Ctx) -> None:
        if ctx.token is not None and ctx.token in self._revoked:
            self._revoked.discard(ctx.token)
            raise LeaseLostError(
                "this lock's lease was revoked (its holder's session expired) before release"
            )


class Lock(_Lease):
    """A mutex any thread of any client may release, like threading.Lock."""

    EXPOSED: tuple[str, ...] = ("acquire", "release", "locked")

    def __init__(self) -> None:
        super().__init__()
        self._owner: Owner | None = None

    def acquire(self, ctx: Ctx, blocking: bool = True, timeout: float = -1) -> Wait[Grant]:
        limit = lock_deadline(ctx.now, blocking, timeout)
        while self._owner is not None:
            if (yield limit):
                return _REFUSED
        self._owner = ctx.owner
        return self._grant()

    def release(self, ctx: Ctx) -> None:
        self._check_token(ctx)
        if self._owner is None:
            raise RuntimeError("release unlocked lock")
        self._owner = None

    def locked(self, ctx: Ctx) -> bool:
        return self._owner is not None

    def session_lost(self, session: bytes) -> bool:
        if self._owner is None or self._owner[0] != session:
            return False
        self._owner = None
        self._revoke({self._token})
        return True


class RLock(_Lease):
    """A reentrant mutex owned by one thread of one client, like threading.RLock."""

    EXPOSED: tuple[str, ...] = ("acquire", "release", "locked")

    def __init__(self) -> None:
        super().__init__()
        self._owner: Owner | None = None
        self._count = 0

    def acquire(self, ctx: Ctx, blocking: bool = True, timeout: float = -1) -> Wait[Grant]:
        if self._owner == ctx.owner:
            self._count += 1
            return (True, self._token, False)
        limit = lock_deadline(ctx.now, blocking, timeout)
        while self._owner is not None:
            if (yield limit):
                return _REFUSED
        self._owner, self._count = ctx.owner, 1
        return self._grant()

    def release(self, ctx: Ctx) -> None:
        self._check_token(ctx)
        if self._owner != ctx.owner:
            raise RuntimeError("cannot release un-acquired lock")
        self._count -= 1
        if self._count == 0:
            self._owner = None

    def locked(self, ctx: Ctx) -> bool:
        return self._owner is not None

    def release_all(self, ctx: Ctx) -> int:
        """Release every level held by the caller (Condition.wait); return the count."""
        if self._owner != ctx.owner:
            raise RuntimeError("cannot wait on un-acquired lock")
        count, self._owner, self._count = self._count, None, 0
        return count

    def try_restore(self, owner: Owner, count: int) -> int | None:
        """Take the lock back at ``count`` levels if free; return the new token or None."""
        if self._owner is not None:
            return None
        self._owner, self._count = owner, count
        return self._grant()[1]

    def session_lost(self, session: bytes) -> bool:
        if self._owner is None or self._owner[0] != session:
            return False
        self._owner, self._count = None, 0
        self._revoke({self._token})
        return True


class Semaphore(_Lease):
    """A counter of permits, each permit a lease of the session that took it."""

    EXPOSED: tuple[str, ...] = ("acquire", "release", "get_value")

    def __init__(self, value: int = 1) -> None:
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        super().__init__()
        self._value = value
        self._held: dict[Owner, int] = {}

    def acquire(self, ctx: Ctx, blocking: bool = True, timeout: float | None = None) -> Wait[Grant]:
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        limit = deadline(ctx.now, blocking, timeout)
        while self._value == 0:
            if (yield limit):
                return _REFUSED
        self._value -= 1
        self._held[ctx.owner] = self._held.get(ctx.owner, 0) + 1
        return self._grant()

    def release(self, ctx: Ctx, n: int = 1) -> None:
        if n < 1:
            raise ValueError("n must be one or more")
        self._check_release(n)
        for _ in range(n):
            self._forget_one(ctx.owner)
        self._value += n

    def _check_release(self, n: int) -> None:
        """Let BoundedSemaphore refuse releases past its initial value."""

    def _forget_one(self, owner: Owner) -> None:
        # threading lets any thread release a permit: charge the caller's own permits
        # first, then anyone's, so leases never outnumber permits really taken.
        holder = owner if owner in self._held else next(iter(self._held), None)
        if holder is None:
            return
        self._held[holder] -= 1
        if self._held[holder] == 0:
            del self._held[holder]

    def get_value(self, ctx: Ctx) -> int:
        return self._value

    def session_lost(self, session: bytes) -> bool:
        lost = [owner for owner in self._held if owner[0] == session]
        for owner in lost:
            self._value += self._held.pop(owner)
        if lost:
            self._revoke(set())
        return bool(lost)


class BoundedSemaphore(Semaphore):
    """A Semaphore that raises ValueError when released past its initial value."""

    def __init__(self, value: int = 1) -> None:
        super().__init__(value)
        self._initial = value

    def _check_release(self, n: int) -> None:
        if self._value + n > self._initial:
            raise ValueError("Semaphore released too many times")


class Event:
    """A flag clients wait on, like threading.Event."""

    EXPOSED: tuple[str, ...] = ("set", "clear", "is_set", "wait")

    def __init__(self) -> None:
        self._flag = False

    def set(self, ctx: Ctx) -> None:
        self._flag = True

    def clear(self, ctx: Ctx) -> None:
        self._flag = False

    def is_set(self, ctx: Ctx) -> bool:
        return self._flag

    def wait(self, ctx: Ctx, timeout: float | None = None) -> Wait[bool]:
        limit = deadline(ctx.now, True, timeout)
        while not self._flag:
            if (yield limit):
                return False
        return True


class Condition(RLock):
    """A condition variable over its own RLock, like threading.Condition()."""

    EXPOSED: tuple[str, ...] = (*RLock.EXPOSED, "wait", "notify", "notify_all")

    def __init__(self) -> None:
        super().__init__()
        self._waiters: deque[object] = deque()

    def wait(self, ctx: Ctx, timeout: float | None = None) -> Wait[tuple[bool, int]]:
        """Release the lock, park until notified or timed out, take the lock back.

        Returns ``(notified, new_token)``: the lock is re-granted, so its token moves.
        """
        self._check_token(ctx)
        count = self.release_all(ctx)
        limit = deadline(ctx.now, True, timeout)
        ticket = object()
        self._waiters.append(ticket)
        notified = True
        try:
            while ticket in self._waiters:
                if (yield limit):
                    notified = False
                    break
        finally:
            if ticket in self._waiters:
                self._waiters.remove(ticket)
        while (token := self.try_restore(ctx.owner, count)) is None:
            yield None
        return (notified, token)

    def notify(self, ctx: Ctx, n: int = 1) -> None:
        if self._owner != ctx.owner:
            raise RuntimeError("cannot notify on un-acquired lock")
        for _ in range(min(n, len(self._waiters))):
            self._waiters.popleft()

    def notify_all(self, ctx: Ctx) -> None:
        self.notify(ctx, len(self._waiters))


class Barrier:
    """A rendezvous of ``parties`` callers, like threading.Barrier without ``action``."""

    EXPOSED: tuple[str, ...] = ("wait", "reset", "abort", "parties", "n_waiting", "broken")

    def __init__(self, parties: int, action: None = None, timeout: float | None = None) -> None:
        if action is not None:
            raise ValueError("a hosted Barrier cannot run an action: run it after wait() == 0")
        if parties < 1:
            raise ValueError("parties must be >= 1")
        self._parties = parties
        self._timeout = timeout
        self._count = 0
        self._generation = 0
        self._failed: set[int] = set()
        self._broken = False

    def wait(self, ctx: Ctx, timeout: float | None = None) -> Wait[int]:
        if self._broken:
            raise threading.BrokenBarrierError
        generation, index = self._generation, self._count
        self._count += 1
        if self._count == self._parties:
            self._count = 0
            self._generation += 1
            return index
        limit = deadline(ctx.now, True, self._timeout if timeout is None else timeout)
        try:
            while self._generation == generation:
                if (yield limit):
                    self.abort(ctx)
        finally:
            if self._generation == generation:  # closed: the caller's session died
                self.abort(ctx)
        if generation in self._failed:
            raise threading.BrokenBarrierError
        return index

    def _fail(self) -> None:
        if self._count:
            self._failed.add(self._generation)
        self._generation += 1
        self._count = 0

    def reset(self, ctx: Ctx) -> None:
        self._fail()
        self._broken = False

    def abort(self, ctx: Ctx) -> None:
        self._fail()
        self._broken = True

    def parties(self, ctx: Ctx) -> int:
        return self._parties

    def n_waiting(self, ctx: Ctx) -> int:
        return self._count

    def broken(self, ctx: Ctx) -> bool:
        return self._broken
