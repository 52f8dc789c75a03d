"""The remote layer against multiprocessing's SyncManager and a raw pyzmq floor.

Every row is measured in the same run on this machine:

* managed dict ``d[k] = v`` and Queue ``put``+``get`` round trips: fabric's
  embedded Manager (whose calls run in its own broker, in the calling thread)
  against ``multiprocessing.managers.SyncManager`` over TCP, plus the same
  loops run in one of the embedded worker node's task processes: over the
  same-host lane (shared-memory rings to a thread of the Manager's process,
  the default there), and, from a ``Manager(lane=False)``, across the socket
  (TCP + CURVE) to the broker like any remote client's;
* no-op task throughput (``submit`` and ``map``) with 2 worker processes, and
  the single-task round trip, against a raw pyzmq floor: a ROUTER broker
  thread handing pickled calls to 2 DEALER worker processes, no journal, no
  keys, no retries; plus ``submit`` and ``map`` on a node without a prefetch
  window (``Manager(prefetch=0)``; every other row uses the default window),
  and ``mgr.Pool().map`` with its automatic chunks (multiprocessing.Pool's
  API: ~32 chunks, each a single task), labelled as such beside the per-task
  rows;
* cold start: ``Manager()`` to the first task result, against
  ``ProcessPoolExecutor`` (local) start-up;
* the task peers, each with 2 worker processes, in the same three tables: dask
  distributed (LocalCluster, processes), ipyparallel (2 engines), Ray
  (num_cpus=2) and Celery (prefork worker, redis broker and backend started
  here). They are optional (the ``bench`` extra; Celery also needs
  ``redis-server``): missing ones are skipped and named in the tables' note.
  Each repeat starts every peer afresh (its cold start), measures it warm, and
  stops every process it started.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing.managers as mpm
import os
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

import cloudpickle
import zmq

from bench import _peers
from bench._harness import Stats, Table, rate, repeat
from fabric.remote import Manager

N_OPS = 2_000
N_TASKS = 5_000
N_TRIPS = 200
WORKERS = 2
PREFETCH_NOTE = (
    "Rows but two use the default node (a prefetch window of 4 tasks per task process, made safe"
    " by work stealing); the 'node prefetch=0' ones use a Manager(prefetch=0): one task per free"
    " task process, so each idles a node -> broker -> node round trip between no-op tasks."
    " 'Pool.map (auto chunks)' is mgr.Pool().map, which sends its calls in ~32 chunks (one task"
    " each) like multiprocessing.Pool.map; every other fabric row sends one task per call. The"
    " floor and the map rows take turns in each repeat."
)

_FLOOR_WORKER = """
import os, sys, zmq, cloudpickle
parent = os.getppid()
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.connect(sys.argv[1]); s.send(b"R")
while True:
    while not s.poll(1000):
        if os.getppid() != parent:  # the benchmark died: do not outlive it
            sys.exit(1)
    tid, blob = s.recv_multipart()
    if not blob:
        break
    fn, args = cloudpickle.loads(blob)
    s.send_multipart([tid, cloudpickle.dumps(fn(*args))])
