"""Queues and pipes: fabric's shared-memory rings against multiprocessing, faster-fifo and zmq.

Every candidate is measured in the same run, in rounds (each once per round)
so a burst of load from other jobs hits them alike:

* throughput, 1 producer -> 1 consumer and 2 -> 2, of 100k 64-byte ``bytes``
  and of 100k small tuples, and of 2k messages of 1 MiB (MB/s);
* ping-pong round-trip latency of a 1-byte message (median and p99 of each
  measurement's round trips).

Processes are forked with multiprocessing's fork context for every candidate,
so only the transport differs; the clock starts when every process is ready
and a shared start event is set, and stops when the consumers have every
message (each consumer checks its count). "put/get" rows move one message per
call; "batch" rows use put_many/get_many where the candidate has them.
faster-fifo and pyzmq are optional: a missing one is reported, not faked.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fabric.local
from bench._harness import Stats, Table

SMALL_COUNT = 100_000
BIG_COUNT = 2_000
BIG_SIZE = 1 << 20
ROUND_TRIPS = 3_000
NOTE_2_2 = (
    "2 producers, 2 consumers sharing one queue; zmq runs as 2 independent "
    "PUSH -> PULL pairs (it has no shared queue without a broker)."
)
_mp = multiprocessing.get_context("fork")
_ZMQ_ADDR = "ipc:///tmp/fabric-bench-{}-{}"


class _Failed(Exception):
    """A candidate's processes failed (a peer's own error, reported in the table)."""


_failures: dict[str, str] = {}


def _interleaved(measures: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, Stats]:
    """Measure each candidate once per round; a candidate that fails is dropped
    from the table and its error recorded in ``_failures`` for the note."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            if name in _failures:
                continue
            try:
                values[name].append(measure())
            except _Failed as exc:
                _failures[name] = str(exc)
    return {name: Stats(tuple(v)) for name, v in values.items() if name not in _failures}


def _failure_note() -> str:
    if not _failures:
        return ""
    text = "; ".join(f"{name}: {err}" for name, err in _failures.items())
    _failures.clear()
    return f" Failed, so not shown: {text}."


# ------------------------------------------------------------------ transports
# A transport is built in the parent, inherited by forked children, and gives
# each side a put(msg) / get() pair (and batch variants).


@dataclass
class Transport:
    """How to move messages with one candidate."""

    make: Callable[[int], Any]  # (number of consumers) -> shared state
    sender: Callable[[Any, int], Callable[[Any], None]]  # (state, index) -> send
    receiver: Callable[[Any, int], Callable[..., Any]]  # (state, index) -> receive
    batch: bool = False


def _queue_like(factory: Callable[[], Any]) -> Transport:
    return Transport(lambda n: factory(), lambda q, i: q.put, lambda q, i: q.get)


def _queue_batched(factory: Callable[[], Any]) -> Transport:
    return Transport(
        lambda n: factory(),
        lambda q, i: q.put_many,
        lambda q, i: lambda limit: q.get_many(max_messages_to_get=limit),
        batch=True,
    )


def _pipe(duplex_pipe: Callable[[], Any], raw: bool) -> Transport:
    def make(n: int) -> Any:
        return duplex_pipe()

    if raw:
        return Transport(make, lambda p, i: p[0].send_bytes, lambda p, i: p[1].recv_bytes)
    return Transport(make, lambda p, i: p[0].send, lambda p, i: p[1].recv)


def _faster_fifo(batched: bool) -> Transport | None:
    try:
        import faster_fifo
    except ImportError:
        return None
    factory = lambda: faster_fifo.Queue(max_size_bytes=8 * BIG_SIZE)  # noqa: E731
    if not batched:
        return Transport(
            lambda n: factory(),
            lambda q, i: q.put,
            lambda q, i: lambda: q.get(timeout=60),
        )
    return Transport(
        lambda n: factory(),
        lambda q, i: lambda xs: q.put_many(xs, timeout=60),
        lambda q, i: lambda limit: q.get_many(timeout=60, max_messages_to_get=limit),
        batch=True,
    )


