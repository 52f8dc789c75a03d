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
        ([b"FB\x02\x00\x80"], "unknown message type"),
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
        ([b"FB\x02\x16" + b"\xc1"], "not valid msgpack"),
        ([b"FB\x02\x16" + msgpack.packb({"tasks": []}) + b"\x00"], "not valid msgpack"),
        ([b"FB\x02\x16" + b"\x91" * 2000], "not valid msgpack"),
        ([b"FB\x02\x16" + msgpack.packb(msgpack.ExtType(1, b"x"))], "not valid msgpack"),
        ([b"FB\x02\x16" + b"\x80" + b"\x00" * p.MAX_CONTROL_BYTES], "over"),
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
    broker_only = {p.Welcome, p.Refuse, p.Ack, p.Reject, p.Dispatch, p.Gone, p.Stats}
    assert not any(broker_only & sendable for sendable in p.SENDABLE.values())
