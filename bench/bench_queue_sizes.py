"""Queue throughput against message size, and the ping-pong latency distribution.

fabric's shared-memory ``Queue`` against ``multiprocessing.Queue``,
``faster_fifo.Queue`` and a ZeroMQ PUSH/PULL pair over ``ipc://``, all moving
``bytes`` from one forked producer to the parent: for each size from 64 B to
4 MiB, the clock starts when the producer is connected and told to go, and
stops when the parent holds every message (each one's length checked). The
ping-pong sends a 64-byte message to a forked echo process and back through
two channels, one sample per round trip. Each round measures every candidate
once, so a burst of load from other jobs hits them alike. faster-fifo is
optional: if it is missing its rows say so instead of being faked.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fabric.local
from bench._harness import Stats, Table
from bench._plots import Lines, Samples

SIZES = [64 << (2 * i) for i in range(9)]  # 64 B .. 4 MiB by x4
BYTES_PER_RUN = 64 << 20
MIN_COUNT, MAX_COUNT = 32, 50_000
TABLE_SIZES = (64, 64 << 10, 4 << 20)
ROUND_TRIPS = 1_000
TIMEOUT = 120.0
BASELINE = "multiprocessing.Queue"
_mp = multiprocessing.get_context("fork")


@dataclass
class _Channel:
    """One candidate: ``make()`` in the parent, then ``sender``/``receiver`` on either side."""

    make: Callable[[], Any]
    sender: Callable[[Any], Callable[[bytes], None]]
    receiver: Callable[[Any], Callable[[], bytes]]
    close: Callable[[Any], None]
    flush: Callable[[Any], None] = lambda state: None  # in a child: deliver what it sent


def _queue(factory: Callable[[], Any]) -> _Channel:
    def close(q: Any) -> None:
        q.close()
        if hasattr(q, "join_thread"):
            q.join_thread()

    return _Channel(
        factory,
        lambda q: lambda m: q.put(m, timeout=TIMEOUT),
        lambda q: lambda: q.get(timeout=TIMEOUT),
        close,
    )


def _faster_fifo() -> _Channel:
    import faster_fifo

    # its buffer must hold the largest message whole; fabric's default 1 MiB ring streams it
    return _Channel(
        lambda: faster_fifo.Queue(max_size_bytes=2 * SIZES[-1] + 4096),
        lambda q: lambda m: q.put(m, timeout=TIMEOUT),
        lambda q: lambda: q.get(timeout=TIMEOUT),
        lambda q: q.close(),
    )


class _ZmqEnds:
    """An ipc:// address; the receiving end binds, the sending end connects."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="fabric-bench-")
        self.address = f"ipc://{self.dir}/sock"
        self.sockets: list[Any] = []

    def end(self, kind: int) -> Any:
        import zmq

        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(kind)
        sock.rcvtimeo = sock.sndtimeo = int(TIMEOUT * 1000)
        sock.linger = int(TIMEOUT * 1000)  # a sender exiting waits until its messages left
        if kind == zmq.PULL:
            sock.bind(self.address)
        else:
            sock.connect(self.address)
        self.sockets.append(sock)
        return sock


def _zmq() -> _Channel:
    import zmq

    def close(ends: _ZmqEnds) -> None:
        for sock in ends.sockets:
            sock.close(linger=0)
        Path(ends.dir, "sock").unlink(missing_ok=True)
        os.rmdir(ends.dir)

    def flush(ends: _ZmqEnds) -> None:
        # a forked child leaves through os._exit: wait until what it sent has left
        zmq.Context.instance().destroy(linger=int(TIMEOUT * 1000))

    return _Channel(
        _ZmqEnds,
        lambda e: e.end(zmq.PUSH).send,
        lambda e: e.end(zmq.PULL).recv,
        close,
        flush,
    )


def _candidates() -> tuple[dict[str, _Channel], dict[str, str]]:
    found = {
        BASELINE: _queue(_mp.Queue),
        "fabric.local.Queue": _queue(fabric.local.Queue),
        "zmq PUSH/PULL ipc": _zmq(),
    }
    missing = {}
    try:
        found["faster_fifo.Queue"] = _faster_fifo()
    except ImportError as exc:
        missing["faster_fifo.Queue"] = str(exc)
    return found, missing


# ------------------------------------------------------------------ measurements


def _produce(ch: _Channel, state: Any, size: int, count: int, go: Any, ready: Any) -> None:
    send = ch.sender(state)
    message = b"x" * size
    ready.set()
    if not go.wait(TIMEOUT):
        raise TimeoutError("never told to go")
    for _ in range(count):
        send(message)
    ch.flush(state)


