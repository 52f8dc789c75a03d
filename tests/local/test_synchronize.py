"""Parity tests: one body per behaviour, run against threading and fabric.local.

Thread-level bodies run against both ``threading`` and ``fabric.local``; the
cross-process bodies (see test_synchronize_processes.py) reuse the same workers.
"""

from __future__ import annotations

import pickle
import signal
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import fabric.local
from fabric.local import _shm

IMPLS = {"threading": threading, "fabric": fabric.local}


@pytest.fixture(params=sorted(IMPLS))
def ns(request: pytest.FixtureRequest) -> types.ModuleType:
    return IMPLS[request.param]


class SharedInts:
    """A few int64 slots in shared memory; picklable, so usable by any process."""

    def __init__(self, n: int, block: _shm.Block | None = None) -> None:
        self.n = n
        self.block = block or _shm.allocate(8 * n)
        self.view = self.block.buffer.cast("q")

    def __reduce__(self) -> tuple[Any, ...]:
        return SharedInts, (self.n, self.block)

    def __getitem__(self, i: int) -> int:
        return int(self.view[i])

    def __setitem__(self, i: int, value: int) -> None:
        self.view[i] = value


def waiting(cond: Any) -> int:
    """Threads in ``cond.wait()`` not yet notified, for either implementation."""
    if isinstance(cond, fabric.local.Condition):
        return cond.statistics().waiters
    return len(cond._waiters)


@pytest.fixture
def threads() -> Iterator[Callable[..., threading.Thread]]:
    started: list[threading.Thread] = []

    def start(fn: Callable[..., object], *args: object) -> threading.Thread:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        started.append(t)
        return t

    yield start
    for t in started:
        t.join(10)
        assert not t.is_alive(), "a test thread did not finish"


# ---------------------------------------------------------------- workers
# Module-level so the process tests can send them to children.


def count_under_lock(lock: Any, counter: SharedInts, n: int) -> None:
    for _ in range(n):
        with lock:
            counter[0] = counter[0] + 1


def pong(ping: Any, pong_: Any, n: int) -> None:
    for _ in range(n):
        assert ping.acquire(timeout=30)
        pong_.release()


def echo_event(ev_in: Any, ev_out: Any) -> None:
    assert ev_in.wait(30)
    ev_out.set()


def consume(cond: Any, box: SharedInts, n: int) -> None:
    """Take n items a producer puts into box[0] one at a time, summing into box[1]."""
    for _ in range(n):
        with cond:
            assert cond.wait_for(lambda: box[0] != 0, timeout=30)
            box[1] = box[1] + box[0]
            box[0] = 0
            cond.notify_all()


def produce(cond: Any, box: SharedInts, items: list[int]) -> None:
    for item in items:
        with cond:
            assert cond.wait_for(lambda: box[0] == 0, timeout=30)
            box[0] = item
            cond.notify_all()


def pass_barrier(barrier: Any, out: SharedInts, slot: int) -> None:
    out[slot] = barrier.wait(30)


def wait_notified(cond: Any, ready: Any, done: Any, out: SharedInts, slot: int) -> None:
    with cond:
        ready.release()
        out[slot] = 1 if cond.wait(30) else -1
    done.release()


# ------------------------------------------------------------------ Lock


def test_lock_acquire_release_and_errors(ns: types.ModuleType) -> None:
    lock = ns.Lock()
    assert lock.acquire() is True
    assert lock.locked()
    assert lock.acquire(False) is False
    assert lock.acquire(timeout=0.01) is False
    assert lock.acquire(blocking=True, timeout=0) is False
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        lock.release()
    with pytest.raises(ValueError, match="non-blocking"):
        lock.acquire(False, 1)
    with pytest.raises(ValueError, match="must be positive"):
        lock.acquire(timeout=-2)
    with pytest.raises(OverflowError):
        lock.acquire(timeout=1e300)
    with lock as entered:
        assert entered is True
        assert lock.locked()
    assert not lock.locked()


def test_lock_released_by_another_thread(ns: types.ModuleType, threads: Any) -> None:
    lock = ns.Lock()
    lock.acquire()
    threads(lock.release).join()
    assert lock.acquire(False)
    lock.release()


