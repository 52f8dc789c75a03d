"""The broker with real sockets, driven by raw-pyzmq fake clients, workers and hosts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fabric.broker import protocol as p
from fabric.broker.keys import Keyring, PeerKeys
from fabric.broker.scheduler import Limits
from fabric.broker.server import Broker, is_loopback
from fabric.broker.service import Outbox
from fabric.broker.sessions import runtime_tag
from fabric.errors import AuthenticationError, FabricError
from tests.broker.peers import CP, PY, peers

Start = Callable[..., Broker]
Ephemeral = tuple[Keyring, PeerKeys]


class CountingService:
    """An in-loop host that answers every call with the number of calls it has seen."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.calls: list[tuple[bytes, p.Create | p.Call]] = []
        self.lost: list[bytes] = []
        self.closed = False

    def handle(self, session: bytes, message: p.Create | p.Call) -> Outbox:
        self.calls.append((session, message))
        if isinstance(message, p.Call) and message.method == "boom":
            raise RuntimeError("service bug")
        return [(session, p.Reply(message.call, "ok", payload=(b"%d" % len(self.calls),)))]

    def peer_lost(self, session: bytes) -> Outbox:
        self.lost.append(session)
        return []

    def close(self) -> None:
        self.closed = True


def test_a_task_travels_client_broker_worker_and_back(
    start_broker: Start, ephemeral: Ephemeral
) -> None:
    keyring, keys = ephemeral
    broker = start_broker(keys=keyring)
    with peers(broker.address, keys) as make:
        client, worker = make(), make()
        welcome = client.hello("client")
        assert (welcome.heartbeat, welcome.liveness, welcome.resumed) == (0.2, 5, False)
        worker.hello("worker", capacity=1)
        client.send(p.Submit(b"t1", payload=(b"call", b"oob")))
        assert client.expect(p.Ack) == p.Ack((b"t1",))  # batched: at the next tick
        dispatch = worker.expect(p.Dispatch)
        assert (dispatch.task, dispatch.attempt, dispatch.payload) == (
            client.session + b"t1",
            1,
            (b"call", b"oob"),
        )
        worker.send(p.Result(dispatch.task, 1, "ok", credit=1, payload=(b"42",)))
        assert worker.expect(p.Ack) == p.Ack((dispatch.task,), (1,))
        assert client.expect(p.Result) == p.Result(b"t1", 1, "ok", payload=(b"42",))
        client.send(p.Done((b"t1",)))
        client.send(p.Status())
        stats = client.expect(p.Stats).stats
    assert (stats["tasks_done"], stats["awaiting_done"], stats["workers"]) == (1, 0, 1)
    assert stats["worker_list"][0]["done"] == 1
    assert broker.statistics().tasks.tasks_done == 1


def test_tasks_only_reach_workers_of_the_same_runtime(
    start_broker: Start, caplog: pytest.LogCaptureFixture
) -> None:
    broker = start_broker()
    with peers(broker.address) as make:
        client, other, same = make(), make(), make()
        client.hello("client")
        other.send(p.Hello("worker", "old", other.session, "3.10.1", CP, capacity=1))
        other.expect(p.Welcome)
        client.send(p.Submit(b"t"))
        client.expect(p.Ack)
        assert other.silent()
        assert "needing {'runtime': 'py3.11/cloudpickle3.1'}; no connected worker matches" in (
            caplog.text
        )
        assert "workers run ['py3.10/cloudpickle3.1']" in caplog.text
        same.hello("worker", capacity=1)
        assert same.expect(p.Dispatch).task == client.session + b"t"
    assert runtime_tag(PY, CP) == "py3.11/cloudpickle3.1"


def test_with_a_service_a_peer_of_another_runtime_is_refused_naming_both(
    start_broker: Start,
) -> None:
    broker = start_broker(services=[CountingService()])
    with peers(broker.address) as make:
        old, same = make(), make()
        old.send(p.Hello("worker", "old", old.session, "3.10.1", CP, capacity=1))
        refuse = old.expect(p.Refuse)
        assert refuse.code == "runtime"
        assert "Python 3.10.1" in refuse.reason and f"Python {PY}" in refuse.reason
        same.hello("worker", capacity=1)
    assert broker.statistics().refused == 1


