"""The broker's session table and message handling; sockets and the clock stay in ``server.py``.

Fed what the ROUTER received (routing id, the CURVE User-Id, the frames) and
the current time, :class:`Sessions` decodes each message, checks it comes on
a welcomed session under the key that opened it from a role allowed to send
it, and hands it to the scheduler or the object router. What is to be sent
collects in ``outbox`` (to sessions; the server sends it after the journal
commit) and ``direct`` (to connections without a session: errors and
refusals).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fabric.broker import protocol as p
from fabric.broker.journal import Journal
from fabric.broker.keys import Identity
from fabric.broker.objects import ObjectRouter
from fabric.broker.scheduler import Admission, Out, Scheduler
from fabric.errors import ProtocolError, VersionMismatchError

__all__ = ["LOCAL_USER", "Session", "Sessions", "local_runtime", "runtime_tag"]

log = logging.getLogger(__name__)

LOCAL_USER = "(in-process)"
"""The User-Id of a peer on the broker's inproc endpoint: in its process, it may take any role."""


@dataclass(eq=False)
class Session:
    id: bytes
    route: bytes
    role: str
    name: str
    user: str
    runtime: str
    sendable: frozenset[type[p.Message]]
    last_sent: float = 0.0
    requires: dict[str, str] = field(init=False)  # what its SUBMITs that name none require

    def __post_init__(self) -> None:
        self.requires = {"runtime": self.runtime}


def runtime_tag(python: str, cloudpickle: str) -> str:
    """Return the compatibility tag of a peer: Python X.Y and cloudpickle X.Y must match."""
    return "py{}/cloudpickle{}".format(*(".".join(v.split(".")[:2]) for v in (python, cloudpickle)))


def local_runtime() -> tuple[str, str]:
    """Return this process's Python and cloudpickle versions (without importing cloudpickle)."""
    from importlib.metadata import version

    return platform.python_version(), version("cloudpickle")


