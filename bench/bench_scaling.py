"""Cluster tasks/s against the number of worker nodes: fabric's broker against a raw pyzmq floor.

fabric: ``fabric broker`` (CURVE keys, no journal) and 1 to 4 ``fabric worker
--processes 1`` nodes, all separate processes on this machine, fed by a
``Manager(address, keys).Executor().map`` client. The floor: a ROUTER process
handing cloudpickled calls to the least recently used of as many DEALER worker
processes and passing results back, with no keys, acknowledgements,
heartbeats or retries. Both clusters run side by side, one node is added to
each between steps, and each round measures both. Two workloads: tasks that
sleep 10 ms (the ideal is nodes / 10 ms, drawn too; a 2-core machine can only
show scaling on tasks that wait) and no-op tasks (the cost of the machinery).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import cloudpickle
import zmq

from bench._harness import Stats, Table
from bench._plots import Lines
from fabric.broker.keys import generate
from fabric.remote import Manager

NODES = (1, 2, 3, 4)
SLEEP = 0.01
SLEEP_TASKS_PER_NODE = 100
NOOP_TASKS = 1_000
TIMEOUT = 300.0
FABRIC = [sys.executable, "-m", "fabric"]
FLOOR = "raw pyzmq floor"
IDEAL = "ideal: nodes / task time"

_FLOOR_BROKER = """
import sys, zmq
from collections import deque
ctx = zmq.Context(); r = ctx.socket(zmq.ROUTER); r.bind(sys.argv[1])
print("listening", flush=True)
ready, waiting = deque(), deque()
while True:
    ident, kind, *rest = r.recv_multipart()
    if kind == b"READY":
        ready.append(ident)
    elif kind == b"REQ":
        waiting.append([ident, *rest])
    else:  # RES, client, task id, result
        r.send_multipart(rest)
        ready.append(ident)
    while ready and waiting:
        r.send_multipart([ready.popleft(), *waiting.popleft()])
"""

_FLOOR_WORKER = """
import sys, zmq, cloudpickle
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.connect(sys.argv[1]); s.send(b"READY")
while True:
    client, tid, blob = s.recv_multipart()
    fn, args = cloudpickle.loads(blob)
    s.send_multipart([b"RES", client, tid, cloudpickle.dumps(fn(*args))])