def test_messages_before_hello_wrong_role_and_bad_frames_get_errors(start_broker: Start) -> None:
    broker = start_broker()
    with peers(broker.address) as make:
        peer = make()
        peer.send(p.Submit(b"t"))
        assert peer.expect(p.Error).code == "hello-required"
        peer.send_raw([b"FB\x03\x10\xc1"])
        error = peer.expect(p.Error)
        assert (error.code, "not valid msgpack" in error.message) == ("malformed", True)
        peer.send_raw([b"FB\x07\x01\x80"])
        refuse = peer.expect(p.Refuse)
        assert (refuse.code, refuse.reason) == (
            "version",
            f"peer speaks fabric protocol version 7, this side speaks {p.VERSION}",
        )
        peer.hello("worker", capacity=0)
        peer.send(p.Submit(b"t"))
        error = peer.expect(p.Error)
        assert (error.code, error.message) == ("forbidden", "a worker may not send SUBMIT")
    stats = broker.statistics()
    assert (stats.malformed, stats.forbidden, stats.tasks.queued) == (1, 1, 0)


def test_a_silent_worker_is_declared_dead_its_task_requeued_then_lost(start_broker: Start) -> None:
    broker = start_broker(heartbeat=0.05, liveness=2, limits=Limits(max_retries=1))
    with peers(broker.address) as make:
        client, w1, w2 = make(), make(), make()
        client.hello("client")
        w1.hello("worker", "w1", capacity=1)
        client.send(p.Submit(b"t"))
        client.expect(p.Ack)
        assert w1.expect(p.Dispatch).attempt == 1  # w1 goes silent from here on
        w2.keepalive = 0.02
        w2.hello("worker", "w2", capacity=1)
        assert w2.expect(p.Dispatch).attempt == 2  # and w2 from here on
        # the client was silent too: it re-joins as after a reconnect and gets the result
        client.keepalive = 0.02
        client.hello("client")
        result = client.expect(p.Result)
    assert (result.task, result.attempt, result.status) == (b"t", 2, "lost")
    assert "worker node 'w2'" in result.message
    assert "past the retry limit of 1" in result.message
    stats = broker.statistics().tasks
    assert (stats.retries, stats.tasks_failed, stats.workers) == (1, 1, 0)


def test_a_client_that_comes_back_gets_its_result(
    start_broker: Start, ephemeral: Ephemeral
) -> None:
    keyring, keys = ephemeral
    broker = start_broker(keys=keyring)
    with peers(broker.address, keys) as make:
        client, worker = make(), make()
        client.hello("client")
        worker.hello("worker", capacity=1)
        client.send(p.Submit(b"t"))
        client.expect(p.Ack)
        client.close()  # a new connection with the same session stands for a reconnect
        dispatch = worker.expect(p.Dispatch)
        worker.send(p.Result(dispatch.task, 1, "error", credit=1, payload=(b"exc",)))
        worker.expect(p.Ack)
        again = make(session=client.session)
        assert again.hello("client").resumed
        assert again.expect(p.Result) == p.Result(b"t", 1, "error", payload=(b"exc",))
        again.send(p.Submit(b"t"))  # a re-sent SUBMIT of a held task is only re-ACKed
        assert again.expect(p.Ack) == p.Ack((b"t",))
        again.send(p.Done((b"t",)))
        again.send(p.Submit(b"t"))
        assert again.expect(p.Reject).code == "duplicate"


def test_a_session_cannot_be_taken_over_with_another_key(
    start_broker: Start, tmp_path: Path
) -> None:
    from fabric.broker.keys import generate

    generate(tmp_path, {"alice": ["client"], "mallory": ["client", "worker"]})
    broker = start_broker(keys=tmp_path)
    with peers(broker.address) as make:
        alice = make(PeerKeys.load(tmp_path, "alice"))
        mallory = make(PeerKeys.load(tmp_path, "mallory"), session=alice.session)
        alice.hello("client")
        mallory.send(p.Hello("client", "m", alice.session, PY, CP))
        assert mallory.expect(p.Refuse).code == "session"
        alice.send(p.Hello("worker", "w", make().session, PY, CP))
        refuse = alice.expect(p.Refuse)
        assert (refuse.code, refuse.reason) == (
            "role",
            "this key may not act as worker (allowed: ['client'])",
        )
    assert broker.statistics().refused == 2


