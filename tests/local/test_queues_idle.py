"""A blocked get spins only briefly, then sleeps: an idle consumer uses no CPU."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator

import pytest

from fabric.local import Pipe, Queue, SimpleQueue

WAIT_S = 0.5


@pytest.fixture(params=["Queue", "SimpleQueue", "Pipe"])
def blocked_get(request: pytest.FixtureRequest) -> Iterator[Callable[[], None]]:
    """A call that blocks for WAIT_S on an empty queue or pipe, then raises."""
    if request.param == "Pipe":
        a, b = Pipe()
        with a, b:

            def recv() -> None:
                with pytest.raises(TimeoutError):
                    b.recv(timeout=WAIT_S)

            yield recv
        return
    q = Queue() if request.param == "Queue" else SimpleQueue()

    def get() -> None:
        with pytest.raises(queue.Empty):
            q.get(timeout=WAIT_S)

    yield get
    q.close()


def test_an_idle_blocked_get_uses_almost_no_cpu(blocked_get: Callable[[], None]) -> None:
    for _ in range(3):  # whatever the adaptive spin budget has become
        cpu = time.thread_time()
        blocked_get()
        # the spin is bounded at 100 us per wait; the rest is a futex sleep
        assert time.thread_time() - cpu < WAIT_S / 10
