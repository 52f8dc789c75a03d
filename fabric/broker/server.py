"""The broker process: one ROUTER socket, one poll loop; the only module with sockets and a clock.

Each loop iteration takes what arrived (ZAP requests, then up to a batch of
messages), feeds it to the scheduler, services and session table, commits the
journal once, and only then sends the replies, so an ACK never leaves before
its task is journaled (group commit). Heartbeats and deadlines are checked a
few times per heartbeat interval.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import zmq

from fabric.broker import protocol as p
from fabric.broker.auth import ZapHandler, check_libzmq, configure_server, self_test
from fabric.broker.journal import FsyncPolicy, Journal
from fabric.broker.keys import Keyring
from fabric.broker.objects import ObjectRouter
from fabric.broker.scheduler import Admission, Limits, Out, Scheduler, SchedulerStats
from fabric.broker.service import Service
from fabric.errors import AuthenticationError, FabricError, ProtocolError, VersionMismatchError

__all__ = ["Broker", "BrokerStats", "is_loopback"]

log = logging.getLogger(__name__)

_BATCH = 1000
# plain ints: pyzmq's IntFlag arithmetic costs more than the send itself on small messages
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE) | _NOBLOCK
_ZERO_COPY = 64 * 1024  # below this, copying a frame is cheaper than tracking a zero-copy one
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class BrokerStats(NamedTuple):
    """A snapshot of the broker: the scheduler's counters plus the server's own."""

    tasks: SchedulerStats
    sessions: int
    hosts: int
    malformed: int
    forbidden: int
    refused: int
    auth_allowed: int
    auth_denied: int
    journal: bool


@dataclass(eq=False)
class _Session:
    id: bytes
    route: bytes
    role: str
    name: str
    user: str
    runtime: str
    last_sent: float = 0.0


def is_loopback(endpoint: str) -> bool:
    """Return True if ``endpoint`` can only be reached from this machine."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def runtime_tag(python: str, cloudpickle: str) -> str:
    """Return the compatibility tag of a peer: Python X.Y and cloudpickle X.Y must match."""
    return "py{}/cloudpickle{}".format(*(".".join(v.split(".")[:2]) for v in (python, cloudpickle)))


def local_runtime() -> tuple[str, str]:
    """Return this process's Python and cloudpickle versions (without importing cloudpickle)."""
    from importlib.metadata import version

    return platform.python_version(), version("cloudpickle")