"""


def _task(seconds: float) -> int:
    """Wait ``seconds`` and say which process ran the task."""
    if seconds:
        time.sleep(seconds)
    return os.getpid()


class _Cluster:
    """Processes started one by one; :meth:`add_node` adds a worker node."""

    def __init__(self, stack: ExitStack) -> None:
        self._procs: list[subprocess.Popen[str]] = []
        stack.callback(self._stop)

    def _spawn(self, command: list[str], wait_for_line: bool = False) -> None:
        stdout = subprocess.PIPE if wait_for_line else None
        proc = subprocess.Popen(command, stdout=stdout, text=True)
        self._procs.append(proc)
        if wait_for_line:
            assert proc.stdout is not None
            if "listening" not in proc.stdout.readline():
                raise RuntimeError(f"{command[:4]} did not start")

    def _stop(self) -> None:
        for proc in reversed(self._procs):
            proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


class _Fabric(_Cluster):
    def __init__(self, stack: ExitStack, address: str, keys: str) -> None:
        super().__init__(stack)
        self.address, self.keys = address, keys
        self._spawn([*FABRIC, "broker", "--bind", address, "--keys", keys], wait_for_line=True)
        self._manager = stack.enter_context(Manager(address, keys))
        self._executor = stack.enter_context(self._manager.Executor())

    def add_node(self) -> None:
        i = len(self._procs)
        self._spawn([*FABRIC, "worker", self.address, "--keys", self.keys, "--processes", "1",
                     "--name", f"bench-scaling-{i}"])  # fmt: skip

    def map(self, seconds: float, count: int) -> list[int]:
        return list(self._executor.map(_task, [seconds] * count, timeout=TIMEOUT))


class _Floor(_Cluster):
    def __init__(self, stack: ExitStack, address: str) -> None:
        super().__init__(stack)
        self.address = address
        self._spawn([sys.executable, "-c", _FLOOR_BROKER, address], wait_for_line=True)
        self._context: zmq.Context[zmq.Socket[bytes]] = stack.enter_context(zmq.Context())
        self._client = self._context.socket(zmq.DEALER)
        stack.callback(self._client.close, linger=0)
        self._client.rcvtimeo = int(TIMEOUT * 1000)
        self._client.connect(address)

    def add_node(self) -> None:
        self._spawn([sys.executable, "-c", _FLOOR_WORKER, self.address])

    def map(self, seconds: float, count: int) -> list[int]:
        blob = cloudpickle.dumps((_task, (seconds,)))
        for i in range(count):
            self._client.send_multipart([b"REQ", b"%d" % i, blob])
        out = [0] * count
        for _ in range(count):
            tid, result = self._client.recv_multipart()
            out[int(tid)] = cloudpickle.loads(result)
        return out


def _free_address() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _serving(cluster: _Fabric | _Floor, nodes: int) -> None:
    """Wait until ``nodes`` different task processes have run tasks."""
    deadline = time.monotonic() + TIMEOUT
    while len(set(cluster.map(0.05, 4 * nodes))) < nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{nodes} worker nodes did not all serve within {TIMEOUT} s")


def _rate(cluster: _Fabric | _Floor, seconds: float, count: int) -> float:
    start = time.perf_counter()
    results = cluster.map(seconds, count)
    elapsed = time.perf_counter() - start
    if len(results) != count:
        raise RuntimeError("results went missing")
    return count / elapsed


@contextmanager
def _clusters() -> Iterator[dict[str, _Fabric | _Floor]]:
    module = sys.modules[__name__]
    # the task travels by value: task processes need not import this module
    cloudpickle.register_pickle_by_value(module)
    with tempfile.TemporaryDirectory(prefix="fabric-bench-") as tmp, ExitStack() as stack:
        keys = str(Path(tmp) / "keys")
        generate(keys)
        try:
            yield {
                "fabric (broker + fabric worker nodes)": _Fabric(stack, _free_address(), keys),
                FLOOR: _Floor(stack, _free_address()),
            }
        finally:
            cloudpickle.unregister_pickle_by_value(module)


def run(repeats: int) -> list[Table | Lines]:
    """Add worker nodes one at a time and measure both workloads; return tables and figures."""
    sleep_tps: dict[tuple[str, int], Stats] = {}
    noop_tps: dict[tuple[str, int], Stats] = {}
    with _clusters() as clusters:
        for nodes in NODES:
            for cluster in clusters.values():
                cluster.add_node()
            for cluster in clusters.values():
                _serving(cluster, nodes)
            sleeps: dict[str, list[float]] = {name: [] for name in clusters}
            noops: dict[str, list[float]] = {name: [] for name in clusters}
            for _ in range(repeats):
                for name, cluster in clusters.items():
                    sleeps[name].append(_rate(cluster, SLEEP, SLEEP_TASKS_PER_NODE * nodes))
                    noops[name].append(_rate(cluster, 0, NOOP_TASKS))
            for name in clusters:
                sleep_tps[name, nodes] = Stats(tuple(sleeps[name]))
                noop_tps[name, nodes] = Stats(tuple(noops[name]))
        names = list(clusters)
    ticks: dict[float, str] = {n: str(n) for n in NODES}
    sleep_plot = Lines(
        "cluster_scaling_sleep",
        f"Cluster, tasks that sleep {SLEEP * 1e3:g} ms, 1 task process per node",
        "worker nodes",
        "tasks/s",
        logx=False,
        logy=False,
        xticks=ticks,
    )
    noop_plot = Lines(
        "cluster_scaling_noop",
        "Cluster, no-op tasks, 1 task process per node",
        "worker nodes",
        "tasks/s",
        logx=False,
        logy=False,
        xticks=ticks,
    )
    for name in names:
        for nodes in NODES:
            sleep_plot.add(name, nodes, sleep_tps[name, nodes])
            noop_plot.add(name, nodes, noop_tps[name, nodes])
    for nodes in NODES:
        sleep_plot.add(IDEAL, nodes, Stats((nodes / SLEEP,)))
    sleep_plot.references.add(IDEAL)
    out: list[Table | Lines] = []
    for label, per_node, figures, count in (
        (f"sleep {SLEEP * 1e3:g} ms", True, sleep_tps, SLEEP_TASKS_PER_NODE),
        ("no-op", False, noop_tps, NOOP_TASKS),
    ):
        for nodes in (NODES[0], NODES[-1]):
            table = Table(
                f"Cluster, {label} tasks, {nodes} worker node{'s' if nodes > 1 else ''}",
                "tasks/s",
                baseline=FLOOR,
                note=f"{count * nodes if per_node else count:,} tasks per measurement, all"
                " submitted at once through `Executor.map` (fabric) or one DEALER (the floor).",
            )
            for name in names:
                table.add(name, figures[name, nodes])
            out.append(table)
    return [*out[:2], sleep_plot, *out[2:], noop_plot]
