"""Lock, RLock, Semaphore, BoundedSemaphore, Event, Condition and Barrier across processes.

Each primitive is a C object from :mod:`fabric.local._sync` over a shared
:class:`~fabric.local._shm.Block`, and pickles as that block, so it can be
passed to a child under every start method, sent through a Queue, or inherited
under fork; every copy refers to the same shared state. The behaviour is
:mod:`threading`'s (return values, ``RuntimeError``/``ValueError`` cases,
timeouts), and ``acquire`` also takes multiprocessing's ``block=`` spelling.

A process killed while holding a :class:`Lock` or :class:`RLock` does not
deadlock the others: a waiter notices the dead owner within
:data:`OWNER_CHECK_INTERVAL` seconds (one futex sleep slice), takes the lock
over and is told with :class:`OwnerDiedWarning`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar, cast

from fabric.local import _shm, _sync

__all__ = [
    "OWNER_CHECK_INTERVAL",
    "Barrier",
    "BarrierStatistics",
    "BoundedSemaphore",
    "BrokenBarrierError",
    "Condition",
    "ConditionStatistics",
    "Event",
    "EventStatistics",
    "Lock",
    "LockStatistics",
    "OwnerDiedWarning",
    "RLock",
    "Semaphore",
    "SemaphoreStatistics",
]

OwnerDiedWarning = _sync.OwnerDiedWarning
OwnerDiedWarning.__module__ = "fabric.local"
BrokenBarrierError = threading.BrokenBarrierError
OWNER_CHECK_INTERVAL: float = _sync.SLICE
"""Seconds between a Lock waiter's checks that the owner process is alive."""

_T = TypeVar("_T")


class LockStatistics(NamedTuple):
    """A snapshot of a :class:`Lock` or :class:`RLock`."""

    locked: bool
    owner_pid: int | None
    """Process holding the lock (None when free)."""
    owner_thread: int | None
    """``threading.get_ident()`` of the holder in its process (RLock only)."""
    depth: int
    """Recursion depth (RLock; 1 or 0 for a Lock)."""
    waiters: int
    """Threads asleep waiting for the lock (spinning ones are not counted)."""
    owner_deaths: int
    """How many times a dead owner's lock was taken over."""


class SemaphoreStatistics(NamedTuple):
    """A snapshot of a :class:`Semaphore` or :class:`BoundedSemaphore`."""

    value: int
    waiters: int
    bound: int | None
    """The initial value of a BoundedSemaphore, None for a Semaphore."""


class EventStatistics(NamedTuple):
    """A snapshot of an :class:`Event`."""

    is_set: bool
    waiters: int


class ConditionStatistics(NamedTuple):
    """A snapshot of a :class:`Condition`."""

    waiters: int
    """Threads in ``wait()`` not yet notified."""
    notified: int
    """Notifications granted but not yet picked up by their waiters."""
    lock: LockStatistics


class BarrierStatistics(NamedTuple):
    """A snapshot of a :class:`Barrier`."""

    parties: int
    n_waiting: int
    broken: bool


def _create(cls: type, base: Any, *args: Any) -> Any:
    """Allocate a block and build a ``cls`` handle (C type ``base``) that initialises it."""
    block = _shm.allocate(_sync.SIZE)
    self = base.__new__(cls, block.segment.mmap, block.offset, True, *args)
    self._block = block
    return self


def _rebuild(cls: type, base: Any, block: _shm.Block, *args: Any) -> Any:
    """Attach a ``cls`` handle to a block a pickle carried over."""
    self = base.__new__(cls, block.segment.mmap, block.offset, False, *args)
    self._block = block
    return self


def _lock_statistics(lock: _sync.Lock) -> LockStatistics:
    pid, waiters, deaths, count, thread = lock._stats()
    return LockStatistics(
        locked=pid != 0,
        owner_pid=pid or None,
        owner_thread=thread or None,
        depth=count,
        waiters=waiters,
        owner_deaths=deaths,
    )


class Lock(_sync.Lock):
    """A mutex shared between processes (the ``threading.Lock`` API).

    Any thread of any process may release it. ``acquire(blocking=True,
    timeout=-1)`` returns True once held, False on timeout; ``timeout=None``
    and ``block=`` are accepted as multiprocessing spells them. Acquiring a
    free lock and releasing it are single atomic operations.
    """

    __slots__ = ("__weakref__", "_block")
    _block: _shm.Block

    def __new__(cls) -> Self:
        return cast(Self, _create(cls, _sync.Lock))

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), _sync.Lock, self._block)

    def statistics(self) -> LockStatistics:
        """Return who holds the lock and how many wait for it."""
        return _lock_statistics(self)

    def __repr__(self) -> str:
        st = self.statistics()
        state = f"locked by pid {st.owner_pid}" if st.locked else "unlocked"
        return f"<{state} fabric.local.{type(self).__name__} at {id(self):#x}>"


class RLock(_sync.RLock):
    """A reentrant mutex shared between processes (the ``threading.RLock`` API).

    Its owner is a (process, thread) pair: only that thread may release it,
    anyone else gets ``RuntimeError``.
    """

    __slots__ = ("__weakref__", "_block")
    _block: _shm.Block

    def __new__(cls) -> Self:
        return cast(Self, _create(cls, _sync.RLock))

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), _sync.RLock, self._block)

    def statistics(self) -> LockStatistics:
        """Return the owner, recursion depth and waiters."""
        return _lock_statistics(self)

    def __repr__(self) -> str:
        st = self.statistics()
        return (
            f"<{'locked' if st.locked else 'unlocked'} fabric.local.{type(self).__name__} "
            f"owner={st.owner_pid or 0}:{st.owner_thread or 0} count={st.depth} at {id(self):#x}>"
        )


