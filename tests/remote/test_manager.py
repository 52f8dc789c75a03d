"""Manager on real processes: embedded cluster, shared objects across clients and tasks."""

from __future__ import annotations

import os
import platform
import sys
import threading
from typing import Any

import cloudpickle
import pytest

from fabric.remote import Manager, OwnerLostWarning
from tests.remote.conftest import Cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square_into(d: Any, i: int) -> int:
    d[i] = i * i
    return os.getpid()


def test_embedded_manager_runs_tasks_and_shares_a_dict() -> None:
    with Manager(processes=2) as mgr:
        assert mgr.address is not None and mgr.address.startswith("tcp://127.0.0.1:")
        results = mgr.dict("results")
        pids = list(mgr.Executor().map(square_into, [results] * 6, range(6), timeout=60))
        assert results.copy() == {i: i * i for i in range(6)}
        assert os.getpid() not in pids
    assert mgr.address is None  # shut down: the autouse fixture checks no process is left


def test_named_objects_are_shared_by_clients(cluster: Cluster) -> None:
    first, second = cluster.manager(), cluster.manager()
    first.dict("scores")["alice"] = 3
    assert second.dict("scores")["alice"] == 3
    anonymous = first.dict()
    assert anonymous is not second.dict("scores") and len(anonymous) == 0
    q1, q2 = first.Queue(name="jobs"), second.Queue(name="jobs")
    q1.put({"job": 1})
    assert q2.get(timeout=5) == {"job": 1}
    items = second.list("items", [1, 2])
    first.list("items").append(3)
    assert items.copy() == [1, 2, 3]
    lock_a, lock_b = first.Lock(name="L"), second.Lock(name="L")
    with lock_a:
        assert not lock_b.acquire(timeout=0.1)
    assert lock_b.acquire(timeout=5)
    lock_b.release()


def consume(q: Any, done: Any) -> list[Any]:
    got = [q.get(timeout=30) for _ in range(3)]
    done.set()
    return got


def test_proxies_travel_to_tasks_on_worker_nodes(cluster: Cluster) -> None:
    cluster.node(processes=1)
    mgr = cluster.manager()
    q, done = mgr.Queue(), mgr.Event()
    future = mgr.Executor().submit(consume, q, done)
    for item in ("a", ("b",), {"c": 3}):
        q.put(item)
    assert done.wait(30)
    assert future.result(timeout=30) == ["a", ("b",), {"c": 3}]


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def bump(self, by: int = 1) -> int:
        self.value += by
        return self.value

    def spawn(self) -> Counter:
        return Counter(100)


def bump_twice(counter: Any) -> int:
    counter.bump()
    return int(counter.bump())


def test_a_registered_type_is_hosted_by_its_client(cluster: Cluster) -> None:
    cluster.node(processes=1)
    mgr = cluster.manager()
    mgr.register("Counter", Counter, method_to_typeid={"spawn": "Counter"})
    counter = mgr.Counter(5)  # type: ignore[attr-defined]
    assert counter.bump() == 6
    assert mgr.Executor().submit(bump_twice, counter).result(timeout=60) == 8
    child = counter.spawn()
    assert child.bump(2) == 102
    with pytest.raises(AttributeError):
        counter.value  # noqa: B018 - attributes are not exposed, only methods
    other = cluster.manager()
    other.dict("shared")["counter"] = counter
    assert other.dict("shared")["counter"].bump() == 9