def test_lock_excludes_threads(ns: types.ModuleType, threads: Any) -> None:
    lock, counter = ns.Lock(), SharedInts(1)
    for _ in range(4):
        threads(count_under_lock, lock, counter, 2000)
    for t in list(threading.enumerate()):
        if t is not threading.current_thread() and t.daemon:
            t.join(30)
    assert counter[0] == 8000


def test_lock_waiter_wakes_on_release(ns: types.ModuleType, threads: Any) -> None:
    lock, got = ns.Lock(), ns.Event()
    lock.acquire()
    t = threads(lambda: lock.acquire(timeout=30) and got.set())
    assert not got.wait(0.02)
    lock.release()
    assert got.wait(30)
    t.join()
    lock.release()


# ----------------------------------------------------------------- RLock


def test_rlock_is_reentrant_and_owned(ns: types.ModuleType, threads: Any) -> None:
    rlock = ns.RLock()
    assert rlock.acquire() and rlock.acquire(blocking=False)
    errors: list[BaseException] = []

    def foreign() -> None:
        assert rlock.acquire(False) is False
        try:
            rlock.release()
        except RuntimeError as exc:
            errors.append(exc)

    threads(foreign).join()
    assert len(errors) == 1
    rlock.release()
    assert rlock._is_owned()
    rlock.release()
    assert not rlock._is_owned()
    with pytest.raises(RuntimeError, match="un-acquired"):
        rlock.release()
    with rlock, rlock:
        assert rlock._is_owned()


# ------------------------------------------------------------- Semaphore


def test_semaphore_counts(ns: types.ModuleType) -> None:
    with pytest.raises(ValueError):
        ns.Semaphore(-1)
    sem = ns.Semaphore(2)
    assert sem.acquire() and sem.acquire()
    assert sem.acquire(False) is False
    assert sem.acquire(timeout=0.01) is False
    assert sem.acquire(timeout=-1) is False
    sem.release(2)
    assert sem.acquire(False) and sem.acquire(False)
    with pytest.raises(ValueError, match="one or more"):
        sem.release(0)
    with pytest.raises(ValueError, match="non-blocking"):
        sem.acquire(False, 1)
    sem.release()
    with sem:
        assert sem.acquire(False) is False


def test_bounded_semaphore_refuses_over_release(ns: types.ModuleType) -> None:
    sem = ns.BoundedSemaphore(2)
    with pytest.raises(ValueError, match="released too many times"):
        sem.release()
    sem.acquire()
    with pytest.raises(ValueError, match="released too many times"):
        sem.release(2)
    sem.release()


def test_semaphore_ping_pong(ns: types.ModuleType, threads: Any) -> None:
    ping, pong_ = ns.Semaphore(0), ns.Semaphore(0)
    threads(pong, ping, pong_, 200)
    for _ in range(200):
        ping.release()
        assert pong_.acquire(timeout=30)


def test_semaphore_release_n_wakes_n(ns: types.ModuleType, threads: Any) -> None:
    sem, done = ns.Semaphore(0), ns.Semaphore(0)

    def take() -> None:
        assert sem.acquire(timeout=30)
        done.release()

    for _ in range(3):
        threads(take)
    sem.release(3)
    for _ in range(3):
        assert done.acquire(timeout=30)


# ----------------------------------------------------------------- Event


def test_event(ns: types.ModuleType, threads: Any) -> None:
    ev, back = ns.Event(), ns.Event()
    assert not ev.is_set()
    assert ev.wait(0.01) is False
    assert ev.wait(-1) is False
    threads(echo_event, ev, back)
    ev.set()
    assert back.wait(30) is True
    assert ev.is_set() and ev.wait() is True
    ev.clear()
    assert not ev.is_set()


# ------------------------------------------------------------- Condition


def test_condition_needs_the_lock(ns: types.ModuleType) -> None:
    cond = ns.Condition(ns.Lock())
    with pytest.raises(RuntimeError, match="un-acquired"):
        cond.wait(0)
    with pytest.raises(RuntimeError, match="un-acquired"):
        cond.notify()
    with pytest.raises(RuntimeError, match="un-acquired"):
        cond.notify_all()
    with cond:
        assert cond.wait(0.01) is False
        assert cond.wait_for(lambda: 0, timeout=0.01) == 0
        cond.notify()


def test_condition_rlock_depth_survives_wait(ns: types.ModuleType) -> None:
    cond = ns.Condition()
    with cond, cond:
        assert cond.wait(0.01) is False
        assert cond._is_owned()
    assert not cond._is_owned()


