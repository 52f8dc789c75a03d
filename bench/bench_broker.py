"""The broker against a raw-pyzmq floor: no-op tasks from one client to two workers.

The floor is the least a ZeroMQ broker can do: one ROUTER, credit-based
workers that announce ``WORKER_WINDOW`` slots once (READY n), each request
forwarded as one message to the worker slot free the longest, each reply
forwarded back as one message and freeing its slot; no acknowledgements,
heartbeats, journal or authentication. fabric's broker runs as ``python -m
fabric.broker broker`` with CURVE on (and variants without keys, and with the
journal), its workers and client are raw pyzmq peers speaking the wire
protocol, with the same window (HELLO's capacity, one credit back with each
RESULT), so both sides pay for the same sockets, processes and in-flight
slots. fabric's peers use the protocol's batches as its broker does: what
is already waiting to go leaves as one BATCH (the client's SUBMITs made
before it waits, a worker's RESULTs for the DISPATCHes one receive brought),
never waiting to fill one; the floor's peers send one message per task.
Throughput keeps a window of 256 tasks in flight; the round trip sends one
task at a time.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import zmq

from bench._harness import Stats, Table
from bench._plots import Samples
from fabric.broker import protocol as p
from fabric.broker.keys import PeerKeys, generate

TASKS = 5000
ROUNDS = 500
WINDOW = 256
DONE_BATCH = 256
WORKER_WINDOW = 16  # tasks a worker keeps in flight (its credit), the same for every broker
PY, CP = "3.11", "3.1"
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: cheaper than a zmq.Again


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- the floor -----------------------------------------------------------------------


def _raw_broker(address: str) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router:
        router.bind(address)
        ready: deque[bytes] = deque()
        waiting: deque[list[bytes]] = deque()
        while True:
            ident, kind, *rest = router.recv_multipart()
            if kind == b"STOP":
                return
            if kind == b"READY":
                ready.extend([ident] * int(rest[0]))
            elif kind == b"REQ":
                waiting.append([ident, *rest])
            else:  # a reply: [client, payload]
                router.send_multipart([rest[0], b"REP", *rest[1:]])
                ready.append(ident)
            while ready and waiting:
                router.send_multipart([ready.popleft(), *waiting.popleft()])


def _raw_worker(address: str) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.connect(address)
        sock.send_multipart([b"READY", b"%d" % WORKER_WINDOW])
        while True:
            frames = sock.recv_multipart()
            if frames[0] == b"STOP":
                return
            sock.send_multipart([b"RES", *frames])


class _RawClient:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)

    def submit(self, n: int) -> None:
        self.sock.send_multipart([b"REQ", b"%d" % n])

    def result(self) -> None:
        self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close()


# --- fabric ------------------------------------------------------------------------


def _fabric_worker(address: str, keydir: str | None) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        if keydir:
            PeerKeys.load(keydir, "worker").configure(sock)
        sock.connect(address)
        sock.send_multipart(p.encode(p.Hello("worker", "w", os.urandom(16), PY, CP, WORKER_WINDOW)))
        sock.rcvtimeo = 500  # blocking receives, as the floor's workers; a heartbeat when idle
        while True:
            try:
                received = [sock.recv_multipart()]
            except zmq.Again:
                sock.send_multipart(p.encode(p.Heartbeat()))
                continue
            while cast(int, sock.get(EVENTS)) & POLLIN:  # and whatever else is already waiting
                received.append(sock.recv_multipart(zmq.NOBLOCK))
            results: list[p.Message] = []
            for frames in received:
                for message in p.decode_many(frames):  # a DISPATCH or a BATCH of them
                    if isinstance(message, p.Dispatch):
                        task, attempt, payload = message.task, message.attempt, message.payload
                        results.append(p.Result(task, attempt, "ok", credit=1, payload=payload))
                    elif isinstance(message, p.Refuse):
                        return
            for reply in p.encode_many(results):  # answered at once, as one message
                sock.send_multipart(reply)


class _FabricClient:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], address: str, keydir: str | None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if keydir:
            PeerKeys.load(keydir, "client").configure(self.sock)
        self.sock.connect(address)
        self.sent = 0
        self.held: list[bytes] = []  # results to DONE, in batches as fabric's client does
        self.pending: deque[p.Message] = deque()  # the rest of a BATCH being read
        self.ready: list[p.Message] = []  # SUBMITs to send before waiting for a result
        self.sock.send_multipart(p.encode(p.Hello("client", "c", os.urandom(16), PY, CP)))
        while not isinstance(self._next(), p.Welcome):
            pass

    def _next(self) -> p.Message:
        if not self.pending:
            self.pending += p.decode_many(self.sock.recv_multipart())
        return self.pending.popleft()

    def submit(self, n: int) -> None:
        self.sent += 1  # task ids stay unique across runs: a DONE'd id is refused as a duplicate
        self.ready.append(p.Submit(b"%d" % self.sent, payload=(b"%d" % n,)))

    def result(self) -> None:
        # the SUBMITs made since the last wait leave now, as one BATCH when several
        for frames in p.encode_many(self.ready):
            self.sock.send_multipart(frames)
        self.ready = []
        while True:
            message = self._next()
            if isinstance(message, p.Result):
                self.held.append(message.task)
                if len(self.held) >= DONE_BATCH:
                    self._done()
                return

    def _done(self) -> None:
        self.sock.send_multipart(p.encode(p.Done(tuple(self.held))))
        self.held = []

    def close(self) -> None:
        self._done()
        self.sock.send_multipart(p.encode(p.Bye()))
        self.sock.close()


# --- the measurements ----------------------------------------------------------------

Client = _RawClient | _FabricClient


def _throughput(client: Client) -> float:
    start = time.perf_counter()
    sent = done = 0
    while done < TASKS:
        while sent < TASKS and sent - done < WINDOW:
            client.submit(sent)
            sent += 1
        client.result()
        done += 1
    return TASKS / (time.perf_counter() - start)


def _round_trips(client: Client) -> list[float]:
    times = []
    for n in range(ROUNDS):
        start = time.perf_counter()
        client.submit(n)
        client.result()
        times.append((time.perf_counter() - start) * 1e6)
    return times


@contextmanager
def _raw_cluster() -> Iterator[Callable[[zmq.Context[zmq.Socket[bytes]]], Client]]:
    address = f"tcp://127.0.0.1:{_port()}"
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_raw_broker, args=(address,))]
    procs += [mp.Process(target=_raw_worker, args=(address,)) for _ in range(2)]
    for proc in procs:
        proc.start()
    try:
        yield lambda ctx: _RawClient(ctx, address)
    finally:
        for proc in procs:
            proc.kill()
            proc.join()


@contextmanager
def _fabric_cluster(
    keydir: str | None, *broker_args: str
) -> Iterator[Callable[[zmq.Context[zmq.Socket[bytes]]], Client]]:
    address = f"tcp://127.0.0.1:{_port()}"
    args = ["--bind", address, "--no-services", *broker_args]
    if keydir:
        args += ["--keys", keydir]
    broker = subprocess.Popen(
        [sys.executable, "-m", "fabric.broker", "broker", *args], stdout=subprocess.PIPE, text=True
    )
    assert broker.stdout is not None
    broker.stdout.readline()  # "listening on": bound and self-tested
    mp = multiprocessing.get_context("spawn")
    workers = [mp.Process(target=_fabric_worker, args=(address, keydir)) for _ in range(2)]
    for proc in workers:
        proc.start()
    try:
        yield lambda ctx: _FabricClient(ctx, address, keydir)
    finally:
        for proc in workers:
            proc.kill()
            proc.join()
        broker.kill()
        broker.wait()
        broker.stdout.close()


def run(repeats: int) -> list[Table | Samples]:
    """Measure the floor and fabric's broker variants; return the tables."""
    tput = Table(
        "no-op tasks, 1 client -> broker -> 2 workers", "tasks/s", baseline="raw ROUTER floor"
    )
    median = Table(
        "single-task round trip, median", "us", higher_is_better=False, baseline="raw ROUTER floor"
    )
    p99 = Table(
        "single-task round trip, p99", "us", higher_is_better=False, baseline="raw ROUTER floor"
    )
    dist = Samples("broker_round_trip", "Single-task round trip through the broker", "us")
    with tempfile.TemporaryDirectory() as tmp:
        keydir = str(Path(tmp) / "keys")
        generate(keydir)
        journal = str(Path(tmp) / "journal")
        candidates = {
            "raw ROUTER floor": lambda: _raw_cluster(),
            "fabric, CURVE, no journal": lambda: _fabric_cluster(keydir),
            "fabric, no keys, no journal": lambda: _fabric_cluster(None),
            "fabric, CURVE, journal fsync=os": lambda: _fabric_cluster(
                keydir, "--journal", journal + "-os", "--fsync", "os"
            ),
            "fabric, CURVE, journal fsync=always": lambda: _fabric_cluster(
                keydir, "--journal", journal + "-always", "--fsync", "always"
            ),
        }
        for name, cluster in candidates.items():
            with cluster() as connect, zmq.Context() as ctx:
                client = connect(ctx)
                _round_trips(client)  # warm up: connections, first dispatches
                rates, medians, tails = [], [], []
                for _ in range(repeats):
                    rates.append(_throughput(client))
                    times = sorted(_round_trips(client))
                    dist.add(name, times)
                    medians.append(statistics.median(times))
                    tails.append(times[int(len(times) * 0.99)])
                client.close()
            tput.add(name, Stats(tuple(rates)))
            median.add(name, Stats(tuple(medians)))
            p99.add(name, Stats(tuple(tails)))
    note = (
        f"{TASKS} tasks per throughput run with {WINDOW} in flight; {ROUNDS} sequential tasks per"
        f" latency run. Every worker keeps up to {WORKER_WINDOW} tasks in flight (its credit) in"
        " both brokers. Per task both pass four messages; fabric's broker and peers send what is"
        " already waiting as one BATCH, and fabric adds a DONE per 256 results and batched ACKs"
        " (see the protocol page)."
    )
    tput.note = median.note = note
    return [tput, median, p99, dist]