HOLD_LOCK = """
import sys
from fabric.remote import Manager
mgr = Manager(sys.argv[2], keys=sys.argv[1]).connect()
lock = mgr.Lock(name="lease")
assert lock.acquire(timeout=10)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_dead_clients_lock_is_released_and_the_next_holder_told(
    cluster: Cluster, run_client: Any
) -> None:
    holder = run_client(HOLD_LOCK, cluster.address)
    assert holder.stdout.readline() == "held\n"
    lock = cluster.manager().Lock(name="lease")
    assert not lock.acquire(timeout=0.1)
    holder.kill()
    holder.wait()
    with pytest.warns(OwnerLostWarning):
        assert lock.acquire(timeout=30)
    assert lock.owner_lost
    lock.release()


def test_threads_share_one_connection(cluster: Cluster) -> None:
    mgr = cluster.manager()
    counter, lock = mgr.Value("i", 0), mgr.Lock()

    def add() -> None:
        for _ in range(20):
            with lock:
                counter.value += 1

    threads = [threading.Thread(target=add) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert counter.value == 80


def test_a_client_of_another_runtime_is_refused_naming_both(cluster: Cluster) -> None:
    from fabric.errors import VersionMismatchError
    from fabric.remote._connection import Connection
    from fabric.remote._keys import load_curve
    from fabric.remote._link import Runtime

    curve = load_curve(cluster.keys, "client")
    older = Runtime(python="3.9.18", cloudpickle=cloudpickle.__version__)
    with (  # refused at the handshake: the broker hosts objects, so it checks runtimes
        pytest.raises(VersionMismatchError) as caught,
        Connection(cluster.address, curve=curve, runtime=older),
    ):
        pass
    text = str(caught.value)
    assert "3.9.18" in text and platform.python_version() in text
    same = Runtime(python=platform.python_version(), cloudpickle=cloudpickle.__version__)
    with Connection(cluster.address, curve=curve, runtime=same) as conn:
        conn.check_runtime()


def relay(inbox: Any, outbox: Any) -> None:
    outbox.put(inbox.get(timeout=30) * 2)


def test_the_embedded_managers_in_thread_calls_meet_calls_over_sockets() -> None:
    # this process owns the broker: its calls run in the calling thread, a task's on its socket
    with Manager(processes=1) as mgr:
        inbox, outbox, lock = mgr.Queue(), mgr.Queue(), mgr.Lock()
        future = mgr.Executor().submit(relay, inbox, outbox)
        inbox.put(21)
        assert outbox.get(timeout=30) == 42
        assert future.result(timeout=30) is None
        assert lock.acquire(timeout=5)
        got: list[bool] = []
        waiter = threading.Thread(target=lambda: got.append(lock.acquire(timeout=30)))
        waiter.start()
        lock.release()  # the waiter's parked acquire is answered to its own thread
        waiter.join(30)
        assert got == [True]


def test_a_thread_parked_on_the_socket_does_not_hold_up_the_others(cluster: Cluster) -> None:
    # the first thread to wait watches the socket for everyone while its get() is parked
    cluster.node(processes=1)
    mgr = cluster.manager()
    q, d = mgr.Queue(), mgr.dict()
    got: list[Any] = []
    parked = threading.Thread(target=lambda: got.append(q.get(timeout=60)))
    parked.start()
    for i in range(50):
        d[i] = i
    assert mgr.Executor().submit(abs, -3).result(timeout=60) == 3
    q.put("done")
    parked.join(60)
    assert got == ["done"] and len(d) == 50


class _Door:
    """A LocalBroker that counts the calls it takes, or turns them all away."""

    def __init__(self, broker: Any, refuse: bool) -> None:
        self.broker, self.refuse, self.taken = broker, refuse, 0

    def call_local(self, session: bytes, message: Any, parked: Any) -> Any:
        if self.refuse:
            raise LookupError("not a session of this broker")
        self.taken += 1
        return self.broker.call_local(session, message, parked)

    def local_endpoint(self) -> Any:
        return self.broker.local_endpoint()


@pytest.mark.parametrize("refuse", [False, True])
def test_calls_the_local_broker_turns_away_go_over_the_socket(
    cluster: Cluster, refuse: bool
) -> None:
    from fabric.remote._connection import Connection
    from fabric.remote._keys import load_curve
    from fabric.remote._proxies_data import DictProxy
    from fabric.remote._proxy_base import decode_reply, dumps

    door = _Door(cluster.broker, refuse)  # the cluster's broker runs in this process
    with Connection(cluster.address, curve=load_curve(cluster.keys, "client"), local=door) as conn:
        ref = decode_reply(conn.create("", "dict", "shared", dumps(((), {}))))
        d = DictProxy(ref, conn)
        d["k"] = 1
        assert cluster.manager().dict("shared")["k"] == 1 and d["k"] == 1
    assert door.taken == (0 if refuse else 3)
