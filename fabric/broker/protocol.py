"""The wire protocol: typed messages to ZeroMQ frames and back, with no socket in sight.

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
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from fabric.errors import ProtocolError, VersionMismatchError

__all__ = [
    "MAGIC",
    "MAX_CONTROL_BYTES",
    "MAX_PAYLOAD_FRAMES",
    "MAX_TASK_ID_BYTES",
    "MESSAGES",
    "ROLES",
    "SENDABLE",
    "STATUSES",
    "VERSION",
    "Ack",
    "Bye",
    "Call",
    "Cancel",
    "Create",
    "Credit",
    "Dispatch",
    "Done",
    "Error",
    "Gone",
    "Heartbeat",
    "Hello",
    "Message",
    "Refuse",
    "Reject",
    "Reply",
    "Result",
    "Stats",
    "Status",
    "Submit",
    "Welcome",
    "decode",
    "encode",
]

MAGIC = b"FB"
VERSION = 2
MAX_CONTROL_BYTES = 64 * 1024
MAX_PAYLOAD_FRAMES = 256
MAX_ID_BYTES = 96
MAX_TASK_ID_BYTES = 64  # a client task id; the broker prefixes it with the 16-byte session
MAX_STR_CHARS = 4096
MAX_ITEMS = 4096
SESSION_BYTES = 16

Buffer = bytes | bytearray | memoryview
Payload = tuple[Buffer, ...]

ROLES = ("client", "worker", "host", "admin")

# Result statuses. "ok" and "error" carry the worker's pickled value or
# exception; "crashed" is a worker's report that the task process died (the
# broker retries it); the rest are made by the broker and carry no payload.
STATUSES = ("ok", "error", "crashed", "cancelled", "lost", "poisoned", "expired")


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every wire message; ``TYPE`` is the type byte of its header."""

    TYPE: ClassVar[int] = 0


