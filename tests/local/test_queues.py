"""Queue, JoinableQueue and SimpleQueue: queue.Queue semantics, MPMC, crash-free edges."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fabric.local.queues import JoinableQueue, Queue, SimpleQueue

CTX = multiprocessing.get_context("fork")


@pytest.fixture(params=["fabric", "stdlib"])
def any_queue(request: pytest.FixtureRequest) -> Iterator[type]:
    """Parity: the same test against queue.Queue (where the two agree)."""
    yield Queue if request.param == "fabric" else queue.Queue


def test_fifo_order_and_qsize(any_queue: type) -> None:
    q = any_queue()
    for i in range(100):
        q.put(i)
    assert q.qsize() == 100
    assert not q.empty()
    assert [q.get() for _ in range(100)] == list(range(100))
    assert q.empty()


def test_get_nowait_and_timeout_raise_empty(any_queue: type) -> None:
    q = any_queue()
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)
    with pytest.raises(queue.Empty):
        q.get(False)


def test_maxsize_counts_items_and_raises_full(any_queue: type) -> None:
    q = any_queue(maxsize=2)
    q.put(1)
    q.put_nowait(2)
    assert q.full()
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.01)
    assert q.get() == 1
    q.put(3)
    assert [q.get(), q.get()] == [2, 3]


def test_negative_timeout_is_a_value_error(any_queue: type) -> None:
    q = any_queue()
    with pytest.raises(ValueError):
        q.get(timeout=-1)


def test_blocked_put_wakes_when_a_consumer_takes() -> None:
    q = Queue(maxsize=1)
    q.put("a")
    t = threading.Thread(target=q.put, args=("b",))
    t.start()
    assert q.get(timeout=10) == "a"
    assert q.get(timeout=10) == "b"
    t.join(10)
    assert not t.is_alive()


def test_blocked_get_wakes_on_put_from_another_thread() -> None:
    q = Queue()
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=30)))
    t.start()
    q.put("hello")
    t.join(30)
    assert got == ["hello"]


def test_message_types_round_trip() -> None:
    q = Queue()
    items = [b"raw", bytearray(b"ba"), "s", 1, 2.5, None, (1, "a"), {"k": [1, 2]}, b"", 10**30]
    for item in items:
        q.put(item)
    out = [q.get() for _ in items]
    assert out == items
    assert [type(x) for x in out] == [type(x) for x in items]


def test_unpicklable_raises_at_put_and_queue_stays_usable() -> None:
    q = Queue()
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        q.put(lambda: 1)
    with pytest.raises(TypeError):
        q.put(threading.Lock())
    q.put("fine")
    assert q.get_nowait() == "fine"
    assert q.qsize() == 0


def test_numpy_array_round_trips_writable_and_equal() -> None:
    q = Queue()
    a = np.arange(100_000, dtype=np.float64).reshape(100, 1000)
    q.put(a)
    b = q.get(timeout=10)
    assert b.shape == a.shape and b.dtype == a.dtype
    assert np.array_equal(a, b)
    b[0, 0] = -1  # a private, writable copy
    assert a[0, 0] == 0


def _consume_all(q: Queue, n: int, out: Queue) -> None:
    out.put([q.get(timeout=30) for _ in range(n)])


@pytest.mark.parametrize("size", [70_000, 3_000_000])
def test_messages_larger_than_the_ring_go_through(size: int) -> None:
    q = Queue(capacity=64 * 1024)
    out = Queue()
    payloads = [os.urandom(size), np.frombuffer(os.urandom(size), dtype=np.uint8), b"tiny"]
    p = CTX.Process(target=_consume_all, args=(q, 3, out))
    p.start()
    for item in payloads:
        q.put(item, timeout=30)
    got = out.get(timeout=60)
    p.join(30)
    assert got[0] == payloads[0]
    assert np.array_equal(got[1], payloads[1])
    assert got[2] == b"tiny"


def _producer(q: Queue, pid: int, n: int) -> None:
    for i in range(n):
        q.put((pid, i, b"x" * (i % 200)))


def _consumer(q: Queue, out: Queue) -> None:
    seen = []
    while True:
        item = q.get(timeout=30)
        if item is None:
            break
        seen.append(item[:2])
    out.put(seen)


def test_mpmc_across_processes_every_message_exactly_once() -> None:
    q, out = Queue(capacity=16 * 1024), Queue()
    producers, consumers, n = 3, 3, 3000
    procs = [CTX.Process(target=_producer, args=(q, p, n)) for p in range(producers)]
    procs += [CTX.Process(target=_consumer, args=(q, out)) for _ in range(consumers)]
    for p in procs:
        p.start()
    for p in procs[:producers]:
        p.join(60)
    for _ in range(consumers):
        q.put(None)
    seen = [item for _ in range(consumers) for item in out.get(timeout=60)]
    for p in procs[producers:]:
        p.join(60)
    assert sorted(seen) == sorted((p, i) for p in range(producers) for i in range(n))
    # each producer's messages stay in order whoever consumes them
    assert q.statistics().abandoned == 0


def test_mpmc_across_threads_every_message_exactly_once() -> None:
    q = Queue(capacity=8 * 1024)
    n, workers = 2000, 4
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def consume() -> None:
        while (item := q.get(timeout=30)) is not None:
            with lock:
                seen.append(item)

    threads = [threading.Thread(target=consume) for _ in range(workers)]
    producers = [
        threading.Thread(target=lambda p=p: [q.put((p, i)) for i in range(n)])
        for p in range(workers)
    ]
    for t in threads + producers:
        t.start()
    for t in producers:
        t.join(60)
    for _ in threads:
        q.put(None)
    for t in threads:
        t.join(60)
    assert sorted(seen) == sorted((p, i) for p in range(workers) for i in range(n))


def _put_and_exit(q: Queue) -> None:
    q.put(b"z" * 100_000)
    q.put("last words")
    os._exit(0)  # no flush, no atexit: the messages must already be in the ring


def test_producer_exiting_right_after_put_loses_nothing() -> None:
    q = Queue()
    p = CTX.Process(target=_put_and_exit, args=(q,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert q.get(timeout=5) == b"z" * 100_000
    assert q.get(timeout=5) == "last words"


def test_queue_travels_through_a_queue() -> None:
    outer, inner = Queue(), Queue()
    outer.put(inner)
    inner2 = outer.get(timeout=5)
    inner2.put("via copy")
    assert inner.get(timeout=5) == "via copy"


def test_put_many_get_many_keep_order() -> None:
    q = Queue()
    q.put_many(range(1000))
    got: list[int] = []
    while len(got) < 1000:
        got += q.get_many(timeout=5, max_messages_to_get=300)
    assert got == list(range(1000))
    with pytest.raises(queue.Empty):
        q.get_many(timeout=0.01)


def test_close_rejects_later_calls_on_that_handle_only() -> None:
    q = Queue()
    other = pickle.loads(pickle.dumps(q))
    q.close()
    with pytest.raises(ValueError):
        q.put(1)
    with pytest.raises(ValueError):
        q.get_nowait()
    q.join_thread()
    q.cancel_join_thread()
    other.put(1)
    assert other.get() == 1


def test_joinable_queue_task_done_and_join() -> None:
    q = JoinableQueue()
    q.put(1)
    q.put(2)
    with pytest.raises(TimeoutError):
        q.join(timeout=0.01)
    done = threading.Event()

    def worker() -> None:
        for _ in range(2):
            q.get(timeout=10)
            q.task_done()
        done.set()

    t = threading.Thread(target=worker)
    t.start()
    q.join(timeout=30)
    assert done.wait(10)
    t.join(10)
    with pytest.raises(ValueError):
        q.task_done()


def test_joinable_queue_parity_with_stdlib_on_too_many_task_done() -> None:
    for q in (JoinableQueue(), queue.Queue()):
        q.put(1)
        q.get()
        q.task_done()
        with pytest.raises(ValueError):
            q.task_done()


def test_simple_queue() -> None:
    q = SimpleQueue()
    assert q.empty()
    q.put((1, 2))
    assert not q.empty()
    assert q.get() == (1, 2)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)
    q.close()
    with pytest.raises(ValueError):
        q.put(1)


def test_statistics_are_exact() -> None:
    q = Queue(maxsize=10, capacity=8192)
    for i in range(3):
        q.put(i)
    q.get()
    s = q.statistics()
    assert (s.depth, s.capacity, s.maxsize, s.puts, s.gets) == (2, 8192, 10, 3, 1)
    assert s.bytes_used > 0


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Queue(capacity=10)
    with pytest.raises(TypeError, match="maxsize"):
        Queue(maxsize="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Queue().get_many(max_messages_to_get=0)


def _echo(inbox: Queue, outbox: Queue) -> None:
    outbox.put(("got", inbox.get(timeout=30)))


def test_queue_reaches_children_under_every_start_method(ctx: Any) -> None:
    inbox, outbox = ctx.Queue(), ctx.JoinableQueue()
    p = ctx.Process(target=_echo, args=(inbox, outbox))
    p.start()
    inbox.put(np.arange(5))
    kind, arr = outbox.get(timeout=30)
    p.join(30)
    assert p.exitcode == 0
    assert kind == "got" and np.array_equal(arr, np.arange(5))


def _work_and_mark_done(q: JoinableQueue, n: int) -> None:
    for _ in range(n):
        q.get(timeout=30)
        q.task_done()


def test_joinable_queue_join_across_processes(ctx: Any) -> None:
    q = ctx.JoinableQueue()
    workers = [ctx.Process(target=_work_and_mark_done, args=(q, 50)) for _ in range(2)]
    for w in workers:
        w.start()
    q.put_many(range(100))
    q.join(timeout=60)
    assert q.statistics().unfinished == 0
    for w in workers:
        w.join(30)
    assert [w.exitcode for w in workers] == [0, 0]