def test_condition_producer_consumer(ns: types.ModuleType, threads: Any) -> None:
    cond, box = ns.Condition(ns.Lock()), SharedInts(2)
    items = list(range(1, 101))
    threads(consume, cond, box, len(items))
    produce(cond, box, items)
    with cond:
        assert cond.wait_for(lambda: box[0] == 0, timeout=30)
    assert box[1] == sum(items)


def test_condition_notify_n_wakes_exactly_n(ns: types.ModuleType, threads: Any) -> None:
    cond, ready, done, out = ns.Condition(), ns.Semaphore(0), ns.Semaphore(0), SharedInts(4)
    for slot in range(4):
        threads(wait_notified, cond, ready, done, out, slot)
    for _ in range(4):
        assert ready.acquire(timeout=30)
    with cond:  # every waiter released the lock inside wait(), so all are waiting
        assert waiting(cond) == 4
        cond.notify(2)
        assert waiting(cond) == 2
        cond.notify(-1)
        assert waiting(cond) == 2
    assert done.acquire(timeout=30) and done.acquire(timeout=30)
    with cond:
        assert sum(out[i] for i in range(4)) == 2
        assert waiting(cond) == 2
        cond.notify_all()
        assert waiting(cond) == 0
    assert done.acquire(timeout=30) and done.acquire(timeout=30)
    assert [out[i] for i in range(4)] == [1, 1, 1, 1]


def consume_with_timeouts(cond: Any, box: SharedInts, stop: Any) -> None:
    """Take items from box[0] (a count of pending items) with short timed waits."""
    while True:
        with cond:
            if not cond.wait_for(lambda: box[0] > 0 or stop.is_set(), timeout=0.001):
                continue
            if box[0] == 0:
                return
            box[0] -= 1
            box[1] += 1
            cond.notify_all()  # the producer waits for the total; more racing wake-ups too


def test_condition_timeouts_racing_notifies_lose_nothing(
    ns: types.ModuleType, threads: Any
) -> None:
    """Waits that time out while notify(1) races with them must not strand items."""
    cond, box, stop = ns.Condition(ns.Lock()), SharedInts(2), ns.Event()
    consumers = [threads(consume_with_timeouts, cond, box, stop) for _ in range(3)]
    for _ in range(2000):
        with cond:
            box[0] += 1
            cond.notify()
    with cond:
        assert cond.wait_for(lambda: box[1] == 2000, timeout=30)
        stop.set()
        cond.notify_all()
    for t in consumers:
        t.join(30)
    assert box[0] == 0 and box[1] == 2000


# --------------------------------------------------------------- Barrier


def test_barrier_indices_and_action(ns: types.ModuleType, threads: Any) -> None:
    actions = SharedInts(1)
    barrier = ns.Barrier(3, action=lambda: actions.__setitem__(0, actions[0] + 1))
    assert barrier.parties == 3 and barrier.n_waiting == 0 and not barrier.broken
    out = SharedInts(3)
    ts = [threads(pass_barrier, barrier, out, i) for i in range(2)]
    pass_barrier(barrier, out, 2)
    for t in ts:
        t.join()
    assert sorted(out[i] for i in range(3)) == [0, 1, 2]
    assert actions[0] == 1


def test_barrier_abort_reset_timeout(ns: types.ModuleType, threads: Any) -> None:
    barrier = ns.Barrier(2)
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(0.01)
    assert barrier.broken
    barrier.reset()
    assert not barrier.broken
    barrier.abort()
    with pytest.raises(ns.BrokenBarrierError):
        barrier.wait()
    barrier.reset()
    out = SharedInts(2)
    t = threads(pass_barrier, barrier, out, 0)
    pass_barrier(barrier, out, 1)
    t.join()
    assert sorted([out[0], out[1]]) == [0, 1]


# ------------------------------------------------------- fabric extras