# --- session -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Open (or resume) a session: the first message of every peer.

    ``session`` is 16 bytes chosen by the peer and kept across reconnects, so
    a peer that reconnects (new routing id) gets its pending results back.
    ``capacity`` is a worker's initial credit; ``labels`` are a worker's
    properties that tasks' ``requires`` are matched against.
    """

    TYPE: ClassVar[int] = 0x01
    role: str
    name: str
    session: bytes
    python: str
    cloudpickle: str
    capacity: int = 0
    pid: int = 0
    host: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Accept a HELLO; the broker dictates heartbeat timing.

    A peer that hears nothing from the broker for ``heartbeat * liveness``
    seconds considers it gone and reconnects. ``broker`` changes when the
    broker restarts, so a peer can tell a restart from a reconnect.
    """

    TYPE: ClassVar[int] = 0x02
    session: bytes
    heartbeat: float
    liveness: int
    broker: bytes
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class Refuse(Message):
    """Refuse a HELLO (``code``: version, role, session, name, busy); then silence."""

    TYPE: ClassVar[int] = 0x03
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Say "still here" on an idle link; any message counts as one."""

    TYPE: ClassVar[int] = 0x04


@dataclass(frozen=True, slots=True)
class Bye(Message):
    """Close the session on purpose (a worker's in-flight tasks are re-queued at once)."""

    TYPE: ClassVar[int] = 0x05


# --- tasks -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submit(Message):
    """Submit a task; ``task`` is chosen by the client and unique in its session.

    ``requires`` must be a subset of a worker's labels for it to run the task.
    Re-sending a SUBMIT with a known ``task`` never queues it twice.
    """

    TYPE: ClassVar[int] = 0x10
    task: bytes
    requires: dict[str, str] = field(default_factory=dict)
    payload: Payload = ()


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Acknowledge many messages at once (the broker batches them, see ``docs/protocol.md``).

    To a client: its SUBMITs of ``tasks`` are accepted (journaled when
    durable); ``attempts`` is empty. To a worker: its RESULTs for
    ``zip(tasks, attempts)`` are taken.
    """

    TYPE: ClassVar[int] = 0x11
    tasks: tuple[bytes, ...]
    attempts: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Reject(Message):
    """Refuse a SUBMIT (``code``: busy, duplicate, too-large).

    ``busy`` is back-pressure: re-send the SUBMIT after ``retry_after`` seconds.
    """

    TYPE: ClassVar[int] = 0x12
    task: bytes
    code: str
    reason: str
    retry_after: float = 0.0


@dataclass(frozen=True, slots=True)
class Dispatch(Message):
    """Give a task to a worker, which spends one credit on it.

    ``task`` is the broker's id for the task (unique across clients); the
    worker quotes it back in RESULT with ``attempt``.
    """

    TYPE: ClassVar[int] = 0x13
    task: bytes
    attempt: int
    payload: Payload = ()


@dataclass(frozen=True, slots=True)
class Credit(Message):
    """Grant the broker ``n`` more task slots on this worker."""

    TYPE: ClassVar[int] = 0x14
    n: int


@dataclass(frozen=True, slots=True)
class Result(Message):
    """Carry a task's outcome: worker -> broker -> client.

    ``status`` is one of ``STATUSES``. From a worker, ``credit`` slots are
    freed along with the result (normally 1), saving a CREDIT message per task.
    To a client, ``task`` is the client's own id and ``message`` explains
    broker-made failures (lost, poisoned, cancelled, expired).
    """

    TYPE: ClassVar[int] = 0x15
    task: bytes
    attempt: int
    status: str
    message: str = ""
    credit: int = 0
    payload: Payload = ()


@dataclass(frozen=True, slots=True)
class Done(Message):
    """Tell the broker the client holds these results; it forgets the tasks."""

    TYPE: ClassVar[int] = 0x16
    tasks: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Cancel a task: client -> broker, and broker -> worker when it is running."""

    TYPE: ClassVar[int] = 0x17
    task: bytes
    attempt: int = 0


# --- shared objects ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Create(Message):
    """Create (or look up, when ``name`` is given) an object of ``typeid`` on ``host``.

    ``host`` "" is the broker's built-in service. ``call`` is the caller's
    sequence number; ``session`` is filled in by the broker when it forwards
    the message (peers send b"").
    """

    TYPE: ClassVar[int] = 0x20
    host: str
    call: int
    typeid: str
    name: str = ""
    session: bytes = b""
    payload: Payload = ()


@dataclass(frozen=True, slots=True)
class Call(Message):
    """Call ``method`` of ``object`` on ``host``; answered by one REPLY with the same ``call``."""

    TYPE: ClassVar[int] = 0x21
    host: str
    call: int
    object: str
    method: str
    session: bytes = b""
    payload: Payload = ()


@dataclass(frozen=True, slots=True)
class Reply(Message):
    """Answer a CREATE or CALL; a host peer names the caller's ``session``.

    ``status`` is ok, error (payload: the pickled exception) or one of the
    broker's: host-lost, no-host.
    """

    TYPE: ClassVar[int] = 0x22
    call: int
    status: str
    message: str = ""
    session: bytes = b""
    payload: Payload = ()


@dataclass(frozen=True, slots=True)
class Gone(Message):
    """Tell a host peer that a session ended, so it can release that session's leases."""

    TYPE: ClassVar[int] = 0x23
    session: bytes


# --- administration ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status(Message):
    """Ask the broker for its statistics."""

    TYPE: ClassVar[int] = 0x30


@dataclass(frozen=True, slots=True)
class Stats(Message):
    """The broker's statistics: counters and a list of workers (see ``docs/protocol.md``)."""

    TYPE: ClassVar[int] = 0x31
    stats: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Report a message that could not be taken (``code``: malformed, version,
    hello-required, forbidden)."""

    TYPE: ClassVar[int] = 0x7F
    code: str
    message: str


# Which roles may send which messages to the broker: the authorisation table
# the server enforces per message (a host may also act as a client).
_PEER_ANY = frozenset({Hello, Heartbeat, Bye, Error})
_CLIENT = _PEER_ANY | {Submit, Done, Cancel, Create, Call, Status}
SENDABLE: dict[str, frozenset[type[Message]]] = {
    "client": _CLIENT,
    "worker": _PEER_ANY | {Credit, Result},
    "host": _CLIENT | {Reply},
    "admin": _PEER_ANY | {Status},
}

# --- the codec -------------------------------------------------------------------

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


MESSAGES: tuple[type[Message], ...] = (  # every message, by type byte
    Hello, Welcome, Refuse, Heartbeat, Bye,
    Submit, Ack, Reject, Dispatch, Credit, Result, Done, Cancel,
    Create, Call, Reply, Gone,
    Status, Stats, Error,
)  # fmt: skip
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
