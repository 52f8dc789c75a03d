"""Executor: a ``concurrent.futures.Executor`` on workers that survive crashes.

It hands out real :class:`concurrent.futures.Future` objects, so ``wait``,
``as_completed`` and ``asyncio``'s ``loop.run_in_executor`` work. Unlike
``ProcessPoolExecutor``, a dead worker does not break the executor: only the
task it was running is retried (``retries=1`` by default) and then fails with
:class:`~fabric.errors.WorkerLostError`, which is *not* a ``BrokenProcessPool``
because the executor stays usable. ``BrokenExecutor`` is raised only when a
worker's initializer fails.
"""

from __future__ import annotations

import functools
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as _Executor
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

from fabric.local import _pool_wire as wire
from fabric.local._future import LazyFuture
from fabric.local._pool_engine import Engine
from fabric.local._pool_task import DEFAULT_RETRIES, Statistics, Task
from fabric.local.pool import _start_method, default_processes

__all__ = ["Executor"]

P = ParamSpec("P")
R = TypeVar("R")


class _FutureTask(LazyFuture[Any], Task):
    """The Future handed to the caller is also the task the engine runs: one object, not two."""

    __slots__ = ()

    __init__ = Task.__init__  # (LazyFuture's state starts PENDING at class level)

    claim = LazyFuture.set_running_or_notify_cancel

    def deliver(self, ok: bool, value: Any, seconds: float) -> Callable[[], object] | None:
        # A cancelled future ignores the outcome. With no Condition, nobody waits
        # yet: settle now; else settle (and wake the waiter) once the loop is done.
        if self.settle_now(ok, value):
            return None
        return functools.partial(self.settle, ok, value)


class Executor(_Executor):
    """Run calls on ``max_workers`` processes (default: the CPUs this process may use).

    ``initializer(*initargs)`` runs once in each worker; ``max_tasks_per_child``
    retires a worker after that many tasks; ``retries`` is how many times a task
    whose worker died is run again; ``mp_context`` is a start method name
    (``"fork"``, the default, ``"forkserver"`` or ``"spawn"``) or a context
    object (``fabric.local.get_context(m).Executor(...)`` passes its own).
    """

    @classmethod
    def _fabric_bind_context(cls, context: object) -> Callable[..., Executor]:
        return functools.partial(cls, mp_context=context)

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: object = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if max_workers is None:
            max_workers = default_processes()
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None and (
            not isinstance(max_tasks_per_child, int) or max_tasks_per_child < 1
        ):
            raise ValueError("max_tasks_per_child must be >= 1")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self._max_workers = max_workers
        self._engine = Engine(
            max_workers,
            initializer,
            tuple(initargs),
            max_tasks_per_child,
            retries,
            _start_method(mp_context),
        )
        self._engine.drain_at_exit = True
        self._shutdown = False

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` and return its Future."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        task: _FutureTask = _FutureTask(fn, wire.CALL, args, kwargs)
        self._engine.submit(task)
        return task

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[R]:
        """Return an iterator of ``fn(*args)`` in input order, sending ``chunksize`` at a time.

        As in ``concurrent.futures``, the input is read at once and ``timeout``
        counts from this call; TimeoutError if a result is later than that.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        argtuples = zip(*iterables, strict=False)
        futures: list[Future[list[R]]] = []
        tasks = []
        while chunk := list(itertools.islice(argtuples, chunksize)):
            task = _FutureTask(fn, wire.STAR, chunk, None)
            futures.append(task)
            tasks.append(task)
        self._engine.submit_many(tasks)
        deadline = None if timeout is None else time.monotonic() + timeout  # from this call
        return _results(futures, deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; finish (or, with ``cancel_futures``, cancel) what is queued."""
        self._shutdown = True
        if cancel_futures:
            self._engine.cancel_pending(_cancel)
        self._engine.close()
        if wait:
            self._engine.join()

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        # Ctrl-C inside the block: do not wait for running tasks, stop the workers.
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._shutdown = True
            self._engine.terminate()
            self._engine.join()
        else:
            self.shutdown(wait=True)

    def statistics(self) -> Statistics:
        """Return a snapshot of the executor's counters."""
        return self._engine.statistics()

    def __del__(self) -> None:
        if not getattr(self, "_shutdown", True):
            warnings.warn(f"unclosed executor {self!r}", ResourceWarning, stacklevel=2)
            self._engine.close()


def _cancel(task: Task) -> bool:
    return isinstance(task, _FutureTask) and task.cancel()


def _results(futures: list[Future[list[R]]], deadline: float | None) -> Iterator[R]:
    try:
        for future in futures:
            remaining = None if deadline is None else deadline - time.monotonic()
            yield from future.result(remaining)
    finally:
        for future in futures:
            future.cancel()
