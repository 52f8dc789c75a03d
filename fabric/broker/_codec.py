"""The wire codec: typed messages to ZeroMQ frames and back, with no socket in sight.

Theory of operation. Every message is one multipart ZeroMQ message (after the
ROUTER routing id, which the server strips and adds)::

    frame 0   b"FB" | version u8 | type u8 | msgpack map of the control fields
    frame 1.. opaque payload frames (cloudpickle bytes made and read only at the edges)

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
    Result,
    Submit,
)
from fabric.errors import ProtocolError, VersionMismatchError

MAGIC = b"FB"
VERSION = 2
MAX_CONTROL_BYTES = 64 * 1024
MAX_PAYLOAD_FRAMES = 256
MAX_ID_BYTES = 96
MAX_TASK_ID_BYTES = 64  # a client task id; the broker prefixes it with the 16-byte session
MAX_STR_CHARS = 4096
MAX_ITEMS = 4096

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


_RULES: dict[type[Message], Callable[[Any], None]] = {
    Hello: _valid_hello,
    Result: _valid_result,
    Submit: _valid_client_task,
    Cancel: _valid_client_task,
    Done: _valid_done,
    Ack: _valid_ack,
}


# --- per-message codecs, generated once from the dataclasses --------------------------

_Decoder = Callable[[dict[str, Any], Payload], Message]
_Encoder = Callable[[Any], list[Buffer]]


@dataclass(frozen=True, slots=True)
class _Codec:
    cls: type[Message]
    header: bytes
    has_payload: bool
    decode: _Decoder
    encode: _Encoder


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
        "packb": msgpack.packb,
        "MISSING": dataclasses.MISSING,
        "ProtocolError": ProtocolError,
        "rule": _RULES.get(cls),
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
        lines.append(f"    v = get({f.name!r}, MISSING)")
        if f.default is not dataclasses.MISSING:
            lines.append(f"    f{n} = default{n} if v is MISSING else check{n}(v)")
        elif f.default_factory is not dataclasses.MISSING:
            lines.append(f"    f{n} = factory{n}() if v is MISSING else check{n}(v)")
        else:
            lacks = f"{cls.__name__} lacks field {f.name!r}"
            lines += ["    if v is MISSING:", f"        raise ProtocolError({lacks!r})"]
            lines.append(f"    f{n} = check{n}(v)")
        args.append(f"f{n}")
        keys.append(f"{f.name!r}: m.{f.name}")
    lines.append(f"    message = cls({', '.join(args)})")
    if env["rule"] is not None:
        lines.append("    rule(message)")
    lines.append("    return message")
    control = "packb({" + ", ".join(keys) + "}, use_bin_type=True)"
    tail = ", *m.payload" if has_payload else ""
    lines += ["def encode(m):", f"    return [header + {control}{tail}]"]
    exec("\n".join(lines), env)  # the source is built above from our own dataclasses
    return _Codec(cls, header, has_payload, env["decode"], env["encode"])


_BY_TYPE: dict[int, _Codec] = {cls.TYPE: _codec(cls) for cls in MESSAGES}
_BY_CLASS: dict[type[Message], _Codec] = {c.cls: c for c in _BY_TYPE.values()}


def encode(message: Message) -> list[Buffer]:
    """Turn ``message`` into frames: the header+control frame, then its payload frames."""
    return _BY_CLASS[type(message)].encode(message)


def decode(frames: Sequence[Buffer]) -> Message:
    """Turn the frames of one message into a typed message.

    Raise ``VersionMismatchError`` for a well-formed header of another
    protocol version and ``ProtocolError`` for anything else that is not a
    valid message. Payload frames are kept as given, never parsed.
    """
    if not frames:
        raise ProtocolError("empty message")
    head = memoryview(frames[0])
    if len(head) < 4 or head[:2] != MAGIC:
        raise ProtocolError("not a fabric message (bad magic)")
    if head[2] != VERSION:
        raise VersionMismatchError(
            f"peer speaks fabric protocol version {head[2]}, this side speaks {VERSION}"
        )
    codec = _BY_TYPE.get(head[3])
    if codec is None:
        raise ProtocolError(f"unknown message type 0x{head[3]:02x}")
    if len(head) - 4 > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control frame over {MAX_CONTROL_BYTES} bytes")
    payload = tuple(frames[1:])
    if payload and not codec.has_payload:
        raise ProtocolError(f"{codec.cls.__name__} takes no payload frames")
    if len(payload) > MAX_PAYLOAD_FRAMES:
        raise ProtocolError(f"more than {MAX_PAYLOAD_FRAMES} payload frames")
    return codec.decode(_unpack(head[4:]), payload)


def _unpack(data: memoryview) -> dict[str, Any]:
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
    if type(control) is not dict:
        raise ProtocolError("control frame is not a msgpack map")
    return control
