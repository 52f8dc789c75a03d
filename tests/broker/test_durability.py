"""Kill the broker (SIGKILL) in the middle of a run, restart it on its journal, and count."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fabric.broker import protocol as p
from fabric.broker.keys import PeerKeys, generate
from tests.broker.conftest import BrokerProcess
from tests.broker.peers import Peer, PeerFactory, peers

N = 300


class Run:
    """One client submitting N tasks and one echo worker, both able to re-join a new broker."""

    def __init__(self, keydir: Path) -> None:
        self.client_keys = PeerKeys.load(keydir, "client")
        self.worker_keys = PeerKeys.load(keydir, "worker")
        self.acked: set[bytes] = set()
        self.results: dict[bytes, list[bytes]] = {}
        self.next = 0
        self.client_session = self.worker_session = b""

    def join(self, make: PeerFactory) -> tuple[Peer, Peer]:
        client = make(self.client_keys, session=self.client_session or None)
        worker = make(self.worker_keys, session=self.worker_session or None)
        self.client_session, self.worker_session = client.session, worker.session
        client.keepalive = worker.keepalive = 0.05
        client.hello("client")
        worker.hello("worker", capacity=8)
        # Lazy Pirate: re-send every SUBMIT the broker never acknowledged (ACK or RESULT)
        for i in range(self.next):
            task = b"%d" % i
            if task not in self.acked and task not in self.results:
                client.send(p.Submit(task, payload=(task,)))
        return client, worker

    def pump(
        self, client: Peer, worker: Peer, until: Callable[[], bool], serve: bool = True
    ) -> None:
        """Submit, collect and (if ``serve``) run tasks until ``until()`` holds (30 s at most)."""
        deadline = time.monotonic() + 30
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.results)} results of {N} after 30 s")
            if self.next < N and len(self.acked | self.results.keys()) + 64 > self.next:
                task = b"%d" % self.next
                client.send(p.Submit(task, payload=(task,)))
                self.next += 1
            while serve and (message := worker.take()) is not None:
                if isinstance(message, p.Dispatch):
                    result = p.Result(message.task, message.attempt, "ok", credit=1,
                                      payload=(b"echo:" + bytes(message.payload[0]),))  # fmt: skip
                    worker.send(result)
            while (message := client.take(0 if self.next < N else 0.005)) is not None:
                if isinstance(message, p.Ack):
                    self.acked.update(message.tasks)
                elif isinstance(message, p.Result):
                    assert message.status == "ok"
                    self.results.setdefault(message.task, []).append(bytes(message.payload[0]))
                    client.send(p.Done((message.task,)))


@pytest.mark.parametrize("fsync", ["os", "always"])
def test_no_accepted_task_is_lost_when_the_broker_is_killed(
    broker_process: Callable[..., BrokerProcess], tmp_path: Path, fsync: str
) -> None:
    keydir = tmp_path / "keys"
    generate(keydir)
    journal = tmp_path / "journal"
    broker = broker_process("--keys", str(keydir), "--journal", str(journal), "--fsync", fsync)
    broker.start()
    run = Run(keydir)
    with peers(broker.address) as make:
        client, worker = run.join(make)
        run.pump(client, worker, until=lambda: len(run.results) >= N // 3)
        # then the worker stalls until the broker holds tasks it ACKed (at a tick: ACKs are
        # batched, see acks.py) that have not run: tasks queued, running and awaiting DONE
        run.pump(client, worker, lambda: len(run.acked - run.results.keys()) >= 16, serve=False)
        broker.kill()  # SIGKILL, mid-run: tasks queued, running and awaiting DONE
    acked_before_kill = set(run.acked)
    delivered_before_kill = set(run.results)
    broker.start()
    with peers(broker.address) as make:
        client, worker = run.join(make)
        run.pump(client, worker, until=lambda: len(run.results) == N)
        client.send(p.Status())
        stats = client.expect(p.Stats).stats
    assert acked_before_kill - delivered_before_kill, "the kill hit no task in flight"
    assert set(run.results) == {b"%d" % i for i in range(N)}  # nothing lost
    assert all(set(v) == {b"echo:" + k} for k, v in run.results.items())
    # duplicates only come from the kill window: results delivered but not yet DONE'd
    duplicated = {k for k, v in run.results.items() if len(v) > 1}
    assert duplicated <= delivered_before_kill
    assert (stats["queued"], stats["in_flight"]) == (0, 0)
