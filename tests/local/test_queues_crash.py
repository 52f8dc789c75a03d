"""Queues under kill -9 and the early-``Empty`` hunt (design.md: faster-fifo's bug)."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import queue
import random
import signal
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.local import _ring
from fabric.local.queues import Queue

CTX = multiprocessing.get_context("fork")


def _message(i: int, rng: random.Random) -> tuple[int, bytes, bytes]:
    size = rng.choice([16, 200, 5_000, 40_000, 150_000])  # some larger than the ring
    body = rng.randbytes(size)
    return i, body, hashlib.blake2b(body, digest_size=8).digest()


def _consume_and_report(q: Queue, done: Queue, started: threading.Event) -> None:
    started.set()
    while True:
        i, body, digest = q.get(timeout=30)
        ok = hashlib.blake2b(body, digest_size=8).digest() == digest
        done.put((i, ok))


def _kill_consumers(iterations: int, seed: int) -> None:
    rng = random.Random(seed)
    q, done = Queue(capacity=64 * 1024), Queue()
    total = iterations * 12
    messages = [_message(i, rng) for i in range(total)]

    def produce() -> None:
        for m in messages:
            q.put(m, timeout=60)

    producer = threading.Thread(target=produce)
    producer.start()
    kills = 0
    for _ in range(iterations):
        started = CTX.Event()
        p = CTX.Process(target=_consume_and_report, args=(q, done, started))
        p.start()
        assert started.wait(30)
        # fault injection: a seeded random moment inside the consumer's loop
        time.sleep(rng.uniform(0, 0.004))
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        p.join(30)
        kills += 1
    seen: list[tuple[int, bool]] = []
    while True:  # what the killed consumers reported
        try:
            seen.append(done.get_nowait())
        except queue.Empty:
            break
    left = []  # then drain the rest here while the producer finishes
    while producer.is_alive() or q.qsize():
        with contextlib.suppress(queue.Empty):
            left.append(q.get(timeout=0.2))
    producer.join(60)
    assert all(ok for _, ok in seen), "a consumer read a mangled message"
    for i, body, digest in left:
        assert hashlib.blake2b(body, digest_size=8).digest() == digest, f"message {i} mangled"
    ids = [i for i, _ in seen] + [m[0] for m in left]
    assert len(ids) == len(set(ids)), "a message was delivered twice"
    assert set(ids) <= set(range(total))
    lost = total - len(ids)
    assert lost <= kills, f"{lost} messages lost to {kills} kills"
    assert q.qsize() == 0 and done.qsize() == 0


def test_sigkill_consumer_at_random_points_loses_at_most_the_one_in_hand() -> None:
    _kill_consumers(iterations=25, seed=1234)


@pytest.mark.slow
def test_sigkill_consumer_soak() -> None:
    for seed in range(8):
        _kill_consumers(iterations=40, seed=seed)


def _claim_then_die(q: Queue) -> None:
    _ring._die_at("claimed")  # SIGKILL right after the claim, before anything else
    q.get(timeout=30)


@pytest.mark.parametrize("size", [100, 40_000], ids=["whole", "streamed"])
def test_consumer_killed_right_after_its_claim_leaves_qsize_exact(size: int) -> None:
    # The soak's rare hang: its drain loop waited for a qsize that stayed 1.
    q = Queue(maxsize=1, capacity=64 * 1024)  # 40 kB: three fragments
    q.put(b"m" * size)
    p = CTX.Process(target=_claim_then_die, args=(q,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert q.qsize() == 0  # the message it had in hand is lost and counted out
    with pytest.raises(queue.Empty):
        q.get_nowait()
    q.put_nowait(b"after")  # maxsize=1: the lost message holds no slot
    assert q.get(timeout=5) == b"after"
    assert q.qsize() == 0


def _produce_forever(q: Queue, started: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    started.set()
    i = 0
    while True:
        q.put(_message(i, rng))
        i += 1


def test_sigkill_producer_mid_put_leaves_the_queue_usable() -> None:
    rng = random.Random(99)
    q = Queue(capacity=64 * 1024)
    for seed in range(10):
        started = CTX.Event()
        p = CTX.Process(target=_produce_forever, args=(q, started, seed))
        p.start()
        assert started.wait(30)
        time.sleep(rng.uniform(0, 0.004))  # fault injection: kill at a random moment
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        p.join(30)
        got = []
        while True:
            try:
                got.append(q.get(timeout=0.5))
            except queue.Empty:
                break
        for _i, body, digest in got:
            assert hashlib.blake2b(body, digest_size=8).digest() == digest
        assert [m[0] for m in got] == list(range(len(got)))  # in order, no gap, no repeat
    q.put("still works")
    assert q.get(timeout=5) == "still works"


def _timed_getter(q: Queue, n: int, results: Queue) -> None:
    got = []
    for _ in range(n):
        try:
            got.append(len(q.get(timeout=60)))
        except queue.Empty:
            results.put(("early Empty", got))
            return
    results.put(("ok", got))


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    sizes=st.lists(st.sampled_from([1, 100, 70_000, 1 << 20, 3 << 20]), min_size=2, max_size=8),
    consumers=st.integers(min_value=2, max_value=3),
)
def test_timed_get_never_gives_up_while_a_message_is_queued(
    sizes: list[int], consumers: int
) -> None:
    q, results = Queue(capacity=256 * 1024), Queue()
    sizes = sizes * consumers  # every consumer gets the same number
    per = len(sizes) // consumers
    procs = [CTX.Process(target=_timed_getter, args=(q, per, results)) for _ in range(consumers)]
    for p in procs:
        p.start()
    for s in sizes:
        q.put(b"m" * s, timeout=60)
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert [o[0] for o in outcomes] == ["ok"] * consumers
    assert sorted(n for _, got in outcomes for n in got) == sorted(sizes)
