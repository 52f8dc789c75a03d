"""The result objects Pool hands out: AsyncResult, MapResult, IMapIterator.

They mirror ``multiprocessing.pool`` (``get``/``wait``/``ready``/``successful``,
callbacks run on the pool's loop thread before waiters wake) and add what the
engine needs: each is fed by :class:`~fabric.local._pool_task.Task` objects
delivering on the loop thread. A timed wait raises the builtin
``TimeoutError``.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from fabric.local import _pool_wire as wire
from fabric.local._compat import TimeoutError
from fabric.local._pool_engine import Engine
from fabric.local._pool_task import Task, TerminatedError

__all__ = ["AsyncResult", "CallTask", "IMapIterator", "MapResult", "chunk_bounds"]

T = TypeVar("T")

_TARGET_CHUNK_S = 0.005  # adaptive chunks aim at this much work each
_MAX_CHUNK = 4096
# imap keeps about this much work outstanding per worker (at least _MIN_WINDOW
# and two chunks' worth of items, at most _MAX_WINDOW), so workers never wait
# for the caller to read more input, and memory stays bounded.
_WINDOW_S = 0.02
_MIN_WINDOW, _MAX_WINDOW = 256, 16384
_READ_CHUNKS = 4096  # chunks read from the input at a time (Pool.close() reads it all)


def chunk_bounds(length: int, processes: int, chunksize: int | None) -> list[int]:
    """Return the start of each chunk of ``map``, then ``length``.

    A given ``chunksize`` cuts equal chunks. Otherwise chunks shrink as the map
    goes (guided scheduling), in rounds of one equal chunk per worker: each is
    half of what is left per worker, never under 1/8 of a worker's share. Dealt
    round-robin, every worker gets the same share; few chunks keep the per-chunk
    cost low (8 for any long map on two workers, against ``multiprocessing``'s
    8), and the last ones are small enough to even out the finish when one
    worker runs slow.
    """
    if chunksize is not None:
        return [*range(0, length, chunksize), length]
    floor = max(1, -(-length // (8 * processes)))
    bounds, start = [], 0
    while start < length:
        size = max(floor, -(-(length - start) // (2 * processes)))
        for _ in range(processes):
            if start >= length:
                break
            bounds.append(start)
            start += size
    return [*bounds, length]


class AsyncResult(Generic[T]):
    """The pending result of one ``apply_async`` (or a whole ``map_async``)."""

    def __init__(
        self,
        callback: Callable[[T], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> None:
        self._callback = callback
        self._error_callback = error_callback
        self._done = False
        self._ok = False
        self._value: Any = None
        self._event: threading.Event | None = None

    def ready(self) -> bool:
        """Return whether the call has completed."""
        return self._done

    def successful(self) -> bool:
        """Return whether the call completed without raising; ValueError if not ready."""
        if not self._done:
            raise ValueError(f"{self!r} not ready")
        return self._ok

    def wait(self, timeout: float | None = None) -> None:
        """Block until the result is ready or ``timeout`` seconds pass."""
        if self._done:
            return
        with _event_lock:
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        if not self._done:
            event.wait(timeout)

    def get(self, timeout: float | None = None) -> T:
        """Return the result, or raise the call's exception; TimeoutError after ``timeout``."""
        self.wait(timeout)
        if not self._done:
            raise TimeoutError(f"the result was not ready within {timeout} s")
        if self._ok:
            return self._value  # type: ignore[no-any-return]
        raise self._value

    def _set(self, ok: bool, value: Any) -> Callable[[], object] | None:
        """Store the outcome and run the callback; return the wake-up of a waiter, if any."""
        if self._done:
            return None
        self._ok, self._value = ok, value
        callback = self._callback if ok else self._error_callback
        try:
            if callback is not None:
                callback(value)
        except BaseException:
            wake = self._mark_done()
            if wake is not None:
                wake()
            raise
        return self._mark_done()

    def _mark_done(self) -> Callable[[], object] | None:
        # _done before reading _event pairs with wait() publishing _event before
        # re-reading _done: one of the two always sees the other.
        self._done = True
        event = self._event
        return None if event is None else event.set


# One lock for every result's lazily created Event: a result nobody waits on
# costs no Event, and waits are rare next to completions.
_event_lock = threading.Lock()