class Broker:
    """Route tasks from clients to workers and object calls to hosts.

    ``bind`` defaults to an ephemeral loopback port; ``keys`` is a key
    directory written by ``fabric keygen`` (or a :class:`Keyring`) and turns
    on CURVE with a fail-closed ZAP handler. Without keys the broker refuses a
    non-loopback ``bind`` unless ``insecure`` (anyone who can reach the port
    can then run code on the workers). ``journal`` is a file path: accepted
    tasks survive a broker crash. :meth:`start` runs the loop in a thread;
    :meth:`serve_forever` runs it in the caller's. Use as a context manager.
    """

    def __init__(
        self,
        bind: str = "tcp://127.0.0.1:0",
        *,
        keys: str | os.PathLike[str] | Keyring | None = None,
        journal: str | os.PathLike[str] | None = None,
        fsync: FsyncPolicy = "always",
        services: Iterable[Service] = (),
        heartbeat: float = 1.0,
        liveness: int = 5,
        limits: Limits | None = None,
        max_sessions: int = 10_000,
        max_message_bytes: int = 1 << 30,
        insecure: bool = False,
    ) -> None:
        if heartbeat <= 0 or liveness < 1:
            raise ValueError("heartbeat must be > 0 and liveness >= 1")
        self._keyring = keys if isinstance(keys, Keyring) or keys is None else Keyring.load(keys)
        if self._keyring is None and not is_loopback(bind):
            if not insecure:
                raise AuthenticationError(
                    f"refusing to bind {bind} without keys: anyone reaching it could run code"
                    " on the workers (run `fabric keygen`, or pass insecure=True)"
                )
            log.warning("INSECURE: broker on %s without CURVE keys; anyone can connect", bind)
        self._bind = bind[:-2] + ":*" if bind.endswith(":0") else bind
        self._journal_path = Path(journal) if journal is not None else None
        self._fsync: FsyncPolicy = fsync
        services = tuple(services)
        self._objects = ObjectRouter(services)
        # In-loop services unpickle what peers send in this process, so with any
        # service every peer must run this process's runtime: refuse the others
        # at HELLO, naming both, rather than fail later inside unpickling.
        self._runtime = local_runtime() if services else None
        self.heartbeat = heartbeat
        self.liveness = liveness
        # the deadline the broker enforces is the one it announces in WELCOME
        self._limits = replace(limits or Limits(), liveness_timeout=heartbeat * liveness)
        self._max_sessions = max_sessions
        self._max_message_bytes = max_message_bytes
        self._instance = os.urandom(16)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._address: str | None = None
        self._closed = False
        self._sched = Scheduler(self._limits)
        self._sessions: dict[bytes, _Session] = {}
        self._routes: dict[bytes, _Session] = {}
        self._owners: dict[bytes, str] = {}  # session id -> the User-Id that owns it
        self._warned: set[tuple[bytes, tuple[tuple[str, str], ...]]] = set()
        self._counts = {"malformed": 0, "forbidden": 0, "refused": 0}
        self._outbox: list[Out] = []  # to sessions, sent after the journal commit
        self._direct: list[tuple[bytes, p.Message]] = []  # to connections without a session
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._zap: ZapHandler | None = None
        self._done_samples: deque[tuple[float, int]] = deque(maxlen=41)  # ~10 s of ticks
        self._wake_address = f"inproc://fabric-broker-wake-{self._instance.hex()}"

    # --- life cycle ----------------------------------------------------------------

    @property
    def address(self) -> str:
        """The endpoint peers connect to (the real port when bound to port 0)."""
        if self._address is None:
            raise FabricError("the broker is not started")
        return self._address

    @property
    def public_key(self) -> bytes | None:
        """The broker's CURVE public key (z85), or None without keys."""
        return self._keyring.public if self._keyring is not None else None

    def start(self, timeout: float | None = 30.0) -> None:
        """Bind, self-test and serve in a background thread; return once serving.

        Raise what stopped it from starting (``AuthenticationError`` if the
        security self-test failed, ``TimeoutError`` past ``timeout``).
        """
        if self._thread is not None:
            raise FabricError("the broker is already started")
        self._thread = threading.Thread(target=self._run, name="fabric-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the broker did not start within {timeout} s")
        if self._failure is not None:
            self._thread.join()
            raise self._failure

    def _run(self) -> None:
        # the failure is kept in self._failure: start() raises it, or the log has it
        with contextlib.suppress(BaseException):
            self.serve_forever()

    def serve_forever(self, on_ready: Callable[[], object] | None = None) -> None:
        """Bind, self-test and serve in this thread until :meth:`close` is called.

        ``on_ready`` is called once the broker is bound and serving.
        """
        try:
            with zmq.Context() as context:
                self._serve(context, on_ready)
        except BaseException as exc:
            self._failure = exc
            if self._ready.is_set():
                log.exception("the broker loop failed")
            raise
        finally:
            self._ready.set()
            self._objects.close()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop serving and release the port and the journal; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._thread is not None and self._thread.is_alive() and self._ready.is_set():
            self._poke()
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the broker loop did not stop within {timeout} s")

    def __enter__(self) -> Broker:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and self._thread is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)

    def __repr__(self) -> str:
        return f"<Broker {self._address or self._bind}>"

    def statistics(self) -> BrokerStats:
        """Return a snapshot of the broker's counters; thread-safe."""
        with self._lock:
            return self._statistics()

    def call_local(self, session: bytes, message: p.Create | p.Call) -> list[p.Reply]:
        """Route an object call of a live session of this process in the calling thread.

        For a client in the process that owns the broker (the embedded Manager):
        the call is applied under the loop's lock exactly as if it had come in
        on the socket, without the four thread wake-ups of the round trip. The
        session was authenticated by its HELLO; holding this Broker object is
        the proof that the caller lives in this process. Return the replies
        addressed to ``session`` (possibly none yet: a parked call is answered
        later, over its socket). Messages for other peers go out through the
        loop. Thread-safe. Raise LookupError if ``session`` is not open here
        (send the call over the socket instead).
        """
        with self._lock:
            peer = self._sessions.get(session)
            if peer is None or self._context is None or type(message) not in p.SENDABLE[peer.role]:
                raise LookupError("not an open session of this broker")
            mine: list[p.Reply] = []
            others = False
            for sid, out in self._objects.call(session, message):
                if sid == session and isinstance(out, p.Reply):
                    mine.append(out)
                else:
                    self._outbox.append((sid, out))
                    others = True
        if others:
            self._poke()
        return mine

    # --- the loop ------------------------------------------------------------------

    def _poke(self) -> None:
        # sockets are not thread-safe but contexts are: a socket of our own wakes the loop
        context = self._context
        if context is None:
            return
        try:
            with context.socket(zmq.PUSH) as push:
                push.linger = 0  # never hold up the loop's context termination
                push.connect(self._wake_address)
                push.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the loop is already leaving (context terminated or queue full)

    def _serve(
        self, context: zmq.Context[zmq.Socket[bytes]], on_ready: Callable[[], object] | None
    ) -> None:
        zap = None
        journal = Journal(self._journal_path, fsync=self._fsync) if self._journal_path else None
        router = context.socket(zmq.ROUTER)
        wake = context.socket(zmq.PULL)
        self._context = context
        try:
            if self._keyring is not None:
                check_libzmq()
                zap = self._zap = ZapHandler(context, self._keyring)  # bound before the ROUTER
                self_test(context, zap)
                configure_server(router, self._keyring)
            self._configure(router)
            router.bind(self._bind)
            self._address = router.getsockopt_string(zmq.LAST_ENDPOINT)
            wake.bind(self._wake_address)
            if journal is not None:
                self._replay(journal, time.monotonic())
            log.info(
                "broker serving on %s (%s, journal %s)",
                self._address,
                "CURVE" if zap else "no keys",
                self._journal_path,
            )
            self._ready.set()
            if on_ready is not None:
                on_ready()
            self._loop(router, wake, zap, journal)
        finally:
            self._context = None
            self._zap = None
            wake.close(linger=0)
            router.close(linger=0)
            if zap is not None:
                zap.close()
            if journal is not None:
                journal.close()

    def _configure(self, router: zmq.Socket[bytes]) -> None:
        router.router_mandatory = 1
        router.linger = 0
        router.maxmsgsize = self._max_message_bytes
        router.sndhwm = router.rcvhwm = 100_000
        # ZMTP heartbeats reap half-open TCP connections our own heartbeats cannot see
        router.heartbeat_ivl = int(self.heartbeat * 1000)
        router.heartbeat_timeout = int(self.heartbeat * self.liveness * 1000)

    def _loop(
        self,
        router: zmq.Socket[bytes],
        wake: zmq.Socket[bytes],
        zap: ZapHandler | None,
        journal: Journal | None,
    ) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        if zap is not None:
            poller.register(zap.socket, zmq.POLLIN)
        period = self.heartbeat / 4
        next_tick = time.monotonic() + period
        while not self._stopping.is_set():
            events = dict(poller.poll(max(0, int((next_tick - time.monotonic()) * 1000) + 1)))
            now = time.monotonic()
            with self._lock:
                if zap is not None and zap.socket in events:
                    zap.serve()
                if router in events:
                    self._drain(router, zap, journal, now)
                ticking = now >= next_tick
                if ticking:
                    self._tick(now)
                    next_tick = now + period
                self._outbox += self._sched.acks(everything=ticking)
                if journal is not None:
                    for key in self._sched.drop_expired():
                        journal.done(key)  # an expired result is never run again
                    journal.commit()
                self._flush(router, now)
            if wake in events:
                wake.recv()

    def _drain(
        self, router: zmq.Socket[bytes], zap: ZapHandler | None, journal: Journal | None, now: float
    ) -> None:
        for _ in range(_BATCH):
            try:
                frames = router.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            user = str(frames[0].get("User-Id")) if zap is not None else ""
            self._receive(frames[0].bytes, user, [f.buffer for f in frames[1:]], zap, journal, now)

    def _flush(self, router: zmq.Socket[bytes], now: float) -> None:
        for route, message in self._direct:
            self._send(router, route, message)
        self._direct.clear()
        for session_id, message in self._outbox:
            session = self._sessions.get(session_id)
            if session is None:
                continue  # absent: the scheduler keeps what it must re-send
            self._send(router, session.route, message)
            session.last_sent = now
        self._outbox.clear()

    def _send(self, router: zmq.Socket[bytes], route: bytes, message: p.Message) -> None:
        *parts, last = p.encode(message)
        try:
            router.send(route, _MORE)
            for part in parts:
                router.send(part, _MORE, copy=len(part) < _ZERO_COPY)
            router.send(last, _NOBLOCK, copy=len(last) < _ZERO_COPY)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN (peer not reading)
            log.info("dropped %s to a peer that cannot take it: %s", type(message).__name__, exc)

    # --- messages ------------------------------------------------------------------

    def _receive(
        self,
        route: bytes,
        user: str,
        frames: list[memoryview],
        zap: ZapHandler | None,
        journal: Journal | None,
        now: float,
    ) -> None:
        direct: list[tuple[bytes, p.Message]] = []
        try:
            message = p.decode(frames)
        except VersionMismatchError as exc:
            hello = len(frames[0]) > 3 and frames[0][3] == p.Hello.TYPE
            direct.append(
                (route, p.Refuse("version", str(exc)) if hello else p.Error("version", str(exc)))
            )
            message = None
        except ProtocolError as exc:
            self._counts["malformed"] += 1
            direct.append((route, p.Error("malformed", str(exc))))
            message = None
        session = self._routes.get(route)
        if message is None:
            pass
        elif isinstance(message, p.Hello):
            direct += self._hello(route, user, message, zap, now)
        elif session is None:
            direct.append((route, p.Error("hello-required", "send HELLO first")))
        elif session.user != user:
            log.warning("message on session %s under another key: dropped", session.id.hex())
        elif type(message) not in p.SENDABLE[session.role]:
            self._counts["forbidden"] += 1
            text = f"a {session.role} may not send {type(message).__name__.upper()}"
            direct.append((route, p.Error("forbidden", text)))
        else:
            self._sched.touch(session.id, now)
            self._handle(session, message, journal, now)
        self._direct += direct

    def _hello(
        self, route: bytes, user: str, hello: p.Hello, zap: ZapHandler | None, now: float
    ) -> list[tuple[bytes, p.Message]]:
        refusal = self._refusal(user, hello, zap)
        if refusal is not None:
            self._counts["refused"] += 1
            log.warning("refused %s %r: %s", hello.role, hello.name, refusal.reason)
            return [(route, refusal)]
        old = self._sessions.get(hello.session)
        resumed = old is not None or hello.session in self._owners
        if old is not None:
            self._routes.pop(old.route, None)
        stale = self._routes.get(route)
        if stale is not None and stale.id != hello.session:
            self._end(stale, now, "replaced by a new HELLO on its connection")
        runtime = runtime_tag(hello.python, hello.cloudpickle)
        session = _Session(hello.session, route, hello.role, hello.name, user, runtime, now)
        self._sessions[session.id] = self._routes[route] = session
        self._owners[session.id] = user
        welcome = p.Welcome(session.id, self.heartbeat, self.liveness, self._instance, resumed)
        self._outbox.append((session.id, welcome))
        if hello.role == "worker":
            labels = {**hello.labels, "runtime": runtime}
            self._outbox += self._sched.add_worker(
                session.id,
                now,
                name=hello.name,
                host=hello.host,
                pid=hello.pid,
                capacity=hello.capacity,
                labels=labels,
            )
        elif hello.role in ("client", "host"):
            self._outbox += self._sched.add_client(session.id, now)
            if hello.role == "host":
                self._objects.add_host(hello.name, session.id)
        else:
            self._sched.add_peer(session.id, now)
        log.info(
            "%s %r %s session %s",
            hello.role,
            hello.name,
            "resumed" if resumed else "opened",
            session.id.hex(),
        )
        return []

    def _refusal(self, user: str, hello: p.Hello, zap: ZapHandler | None) -> p.Refuse | None:
        if zap is not None:
            identity = zap.identity(user)
            if identity is None or hello.role not in identity.roles:
                allowed = sorted(identity.roles) if identity else []
                return p.Refuse(
                    "role", f"this key may not act as {hello.role} (allowed: {allowed})"
                )
        if self._runtime is not None and hello.role != "admin":
            ours = runtime_tag(*self._runtime)
            if runtime_tag(hello.python, hello.cloudpickle) != ours:
                python, cloudpickle = self._runtime
                return p.Refuse(
                    "runtime",
                    f"{hello.role} {hello.name!r} runs Python {hello.python} with cloudpickle "
                    f"{hello.cloudpickle}, but this cluster runs Python {python} with cloudpickle "
                    f"{cloudpickle}: install matching versions (X.Y must agree)",
                )
        owner = self._owners.get(hello.session)
        if owner is not None and owner != user:
            return p.Refuse("session", "this session belongs to another key")
        old = self._sessions.get(hello.session)
        if old is not None and old.role != hello.role:
            return p.Refuse("session", f"this session is a {old.role}, not a {hello.role}")
        if hello.role == "host":
            taken = self._objects.refusal(hello.name, hello.session)
            if taken is not None:
                return p.Refuse("name", taken)
        if old is None and len(self._sessions) >= self._max_sessions:
            return p.Refuse("busy", f"the broker holds {self._max_sessions} sessions")
        return None

    def _handle(
        self, session: _Session, message: p.Message, journal: Journal | None, now: float
    ) -> None:
        sid, sched, out = session.id, self._sched, self._outbox
        match message:
            case p.Submit(task=task, requires=requires, payload=payload):
                requires = {**requires, "runtime": session.runtime}
                verdict, outs = sched.submit(sid, task, payload, now, requires)
                if verdict is Admission.ACCEPTED:
                    if journal is not None:
                        journal.submit(sid, task, requires, payload, session.user)
                    self._warn_if_unrunnable(session, requires)
                out += outs
            case p.Result():
                out += sched.result(sid, message, now)
            case p.Credit(n=n):
                out += sched.credit(sid, n)
            case p.Done(tasks=tasks):
                for key in sched.done(sid, tasks, now):
                    if journal is not None:
                        journal.done(key)
            case p.Cancel(task=task):
                out += sched.cancel(sid, task, now)
            case p.Create() | p.Call():
                out += self._objects.call(sid, message)
            case p.Reply():
                out += self._objects.reply(sid, message)
            case p.Status():
                out.append((sid, p.Stats(self._stats_map(now))))
            case p.Bye():
                self._end(session, now, None)
            case p.Error(code=code, message=text):
                log.info("%s %r reports error %r: %r", session.role, session.name, code, text)
            case _:  # Heartbeat: touching the session was all
                pass

    def _warn_if_unrunnable(self, session: _Session, requires: dict[str, str]) -> None:
        # version skew is the most common cluster mistake: name both sides, once per client
        key = (session.id, tuple(sorted(requires.items())))
        if key in self._warned or self._sched.runnable(requires):
            return
        if len(self._warned) < 10_000:
            self._warned.add(key)
        log.warning(
            "client %r submits tasks needing %s; no connected worker matches (workers run %s)",
            session.name,
            requires,
            sorted(self._sched.worker_labels("runtime")),
        )

    def _end(self, session: _Session, now: float, reason: str | None) -> None:
        """End a session: BYE (``reason`` None) or lost."""
        self._sessions.pop(session.id, None)
        if self._routes.get(session.route) is session:
            del self._routes[session.route]
        self._outbox += self._sched.remove(session.id, now, reason)
        self._session_gone(session.id)
        log.info(
            "%s %r session %s ended: %s",
            session.role,
            session.name,
            session.id.hex(),
            reason or "bye",
        )

    def _session_gone(self, sid: bytes) -> None:
        self._outbox += self._objects.session_gone(sid)

    def _tick(self, now: float) -> None:
        if not self._done_samples or now - self._done_samples[-1][0] >= 0.25:
            self._done_samples.append((now, self._sched.statistics(now).tasks_done))
        dead, outs = self._sched.tick(now)
        self._outbox += outs
        for sid in dead:
            session = self._sessions.pop(sid, None)
            if session is not None:
                if self._routes.get(session.route) is session:
                    del self._routes[session.route]
                self._session_gone(sid)
                log.warning("%s %r lost: no heartbeat", session.role, session.name)
        # a session's owner is remembered while it lives or has tasks, so memory stays bounded
        for sid in [sid for sid in self._owners if sid not in self._sessions]:
            if not self._sched.holds_tasks_of(sid):
                del self._owners[sid]
        self._outbox += [
            (s.id, p.Heartbeat())
            for s in self._sessions.values()
            if now - s.last_sent >= self.heartbeat
        ]

    def _replay(self, journal: Journal, now: float) -> None:
        live, forgotten = journal.replay()
        for key in forgotten:
            self._sched.forget(key, now)
        for entry in live:
            self._sched.restore(entry.session, entry.task, entry.payload, now, entry.requires)
            self._owners[entry.session] = entry.user
        log.info("journal replayed: %d tasks to run, %d forgotten", len(live), len(forgotten))

    # --- statistics ----------------------------------------------------------------

    def _statistics(self) -> BrokerStats:
        zap = self._zap
        return BrokerStats(
            tasks=self._sched.statistics(time.monotonic()),
            sessions=len(self._sessions),
            hosts=len(self._objects.hosts),
            malformed=self._counts["malformed"],
            forbidden=self._counts["forbidden"],
            refused=self._counts["refused"],
            auth_allowed=zap.allowed if zap is not None else 0,
            auth_denied=zap.denied if zap is not None else 0,
            journal=self._journal_path is not None,
        )

    def _stats_map(self, now: float) -> dict[str, Any]:
        stats = self._statistics()
        tasks = stats.tasks
        body: dict[str, Any] = {k: v for k, v in tasks._asdict().items() if k != "worker_list"}
        body.update(
            {k: v for k, v in stats._asdict().items() if k != "tasks"},
            worker_list=[w._asdict() for w in tasks.worker_list],
            python=platform.python_version(),
            throughput=self._throughput(),
        )
        return body

    def _throughput(self) -> float:
        if len(self._done_samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self._done_samples[0], self._done_samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0
