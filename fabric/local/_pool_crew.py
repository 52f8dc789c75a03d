"""A pool's worker processes as its loop thread sees them: start, write, read, reap.

Each worker has its own pair of pipes (tasks in, results out): no lock is
shared between workers, so a worker killed at any instant cannot block the
others, and the parent always knows which worker holds which task. A worker
writes the id of the task it is running into its slot of a shared-memory
table (``_pool_worker``), so the parent learns, once it has reaped a dead
worker, which task was running.

Workers are started *from the loop thread* so that ``PR_SET_PDEATHSIG`` (which
fires when the parent *thread* exits) follows the pool's lifetime, not the
lifetime of whichever thread created the pool.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import selectors
from typing import Any

from fabric.local import _pool_launch as launch
from fabric.local import _pool_wire as wire
from fabric.local import _pool_worker
from fabric.local._pool_launch import WorkerHandle

__all__ = ["Crew"]

_READ_SIZE = 1 << 16  # (a read of 1 MiB costs an mmap and munmap each time: ~25 us)


class Crew:
    """The workers of one pool, their fds and the selector the loop waits on.

    The engine subclasses it (so the loop's hot path pays no indirection) and
    says what a worker's messages mean in :meth:`_on_message`. Used only from
    the loop thread.
    """

    def __init__(self, processes: int, method: str, config: bytes, wake_fd: int) -> None:
        self.processes = processes
        self._method = method
        self._config = config  # the CONFIG frame every worker starts with
        self._workers: list[WorkerHandle | None] = [None] * processes
        self._by_fd: dict[int, WorkerHandle] = {}
        self._slots_fd = os.memfd_create("fabric-pool-slots", os.MFD_CLOEXEC)
        os.ftruncate(self._slots_fd, max(mmap.PAGESIZE, processes * _pool_worker.SLOT_STRIDE))
        self._slots = mmap.mmap(self._slots_fd, 0)
        self._selector = selectors.EpollSelector()
        self._selector.register(wake_fd, selectors.EVENT_READ)
        self._parent_only = [wake_fd, self._selector.fileno()]  # no worker inherits these

    def _on_message(self, worker: WorkerHandle, kind: str, body: Any) -> None:
        """Act on one message from ``worker``."""
        raise NotImplementedError

    def _start_worker(self, index: int) -> None:
        _pool_worker.SLOT.pack_into(self._slots, index * _pool_worker.SLOT_STRIDE, 0)
        parent_only = list(self._parent_only)
        for other in self._workers:
            if other is not None:
                parent_only += other.fds()
        worker = launch.start(index, self._method, self._slots_fd, parent_only)
        self._workers[index] = worker
        for fd in (worker.exit_fd, worker.out_fd):
            self._register(fd, selectors.EVENT_READ, worker)
        worker.outbuf += self._config
        self._flush(worker)

    def _flush(self, worker: WorkerHandle) -> None:
        try:
            while worker.outbuf:
                written = os.write(worker.task_fd, worker.outbuf)
                del worker.outbuf[:written]
        except BlockingIOError:
            pass
        except (BrokenPipeError, OSError):  # the worker died: its exit fd will tell us how
            worker.outbuf.clear()
        # The task fd is registered (for writing) only while bytes wait to go out.
        if bool(worker.outbuf) != worker.write_watched:
            worker.write_watched = bool(worker.outbuf)
            if worker.outbuf:
                self._register(worker.task_fd, selectors.EVENT_WRITE, worker)
            else:
                self._unregister(worker.task_fd)

    def _register(self, fd: int, events: int, worker: WorkerHandle) -> None:
        try:
            self._selector.register(fd, events)
        except KeyError:
            return
        self._by_fd[fd] = worker

    def _unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def _read(self, worker: WorkerHandle) -> bool:
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

    def _parse(self, worker: WorkerHandle) -> None:
        buf, pos, size = worker.inbuf, 0, wire.HEADER.size
        while len(buf) - pos >= size:
            (length,) = wire.HEADER.unpack_from(buf, pos)
            if len(buf) - pos - size < length:
                break
            kind, body = pickle.loads(memoryview(buf)[pos + size : pos + size + length])
            pos += size + length
            self._on_message(worker, kind, body)
        del buf[:pos]

    def _retire(self, worker: WorkerHandle) -> tuple[int, int]:
        """Reap an exited worker and drop it; return its exit code and running task id (or 0)."""
        code = worker.reap()
        offset = worker.index * _pool_worker.SLOT_STRIDE
        running: int = _pool_worker.SLOT.unpack_from(self._slots, offset)[0]
        self._forget(worker)
        return code, running

    def _forget(self, worker: WorkerHandle) -> None:
        for fd in worker.fds():
            self._unregister(fd)
            self._by_fd.pop(fd, None)
        worker.close()
        self._workers[worker.index] = None

    def _stop_workers(self) -> None:
        for worker in self._workers:
            if worker is not None and not worker.retiring:
                worker.retiring = True
                worker.outbuf += wire.encode(wire.STOP, None)
                self._flush(worker)

    def _kill_workers(self) -> None:
        """Kill every worker and wait until each has exited."""
        for worker in self._workers:
            if worker is not None:
                worker.kill()
        for worker in self._workers:
            if worker is not None:
                worker.reap()

    def _forget_workers(self) -> None:
        for worker in self._workers:
            if worker is not None:
                self._forget(worker)

    def _close_crew(self) -> None:
        """Close the selector and the slot table, once every worker is forgotten."""
        self._selector.close()
        self._slots.close()
        os.close(self._slots_fd)
