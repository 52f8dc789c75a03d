"""Pipe/Connection parity with multiprocessing.Pipe, EOF on close and on death, wait()."""

from __future__ import annotations

import array
import asyncio
import gc
import multiprocessing
import os
import pickle
import selectors
import signal
import threading
from typing import Any

import numpy as np
import pytest

from fabric.local.connection import Pipe, wait
from fabric.local.queues import Queue

CTX = multiprocessing.get_context("fork")


@pytest.fixture(params=["fabric", "stdlib"])
def pipe(request: pytest.FixtureRequest) -> Any:
    """Parity: the same test against multiprocessing.Pipe."""
    return Pipe if request.param == "fabric" else multiprocessing.Pipe


def test_send_recv_both_ways(pipe: Any) -> None:
    a, b = pipe()
    a.send({"x": [1, 2]})
    assert b.recv() == {"x": [1, 2]}
    b.send((1, "y"))
    assert a.recv() == (1, "y")
    a.close()
    b.close()


def test_bound_methods_keep_their_ends_open(pipe: Any) -> None:
    def methods() -> tuple[Any, ...]:
        a, b = pipe()
        return a.send, a.send_bytes, b.recv, b.recv_bytes, b.close

    send, send_bytes, recv, recv_bytes, close_b = methods()
    gc.collect()  # only the bound methods hold the ends now
    send((1, "x"))
    send_bytes(b"raw")
    assert (recv(), recv_bytes()) == ((1, "x"), b"raw")
    close_b()
    with pytest.raises(OSError):
        recv()
    with pytest.raises(OSError):
        recv_bytes()


def test_send_bytes_offset_size_and_recv_bytes_into(pipe: Any) -> None:
    a, b = pipe()
    a.send_bytes(b"0123456789", 2, 5)
    assert b.recv_bytes() == b"23456"
    a.send_bytes(bytearray(b"abc"))
    buf = bytearray(10)
    assert b.recv_bytes_into(buf, 4) == 3
    assert bytes(buf[4:7]) == b"abc"
    a.send_bytes(array.array("i", [1, 2, 3]))
    assert b.recv_bytes() == array.array("i", [1, 2, 3]).tobytes()
    for bad in [(-1, None), (11, None), (0, -1), (5, 6)]:
        with pytest.raises(ValueError):
            a.send_bytes(b"0123456789", *bad)
    a.close()
    b.close()


def test_recv_bytes_into_too_short_raises_buffer_too_short(pipe: Any) -> None:
    a, b = pipe()
    a.send_bytes(b"x" * 20)
    with pytest.raises(multiprocessing.BufferTooShort) as info:
        b.recv_bytes_into(bytearray(5))
    assert info.value.args[0] == b"x" * 20
    a.close()
    b.close()


def test_recv_bytes_maxlength(pipe: Any) -> None:
    a, b = pipe()
    a.send_bytes(b"x" * 20)
    with pytest.raises(OSError):
        b.recv_bytes(10)
    a.close()
    b.close()


def test_poll_and_eof_after_close(pipe: Any) -> None:
    a, b = pipe()
    assert not b.poll()
    assert not b.poll(0.01)
    a.send(1)
    assert b.poll(5)
    assert b.recv() == 1
    a.send(2)
    a.close()
    assert b.recv() == 2  # queued data first, then EOF
    assert b.poll(5)
    with pytest.raises(EOFError):
        b.recv()
    b.close()


def test_closed_readable_writable_and_closed_handle(pipe: Any) -> None:
    r, w = pipe(duplex=False)
    assert (r.readable, r.writable, w.readable, w.writable) == (True, False, False, True)
    with pytest.raises(OSError):
        r.send(1)
    with pytest.raises(OSError):
        w.recv()
    r.close()
    assert r.closed
    with pytest.raises(OSError):
        r.recv()
    r.close()  # idempotent
    w.close()


def test_send_to_a_closed_reader_is_broken_pipe() -> None:
    r, w = Pipe(duplex=False)
    r.close()
    with pytest.raises(BrokenPipeError):
        w.send(1)
    w.close()