@pytest.mark.parametrize("how", ["unknown key", "no CURVE", "wrong server key"])
def test_an_unauthenticated_peer_reaches_no_handler(
    start_broker: Start, ephemeral: Ephemeral, how: str
) -> None:
    import zmq

    keyring, allowed = ephemeral
    service = CountingService()
    broker = start_broker(keys=keyring, services=[service])
    public, secret = zmq.curve_keypair()
    keys = {
        "unknown key": PeerKeys(public, secret, keyring.public),
        "no CURVE": None,
        # an allowed key pair talking to an impostor's server key
        "wrong server key": PeerKeys(allowed.public, allowed.secret, zmq.curve_keypair()[0]),
    }[how]
    with peers(broker.address) as make:
        intruder = make(keys)
        intruder.send(p.Hello("client", "x", intruder.session, PY, CP))
        intruder.send(p.Create("", 1, "dict"))
        intruder.send_raw([b"garbage"])
        assert intruder.silent(0.5)
        # a legitimate peer is served meanwhile, so the loop did run
        friend = make(ephemeral[1])
        friend.hello("client")
        friend.send(p.Create("", 1, "dict"))
        assert friend.expect(p.Reply).payload == (b"1",)
    stats = broker.statistics()
    assert len(service.calls) == 1
    assert (stats.sessions, stats.malformed, stats.refused) == (1, 0, 0)
    if how == "unknown key":
        assert stats.auth_denied >= 2  # the start-up probe and the intruder


def test_the_broker_refuses_to_start_if_the_zap_self_test_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fabric.broker import auth

    monkeypatch.setattr(
        auth.ZapHandler,
        "_answer",
        lambda self, request: [b"1.0", request[1], b"200", b"OK", b"anyone", b""],
    )  # a handler that lets all in
    keyring, _ = Keyring.ephemeral()
    broker = Broker(keys=keyring)
    with pytest.raises(AuthenticationError, match="unlisted CURVE key got in"):
        broker.start()
    broker.close()


def test_non_loopback_bind_needs_keys_or_insecure() -> None:
    with pytest.raises(
        AuthenticationError, match=r"refusing to bind tcp://0\.0\.0\.0:0 without keys"
    ):
        Broker("tcp://0.0.0.0:0")
    Broker("tcp://0.0.0.0:0", insecure=True).close()
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("ipc:///tmp/x")
    assert not is_loopback("tcp://10.0.0.1:5555")


def test_object_calls_reach_the_service_and_host_peers(start_broker: Start) -> None:
    service = CountingService()
    broker = start_broker(services=[service])
    with peers(broker.address) as make:
        client, host = make(), make()
        client.hello("client")
        host.hello("host", "h1")
        client.send(p.Create("", 1, "dict", "shared", payload=(b"args",)))
        assert client.expect(p.Reply) == p.Reply(1, "ok", payload=(b"1",))
        assert service.calls[0] == (
            client.session,
            p.Create("", 1, "dict", "shared", b"", (b"args",)),
        )
        client.send(p.Call("", 2, "o1", "boom"))
        reply = client.expect(p.Reply)
        assert (reply.call, reply.status, reply.message) == (
            2,
            "error",
            "RuntimeError('service bug')",
        )
        client.send(p.Call("h1", 3, "o2", "get", payload=(b"k",)))
        forwarded = host.expect(p.Call)
        assert forwarded == p.Call("h1", 3, "o2", "get", client.session, (b"k",))
        host.send(p.Reply(3, "ok", session=b"x" * 16, payload=(b"forged",)))  # not pending
        host.send(p.Reply(3, "ok", session=client.session, payload=(b"v",)))
        assert client.expect(p.Reply) == p.Reply(3, "ok", payload=(b"v",))
        client.send(p.Call("nobody", 4, "o", "m"))
        assert client.expect(p.Reply).status == "no-host"
        client.send(p.Call("h1", 5, "o2", "get"))
        host.expect(p.Call)
        host.send(p.Bye())
        reply = client.expect(p.Reply)
        assert (reply.call, reply.status) == (5, "host-lost")
        other = make()
        other.hello("host", "h2")
        client.send(p.Bye())
        assert other.expect(p.Gone) == p.Gone(client.session)
    assert client.session in service.lost


def test_back_pressure_rejects_submits_past_the_limit(start_broker: Start) -> None:
    broker = start_broker(limits=Limits(max_tasks=2, busy_retry_after=0.5))
    with peers(broker.address) as make:
        client = make()
        client.hello("client")
        for task in (b"1", b"2", b"3"):
            client.send(p.Submit(task))
        assert [client.recv() for _ in range(2)] == [
            p.Reject(b"3", "busy", "broker holds 2 tasks and 0 bytes", 0.5),
            p.Ack((b"1", b"2")),  # ACKs wait for the tick, a REJECT does not
        ]