class Sessions:
    """Sessions by id and by route, and what their messages make; not thread-safe.

    ``identify`` (set while CURVE is on) maps a User-Id to the key's identity;
    ``runtime`` (set when in-loop services unpickle) is the one runtime peers
    must match.
    """

    def __init__(
        self,
        sched: Scheduler,
        objects: ObjectRouter,
        *,
        heartbeat: float,
        liveness: int,
        instance: bytes,
        runtime: tuple[str, str] | None,
        max_sessions: int,
    ) -> None:
        self.sched, self.objects = sched, objects
        self.heartbeat, self.liveness = heartbeat, liveness
        self.instance = instance
        self.runtime = runtime
        self.max_sessions = max_sessions
        self.identify: Callable[[str], Identity | None] | None = None
        self.journal: Journal | None = None
        self.by_id: dict[bytes, Session] = {}
        self.by_route: dict[bytes, Session] = {}
        self.owners: dict[bytes, str] = {}  # session id -> the User-Id that owns it
        self.counts = {"malformed": 0, "forbidden": 0, "refused": 0}
        self.outbox: list[Out] = []
        self.direct: list[tuple[bytes, p.Message]] = []
        self._warned: set[tuple[bytes, tuple[tuple[str, str], ...]]] = set()
        self._handlers: dict[type[p.Message], Callable[[Session, Any, float], None]] = {
            p.Submit: self._submit,
            p.Result: self._result,
            p.Done: self._done,
            p.Credit: self._credit,
            p.Cancel: self._cancel,
            p.Create: self._object_call,
            p.Call: self._object_call,
            p.Reply: self._reply,
            p.Status: self._status,
            p.Bye: self._bye,
            p.Error: self._error,
            p.Heartbeat: self._heartbeat,
        }
        self.stats_map: Callable[[float], dict[str, Any]] = lambda now: {}

    # --- receiving -----------------------------------------------------------------

    def receive(self, route: bytes, user: str, frames: list[memoryview], now: float) -> None:
        """Take one ZeroMQ message (a message or a BATCH) from key ``user`` on ``route``."""
        try:
            messages = p.decode_many(frames)
        except VersionMismatchError as exc:
            hello = len(frames[0]) > 3 and frames[0][3] == p.Hello.TYPE
            refusal = p.Refuse("version", str(exc)) if hello else p.Error("version", str(exc))
            self.direct.append((route, refusal))
            return
        except ProtocolError as exc:
            self.counts["malformed"] += 1
            self.direct.append((route, p.Error("malformed", str(exc))))
            return
        session = self.by_route.get(route)
        touched = None
        for message in messages:
            kind = type(message)
            if kind is p.Hello:
                self._hello(route, user, message, now)  # type: ignore[arg-type]
            elif session is None:
                self.direct.append((route, p.Error("hello-required", "send HELLO first")))
            elif session.user != user:
                log.warning("message on session %s under another key: dropped", session.id.hex())
            elif kind not in session.sendable:
                self._forbidden(route, session, kind)
            else:
                if session is not touched:  # one deadline push per ZeroMQ message will do
                    self.sched.touch(session.id, now)
                    touched = session
                self._handlers[kind](session, message, now)
            session = self.by_route.get(route)  # a HELLO or a BYE may have changed it

    def _forbidden(self, route: bytes, session: Session, kind: type[p.Message]) -> None:
        self.counts["forbidden"] += 1
        text = f"a {session.role} may not send {kind.__name__.upper()}"
        self.direct.append((route, p.Error("forbidden", text)))

    def _submit(self, session: Session, message: p.Submit, now: float) -> None:
        requires = session.requires
        if message.requires:
            requires = {**message.requires, "runtime": session.runtime}
        verdict, outs = self.sched.submit(session.id, message.task, message.payload, now, requires)
        if verdict is Admission.ACCEPTED and self.journal is not None:
            self.journal.submit(session.id, message.task, requires, message.payload, session.user)
        self.outbox += outs

    def _result(self, session: Session, message: p.Result, now: float) -> None:
        self.outbox += self.sched.result(session.id, message, now)

    def _done(self, session: Session, message: p.Done, now: float) -> None:
        forgotten = self.sched.done(session.id, message.tasks, now)
        if self.journal is not None:
            for key in forgotten:
                self.journal.done(key)

    def _credit(self, session: Session, message: p.Credit, now: float) -> None:
        self.outbox += self.sched.credit(session.id, message.n)

    def _cancel(self, session: Session, message: p.Cancel, now: float) -> None:
        self.outbox += self.sched.cancel(session.id, message.task, now)

    def _object_call(self, session: Session, message: p.Create | p.Call, now: float) -> None:
        self.outbox += self.objects.call(session.id, message)

    def _reply(self, session: Session, message: p.Reply, now: float) -> None:
        self.outbox += self.objects.reply(session.id, message)

    def _status(self, session: Session, message: p.Status, now: float) -> None:
        self.outbox.append((session.id, p.Stats(self.stats_map(now))))

    def _bye(self, session: Session, message: p.Bye, now: float) -> None:
        self.end(session, now, None)

    def _error(self, session: Session, message: p.Error, now: float) -> None:
        log.info(
            "%s %r reports error %r: %r", session.role, session.name, message.code, message.message
        )

    def _heartbeat(self, session: Session, message: p.Heartbeat, now: float) -> None:
        pass  # touching the session was all

    # --- opening and ending ----------------------------------------------------------

    def _hello(self, route: bytes, user: str, hello: p.Hello, now: float) -> None:
        refusal = self._refusal(user, hello)
        if refusal is not None:
            self.counts["refused"] += 1
            log.warning("refused %s %r: %s", hello.role, hello.name, refusal.reason)
            self.direct.append((route, refusal))
            return
        old = self.by_id.get(hello.session)
        resumed = old is not None or hello.session in self.owners
        if old is not None:
            self.by_route.pop(old.route, None)
        stale = self.by_route.get(route)
        if stale is not None and stale.id != hello.session:
            self.end(stale, now, "replaced by a new HELLO on its connection")
        runtime = runtime_tag(hello.python, hello.cloudpickle)
        sendable = p.SENDABLE[hello.role]
        session = Session(
            hello.session, route, hello.role, hello.name, user, runtime, sendable, now
        )
        self.by_id[session.id] = self.by_route[route] = session
        self.owners[session.id] = user
        welcome = p.Welcome(session.id, self.heartbeat, self.liveness, self.instance, resumed)
        self.outbox.append((session.id, welcome))
        if hello.role == "worker":
            labels = {**hello.labels, "runtime": runtime}
            self.outbox += self.sched.add_worker(
                session.id,
                now,
                name=hello.name,
                host=hello.host,
                pid=hello.pid,
                capacity=hello.capacity,
                labels=labels,
                slots=hello.slots,
            )
        elif hello.role in ("client", "host"):
            self.outbox += self.sched.add_client(session.id, now)
            if hello.role == "host":
                self.objects.add_host(hello.name, session.id)
        else:
            self.sched.add_peer(session.id, now)
        log.info(
            "%s %r %s session %s",
            hello.role,
            hello.name,
            "resumed" if resumed else "opened",
            session.id.hex(),
        )

    def _refusal(self, user: str, hello: p.Hello) -> p.Refuse | None:
        if self.identify is not None and user != LOCAL_USER:
            identity = self.identify(user)
            if identity is None or hello.role not in identity.roles:
                allowed = sorted(identity.roles) if identity else []
                return p.Refuse(
                    "role", f"this key may not act as {hello.role} (allowed: {allowed})"
                )
        if self.runtime is not None and hello.role != "admin":
            ours = runtime_tag(*self.runtime)
            if runtime_tag(hello.python, hello.cloudpickle) != ours:
                python, cloudpickle = self.runtime
                return p.Refuse(
                    "runtime",
                    f"{hello.role} {hello.name!r} runs Python {hello.python} with cloudpickle "
                    f"{hello.cloudpickle}, but this cluster runs Python {python} with cloudpickle "
                    f"{cloudpickle}: install matching versions (X.Y must agree)",
                )
        owner = self.owners.get(hello.session)
        if owner is not None and owner != user:
            return p.Refuse("session", "this session belongs to another key")
        old = self.by_id.get(hello.session)
        if old is not None and old.role != hello.role:
            return p.Refuse("session", f"this session is a {old.role}, not a {hello.role}")
        if hello.role == "host":
            taken = self.objects.refusal(hello.name, hello.session)
            if taken is not None:
                return p.Refuse("name", taken)
        if old is None and len(self.by_id) >= self.max_sessions:
            return p.Refuse("busy", f"the broker holds {self.max_sessions} sessions")
        return None

    def end(self, session: Session, now: float, reason: str | None) -> None:
        """End a session: BYE (``reason`` None) or lost."""
        self.by_id.pop(session.id, None)
        if self.by_route.get(session.route) is session:
            del self.by_route[session.route]
        self.outbox += self.sched.remove(session.id, now, reason)
        self.outbox += self.objects.session_gone(session.id)
        log.info(
            "%s %r session %s ended: %s",
            session.role,
            session.name,
            session.id.hex(),
            reason or "bye",
        )

    # --- the clock -------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Declare the silent dead, heartbeat the idle, warn about tasks no worker can run."""
        dead, outs = self.sched.tick(now)
        self.outbox += outs
        for sid in dead:
            session = self.by_id.pop(sid, None)
            if session is not None:
                if self.by_route.get(session.route) is session:
                    del self.by_route[session.route]
                self.outbox += self.objects.session_gone(sid)
                log.warning("%s %r lost: no heartbeat", session.role, session.name)
        # a session's owner is remembered while it lives or has tasks, so memory stays bounded
        for sid in [sid for sid in self.owners if sid not in self.by_id]:
            if not self.sched.holds_tasks_of(sid):
                del self.owners[sid]
        self.outbox += [
            (s.id, p.Heartbeat())
            for s in self.by_id.values()
            if now - s.last_sent >= self.heartbeat
        ]
        self._warn_unrunnable()

    def _warn_unrunnable(self) -> None:
        # version skew is the most common cluster mistake: name both sides, once per client
        for owner, requires in self.sched.unrunnable():
            key = (owner, requires)
            if key in self._warned:
                continue
            if len(self._warned) < 10_000:
                self._warned.add(key)
            session = self.by_id.get(owner)
            log.warning(
                "client %r submits tasks needing %s; no connected worker matches (workers run %s)",
                session.name if session is not None else owner.hex(),
                dict(requires),
                sorted(self.sched.worker_labels("runtime")),
            )

    def replay(self, journal: Journal, now: float) -> None:
        """Restore the tasks a journal holds (at start, before serving)."""
        live, forgotten = journal.replay()
        for key in forgotten:
            self.sched.forget(key, now)
        for entry in live:
            self.sched.restore(entry.session, entry.task, entry.payload, now, entry.requires)
            self.owners[entry.session] = entry.user
        log.info("journal replayed: %d tasks to run, %d forgotten", len(live), len(forgotten))
