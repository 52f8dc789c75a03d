"""Proxy semantics against an in-process host: each proxy behaves like the type it mirrors."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from fabric.remote._errors import LeaseLostError, OwnerLostWarning
from tests.remote._inproc import InprocClient, InprocHost


@pytest.fixture
def hub() -> Iterator[InprocHost]:
    with InprocHost() as hub:
        yield hub


@pytest.fixture
def a(hub: InprocHost) -> InprocClient:
    return hub.client("a" * 16)


@pytest.fixture
def b(hub: InprocHost) -> InprocClient:
    return hub.client("b" * 16)


class Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x


def test_dict_behaves_like_a_dict(a: InprocClient, b: InprocClient) -> None:
    d, same = a.new("dict", name="d"), b.new("dict", name="d")
    d["p"] = Point(1)
    d.update({"n": 1}, m=2)
    assert same["p"] == Point(1) and "n" in same and len(same) == 3
    assert same.get("zz", 9) == 9 and same.setdefault("n", 5) == 1
    assert sorted(same.keys()) == ["m", "n", "p"]
    assert same.pop("m") == 2 and same.pop("m", None) is None
    with pytest.raises(KeyError):
        same["missing"]
    del d["p"]
    assert same == {"n": 1} and same.copy() == {"n": 1}


def test_list_behaves_like_a_list(a: InprocClient) -> None:
    lst = a.new("list")
    lst.extend([3, 1, 2])
    lst.append(Point(0))
    lst.remove(Point(0))
    lst += [5]
    assert lst[1:3] == [1, 2] and lst[-1] == 5 and 2 in lst and lst.index(2) == 2
    lst.sort(reverse=True)
    assert list(lst) == [5, 3, 2, 1]
    lst.sort(key=lambda v: v % 3)
    assert lst.copy() == [3, 1, 2, 5][:0] + sorted([5, 3, 2, 1], key=lambda v: v % 3)
    lst[0:2] = ["x"]
    assert lst.pop(0) == "x" and len(lst) == 2


def test_queue_blocks_times_out_and_is_fifo_across_clients(
    a: InprocClient, b: InprocClient
) -> None:
    q = a.new("Queue", 2, name="q")
    other = b.new("Queue", 2, name="q")
    q.put(1)
    q.put(2)
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.05)
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.extend(other.get() for _ in range(3)))
    reader.start()
    q.put(3, timeout=5)
    reader.join(5)
    assert got == [1, 2, 3] and q.empty() and q.qsize() == 0
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_joinable_queue_join_waits_for_task_done(a: InprocClient) -> None:
    q = a.new("JoinableQueue")
    q.put("job")
    with pytest.raises(TimeoutError):
        q.join(timeout=0.05)
    joined = threading.Event()

    def join() -> None:
        q.join(timeout=5)
        joined.set()

    waiter = threading.Thread(target=join)
    waiter.start()
    assert q.get() == "job"
    q.task_done()
    waiter.join(5)
    assert joined.is_set()
    with pytest.raises(ValueError, match="too many"):
        q.task_done()


def test_lock_excludes_other_clients(a: InprocClient, b: InprocClient) -> None:
    lock = a.new("Lock", name="L")
    theirs = b.new("Lock", name="L")
    with lock:
        assert theirs.locked() and not theirs.acquire(timeout=0.05)
        assert not theirs.acquire(False)
    assert theirs.acquire(block=True, timeout=1)
    theirs.release()
    with pytest.raises(RuntimeError):
        lock.release()


def test_rlock_is_reentrant_and_owned_by_one_thread(a: InprocClient) -> None:
    rlock = a.new("RLock")
    assert rlock.acquire() and rlock.acquire()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            rlock.release()
        except RuntimeError as exc:
            errors.append(exc)
        assert not rlock.acquire(timeout=0.05)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(5)
    assert len(errors) == 1
    rlock.release()
    rlock.release()
    assert not rlock.locked()


def test_a_lock_of_a_dead_client_passes_on_with_a_warning(a: InprocClient, b: InprocClient) -> None:
    lock, theirs = a.new("Lock", name="L"), b.new("Lock", name="L")
    assert lock.acquire()
    a.close()  # the session dies holding the lock
    with pytest.warns(OwnerLostWarning):
        assert theirs.acquire(timeout=5)
    assert theirs.owner_lost
    with pytest.raises(LeaseLostError):
        lock.release()


def test_semaphores(a: InprocClient) -> None:
    sem = a.new("Semaphore", 2)
    assert sem.acquire() and sem.acquire() and not sem.acquire(timeout=0.05)
    sem.release(2)
    assert sem.get_value() == 2
    bounded = a.new("BoundedSemaphore", 1)
    with pytest.raises(ValueError, match="too many"):
        bounded.release()


def test_event_wakes_waiters(a: InprocClient, b: InprocClient) -> None:
    event = a.new("Event", name="e")
    assert not event.wait(0.05)
    seen: list[bool] = []
    waiter = threading.Thread(target=lambda: seen.append(b.new("Event", name="e").wait(5)))
    waiter.start()
    event.set()
    waiter.join(5)
    assert seen == [True] and event.is_set()
    event.clear()
    assert not event.is_set()


def test_condition_notify_and_wait_for(a: InprocClient, b: InprocClient) -> None:
    cond = a.new("Condition", name="c")
    box = a.new("list", name="box")
    results: list[Any] = []

    def consumer() -> None:
        theirs = b.new("Condition", name="c")
        their_box = b.new("list", name="box")
        with theirs:
            results.append(theirs.wait_for(lambda: len(their_box) > 0, timeout=5))

    thread = threading.Thread(target=consumer)
    thread.start()
    with cond:
        box.append("item")
        cond.notify_all()
    thread.join(5)
    assert results == [True]
    with cond:
        assert cond.wait(0.05) is False
    with pytest.raises(RuntimeError):
        cond.notify()


def test_barrier_releases_all_parties_and_breaks_on_timeout(a: InprocClient) -> None:
    barrier = a.new("Barrier", 2)
    indexes: list[int] = []
    thread = threading.Thread(target=lambda: indexes.append(barrier.wait(5)))
    thread.start()
    indexes.append(barrier.wait(5))
    thread.join(5)
    assert sorted(indexes) == [0, 1] and barrier.parties == 2
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(0.05)
    assert barrier.broken
    barrier.reset()
    assert not barrier.broken and barrier.n_waiting == 0


def test_value_array_and_namespace(a: InprocClient) -> None:
    value = a.new("Value", "i", 3)
    value.value += 4
    assert value.get() == 7
    with pytest.raises(TypeError):
        value.value = "x"
    array = a.new("Array", "d", [0.5, 1.5])
    array[0] = 2.0
    array[0:2] = [3.0, 4.0]
    assert array.tolist() == [3.0, 4.0] and len(array) == 2 and array[1] == 4.0
    ns = a.new("Namespace")
    ns.x = Point(3)
    assert ns.x == Point(3)
    del ns.x
    with pytest.raises(AttributeError):
        _ = ns.x
