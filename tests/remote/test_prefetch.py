"""Worker nodes with a prefetch window: how many tasks a node holds, kill -9, drain, cancel,
and work stealing (an idle node takes back what another holds unstarted)."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from fabric.broker.scheduler import WorkerInfo
from fabric.remote import Manager
from fabric.remote._worker import WorkerNode
from fabric.remote.cli import main
from tests.remote.conftest import Cluster, start_broker

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)


def hold(started: Any, gate: Any, x: int) -> tuple[int, int]:
    started.put(x)
    assert gate.wait(60)
    return x * x, os.getppid()  # the worker node is the task process's parent


def worker(cluster: Cluster, name: str) -> WorkerInfo:
    return next(w for w in cluster.broker.statistics().tasks.worker_list if w.name == name)


def wait_running(cluster: Cluster, name: str, n: int) -> WorkerInfo:
    """Poll the broker's view until node ``name`` holds ``n`` tasks (or 30 s pass)."""
    deadline = time.monotonic() + 30
    while (info := worker(cluster, name)).running != n and time.monotonic() < deadline:
        time.sleep(0.02)  # polling the broker's view, not synchronising the test
    return info


@pytest.mark.parametrize("prefetch", [0, 3])
def test_a_node_holds_at_most_its_slots_plus_prefetch(cluster: Cluster, prefetch: int) -> None:
    cluster.node(2, "pf", "--prefetch", str(prefetch))
    mgr = cluster.manager()
    ex = mgr.Executor()
    assert ex.submit(abs, -1).result(timeout=60) == 1  # the node has joined
    started, gate = mgr.Queue(), mgr.Event()
    results = ex.map(hold, [started] * 12, [gate] * 12, range(12), timeout=60)
    assert {started.get(timeout=60), started.get(timeout=60)} <= set(range(12))
    info = wait_running(cluster, "pf", 2 + prefetch)
    assert (info.running, info.credit) == (2 + prefetch, 0)  # no more than slots + prefetch
    assert cluster.broker.statistics().tasks.queued == 12 - 2 - prefetch
    assert started.qsize() == 0  # the prefetched tasks wait at the node: 2 processes
    gate.set()
    assert [square for square, _ in results] == [x * x for x in range(12)]
    stats = cluster.broker.statistics().tasks
    assert (stats.tasks_done, stats.retries, stats.duplicates) == (13, 0, 0)
    info = worker(cluster, "pf")
    assert (info.running, info.credit) == (0, 2 + prefetch)  # every credit came back


def test_a_killed_node_holding_prefetched_tasks_has_them_requeued(cluster: Cluster) -> None:
    doomed = cluster.node(1, "doomed", "--prefetch", "4")
    mgr = cluster.manager()
    ex = mgr.Executor()
    assert ex.submit(abs, -1).result(timeout=60) == 1
    started, gate = mgr.Queue(), mgr.Event()
    results = ex.map(hold, [started] * 10, [gate] * 10, range(10), timeout=60)
    assert started.get(timeout=60) == 0
    assert wait_running(cluster, "doomed", 5).running == 5  # 1 running + 4 prefetched
    doomed.kill()
    doomed.wait()
    survivor = cluster.node(2, "survivor")
    gate.set()
    got = list(results)
    assert [square for square, _ in got] == [x * x for x in range(10)]  # each exactly once
    assert {node for _, node in got} == {survivor.pid}
    stats = cluster.broker.statistics().tasks
    assert (stats.tasks_done, stats.retries) == (11, 5)  # the 5 the dead node held


def record(log: Any, x: int) -> int:
    log.append(x)
    return x


def where(log: Any, x: int) -> tuple[int, int]:
    log.append(x)
    return x * x, os.getppid()


def wait_workers(cluster: Cluster, n: int) -> None:
    """Poll the broker's view until ``n`` worker nodes have joined (or 30 s pass)."""
    deadline = time.monotonic() + 30
    while cluster.broker.statistics().tasks.workers != n and time.monotonic() < deadline:
        time.sleep(0.02)  # polling the broker's view, not synchronising the test


