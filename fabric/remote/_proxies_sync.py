"""Proxies for the hosted primitives: Lock, RLock, Semaphore, Event, Condition, Barrier.

Locks are leases of this client's session. An acquire that follows the death of
the previous holder warns ``OwnerLostWarning`` and sets ``owner_lost``; a release
after this client's own lease was revoked raises ``LeaseLostError``.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from fabric.remote._errors import OwnerLostWarning
from fabric.remote._proxy_base import BaseProxy

T = TypeVar("T")


def _blocking(blocking: bool, block: bool | None) -> bool:
    return blocking if block is None else block


class _LockLike(BaseProxy):
    """Acquire/release with lease tokens, usable as a context manager."""

    owner_lost = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._tokens: dict[int, int] = {}

    def _token_key(self) -> int:
        return 0  # Lock: any thread may release what another acquired

    def acquire(
        self, blocking: bool = True, timeout: float | None = -1, *, block: bool | None = None
    ) -> bool:
        """Acquire, waiting up to ``timeout`` seconds (-1 or None: forever)."""
        blocking = _blocking(blocking, block)
        timeout = -1 if timeout is None else timeout
        wait = None if timeout == -1 else timeout
        ok, token, lost = self._call("acquire", blocking, timeout, wait=wait if blocking else 0.0)
        if ok:
            self._granted(token, lost)
        return bool(ok)

    def _granted(self, token: int, lost: bool) -> None:
        self._tokens[self._token_key()] = token
        self.owner_lost = lost
        if lost:
            warnings.warn(
                OwnerLostWarning(
                    f"{self._ref.typeid} #{self._ref.obj_id}: the previous holder's session died "
                    "holding it; the protected state may be inconsistent"
                ),
                stacklevel=3,
            )

    def release(self) -> None:
        """Release; LeaseLostError if this client's lease was revoked meanwhile."""
        self._call("release", token=self._tokens.pop(self._token_key(), None))

    def locked(self) -> bool:
        return bool(self._call("locked"))

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class LockProxy(_LockLike):
    """A lock shared by every client, like threading.Lock."""

    _typeid = "Lock"


class RLockProxy(_LockLike):
    """A reentrant lock owned by one thread of one client, like threading.RLock."""

    _typeid = "RLock"

    def _token_key(self) -> int:
        return threading.get_ident()


class SemaphoreProxy(_LockLike):
    """A shared semaphore; each permit is a lease of this client's session."""

    _typeid = "Semaphore"

    def acquire(
        self, blocking: bool = True, timeout: float | None = None, *, block: bool | None = None
    ) -> bool:
        """Take a permit, waiting up to ``timeout`` seconds (None: forever)."""
        blocking = _blocking(blocking, block)
        ok, token, lost = self._call(
            "acquire", blocking, timeout if blocking else None, wait=timeout if blocking else 0.0
        )
        if ok:
            self._granted(token, lost)
        return bool(ok)

    def release(self, n: int = 1) -> None:
        self._call("release", n)

    def get_value(self) -> int:
        return int(self._call("get_value"))

    def locked(self) -> bool:
        return self.get_value() == 0


class BoundedSemaphoreProxy(SemaphoreProxy):
    """A shared semaphore that refuses releases past its initial value."""

    _typeid = "BoundedSemaphore"


class ConditionProxy(RLockProxy):
    """A shared condition variable over its own reentrant lock."""

    _typeid = "Condition"

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, wait to be notified (or ``timeout``), take it back."""
        notified, token = self._call(
            "wait", timeout, wait=timeout, token=self._tokens.get(self._token_key())
        )
        self._tokens[self._token_key()] = token
        return bool(notified)

    def wait_for(self, predicate: Callable[[], T], timeout: float | None = None) -> T:
        """Wait until ``predicate()`` is true (evaluated here, under the lock)."""
        limit = None if timeout is None else time.monotonic() + timeout
        result = predicate()
        while not result:
            remaining = None if limit is None else limit - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            self.wait(remaining)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        self._call("notify", n)

    def notify_all(self) -> None:
        self._call("notify_all")


class EventProxy(BaseProxy):
    """A shared flag, like threading.Event."""

    _typeid = "Event"

    def set(self) -> None:
        self._call("set")

    def clear(self) -> None:
        self._call("clear")

    def is_set(self) -> bool:
        return bool(self._call("is_set"))

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the flag is set; return it (False on timeout)."""
        return bool(self._call("wait", timeout, wait=timeout))


class BarrierProxy(BaseProxy):
    """A shared barrier, like threading.Barrier (no ``action``)."""

    _typeid = "Barrier"

    def wait(self, timeout: float | None = None) -> int:
        """Wait for all parties; return this caller's arrival index."""
        return int(self._call("wait", timeout, wait=timeout))

    def reset(self) -> None:
        self._call("reset")

    def abort(self) -> None:
        self._call("abort")

    @property
    def parties(self) -> int:
        return int(self._call("parties"))

    @property
    def n_waiting(self) -> int:
        return int(self._call("n_waiting"))

    @property
    def broken(self) -> bool:
        return bool(self._call("broken"))
