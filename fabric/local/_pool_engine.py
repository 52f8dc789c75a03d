"""The engine under Pool and Executor: worker processes, task dispatch, crash recovery.

Theory of operation
-------------------
One daemon thread per pool (the *loop*) owns every worker and every fd; callers
only append tasks to ``pending`` and ring an eventfd, and only when the loop
said it was about to sleep, so a burst of submissions costs no system call.

Each worker has its own pair of pipes (tasks in, results out): no lock is
shared between workers, so a worker killed at any instant cannot block the
others, and the parent always knows which worker holds which task. The loop
*pushes* batches of tasks to a worker up to a credit sized from the measured
task duration (about ``_QUEUE_AHEAD_S`` of work each, at least one, at most
``_MAX_BATCH``), so no-op tasks travel hundreds per write while 10 ms tasks go
two at a time and the last ones still spread evenly over the workers. Workers
batch their results the same way (``_pool_worker``).

A worker's death is seen on its pidfd. The loop drains what the worker had
already sent, reaps it, reads the worker's shared-memory slot (the id of the
task it was running, or 0) and charges only that task: it is requeued until it
has taken down ``1 + retries`` workers, then fails with ``WorkerLostError``.
The worker's other, not yet started tasks go back to the front of the queue
uncharged. A replacement worker starts in the same slot.

Workers are started *from the loop thread* so that ``PR_SET_PDEATHSIG`` (which
fires when the parent *thread* exits) follows the pool's lifetime, not the
lifetime of whichever thread created the pool.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import pickle
import selectors
import signal
import sys
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor
from typing import Any, NamedTuple

import cloudpickle

from fabric.errors import WorkerLostError
from fabric.local import _pool_wire as wire
from fabric.local import _pool_worker
from fabric.local._exceptions import ExceptionProxy, restore

__all__ = ["DEFAULT_RETRIES", "Engine", "Statistics", "Task", "TerminatedError"]

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 1
_QUEUE_AHEAD_S = 0.004  # work queued per worker: hides a round trip, keeps the tail even
_MAX_BATCH = 1024
_EWMA = 0.2
_PIPE_SIZE = 1 << 20
_READ_SIZE = 1 << 20
_START_METHODS = ("fork", "spawn")
_task_ids = itertools.count(1)


class TerminatedError(BrokenExecutor):
    """The pool was terminated (or collected) before the task finished."""


class Statistics(NamedTuple):
    """A snapshot of a pool's counters."""

    workers: int
    pending: int
    running: int
    done: int
    failed: int
    workers_lost: int
    retries: int


