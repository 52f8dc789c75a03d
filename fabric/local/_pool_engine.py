"""The engine under Pool and Executor: task dispatch, results, crash recovery.

Theory of operation
-------------------
One daemon thread per pool (the *loop*) owns every worker and every fd
(``_pool_crew``); callers only append tasks to ``pending`` and ring an eventfd,
and only when the loop said it was about to sleep, so a burst of submissions
costs no system call.

The loop *pushes* batches of tasks to a worker up to a credit sized from the
measured task duration (about ``_QUEUE_AHEAD_S`` of work each, at least one, at
most ``_MAX_BATCH``), so no-op tasks travel hundreds per write while 10 ms
tasks go two at a time and the last ones still spread evenly over the workers.
Workers batch their results the same way (``_pool_worker``).

A worker's death is seen on its pidfd (a forkserver worker's: its Process
sentinel). The loop drains what the worker had already sent, reaps it, reads
the worker's shared-memory slot (the id of the task it was running, or 0) and
charges only that task: it is requeued until it has taken down
``1 + retries`` workers, then fails with ``WorkerLostError``.
The worker's other, not yet started tasks go back to the front of the queue
uncharged. A replacement worker starts in the same slot.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pickle
import selectors
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor
from typing import Any

import cloudpickle

from fabric.errors import WorkerLostError
from fabric.local import _pool_launch as launch
from fabric.local import _pool_live, _pool_worker
from fabric.local import _pool_wire as wire
from fabric.local._exceptions import ExceptionProxy, restore
from fabric.local._pool_crew import Crew
from fabric.local._pool_launch import WorkerHandle
from fabric.local._pool_task import Statistics, Task, TerminatedError

__all__ = ["Engine"]

log = logging.getLogger(__name__)

_QUEUE_AHEAD_S = 0.004  # work queued per worker: hides a round trip, keeps the tail even
_MAX_BATCH = 4096
_EWMA = 0.2
_EARLY_DEATHS = 3  # workers dying before READY this many times in a row break the pool


_RUNNING, _CLOSING, _TERMINATING = "running", "closing", "terminating"
_FORKED = "forked"  # seen from a child forked off the pool's process


def _big(task: Task) -> bool:
    """Return whether pickling the task's arguments costs more than a frame of its own."""
    return task.kind != wire.CALL and len(task.args) > wire.INLINE_LIST_MAX