def test_block_keyword_and_none_timeout() -> None:
    lock, sem = fabric.local.Lock(), fabric.local.Semaphore(1)
    assert lock.acquire(block=True, timeout=None)
    assert lock.acquire(block=False) is False
    lock.release()
    assert sem.acquire(block=False)
    assert sem.acquire(block=True, timeout=0.01) is False
    with pytest.raises(TypeError, match="multiple values"):
        lock.acquire(True, blocking=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        lock.acquire(wait=True)


@pytest.mark.parametrize(
    "make",
    [
        fabric.local.Lock,
        fabric.local.RLock,
        lambda: fabric.local.Semaphore(3),
        lambda: fabric.local.BoundedSemaphore(3),
        fabric.local.Event,
        fabric.local.Condition,
    ],
)
def test_pickled_copy_shares_state(make: Callable[[], Any]) -> None:
    obj = make()
    copy = pickle.loads(pickle.dumps(obj))
    assert type(copy) is type(obj)
    assert copy._block.offset == obj._block.offset
    assert copy.statistics() == obj.statistics()


def test_pickled_copies_share_lock_state() -> None:
    lock = fabric.local.Lock()
    copy = pickle.loads(pickle.dumps(lock))
    assert lock.acquire()
    assert copy.locked() and copy.acquire(False) is False
    copy.release()
    assert not lock.locked()
    sem = fabric.local.BoundedSemaphore(1)
    sem_copy = pickle.loads(pickle.dumps(sem))
    sem.acquire()
    assert sem_copy.get_value() == 0
    sem_copy.release()
    with pytest.raises(ValueError):
        sem.release()


def test_statistics_are_immutable_records() -> None:
    rlock = fabric.local.RLock()
    with rlock, rlock:
        st = rlock.statistics()
    assert st.locked and st.depth == 2 and st.owner_thread == threading.get_ident()
    with pytest.raises(AttributeError):
        st.locked = False  # type: ignore[misc]
    sem = fabric.local.BoundedSemaphore(2)
    assert sem.statistics() == (2, 0, 2)
    assert fabric.local.Semaphore(0).statistics().bound is None
    ev = fabric.local.Event()
    ev.set()
    assert ev.statistics().is_set
    barrier = fabric.local.Barrier(2)
    assert barrier.statistics() == (2, 0, False)


@pytest.mark.parametrize("name", ["Lock", "RLock", "Semaphore", "Event", "Condition", "Barrier"])
def test_weak_references(ns: types.ModuleType, name: str) -> None:
    obj = getattr(ns, name)(2) if name == "Barrier" else getattr(ns, name)()
    assert weakref.ref(obj)() is obj


def test_condition_refuses_a_foreign_lock() -> None:
    with pytest.raises(TypeError, match=r"fabric\.local Lock or RLock"):
        fabric.local.Condition(threading.Lock())  # type: ignore[arg-type]


def test_attach_checks_the_kind() -> None:
    from fabric.local import _sync

    lock = fabric.local.Lock()
    with pytest.raises(ValueError, match="does not hold a fabric Event"):
        _sync.Event(lock._block.segment.mmap, lock._block.offset)
    with pytest.raises(ValueError, match="out of range"):
        _sync.Lock(lock._block.segment.mmap, 3)


class Interrupted(Exception):
    pass


def _held_lock() -> Callable[[], object]:
    lock = fabric.local.Lock()
    lock.acquire()
    return lock.acquire


def _held_condition() -> Callable[[], object]:
    cond = fabric.local.Condition()
    cond.acquire()
    return cond.wait


@pytest.mark.parametrize(
    "blocked_call",
    [
        _held_lock,
        lambda: fabric.local.Semaphore(0).acquire,
        lambda: fabric.local.Event().wait,
        _held_condition,
    ],
    ids=["Lock", "Semaphore", "Event", "Condition"],
)
def test_signal_handlers_run_during_a_wait(
    blocked_call: Callable[[], Callable[[], object]],
) -> None:
    """A blocked wait runs signal handlers; one that raises ends the wait with its exception."""
    wait = blocked_call()
    main = threading.main_thread().ident
    assert main is not None
    calls: list[int] = []
    timers: list[threading.Timer] = []

    def send_signal() -> None:
        signal.pthread_kill(main, signal.SIGUSR1)

    def handler(signum: int, frame: object) -> None:
        calls.append(signum)
        if len(calls) == 1:  # return: the wait goes on, until a second signal raises
            timers.append(threading.Timer(0.02, send_signal))
            timers[-1].start()
        else:
            raise Interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        timers.append(threading.Timer(0.02, send_signal))
        timers[0].start()
        with pytest.raises(Interrupted):
            wait()
    finally:
        for timer in timers:
            timer.join()
        signal.signal(signal.SIGUSR1, previous)
    assert calls == [signal.SIGUSR1, signal.SIGUSR1]
