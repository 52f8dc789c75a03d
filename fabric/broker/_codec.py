"""The wire codec: typed messages to ZeroMQ frames and back, with no socket in sight.

Theory of operation. Every message is one multipart ZeroMQ message (after the
ROUTER routing id, which the server strips and adds)::

    frame 0   b"FB" | version u8 | type u8 | msgpack map of the control fields
    frame 1.. opaque payload frames (cloudpickle bytes made and read only at the edges)

Several messages for the same peer may travel as one BATCH (since version 3)::

    frame 0   b"FB" | version u8 | 0x06 | msgpack array of [type, control map, payload]
    frame 1.. the payload frames of the entries whose payload is a frame count

An entry's payload is either a msgpack array of bin (small payloads travel
inside the control frame: one frame, one CURVE box and one send for the
batch) or the number of payload frames of its own that follow, in entry
order (big payloads are never copied into the control frame).

A sender batches only what is already waiting to go (never waits to fill a
batch); a receiver takes the entries in order, exactly as if each had come
alone. A lone message with a small payload travels as a one-entry BATCH
(``encode_alone``): one frame instead of two, so one CURVE box and one send.
``encode_many`` and ``decode_many`` speak both forms.

The 4-byte fixed header carries the protocol version and the message type in
every message, so a peer of another version is recognised from any message,
not only from HELLO. The control map is decoded with strict limits and
checked against the message's schema, which is the dataclass itself: each
field's type hint picks its checker. Unknown keys are ignored (a newer peer
may add optional fields); missing keys without a default and wrong types are a
:class:`~fabric.errors.ProtocolError`. Payload frames are never looked at.

``decode(encode(m)) == m`` for every message ``m``, and ``decode`` of any
sequence of frames either returns a message or raises ``ProtocolError`` (or
``VersionMismatchError`` for another protocol version): nothing else. The
tests hold both with hypothesis.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from fabric.broker._messages import (
    MESSAGES,
    ROLES,
    SESSION_BYTES,
    STATUSES,
    Ack,
    Buffer,
    Cancel,
    Done,
    Hello,
    Message,
    Payload,
    Reclaim,
    Result,
    Submit,
)
from fabric.errors import ProtocolError, VersionMismatchError

MAGIC = b"FB"
VERSION = 3
BATCH = 0x06  # the type byte of a BATCH (not a message of its own: see decode_many)
MAX_CONTROL_BYTES = 64 * 1024
MAX_PAYLOAD_FRAMES = 256
MAX_ID_BYTES = 96
MAX_TASK_ID_BYTES = 64  # a client task id; the broker prefixes it with the 16-byte session
MAX_STR_CHARS = 4096
MAX_ITEMS = 4096
MAX_BATCH = 256  # entries per BATCH
INLINE_BYTES = 1024  # a batch entry's payload up to this size travels in the control frame

# --- per-field checkers, picked by each field's type hint -----------------------------

_Check = Callable[[Any], Any]


def _fail(what: str) -> ProtocolError:
    return ProtocolError(f"bad control field: {what}")


def _check_bytes(value: Any) -> bytes:
    if type(value) is not bytes or len(value) > MAX_ID_BYTES:
        raise _fail(f"expected bytes of at most {MAX_ID_BYTES}, got {type(value).__name__}")
    return value


def _check_str(value: Any) -> str:
    if type(value) is not str or len(value) > MAX_STR_CHARS:
        raise _fail(f"expected str of at most {MAX_STR_CHARS} chars, got {type(value).__name__}")
    return value


def _check_int(value: Any) -> int:
    if type(value) is not int or not 0 <= value < 2**63:
        raise _fail(f"expected a non-negative int64, got {value!r:.40}")
    return value


def _check_bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _fail(f"expected bool, got {type(value).__name__}")
    return value


def _check_float(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise _fail(f"expected a finite non-negative float, got {value!r:.40}")
    return float(value)


def _check_ids(value: Any) -> tuple[bytes, ...]:
    if type(value) is not tuple or len(value) > MAX_ITEMS:
        raise _fail(f"expected a list of at most {MAX_ITEMS} ids")
    return tuple(_check_bytes(item) for item in value)


def _check_ints(value: Any) -> tuple[int, ...]:
    if type(value) is not tuple or len(value) > MAX_ITEMS:
        raise _fail(f"expected a list of at most {MAX_ITEMS} ints")
    return tuple(_check_int(item) for item in value)


def _check_labels(value: Any) -> dict[str, str]:
    if type(value) is not dict or len(value) > 64:
        raise _fail("expected a map of at most 64 str -> str")
    return {_check_str(k): _check_str(v) for k, v in value.items()}


def _check_map(value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise _fail("expected a map")
    return value


# The same tests inline, for the generated decoders: a valid field costs no call (the
# checker still runs, and raises, for any value that fails its test).
_VALID: dict[Any, str] = {
    bytes: f"type(v) is bytes and len(v) <= {MAX_ID_BYTES}",
    str: f"type(v) is str and len(v) <= {MAX_STR_CHARS}",
    int: f"type(v) is int and 0 <= v < {2**63}",
    bool: "type(v) is bool",
    dict[str, str]: "type(v) is dict and not v",  # no labels, nothing to look at
}

_CHECKS: dict[Any, _Check] = {
    bytes: _check_bytes,
    str: _check_str,
    int: _check_int,
    bool: _check_bool,
    float: _check_float,
    tuple[bytes, ...]: _check_ids,
    tuple[int, ...]: _check_ints,
    dict[str, str]: _check_labels,
    dict[str, Any]: _check_map,
}


# --- the rules the per-field checkers cannot see ------------------------------------


def _valid_hello(message: Hello) -> None:
    if message.role not in ROLES:
        raise ProtocolError(f"unknown role {message.role!r}")
    if len(message.session) != SESSION_BYTES:
        raise ProtocolError(f"session id must be {SESSION_BYTES} bytes")


def _valid_result(message: Result) -> None:
    if message.status not in STATUSES:
        raise ProtocolError(f"unknown result status {message.status!r}")


def _valid_client_task(message: Submit | Cancel) -> None:
    if len(message.task) > MAX_TASK_ID_BYTES:
        raise ProtocolError(f"task id over {MAX_TASK_ID_BYTES} bytes")


def _valid_done(message: Done) -> None:
    if any(len(task) > MAX_TASK_ID_BYTES for task in message.tasks):
        raise ProtocolError(f"task id over {MAX_TASK_ID_BYTES} bytes")


def _valid_ack(message: Ack) -> None:
    if message.attempts and len(message.attempts) != len(message.tasks):
        raise ProtocolError("ACK attempts must be empty or match its tasks one to one")


def _valid_reclaim(message: Reclaim) -> None:
    if len(message.attempts) != len(message.tasks):
        raise ProtocolError("RECLAIM attempts must match its tasks one to one")


_RULES: dict[type[Message], Callable[[Any], None]] = {
    Hello: _valid_hello,
    Result: _valid_result,
    Submit: _valid_client_task,
    Cancel: _valid_client_task,
    Done: _valid_done,
    Ack: _valid_ack,
    Reclaim: _valid_reclaim,
}


# --- per-message codecs, generated once from the dataclasses --------------------------

_BATCH_HEADER = MAGIC + bytes((VERSION, BATCH))
_pack = msgpack.Packer(use_bin_type=True).pack

_Decoder = Callable[[dict[str, Any], Payload], Message]
_Encoder = Callable[[Any], list[Buffer]]
_Entry = tuple[Message, bytes, Payload]


@dataclass(frozen=True, slots=True)
class _Codec:
    cls: type[Message]
    header: bytes
    has_payload: bool
    decode: _Decoder
    encode: _Encoder
    alone: _Encoder
    entry: Callable[[Any], _Entry]  # a BATCH entry: (message, packed entry, frames of its own)


def _codec(cls: type[Message]) -> _Codec:
    """Compile a decoder and an encoder for ``cls`` from its fields and their type hints.

    Generated source, like ``dataclasses`` itself does, so the hot path runs
    one straight function per message instead of a loop over field specs.
    """
    hints = typing.get_type_hints(cls)
    header = MAGIC + bytes((VERSION, cls.TYPE))
    env: dict[str, Any] = {
        "cls": cls,
        "header": header,
        "alone_header": MAGIC + bytes((VERSION, BATCH, 0x91, 0x93, cls.TYPE)),
        "INLINE_BYTES": INLINE_BYTES,
        "packb": msgpack.packb,
        "pack": _pack,
        "MISSING": dataclasses.MISSING,
        "ProtocolError": ProtocolError,
        "rule": _RULES.get(cls),
        "TYPE": cls.TYPE,
    }
    lines = ["def decode(control, payload):", "    get = control.get"]
    args, keys = [], []
    has_payload = False
    for n, f in enumerate(dataclasses.fields(cls)):
        if f.name == "payload":
            has_payload = True
            args.append("payload")
            continue
        env[f"check{n}"], env[f"default{n}"] = _CHECKS[hints[f.name]], f.default
        env[f"factory{n}"] = f.default_factory
        valid = _VALID.get(hints[f.name])
        checked = f"v if {valid} else check{n}(v)" if valid else f"check{n}(v)"
        lines.append(f"    v = get({f.name!r}, MISSING)")
        if f.default is not dataclasses.MISSING:
            lines.append(f"    f{n} = default{n} if v is MISSING else {checked}")
        elif f.default_factory is not dataclasses.MISSING:
            lines.append(f"    f{n} = factory{n}() if v is MISSING else {checked}")
        else:
            lacks = f"{cls.__name__} lacks field {f.name!r}"
            lines += ["    if v is MISSING:", f"        raise ProtocolError({lacks!r})"]
            lines.append(f"    f{n} = {checked}")
        args.append(f"f{n}")
        keys.append(f"{f.name!r}: m.{f.name}")
    lines.append(f"    message = cls({', '.join(args)})")
    if env["rule"] is not None:
        lines.append("    rule(message)")
    lines.append("    return message")
    control = "packb({" + ", ".join(keys) + "}, use_bin_type=True)"
    tail = ", *m.payload" if has_payload else ""
    lines += ["def encode(m):", f"    return [header + {control}{tail}]"]
    fields = "{" + ", ".join(keys) + "}"
    lines += ["def entry(m):", f"    payload = {'m.payload' if has_payload else '()'}"]
    lines += [
        "    if sum(map(len, payload)) <= INLINE_BYTES:",
        f"        return m, pack([TYPE, {fields}, payload]), ()",
        f"    return m, pack([TYPE, {fields}, len(payload)]), payload",
    ]
    lines += ["def alone(m):"]
    if has_payload:  # a small payload rides in frame 0: a one-entry BATCH, one frame in all
        lines += [
            "    payload = m.payload",
            "    if payload and sum(map(len, payload)) <= INLINE_BYTES:",
            "        return [alone_header + pack({" + ", ".join(keys) + "}) + pack(payload)]",
        ]
    lines += [f"    return [header + {control}{tail}]"]
    exec("\n".join(lines), env)  # the source is built above from our own dataclasses
    codec = env["decode"], env["encode"], env["alone"], env["entry"]
    return _Codec(cls, header, has_payload, *codec)


_BY_TYPE: dict[int, _Codec] = {cls.TYPE: _codec(cls) for cls in MESSAGES}
_BY_CLASS: dict[type[Message], _Codec] = {c.cls: c for c in _BY_TYPE.values()}


def encode(message: Message) -> list[Buffer]:
    """Turn ``message`` into frames: the header+control frame, then its payload frames."""
    return _BY_CLASS[type(message)].encode(message)


def encode_alone(message: Message) -> list[Buffer]:
    """Turn a message that travels alone into the fewest frames: ``decode_many`` reads them.

    A payload of up to ``INLINE_BYTES`` in all rides in the control frame as a
    one-entry BATCH (one frame, one CURVE box, one send instead of two); any
    other message takes the plain form of :func:`encode`.
    """
    return _BY_CLASS[type(message)].alone(message)


def encode_many(messages: Sequence[Message]) -> list[list[Buffer]]:
    """Turn messages for one peer into as few ZeroMQ messages as the limits allow.

    Return the frames of each ZeroMQ message, in order: a message alone, or a
    BATCH of several (at most ``MAX_BATCH``, control frame within
    ``MAX_CONTROL_BYTES``). Payloads of up to ``INLINE_BYTES`` in all travel
    inside the batch's control frame, bigger ones as frames of their own.
    """
    if len(messages) == 1:  # the common case when idle: no entry to pack
        return [encode_alone(messages[0])]
    out: list[list[Buffer]] = []
    chunk: list[_Entry] = []
    size = 0
    codecs = _BY_CLASS
    for message in messages:
        entry = codecs[type(message)].entry(message)
        if chunk and (len(chunk) == MAX_BATCH or size + len(entry[1]) > MAX_CONTROL_BYTES - 3):
            out.append(_batch(chunk))
            chunk, size = [], 0
        chunk.append(entry)
        size += len(entry[1])
    if chunk:
        out.append(_batch(chunk))
    return out


def _batch(chunk: list[_Entry]) -> list[Buffer]:
    if len(chunk) == 1:
        return encode_alone(chunk[0][0])
    count = len(chunk)
    array = bytes((0x90 | count,)) if count < 16 else b"\xdc" + count.to_bytes(2, "big")
    frames: list[Buffer] = [_BATCH_HEADER + array + b"".join(packed for _, packed, _ in chunk)]
    for _, _, payload in chunk:
        frames += payload
    return frames


def decode_many(frames: Sequence[Buffer]) -> list[Message]:
    """Turn the frames of one ZeroMQ message into its messages: one, or a BATCH's entries.

    Raise as :func:`decode` does; a malformed BATCH is refused whole.
    """
    if len(frames) == 0 or len(frames[0]) < 4 or memoryview(frames[0])[3] != BATCH:
        return [decode(frames)]
    entries = _unpack(_header(frames[0])[4:], list)
    if not 0 < len(entries) <= MAX_BATCH:
        raise ProtocolError(f"a batch holds 1 to {MAX_BATCH} messages, not {len(entries)}")
    out: list[Message] = []
    at = 1
    codecs = _BY_TYPE
    for entry in entries:
        if type(entry) is not tuple or len(entry) != 3:
            raise ProtocolError("a batch entry is not [type, control, frames]")
        kind, control, payload = entry
        codec = codecs.get(kind) if type(kind) is int else None
        if codec is None:
            raise ProtocolError(f"unknown message type {kind!r:.20} in a batch")
        if type(control) is not dict:
            raise ProtocolError("a batch entry's control is not a msgpack map")
        if type(payload) is int and 0 <= payload <= MAX_PAYLOAD_FRAMES:  # frames that follow
            count = payload
            payload = tuple(frames[at : at + count])
            if len(payload) != count:
                raise ProtocolError("a batch has fewer payload frames than its entries claim")
            at += count
        elif type(payload) is not tuple or len(payload) > MAX_PAYLOAD_FRAMES:
            raise ProtocolError("a batch entry's payload is neither a frame count nor a list")
        else:
            for item in payload:  # a loop: cheaper than all() over a generator for one item
                if type(item) is not bytes:
                    raise ProtocolError("a batch entry's inline payload holds other than bytes")
        if payload and not codec.has_payload:
            raise ProtocolError(f"{codec.cls.__name__} takes no payload frames")
        out.append(codec.decode(control, payload))
    if at != len(frames):
        raise ProtocolError("a batch has more payload frames than its entries claim")
    return out


def _header(frame: Buffer) -> memoryview:
    head = memoryview(frame)
    if len(head) < 4 or head[:2] != MAGIC:
        raise ProtocolError("not a fabric message (bad magic)")
    if head[2] != VERSION:
        raise VersionMismatchError(
            f"peer speaks fabric protocol version {head[2]}, this side speaks {VERSION}"
        )
    if len(head) - 4 > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control frame over {MAX_CONTROL_BYTES} bytes")
    return head


def decode(frames: Sequence[Buffer]) -> Message:
    """Turn the frames of one message into a typed message.

    Raise ``VersionMismatchError`` for a well-formed header of another
    protocol version and ``ProtocolError`` for anything else that is not a
    valid message. Payload frames are kept as given, never parsed.
    """
    if not frames:
        raise ProtocolError("empty message")
    head = _header(frames[0])
    codec = _BY_TYPE.get(head[3])
    if codec is None:
        raise ProtocolError(f"unknown message type 0x{head[3]:02x}")
    payload = tuple(frames[1:])
    if payload and not codec.has_payload:
        raise ProtocolError(f"{codec.cls.__name__} takes no payload frames")
    if len(payload) > MAX_PAYLOAD_FRAMES:
        raise ProtocolError(f"more than {MAX_PAYLOAD_FRAMES} payload frames")
    return codec.decode(_unpack(head[4:], dict), payload)


def _unpack(data: memoryview, kind: type[dict[str, Any]] | type[list[Any]]) -> Any:
    try:
        control = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=MAX_CONTROL_BYTES,
            max_bin_len=MAX_CONTROL_BYTES,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
            max_ext_len=0,
        )
    # msgpack reports bad input through several ValueError subclasses
    # (ExtraData, FormatError, StackError, UnicodeDecodeError), TypeError for
    # unhashable keys and OutOfData for truncation.
    except (ValueError, TypeError, msgpack.OutOfData) as exc:
        raise ProtocolError(f"control frame is not valid msgpack: {exc}") from None
    if kind is dict and type(control) is not dict:
        raise ProtocolError("control frame is not a msgpack map")
    if kind is list and type(control) is not tuple:
        raise ProtocolError("a batch's control frame is not a msgpack array")
    return control