def _zmq(pyobj: bool) -> Transport | None:
    try:
        import zmq
    except ImportError:
        return None

    def make(n: int) -> Any:
        return [_ZMQ_ADDR.format(os.getpid(), f"{time.monotonic_ns()}-{i}") for i in range(n)]

    def sender(addrs: Any, i: int) -> Callable[[Any], None]:
        sock = zmq.Context.instance().socket(zmq.PUSH)
        # producer i feeds consumer i: PUSH's round-robin skips a peer at its
        # high-water mark, so fixed per-consumer counts would never add up
        sock.connect(addrs[i])
        return sock.send_pyobj if pyobj else sock.send

    def receiver(addrs: Any, i: int) -> Callable[[], Any]:
        sock = zmq.Context.instance().socket(zmq.PULL)
        sock.bind(addrs[i])
        return sock.recv_pyobj if pyobj else sock.recv

    return Transport(make, sender, receiver)


def _candidates(kind: str) -> dict[str, Transport | None]:
    raw = kind == "bytes"
    out: dict[str, Transport | None] = {
        "multiprocessing.Queue": _queue_like(_mp.Queue),
        "multiprocessing.SimpleQueue": _queue_like(_mp.SimpleQueue),
        "fabric.local.Queue": _queue_like(fabric.local.Queue),
        "fabric.local.SimpleQueue": _queue_like(fabric.local.SimpleQueue),
        "fabric.local.Queue put_many/get_many": _queue_batched(fabric.local.Queue),
        "faster_fifo.Queue": _faster_fifo(False),
        "faster_fifo.Queue put_many/get_many": _faster_fifo(True),
        "zmq PUSH/PULL ipc " + ("raw" if raw else "send_pyobj"): _zmq(not raw),
    }
    if raw:
        out["zmq PUSH/PULL ipc send_pyobj"] = _zmq(True)
    return out


# ------------------------------------------------------------------ throughput


def _produce(
    t: Transport, state: Any, i: int, msgs: list[Any], ready: Any, go: Any, end: Any
) -> None:
    send = t.sender(state, i)
    ready.release()
    go.wait()
    if t.batch:
        for k in range(0, len(msgs), 1000):
            send(msgs[k : k + 1000])
    else:
        for m in msgs:
            send(m)
    end.wait()  # a zmq sender must not exit with messages still queued


def _consume(t: Transport, state: Any, i: int, n: int, ready: Any, go: Any, done: Any) -> None:
    recv = t.receiver(state, i)
    ready.release()
    go.wait()
    got = 0
    if t.batch:
        while got < n:  # never take another consumer's share
            got += len(recv(min(1000, n - got)))
    else:
        for _ in range(n):
            recv()
            got += 1
    done.put(got)


def _unlink_ipc(state: Any) -> None:
    """Remove zmq's ipc:// socket files: the binding child leaves through os._exit."""
    if isinstance(state, list):
        for address in state:
            if isinstance(address, str) and address.startswith("ipc://"):
                Path(address.removeprefix("ipc://")).unlink(missing_ok=True)


def _throughput(t: Transport, procs: int, msg: Any, count: int) -> float:
    """Messages per second from ``procs`` producers to ``procs`` consumers."""
    state = t.make(procs)
    ready, go, end, done = _mp.Semaphore(0), _mp.Event(), _mp.Event(), _mp.Queue()
    per = count // procs
    children = [
        _mp.Process(target=_produce, args=(t, state, i, [msg] * per, ready, go, end))
        for i in range(procs)
    ] + [
        _mp.Process(target=_consume, args=(t, state, i, per, ready, go, done)) for i in range(procs)
    ]
    for c in children:
        c.start()
    for _ in children:
        ready.acquire()
    start = time.perf_counter()
    go.set()
    got, reports = 0, 0
    while reports < procs:
        try:
            got += done.get(timeout=1)
            reports += 1
        except queue.Empty:
            if any(c.exitcode not in (None, 0) for c in children):
                for c in children:
                    c.kill()
                    c.join()
                raise _Failed(f"exit codes {[c.exitcode for c in children]}") from None
    elapsed = time.perf_counter() - start
    end.set()
    for c in children:
        c.join()
    _unlink_ipc(state)
    if got != per * procs:
        raise RuntimeError(f"lost messages: {got} of {per * procs}")
    return got / elapsed