def test_accepted_tasks_survive_a_broker_restart(start_broker: Start, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    first = start_broker(journal=journal)
    with peers(first.address) as make:
        client = make()
        client.hello("client")
        for task in (b"a", b"b", b"c"):
            client.send(p.Submit(task, payload=(task * 3,)))
            client.expect(p.Ack)
        client.send(p.Submit(b"d"))
        client.expect(p.Ack)
        client.send(p.Cancel(b"d"))
        client.expect(p.Result)
        client.send(p.Done((b"d",)))
        client.send(p.Status())
        client.expect(p.Stats)  # the DONE was taken (and journaled) before the close
        session = client.session
    first.close()
    second = start_broker(journal=journal)
    assert second.statistics().tasks.queued == 3
    with peers(second.address) as make:
        worker = make()
        worker.hello("worker", capacity=3)
        dispatched = [worker.expect(p.Dispatch) for _ in range(3)]
        assert [d.payload for d in dispatched] == [(b"aaa",), (b"bbb",), (b"ccc",)]
        for d in dispatched:
            worker.send(p.Result(d.task, d.attempt, "ok", credit=1, payload=(d.payload[0][:1],)))
        client = make(session=session)
        assert client.hello("client").resumed
        results = sorted((r.task, r.payload) for r in (client.expect(p.Result) for _ in range(3)))
        assert results == [(b"a", (b"a",)), (b"b", (b"b",)), (b"c", (b"c",))]
        client.send(p.Submit(b"d"))
        assert client.expect(p.Reject).code == "duplicate"


def test_the_broker_heartbeats_idle_peers_and_forgets_silent_ones(start_broker: Start) -> None:
    broker = start_broker(heartbeat=0.05, liveness=3)
    with peers(broker.address) as make:
        peer = make()
        peer.hello("admin")
        assert isinstance(peer.take(timeout=5), p.Heartbeat)
        # the peer never answers: after heartbeat * liveness its session is dropped, and the
        # broker's heartbeats stop
        while isinstance(peer.take(timeout=1), p.Heartbeat):
            pass
        assert broker.statistics().sessions == 0
        peer.send(p.Status())
        assert peer.expect(p.Error).code == "hello-required"


def test_close_is_idempotent_and_releases_the_port(start_broker: Start) -> None:
    import zmq

    broker = start_broker()
    address = broker.address
    broker.close()
    broker.close()
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.bind(address)  # the port is free again


def test_a_broker_that_cannot_open_its_journal_does_not_start(tmp_path: Path) -> None:
    from fabric.broker.journal import JournalError

    broker = Broker(journal=tmp_path)  # a directory
    with pytest.raises(JournalError, match="cannot use"):
        broker.start()
    broker.close()


def test_a_worker_cut_off_and_back_delivers_once_and_the_rerun_is_cancelled(
    start_broker: Start,
) -> None:
    broker = start_broker(heartbeat=0.05, liveness=4)
    with peers(broker.address) as make:
        client, w1, w2 = make(), make(), make()
        client.keepalive = w2.keepalive = 0.02
        client.hello("client")
        w1.hello("worker", "w1", capacity=1)
        client.send(p.Submit(b"t"))
        client.expect(p.Ack)
        first = w1.expect(p.Dispatch)  # then w1 is cut off (silent) past its liveness
        w2.hello("worker", "w2", capacity=1)
        second = None
        while not isinstance(second, p.Dispatch):  # the client and w2 keep talking meanwhile
            client.send(p.Heartbeat())
            w2.send(p.Heartbeat())
            second = w2.take(0.02)
        assert (first.attempt, second.attempt) == (1, 2)
        w1.hello("worker", "w1", capacity=0)  # back, on the same session, with its old result
        w1.send(p.Result(first.task, 1, "ok", credit=1, payload=(b"from w1",)))
        assert w1.expect(p.Ack) == p.Ack((first.task,), (1,))
        assert client.expect(p.Result) == p.Result(b"t", 1, "ok", payload=(b"from w1",))
        assert w2.expect(p.Cancel) == p.Cancel(second.task, 2)
        w2.send(p.Result(second.task, 2, "ok", credit=1, payload=(b"from w2",)))
        assert w2.expect(p.Ack) == p.Ack((second.task,), (2,))
        assert client.silent(0.3)  # no second result
    stats = broker.statistics().tasks
    assert (stats.tasks_done, stats.duplicates, stats.retries) == (1, 1, 1)


def test_sessions_past_the_limit_are_refused(start_broker: Start) -> None:
    broker = start_broker(max_sessions=1)
    with peers(broker.address) as make:
        first, second = make(), make()
        first.keepalive = 0.05
        first.hello("client")
        second.send(p.Hello("client", "late", second.session, PY, CP))
        refuse = second.expect(p.Refuse)
        assert (refuse.code, refuse.reason) == ("busy", "the broker holds 1 sessions")
        first.send(p.Status())
        assert first.expect(p.Stats).stats["sessions"] == 1


def test_a_local_call_runs_in_the_callers_thread_and_others_hear_through_the_loop(
    start_broker: Start,
) -> None:
    service = CountingService()
    broker = start_broker(services=[service])
    with peers(broker.address) as make:
        client, host, worker = make(), make(), make()
        client.hello("client")
        host.hello("host", "h1")
        worker.hello("worker", capacity=0)
        parked: list[int] = []
        replies = broker.call_local(
            client.session, p.Call("", 1, "o1", "get"), lambda: parked.append(1)
        )
        assert replies == [p.Reply(1, "ok", payload=(b"1",))] and parked == []
        assert service.calls == [(client.session, p.Call("", 1, "o1", "get"))]
        # a call for a host peer is forwarded by the loop; its reply comes over the socket
        call = p.Call("h1", 2, "o2", "get")
        assert broker.call_local(client.session, call, lambda: parked.append(2)) == []
        assert parked == [2]
        assert host.expect(p.Call) == p.Call("h1", 2, "o2", "get", client.session)
        host.send(p.Reply(2, "ok", session=client.session, payload=(b"v",)))
        assert client.expect(p.Reply) == p.Reply(2, "ok", payload=(b"v",))
        for stranger in (worker.session, b"x" * 16):  # a worker may not call; nobody's session
            with pytest.raises(LookupError):
                broker.call_local(stranger, p.Call("", 3, "o1", "get"))
    assert len(service.calls) == 1


def test_a_peer_on_the_inproc_endpoint_skips_curve_but_not_the_protocol(
    start_broker: Start, ephemeral: Ephemeral
) -> None:
    import zmq

    keyring, keys = ephemeral
    broker = start_broker(keys=keyring)
    context, address = broker.local_endpoint()  # only code holding the Broker gets these
    local = context.socket(zmq.DEALER)
    local.linger = 0
    try:
        local.connect(address)
        session = b"L" * 16
        local.send_multipart(p.encode(p.Submit(b"early")))
        assert local.poll(10_000)
        assert p.decode(local.recv_multipart()) == p.Error("hello-required", "send HELLO first")
        local.send_multipart(p.encode(p.Hello("worker", "local", session, PY, CP, 1)))
        assert local.poll(10_000)
        assert isinstance(p.decode(local.recv_multipart()), p.Welcome)
        with peers(broker.address, keys) as make:
            client = make()
            client.hello("client")
            client.send(p.Submit(b"t", payload=(b"x",)))
            assert local.poll(10_000)
            (dispatch,) = p.decode_many(local.recv_multipart())
        assert isinstance(dispatch, p.Dispatch) and dispatch.payload == (b"x",)
    finally:
        local.close()
    broker.close()
    with pytest.raises(FabricError, match="not serving"):
        broker.local_endpoint()


def test_a_batch_is_taken_entry_by_entry_and_answered_in_batches(start_broker: Start) -> None:
    broker = start_broker()
    with peers(broker.address) as make:
        client, worker = make(), make()
        client.hello("client")
        worker.hello("worker", capacity=3)
        submits = [p.Submit(b"t%d" % n, payload=(b"call%d" % n,)) for n in range(3)]
        (frames,) = p.encode_many([*submits, p.Credit(1)])  # a client may not send CREDIT
        client.send_raw([bytes(frame) for frame in frames])
        assert client.expect(p.Error).code == "forbidden"  # that entry alone
        dispatches = [worker.expect(p.Dispatch) for _ in submits]
        assert [d.payload for d in dispatches] == [s.payload for s in submits]
        results = [p.Result(d.task, 1, "ok", credit=1, payload=(b"r",)) for d in dispatches]
        (frames,) = p.encode_many(results)
        worker.send_raw([bytes(frame) for frame in frames])
        got = set()
        while len(got) < len(submits):
            message = client.recv()
            assert isinstance(message, p.Result | p.Ack), message  # ACKs may come first
            if isinstance(message, p.Result):
                got.add(message.task)
        stats = broker.statistics()
    assert got == {b"t0", b"t1", b"t2"}
    assert (stats.tasks.tasks_done, stats.forbidden, stats.malformed) == (3, 1, 0)


def test_also_bind_needs_keys_unless_loopback(tmp_path: Path) -> None:
    with pytest.raises(AuthenticationError, match=r"refusing to bind tcp://0\.0\.0\.0:0"):
        Broker(also_bind=("tcp://0.0.0.0:0",))
    Broker(also_bind=(f"ipc://{tmp_path}/broker",)).close()  # same machine only: no keys needed