class Engine(Crew):
    """Run tasks on ``processes`` worker processes; survive their deaths."""

    def __init__(
        self,
        processes: int,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        maxtasks: int | None,
        retries: int,
        start_method: str,
    ) -> None:
        if start_method not in launch.START_METHODS:
            raise ValueError(
                f"the pool starts workers with one of {launch.START_METHODS}, not {start_method!r}"
            )
        config = _pool_worker.WorkerConfig(initializer, initargs, maxtasks, list(sys.path))
        config_frame = wire.encode(wire.CONFIG, cloudpickle.dumps(config, 5))
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        super().__init__(processes, start_method, config_frame, self._wake_fd)
        self._maxtasks = maxtasks
        self._retries = retries
        self._pending: collections.deque[Task] = collections.deque()
        self._state = _RUNNING
        self._broken: BrokenExecutor | None = None
        self._sleeping = False
        self._task_time = 0.0  # EWMA of seconds per task, 0 until measured
        self._done = self._failed = self._lost = self._retried = 0
        self._early_deaths = 0
        # Wake-ups of waiting consumers, run once the loop has dispatched what it
        # can: a woken thread then finds the GIL free instead of waking twice.
        self._wakes: dict[Callable[[], object], None] = {}
        self._pickler = wire.Pickler(by_value=start_method != "fork")
        self._wake_lock = threading.Lock()
        self._stopped = threading.Event()
        # Set by Executor: once shut down, its queued work finishes even at interpreter
        # exit, as concurrent.futures does; a pool (or a running executor) is terminated.
        self.drain_at_exit = False
        self._thread = threading.Thread(target=self._run, name="fabric-pool", daemon=True)
        _pool_live.add(self)
        self._thread.start()

    # -- called from any thread ------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue a task; raise if the pool no longer accepts work."""
        if self._state != _RUNNING or self._broken is not None:
            self._refuse()
        self._pending.append(task)
        if self._sleeping:
            self._ring()

    def submit_many(self, tasks: Sequence[Task]) -> None:
        """Queue tasks; raise if the pool no longer accepts work."""
        if self._state != _RUNNING or self._broken is not None:
            self._refuse()
        self._pending.extend(tasks)
        if self._sleeping:
            self._ring()

    def _refuse(self) -> None:
        if self._state == _FORKED:
            raise RuntimeError("this pool belongs to the process that forked this one")
        if self._broken is not None:
            raise BrokenExecutor(str(self._broken)) from self._broken.__cause__
        raise ValueError("the pool is not running (closed or terminated)")

    def close(self) -> None:
        """Accept no more tasks; workers exit once the queued ones are done."""
        if self._state == _RUNNING:  # (not _FORKED: the parent's pool is not ours to close)
            self._state = _CLOSING
            self._wake()

    def terminate(self) -> None:
        """Kill the workers now; unfinished tasks fail with TerminatedError."""
        if self._state != _FORKED:
            self._state = _TERMINATING
            self._wake()

    def orphan(self) -> None:
        """Disown the pool, in a child forked off its process: it is the parent's."""
        self._state = _FORKED
        self._wake_fd = -1  # the parent's: ringing it would only wake the parent
        self._stopped = threading.Event()
        self._stopped.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop to finish; return True if it has."""
        return self._stopped.wait(timeout)

    @property
    def closing(self) -> bool:
        return self._state == _CLOSING

    @property
    def accepting(self) -> bool:
        return self._state == _RUNNING and self._broken is None

    def cancel_pending(self, cancel: Callable[[Task], bool]) -> None:
        """Drop each queued task for which ``cancel`` returns True; keep the others."""
        kept = []
        while True:
            try:
                task = self._pending.popleft()
            except IndexError:
                break
            if not cancel(task):
                kept.append(task)
        self._pending.extendleft(reversed(kept))

    def _take_pending(self) -> list[Task]:
        taken = list(self._pending)
        self._pending.clear()
        return taken

    def statistics(self) -> Statistics:
        workers = [w for w in self._workers if w is not None]
        return Statistics(
            workers=len(workers),
            pending=len(self._pending),
            running=sum(len(w.inflight) for w in workers),
            done=self._done,
            failed=self._failed,
            workers_lost=self._lost,
            retries=self._retried,
        )

    def _ring(self) -> None:
        # Cleared here, not only when the loop wakes: until the loop gets the GIL
        # back, a burst of submissions would each write the eventfd again.
        self._sleeping = False
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:  # never write to the fd number once the loop closed it
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    # -- the loop thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            for index in range(self.processes):
                self._start_worker(index)
                self._dispatch()  # the first task need not wait for every fork
            while self._step():
                pass
        except BaseException:
            log.exception("fabric pool loop failed; terminating the pool")
        finally:
            self._shutdown()

    def _step(self) -> bool:
        if self._state == _TERMINATING:
            return False
        self._dispatch()
        self._run_wakes()
        if self._state == _CLOSING and not self._pending and self._idle():
            if not any(self._workers):
                return False
            self._stop_workers()
        self._sleeping = True
        if self._pending and self._has_room():
            self._sleeping = False
            return True
        events = self._selector.select()
        self._sleeping = False
        for key, mask in events:
            self._on_event(key.fd, mask)
        return True

    def _idle(self) -> bool:
        return not any(w.inflight for w in self._workers if w is not None)

    def _on_event(self, fd: int, mask: int) -> None:
        if fd == self._wake_fd:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
            return
        worker = self._by_fd.get(fd)
        if worker is None:
            return
        if fd == worker.exit_fd:
            self._on_exit(worker)
        elif fd == worker.out_fd:
            self._read(worker)
        elif mask & selectors.EVENT_WRITE:
            self._flush(worker)

    # -- dispatch --------------------------------------------------------------

    def _credit(self, worker: WorkerHandle) -> int:
        if worker.retiring:
            return 0
        if self._task_time <= 0:  # unmeasured: two each, so a first map's chunks spread
            limit = 2
        else:
            limit = 1 + max(1, min(_MAX_BATCH, int(_QUEUE_AHEAD_S / self._task_time)))
        room = limit - len(worker.inflight)
        if self._maxtasks is not None:
            room = min(room, self._maxtasks - worker.sent)
        return room

    def _has_room(self) -> bool:
        return any(w is not None and self._credit(w) > 0 for w in self._workers)

    def _dispatch(self) -> None:
        if not self._pending or self._broken is not None:
            return
        live = sorted((w for w in self._workers if w is not None), key=lambda w: len(w.inflight))
        rooms = [self._credit(w) for w in live]
        if self._task_time <= 0 and len(live) < self.processes:
            # Still forking, nothing measured: one task each, or the first worker
            # would take the first two (biggest) chunks of a map and finish last.
            rooms = [min(room, 1) for room in rooms]
        # Workers not started yet (or being replaced) keep their share of the queue.
        deal = (
            len(self._pending) - len(self._pending) * (self.processes - len(live)) // self.processes
        )
        batches: list[list[Task]] = [[] for _ in live]
        # Dealt one at a time, like cards, so each worker gets a fair mix of the
        # shrinking chunks of a map rather than the first (biggest) half of them.
        active = [k for k, room in enumerate(rooms) if room > 0]
        while active and deal > 0:
            for k in active:
                if not self._pending or deal <= 0:
                    break
                task = self._pending.popleft()
                if task.payload is None and not task.claim():  # claim once, on first send
                    continue
                batches[k].append(task)
                rooms[k] -= 1
                deal -= 1
            if not self._pending:
                break
            active = [k for k in active if rooms[k] > 0]
        # An idle worker gets a first big chunk on its own, written at once: it
        # starts on it while the loop pickles the rest of a map, instead of every
        # worker waiting for all of them (small tasks are not worth a frame each).
        for worker, batch in zip(live, batches, strict=True):
            if len(batch) > 1 and not worker.inflight and _big(batch[0]):
                self._pack(worker, batch[:1])
                self._flush(worker)
                del batch[:1]
        for worker, batch in zip(live, batches, strict=True):
            if batch:
                self._pack(worker, batch)
        # The rest is written once every batch is pickled, so busy workers start
        # together: a worker woken early would take the CPU the loop needs to feed the next.
        for worker, batch in zip(live, batches, strict=True):
            if batch:
                self._flush(worker)

    def _pack(self, worker: WorkerHandle, batch: list[Task]) -> None:
        """Pickle ``batch`` into the worker's output buffer."""
        blobs: list[bytes] = []
        index: dict[int, int] = {}
        items = []
        last_fn: object = None  # a batch mostly repeats one function: skip the lookup
        fn_index = 0
        for task in batch:
            try:
                if task.fn is not last_fn:
                    fn_index_or_none = index.get(id(task.fn))
                    if fn_index_or_none is None:
                        fn_index_or_none = index[id(task.fn)] = len(blobs)
                        blobs.append(self._pickler.function(task.fn))
                    fn_index, last_fn = fn_index_or_none, task.fn
                if task.payload is None:
                    task.payload = self._payload(task)
            except Exception as exc:
                self._finish(task, False, exc, 0.0)
                continue
            items.append((task.id, fn_index, task.kind, task.payload))
            worker.inflight[task.id] = task
        if not items:
            return
        worker.sent += len(items)
        if self._maxtasks is not None and worker.sent >= self._maxtasks:
            worker.retiring = True
        worker.outbuf += wire.encode(wire.TASKS, (blobs, items))

    def _payload(self, task: Task) -> bytes | tuple[Any, ...] | list[Any]:
        # Plain arguments (a CALL's tuple, a MAP chunk's list) are sent as they
        # are, inside the batch's pickle; the worker tells them apart by type.
        args = task.args
        if task.kind == wire.CALL:
            if not task.kwargs and wire.plain(args):
                return tuple(args)
            return self._pickler.dumps((args, task.kwargs))
        if task.kind == wire.MAP and len(args) <= wire.INLINE_LIST_MAX and wire.plain(args):
            return args if type(args) is list else list(args)
        return self._pickler.dumps(args)

    # -- results ---------------------------------------------------------------

    def _on_message(self, worker: WorkerHandle, kind: str, body: Any) -> None:
        if kind == wire.DONE:
            total = 0.0
            inflight, loads, wakes = worker.inflight, pickle.loads, self._wakes
            for task_id, how, data, seconds in body:
                total += seconds
                task = inflight.pop(task_id, None)
                if task is None:
                    continue
                if how == wire.RAISED:
                    self._finish(task, False, restore(data), seconds)
                    continue
                if how == wire.PICKLED:
                    try:
                        data = loads(data)
                    except Exception as exc:
                        self._finish(task, False, self._unpicklable(task, exc), seconds)
                        continue
                self._done += 1  # the hot path, inlined: one deliver
                try:
                    wake = task.deliver(True, data, seconds)
                    if wake is not None:
                        wakes[wake] = None
                except Exception:
                    log.exception("delivering the result of %s failed", task.describe())
                task.args = task.kwargs = task.payload = None  # the caller may keep the task
            per_task = total / len(body)
            if self._task_time:
                per_task = self._task_time + _EWMA * (per_task - self._task_time)
            self._task_time = per_task
        elif kind == wire.READY:
            worker.ready = True
            self._early_deaths = 0
        elif kind == wire.INIT_ERROR:
            cause = restore(body)
            self._break(f"a worker's initializer failed: {cause!r}", cause)

    def _unpicklable(self, task: Task, exc: Exception) -> ExceptionProxy:
        message = f"the result of {task.describe()} could not be unpickled: {exc}"
        return ExceptionProxy(type(exc).__qualname__, message, "")

    def _finish(self, task: Task, ok: bool, value: Any, seconds: float) -> None:
        if ok:
            self._done += 1
        else:
            self._failed += 1
        try:
            wake = task.deliver(ok, value, seconds)
        except Exception:
            log.exception("delivering the result of %s failed", task.describe())
        else:
            if wake is not None:
                self._wakes[wake] = None
        task.args = task.kwargs = task.payload = None

    def _run_wakes(self) -> None:
        while self._wakes:
            wakes, self._wakes = self._wakes, {}
            for wake in wakes:
                try:
                    wake()
                except Exception:
                    log.exception("waking the consumer of a result failed")

    # -- crash recovery and shutdown -------------------------------------------

    def _on_exit(self, worker: WorkerHandle) -> None:
        self._read(worker)  # results sent before the death still count
        code, running = self._retire(worker)
        lost = bool(worker.inflight) or (code != 0 and self._state == _RUNNING)
        if lost:
            self._lost += 1
            log.warning(
                "pool worker %d (pid %d) exited: %s",
                worker.index,
                worker.pid,
                launch.describe_exit(code),
            )
        for task in reversed(list(worker.inflight.values())):
            if task.id == running:
                self._charge(task, worker, code)
            else:
                self._pending.appendleft(task)
        if not worker.ready and self._broken is None:
            self._early_deaths += 1
            if self._early_deaths >= _EARLY_DEATHS:
                reason = (
                    f"{_EARLY_DEATHS} workers in a row died before they were ready; "
                    f"the last one {launch.describe_exit(code)}"
                )
                self._break(reason, None)
        if self._broken is None and (self._state == _RUNNING or self._pending):
            self._start_worker(worker.index)

    def _charge(self, task: Task, worker: WorkerHandle, code: int) -> None:
        task.attempts += 1
        if task.attempts <= self._retries:
            self._retried += 1
            log.warning(
                "retrying %s after its worker was lost (attempt %d)",
                task.describe(),
                task.attempts + 1,
            )
            self._pending.appendleft(task)
            return
        message = (
            f"worker {worker.index} (pid {worker.pid}) was lost running {task.describe()}: "
            f"{launch.describe_exit(code)}; the task took down {task.attempts} worker(s) "
            f"(retries={self._retries})"
        )
        error = WorkerLostError(
            message, task=task.describe(), pid=worker.pid, exitcode=code, attempts=task.attempts
        )
        self._finish(task, False, error, 0.0)

    def _break(self, reason: str, cause: BaseException | None) -> None:
        if self._broken is not None:
            return
        log.error("the pool is broken: %s", reason)
        self._broken = BrokenExecutor(f"the pool is broken: {reason}")
        self._broken.__cause__ = cause
        self._fail_all(self._broken)
        self._state = _TERMINATING

    def _fail_all(self, error: BaseException) -> None:
        tasks = self._take_pending()
        for worker in self._workers:
            if worker is not None:
                tasks += worker.inflight.values()
                worker.inflight.clear()
        for task in tasks:
            self._finish(task, False, error, 0.0)

    def _shutdown(self) -> None:
        try:
            self._kill_workers()
            self._fail_all(TerminatedError("the pool was terminated before the task finished"))
            self._forget_workers()
        finally:
            self._run_wakes()
            self._state = _TERMINATING
            self._close_crew()
            with self._wake_lock:
                os.close(self._wake_fd)
                self._wake_fd = -1
            _pool_live.discard(self)
            self._stopped.set()
