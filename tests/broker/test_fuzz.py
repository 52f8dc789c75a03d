"""A live fuzzer: an authenticated peer throws thousands of hostile messages at a broker process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.broker import protocol as p
from fabric.broker.keys import PeerKeys, generate
from fabric.errors import ProtocolError, VersionMismatchError
from tests.broker.conftest import BrokerProcess
from tests.broker.peers import peers
from tests.broker.strategies import hostile_frames, messages

CASES = 4000
RSS_SLACK = 24 << 20

hostile = st.one_of(
    hostile_frames(),
    messages.map(lambda m: [bytes(frame) for frame in p.encode(m)]),  # valid but out of place
    st.lists(messages, min_size=2, max_size=5).map(  # batches of those
        lambda ms: [bytes(frame) for frame in p.encode_many(ms)[0]]
    ),
    st.lists(st.binary(max_size=64), min_size=1, max_size=4),  # not even a header
)


def test_the_broker_survives_hostile_frames_from_an_authenticated_peer(
    broker_process: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    generate(tmp_path, {"fuzzer": ["client", "worker", "host", "admin"], "probe": ["admin"]})
    broker = broker_process("--keys", str(tmp_path), "--max-tasks", "1000")
    broker.start()
    sent = malformed = 0
    with peers(broker.address, PeerKeys.load(tmp_path, "fuzzer")) as make:
        fuzzer = make()
        fuzzer.hello("client")

        @settings(max_examples=CASES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(hostile)
        def case(frames: list[bytes]) -> None:
            nonlocal sent, malformed
            try:
                p.decode_many(frames)
            except VersionMismatchError:
                pass
            except ProtocolError:
                malformed += 1
            fuzzer.send_raw(frames)
            sent += 1
            while fuzzer.socket.poll(0):  # read replies so no queue fills up
                fuzzer.socket.recv_multipart(zmq.NOBLOCK)
            if sent == CASES // 4:
                state["warm"] = broker.rss()

        state: dict[str, int] = {}
        case()
        # the broker still serves a well-behaved peer, and counted the garbage
        probe = make(PeerKeys.load(tmp_path, "probe"))
        probe.keepalive = 0.1
        probe.hello("admin")
        probe.send(p.Status())
        stats = probe.expect(p.Stats).stats
    assert broker.alive()
    assert sent >= CASES
    assert stats["malformed"] == malformed  # every message reached the parser, none crashed it
    assert stats["sessions"] <= 1 + CASES  # bounded by liveness, not by what was sent
    assert broker.rss() - state["warm"] < RSS_SLACK
