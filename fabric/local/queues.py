"""Queue, JoinableQueue and SimpleQueue on crash-consistent shared-memory rings.

``put`` pickles in the caller (protocol 5; out-of-band buffers such as NumPy
arrays are copied once, straight into the ring) and returns once the message
is in the ring: there is no feeder thread, so a producer that exits right
after ``put`` loses nothing, an unpicklable object raises in ``put`` and
``join_thread`` has nothing to wait for. Exact ``bytes`` skip pickle. A
message larger than a quarter of the ring is streamed through it in pieces,
so ``put`` of such a message returns only once consumers have taken the
pieces that did not fit; a ``put`` that may give up (``block=False``, a
timeout) raises ``queue.Full`` only before writing anything (see
docs/local-queues.md).

A queue pickles as its shared-memory block, so it reaches children under
every start method and can itself travel through another queue. A consumer
or producer killed at any point loses at most the message it had in hand;
the queue stays usable for everyone else.
"""

from __future__ import annotations

import queue as _queue
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from fabric.local import _shm
from fabric.local._ring import HEADER_SIZE, MAX_CAPACITY, Ring

__all__ = ["JoinableQueue", "Queue", "QueueStatistics", "SimpleQueue"]

DEFAULT_CAPACITY = 1 << 20
_MIN_CAPACITY = 4096
_GET_MANY_DEFAULT = 1 << 16


class QueueStatistics(NamedTuple):
    """A snapshot of a queue's shared counters."""

    depth: int
    bytes_used: int
    capacity: int
    maxsize: int
    getters_sleeping: bool
    putters_sleeping: bool
    puts: int
    gets: int
    abandoned: int
    unfinished: int


def _ring_capacity(capacity: int) -> int:
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
    if not _MIN_CAPACITY <= capacity <= MAX_CAPACITY:
        raise ValueError(
            f"capacity must be in [{_MIN_CAPACITY}, {MAX_CAPACITY}] bytes, got {capacity}"
        )
    return 1 << (capacity - 1).bit_length()


def _new_ring(capacity: int, maxsize: int, joinable: bool) -> tuple[_shm.Block, Ring]:
    if not isinstance(maxsize, int) or isinstance(maxsize, bool):
        raise TypeError(f"maxsize must be an int, got {type(maxsize).__name__}")
    block = _shm.allocate(HEADER_SIZE + _ring_capacity(capacity))
    return block, Ring(block.buffer, create=True, maxsize=max(maxsize, 0), joinable=joinable)


