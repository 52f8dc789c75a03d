"""Pool: the ``multiprocessing.Pool`` API on workers that survive crashes.

Differences from ``multiprocessing.Pool`` a caller may notice, all deliberate:

* A worker that dies mid-task (SIGKILL, segfault, ``os._exit``) is replaced and
  only its task is retried (``retries=1`` by default); past that the task fails
  with :class:`~fabric.errors.WorkerLostError`. ``multiprocessing`` hangs.
* An exception that cannot be pickled arrives as
  :class:`~fabric.local.ExceptionProxy`; every worker exception has the worker's
  traceback as ``__cause__``.
* ``chunksize=None`` (the default everywhere) picks chunks automatically;
  timeouts raise ``fabric.local.TimeoutError``, both a builtin ``TimeoutError``
  and a ``multiprocessing.TimeoutError``.
* Ctrl-C during a blocking call terminates the pool and re-raises
  ``KeyboardInterrupt``; workers ignore SIGINT.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any, TypeVar

from fabric.local._compat import TimeoutError
from fabric.local._pool_engine import Engine
from fabric.local._pool_task import DEFAULT_RETRIES, Statistics, TerminatedError
from fabric.local._progress import Progress, progress_bar
from fabric.local._results import AsyncResult, CallTask, IMapIterator, MapResult, chunk_bounds

__all__ = [
    "DEFAULT_RETRIES",
    "AsyncResult",
    "IMapIterator",
    "MapResult",
    "Pool",
    "Statistics",
    "TerminatedError",
]

T = TypeVar("T")
R = TypeVar("R")


def default_processes() -> int:
    """Return the number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _start_method(context: object) -> str:
    if context is None:
        return "fork"
    if isinstance(context, str):
        return context
    getter = getattr(context, "get_start_method", None)
    if getter is None:
        raise TypeError(f"context must be a start method name or a context, not {context!r}")
    return str(getter())