def _throughput_table(
    title: str,
    kind: str,
    procs: int,
    msg: Any,
    count: int,
    repeats: int,
    unit_scale: float = 1.0,
    unit: str = "messages/s",
    note: str = "",
) -> Table:
    table = Table(title, unit, baseline="multiprocessing.Queue", note=note)
    missing = []
    measures: dict[str, Callable[[], float]] = {}
    for name, t in _candidates(kind).items():
        if t is not None and t.batch and len(msg) > 1 << 16:
            continue  # batches of 1000 big messages do not fit faster-fifo's buffer
        if t is None:
            missing.append(name)
            continue
        measures[name] = lambda t=t: _throughput(t, procs, msg, count) * unit_scale
    for name, stats in _interleaved(measures, repeats).items():
        table.add(name, stats)
    table.note += _failure_note()
    if missing:
        table.note += f" Not installed, so not measured: {', '.join(missing)}."
    return table


def _pipe_rows(table: Table, msg: Any, count: int, repeats: int, unit_scale: float = 1.0) -> None:
    """Pipes are 1 -> 1 only: add their rows to a 1 -> 1 table."""
    raw = isinstance(msg, bytes)
    measures = {
        "multiprocessing.Pipe" + (" send_bytes" if raw else ""): lambda: (
            _throughput(_pipe(lambda: _mp.Pipe(duplex=False)[::-1], raw), 1, msg, count)
            * unit_scale
        ),
        "fabric.local.Pipe" + (" send_bytes" if raw else ""): lambda: (
            _throughput(_pipe(lambda: fabric.local.Pipe(duplex=False)[::-1], raw), 1, msg, count)
            * unit_scale
        ),
    }
    for name, stats in _interleaved(measures, repeats).items():
        table.add(name, stats)
    table.note += _failure_note()


# ------------------------------------------------------------------ ping-pong


def _echo(recv: Callable[[], Any], send: Callable[[Any], None], n: int) -> None:
    for _ in range(n):
        send(recv())


def _rtts(
    make: Callable[
        [],
        tuple[Callable[[Any], None], Callable[[], Any], Callable[[], Any], Callable[[Any], None]],
    ],
) -> list[float]:
    """Round trips of 1 byte: make() -> (send to child, recv from child, child recv, child send)."""
    send, recv, child_recv, child_send = make()
    child = _mp.Process(target=_echo, args=(child_recv, child_send, ROUND_TRIPS + 100))
    child.start()
    out = []
    for i in range(ROUND_TRIPS + 100):
        t0 = time.perf_counter()
        send(b"x")
        recv()
        if i >= 100:  # warm-up
            out.append(time.perf_counter() - t0)
    child.join()
    return out


def _os_pipe() -> tuple[Any, ...]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    return (
        lambda m: os.write(w1, m),
        lambda: os.read(r2, 1),
        lambda: os.read(r1, 1),
        lambda m: os.write(w2, m),
    )


def _two_queues(factory: Callable[[], Any]) -> Callable[[], tuple[Any, ...]]:
    def make() -> tuple[Any, ...]:
        a, b = factory(), factory()
        return a.put, b.get, a.get, b.put

    return make


def _duplex(factory: Callable[[], Any]) -> Callable[[], tuple[Any, ...]]:
    def make() -> tuple[Any, ...]:
        a, b = factory()
        return a.send_bytes, a.recv_bytes, b.recv_bytes, b.send_bytes

    return make