class CallTask(AsyncResult[T], Task):
    """The result of one ``apply_async``, which is also the task the engine runs."""

    __slots__ = ()

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Any,
        kwargs: Any,
        callback: Callable[[T], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        AsyncResult.__init__(self, callback, error_callback)
        Task.__init__(self, fn, wire.CALL, args, kwargs)

    def deliver(self, ok: bool, value: Any, seconds: float) -> Callable[[], object] | None:
        return self._set(ok, value)


class _ChunkTask(Task):
    __slots__ = ("job", "seq", "start")

    def __init__(
        self,
        job: _ChunkSink,
        fn: Callable[..., Any],
        star: bool,
        seq: int,
        start: int,
        items: list[Any],
    ) -> None:
        # Not super().__init__: that costs twice as much, on imap's per-item path.
        Task.__init__(self, fn, wire.STAR if star else wire.MAP, items)
        self.job = job
        self.seq = seq
        self.start = start

    def claim(self) -> bool:
        return self.job.wanted()

    def deliver(self, ok: bool, value: Any, seconds: float) -> Callable[[], object] | None:
        return self.job.chunk_done(self, ok, value, seconds)

    def describe(self) -> str:
        stop = self.start + len(self.args) - 1
        return f"{super().describe()[:-1]} over items {self.start}..{stop})"


class _ChunkSink:
    def wanted(self) -> bool:
        return True

    def chunk_done(
        self, task: _ChunkTask, ok: bool, value: Any, seconds: float
    ) -> Callable[[], object] | None:
        raise NotImplementedError


class MapResult(AsyncResult[list[T]], _ChunkSink):
    """The pending result of ``map_async``/``starmap_async``: a list, or the first error."""

    def __init__(
        self,
        engine: Engine,
        fn: Callable[..., Any],
        items: list[Any],
        bounds: list[int],
        star: bool,
        callback: Callable[[list[T]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        progress: Any = None,
    ) -> None:
        super().__init__(callback, error_callback)
        self._values: list[Any] = [None] * len(items)
        self._left = 0
        self._progress = progress
        tasks = []
        for seq, (start, stop) in enumerate(itertools.pairwise(bounds)):
            tasks.append(_ChunkTask(self, fn, star, seq, start, items[start:stop]))
        self._left = len(tasks)
        if not tasks:
            wake = self._finish(True, [])
            if wake is not None:
                wake()
            return
        engine.submit_many(tasks)

    def wanted(self) -> bool:
        return not self._done

    def chunk_done(
        self, task: _ChunkTask, ok: bool, value: Any, seconds: float
    ) -> Callable[[], object] | None:
        if self._done:
            return None
        if not ok:
            return self._finish(False, value)
        self._values[task.start : task.start + len(value)] = value
        if self._progress is not None:
            self._progress.update(len(value))
        self._left -= 1
        if self._left == 0:
            return self._finish(True, self._values)
        return None

    def _finish(self, ok: bool, value: Any) -> Callable[[], object] | None:
        if self._progress is not None:
            self._progress.close()
        return self._set(ok, value)


class IMapIterator(Iterator[T], _ChunkSink):
    """Results of ``imap``/``imap_unordered``, streamed as the caller iterates.

    Input is read lazily, in the caller's thread, and only while fewer than a
    window of items are outstanding, so neither the input nor the results are
    ever held whole. A failed chunk raises its exception in its place; iteration
    then goes on with the next chunk (the failed chunk's other items are lost).
    """

    def __init__(
        self,
        engine: Engine,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        ordered: bool,
        star: bool = False,
        progress: Any = None,
    ) -> None:
        self._engine = engine
        self._fn = fn
        self._input: Iterator[Any] | None = iter(iterable)
        self._fixed = chunksize
        self._ordered = ordered
        self._star = star
        self._progress = progress
        self._item_time = 0.0
        self._window = _MIN_WINDOW * engine.processes  # items outstanding; see _resize()
        self._outstanding = 0  # items sent and not yet handed to the caller
        self._seq = 0
        self._next_seq = 0
        self._start = 0
        # Finished chunks as (ok, value, items): by sequence number when ordered,
        # in arrival order otherwise.
        self._ready: dict[int, tuple[bool, Any, int]] = {}
        self._arrived: collections.deque[tuple[bool, Any, int]] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0  # callers blocked on _cond: only then is a notify needed
        self._current: Iterator[Any] = iter(())
        self._taken: collections.deque[tuple[bool, Any]] = collections.deque()
        self._feeding = threading.Lock()  # the caller and Pool.close() may both feed
        self._input_error: Exception | None = None
        self._cut_short = False  # the pool stopped before all input was sent
        self._waker = self._wake  # one bound method: the engine keys its wake-ups by it
        self._refill()

    def __iter__(self) -> IMapIterator[T]:
        return self

    def __next__(self) -> T:
        for value in self._current:  # the per-item path: no call but this one
            return value  # type: ignore[no-any-return]
        return self._next_chunk(None)

    def next(self, timeout: float | None = None) -> T:
        """Return the next result; TimeoutError if none comes within ``timeout``."""
        for value in self._current:
            return value  # type: ignore[no-any-return]
        return self._next_chunk(timeout)

    def _next_chunk(self, timeout: float | None) -> T:
        if not self._taken:
            self._take(timeout)
        ok, value = self._taken.popleft()
        if not ok:
            raise value
        if len(value) == 1:  # (chunksize=1: no iterator)
            return value[0]  # type: ignore[no-any-return]
        self._current = iter(value)  # a chunk's result holds one value per item, never none
        return next(self._current)  # type: ignore[no-any-return]

    def _take(self, timeout: float | None) -> None:
        """Move every chunk result that may be handed out now to ``_taken``; wait for one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._outstanding < self._window // 2:  # refill in bulk, not one chunk per item
            self._refill()
        with self._cond:
            while not self._pop_ready():
                if self._input is None and self._next_seq >= self._seq:
                    self._progress_close()
                    if self._cut_short:
                        raise TerminatedError("the pool was terminated before all input was sent")
                    raise StopIteration
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no result within {timeout} s")
                if self._input is not None and self._outstanding < self._window:
                    self._cond.release()  # feed the workers rather than wait for them
                    try:
                        self._refill()
                    finally:
                        self._cond.acquire()
                    continue
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1

    def _pop_ready(self) -> bool:
        taken, count, items = self._taken, 0, 0
        # Results of consecutive chunks join into one list (each is a fresh list
        # of its own): the caller then runs through a whole batch with one
        # iterator instead of one call per chunk.
        joined = taken[-1][1] if taken and taken[-1][0] else None
        for ok, value, n in self._ordered_ready() if self._ordered else _drain(self._arrived):
            if ok and joined is not None:
                joined += value
            else:
                taken.append((ok, value))
                joined = value if ok else None
            count, items = count + 1, items + n
        self._next_seq += count
        self._outstanding -= items
        return bool(taken)

    def _ordered_ready(self) -> Iterator[tuple[bool, Any, int]]:
        # the results from _next_seq on, for as long as they are consecutive
        ready, seq = self._ready, self._next_seq
        while seq in ready:
            yield ready.pop(seq)
            seq += 1

    def _arrive(self, seq: int, ok: bool, value: Any, items: int) -> None:
        # No lock: a dict store or deque append is atomic, and every arrival is
        # followed by _wake(), which takes the lock the waiter checks under.
        if self._ordered:
            self._ready[seq] = (ok, value, items)
        else:
            self._arrived.append((ok, value, items))

    def _wake(self) -> None:
        with self._cond:
            if self._waiting:
                self._cond.notify()

    def _refill(self, window: float | None = None) -> None:
        """Read input and submit chunks while fewer than ``window`` items are out."""
        with self._feeding:
            if self._input is not None and not self._engine.accepting:
                self._input, self._cut_short = None, True
            tasks = []
            self._resize()
            limit = self._window if window is None else window
            size = self._chunk()
            while self._input is not None and self._outstanding < limit:
                # Whole chunks, read at once: one islice per refill, not one per chunk.
                chunks = int(min(_READ_CHUNKS, -(-(limit - self._outstanding) // size)))
                items = self._read(chunks * size)
                for start in range(0, len(items), size):
                    chunk = items[start : start + size]
                    task = _ChunkTask(self, self._fn, self._star, self._seq, self._start, chunk)
                    tasks.append(task)
                    self._seq += 1
                    self._start += len(chunk)
                self._outstanding += len(items)
            if self._input_error is not None:
                self._arrive(self._seq, False, self._input_error, 0)
                self._wake()
                self._seq += 1
                self._input_error = None
            if tasks:
                self._engine.submit_many(tasks)

    def _read(self, size: int) -> list[Any]:
        items: list[Any] = []
        assert self._input is not None
        try:
            items.extend(itertools.islice(self._input, size))  # keeps what came before a raise
        except Exception as exc:  # raised in its place, after the items read before it
            self._input = None
            self._input_error = exc
        if len(items) < size:
            self._input = None
        return items

    def submit_rest(self) -> None:
        """Read and submit all the remaining input now (the pool is closing)."""
        self._refill(math.inf)

    def _chunk(self) -> int:
        if self._fixed is not None:
            return self._fixed
        if self._item_time <= 0:
            return 1
        return max(1, min(_MAX_CHUNK, int(_TARGET_CHUNK_S / self._item_time)))

    def chunk_done(
        self, task: _ChunkTask, ok: bool, value: Any, seconds: float
    ) -> Callable[[], object]:
        items = len(task.args)
        self._item_time = seconds / items
        if ok and self._progress is not None:
            self._progress.update(items)
        if self._ordered:  # _arrive(), inlined: this runs once per chunk
            self._ready[task.seq] = (ok, value, items)
        else:
            self._arrived.append((ok, value, items))
        return self._waker

    def _resize(self) -> None:
        per_worker = _MIN_WINDOW
        if self._item_time > 0:
            per_worker = min(_MAX_WINDOW, max(per_worker, int(_WINDOW_S / self._item_time)))
        per_worker = max(per_worker, 2 * self._chunk())
        self._window = per_worker * self._engine.processes

    def _progress_close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None


def _drain(arrived: collections.deque[tuple[bool, Any, int]]) -> Iterator[tuple[bool, Any, int]]:
    """Pop ``arrived`` from the left until it is empty (appends may race in: they are taken too)."""
    while arrived:
        yield arrived.popleft()
