"""Process mirrors threading.Thread and adds the process extras, under every start method."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import pytest

import fabric.local
from fabric.local import Context, ExceptionProxy, Process, RemoteTraceback, _shm
from tests.local._helpers import Gate, signal_gate, wait_gate

TIMEOUT = 30.0

# -- targets (module level, so they pickle by reference too) -------------------------


def write(block: _shm.Block, data: bytes) -> None:
    block.buffer[: len(data)] = data


def block_until_opened(gate_end: Any, started: Any = None) -> None:
    if started is not None:
        signal_gate(started)
    wait_gate(gate_end, TIMEOUT)


def raise_value_error(message: str) -> None:
    raise ValueError(message)


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickle calls cls(*args): one arg missing
        super().__init__(f"{a}-{b}")


def raise_unpicklable() -> None:
    raise Unpicklable(1, 2)


def report_identity(block: _shm.Block) -> None:
    me = fabric.local.current_process()
    parent = fabric.local.parent_process()
    assert parent is not None
    alive = me.is_alive() and parent.is_alive()
    fields = (me.name, me.pid, os.getpid(), me.daemon, parent.name, parent.pid, alive)
    text = "|".join(map(str, fields))
    write(block, text.encode().ljust(200))


class Writer(Process):
    """A subclass overriding run, as with threading.Thread."""

    def __init__(self, block: _shm.Block) -> None:
        super().__init__()
        self.block = block

    def run(self) -> None:
        write(self.block, b"subclass ran")


class WriterThread(threading.Thread):
    def __init__(self, block: _shm.Block) -> None:
        super().__init__()
        self.block = block

    def run(self) -> None:
        write(self.block, b"subclass ran")


# -- Thread parity: the same body against threading.Thread and each start method ----

KINDS = ["thread", "fork", "forkserver", "spawn"]


def maker(kind: str) -> Callable[..., Any]:
    return threading.Thread if kind == "thread" else fabric.local.get_context(kind).Process


@pytest.mark.parametrize("kind", KINDS)
def test_start_twice_raises_runtime_error(kind: str) -> None:
    worker = maker(kind)(target=len, args=((),))
    worker.start()
    with pytest.raises(RuntimeError):
        worker.start()
    worker.join()


@pytest.mark.parametrize("kind", KINDS)
def test_join_before_start_raises_runtime_error(kind: str) -> None:
    with pytest.raises(RuntimeError):
        maker(kind)(target=len, args=((),)).join()


@pytest.mark.parametrize("kind", KINDS)
def test_join_returns_none_and_is_alive_follows(kind: str) -> None:
    gate = Gate()
    try:
        worker = maker(kind)(target=block_until_opened, args=(gate.read_end,))
        assert not worker.is_alive()
        worker.start()
        assert worker.is_alive()
        assert worker.join(timeout=0.01) is None  # times out: still running
        assert worker.is_alive()
        signal_gate(gate.write_end)
        assert worker.join(TIMEOUT) is None
        assert not worker.is_alive()
    finally:
        gate.close()


@pytest.mark.parametrize("kind", KINDS)
def test_identity_attributes(kind: str) -> None:
    worker = maker(kind)(target=len, args=((),), name="worker-x")
    assert worker.name == "worker-x"
    assert worker.ident is None
    assert worker.native_id is None
    worker.start()
    worker.join()
    assert isinstance(worker.ident, int)
    assert isinstance(worker.native_id, int)
    worker.name = "renamed"
    assert worker.name == "renamed"


@pytest.mark.parametrize("kind", KINDS)
def test_default_name_names_the_target(kind: str) -> None:
    assert "(len)" in maker(kind)(target=len).name


@pytest.mark.parametrize("kind", KINDS)
def test_daemon_settable_before_start_only(kind: str) -> None:
    worker = maker(kind)(target=len, args=((),))
    assert worker.daemon is False
    worker.daemon = True
    assert worker.daemon is True
    assert maker(kind)(target=len, args=((),), daemon=True).daemon is True
    worker.start()
    with pytest.raises(RuntimeError):
        worker.daemon = False
    worker.join()


@pytest.mark.parametrize("kind", KINDS)
def test_group_must_be_none(kind: str) -> None:
    with pytest.raises((AssertionError, ValueError)):
        maker(kind)(group=object(), target=len)


@pytest.mark.parametrize("kind", KINDS)
def test_subclass_overrides_run(kind: str) -> None:
    block = _shm.allocate(64)
    if kind == "thread":
        worker: Any = WriterThread(block)
    else:
        worker = type("W", (Writer, fabric.local.get_context(kind).Process), {})(block)
    worker.start()
    worker.join(TIMEOUT)
    assert bytes(block.buffer[:12]) == b"subclass ran"


@pytest.mark.parametrize("kind", KINDS)
def test_kwargs_reach_the_target(kind: str) -> None:
    block = _shm.allocate(64)
    worker = maker(kind)(target=write, kwargs={"block": block, "data": b"by keyword"})
    worker.start()
    worker.join(TIMEOUT)
    assert bytes(block.buffer[:10]) == b"by keyword"


# -- process extras --------------------------------------------------------------------


def exit_with(code: str | int | None) -> None:
    sys.exit(code)


def hard_exit(code: int) -> None:
    os._exit(code)


def kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)


@pytest.mark.parametrize(
    ("target", "args", "code"),
    [
        (len, ((),), 0),
        (exit_with, (3,), 3),
        (exit_with, (None,), 0),
        (exit_with, ("a message",), 1),
        (hard_exit, (7,), 7),
        (kill_self, (signal.SIGABRT,), -signal.SIGABRT),
        (raise_value_error, ("x",), 1),
    ],
)
def test_exitcode(ctx: Context, target: Any, args: tuple[Any, ...], code: int) -> None:
    proc = ctx.Process(target=target, args=args)
    assert proc.exitcode is None
    proc.start()
    proc.join(TIMEOUT)
    assert proc.exitcode == code


@pytest.mark.parametrize(("verb", "sig"), [("terminate", signal.SIGTERM), ("kill", signal.SIGKILL)])
def test_terminate_and_kill(ctx: Context, verb: str, sig: int) -> None:
    gate, started = Gate(), Gate()
    try:
        proc = ctx.Process(target=block_until_opened, args=(gate.read_end, started.write_end))
        proc.start()
        assert wait_gate(started.read_end, TIMEOUT)
        getattr(proc, verb)()
        proc.join(TIMEOUT)
        assert proc.exitcode == -sig
        getattr(proc, verb)()  # a no-op once it has exited
    finally:
        gate.close()
        started.close()


def test_interrupt_raises_keyboard_interrupt_in_the_child(ctx: Context) -> None:
    gate, started = Gate(), Gate()
    try:
        proc = ctx.Process(target=block_until_opened, args=(gate.read_end, started.write_end))
        proc.start()
        assert wait_gate(started.read_end, TIMEOUT)
        proc.interrupt()
        proc.join(TIMEOUT)
        assert proc.exitcode == 1
        assert isinstance(proc.exception, KeyboardInterrupt)
    finally:
        gate.close()
        started.close()


def test_sentinel_works_with_select_and_wait(ctx: Context) -> None:
    gate = Gate()
    try:
        proc = ctx.Process(target=block_until_opened, args=(gate.read_end,))
        with pytest.raises(ValueError):
            _ = proc.sentinel
        proc.start()
        assert select.select([proc.sentinel], [], [], 0)[0] == []
        signal_gate(gate.write_end)
        assert wait([proc.sentinel], TIMEOUT) == [proc.sentinel]
        assert select.select([proc.sentinel], [], [], 0)[0] == [proc.sentinel]
        proc.join(TIMEOUT)
        assert proc.exitcode == 0
    finally:
        gate.close()


def test_close(ctx: Context) -> None:
    gate = Gate()
    try:
        proc = ctx.Process(target=block_until_opened, args=(gate.read_end,))
        proc.start()
        with pytest.raises(ValueError, match="still running"):
            proc.close()
        signal_gate(gate.write_end)
        proc.join(TIMEOUT)
        proc.close()
        proc.close()  # idempotent
        for action in (proc.is_alive, proc.join, proc.start, proc.terminate):
            with pytest.raises(ValueError, match="closed"):
                action()
        with pytest.raises(ValueError):
            _ = proc.exitcode
    finally:
        gate.close()


def test_exception_is_closed_with_the_process(ctx: Context) -> None:
    proc = ctx.Process(target=raise_value_error, args=("gone",))
    proc.start()
    proc.join(TIMEOUT)
    proc.close()
    with pytest.raises(ValueError, match="closed"):
        _ = proc.exception


def test_join_only_from_the_parent() -> None:
    proc = Process(target=len, args=((),))
    with pytest.raises(RuntimeError):
        fabric.local.current_process().join()
    proc.start()
    proc.join(TIMEOUT)


def test_shared_block_written_by_child(ctx: Context) -> None:
    small, large = _shm.allocate(32), _shm.allocate(1 << 20)
    proc = ctx.Process(target=write, args=(small, b"small block"))
    proc.start()
    proc.join(TIMEOUT)
    proc2 = ctx.Process(target=write, args=(large, b"large block"))
    proc2.start()
    proc2.join(TIMEOUT)
    assert (proc.exitcode, proc2.exitcode) == (0, 0)
    assert bytes(small.buffer[:11]) == b"small block"
    assert bytes(large.buffer[:11]) == b"large block"


def test_lambdas_and_closures(ctx: Context) -> None:
    block = _shm.allocate(64)
    suffix = b" from a closure"

    def closure() -> None:
        write(block, b"hello" + suffix)

    proc = ctx.Process(target=closure)
    proc.start()
    proc.join(TIMEOUT)
    assert bytes(block.buffer[:20]) == b"hello from a closure"
    proc = ctx.Process(target=lambda: write(block, b"lambda!"))
    proc.start()
    proc.join(TIMEOUT)
    assert bytes(block.buffer[:7]) == b"lambda!"


def test_current_and_parent_process_in_child(ctx: Context) -> None:
    block = _shm.allocate(256)
    proc = ctx.Process(target=report_identity, args=(block,), name="kid", daemon=True)
    proc.start()
    proc.join(TIMEOUT)
    assert proc.exitcode == 0
    name, pid, real_pid, daemon, parent_name, parent_pid, alive = (
        bytes(block.buffer[:200]).decode().strip().split("|")
    )
    assert (name, int(pid), int(real_pid), daemon) == ("kid", proc.pid, proc.pid, "True")
    assert (parent_name, int(parent_pid), alive) == ("MainProcess", os.getpid(), "True")


def test_module_functions_in_parent(ctx: Context) -> None:
    me = fabric.local.current_process()
    assert me.name == "MainProcess" and me.pid == os.getpid() and me.is_alive()
    assert fabric.local.parent_process() is None
    assert fabric.local.cpu_count() >= 1
    gate = Gate()
    try:
        proc = ctx.Process(target=block_until_opened, args=(gate.read_end,))
        proc.start()
        assert proc in fabric.local.active_children()
        assert fabric.local.enumerate() == [me, proc]
        assert fabric.local.active_count() >= 2
        signal_gate(gate.write_end)
        proc.join(TIMEOUT)
        assert proc not in fabric.local.active_children()
        assert proc not in fabric.local.enumerate()
    finally:
        gate.close()


def test_active_children_reaps_finished_children(ctx: Context) -> None:
    proc = ctx.Process(target=len, args=((),))
    proc.start()
    wait([proc.sentinel], TIMEOUT)
    assert proc not in fabric.local.active_children()
    assert proc.exitcode == 0


# -- exceptions ------------------------------------------------------------------------


def test_exception_reaches_the_parent(ctx: Context) -> None:
    proc = ctx.Process(target=raise_value_error, args=("boom",))
    assert proc.exception is None
    proc.start()
    proc.join(TIMEOUT)
    assert proc.exitcode == 1
    exc = proc.exception
    assert isinstance(exc, ValueError) and str(exc) == "boom"
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise_value_error" in exc.__cause__.tb


def test_unpicklable_exception_arrives_as_a_proxy(ctx: Context) -> None:
    proc = ctx.Process(target=raise_unpicklable)
    proc.start()
    proc.join(TIMEOUT)
    exc = proc.exception
    assert isinstance(exc, ExceptionProxy)
    assert exc.type_name.endswith("Unpicklable")
    assert exc.message == "1-2"
    assert "raise_unpicklable" in exc.traceback


def test_no_exception_after_success(ctx: Context) -> None:
    proc = ctx.Process(target=len, args=((),))
    proc.start()
    proc.join(TIMEOUT)
    assert proc.exception is None


def record_hook(block: _shm.Block) -> Callable[[fabric.local.ExceptHookArgs], None]:
    def hook(args: fabric.local.ExceptHookArgs) -> None:
        assert args.process is not None
        text = f"{args.exc_type.__name__}|{args.exc_value}|{args.process.name}"
        write(block, text.encode().ljust(100))

    return hook


def test_custom_excepthook_runs_in_the_child(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    block = _shm.allocate(128)
    monkeypatch.setattr(fabric.local, "excepthook", record_hook(block))
    proc = ctx.Process(target=raise_value_error, args=("hooked",), name="hooked-proc")
    proc.start()
    proc.join(TIMEOUT)
    assert bytes(block.buffer[:100]).decode().strip() == "ValueError|hooked|hooked-proc"
    assert proc.exitcode == 1


def test_fork_warns_when_threads_exist() -> None:
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, args=(TIMEOUT,))
    helper.start()
    try:
        proc = fabric.local.get_context("fork").Process(target=len, args=((),))
        with pytest.warns(DeprecationWarning, match="fork"):
            proc.start()
        proc.join(TIMEOUT)
    finally:
        stop.set()
        helper.join()


def test_daemon_child_started_from_a_thread_outlives_the_thread(ctx: Context) -> None:
    # PR_SET_PDEATHSIG follows the creating thread, so it must not be used here.
    gate, started = Gate(), Gate()
    box: list[Process] = []

    def starter() -> None:
        proc = ctx.Process(target=block_until_opened, args=(gate.read_end, started.write_end))
        proc.daemon = True
        proc.start()
        box.append(proc)

    try:
        thread = threading.Thread(target=starter)
        thread.start()
        thread.join()
        assert wait_gate(started.read_end, TIMEOUT)
        assert box[0].is_alive()
        signal_gate(gate.write_end)
        box[0].join(TIMEOUT)
        assert box[0].exitcode == 0
    finally:
        gate.close()
        started.close()


def test_repr(ctx: Context) -> None:
    proc = ctx.Process(target=len, args=((),), name="r")
    assert "initial" in repr(proc)
    proc.start()
    proc.join(TIMEOUT)
    assert "exitcode=0" in repr(proc) and f"pid={proc.pid}" in repr(proc)


def start_grandchild(method: str, block: _shm.Block) -> None:
    inner = fabric.local.get_context(method).Process(target=report_identity, args=(block,))
    inner.start()
    inner.join(TIMEOUT)
    sys.exit(inner.exitcode)


@pytest.mark.parametrize("inner", ["fork", "forkserver", "spawn"])
def test_children_start_children(ctx: Context, inner: str) -> None:
    block = _shm.allocate(256)
    proc = ctx.Process(target=start_grandchild, args=(inner, block), name="middle")
    proc.start()
    proc.join(TIMEOUT)
    assert proc.exitcode == 0
    name, pid, _real, _daemon, parent_name, parent_pid, _alive = (
        bytes(block.buffer[:200]).decode().strip().split("|")
    )
    assert name.startswith(f"Process-{proc._identity[0]}:1 ")
    assert (parent_name, int(parent_pid)) == ("middle", proc.pid)
    assert int(pid) not in (proc.pid, os.getpid())


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_fds_are_released_by_close_and_by_collection(ctx: Context) -> None:
    import gc

    proc = ctx.Process(target=len, args=((),))
    proc.start()
    proc.join(TIMEOUT)
    before = open_fds()
    for _ in range(3):
        proc = ctx.Process(target=raise_value_error, args=("x",))
        proc.start()
        proc.join(TIMEOUT)
        proc.close()
        proc = ctx.Process(target=len, args=((),))
        proc.start()
        proc.join(TIMEOUT)
    del proc
    gc.collect()
    assert open_fds() <= before


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_threads_start_processes_concurrently(method: str) -> None:
    ctx = fabric.local.get_context(method)
    blocks = [_shm.allocate(16) for _ in range(8)]
    barrier = threading.Barrier(4)
    codes: list[int | None] = []

    def starter(mine: list[_shm.Block]) -> None:
        barrier.wait(TIMEOUT)
        procs = [ctx.Process(target=write, args=(b, b"ok")) for b in mine]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(TIMEOUT)
            codes.append(proc.exitcode)

    threads = [threading.Thread(target=starter, args=(blocks[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [0] * 8
    assert all(bytes(b.buffer[:2]) == b"ok" for b in blocks)


def test_unpicklable_excepthook_falls_back_to_the_default(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lock = threading.Lock()
    monkeypatch.setattr(fabric.local, "excepthook", lambda args: lock.locked())
    proc = fabric.local.get_context("spawn").Process(target=raise_value_error, args=("x",))
    with caplog.at_level("WARNING", logger="fabric.local._launch"):
        proc.start()
    proc.join(TIMEOUT)
    assert proc.exitcode == 1 and isinstance(proc.exception, ValueError)
    assert "cannot be pickled" in caplog.text