class Semaphore(_sync.Semaphore):
    """A counter shared between processes (the ``threading.Semaphore`` API).

    ``acquire`` blocks while the value is zero; ``release(n)`` adds ``n`` and
    wakes up to ``n`` waiters.
    """

    __slots__ = ("__weakref__", "_block")
    _block: _shm.Block
    _bounded = False

    def __new__(cls, value: int = 1) -> Self:
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        return cast(Self, _create(cls, _sync.Semaphore, value, cls._bounded))

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), _sync.Semaphore, self._block)

    @property
    def _value(self) -> int:
        return self.get_value()

    def statistics(self) -> SemaphoreStatistics:
        """Return the current value, the sleeping waiters and the bound."""
        value, waiters, bound = self._stats()
        return SemaphoreStatistics(value, waiters, bound if self._bounded else None)

    def __repr__(self) -> str:
        st = self.statistics()
        extra = f"/{st.bound}" if st.bound is not None else ""
        return f"<fabric.local.{type(self).__name__} at {id(self):#x}: value={st.value}{extra}>"


class BoundedSemaphore(Semaphore):
    """A Semaphore whose ``release`` raises ValueError past the initial value."""

    __slots__ = ()
    _bounded = True


class Event(_sync.Event):
    """A flag shared between processes (the ``threading.Event`` API).

    ``wait(timeout=None)`` returns True if the flag was set before or during the
    wait (even if it has been cleared again since), False on timeout.
    """

    __slots__ = ("__weakref__", "_block")
    _block: _shm.Block

    def __new__(cls) -> Self:
        return cast(Self, _create(cls, _sync.Event))

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), _sync.Event, self._block)

    def statistics(self) -> EventStatistics:
        """Return the flag and the number of sleeping waiters."""
        flag, waiters = self._stats()
        return EventStatistics(bool(flag), waiters)

    def __repr__(self) -> str:
        state = "set" if self.is_set() else "unset"
        return f"<fabric.local.{type(self).__name__} at {id(self):#x}: {state}>"


class Condition(_sync.Condition):
    """A condition variable shared between processes (the ``threading.Condition`` API).

    ``lock`` must be a fabric :class:`Lock` or :class:`RLock` (a new RLock by
    default). ``wait``/``notify``/``notify_all`` raise RuntimeError unless the
    caller holds the lock; ``notify(n)`` wakes at most ``n`` of the threads
    waiting at the time of the call.
    """

    __slots__ = ("__weakref__", "_block", "acquire", "release")
    _block: _shm.Block
    acquire: Callable[..., bool]
    release: Callable[[], None]

    def __new__(cls, lock: Lock | RLock | None = None) -> Self:
        self: Self = _create(cls, _sync.Condition, RLock() if lock is None else lock)
        self._bind()
        return self

    def _bind(self) -> None:
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_condition, (type(self), self._block, self._lock)

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()

    def _is_owned(self) -> bool:
        return self._lock._is_owned()

    def wait_for(self, predicate: Callable[[], _T], timeout: float | None = None) -> _T:
        """Wait until ``predicate()`` is true or ``timeout`` passes; return its last value."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waittime = timeout
        result = predicate()
        while not result:
            if deadline is not None:
                waittime = deadline - time.monotonic()
                if waittime <= 0:
                    break
            self.wait(waittime)
            result = predicate()
        return result

    notifyAll = _sync.Condition.notify_all  # threading's old name

    def statistics(self) -> ConditionStatistics:
        """Return the waiters, pending notifications and the lock's statistics."""
        waiting, _sleepers, tokens = self._stats()
        return ConditionStatistics(waiting, tokens, _lock_statistics(self._lock))

    def __repr__(self) -> str:
        return f"<fabric.local.Condition({self._lock!r}, {self.statistics().waiters})>"


def _rebuild_condition(cls: type[Condition], block: _shm.Block, lock: Lock | RLock) -> Condition:
    self: Condition = _rebuild(cls, _sync.Condition, block, lock)
    self._bind()
    return self


class Barrier(threading.Barrier):
    """A barrier for ``parties`` threads in any processes (the ``threading.Barrier`` API).

    The state lives in shared memory and the waiting is done by a fabric
    :class:`Condition`; ``action`` runs in the process of the thread that
    completes the barrier and must be picklable to pass the barrier to a child.
    """

    def __init__(
        self, parties: int, action: Callable[[], object] | None = None, timeout: float | None = None
    ) -> None:
        if parties < 1:
            raise ValueError("parties must be >= 1")
        self.__setstate__((parties, action, timeout, Condition(Lock()), _shm.allocate(8)))
        self._state = 0  # 0 filling, 1 draining, -1 resetting, -2 broken (threading's)
        self._count = 0

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._parties, self._action, self._timeout, self._cond, self._block = state
        self._array = self._block.buffer.cast("i")

    def __getstate__(self) -> tuple[Any, ...]:
        return (self._parties, self._action, self._timeout, self._cond, self._block)

    @property
    def _state(self) -> int:
        return int(self._array[0])

    @_state.setter
    def _state(self, value: int) -> None:
        self._array[0] = value

    @property
    def _count(self) -> int:
        return int(self._array[1])

    @_count.setter
    def _count(self, value: int) -> None:
        self._array[1] = value

    def statistics(self) -> BarrierStatistics:
        """Return the parties, the threads waiting now and whether it is broken."""
        with self._cond:
            return BarrierStatistics(self._parties, self.n_waiting, self.broken)