def test_an_idle_node_takes_back_the_tasks_prefetched_behind_a_long_one(cluster: Cluster) -> None:
    # Celery's starvation: both nodes busy, each holding 2 short tasks in its window; one
    # node's task ends while the other's long one goes on: the idle node must take the
    # 2 waiting behind the long task back (they would wait for it without stealing)
    for name in ("a", "b"):
        cluster.node(1, name, "--prefetch", "2")
    mgr = cluster.manager()
    ex = mgr.Executor()
    wait_workers(cluster, 2)
    started, long_gate, short_gate, log = mgr.Queue(), mgr.Event(), mgr.Event(), mgr.list()
    long = ex.submit(hold, started, long_gate, 0)
    blocker = ex.submit(hold, started, short_gate, 1)
    assert {started.get(timeout=60), started.get(timeout=60)} == {0, 1}  # one on each node
    shorts = [ex.submit(where, log, x) for x in range(2, 6)]
    assert wait_running(cluster, "a", 3).running == 3  # 1 running, 2 in its window
    assert wait_running(cluster, "b", 3).running == 3
    short_gate.set()
    _, pending = cf.wait(shorts, timeout=30)
    assert not pending, "tasks prefetched behind the long one waited for it"
    assert not long.done()
    results = [f.result() for f in shorts]
    assert [square for square, _ in results] == [x * x for x in range(2, 6)]
    free_node = blocker.result(timeout=60)[1]
    assert {node for _, node in results} == {free_node}
    assert sorted(log.copy()) == [2, 3, 4, 5]  # each ran exactly once
    long_gate.set()
    assert long.result(timeout=60)[0] == 0 and long.result()[1] != free_node
    stats = cluster.broker.statistics().tasks
    # the 2 taken back were queued again once each, and nothing ran twice
    assert (stats.tasks_done, stats.retries, stats.duplicates) == (6, 2, 0)


def test_a_draining_node_hands_its_prefetched_tasks_to_an_idle_node(cluster: Cluster) -> None:
    node = cluster.node(1, "draining", "--prefetch", "2")
    mgr = cluster.manager()
    ex = mgr.Executor()
    started, gate, log = mgr.Queue(), mgr.Event(), mgr.list()
    long = ex.submit(hold, started, gate, 0)
    assert started.get(timeout=60) == 0
    shorts = [ex.submit(where, log, x) for x in (1, 2)]
    wait_running(cluster, "draining", 3)
    node.send_signal(signal.SIGTERM)
    fresh = cluster.node(1, "fresh", "--prefetch", "2")
    _, pending = cf.wait(shorts, timeout=30)
    assert not pending, "tasks prefetched by a draining node waited for its long task"
    assert [f.result() for f in shorts] == [(1, fresh.pid), (4, fresh.pid)]
    assert sorted(log.copy()) == [1, 2]
    gate.set()
    assert long.result(timeout=60) == (0, node.pid)
    assert node.wait(60) == 0


def test_cancel_of_a_prefetched_task_answers_at_once(cluster: Cluster) -> None:
    cluster.node(1, "pf", "--prefetch", "2")
    mgr = cluster.manager()
    ex = mgr.Executor()
    started, gate, log = mgr.Queue(), mgr.Event(), mgr.list()
    running = ex.submit(hold, started, gate, 0)
    assert started.get(timeout=60) == 0
    doomed = ex.submit(record, log, 1)
    kept = ex.submit(record, log, 2)
    wait_running(cluster, "pf", 3)
    assert doomed.cancel()
    # the node answers the CANCEL of its queued task at once, giving back its credit
    assert wait_running(cluster, "pf", 2).running == 2
    gate.set()
    assert running.result(timeout=60)[0] == 0 and kept.result(timeout=60) == 2
    assert log.copy() == [2] and doomed.cancelled()