def _echo(ch: _Channel, there: Any, back: Any, count: int, ready: Any) -> None:
    recv, send = ch.receiver(there), ch.sender(back)
    ready.set()
    for _ in range(count):
        send(recv())
    ch.flush(back)


def _start(target: Callable[..., None], *args: Any) -> Any:
    ready = _mp.Event()
    proc = _mp.Process(target=target, args=(*args, ready), daemon=True)
    proc.start()
    return proc, ready


def _finish(proc: Any) -> None:
    proc.join(TIMEOUT)
    if proc.exitcode != 0:
        proc.kill()
        proc.join()
        raise RuntimeError(f"a benchmark child failed (exit code {proc.exitcode})")


def _throughput(ch: _Channel, size: int) -> float:
    """MB/s of ``size``-byte messages, one producer to this process."""
    count = max(MIN_COUNT, min(MAX_COUNT, BYTES_PER_RUN // size))
    state = ch.make()
    try:
        go = _mp.Event()
        proc, ready = _start(_produce, ch, state, size, count, go)
        recv = ch.receiver(state)
        if not ready.wait(TIMEOUT):
            raise TimeoutError("the producer did not start")
        start = time.perf_counter()
        go.set()
        for _ in range(count):
            if len(recv()) != size:
                raise RuntimeError("a message arrived with the wrong length")
        elapsed = time.perf_counter() - start
        _finish(proc)
    finally:
        ch.close(state)
    return count * size / elapsed / 1e6


def _round_trips(ch: _Channel) -> list[float]:
    """Microseconds of each of ``ROUND_TRIPS`` 64-byte ping-pongs."""
    there, back = ch.make(), ch.make()
    try:
        proc, ready = _start(_echo, ch, there, back, ROUND_TRIPS + 10)
        send, recv = ch.sender(there), ch.receiver(back)
        if not ready.wait(TIMEOUT):
            raise TimeoutError("the echo process did not start")
        message = b"p" * 64
        for _ in range(10):  # warm up: connections, first page faults
            send(message)
            recv()
        times = []
        for _ in range(ROUND_TRIPS):
            start = time.perf_counter()
            send(message)
            recv()
            times.append((time.perf_counter() - start) * 1e6)
        _finish(proc)
    finally:
        ch.close(there)
        ch.close(back)
    return times


def _label(size: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def run(repeats: int) -> list[Table | Lines | Samples]:
    """Measure throughput at every size and the ping-pong; return tables and figures."""
    channels, missing = _candidates()
    rates: dict[tuple[str, int], list[float]] = {}
    trips: dict[str, list[list[float]]] = {name: [] for name in channels}
    for _ in range(repeats):
        for size in SIZES:
            for name, ch in channels.items():
                rates.setdefault((name, size), []).append(_throughput(ch, size))
        for name, ch in channels.items():
            trips[name].append(_round_trips(ch))
    absent = "".join(f" {name} is not installed ({why})." for name, why in missing.items())
    lines = Lines(
        "queue_throughput_vs_size",
        "Queue throughput, 1 producer -> 1 consumer",
        "message size",
        "MB/s",
        xticks={s: _label(s) for s in SIZES},
    )
    out: list[Table | Lines | Samples] = []
    for name in channels:
        for size in SIZES:
            lines.add(name, size, Stats(tuple(rates[name, size])))
    for size in TABLE_SIZES:
        table = Table(
            f"Throughput, {_label(size)} messages, 1 producer -> 1 consumer",
            "MB/s",
            baseline=BASELINE,
            note=f"{max(MIN_COUNT, min(MAX_COUNT, BYTES_PER_RUN // size)):,} messages per"
            f" measurement.{absent}",
        )
        for name in channels:
            table.add(name, Stats(tuple(rates[name, size])))
        out.append(table)
    out.append(lines)
    medians = Table("Ping-pong round trip of 64 B, median", "us", False, BASELINE)
    tails = Table("Ping-pong round trip of 64 B, p99", "us", False, BASELINE)
    dist = Samples("queue_ping_pong", "Ping-pong round trip of 64 B (every sample)", "us")
    for name, runs in trips.items():
        medians.add(name, Stats(tuple(statistics.median(r) for r in runs)))
        tails.add(name, Stats(tuple(sorted(r)[int(len(r) * 0.99)] for r in runs)))
        dist.add(name, [t for r in runs for t in r])
    tails.note = f"{ROUND_TRIPS:,} round trips per measurement; min/median/max over measurements."
    out += [medians, tails, dist]
    return out
