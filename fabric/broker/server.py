"""The broker process: one ROUTER socket, one poll loop; the only module with sockets and a clock.

Each loop iteration takes what arrived (ZAP requests, then up to a batch of
messages), feeds it to the session table (``sessions.py``), which hands it to
the scheduler and services, commits the journal once, and only then sends
the replies, so an ACK never leaves before its task is journaled (group
commit). Heartbeats, deadlines and the batched ACKs of quiet peers are dealt
with a few times per heartbeat interval (the tick).
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
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import zmq

from fabric.broker import protocol as p
from fabric.broker.auth import ZapHandler, check_libzmq, configure_server, self_test
from fabric.broker.journal import FsyncPolicy, Journal
from fabric.broker.keys import Keyring
from fabric.broker.objects import ObjectRouter
from fabric.broker.scheduler import Limits, Scheduler, SchedulerStats
from fabric.broker.service import Service
from fabric.broker.sessions import LOCAL_USER, Sessions, local_runtime
from fabric.errors import AuthenticationError, FabricError

__all__ = ["Broker", "BrokerStats", "is_loopback"]

log = logging.getLogger(__name__)

_BATCH = 1000
# local calls (Broker.call_local) share the GIL with the loop while peers are active
_PEERS_ACTIVE_S, _SHARE_EVERY_S, _NAP_S = 0.02, 0.0005, 1e-6
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


def is_loopback(endpoint: str) -> bool:
    """Return True if ``endpoint`` can only be reached from this machine."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


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
        also_bind: Iterable[str] = (),
    ) -> None:
        if heartbeat <= 0 or liveness < 1:
            raise ValueError("heartbeat must be > 0 and liveness >= 1")
        self._keyring = keys if isinstance(keys, Keyring) or keys is None else Keyring.load(keys)
        self._also_bind = tuple(also_bind)  # more endpoints, e.g. ipc:// for same-host peers
        for endpoint in (bind, *self._also_bind):
            if self._keyring is not None or is_loopback(endpoint):
                continue
            if not insecure:
                raise AuthenticationError(
                    f"refusing to bind {endpoint} without keys: anyone reaching it could run code"
                    " on the workers (run `fabric keygen`, or pass insecure=True)"
                )
            log.warning("INSECURE: broker on %s without CURVE keys; anyone can connect", endpoint)
        self._bind = bind[:-2] + ":*" if bind.endswith(":0") else bind
        self._journal_path = Path(journal) if journal is not None else None
        self._fsync: FsyncPolicy = fsync
        services = tuple(services)
        self._objects = ObjectRouter(services)
        self.heartbeat = heartbeat
        self.liveness = liveness
        # the deadline the broker enforces is the one it announces in WELCOME
        self._limits = replace(limits or Limits(), liveness_timeout=heartbeat * liveness)
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
        self._sessions = Sessions(
            self._sched,
            self._objects,
            heartbeat=heartbeat,
            liveness=liveness,
            instance=self._instance,
            # In-loop services unpickle what peers send in this process, so with any
            # service every peer must run this process's runtime: refuse the others
            # at HELLO, naming both, rather than fail later inside unpickling.
            runtime=local_runtime() if services else None,
            max_sessions=max_sessions,
        )
        self._sessions.stats_map = self._stats_map
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._zap: ZapHandler | None = None
        self._done_samples: deque[tuple[float, int]] = deque(maxlen=41)  # ~10 s of ticks
        self._nap_at = 0.0  # see _share_gil
        self._peers_at = -_PEERS_ACTIVE_S  # when the loop last took messages off the socket
        self._wake_address = f"inproc://fabric-broker-wake-{self._instance.hex()}"
        self._local_address = f"inproc://fabric-broker-peers-{self._instance.hex()}"

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

    def local_endpoint(self) -> tuple[zmq.Context[zmq.Socket[bytes]], str]:
        """Return the ZeroMQ context and inproc address for a peer in this very process.

        A DEALER made from this context and connected there talks to the broker
        without TCP, CURVE or I/O-thread hops (the embedded Manager's own
        connection). No ZAP runs on inproc; only code holding this Broker can
        reach the context, the same proof of locality as :meth:`call_local`.
        Close such sockets before closing the broker. Raise FabricError if the
        broker is not serving.
        """
        context = self._context
        if context is None or not self._ready.is_set() or self._failure is not None:
            raise FabricError("the broker is not serving")
        return context, self._local_address

    def call_local(
        self,
        session: bytes,
        message: p.Create | p.Call,
        parked: Callable[[], object] = lambda: None,
    ) -> list[p.Reply]:
        """Route an object call of a live session of this process in the calling thread.

        For a client in the process that owns the broker (the embedded Manager):
        the call is applied under the loop's lock exactly as if it had come in
        on the socket, without the four thread wake-ups of the round trip. The
        session was authenticated by its HELLO; holding this Broker object is
        the proof that the caller lives in this process. Return the replies
        addressed to ``session``; if none answers ``message``, ``parked`` is
        called before the lock is let go (the call is answered later, over
        the session's socket, so the caller registers its waiter there).
        Messages for other peers go out through the loop. Thread-safe. Raise
        LookupError if ``session`` is not open here (send the call over the
        socket instead).
        """
        with self._lock:
            peer = self._sessions.by_id.get(session)
            if peer is None or self._context is None or type(message) not in p.SENDABLE[peer.role]:
                raise LookupError("not an open session of this broker")
            mine: list[p.Reply] = []
            others = answered = False
            for sid, out in self._objects.call(session, message):
                if sid == session and isinstance(out, p.Reply):
                    mine.append(out)
                    answered = answered or out.call == message.call
                else:
                    self._sessions.outbox.append((sid, out))
                    others = True
            if not answered:
                parked()
        if others:
            self._poke()
        self._share_gil()
        return mine

    def _share_gil(self) -> None:
        """Let the loop run now and then while a thread of ours loops on local calls.

        Such a thread keeps the GIL, and the loop, woken by a peer's message,
        would wait the interpreter's switch interval (5 ms) for it: while peers
        are talking to the loop, nap briefly every ``_SHARE_EVERY_S``. A lone
        client naps only in the moments after a heartbeat. (Races on the two
        timestamps are harmless: they only shift a nap.)
        """
        now = time.monotonic()
        if now - self._peers_at < _PEERS_ACTIVE_S and now >= self._nap_at:
            self._nap_at = now + _SHARE_EVERY_S
            time.sleep(_NAP_S)  # blocks: the GIL goes to the loop if it waits for it

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
                self._sessions.identify = zap.identity
                self_test(context, zap)
                configure_server(router, self._keyring)
            self._configure(router)
            router.bind(self._bind)
            self._address = router.getsockopt_string(zmq.LAST_ENDPOINT)
            for address in self._also_bind:
                router.bind(address)
            router.bind(self._local_address)  # see local_endpoint()
            wake.bind(self._wake_address)
            if journal is not None:
                self._sessions.journal = journal
                self._sessions.replay(journal, time.monotonic())
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
                    self._drain(router, zap, now)
                    self._peers_at = now
                ticking = now >= next_tick
                if ticking:
                    self._tick(now)
                    next_tick = now + period
                self._sessions.outbox += self._sched.acks(everything=ticking)
                if journal is not None:
                    for key in self._sched.drop_expired():
                        journal.done(key)  # an expired result is never run again
                    journal.commit()
                self._flush(router, now)
            if wake in events:
                wake.recv()

    def _drain(self, router: zmq.Socket[bytes], zap: ZapHandler | None, now: float) -> None:
        receive, recv = self._sessions.receive, router.recv
        for _ in range(_BATCH):
            try:
                route = recv(_NOBLOCK)  # plain bytes: a ROUTER always has a body after it
            except zmq.Again:
                # one Again (~3 us) ends a drain: cheaper than asking EVENTS (~1.6 us)
                # before each of the tens of messages a drain holds under load
                return
            # the body's first frame as a Frame, for its ``more`` and the CURVE User-Id
            frame = recv(_NOBLOCK, copy=False)
            user = ""
            if zap is not None:
                try:
                    user = str(frame.get("User-Id"))
                except zmq.ZMQError:  # no ZAP metadata: an inproc peer (see local_endpoint)
                    user = LOCAL_USER
            frames = [frame.buffer]
            while frame.more:
                frame = recv(_NOBLOCK, copy=False)
                frames.append(frame.buffer)
            receive(route, user, frames, now)

    def _flush(self, router: zmq.Socket[bytes], now: float) -> None:
        sessions = self._sessions
        for route, message in sessions.direct:
            self._send(router, route, message)
        sessions.direct.clear()
        by_id = sessions.by_id
        # what this iteration made for one peer leaves as one BATCH: coalescing only
        # what is already waiting never delays a message
        waiting: dict[bytes, list[p.Message]] = {}
        for session_id, message in sessions.outbox:
            waiting.setdefault(session_id, []).append(message)
        sessions.outbox.clear()
        for session_id, messages in waiting.items():
            session = by_id.get(session_id)
            if session is None:
                continue  # absent: the scheduler keeps what it must re-send
            for frames in p.encode_many(messages):
                self._send_frames(router, session.route, frames, len(messages))
            session.last_sent = now

    def _send(self, router: zmq.Socket[bytes], route: bytes, message: p.Message) -> None:
        self._send_frames(router, route, p.encode(message), 1)

    def _send_frames(
        self, router: zmq.Socket[bytes], route: bytes, frames: list[Any], n: int
    ) -> None:
        *parts, last = frames
        try:
            router.send(route, _MORE)
            for part in parts:
                router.send(part, _MORE, copy=len(part) < _ZERO_COPY)
            router.send(last, _NOBLOCK, copy=len(last) < _ZERO_COPY)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN (peer not reading)
            log.info("dropped %d messages to a peer that cannot take them: %s", n, exc)

    def _tick(self, now: float) -> None:
        if not self._done_samples or now - self._done_samples[-1][0] >= 0.25:
            self._done_samples.append((now, self._sched.statistics(now).tasks_done))
        self._sessions.tick(now)

    # --- statistics ----------------------------------------------------------------

    def _statistics(self) -> BrokerStats:
        zap = self._zap
        counts = self._sessions.counts
        return BrokerStats(
            tasks=self._sched.statistics(time.monotonic()),
            sessions=len(self._sessions.by_id),
            hosts=len(self._objects.hosts),
            malformed=counts["malformed"],
            forbidden=counts["forbidden"],
            refused=counts["refused"],
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
