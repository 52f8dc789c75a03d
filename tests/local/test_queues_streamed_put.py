"""A streamed message (bigger than a quarter of the ring) and put's block/timeout.

A put that may give up must do so before it writes anything: never a
``queue.Full`` half way through a message, which would lose it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

import pytest

from fabric.local.queues import Queue

CAPACITY = 64 * 1024  # streamed: anything above 16 KiB


NONBLOCKING: dict[str, Callable[[Queue, object], None]] = {
    "put_nowait": lambda q, m: q.put_nowait(m),
    "block=False": lambda q, m: q.put(m, block=False),
    "timeout": lambda q, m: q.put(m, timeout=0.05),
}


@pytest.mark.parametrize("how", NONBLOCKING)
def test_full_before_any_piece_is_written_when_the_ring_lacks_room(how: str) -> None:
    put = NONBLOCKING[how]
    with Queue(capacity=CAPACITY) as q:
        fillers = [os.urandom(12_000) for _ in range(3)]  # ~36 KiB used
        for f in fillers:
            q.put(f)
        big = os.urandom(40_000)  # its first piece would fit, the whole would not
        with pytest.raises(queue.Full):
            put(q, big)
        s = q.statistics()
        assert (s.depth, s.puts, s.abandoned) == (3, 3, 0)
        assert [q.get(timeout=5) for _ in fillers] == fillers
        put(q, big)  # room now: it goes through whole
        assert q.get(timeout=5) == big
        assert q.statistics().abandoned == 0


def test_a_message_larger_than_the_ring_is_full_at_once_without_blocking() -> None:
    with Queue(capacity=CAPACITY) as q:
        huge = os.urandom(3 * CAPACITY)
        for put in (q.put_nowait, lambda m: q.put(m, block=False)):
            with pytest.raises(queue.Full):
                put(huge)
        s = q.statistics()
        assert (s.depth, s.puts, s.bytes_used, s.abandoned) == (0, 0, 0, 0)
        q.put_nowait(b"still usable")
        assert q.get(timeout=5) == b"still usable"


def test_a_timed_put_larger_than_the_ring_finishes_once_started() -> None:
    with Queue(capacity=CAPACITY) as q:
        huge = os.urandom(3 * CAPACITY)
        got: list[bytes] = []
        deadline_passed = threading.Event()

        def late_consumer() -> None:
            # start reading only after the put's timeout has expired
            deadline_passed.wait(0.3)
            got.append(q.get(timeout=30))

        t = threading.Thread(target=late_consumer)
        t.start()
        q.put(huge, timeout=0.1)  # starts at once, so it must not give up half way
        t.join(30)
        assert got == [huge]
        assert q.statistics().abandoned == 0