class Task:
    """One unit sent to a worker; subclasses say where its result goes."""

    __slots__ = ("args", "attempts", "fn", "id", "kind", "kwargs", "payload")

    def __init__(self, fn: Callable[..., Any], kind: int, args: Any, kwargs: Any = None) -> None:
        self.id = next(_task_ids)
        self.fn = fn
        self.kind = kind
        self.args = args
        self.kwargs = kwargs
        self.payload: bytes | None = None
        self.attempts = 0

    def claim(self) -> bool:
        """Return False if the task was cancelled and must not run."""
        return True

    def deliver(self, ok: bool, value: Any, seconds: float) -> None:
        """Hand over the result (``ok``) or the exception; called once, on the loop."""
        raise NotImplementedError

    def describe(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        return f"task {self.id} ({name})"


class _Worker:
    __slots__ = (
        "inbuf",
        "index",
        "inflight",
        "out_fd",
        "outbuf",
        "pid",
        "pidfd",
        "retiring",
        "sent",
        "task_fd",
    )

    def __init__(self, index: int, pid: int, task_fd: int, out_fd: int) -> None:
        self.index = index
        self.pid = pid
        self.task_fd = task_fd
        self.out_fd = out_fd
        self.pidfd = os.pidfd_open(pid)
        self.inflight: dict[int, Task] = {}
        self.outbuf = bytearray()
        self.inbuf = bytearray()
        self.sent = 0
        self.retiring = False

    def fds(self) -> list[int]:
        return [self.task_fd, self.out_fd, self.pidfd]


_RUNNING, _CLOSING, _TERMINATING = "running", "closing", "terminating"


class Engine:
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
        if start_method not in _START_METHODS:
            raise ValueError(f"start_method must be one of {_START_METHODS}, not {start_method!r}")
        config = _pool_worker.WorkerConfig(initializer, initargs, maxtasks, list(sys.path))
        self._config = wire.encode(wire.CONFIG, cloudpickle.dumps(config, 5))
        self.processes = processes
        self._maxtasks = maxtasks
        self._retries = retries
        self._spawn = start_method == "spawn"
        self._pending: collections.deque[Task] = collections.deque()
        self._workers: list[_Worker | None] = [None] * processes
        self._by_fd: dict[int, _Worker] = {}
        self._state = _RUNNING
        self._broken: BaseException | None = None
        self._sleeping = False
        self._task_time = 0.0  # EWMA of seconds per task, 0 until measured
        self._done = self._failed = self._lost = self._retried = 0
        self._ref_blobs: dict[int, tuple[Callable[..., Any], bytes]] = {}
        self._slots_fd = os.memfd_create("fabric-pool-slots", os.MFD_CLOEXEC)
        os.ftruncate(self._slots_fd, max(mmap.PAGESIZE, processes * _pool_worker.SLOT_STRIDE))
        self._slots = mmap.mmap(self._slots_fd, 0)
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._wake_lock = threading.Lock()
        self._selector = selectors.EpollSelector()
        self._selector.register(self._wake_fd, selectors.EVENT_READ)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fabric-pool", daemon=True)
        _live.add(self)
        self._thread.start()

    # -- called from any thread ------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue a task; raise if the pool no longer accepts work."""
        if self._state != _RUNNING or self._broken is not None:
            self._refuse()
        self._pending.append(task)
        if self._sleeping:
            self._wake()

    def submit_many(self, tasks: Sequence[Task]) -> None:
        """Queue tasks; raise if the pool no longer accepts work."""
        if self._state != _RUNNING or self._broken is not None:
            self._refuse()
        self._pending.extend(tasks)
        if self._sleeping:
            self._wake()

    def _refuse(self) -> None:
        if self._broken is not None:
            raise BrokenExecutor(
                f"the pool is broken: a worker's initializer failed: {self._broken!r}"
            ) from self._broken
        raise ValueError("the pool is not running (closed or terminated)")

    def close(self) -> None:
        """Accept no more tasks; workers exit once the queued ones are done."""
        if self._state == _RUNNING:
            self._state = _CLOSING
            self._wake()

    def terminate(self) -> None:
        """Kill the workers now; unfinished tasks fail with TerminatedError."""
        self._state = _TERMINATING
        self._wake()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop to finish; return True if it has."""
        return self._stopped.wait(timeout)

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

    def _wake(self) -> None:
        with self._wake_lock:  # never write to the fd number once the loop closed it
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    # -- the loop thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            for index in range(self.processes):
                self._start_worker(index)
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
        if fd == worker.pidfd:
            self._on_exit(worker)
        elif fd == worker.out_fd:
            self._read(worker)
        elif mask & selectors.EVENT_WRITE:
            self._flush(worker)

    # -- dispatch --------------------------------------------------------------

    def _credit(self, worker: _Worker) -> int:
        if worker.retiring:
            return 0
        if self._task_time <= 0:
            limit = 8
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
        workers = sorted((w for w in self._workers if w is not None), key=lambda w: len(w.inflight))
        for i, worker in enumerate(workers):
            # A fair share each, so four chunks go two and two, not four to the first.
            share = -(-len(self._pending) // (len(workers) - i))
            room = min(self._credit(worker), share)
            batch: list[Task] = []
            while room > 0 and self._pending:
                task = self._pending.popleft()
                if task.payload is not None or task.claim():  # claim once, on first send
                    batch.append(task)
                    room -= 1
            if batch:
                self._send(worker, batch)
            if not self._pending:
                return

    def _send(self, worker: _Worker, batch: list[Task]) -> None:
        blobs: list[bytes] = []
        index: dict[int, int] = {}
        items = []
        for task in batch:
            try:
                fn_index = index.get(id(task.fn))
                if fn_index is None:
                    fn_index = index[id(task.fn)] = len(blobs)
                    blobs.append(self._function_blob(task.fn))
                if task.payload is None:
                    task.payload = self._dumps(
                        (task.args, task.kwargs) if task.kind == wire.CALL else task.args
                    )
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
        self._flush(worker)

    def _function_blob(self, fn: Callable[..., Any]) -> bytes:
        # A module-level function pickles by reference, so its bytes never go stale
        # and can be cached; anything pickled by value is pickled afresh per batch.
        cached = self._ref_blobs.get(id(fn))
        if cached is not None and cached[0] is fn:
            return cached[1]
        by_reference = (
            isinstance(fn, types.FunctionType | types.BuiltinFunctionType)
            and fn.__module__ != "__main__"
            and "<locals>" not in fn.__qualname__
            and fn.__name__ != "<lambda>"
        )
        blob = self._dumps(fn)
        if by_reference:
            if len(self._ref_blobs) > 256:
                self._ref_blobs.clear()
            self._ref_blobs[id(fn)] = (fn, blob)
        return blob

    def _dumps(self, obj: object) -> bytes:
        if not self._spawn:  # a forked worker shares our __main__, so plain pickle suffices
            try:
                return pickle.dumps(obj, 5)
            except Exception:
                pass
        return cloudpickle.dumps(obj, 5)  # type: ignore[no-any-return]

    def _flush(self, worker: _Worker) -> None:
        try:
            while worker.outbuf:
                written = os.write(worker.task_fd, worker.outbuf)
                del worker.outbuf[:written]
        except BlockingIOError:
            pass
        except (BrokenPipeError, OSError):  # the worker died: its pidfd will tell us how
            worker.outbuf.clear()
        # The task fd is registered (for writing) only while bytes wait to go out.
        if worker.outbuf:
            self._register(worker.task_fd, selectors.EVENT_WRITE, worker)
        else:
            self._unregister(worker.task_fd)

    def _register(self, fd: int, events: int, worker: _Worker) -> None:
        try:
            self._selector.register(fd, events)
        except KeyError:
            return
        self._by_fd[fd] = worker

    def _unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    # -- results ---------------------------------------------------------------

    def _read(self, worker: _Worker) -> bool:
        """Take what the worker sent; return False at end of file."""
        while True:
            try:
                data = os.read(worker.out_fd, _READ_SIZE)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                self._unregister(worker.out_fd)
                return False
            worker.inbuf += data
            self._parse(worker)
            if len(data) < _READ_SIZE:
                return True

    def _parse(self, worker: _Worker) -> None:
        buf, pos, size = worker.inbuf, 0, wire.HEADER.size
        while len(buf) - pos >= size:
            (length,) = wire.HEADER.unpack_from(buf, pos)
            if len(buf) - pos - size < length:
                break
            kind, body = pickle.loads(memoryview(buf)[pos + size : pos + size + length])
            pos += size + length
            self._on_message(worker, kind, body)
        del buf[:pos]

    def _on_message(self, worker: _Worker, kind: str, body: Any) -> None:
        if kind == wire.DONE:
            total = 0.0
            inflight, loads = worker.inflight, pickle.loads
            for task_id, ok, blob, seconds in body:
                total += seconds
                task = inflight.pop(task_id, None)
                if task is None:
                    continue
                if ok:  # the hot path, inlined: one loads, one deliver
                    try:
                        value = loads(blob)
                    except Exception as exc:
                        self._finish(task, False, self._unpicklable(task, exc), seconds)
                        continue
                    self._done += 1
                    try:
                        task.deliver(True, value, seconds)
                    except Exception:
                        log.exception("delivering the result of %s failed", task.describe())
                else:
                    self._finish(task, False, restore(blob), seconds)
            per_task = total / len(body)
            if self._task_time:
                per_task = self._task_time + _EWMA * (per_task - self._task_time)
            self._task_time = per_task
        elif kind == wire.INIT_ERROR:
            self._break(restore(body))

    def _unpicklable(self, task: Task, exc: Exception) -> ExceptionProxy:
        message = f"the result of {task.describe()} could not be unpickled: {exc}"
        return ExceptionProxy(type(exc).__qualname__, message, "")

    def _finish(self, task: Task, ok: bool, value: Any, seconds: float) -> None:
        if ok:
            self._done += 1
        else:
            self._failed += 1
        try:
            task.deliver(ok, value, seconds)
        except Exception:
            log.exception("delivering the result of %s failed", task.describe())

    # -- worker life -----------------------------------------------------------

    def _start_worker(self, index: int) -> None:
        _pool_worker.SLOT.pack_into(self._slots, index * _pool_worker.SLOT_STRIDE, 0)
        task_r, task_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        for fd in (task_w, out_r):
            # Past /proc/sys/fs/pipe-max-size this fails; the default size works, slower.
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        try:
            pid = self._launch(index, task_r, out_w, [task_w, out_r])
        finally:
            os.close(task_r)
            os.close(out_w)
        os.set_blocking(task_w, False)
        os.set_blocking(out_r, False)
        worker = _Worker(index, pid, task_w, out_r)
        self._workers[index] = worker
        for fd in (worker.pidfd, worker.out_fd):
            self._register(fd, selectors.EVENT_READ, worker)
        worker.outbuf += self._config
        self._flush(worker)

    def _launch(self, index: int, task_r: int, out_w: int, parent_ends: list[int]) -> int:
        if self._spawn:
            return self._posix_spawn(index, task_r, out_w)
        drop = [*parent_ends, self._wake_fd, self._selector.fileno()]
        for worker in self._workers:
            if worker is not None:
                drop += worker.fds()
        parent = os.getpid()
        with warnings.catch_warnings():  # fork from the loop thread is what we mean to do
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            _pool_worker.fork_main(parent, task_r, out_w, self._slots_fd, index, drop)
        return pid

    def _posix_spawn(self, index: int, task_r: int, out_w: int) -> int:
        fds = [task_r, out_w, self._slots_fd]
        for fd in fds:
            os.set_inheritable(fd, True)
        try:
            code = "from fabric.local._pool_worker import spawn_main; spawn_main()"
            argv = [sys.executable, "-c", code, str(os.getpid()), *map(str, fds), str(index)]
            return os.posix_spawn(sys.executable, argv, os.environ, setpgroup=0)
        finally:
            for fd in fds:
                os.set_inheritable(fd, False)

    def _on_exit(self, worker: _Worker) -> None:
        self._read(worker)  # results sent before the death still count
        _, status = os.waitpid(worker.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        running = _pool_worker.SLOT.unpack_from(
            self._slots, worker.index * _pool_worker.SLOT_STRIDE
        )[0]
        self._forget(worker)
        lost = bool(worker.inflight) or (code != 0 and self._state == _RUNNING)
        if lost:
            self._lost += 1
            log.warning(
                "pool worker %d (pid %d) exited: %s", worker.index, worker.pid, _cause(code)
            )
        for task in reversed(list(worker.inflight.values())):
            if task.id == running:
                self._charge(task, worker, code)
            else:
                self._pending.appendleft(task)
        if self._broken is None and (self._state == _RUNNING or self._pending):
            self._start_worker(worker.index)

    def _charge(self, task: Task, worker: _Worker, code: int) -> None:
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
            f"{_cause(code)}; the task took down {task.attempts} worker(s) "
            f"(retries={self._retries})"
        )
        error = WorkerLostError(
            message, task=task.describe(), pid=worker.pid, exitcode=code, attempts=task.attempts
        )
        self._finish(task, False, error, 0.0)

    def _forget(self, worker: _Worker) -> None:
        for fd in worker.fds():
            self._unregister(fd)
            self._by_fd.pop(fd, None)
            os.close(fd)
        self._workers[worker.index] = None

    def _stop_workers(self) -> None:
        for worker in self._workers:
            if worker is not None and not worker.retiring:
                worker.retiring = True
                worker.outbuf += wire.encode(wire.STOP, None)
                self._flush(worker)

    def _break(self, cause: BaseException) -> None:
        if self._broken is not None:
            return
        log.error("a pool worker's initializer failed; the pool is broken: %r", cause)
        self._broken = cause
        error = BrokenExecutor(f"a worker's initializer failed: {cause!r}")
        error.__cause__ = cause
        self._fail_all(error)
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
            for worker in self._workers:
                if worker is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
            for worker in self._workers:
                if worker is not None:
                    os.waitpid(worker.pid, 0)
            self._fail_all(TerminatedError("the pool was terminated before the task finished"))
            for worker in self._workers:
                if worker is not None:
                    self._forget(worker)
        finally:
            self._state = _TERMINATING
            self._selector.close()
            with self._wake_lock:
                os.close(self._wake_fd)
                self._wake_fd = -1
            self._slots.close()
            os.close(self._slots_fd)
            _live.discard(self)
            self._stopped.set()


def _cause(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


# Pools still running at interpreter exit are terminated, so Ctrl-C or an
# uncaught exception never leaves workers behind. A weak set: it keeps no pool
# alive, and each pool removes itself when its loop ends.
_live: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _terminate_live() -> None:
    engines = list(_live)
    for engine in engines:
        engine.terminate()
    for engine in engines:
        engine.join(5.0)
