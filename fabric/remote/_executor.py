"""The cluster executor: a concurrent.futures.Executor whose tasks run on worker nodes.

Futures are real ``concurrent.futures.Future`` objects, so ``as_completed``,
``wait`` and ``asyncio.wrap_future`` work; their ``result()`` and
``exception()`` receive the result in the waiting thread (one thread hop less).
A future can be cancelled until its result arrives: a queued task is dropped by
the broker, a running one is stopped on its node. Task ids are chosen here (a
counter of the connection's session), so re-sent SUBMITs are never queued twice.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import itertools
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from fabric.errors import BrokerUnavailable, FabricError, WorkerLostError
from fabric.remote._client_tasks import ResultCallback
from fabric.remote._connection import AwaitedFuture, Connection
from fabric.remote._errors import with_remote_traceback
from fabric.remote._progress import Progress, check, track
from fabric.remote._runner import decode_outcome, encode_function, encode_task

T = TypeVar("T")

_SUBMIT_BATCH = 64  # a map's tasks go to the connection this many at a time


def _in_order(futures: list[cf.Future[list[T]]], limit: float | None) -> Iterator[list[T]]:
    """Yield results in order; cancel what is left if the consumer stops or one fails."""
    try:
        for future in futures:
            yield future.result(None if limit is None else max(0.0, limit - time.monotonic()))
    finally:
        for future in futures:
            future.cancel()


def _batched(items: Iterable[T], n: int) -> Iterator[tuple[T, ...]]:
    it = iter(items)
    while batch := tuple(itertools.islice(it, n)):
        yield batch


class _TaskFuture(AwaitedFuture[T]):
    """A task's Future whose ``result()``/``exception()`` receive in the waiting thread.

    Its executor hears of a cancel from ``cancel`` itself and of a result from
    its own callback: no done-callback per task.
    """

    def __init__(self, conn: Connection, executor: Executor, task: bytes) -> None:
        super().__init__()
        self._conn, self._executor, self.task = conn, executor, task
        self._untold = True  # the executor has not heard of a cancel yet

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        with self._condition:  # cancel() answers True again later: tell the executor once
            first, self._untold = self._untold, False
        if first:
            self._executor._cancelled(self)
        return True

    def result(self, timeout: float | None = None) -> T:
        return super().result(self._receive(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return super().exception(self._receive(timeout))

    def _receive(self, timeout: float | None) -> float | None:
        """Receive for this future up to ``timeout``; return what is left of it."""
        if self.done():
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        self._conn.await_task(self, timeout)
        return None if deadline is None else max(0.0, deadline - time.monotonic())


class Executor(cf.Executor):
    """Run calls on the cluster's worker nodes (see the module docstring).

    ``forward_output=True`` prints each task's captured stdout/stderr here when
    its result arrives. ``requires`` restricts tasks to workers with those labels.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        forward_output: bool = False,
        requires: dict[str, str] | None = None,
    ) -> None:
        self._conn = connection
        self._forward = forward_output
        self._requires = dict(requires or {})
        self._lock = threading.Lock()
        self._pending: set[cf.Future[Any]] = set()
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> cf.Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on a worker node; return its Future."""
        return self._submit_payload(encode_task(encode_function(fn), args, kwargs, self._forward))

    def _submit_payload(self, payload: bytes) -> cf.Future[Any]:
        return self._submit_payloads([payload])[0]

    def _submit_payloads(self, payloads: list[bytes]) -> list[_TaskFuture[Any]]:
        """Submit pickled tasks in order, as one batch for the connection; return their futures."""
        new_task_id = self._conn.new_task_id
        futures: list[_TaskFuture[Any]] = [
            _TaskFuture(self._conn, self, new_task_id()) for _ in payloads
        ]
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._pending.update(futures)
        entries: list[tuple[bytes, bytes, ResultCallback]] = [
            (future.task, payload, functools.partial(self._resolve, future))
            for future, payload in zip(futures, payloads, strict=True)
        ]
        try:
            self._conn.submit_many(entries, self._requires)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return futures

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        progress: Progress = False,
    ) -> Iterator[T]:
        """Like ``Executor.map``; ``chunksize`` calls travel and run as one task.

        Every call is submitted at once; results are yielded in order, and
        ``TimeoutError`` is raised if one is not ready ``timeout`` seconds after
        this call. ``progress`` shows a tqdm bar (see the ``progress`` extra).
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        check(progress)
        limit = None if timeout is None else time.monotonic() + timeout
        chunks = list(_batched(zip(*iterables, strict=False), chunksize))
        blob, forward = encode_function(fn), self._forward  # the function is pickled once
        futures: list[cf.Future[list[T]]] = []
        for group in _batched(
            chunks, _SUBMIT_BATCH
        ):  # the first ones go before the rest is pickled
            payloads = [encode_task(blob, chunk, None, forward, many=True) for chunk in group]
            futures += self._submit_payloads(payloads)
        track(futures, [len(c) for c in chunks], progress, "map")
        return itertools.chain.from_iterable(_in_order(futures, limit))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new tasks; optionally cancel the pending ones and wait for the rest."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            cf.wait(pending)

    def outstanding(self) -> list[cf.Future[Any]]:
        """Return the futures not yet resolved (a snapshot)."""
        with self._lock:
            return list(self._pending)

    def statistics(self) -> dict[str, int]:
        """Return how many futures this executor still waits for."""
        with self._lock:
            return {"pending": len(self._pending)}

    # --- results ----------------------------------------------------------------------
    def _cancelled(self, future: _TaskFuture[Any]) -> None:
        with self._lock:
            self._pending.discard(future)
        # move CANCELLED to CANCELLED_AND_NOTIFIED, or as_completed()/wait() never see it
        future.set_running_or_notify_cancel()
        with contextlib.suppress(FabricError):  # a closed connection has nothing to cancel
            self._conn.cancel(future.task)

    def _resolve(self, future: _TaskFuture[Any], status: str, message: str, payload: bytes) -> None:
        if future.done():
            return  # cancelled here first
        if status in ("ok", "error"):
            outcome = decode_outcome(payload)
            if self._forward:
                sys.stdout.write(outcome.stdout)
                sys.stderr.write(outcome.stderr)
            if outcome.ok:
                _set(future, result=outcome.value)
            else:
                exc, tb_text = outcome.value
                _set(future, error=with_remote_traceback(exc, tb_text))
        elif status == "cancelled":
            future.cancel()
        elif status in ("lost", "poisoned", "crashed"):
            _set(future, error=WorkerLostError(message or f"task {status}"))
        elif status == "unavailable":
            _set(future, error=BrokerUnavailable(message))
        else:
            _set(future, error=FabricError(f"task {status}: {message}"))
        with self._lock:  # (a cancel has told the executor itself)
            self._pending.discard(future)


def _set(future: cf.Future[Any], *, result: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except cf.InvalidStateError:  # cancelled by the user in the meantime
        pass
