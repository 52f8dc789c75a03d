"""Pool: the multiprocessing.Pool API over the cluster executor.

``processes`` is accepted for compatibility and ignored: the cluster's worker
nodes decide the parallelism. ``initializer(*initargs)`` runs once in every task
process that runs one of this pool's tasks, before the first of them.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from fabric.remote._executor import Executor
from fabric.remote._progress import Progress, check, track

T = TypeVar("T")

# Initializers already run in this task process, by the pool's token.
_initialized: set[bytes] = set()


def _call(
    token: bytes,
    init: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    fn: Callable[..., T],
    args: tuple[Any, ...],
) -> T:
    if init is not None and token not in _initialized:
        init(*initargs)
        _initialized.add(token)
    return fn(*args)


def _call_chunk(
    token: bytes,
    init: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    fn: Callable[..., T],
    chunk: list[tuple[Any, ...]],
) -> list[T]:
    return [_call(token, init, initargs, fn, args) for args in chunk]


class AsyncResult(Generic[T]):
    """The result of ``apply_async``/``map_async``, like multiprocessing's."""

    def __init__(
        self,
        futures: list[cf.Future[Any]],
        chunked: bool,
        single: bool,
        callback: Callable[[Any], None] | None,
        error_callback: Callable[[BaseException], None] | None,
    ) -> None:
        self._futures, self._chunked, self._single = futures, chunked, single
        self._done = threading.Event()
        self._left = len(futures)
        self._lock = threading.Lock()
        self._callback, self._error_callback = callback, error_callback
        if not futures:
            self._finish()
        for future in futures:
            future.add_done_callback(self._one_done)

    def _one_done(self, future: cf.Future[Any]) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        try:
            value = self._value()
        except BaseException as exc:
            if self._error_callback is not None:
                self._error_callback(exc)
        else:
            if self._callback is not None:
                self._callback(value)
        self._done.set()

    def _value(self) -> Any:
        results = [f.result() for f in self._futures]
        if self._single:
            return results[0]
        return list(itertools.chain.from_iterable(results)) if self._chunked else results

    def ready(self) -> bool:
        return self._done.is_set()

    def successful(self) -> bool:
        """Return whether the call(s) returned; ValueError if not ready."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return all(f.exception() is None for f in self._futures)

    def wait(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def get(self, timeout: float | None = None) -> T:
        """Return the result; raise the remote exception, or multiprocessing.TimeoutError."""
        if not self._done.wait(timeout):
            raise multiprocessing.TimeoutError
        value: T = self._value()
        return value


class Pool:
    """multiprocessing.Pool over worker nodes: apply, map, imap, starmap and their async forms."""

    def __init__(
        self,
        executor: Executor,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
    ) -> None:
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        self._executor = executor
        self._init, self._initargs = initializer, tuple(initargs)
        self._token = os.urandom(8)
        self._state = "RUN"

    def _check(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> cf.Future[Any]:
        return self._executor.submit(_call, self._token, self._init, self._initargs, fn, args)

    def _submit_chunks(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[tuple[Any, ...]],
        chunksize: int | None,
        progress: Progress = False,
    ) -> list[cf.Future[Any]]:
        items = list(iterable)
        if chunksize is None:  # ~32 chunks: enough to balance nodes, few round trips
            chunksize = max(1, -(-len(items) // 32))
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize}")
        check(progress)
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        futures = [
            self._executor.submit(_call_chunk, self._token, self._init, self._initargs, fn, chunk)
            for chunk in chunks
        ]
        track(futures, [len(chunk) for chunk in chunks], progress, "map")
        return futures

    def apply(
        self, func: Callable[..., T], args: Iterable[Any] = (), kwds: dict[str, Any] | None = None
    ) -> T:
        """Run ``func(*args, **kwds)`` on a worker node and return its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., T],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[T], None] | None = None,
        error_callback: Callable[[BaseException], None] | None = None,
    ) -> AsyncResult[T]:
        self._check()
        call = (lambda *a: func(*a, **kwds)) if kwds else func
        future = self._submit(call, tuple(args))
        return AsyncResult([future], False, True, callback, error_callback)

    def map(
        self,
        func: Callable[..., T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        progress: Progress = False,
    ) -> list[T]:
        """Return ``[func(x) for x in iterable]`` computed on the cluster."""
        return self.map_async(func, iterable, chunksize, progress=progress).get()

    def map_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list[T]], None] | None = None,
        error_callback: Callable[[BaseException], None] | None = None,
        progress: Progress = False,
    ) -> AsyncResult[list[T]]:
        self._check()
        futures = self._submit_chunks(func, ((x,) for x in iterable), chunksize, progress)
        return AsyncResult(futures, True, False, callback, error_callback)

    def starmap(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        progress: Progress = False,
    ) -> list[T]:
        """Return ``[func(*args) for args in iterable]`` computed on the cluster."""
        return self.starmap_async(func, iterable, chunksize, progress=progress).get()

    def starmap_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[T]], None] | None = None,
        error_callback: Callable[[BaseException], None] | None = None,
        progress: Progress = False,
    ) -> AsyncResult[list[T]]:
        self._check()
        futures = self._submit_chunks(func, (tuple(a) for a in iterable), chunksize, progress)
        return AsyncResult(futures, True, False, callback, error_callback)

    def imap(
        self,
        func: Callable[..., T],
        iterable: Iterable[Any],
        chunksize: int = 1,
        progress: Progress = False,
    ) -> Iterator[T]:
        """Yield results in order as they arrive."""
        self._check()
        futures = self._submit_chunks(func, ((x,) for x in iterable), chunksize, progress)
        return itertools.chain.from_iterable(f.result() for f in futures)

    def imap_unordered(
        self,
        func: Callable[..., T],
        iterable: Iterable[Any],
        chunksize: int = 1,
        progress: Progress = False,
    ) -> Iterator[T]:
        """Yield results in the order they complete."""
        self._check()
        futures = self._submit_chunks(func, ((x,) for x in iterable), chunksize, progress)
        return itertools.chain.from_iterable(f.result() for f in cf.as_completed(futures))

    def close(self) -> None:
        """Accept no more work; pending tasks still run."""
        if self._state == "RUN":
            self._state = "CLOSE"

    def terminate(self) -> None:
        """Cancel every outstanding task (running ones are stopped on their nodes)."""
        self._state = "TERMINATE"
        self._executor.shutdown(wait=False, cancel_futures=True)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the outstanding tasks (after close() or terminate())."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        cf.wait(self._executor.outstanding(), timeout)

    def __enter__(self) -> Pool:
        self._check()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.terminate()