def _ping_pong(repeats: int) -> list[Table]:
    candidates: dict[str, Callable[[], tuple[Any, ...]]] = {
        "os.pipe": _os_pipe,
        "multiprocessing.Pipe": _duplex(_mp.Pipe),
        "multiprocessing.Queue": _two_queues(_mp.Queue),
        "fabric.local.Pipe": _duplex(fabric.local.Pipe),
        "fabric.local.Queue": _two_queues(fabric.local.Queue),
    }
    try:
        import faster_fifo

        candidates["faster_fifo.Queue"] = _two_queues(
            lambda: faster_fifo.Queue(max_size_bytes=1 << 16)
        )
    except ImportError:
        pass
    med: dict[str, list[float]] = {n: [] for n in candidates}
    p99: dict[str, list[float]] = {n: [] for n in candidates}
    for _ in range(repeats):
        for name, make in candidates.items():
            rtts = sorted(_rtts(make))
            med[name].append(statistics.median(rtts) * 1e6)
            p99[name].append(rtts[int(len(rtts) * 0.99)] * 1e6)
    note = (
        f"{ROUND_TRIPS:,} round trips of a 1-byte message per measurement, after 100 "
        "warm-up ones. Targets: fabric median <= half of os.pipe's; fabric p99 below "
        "multiprocessing.Pipe's."
    )
    tables = []
    for title, data in (("median", med), ("p99", p99)):
        t = Table(
            f"Ping-pong round trip, {title}",
            f"microseconds ({title} of each measurement)",
            higher_is_better=False,
            baseline="os.pipe",
            note=note,
        )
        for name, values in data.items():
            t.add(name, Stats(tuple(values)))
        tables.append(t)
    return tables


# ------------------------------------------------------------------ entry


def run(repeats: int) -> list[Table]:
    small = b"x" * 64
    tup = (1, 2.0, "three", None)
    targets = (
        "Targets: fabric.local.Queue (put/get, not batched) >= 10x "
        "multiprocessing.Queue and >= 1.5x zmq ipc raw for 64-byte bytes; "
        ">= 5x multiprocessing.Queue for a small tuple."
    )
    tables = []
    t = _throughput_table(
        "Queue 1 -> 1, 100k 64-byte bytes", "bytes", 1, small, SMALL_COUNT, repeats, note=targets
    )
    _pipe_rows(t, small, SMALL_COUNT, repeats)
    tables.append(t)
    t = _throughput_table(
        "Queue 1 -> 1, 100k small tuples",
        "tuple",
        1,
        tup,
        SMALL_COUNT,
        repeats,
        note=f"The tuple is {tup!r}. " + targets,
    )
    _pipe_rows(t, tup, SMALL_COUNT, repeats)
    tables.append(t)
    tables.append(
        _throughput_table(
            "Queue 2 -> 2, 100k 64-byte bytes",
            "bytes",
            2,
            small,
            SMALL_COUNT,
            repeats,
            note=NOTE_2_2,
        )
    )
    tables.append(
        _throughput_table(
            "Queue 2 -> 2, 100k small tuples",
            "tuple",
            2,
            tup,
            SMALL_COUNT,
            repeats,
            note=NOTE_2_2,
        )
    )
    big = os.urandom(BIG_SIZE)
    t = _throughput_table(
        "Queue 1 -> 1, 2k messages of 1 MiB bytes",
        "bytes",
        1,
        big,
        BIG_COUNT,
        repeats,
        unit_scale=BIG_SIZE / 1e6,
        unit="MB/s",
        note="fabric's default 1 MiB ring streams each message in quarter-ring pieces; "
        "faster-fifo gets an 8 MiB buffer (it cannot carry a message larger than its "
        "buffer). Target: fabric.local.Queue >= faster_fifo.Queue.",
    )
    _pipe_rows(t, big, BIG_COUNT, repeats, unit_scale=BIG_SIZE / 1e6)
    tables.append(t)
    tables += _ping_pong(repeats)
    return tables
