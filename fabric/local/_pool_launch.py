"""Start one pool worker process with its two pipes: by fork, forkserver or spawn.

A forked or spawned worker is our child, watched through a pidfd and reaped
with ``waitpid``. A forkserver worker is the fork server's child: it is
started as a daemonic ``Process`` (the pipes travel as passed fds), watched
through the Process sentinel, and its exit code comes from the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import warnings

from fabric.local import _pool_worker
from fabric.local._pool_task import Task

TYPE_CHECKING = False
if TYPE_CHECKING:
    from fabric.local.process import Process

__all__ = ["START_METHODS", "WorkerHandle", "describe_exit", "start"]

START_METHODS = ("fork", "forkserver", "spawn")
_PIPE_SIZE = 1 << 20


class WorkerHandle:
    """The parent's side of one worker: its fds, buffers and the tasks it holds."""

    __slots__ = (
        "exit_fd", "inbuf", "index", "inflight", "out_fd", "outbuf", "pid", "process", "ready",
        "retiring", "sent", "task_fd", "write_watched",
    )  # fmt: skip

    def __init__(
        self, index: int, pid: int, task_fd: int, out_fd: int, process: Process | None = None
    ) -> None:
        self.index = index
        self.pid = pid
        self.process = process  # the forkserver worker's Process; None for our own child
        self.task_fd = task_fd  # ours to write tasks to, non-blocking
        self.out_fd = out_fd  # ours to read results from, non-blocking
        # Readable once the worker has exited.
        self.exit_fd = os.pidfd_open(pid) if process is None else process.sentinel
        self.inflight: dict[int, Task] = {}
        self.outbuf = bytearray()
        self.write_watched = False  # task_fd registered for writing: outbuf is not empty
        self.inbuf = bytearray()
        self.sent = 0  # tasks sent, counted against maxtasksperchild
        self.retiring = False  # sent no more tasks: STOP sent or quota reached
        self.ready = False  # READY received: its initializer ran

    def fds(self) -> list[int]:
        """The fds this handle watches: tasks, results, exit."""
        return [self.task_fd, self.out_fd, self.exit_fd]

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
        else:  # not reaped yet, so the pid cannot have been reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def reap(self) -> int:
        """Wait for the worker to exit; return its exit code (``-N`` for signal N)."""
        if self.process is None:
            _, status = os.waitpid(self.pid, 0)
            return os.waitstatus_to_exitcode(status)
        self.process.join()
        return self.process.exitcode if self.process.exitcode is not None else 255

    def close(self) -> None:
        """Close the fds, once the worker is reaped."""
        os.close(self.task_fd)
        os.close(self.out_fd)
        if self.process is None:
            os.close(self.exit_fd)
        else:
            self.process.close()


def start(index: int, method: str, slots_fd: int, parent_only: list[int]) -> WorkerHandle:
    """Start worker ``index``; a forked child first closes ``parent_only`` fds."""
    task_r, task_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    for fd in (task_w, out_r):
        # Past /proc/sys/fs/pipe-max-size this fails; the default size works, slower.
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    process = None
    try:
        if method == "spawn":
            pid = _spawn(index, task_r, out_w, slots_fd)
        elif method == "forkserver":
            process = _forkserver(index, task_r, out_w, slots_fd)
            pid = process.pid or 0
        else:
            pid = _fork(index, task_r, out_w, slots_fd, [*parent_only, task_w, out_r])
    except BaseException:
        os.close(task_w)
        os.close(out_r)
        raise
    finally:
        os.close(task_r)
        os.close(out_w)
    os.set_blocking(task_w, False)
    os.set_blocking(out_r, False)
    return WorkerHandle(index, pid, task_w, out_r, process)


def _fork(index: int, task_r: int, out_w: int, slots_fd: int, drop: list[int]) -> int:
    parent = os.getpid()
    with warnings.catch_warnings():  # fork from the loop thread is what we mean to do
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        _pool_worker.fork_main(parent, task_r, out_w, slots_fd, index, drop)
    return pid


def _spawn(index: int, task_r: int, out_w: int, slots_fd: int) -> int:
    fds = [task_r, out_w, slots_fd]
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        code = (
            f"import sys; sys.path[:] = {list(sys.path)!r}; "
            "from fabric.local._pool_worker import spawn_main; spawn_main()"
        )
        argv = [sys.executable, "-c", code, str(os.getpid()), *map(str, fds), str(index)]
        return os.posix_spawn(sys.executable, argv, os.environ, setpgroup=0)
    finally:
        for fd in fds:
            os.set_inheritable(fd, False)


def _forkserver(index: int, task_r: int, out_w: int, slots_fd: int) -> Process:
    from fabric.local._shm import PassedFd
    from fabric.local.context import ForkServerProcess

    process = ForkServerProcess(
        target=_pool_worker.process_main,
        args=(PassedFd(task_r), PassedFd(out_w), PassedFd(slots_fd), index),
        name=f"fabric-pool-worker-{index}",
        daemon=True,  # dies with the fork server, which exits with this process
    )
    process.start()
    return process


def describe_exit(code: int) -> str:
    """Say how a process with exit code ``code`` (``-N`` for signal N) ended."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