def test_unpicklable_raises_at_send_and_pipe_stays_usable() -> None:
    a, b = Pipe()
    with pytest.raises(TypeError):
        a.send(threading.Lock())
    a.send("ok")
    assert b.recv() == "ok"
    a.close()
    b.close()


def test_recv_timeout_is_an_addition() -> None:
    a, b = Pipe()
    with pytest.raises(TimeoutError):
        b.recv(timeout=0.01)
    a.close()
    b.close()


def _echo_child(conn: Any) -> None:
    while (msg := conn.recv()) is not None:
        conn.send(msg)


def test_child_echo_then_eof_when_the_child_exits(ctx: Any) -> None:
    a, b = Pipe()
    p = ctx.Process(target=_echo_child, args=(b,))
    p.start()
    b.close()  # the child holds its own copy
    big = np.random.default_rng(0).random(300_000)  # larger than the ring
    for msg in ["hi", big, b"raw"]:
        a.send(msg)
        back = a.recv()
        assert np.array_equal(back, msg) if isinstance(msg, np.ndarray) else back == msg
    a.send(None)
    p.join(30)
    assert p.exitcode == 0
    with pytest.raises(EOFError):
        a.recv()
    a.close()


def _recv_until_eof(conn: Any, out: Any) -> None:
    got = []
    try:
        while True:
            got.append(conn.recv())
    except EOFError:
        out.put(got)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_child_sees_eof_when_the_parent_closes_its_end(method: str) -> None:
    # (under fork the child inherits the parent's end too, so, as with
    # multiprocessing's file descriptors, it would wait for itself)
    from fabric.local import get_context

    ctx = get_context(method)
    a, b = Pipe()
    out = Queue()
    p = ctx.Process(target=_recv_until_eof, args=(b, out))
    p.start()
    b.close()
    a.send(1)
    a.send(2)
    a.close()
    assert out.get(timeout=30) == [1, 2]
    p.join(30)


def _hold_and_wait(conn: Any, ready: Any) -> None:
    ready.set()
    conn.recv()  # never answered: the parent kills us


def test_eof_when_the_peer_process_is_killed() -> None:
    a, b = Pipe()
    ready = CTX.Event()
    p = CTX.Process(target=_hold_and_wait, args=(b, ready))
    p.start()
    b.close()
    assert ready.wait(30)
    os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
    p.join(30)
    with pytest.raises(EOFError):
        a.recv()
    a.close()


def test_connection_travels_through_a_queue() -> None:
    a, b = Pipe()
    q = Queue()
    q.put(b)
    b2 = q.get(timeout=5)
    a.send("through")
    assert b2.recv() == "through"
    assert pickle.loads(pickle.dumps(a)).writable
    for c in (a, b, b2):
        c.close()


def test_wait_over_connections_queues_and_sentinels() -> None:
    a, b = Pipe()
    q = Queue()
    p = CTX.Process(target=_hold_and_wait, args=(b, CTX.Event()))
    assert wait([b, q], timeout=0.01) == []
    a.send(1)
    assert wait([b, q], timeout=5) == [b]
    b.recv()
    q.put("x")
    assert wait([b, q], timeout=5) == [q]
    q.get()
    p.start()
    p.kill()
    assert wait([b, q, p.sentinel], timeout=30) == [p.sentinel]
    p.join(30)
    woke = threading.Timer(0.05, a.send, args=(2,))  # cross-thread wake while blocked
    woke.start()
    assert wait([b, q], timeout=30) == [b]
    woke.join()
    for c in (a, b):
        c.close()


def test_fileno_works_with_selectors_and_asyncio() -> None:
    a, b = Pipe()
    sel = selectors.DefaultSelector()
    sel.register(b.fileno(), selectors.EVENT_READ)
    assert sel.select(timeout=0.01) == []
    a.send("ping")
    assert len(sel.select(timeout=5)) == 1
    assert b.recv() == "ping"
    assert sel.select(timeout=0.05) == []  # re-armed: nothing more waits
    sel.close()

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.add_reader(b.fileno(), lambda: fut.done() or fut.set_result(b.recv()))
        a.send("async")
        try:
            return await asyncio.wait_for(fut, 10)
        finally:
            loop.remove_reader(b.fileno())

    assert asyncio.run(main()) == "async"
    a.close()
    b.close()
