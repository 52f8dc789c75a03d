"""The protocol's messages: immutable dataclasses, one per message type.

Each dataclass is also the message's schema: :mod:`fabric.broker._codec`
derives its encoder, decoder and field checks from the field type hints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

SESSION_BYTES = 16

Buffer = bytes | bytearray | memoryview
Payload = tuple[Buffer, ...]

ROLES = ("client", "worker", "host", "admin")

# Result statuses. "ok" and "error" carry the worker's pickled value or
# exception; "crashed" is a worker's report that the task process died (the
# broker retries it, counting toward the poison limit); "returned" hands back a
# task the worker never started (it had no free slot, or a RECLAIM asked for
# it: the broker queues it again, counting nothing); the rest are made by the
# broker and carry no payload.
STATUSES = ("ok", "error", "crashed", "returned", "cancelled", "lost", "poisoned", "expired")


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
    properties that tasks' ``requires`` are matched against. ``slots`` is a
    worker's task processes (0: not said); credit past them is its prefetch
    window, which the broker may RECLAIM from.
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
    slots: int = 0


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


@dataclass(frozen=True, slots=True)
class Reclaim(Message):
    """Ask a worker to hand back those of ``zip(tasks, attempts)`` it has not started.

    The broker's work stealing: another worker has an idle slot. The worker
    answers at once: ``RESULT(returned)`` for each task it still holds
    unstarted, newest first, then ``CREDIT(0)`` if it kept any (started,
    finished, unknown), which ends its answer.
    """

    TYPE: ClassVar[int] = 0x18
    tasks: tuple[bytes, ...]
    attempts: tuple[int, ...]


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
MESSAGES: tuple[type[Message], ...] = (  # every message, by type byte
    Hello, Welcome, Refuse, Heartbeat, Bye,
    Submit, Ack, Reject, Dispatch, Credit, Result, Done, Cancel, Reclaim,
    Create, Call, Reply, Gone,
    Status, Stats, Error,
)  # fmt: skip


def _quick_init(cls: type[Message]) -> None:
    """Give ``cls`` an ``__init__`` of the same signature that sets its slots directly.

    A frozen dataclass's own sets each field through ``object.__setattr__``, at
    twice the cost of the slot descriptor's ``__set__``; messages are made for
    every task at every hop. Generated source, as ``dataclasses`` itself does.
    """
    fields = dataclasses.fields(cls)
    if hasattr(cls, "__post_init__") or not all(f.init and not f.kw_only for f in fields):
        raise TypeError(f"{cls.__name__}: only plain positional fields are supported here")
    env: dict[str, Any] = {"MISSING": dataclasses.MISSING}
    params, body = [], []
    for f in fields:
        env[f"set_{f.name}"] = cls.__dict__[f.name].__set__
        value = f.name
        if f.default is not dataclasses.MISSING:
            env[f"default_{f.name}"] = f.default
            params.append(f"{f.name}=default_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            env[f"factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=MISSING")
            value = f"factory_{f.name}() if {f.name} is MISSING else {f.name}"
        else:
            params.append(f.name)
        body.append(f"    set_{f.name}(self, {value})")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or ["    pass"])
    exec(source, env)  # built above from our own dataclass fields
    env["__init__"].__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = env["__init__"]  # type: ignore[method-assign]


for _cls in MESSAGES:
    _quick_init(_cls)
del _cls
