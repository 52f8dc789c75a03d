"""Worker nodes under faults: kill -9 mid-task, SIGTERM drain, broker restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from fabric.errors import BrokerUnavailable
from fabric.remote import Manager
from tests.remote._tcpproxy import CuttableProxy
from tests.remote.conftest import HEARTBEAT, LIVENESS, Cluster, start_broker

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def record_then_wait(nodes: Any, started: Any, go: Any) -> int:
    nodes.append(os.getppid())  # the worker node is the task process's parent
    started.set()
    assert go.wait(60)
    return os.getppid()


def test_a_task_on_a_killed_node_is_retried_on_another(cluster: Cluster) -> None:
    first = cluster.node(name="first")
    mgr = cluster.manager()
    nodes, started, go = mgr.list(), mgr.Event(), mgr.Event()
    future = mgr.Executor().submit(record_then_wait, nodes, started, go)
    assert started.wait(60)
    assert nodes[0] == first.pid
    cluster.node(name="second")
    first.kill()
    first.wait()
    go.set()
    second_pid = future.result(timeout=60)
    assert second_pid != first.pid and nodes.copy() == [first.pid, second_pid]


def slow_square(gate: Any, x: int) -> int:
    assert gate.wait(60)
    return x * x


def test_map_completes_when_a_node_dies_mid_map(cluster: Cluster) -> None:
    doomed = cluster.node(processes=2, name="doomed")
    cluster.node(processes=1, name="survivor")
    mgr = cluster.manager()
    gate = mgr.Event()
    results = mgr.Executor().map(slow_square, [gate] * 12, range(12), timeout=120)
    doomed.kill()
    doomed.wait()
    gate.set()
    assert list(results) == [x * x for x in range(12)]


def test_sigterm_drains_the_node(cluster: Cluster) -> None:
    node = cluster.node(processes=1, name="draining")
    mgr = cluster.manager()
    nodes, started, go = mgr.list(), mgr.Event(), mgr.Event()
    ex = mgr.Executor()
    running = ex.submit(record_then_wait, nodes, started, go)
    assert started.wait(60)
    node.send_signal(signal.SIGTERM)
    later = ex.submit(abs, -3)  # must not start on the draining node
    go.set()
    assert running.result(timeout=60) == node.pid  # the running task finished
    assert node.wait(60) == 0
    cluster.node(processes=1, name="fresh")
    assert later.result(timeout=60) == 3


def test_nodes_and_clients_rejoin_a_restarted_broker(cluster: Cluster, keydir: Path) -> None:
    cluster.node(processes=1)
    mgr = cluster.manager()
    ex = mgr.Executor()
    assert ex.submit(abs, -1).result(timeout=60) == 1
    address = cluster.address
    cluster.broker.close()
    while_down = ex.submit(abs, -3)  # held by the client and sent once a broker answers
    cluster.broker = start_broker(keydir, bind=address)
    # the same node and the same client session carry on without user action
    assert ex.submit(abs, -2).result(timeout=60) == 2
    assert while_down.result(timeout=60) == 3
    after = mgr.dict("after")
    after["x"] = 1
    assert after["x"] == 1


def test_a_killed_task_process_is_replaced(cluster: Cluster) -> None:
    cluster.node(processes=1)
    with Manager(cluster.address, keys=cluster.keys) as mgr:
        ex = mgr.Executor()
        pid = ex.submit(os.getpid).result(timeout=60)
        os.kill(pid, signal.SIGKILL)
        assert ex.submit(os.getpid).result(timeout=60) != pid


def spin(seconds: float) -> int:
    # hold the GIL in the task process far longer than the broker's liveness window
    deadline, n = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        n += 1
    return n


def test_a_long_task_does_not_look_like_a_dead_node(cluster: Cluster) -> None:
    cluster.node(processes=1)
    mgr = cluster.manager()
    limit = HEARTBEAT * LIVENESS
    assert mgr.Executor().submit(spin, 3 * limit).result(timeout=60) > 0
    stats = cluster.broker.statistics().tasks
    assert stats.retries == 0 and stats.tasks_done == 1


def test_connecting_to_no_broker_fails_cleanly(keydir: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(BrokerUnavailable, match="no answer"):
        Manager(f"tcp://127.0.0.1:{port}", keys=keydir, timeout=0.5).connect()


def record_then_wait_twice(nodes: Any, started: Any, again: Any, go: Any) -> int:
    nodes.append(os.getppid())
    (again if started.is_set() else started).set()
    assert go.wait(60)
    return os.getppid()


def test_a_paused_node_is_fenced_off_then_rejoins(cluster: Cluster) -> None:
    paused = cluster.node(name="paused")
    mgr = cluster.manager()
    nodes, started, again, go = mgr.list(), mgr.Event(), mgr.Event(), mgr.Event()
    ex = mgr.Executor()
    future = ex.submit(record_then_wait_twice, nodes, started, again, go)
    assert started.wait(60)
    paused.send_signal(signal.SIGSTOP)  # a partition: it misses its heartbeats
    other = cluster.node(name="other")
    try:
        assert again.wait(60)  # declared dead: the task runs again on the other node
        go.set()
        assert future.result(timeout=60) == other.pid
    finally:
        paused.send_signal(signal.SIGCONT)
    other.kill()
    other.wait()
    # the paused node comes back on its own; its late result was dropped, not delivered
    assert ex.submit(os.getppid).result(timeout=60) == paused.pid
    assert nodes.copy() == [paused.pid, other.pid]
    assert cluster.broker.statistics().tasks.duplicates >= 1


def test_a_node_cut_off_from_the_broker_reconnects_and_delivers(cluster: Cluster) -> None:
    host, port = cluster.address.removeprefix("tcp://").rsplit(":", 1)
    proxy = CuttableProxy((host, int(port)))
    try:
        command = [
            sys.executable,
            "-m",
            "fabric.remote.cli",
            "worker",
            proxy.address,
            "--processes",
            "1",
            "--keys",
            str(cluster.keys),
            "--name",
            "cut",
        ]
        node = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        cluster.nodes.append(node)
        mgr = cluster.manager()
        nodes, started, go = mgr.list(), mgr.Event(), mgr.Event()
        future = mgr.Executor().submit(record_then_wait, nodes, started, go)
        assert started.wait(60)
        proxy.cut()  # the node hears nothing more and is declared dead by the broker
        go.set()  # the task still finishes; its result waits on the node
        deadline = time.monotonic() + 30
        while cluster.broker.statistics().tasks.workers and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the broker's view, not synchronising the test
        assert cluster.broker.statistics().tasks.workers == 0
        proxy.restore()
        assert future.result(timeout=60) == node.pid  # delivered once, after the reconnect
        assert mgr.Executor().submit(abs, -8).result(timeout=60) == 8
    finally:
        proxy.close()