def _deadline(block: bool, timeout: float | None) -> float | None:
    if not block or timeout is None:
        return None
    if timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Queue:
    """A process-safe FIFO queue (``multiprocessing.Queue`` / ``queue.Queue`` API).

    ``maxsize`` bounds the number of items (``<= 0``: unbounded); ``capacity``
    is the ring's size in bytes (rounded up to a power of two), which bounds
    how many bytes are in flight, not how large one message may be.
    """

    _joinable = False

    def __init__(self, maxsize: int = 0, *, capacity: int = DEFAULT_CAPACITY) -> None:
        self._block, self._ring = _new_ring(capacity, maxsize, self._joinable)
        self._maxsize = max(maxsize, 0)
        self._closed = False
        self._bind_fast_paths()

    def _bind_fast_paths(self) -> None:
        # put/get of an open queue are the C methods themselves (same
        # signature), saving a Python call per message; close() unbinds them.
        # Subclasses that override put/get keep their overrides.
        if type(self).put is Queue.put and type(self).get is Queue.get:
            self.__dict__["put"], self.__dict__["get"] = self._ring.put, self._ring.get

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self._block, self._maxsize)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"qsize={self._ring.qsize()}"
        return f"<{type(self).__name__} maxsize={self._maxsize} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{type(self).__name__} is closed")

    def put(self, obj: object, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` into the queue; raise ``queue.Full`` if no room in time.

        Pickling errors raise here, in the caller; the queue stays usable.
        """
        self._check_open()
        self._ring.put(obj, block, timeout)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return an item; raise ``queue.Empty`` if none in time."""
        self._check_open()
        return self._ring.get(block, timeout)

    def put_nowait(self, obj: object) -> None:
        """Put without blocking (``queue.Full`` if there is no room)."""
        self.put(obj, False)

    def get_nowait(self) -> Any:
        """Get without blocking (``queue.Empty`` if there is no item)."""
        return self.get(False)

    def put_many(
        self, objs: Iterable[object], block: bool = True, timeout: float | None = None
    ) -> None:
        """Put every item in order, within one overall ``timeout``.

        Raises ``queue.Full`` at the first item that finds no room in time;
        the items before it are in the queue.
        """
        self._check_open()
        deadline = _deadline(block, timeout)
        put = self._ring.put
        for obj in objs:
            put(obj, block, _left(deadline))

    def get_many(
        self,
        block: bool = True,
        timeout: float | None = None,
        max_messages_to_get: int = _GET_MANY_DEFAULT,
    ) -> list[Any]:
        """Wait for one item as ``get`` does, then take up to ``max_messages_to_get``
        that are already there, in order."""
        self._check_open()
        if max_messages_to_get < 1:
            raise ValueError("max_messages_to_get must be >= 1")
        get = self._ring.get
        items = [get(block, timeout)]
        try:
            while len(items) < max_messages_to_get:
                items.append(get(False))
        except _queue.Empty:
            pass
        return items

    def qsize(self) -> int:
        """Return the exact number of items in the queue (on every OS)."""
        return int(self._ring.qsize())

    def empty(self) -> bool:
        """Return True if the queue holds no item (a snapshot)."""
        return self.qsize() == 0

    def full(self) -> bool:
        """Return True if ``maxsize`` items are queued (a snapshot)."""
        return 0 < self._maxsize <= self.qsize()

    def close(self) -> None:
        """Stop this handle: later ``put``/``get`` through it raise ValueError.

        Other handles (in this or other processes) are unaffected; queued
        messages stay in the queue.
        """
        self._closed = True
        self.__dict__.pop("put", None)
        self.__dict__.pop("get", None)

    def join_thread(self) -> None:
        """Do nothing: there is no feeder thread, every ``put`` is already done."""

    def cancel_join_thread(self) -> None:
        """Do nothing: there is no feeder thread, exiting never waits on a queue."""

    def statistics(self) -> QueueStatistics:
        """Return a snapshot of the shared counters."""
        return QueueStatistics(**self._ring.statistics())

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JoinableQueue(Queue):
    """A Queue that counts unfinished tasks (``task_done``/``join``)."""

    _joinable = True

    def task_done(self) -> None:
        """Mark one item taken with ``get`` as processed.

        Raises ValueError if called more times than items were put.
        """
        self._ring.task_done()

    def join(self, timeout: float | None = None) -> None:
        """Block until every item put has been marked done.

        Raises TimeoutError if ``timeout`` seconds pass first. An item whose
        consumer was killed while holding it counts as done.
        """
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        if not self._ring.join(timeout):
            raise TimeoutError(f"{self._ring.statistics()['unfinished']} tasks still unfinished")


class SimpleQueue:
    """An unbounded process-safe FIFO (``multiprocessing.SimpleQueue`` API)."""

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY) -> None:
        self._block, self._ring = _new_ring(capacity, 0, False)
        self._closed = False

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_simple, (self._block,)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("SimpleQueue is closed")

    def put(self, obj: object) -> None:
        """Put ``obj`` (blocks only while the ring has no room)."""
        self._check_open()
        self._ring.put(obj)

    def get(self, timeout: float | None = None) -> Any:
        """Remove and return an item; raise ``queue.Empty`` after ``timeout``."""
        self._check_open()
        return self._ring.get(True, timeout)

    def empty(self) -> bool:
        """Return True if the queue holds no item (a snapshot)."""
        return int(self._ring.qsize()) == 0

    def close(self) -> None:
        """Stop this handle; other handles are unaffected."""
        self._closed = True

    def statistics(self) -> QueueStatistics:
        """Return a snapshot of the shared counters."""
        return QueueStatistics(**self._ring.statistics())


def _rebuild(cls: type[Queue], block: _shm.Block, maxsize: int) -> Queue:
    q = cls.__new__(cls)
    q._block, q._ring = block, Ring(block.buffer)
    q._maxsize, q._closed = maxsize, False
    q._bind_fast_paths()
    return q


def _rebuild_simple(block: _shm.Block) -> SimpleQueue:
    q = SimpleQueue.__new__(SimpleQueue)
    q._block, q._ring, q._closed = block, Ring(block.buffer), False
    return q
