"""The primitives across processes: parity bodies, dead owners, leaks.

Every test runs under fork, forkserver and spawn (the ``ctx`` fixture): under
fork the handles are inherited, otherwise they travel as pickled Blocks.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import fabric.local
from fabric.local import Context, _sync
from fabric.local.synchronize import OWNER_CHECK_INTERVAL
from tests.local.test_synchronize import (
    SharedInts,
    consume,
    count_under_lock,
    echo_event,
    pass_barrier,
    pong,
    produce,
    wait_notified,
)

# A dead owner is noticed within one check interval; the rest is slack for a busy machine.
TAKEOVER_BOUND_S = 1.0


class Child:
    """A fabric Process running ``fn(*args)``, started with the context's method."""

    def __init__(self, ctx: Context, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.proc = ctx.Process(target=fn, args=args)
        self.proc.start()
        assert self.proc.pid is not None
        self.pid: int = self.proc.pid

    def wait(self) -> int:
        self.proc.join(60)
        assert self.proc.exitcode is not None, "child did not finish"
        return self.proc.exitcode

    def kill(self) -> None:
        self.proc.kill()


@pytest.fixture
def spawn(ctx: Context) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def start(fn: Callable[..., object], *args: Any) -> Child:
        child = Child(ctx, fn, args)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.proc.exitcode is None:
            child.kill()
        child.wait()


def memfds() -> int:
    """How many of this process's fds are fabric shared-memory segments."""
    fd_dir = Path("/proc/self/fd")
    count = 0
    for entry in fd_dir.iterdir():
        try:
            count += os.readlink(entry) == "/memfd:fabric (deleted)"
        except OSError:
            continue
    return count


# ------------------------------------------------------------- parity bodies


def test_lock_counter_across_processes(spawn: Callable[..., Child]) -> None:
    for make in (fabric.local.Lock, fabric.local.RLock, fabric.local.BoundedSemaphore):
        lock, counter = make(), SharedInts(1)
        kids = [spawn(count_under_lock, lock, counter, 3000) for _ in range(2)]
        count_under_lock(lock, counter, 3000)
        assert [k.wait() for k in kids] == [0, 0]
        assert counter[0] == 9000


def test_semaphore_and_event_across_processes(spawn: Callable[..., Child]) -> None:
    ping, pong_ = fabric.local.Semaphore(0), fabric.local.Semaphore(0)
    kid = spawn(pong, ping, pong_, 100)
    for _ in range(100):
        ping.release()
        assert pong_.acquire(timeout=30)
    assert kid.wait() == 0
    ev, back = fabric.local.Event(), fabric.local.Event()
    kid = spawn(echo_event, ev, back)
    ev.set()
    assert back.wait(30)
    assert kid.wait() == 0


def test_condition_across_processes(spawn: Callable[..., Child]) -> None:
    cond, box = fabric.local.Condition(fabric.local.Lock()), SharedInts(2)
    items = list(range(1, 51))
    kid = spawn(consume, cond, box, len(items))
    produce(cond, box, items)
    assert kid.wait() == 0
    assert box[1] == sum(items)


def test_condition_notify_n_across_processes(spawn: Callable[..., Child]) -> None:
    cond = fabric.local.Condition()
    ready, done, out = fabric.local.Semaphore(0), fabric.local.Semaphore(0), SharedInts(3)
    kids = [spawn(wait_notified, cond, ready, done, out, i) for i in range(3)]
    for _ in range(3):
        assert ready.acquire(timeout=30)
    with cond:
        assert cond.statistics().waiters == 3
        cond.notify()
    assert done.acquire(timeout=30)
    with cond:
        assert sorted(out[i] for i in range(3)) == [0, 0, 1]
        assert cond.statistics().waiters == 2
        cond.notify_all()
    assert [k.wait() for k in kids] == [0, 0, 0]
    assert [out[i] for i in range(3)] == [1, 1, 1]


def test_barrier_across_processes(spawn: Callable[..., Child]) -> None:
    barrier, out = fabric.local.Barrier(3), SharedInts(3)
    kids = [spawn(pass_barrier, barrier, out, i) for i in range(2)]
    pass_barrier(barrier, out, 2)
    assert [k.wait() for k in kids] == [0, 0]
    assert sorted(out[i] for i in range(3)) == [0, 1, 2]


def release_foreign_rlock(rlock: Any, out: SharedInts) -> None:
    try:
        rlock.release()
    except RuntimeError:
        out[0] = 1


def test_rlock_owner_is_the_process_and_thread(spawn: Callable[..., Child]) -> None:
    rlock, out = fabric.local.RLock(), SharedInts(1)
    rlock.acquire()
    assert spawn(release_foreign_rlock, rlock, out).wait() == 0
    assert out[0] == 1 and rlock._is_owned()
    rlock.release()


def take_from_queue(queue: Any, out: SharedInts) -> None:
    lock, done = queue.get(timeout=30)
    out[0] = 1 if lock.acquire(False) else -1  # the parent holds it
    done.set()


def hand_back_an_event(queue: Any) -> None:
    mine = fabric.local.Event()
    queue.put(mine)
    assert mine.wait(30)  # set by the parent through its unpickled copy


def test_primitives_travel_through_queues(spawn: Callable[..., Child]) -> None:
    queue, out = fabric.local.Queue(), SharedInts(1)
    lock, done = fabric.local.Lock(), fabric.local.Event()
    lock.acquire()
    kid = spawn(take_from_queue, queue, out)
    queue.put((lock, done))
    assert done.wait(30)
    assert kid.wait() == 0
    assert out[0] == -1 and lock.locked()
    lock.release()
    kid = spawn(hand_back_an_event, queue)
    theirs = queue.get(timeout=30)
    assert isinstance(theirs, fabric.local.Event) and not theirs.is_set()
    theirs.set()
    assert kid.wait() == 0


# -------------------------------------------------------------- dead owners


def hold_forever(lock: Any, held: Any, never: Any) -> None:
    lock.acquire()
    held.set()
    never.wait()


def acquire_expecting_takeover(lock: Any, dead_pid: int, takeovers: int = 1) -> None:
    start = time.monotonic()
    with pytest.warns(fabric.local.OwnerDiedWarning, match=f"pid {dead_pid}"):
        assert lock.acquire(timeout=TAKEOVER_BOUND_S), "dead owner not detected within the bound"
    took = time.monotonic() - start
    sys.stderr.write(f"took over a dead owner's lock after {took * 1000:.1f} ms\n")
    st = lock.statistics()
    assert st.owner_pid == os.getpid() and st.owner_deaths == takeovers
    lock.release()
    assert lock.acquire(False)  # a clean lock again: no second warning
    lock.release()


@pytest.mark.parametrize("make", [fabric.local.Lock, fabric.local.RLock])
def test_killed_owner_is_taken_over(spawn: Callable[..., Child], make: Callable[[], Any]) -> None:
    lock, held, never = make(), fabric.local.Event(), fabric.local.Event()
    kid = spawn(hold_forever, lock, held, never)
    assert held.wait(30)
    assert lock.acquire(False) is False  # a try-lock does not probe the owner
    kid.kill()
    assert kid.wait() == -signal.SIGKILL
    acquire_expecting_takeover(lock, kid.pid)


def test_waiter_blocked_before_the_kill_takes_over(spawn: Callable[..., Child]) -> None:
    lock, held, never = fabric.local.Lock(), fabric.local.Event(), fabric.local.Event()
    kid = spawn(hold_forever, lock, held, never)
    assert held.wait(30)
    result: list[bool] = []
    caught: list[warnings.WarningMessage] = []

    def waiter() -> None:
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            result.append(lock.acquire(timeout=30))
        caught.extend(log)

    t = threading.Thread(target=waiter)
    t.start()
    deadline = time.monotonic() + 30
    while lock.statistics().waiters == 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # polling a counter, not synchronising: the waiter is asleep
    kid.kill()
    t.join(30)
    kid.wait()
    assert result == [True]
    assert any(issubclass(w.category, fabric.local.OwnerDiedWarning) for w in caught)
    lock.release()


def test_zombie_owner_is_dead() -> None:
    lock, held, never = fabric.local.RLock(), fabric.local.Event(), fabric.local.Event()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            hold_forever(lock, held, never)
        finally:
            os._exit(0)
    try:
        assert held.wait(30)
        os.kill(pid, signal.SIGKILL)
        acquire_expecting_takeover(lock, pid)  # not reaped yet: a zombie
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_warning_as_error_leaves_the_lock_to_the_next_acquirer(
    spawn: Callable[..., Child],
) -> None:
    lock, held, never = fabric.local.Lock(), fabric.local.Event(), fabric.local.Event()
    kid = spawn(hold_forever, lock, held, never)
    assert held.wait(30)
    kid.kill()
    kid.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fabric.local.OwnerDiedWarning)
        with pytest.raises(fabric.local.OwnerDiedWarning):
            lock.acquire(timeout=TAKEOVER_BOUND_S)
    assert lock.statistics().owner_pid == kid.pid
    acquire_expecting_takeover(lock, kid.pid, takeovers=2)


