"""The same-host lane: task processes of the embedded node call objects over shared memory."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric.broker.server import Broker
from fabric.remote import Manager
from fabric.remote._errors import OwnerLostWarning
from fabric.remote._lane import LANE_ENV, TOKEN_BYTES, lane_from_env, recv_exact
from fabric.remote._lane_client import LaneClient, LaneUnavailable, transport_for
from fabric.remote._lane_server import LaneServer
from tests.remote.conftest import start_broker

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def served(keydir: Path) -> Iterator[tuple[Broker, LaneServer]]:
    broker = start_broker(keydir)
    lane = LaneServer()
    try:
        lane.serve(broker, broker.address)
        yield broker, lane
    finally:
        lane.close()
        broker.close()


# --- in task processes -------------------------------------------------------------------
def _transport(proxy: Any) -> str:
    return type(proxy._conn).__name__


def _use(d: Any, q: Any, lock: Any, named: Any) -> dict[str, Any]:
    d["k"] = 41
    d["k"] += 1
    q.put("item")
    try:
        d["missing"]
    except KeyError as exc:
        missing = repr(exc)
    named["from task"] = os.getpid()
    return {
        "transports": {_transport(p) for p in (d, q, lock, named)},
        "k": d["k"],
        "got": q.get(timeout=5),
        "missing": missing,
        "lock free": lock.acquire(timeout=0.2),
        "proxy": d,
    }


def test_task_processes_call_objects_over_the_lane() -> None:
    with Manager(processes=1) as mgr:
        d, q, lock, named = mgr.dict(), mgr.Queue(), mgr.Lock(), mgr.dict("results")
        lock.acquire()
        out = mgr.Executor().submit(_use, d, q, lock, named).result(timeout=30)
        assert out["transports"] == {"LaneClient"}
        assert (out["k"], out["got"]) == (42, "item")
        assert out["missing"] == "KeyError('missing')"
        assert out["lock free"] is False  # held here: the task's timed acquire gave up
        assert mgr.dict("results")["from task"] != os.getpid()
        out["proxy"]["back"] = 1  # a proxy the task returned works here
        assert d["back"] == 1
        lock.release()


class Tally:
    def __init__(self) -> None:
        self.total = 0

    def add(self, n: int) -> int:
        self.total += n
        return self.total


def _add_over_the_lane(tally: Any) -> tuple[str, int]:
    tally.add(1)
    return _transport(tally), int(tally.add(2))


def test_a_registered_type_is_reached_over_the_lane_and_the_lane_is_removed() -> None:
    with Manager(processes=1) as mgr:
        mgr.register("Tally", Tally)
        tally = mgr.Tally()  # type: ignore[attr-defined]
        # hosted by this client's own host thread: the call is routed on from the lane
        assert mgr.Executor().submit(_add_over_the_lane, tally).result(timeout=30) == (
            "LaneClient",
            3,
        )
        lane = mgr._cluster.lane  # type: ignore[union-attr]
        assert lane is not None and lane.statistics()["clients"] == 1
        path = lane.path
    assert not os.path.exists(os.path.dirname(path))


def test_lane_false_keeps_the_socket_path() -> None:
    with Manager(processes=1, lane=False) as mgr:
        d = mgr.dict()
        assert mgr.Executor().submit(_transport, d).result(timeout=30) == "Connection"


def _get_while_another_thread_puts(q: Any) -> Any:
    got: list[Any] = []
    getter = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    getter.start()
    q.put("from the other thread")  # must not wait behind the parked get
    getter.join(15)
    return got


def test_a_parked_call_holds_up_only_its_own_thread() -> None:
    with Manager(processes=1) as mgr:
        q = mgr.Queue()
        got = mgr.Executor().submit(_get_while_another_thread_puts, q).result(timeout=30)
        assert got == ["from the other thread"]


def _in_a_fork_child(d: Any) -> int:
    d["parent"] = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child attaches afresh, it does not share the parent's channels
        try:
            d["child"] = os.getpid()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    d["parent again"] = True
    return os.waitstatus_to_exitcode(status)


def test_a_fork_child_of_a_task_attaches_its_own_channels() -> None:
    with Manager(processes=1) as mgr:
        d = mgr.dict()
        assert mgr.Executor().submit(_in_a_fork_child, d).result(timeout=30) == 0
        assert d["child"] != d["parent"] and d["parent again"] is True


# --- another client process of the same user -------------------------------------------
_HOLDER = """
import pickle, sys
lock = pickle.loads(bytes.fromhex(sys.stdin.readline()))
print(type(lock._conn).__name__, lock.acquire(timeout=10), flush=True)
sys.stdin.readline()
"""


def test_a_killed_clients_lease_is_released() -> None:
    with Manager(processes=1) as mgr:
        lock = mgr.Lock()
        lane = mgr._cluster.lane  # type: ignore[union-attr]
        assert lane is not None
        env = {**os.environ, LANE_ENV: lane.env()}
        env.pop("FABRIC_CURVE", None)  # no keys: the lane is its only way in
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(pickle.dumps(lock).hex() + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().split() == ["LaneClient", "True"]
            assert not lock.acquire(timeout=0.1)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            with pytest.warns(OwnerLostWarning):  # its session ended with its attach socket
                assert lock.acquire(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


# --- admission and fallback ----------------------------------------------------------------
def test_the_lane_is_refused_without_its_secret(served: tuple[Broker, LaneServer]) -> None:
    broker, lane = served
    handed = _handed(lane)
    with pytest.raises(LaneUnavailable):
        LaneClient(handed[0], os.urandom(TOKEN_BYTES), broker.address)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(handed[0])
        sock.sendall(b"\0" * TOKEN_BYTES)
        with pytest.raises(EOFError):  # closed without a word
            recv_exact(sock, 1)
    assert lane.statistics()["clients"] == 0
    assert stat.S_IMODE(os.stat(os.path.dirname(handed[0])).st_mode) == 0o700


def test_a_lane_for_another_broker_is_not_used(served: tuple[Broker, LaneServer]) -> None:
    _, lane = served
    path, token = _handed(lane)
    with pytest.raises(LaneUnavailable, match="serves"):
        LaneClient(path, token, "tcp://127.0.0.1:1")


def test_without_a_lane_proxies_use_the_connection(
    monkeypatch: pytest.MonkeyPatch, served: tuple[Broker, LaneServer]
) -> None:
    broker, lane = served
    path, _ = _handed(lane)
    monkeypatch.setenv(LANE_ENV, f"{path}\t{os.urandom(TOKEN_BYTES).hex()}")
    from fabric.remote import _lane_client

    monkeypatch.setattr(_lane_client, "_lanes", {})
    sentinel = object()
    monkeypatch.setattr(_lane_client, "connection_for", lambda address: sentinel)
    assert transport_for(broker.address) is sentinel


def test_calls_over_a_lane_client_and_its_cleanup(served: tuple[Broker, LaneServer]) -> None:
    broker, lane = served
    path, token = _handed(lane)
    client = LaneClient(path, token, broker.address)
    try:
        from fabric.remote._proxy_base import decode_reply, dumps

        reply = client.create("", "dict", "", dumps(([], {})))
        ref = decode_reply(reply)
        d = _proxy("dict", ref, client)
        d["a"] = 1
        assert d["a"] == 1 and lane.statistics() == {"clients": 1, "channels": 1}
        with pytest.raises(AttributeError, match="not exposed"):
            d._call("no_such_method")
    finally:
        client.close()
    lane.close()
    assert not os.path.exists(os.path.dirname(path))
    assert lane.statistics() == {"clients": 0, "channels": 0}


def _handed(lane: LaneServer) -> tuple[str, bytes]:
    os.environ[LANE_ENV] = lane.env()
    try:
        handed = lane_from_env()
    finally:
        del os.environ[LANE_ENV]
    assert handed is not None
    return handed


def _proxy(typeid: str, ref: Any, transport: Any) -> Any:
    from fabric.remote._proxies import proxy_type

    return proxy_type(typeid)(ref, transport)
