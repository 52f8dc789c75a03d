"""The loop a pool worker runs: read task batches, run them, send results back.

A worker ignores SIGINT (Ctrl-C is the parent's to handle), sits in its own
process group, and dies with the parent (``PR_SET_PDEATHSIG``, plus end of
file on the task pipe). Before running a task it writes the task id into its
slot of a small shared-memory table, and clears it once the result is
pickled: when a worker dies, the parent reads the slot to learn which task was
running, so only that task is charged with the crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import os
import pickle
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from fabric.local import _pool_wire as wire
from fabric.local._remote_errors import pack_exception

__all__ = [
    "SLOT",
    "SLOT_STRIDE",
    "WorkerConfig",
    "fork_main",
    "process_main",
    "run_worker",
    "spawn_main",
]

SLOT = struct.Struct("<q")
SLOT_STRIDE = 64  # one cache line per worker so slots never share a line
_FLUSH_AFTER_S = 0.0005  # a finished result waits at most this long for company
_PR_SET_PDEATHSIG = 1


class WorkerConfig:
    """What every worker of one pool is started with (sent pickled, once)."""

    def __init__(
        self,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        maxtasks: int | None,
        sys_path: list[str],
    ) -> None:
        self.initializer = initializer
        self.initargs = initargs
        self.maxtasks = maxtasks
        self.sys_path = sys_path


def _find_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the task pipe's EOF still ends us
        return None


# Looked up once, in the parent: a forked child must not dlopen (another
# thread of the parent may have held the loader's lock at fork time).
_prctl = _find_prctl()


def _die_with_parent(parent: int) -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _detach(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    _die_with_parent(parent)


class _Runner:
    """Run task batches and stream results back, batching the writes."""

    def __init__(self, out_fd: int, slots: mmap.mmap, index: int, maxtasks: int | None):
        self.out_fd = out_fd
        self.slots = slots
        self.offset = index * SLOT_STRIDE
        self.left = maxtasks
        self.fns: dict[bytes, Callable[..., Any]] = {}
        self.results: list[tuple[int, int, Any, float]] = []

    def function(self, blob: bytes) -> Callable[..., Any]:
        fn = self.fns.get(blob)
        if fn is None:
            if len(self.fns) > 64:
                self.fns.clear()
            fn = self.fns[blob] = pickle.loads(blob)
        return fn

    def run_batch(self, blobs: list[bytes], tasks: list[tuple[int, int, int, Any]]) -> bool:
        """Run a batch; return False once ``maxtasksperchild`` is used up."""
        last_flush = time.perf_counter()
        for task_id, fn_index, kind, payload in tasks:
            SLOT.pack_into(self.slots, self.offset, task_id)
            start = time.perf_counter()
            how, data = self._run_one(blobs[fn_index], kind, payload)
            SLOT.pack_into(self.slots, self.offset, 0)
            now = time.perf_counter()
            self.results.append((task_id, how, data, now - start))
            if now - last_flush >= _FLUSH_AFTER_S:
                self.flush()
                last_flush = now
            if self.left is not None:
                self.left -= 1
                if self.left <= 0:
                    break
        self.flush()
        return self.left is None or self.left > 0

    def _run_one(self, blob: bytes, kind: int, payload: Any) -> tuple[int, Any]:
        try:
            fn = self.function(blob)
            if kind == wire.CALL:
                if type(payload) is tuple:  # plain arguments, sent as they are
                    value: Any = fn(*payload)
                else:
                    args, kwargs = pickle.loads(payload)
                    value = fn(*args, **kwargs)
            elif kind == wire.MAP:
                items = payload if type(payload) is list else pickle.loads(payload)
                value = [fn(x) for x in items]
            else:
                value = [fn(*x) for x in pickle.loads(payload)]
        except BaseException as exc:  # a task may raise anything, SystemExit included
            return wire.RAISED, pack_exception(exc)
        if type(value) in wire.PLAIN or (
            type(value) is list and len(value) <= wire.INLINE_LIST_MAX and wire.plain(value)
        ):
            return wire.INLINE, value
        try:
            return wire.PICKLED, pickle.dumps(value, 5)
        except Exception:
            try:
                import cloudpickle

                return wire.PICKLED, cloudpickle.dumps(value, 5)
            except Exception as exc:
                return wire.RAISED, pack_exception(exc)

    def flush(self) -> None:
        if self.results:
            wire.write_all(self.out_fd, wire.encode(wire.DONE, self.results))
            self.results = []


def run_worker(in_fd: int, out_fd: int, slots_fd: int, index: int) -> int:
    """Serve one pool from its pipes until STOP, end of file or retirement."""
    with open(in_fd, "rb", buffering=1 << 20, closefd=False) as stream:
        return _serve(stream, out_fd, mmap.mmap(slots_fd, 0), index)


def _serve(stream: BinaryIO, out_fd: int, slots: mmap.mmap, index: int) -> int:
    first = wire.read_frame(stream)
    if first is None or first[0] != wire.CONFIG:
        return 1
    try:
        config: WorkerConfig = pickle.loads(first[1])
        sys.path[:] = config.sys_path
        if config.initializer is not None:
            config.initializer(*config.initargs)
    except BaseException as exc:
        wire.write_all(out_fd, wire.encode(wire.INIT_ERROR, pack_exception(exc)))
        return 1
    wire.write_all(out_fd, wire.encode(wire.READY, os.getpid()))
    runner = _Runner(out_fd, slots, index, config.maxtasks)
    while True:
        message = wire.read_frame(stream)
        if message is None or message[0] == wire.STOP:
            return 0
        blobs, tasks = message[1]
        if not runner.run_batch(blobs, tasks):
            return 0


def fork_main(
    parent: int, in_fd: int, out_fd: int, slots_fd: int, index: int, drop: list[int]
) -> None:
    """Body of a forked worker; never returns."""
    code = 1
    try:
        _detach(parent)
        # The parent's objects stay out of this process's collections: a
        # collection touching them would copy every page they sit on.
        gc.freeze()
        for fd in drop:
            with contextlib.suppress(OSError):
                os.close(fd)
        code = run_worker(in_fd, out_fd, slots_fd, index)
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
        finally:
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def process_main(in_fd: int, out_fd: int, slots_fd: int, index: int) -> None:
    """Target of a forkserver worker's Process.

    The fork server is its parent: it dies with the server (a daemonic
    Process), which exits with the pool's process; end of file on the task
    pipe ends it too.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    code = run_worker(in_fd, out_fd, slots_fd, index)
    if code:
        raise SystemExit(code)


def spawn_main() -> None:
    """Entry point of a spawned worker: ``python -c ... parent in out slots index``."""
    parent, in_fd, out_fd, slots_fd, index = map(int, sys.argv[1:6])
    _detach(parent)
    code = run_worker(in_fd, out_fd, slots_fd, index)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
