"""The wire codec: round trips, and every malformed input is a ProtocolError, never a crash."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.broker import protocol as p
from fabric.errors import ProtocolError, VersionMismatchError
from tests.broker.strategies import MESSAGE_CLASSES, hostile_frames, message_of, messages

SESSION = b"s" * 16


def _frames(kind: int, control: object, *payload: bytes, version: int = p.VERSION) -> list[bytes]:
    return [p.MAGIC + bytes((version, kind)) + msgpack.packb(control), *payload]


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_every_message_round_trips(cls: type[p.Message], data: st.DataObject) -> None:
    message = data.draw(message_of(cls))
    frames = p.encode(message)
    assert bytes(frames[0][:4]) == p.MAGIC + bytes((p.VERSION, cls.TYPE))
    assert p.decode(frames) == message


def test_type_bytes_are_unique() -> None:
    assert len({cls.TYPE for cls in p.MESSAGES}) == len(p.MESSAGES)


def test_payload_frames_pass_through_untouched() -> None:
    blob = memoryview(b"\x80\x05opaque pickle")
    frames = p.encode(p.Submit(task=b"t", payload=(blob, b"")))
    assert frames[1] is blob
    decoded = p.decode(frames)
    assert isinstance(decoded, p.Submit)
    assert decoded.payload == (blob, b"")


def test_decode_accepts_memoryviews() -> None:
    frames = [memoryview(bytes(f)) for f in p.encode(p.Credit(n=3))]
    assert p.decode(frames) == p.Credit(n=3)


def test_unknown_keys_are_ignored_and_defaults_fill_in() -> None:
    frames = _frames(p.Ack.TYPE, {"tasks": [b"t"], "future": [1, 2]})
    assert p.decode(frames) == p.Ack(tasks=(b"t",), attempts=())


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([], "empty"),
        ([b"FB"], "magic"),
        ([b"XX\x01\x04\x80"], "magic"),
        ([b"FB\x03\x00\x80"], "unknown message type"),
        (_frames(p.Credit.TYPE, {}), "lacks field 'n'"),
        (_frames(p.Credit.TYPE, {"n": -1}), "non-negative"),
        (_frames(p.Credit.TYPE, {"n": True}), "non-negative"),
        (_frames(p.Credit.TYPE, {"n": 2**63}), "non-negative"),
        (_frames(p.Credit.TYPE, [1]), "not a msgpack map"),
        (_frames(p.Credit.TYPE, {"n": 1}, b"payload"), "takes no payload"),
        (_frames(p.Ack.TYPE, {"tasks": ["text"]}), "expected bytes"),
        (_frames(p.Ack.TYPE, {"tasks": [b"x" * 97]}), "at most 96"),
        (_frames(p.Ack.TYPE, {"tasks": [b"x"], "attempts": [1, 2]}), "one to one"),
        (_frames(p.Ack.TYPE, {"tasks": [b"x"], "attempts": [-1]}), "non-negative"),
        (_frames(p.Reclaim.TYPE, {"tasks": [b"x"], "attempts": []}), "one to one"),
        (_frames(p.Reclaim.TYPE, {"tasks": [b"x"]}), "lacks field 'attempts'"),
        (_frames(p.Submit.TYPE, {"task": b"x" * 65}), "task id over 64"),
        (_frames(p.Done.TYPE, {"tasks": [b"x" * 65]}), "task id over 64"),
        (
            _frames(p.Reject.TYPE, {"task": b"", "code": "busy", "reason": "", "retry_after": -1}),
            "non-negative float",
        ),
        (
            _frames(
                p.Reject.TYPE, {"task": b"", "code": "", "reason": "", "retry_after": float("nan")}
            ),
            "finite",
        ),
        (
            _frames(
                p.Hello.TYPE,
                {"role": "root", "name": "", "session": SESSION, "python": "", "cloudpickle": ""},
            ),
            "unknown role",
        ),
        (
            _frames(
                p.Hello.TYPE,
                {
                    "role": "client",
                    "name": "",
                    "session": b"short",
                    "python": "",
                    "cloudpickle": "",
                },
            ),
            "16 bytes",
        ),
        (_frames(p.Result.TYPE, {"task": b"t", "attempt": 1, "status": "great"}), "status"),
        (_frames(p.Submit.TYPE, {"task": b"t", "requires": {"a": 1}}), "expected str"),
        (_frames(p.Done.TYPE, {"tasks": [b"a", 1]}), "expected bytes"),
        ([b"FB\x03\x16" + b"\xc1"], "not valid msgpack"),
        ([b"FB\x03\x16" + msgpack.packb({"tasks": []}) + b"\x00"], "not valid msgpack"),
        ([b"FB\x03\x16" + b"\x91" * 2000], "not valid msgpack"),
        ([b"FB\x03\x16" + msgpack.packb(msgpack.ExtType(1, b"x"))], "not valid msgpack"),
        ([b"FB\x03\x16" + b"\x80" + b"\x00" * p.MAX_CONTROL_BYTES], "over"),
        (_frames(p.Submit.TYPE, {"task": b"t"}, *[b""] * (p.MAX_PAYLOAD_FRAMES + 1)), "payload"),
    ],
)
def test_malformed_frames_are_protocol_errors(frames: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        p.decode(frames)


def test_other_version_is_a_version_mismatch_naming_both() -> None:
    with pytest.raises(VersionMismatchError, match=f"version 9, this side speaks {p.VERSION}"):
        p.decode(_frames(p.Heartbeat.TYPE, {}, version=9))


@settings(max_examples=2000)
@given(hostile_frames())
def test_hostile_frames_decode_or_raise_protocol_error(frames: list[bytes]) -> None:
    try:
        message = p.decode(frames)
    except (ProtocolError, VersionMismatchError):
        return
    assert isinstance(message, p.Message)
    assert p.decode(p.encode(message)) == message


@settings(max_examples=1000)
@given(st.lists(st.binary(max_size=32), max_size=4))
def test_random_bytes_never_escape_as_other_errors(frames: list[bytes]) -> None:
    with contextlib.suppress(ProtocolError, VersionMismatchError):
        p.decode(frames)


@given(messages, st.data())
def test_every_truncation_of_a_message_is_rejected_or_valid(
    message: p.Message, data: st.DataObject
) -> None:
    head, *payload = p.encode(message)
    cut = data.draw(st.integers(0, len(head) - 1))
    try:
        p.decode([bytes(head[:cut]), *payload])
    except ProtocolError:
        return
    # msgpack maps are self-delimiting, so a shorter prefix never decodes
    pytest.fail(f"a {cut}-byte prefix of {message!r} decoded")


def test_roles_only_send_their_messages() -> None:
    assert p.Submit in p.SENDABLE["client"]
    assert p.Submit not in p.SENDABLE["worker"]
    assert p.Result in p.SENDABLE["worker"]
    assert p.Result not in p.SENDABLE["client"]
    assert p.Reply in p.SENDABLE["host"]
    assert p.SENDABLE["admin"] == {p.Hello, p.Heartbeat, p.Bye, p.Error, p.Status}
    broker_only = {p.Welcome, p.Refuse, p.Ack, p.Reject, p.Dispatch, p.Reclaim, p.Gone, p.Stats}
    assert not any(broker_only & sendable for sendable in p.SENDABLE.values())


# --- batches ------------------------------------------------------------------------


@given(st.lists(messages, min_size=1, max_size=40))
def test_messages_round_trip_through_batches_in_order(batch: list[p.Message]) -> None:
    decoded = []
    for frames in p.encode_many(batch):
        assert bytes(frames[0][:3]) == p.MAGIC + bytes((p.VERSION,))  # the version, every time
        decoded += p.decode_many([bytes(frame) for frame in frames])
    assert decoded == batch


def test_a_lone_message_with_a_small_payload_travels_as_one_frame() -> None:
    message = p.Dispatch(b"t", 1, (b"call", b"buffer"))
    (frames,) = p.encode_many([message])
    assert frames == p.encode_alone(message) and len(frames) == 1  # a one-entry BATCH
    assert frames[0][3] == p.BATCH and p.decode_many(frames) == [message]
    assert p.decode_many(p.encode(message)) == [message]  # the plain form still decodes


@pytest.mark.parametrize(
    "message",
    [p.Credit(1), p.Dispatch(b"t", 1), p.Dispatch(b"t", 1, (b"x" * (p.INLINE_BYTES + 1),))],
)
def test_a_lone_message_without_a_small_payload_goes_in_the_plain_form(
    message: p.Message,
) -> None:
    assert p.encode_many([message]) == [p.encode_alone(message)] == [p.encode(message)]


@given(messages)
def test_every_message_round_trips_alone(message: p.Message) -> None:
    frames = [bytes(frame) for frame in p.encode_alone(message)]
    assert p.decode_many(frames) == [message]


def test_small_payloads_travel_inline_and_big_ones_as_frames() -> None:
    big = memoryview(b"x" * (p.INLINE_BYTES + 1))
    small = [p.Result(b"%d" % n, 1, "ok", payload=(b"v",)) for n in range(3)]
    (frames,) = p.encode_many([*small, p.Dispatch(b"b", 1, (big,))])
    assert len(frames) == 2 and frames[1] is big  # one control frame, the big payload untouched
    assert p.decode_many(frames)[:3] == small


def test_batches_split_at_their_limits() -> None:
    many = [p.Ack((b"%d" % n,)) for n in range(p.MAX_BATCH + 1)]
    assert [len(p.decode_many(frames)) for frames in p.encode_many(many)] == [p.MAX_BATCH, 1]
    heavy = [p.Result(b"%d" % n, 1, "ok", payload=(b"y" * p.INLINE_BYTES,)) for n in range(100)]
    out = p.encode_many(heavy)
    assert len(out) > 1 and all(len(frames[0]) <= p.MAX_CONTROL_BYTES + 4 for frames in out)
    assert [m for frames in out for m in p.decode_many(frames)] == heavy


def _batch(entries: object, *payload: bytes) -> list[bytes]:
    return _frames(p.BATCH, entries, *payload)


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (_batch([]), "1 to"),
        (_batch([[p.Credit.TYPE, {"n": 1}, 0]] * (p.MAX_BATCH + 1)), "1 to"),
        (_batch({"n": 1}), "not a msgpack array"),
        (_batch([[p.Credit.TYPE, {"n": 1}, 0], [p.Credit.TYPE, {"n": 1}]]), "not \\[type"),
        (_batch([[p.Credit.TYPE, {"n": 1}, 0], [p.BATCH, {}, 0]]), "unknown message type"),
        (_batch([[p.Credit.TYPE, {"n": 1}, 0], [p.Credit.TYPE, [1], 0]]), "not a msgpack map"),
        (_batch([[p.Credit.TYPE, {"n": 1}, 0], [p.Credit.TYPE, {"n": -1}, 0]]), "non-negative"),
        (_batch([[p.Submit.TYPE, {"task": b"a"}, 1]] * 2, b"x"), "fewer payload frames"),
        (_batch([[p.Submit.TYPE, {"task": b"a"}, 0]] * 2, b"x"), "more payload frames"),
        (_batch([[p.Submit.TYPE, {"task": b"a"}, -1]] * 2), "neither a frame count"),
        (_batch([[p.Submit.TYPE, {"task": b"a"}, ["s"]]] * 2), "other than bytes"),
        (_batch([[p.Credit.TYPE, {"n": 1}, [b"x"]]] * 2), "takes no payload"),
    ],
)
def test_malformed_batches_are_refused_whole(frames: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        p.decode_many(frames)


def test_decode_alone_never_returns_a_batch() -> None:
    with pytest.raises(ProtocolError, match="unknown message type"):
        p.decode(_batch([[p.Credit.TYPE, {"n": 1}, 0]] * 2))


@given(st.lists(messages, min_size=2, max_size=6), st.data())
def test_every_truncation_of_a_batch_is_rejected(
    batch: list[p.Message], data: st.DataObject
) -> None:
    head, *payload = p.encode_many(batch)[0]
    cut = data.draw(st.integers(0, len(head) - 1))
    with pytest.raises(ProtocolError):
        p.decode_many([bytes(head[:cut]), *payload])