"""


class _Floor:
    """A raw ROUTER broker thread and 2 DEALER worker processes: the cost floor."""

    def __init__(self) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._front = self._ctx.socket(zmq.ROUTER)
        port = self._front.bind_to_random_port("tcp://127.0.0.1")
        self._back = self._ctx.socket(zmq.ROUTER)
        back = self._back.bind_to_random_port("tcp://127.0.0.1")
        self._client = self._ctx.socket(zmq.DEALER)
        self._client.connect(f"tcp://127.0.0.1:{port}")
        self._stop = self._ctx.socket(zmq.PAIR)
        self._stop.bind("inproc://floor-stop")
        self._procs = [
            subprocess.Popen([sys.executable, "-c", _FLOOR_WORKER, f"tcp://127.0.0.1:{back}"])
            for _ in range(WORKERS)
        ]
        self._thread = threading.Thread(target=self._route, daemon=True)
        self._thread.start()

    def _route(self) -> None:
        stop = self._ctx.socket(zmq.PAIR)
        stop.connect("inproc://floor-stop")
        idle: deque[bytes] = deque()
        queued: deque[list[bytes]] = deque()
        owners: dict[bytes, bytes] = {}
        poller = zmq.Poller()
        for sock in (self._front, self._back, stop):
            poller.register(sock, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if stop in events:
                for worker in idle:
                    self._back.send_multipart([worker, b"", b""])
                stop.close()
                return
            if self._back in events:
                worker, *rest = self._back.recv_multipart()
                if len(rest) == 2:  # a result (a lone frame says ready)
                    self._front.send_multipart([owners.pop(rest[0]), *rest])
                idle.append(worker)
            if self._front in events:
                client, tid, blob = self._front.recv_multipart()
                owners[tid] = client
                queued.append([tid, blob])
            while idle and queued:
                self._back.send_multipart([idle.popleft(), *queued.popleft()])

    def map(self, fn: Any, items: list[Any]) -> list[Any]:
        for i, item in enumerate(items):
            self._client.send_multipart([b"%d" % i, cloudpickle.dumps((fn, (item,)))])
        out: list[Any] = [None] * len(items)
        for _ in items:
            tid, blob = self._client.recv_multipart()
            out[int(tid)] = cloudpickle.loads(blob)
        return out

    def close(self) -> None:
        self._stop.send(b"")
        self._thread.join()
        for proc in self._procs:
            proc.wait(10)
        for sock in (self._stop, self._client, self._front, self._back):
            sock.close(linger=0)
        self._ctx.term()


def _submits(executor: cf.Executor, items: list[int]) -> None:
    """Submit one task per item, then wait for every result."""
    for future in [executor.submit(abs, i) for i in items]:
        future.result()


def _per_op(count: int, body: Any) -> float:
    return 1e6 / rate(count, body)


def _sets(d: Any, count: int = N_OPS) -> float:
    """Set ``d["k"]`` ``count`` times; return ops/s (run here or in a task process)."""
    start = time.perf_counter()
    for i in range(count):
        d["k"] = i
    return count / (time.perf_counter() - start)


def _puts_gets(q: Any, count: int = N_OPS) -> float:
    """Put ``count // 2`` items, then get them; return items/s."""
    start = time.perf_counter()
    for i in range(count // 2):
        q.put(i)
    for _ in range(count // 2):
        q.get()
    return count / (time.perf_counter() - start)


def _dict_table(repeats: int, mgr: Manager, sync: mpm.SyncManager, tcp: Manager) -> list[Table]:
    ops = Table("Managed dict: d[k] = v, one client", "ops/s", baseline="SyncManager (TCP)")
    queue_t = Table("Managed Queue: put + get, one client", "items/s", baseline="SyncManager (TCP)")
    here: dict[str, tuple[Any, Any]] = {
        "SyncManager (TCP)": (sync.dict(), sync.Queue()),  # type: ignore[attr-defined]
        "fabric Manager": (mgr.dict(), mgr.Queue()),
    }
    # the same loops in one of the embedded node's task processes: over the same-host lane
    # (the default), and over TCP + CURVE like a remote client's (a Manager(lane=False))
    tasks: dict[str, tuple[Any, Any, Any]] = {
        "fabric, from a task process (same-host lane)": (mgr.Executor(), mgr.dict(), mgr.Queue()),
        "fabric, from a task process (TCP + CURVE)": (tcp.Executor(), tcp.dict(), tcp.Queue()),
    }
    sets: dict[str, list[float]] = {name: [] for name in [*here, *tasks]}
    gets: dict[str, list[float]] = {name: [] for name in sets}
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # task processes need not import bench/
    try:
        # the candidates take turns within each repeat, so a burst of load on this shared
        # machine hits them alike instead of one candidate's whole series
        for _ in range(repeats):
            for name, (d, q) in here.items():
                sets[name].append(_sets(d))
                gets[name].append(_puts_gets(q))
            for name, (ex, d, q) in tasks.items():
                sets[name].append(ex.submit(_sets, d).result(timeout=120))
                gets[name].append(ex.submit(_puts_gets, q).result(timeout=120))
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    for name in sets:
        ops.add(name, Stats(tuple(sets[name])))
        queue_t.add(name, Stats(tuple(gets[name])))
    return [ops, queue_t]


def _task_tables(repeats: int, mgr: Manager, floor: _Floor, bare: Manager) -> list[Table]:
    """The task tables; ``bare`` is a Manager whose node has no prefetch window."""
    ex, bare_ex, pool = mgr.Executor(), bare.Executor(), mgr.Pool()
    items = list(range(N_TASKS))
    thru = Table(
        f"No-op tasks, {N_TASKS} at once, {WORKERS} worker processes",
        "tasks/s",
        baseline="raw pyzmq floor",
    )
    # the floor, the default node's map and the one without prefetch take turns in each
    # repeat, so a shared machine's drifting load weighs on all three alike
    turns = {
        "raw pyzmq floor": lambda: floor.map(abs, items),
        "fabric Executor.map": lambda: list(ex.map(abs, items, timeout=120)),
        "fabric Executor.map, node prefetch=0": lambda: list(bare_ex.map(abs, items, timeout=120)),
        "fabric Pool.map (auto chunks)": lambda: pool.map(abs, items),
    }
    figures: dict[str, list[float]] = {name: [] for name in turns}
    for _ in range(repeats):
        for name, body in turns.items():
            figures[name].append(rate(N_TASKS, body))
    thru.add("raw pyzmq floor", Stats(tuple(figures.pop("raw pyzmq floor"))))
    for name, executor in (
        ("fabric Executor.submit", ex),
        ("fabric Executor.submit, node prefetch=0", bare_ex),
    ):
        thru.add(
            name, repeat(lambda e=executor: rate(N_TASKS, lambda: _submits(e, items)), repeats)
        )
    for name, values in figures.items():
        thru.add(name, Stats(tuple(values)))
    pool.close()
    thru.note = PREFETCH_NOTE
    trip = Table("Single-task round trip", "us", higher_is_better=False, baseline="raw pyzmq floor")
    trip.add(
        "raw pyzmq floor",
        repeat(
            lambda: _per_op(N_TRIPS, lambda: [floor.map(abs, [1]) for _ in range(N_TRIPS)]), repeats
        ),
    )
    trip.add(
        "fabric Executor",
        repeat(
            lambda: _per_op(N_TRIPS, lambda: [ex.submit(abs, 1).result() for _ in range(N_TRIPS)]),
            repeats,
        ),
    )
    return [thru, trip]


def _warm(peer: _peers.Peer, items: list[int]) -> dict[tuple[str, str], float]:
    """Measure a started peer: {(table, row suffix): tasks/s by submit and map, trip in us}."""
    peer.submit_all(items[:50])  # warm: every worker has served
    out = {("thru", " submit"): rate(len(items), lambda: peer.submit_all(items))}
    if peer.has_map:
        out["thru", " map"] = rate(len(items), lambda: peer.map_all(items))
    out["trip", ""] = _per_op(N_TRIPS, lambda: [peer.trip() for _ in range(N_TRIPS)])
    return out


def _peer_rows(repeats: int, thru: Table, trip: Table, cold: Table) -> None:
    """Add every available peer's rows; name the missing ones in the notes."""
    items = list(range(N_TASKS))
    skipped = [f"{n} ({why})" for n in _peers.PEERS if (why := _peers.missing(n))]
    runs = {n: p for n, p in _peers.PEERS.items() if not _peers.missing(n)}
    values: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):  # each repeat starts every peer afresh: its cold start
        for name, peer in runs.items():
            took, running = _peers.cold_start(peer)
            values.setdefault(("cold", name), []).append(took)
            try:
                for (kind, suffix), figure in _warm(running, items).items():
                    values.setdefault((kind, name + suffix), []).append(figure)
            finally:
                running.close()
    tables = {"cold": cold, "thru": thru, "trip": trip}
    for (kind, name), figures in values.items():
        tables[kind].add(name, Stats(tuple(figures)))
    note = f"{WORKERS} worker processes everywhere."
    if skipped:
        note += f" Skipped: {', '.join(skipped)}."
    for table in tables.values():
        table.note = f"{table.note} {note}".strip()


def _cold_start() -> float:
    start = time.perf_counter()
    with Manager(processes=WORKERS) as mgr:
        mgr.Executor().submit(abs, -1).result(timeout=120)
        return time.perf_counter() - start


def _cold_pool() -> float:
    start = time.perf_counter()
    with cf.ProcessPoolExecutor(WORKERS) as pool:
        pool.submit(abs, -1).result()
        return time.perf_counter() - start


def run(repeats: int) -> list[Table]:
    """Measure every table (see the module docstring)."""
    cold = Table(
        "Cold start to the first result",
        "s",
        higher_is_better=False,
        baseline="ProcessPoolExecutor (local)",
    )
    cold.add("ProcessPoolExecutor (local)", repeat(_cold_pool, repeats))
    cold.add("fabric Manager() (broker + node + host)", repeat(_cold_start, repeats))
    sync = mpm.SyncManager(address=("127.0.0.1", 0))
    sync.start()
    floor = _Floor()
    try:
        with (
            Manager(processes=WORKERS) as mgr,
            Manager(processes=WORKERS, lane=False) as tcp,
            Manager(processes=WORKERS, prefetch=0) as bare,
        ):
            # the nodes' task processes start in the background: wait for them to serve
            for m in (mgr, tcp, bare):
                list(m.Executor().map(abs, range(-WORKERS * 4, 0), timeout=120))
            tables = _dict_table(repeats, mgr, sync, tcp) + _task_tables(repeats, mgr, floor, bare)
    finally:
        floor.close()
        sync.shutdown()
    thru, trip = tables[2:4]
    _peer_rows(repeats, thru, trip, cold)
    return [*tables, cold]


def run_objects(repeats: int) -> list[Table]:
    """Measure only the managed-object tables (dict and Queue), for quick iterations."""
    sync = mpm.SyncManager(address=("127.0.0.1", 0))
    sync.start()
    try:
        with Manager(processes=WORKERS) as mgr, Manager(processes=WORKERS, lane=False) as tcp:
            for m in (mgr, tcp):
                list(m.Executor().map(abs, range(-WORKERS * 4, 0), timeout=120))
            return _dict_table(repeats, mgr, sync, tcp)
    finally:
        sync.shutdown()


def run_tasks(repeats: int) -> list[Table]:
    """Measure only fabric's task tables against the raw floor (no peers), for quick iterations."""
    floor = _Floor()
    try:
        with (
            Manager(processes=WORKERS) as mgr,
            Manager(processes=WORKERS, prefetch=0) as bare,
        ):
            for m in (mgr, bare):
                list(m.Executor().map(abs, range(-WORKERS * 4, 0), timeout=120))
            return _task_tables(repeats, mgr, floor, bare)
    finally:
        floor.close()


if __name__ == "__main__":
    # python -m bench.bench_remote [--objects | --tasks] [--repeats N]: --objects measures only
    # the managed dict and Queue rows, --tasks only fabric's task rows and the raw floor (the
    # task peers take minutes)
    import argparse

    parser = argparse.ArgumentParser(description="the remote family, or only some of its rows")
    parser.add_argument("--objects", action="store_true", help="only the managed-object tables")
    parser.add_argument("--tasks", action="store_true", help="only the task tables, no peers")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", os.getcwd())
    only = run_objects if args.objects else run_tasks if args.tasks else run
    for table in only(args.repeats):
        print(table.markdown())