def test_a_draining_node_runs_the_tasks_it_prefetched(cluster: Cluster) -> None:
    node = cluster.node(1, "draining", "--prefetch", "2")
    mgr = cluster.manager()
    ex = mgr.Executor()
    started, gate = mgr.Queue(), mgr.Event()
    futures = [ex.submit(hold, started, gate, x) for x in range(3)]
    assert started.get(timeout=60) == 0
    wait_running(cluster, "draining", 3)
    node.send_signal(signal.SIGTERM)
    later = ex.submit(abs, -3)  # must not start on the draining node
    gate.set()
    assert [f.result(timeout=60) for f in futures] == [(x * x, node.pid) for x in range(3)]
    assert node.wait(60) == 0
    cluster.node(1, "fresh")
    assert later.result(timeout=60) == 3


def test_a_node_prefetches_two_tasks_per_process_by_default(cluster: Cluster) -> None:
    cluster.node(2, "default")
    cluster.node(2, "none", "--prefetch", "0")
    wait_workers(cluster, 2)
    assert (worker(cluster, "default").credit, worker(cluster, "none").credit) == (2 + 8, 2)
    for prefetch, credit in ((None, 1 + 4), (0, 1)):  # Manager() takes it too
        with Manager(processes=1, prefetch=prefetch) as mgr:
            assert mgr.Executor().submit(abs, -1).result(60) == 1  # its node has joined
            assert mgr._cluster is not None
            (node,) = mgr._cluster.broker.statistics().tasks.worker_list
            assert node.credit == credit


@pytest.mark.parametrize(
    ("prefetch", "error"), [(-1, ValueError), ("2", TypeError), (True, TypeError), (1.5, TypeError)]
)
def test_prefetch_is_validated(prefetch: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="prefetch"):
        WorkerNode("tcp://127.0.0.1:1", processes=1, prefetch=prefetch)
    with pytest.raises(error, match="prefetch"):
        Manager(prefetch=prefetch)


def test_the_cli_refuses_a_negative_prefetch(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["worker", "tcp://127.0.0.1:1", "--prefetch", "-1"])
    assert exit_.value.code == 2
    assert "--prefetch" in capsys.readouterr().err


def hold_on_socket(address: tuple[str, int], x: int) -> int:
    # the gate is a socket of the test: shared objects would die with the broker
    with socket.create_connection(address, timeout=60) as conn:
        assert conn.recv(1) == b"g"
    return x * x


def serve_gate(gate: socket.socket, first: socket.socket) -> None:
    """Open the gate for every task that comes (until the test closes it)."""
    conn = first
    with contextlib.suppress(OSError):
        while True:
            with conn:
                conn.sendall(b"g")
            conn, _ = gate.accept()


def test_after_a_broker_restart_the_node_announces_only_its_free_window(
    keydir: Path, tmp_path: Path
) -> None:
    journal = str(tmp_path / "journal")
    cluster = Cluster(keydir, start_broker(keydir, journal=journal))
    gate = socket.create_server(("127.0.0.1", 0))
    gate.settimeout(60)
    try:
        cluster.node(1, "pf", "--prefetch", "2")
        mgr = cluster.manager()
        addresses = [gate.getsockname()] * 6
        results = mgr.Executor().map(hold_on_socket, addresses, range(6), timeout=60)
        first, _ = gate.accept()  # task 0 runs; 1 and 2 wait at the node
        wait_running(cluster, "pf", 3)
        address = cluster.address
        cluster.broker.close()
        cluster.broker = start_broker(keydir, bind=address, journal=journal)
        deadline = time.monotonic() + 30
        while not cluster.broker.statistics().tasks.workers and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the broker's view, not synchronising the test
        stats = cluster.broker.statistics().tasks
        info = worker(cluster, "pf")
        # its 3 held tasks leave no room: nothing dispatched, so nothing handed back as crashed
        assert (info.credit, info.running, stats.retries) == (0, 0, 0)
        threading.Thread(target=serve_gate, args=(gate, first), daemon=True).start()
        assert list(results) == [x * x for x in range(6)]
    finally:
        gate.close()
        cluster.close()