def test_reused_pid_is_not_mistaken_for_the_owner() -> None:
    lock = fabric.local.Lock()
    me = _sync._process_ident()
    word = lock._block.buffer.cast("I")
    word[0] = me ^ (1 << 22)  # this pid, but another start time: the owner is gone
    with pytest.warns(fabric.local.OwnerDiedWarning):
        assert lock.acquire(timeout=TAKEOVER_BOUND_S)
    lock.release()
    word[0] = me  # held by this (live) process: no take-over
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lock.acquire(timeout=2 * OWNER_CHECK_INTERVAL) is False
    lock.release()


def block_on(lock: Any) -> None:
    lock.acquire()


def test_killed_waiter_leaves_the_lock_usable(spawn: Callable[..., Child]) -> None:
    lock, got = fabric.local.Lock(), fabric.local.Event()
    lock.acquire()
    kid = spawn(block_on, lock)
    deadline = time.monotonic() + 30
    while lock.statistics().waiters == 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # polling a counter, not synchronising: the child is asleep
    kid.kill()
    assert kid.wait() == -signal.SIGKILL
    assert lock.statistics().waiters == 1  # the dead waiter's count stays (documented)
    t = threading.Thread(target=lambda: lock.acquire(timeout=30) and got.set())
    t.start()
    lock.release()  # wakes the live waiter (or nobody), never loses the lock
    assert got.wait(30)
    t.join(30)
    lock.release()
    assert lock.acquire(False)
    lock.release()