class Pool:
    """A pool of worker processes with the ``multiprocessing.Pool`` API.

    ``retries`` is how many times a task whose worker died is run again before
    it fails with ``WorkerLostError``. ``context`` is a start method name
    (``"fork"``, the default, ``"forkserver"`` or ``"spawn"``) or a context
    object (``fabric.local.get_context(m).Pool(...)`` passes its own).
    """

    @classmethod
    def _fabric_bind_context(cls, context: object) -> Callable[..., Pool]:
        return functools.partial(cls, context=context)

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: object = None,
        *,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if processes is None:
            processes = default_processes()
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self._processes = processes
        self._engine = Engine(
            processes,
            initializer,
            tuple(initargs),
            maxtasksperchild,
            retries,
            _start_method(context),
        )
        self._closed = False
        self._feeders: weakref.WeakSet[IMapIterator[Any]] = weakref.WeakSet()

    def __repr__(self) -> str:
        state = "running" if self._engine.accepting else "closed"
        return f"<fabric.local.Pool state={state} pool_size={self._processes}>"

    # -- single calls ----------------------------------------------------------

    def apply(
        self,
        func: Callable[..., R],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] | None = None,
    ) -> R:
        """Call ``func(*args, **kwds)`` in a worker and return its result."""
        return self._wait(self.apply_async(func, args, kwds))

    def apply_async(
        self,
        func: Callable[..., R],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] | None = None,
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult[R]:
        """Start ``func(*args, **kwds)`` in a worker; callbacks run on the pool's thread."""
        task: CallTask[R] = CallTask(func, tuple(args), dict(kwds or {}), callback, error_callback)
        self._engine.submit(task)
        return task

    # -- maps ------------------------------------------------------------------

    def map(
        self,
        func: Callable[[T], R],
        iterable: Iterable[T],
        chunksize: int | None = None,
        *,
        progress: Progress = False,
    ) -> list[R]:
        """Return ``[func(x) for x in iterable]`` computed by the workers."""
        return self._wait(self.map_async(func, iterable, chunksize, progress=progress))

    def map_async(
        self,
        func: Callable[[T], R],
        iterable: Iterable[T],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        progress: Progress = False,
    ) -> MapResult[R]:
        """Start a map; the result's ``get()`` returns the list or raises the first error."""
        return self._map(func, iterable, chunksize, False, callback, error_callback, progress)

    def starmap(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        progress: Progress = False,
    ) -> list[R]:
        """Return ``[func(*args) for args in iterable]`` computed by the workers."""
        return self._wait(self.starmap_async(func, iterable, chunksize, progress=progress))

    def starmap_async(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        progress: Progress = False,
    ) -> MapResult[R]:
        """Start a starmap; like :meth:`map_async` with argument tuples."""
        return self._map(func, iterable, chunksize, True, callback, error_callback, progress)

    def imap(
        self,
        func: Callable[[T], R],
        iterable: Iterable[T],
        chunksize: int | None = None,
        *,
        progress: Progress = False,
    ) -> IMapIterator[R]:
        """Iterate over ``func(x)`` in input order, reading the input lazily."""
        return self._imap(func, iterable, chunksize, True, progress)

    def imap_unordered(
        self,
        func: Callable[[T], R],
        iterable: Iterable[T],
        chunksize: int | None = None,
        *,
        progress: Progress = False,
    ) -> IMapIterator[R]:
        """Iterate over ``func(x)`` in completion order, reading the input lazily."""
        return self._imap(func, iterable, chunksize, False, progress)

    def _map(
        self,
        func: Callable[..., R],
        iterable: Iterable[Any],
        chunksize: int | None,
        star: bool,
        callback: Callable[[list[R]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        progress: Progress,
    ) -> MapResult[R]:
        self._check_running()
        if star:
            items = [tuple(args) for args in iterable]
        else:  # a list is not copied: MapResult slices it into chunks before returning
            items = iterable if type(iterable) is list else list(iterable)
        bounds = chunk_bounds(len(items), self._processes, _check_chunksize(chunksize))
        bar = progress_bar(progress, len(items), getattr(func, "__name__", "map"))
        return MapResult(self._engine, func, items, bounds, star, callback, error_callback, bar)

    def _imap(
        self,
        func: Callable[..., R],
        iterable: Iterable[Any],
        chunksize: int | None,
        ordered: bool,
        progress: Progress,
    ) -> IMapIterator[R]:
        self._check_running()
        total = len(iterable) if isinstance(iterable, Sized) else None
        bar = progress_bar(progress, total, getattr(func, "__name__", "imap"))
        iterator: IMapIterator[R] = IMapIterator(
            self._engine, func, iterable, _check_chunksize(chunksize), ordered, progress=bar
        )
        self._feeders.add(iterator)
        return iterator

    # -- life cycle ------------------------------------------------------------

    def close(self) -> None:
        """Accept no more work; the workers exit once the queued tasks are done.

        Running ``imap`` iterators read the rest of their input now, as
        ``multiprocessing`` does, so their results all arrive.
        """
        for iterator in list(self._feeders):
            iterator.submit_rest()
        self._closed = True
        self._engine.close()

    def terminate(self) -> None:
        """Kill the workers now and wait for them; unfinished results fail."""
        self._closed = True
        self._engine.terminate()
        self._engine.join()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the workers to exit, after :meth:`close` or :meth:`terminate`."""
        if not self._closed:
            raise ValueError("Pool is still running")
        if not self._engine.join(timeout):
            raise TimeoutError(f"the pool's workers did not exit within {timeout} s")

    def statistics(self) -> Statistics:
        """Return a snapshot of the pool's counters."""
        return self._engine.statistics()

    def __enter__(self) -> Pool:
        if self._closed:
            raise ValueError("Pool not running")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._engine.terminate()
            warnings.warn(f"unclosed running pool {self!r}", ResourceWarning, stacklevel=2)

    def _check_running(self) -> None:
        if self._closed or not self._engine.accepting:
            raise ValueError("Pool not running")

    def _wait(self, result: AsyncResult[R]) -> R:
        # Ctrl-C while we wait: stop every worker before letting the interrupt out.
        try:
            return result.get()
        except KeyboardInterrupt:
            self.terminate()
            raise


def _check_chunksize(chunksize: int | None) -> int | None:
    if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
        raise ValueError(f"chunksize must be a positive int or None, not {chunksize!r}")
    return chunksize
