"""LazyFuture: the Executor's Future behaves as concurrent.futures.Future, waiters and all."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import (
    FIRST_COMPLETED,
    CancelledError,
    Future,
    InvalidStateError,
    as_completed,
    wait,
)
from typing import Any

import pytest

from fabric.local._future import LazyFuture


def test_is_a_future_and_finishes_without_a_condition() -> None:
    future: LazyFuture[int] = LazyFuture()
    assert isinstance(future, Future)
    assert future.set_running_or_notify_cancel()
    assert future.running()
    future._cond = None  # running() made one; the fast path is what this test is about
    future.set_result(3)
    assert future._cond is None
    assert future.done() and future.result() == 3 and future.exception() is None


def test_exception_and_double_set() -> None:
    future: LazyFuture[int] = LazyFuture()
    error = ValueError("boom")
    future.set_exception(error)
    with pytest.raises(ValueError, match="boom"):
        future.result()
    assert future.exception() is error
    with pytest.raises(InvalidStateError):
        future.set_result(1)


def test_callbacks_before_and_after_completion() -> None:
    seen: list[Any] = []
    future: LazyFuture[int] = LazyFuture()
    future.add_done_callback(lambda f: seen.append(("before", f.result())))
    future.set_result(5)
    future.add_done_callback(lambda f: seen.append(("after", f.result())))
    assert seen == [("before", 5), ("after", 5)]


def test_cancel_before_running_refuses_to_run() -> None:
    future: LazyFuture[int] = LazyFuture()
    assert future.cancel()
    assert not future.set_running_or_notify_cancel()
    with pytest.raises(CancelledError):
        future.result(timeout=0)
    with pytest.raises(InvalidStateError):
        future.set_result(1)


def test_a_blocked_waiter_is_woken_by_a_fast_path_setter() -> None:
    for _ in range(200):  # the waiter and the setter race for the first condition
        future: LazyFuture[int] = LazyFuture()
        started = threading.Event()
        got: list[int] = []

        def waiter(f: LazyFuture[int], s: threading.Event, out: list[int]) -> None:
            s.set()
            out.append(f.result(timeout=10))

        thread = threading.Thread(target=waiter, args=(future, started, got))
        thread.start()
        started.wait(10)
        future.set_running_or_notify_cancel()
        future.set_result(7)
        thread.join(10)
        assert got == [7]


def test_wait_and_as_completed() -> None:
    futures: list[LazyFuture[int]] = [LazyFuture() for _ in range(4)]
    setter = threading.Timer(0.0, lambda: futures[2].set_result(2))
    setter.start()
    try:
        done, _ = wait(futures, timeout=10, return_when=FIRST_COMPLETED)
        assert done == {futures[2]}
    finally:
        setter.join()
    for i, f in enumerate(futures):
        if i != 2:
            f.set_result(i)
    assert sorted(f.result() for f in as_completed(futures, timeout=10)) == [0, 1, 2, 3]


def test_asyncio_wraps_it() -> None:
    future: LazyFuture[int] = LazyFuture()
    setter = threading.Thread(target=future.set_result, args=(9,))

    async def main() -> int:
        asyncio.get_running_loop().call_soon(setter.start)
        return await asyncio.wrap_future(future)

    try:
        assert asyncio.run(main()) == 9
    finally:
        setter.join(10)


def test_settle_finishes_and_a_cancelled_future_ignores_it() -> None:
    done: LazyFuture[int] = LazyFuture()
    done.settle(False, KeyError("k"))
    assert isinstance(done.exception(), KeyError)
    cancelled: LazyFuture[int] = LazyFuture()
    assert cancelled.cancel()
    cancelled.settle(True, 1)
    assert cancelled.cancelled()