# -------------------------------------------------------------------- leaks


def use_and_exit(lock: Any, mode: str) -> None:
    with lock:
        pass
    if mode == "raise":
        raise RuntimeError("child fails on purpose")


@pytest.mark.parametrize("mode", ["exit", "raise"])
def test_no_leak_after_child_exit(spawn: Callable[..., Child], mode: str) -> None:
    lock = fabric.local.Lock()
    fds = memfds()
    kid = spawn(use_and_exit, lock, mode)
    assert kid.wait() == (0 if mode == "exit" else 1)
    assert memfds() == fds
    assert lock.acquire(False)
    lock.release()


@pytest.mark.parametrize("mode", ["exit", "raise"])
def test_child_drops_its_block_reference(spawn: Callable[..., Child], mode: str) -> None:
    lock = fabric.local.Lock()
    header = lock._block.offset - 64
    refs = lock._block.segment.mmap[header : header + 4]
    assert spawn(use_and_exit, lock, mode).wait() == (0 if mode == "exit" else 1)
    assert lock._block.segment.mmap[header : header + 4] == refs


def create_and_report(out: SharedInts, held: Any, never: Any) -> None:
    mine = fabric.local.Lock()
    mine.acquire()
    out[0] = os.fstat(mine._block.segment.fd).st_ino
    held.set()
    never.wait()


def processes_holding(inode: int) -> list[int]:
    """Pids (among those we may inspect) with an fd on the memfd of this inode."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd).startswith("/memfd:") and os.stat(fd).st_ino == inode:
                    found.append(int(proc.name))
                    break
        except OSError:
            continue
    return found


def test_no_leak_after_child_kill(spawn: Callable[..., Child]) -> None:
    out, held, never = SharedInts(1), fabric.local.Event(), fabric.local.Event()
    fds = memfds()
    kid = spawn(create_and_report, out, held, never)
    assert held.wait(30)
    inode = out[0]
    assert processes_holding(inode) == [kid.pid]
    kid.kill()
    assert kid.wait() == -signal.SIGKILL
    assert processes_holding(inode) == []  # nobody maps it: the kernel has freed it
    assert memfds() == fds


# ------------------------------------------------------------- no syscalls

UNCONTENDED_LOOP = """
import sys
from fabric.local import Event, Lock, RLock, Semaphore
lock, rlock, sem, event = Lock(), RLock(), Semaphore(1), Event()
event.set()
for _ in range(int(sys.argv[1])):
    lock.acquire(); lock.release(); rlock.acquire(); rlock.release()
    sem.acquire(); sem.release(); event.wait(); event.is_set()
"""


def _syscalls(iterations: int, tmp_path: Path) -> int:
    out = tmp_path / f"strace-{iterations}.txt"
    subprocess.run(
        [
            "strace",
            "-f",
            "-c",
            "-o",
            str(out),
            sys.executable,
            "-c",
            UNCONTENDED_LOOP,
            str(iterations),
        ],
        check=True,
        capture_output=True,
    )
    total = out.read_text().strip().splitlines()[-1].split()
    return int(total[3])  # "100.00 seconds usecs/call calls [errors] total"


def test_uncontended_paths_make_no_system_calls(tmp_path: Path) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    try:
        few = _syscalls(10, tmp_path)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"strace cannot trace here: {exc.stderr.decode(errors='replace')[:200]}")
    many = _syscalls(20_000, tmp_path)
    assert many - few < 20, f"{many - few} more system calls for 19,990 more iterations"
