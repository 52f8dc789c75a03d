"""One peer's link to the broker: DEALER socket, HELLO/WELCOME, heartbeats, reconnects.

Used by exactly one thread (a client's I/O thread or a worker node's loop). The
owner polls ``link.socket``, passes each received message through ``accept``
(which swallows session traffic and returns the rest), and calls ``tick(now)``
at least every ``next_tick(now)`` seconds. When the link (re)opens a session,
``on_welcome`` runs so the owner re-sends everything not yet acknowledged.

Liveness: any message counts as a heartbeat. Silence from the broker for
``heartbeat * liveness`` seconds (from WELCOME), an unanswered HELLO, or an
``ERROR(hello-required)`` (the broker restarted and forgot us) make the link
throw its socket away and say HELLO again on a fresh one, with the same
session id, after a backoff that grows from 0.1 s to 5 s.
"""

from __future__ import annotations

import logging
import os
import platform
import socket as _socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import cloudpickle
import zmq

from fabric.broker.protocol import (
    Error,
    Heartbeat,
    Hello,
    Message,
    Refuse,
    Welcome,
    decode_many,
    encode_alone,
    encode_many,
)
from fabric.errors import AuthenticationError, ProtocolError, VersionMismatchError

log = logging.getLogger(__name__)

_HELLO_TIMEOUT_S = 2.0
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.1, 5.0
_ZERO_COPY = 64 * 1024  # below this, copying a frame is cheaper than tracking a zero-copy one
_EVENTS, _POLLIN, _RCVMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE)
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_SEND_MANY = 32  # messages encoded at a time by send_many: most such groups fit one BATCH


@dataclass(frozen=True)
class Runtime:
    """The versions a peer announces in HELLO (tests fake them to check refusals)."""

    python: str = platform.python_version()
    cloudpickle: str = cloudpickle.__version__


def compatible(a: str, b: str) -> bool:
    """Return whether two versions agree on major.minor (what pickles depend on)."""
    return a.split(".")[:2] == b.split(".")[:2]


class LinkRefused(Exception):
    """The broker refused our HELLO; ``error`` is the FabricError to raise to the user."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def refusal_error(refuse: Refuse) -> Exception:
    """Translate a REFUSE into the error users catch."""
    text = f"the broker refused this peer ({refuse.code}): {refuse.reason}"
    if refuse.code in ("version", "runtime"):
        return VersionMismatchError(text)
    if refuse.code in ("role", "session", "auth"):
        return AuthenticationError(text)
    return ConnectionRefusedError(text)


class Link:
    """A session with the broker over one DEALER; see the module docstring."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        address: str,
        *,
        role: str,
        name: str,
        curve: tuple[bytes, bytes, bytes] | None = None,
        capacity: Callable[[], int] = lambda: 0,
        slots: int = 0,
        runtime: Runtime | None = None,
        on_welcome: Callable[[Welcome], None] = lambda welcome: None,
    ) -> None:
        self._context = context
        self.address = address
        self.session = os.urandom(16)
        self._role, self._name, self._curve = role, name, curve
        self._capacity, self._slots = capacity, slots
        self.runtime = runtime or Runtime()
        self._on_welcome = on_welcome
        self.socket: zmq.Socket[bytes] | None = None
        self.drained = False  # the last use of the socket was a look at EVENTS that found nothing
        self.ready = False
        self.welcome: Welcome | None = None
        self._heartbeat, self._liveness = 1.0, 3
        self._last_sent = self._last_heard = self._hello_at = 0.0
        self._backoff = _BACKOFF_MIN_S
        self._retry_at = 0.0

    # --- sending ------------------------------------------------------------------
    def send(self, message: Message) -> bool:
        """Send if the session is open and the socket takes it; False: the owner keeps it.

        Never blocks: a socket at its high-water mark (a broker that stopped reading)
        refuses the message rather than stall the thread that also runs heartbeats.
        """
        if not self.ready or self.socket is None:
            return False
        return self._send(message)

    def send_many(self, messages: Sequence[Message]) -> int:
        """Send ``messages`` in order, several to a BATCH; return how many surely went.

        Like ``send``, never blocks. The owner keeps the rest; a message of a
        batch that went only in part may then travel twice, which every message
        sent this way tolerates (the broker and hosts drop duplicates by id).
        """
        if not self.ready or self.socket is None:
            return 0
        if len(messages) == 1:
            return int(self._send(messages[0]))
        for start in range(0, len(messages), _SEND_MANY):
            chunk = messages[start : start + _SEND_MANY]
            if not all(self._send_frames(frames) for frames in encode_many(chunk)):
                return start
        return len(messages)

    def _send(self, message: Message) -> bool:
        return self._send_frames(encode_alone(message))

    def _send_frames(self, frames: list[bytes | bytearray | memoryview]) -> bool:
        assert self.socket is not None
        self.drained = False
        first, *rest = frames  # the control frame, then the payload frames
        send = self.socket.send
        try:
            # frame by frame with int flags: send_multipart's enum arithmetic costs more
            send(first, _NOBLOCK | _SNDMORE if rest else _NOBLOCK)
        except zmq.Again:
            return False  # nothing went: the owner keeps the message
        # the high-water mark counts whole messages: once the first frame is in, the rest is too
        for left, frame in enumerate(rest, 1 - len(rest)):
            send(frame, _SNDMORE if left else 0, copy=len(frame) < _ZERO_COPY)
        self._last_sent = time.monotonic()
        return True

    # --- receiving ----------------------------------------------------------------
    def receive(self) -> list[Message]:
        """Drain the socket; return the messages for the owner (session traffic is handled)."""
        out: list[Message] = []
        sock, self.drained = self.socket, False
        # asking EVENTS first is cheaper than the zmq.Again that ends every drain
        while sock is not None and cast(int, sock.get(_EVENTS)) & _POLLIN:
            try:
                frames = [sock.recv(_NOBLOCK)]
            except zmq.Again:
                break
            # frame by frame with int options: recv_multipart's RCVMORE lookups wrap enums
            while sock.get(_RCVMORE):
                frames.append(sock.recv(_NOBLOCK))
            self._last_heard = time.monotonic()
            try:
                messages = decode_many(frames)
            except VersionMismatchError as exc:
                raise LinkRefused(exc) from None
            except ProtocolError as exc:
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            out += filter(self._session_message, messages)
        else:
            self.drained = sock is not None  # the loop's last look found no input
        return out

    def input_pending(self) -> bool:
        """Return whether input waits on the socket (ZMQ_EVENTS; not asked again if drained).

        Each look at EVENTS polls libzmq's mailbox (a system call, GIL held). After
        a look that found nothing, and no use of the socket since, the answer
        stands for whoever is about to sleep on the socket's fd: input come since
        makes that fd readable, as no call consumed its edge.
        """
        if self.drained or self.socket is None:
            return False
        pending = bool(cast(int, self.socket.get(_EVENTS)) & _POLLIN)
        self.drained = not pending
        return pending

    def _session_message(self, message: Message) -> bool:
        if isinstance(message, Welcome):
            self._welcomed(message)
            return False
        if isinstance(message, Refuse):
            raise LinkRefused(refusal_error(message))
        if isinstance(message, Heartbeat):
            return False
        if isinstance(message, Error) and message.code == "hello-required":
            # One HELLO per loss: the ERRORs answering the rest of a burst sent before
            # the broker's first one arrived find a HELLO on its way (not ready) and
            # must not send more. Each HELLO re-states our free slots as the whole
            # credit, so a second one, sent before the tasks the first allowed reach
            # us, would let the broker overdraw (the node hands those back).
            if self.ready:
                log.info(
                    "broker at %s forgot session %s: saying HELLO again", self.address, self.tag
                )
                self._hello()
            return False
        if isinstance(message, Error):
            log.warning("broker error %s: %s", message.code, message.message)
            return False
        return True

    def _welcomed(self, welcome: Welcome) -> None:
        first = self.welcome is None
        restarted = not first and self.welcome is not None and welcome.broker != self.welcome.broker
        self.welcome, self.ready = welcome, True
        self._heartbeat, self._liveness = welcome.heartbeat, welcome.liveness
        self._backoff = _BACKOFF_MIN_S
        if not first:
            log.info(
                "session %s %s with %s%s",
                self.tag,
                "resumed" if welcome.resumed else "reopened",
                self.address,
                " (broker restarted)" if restarted else "",
            )
        self._on_welcome(welcome)

    # --- lifecycle ----------------------------------------------------------------
    @property
    def tag(self) -> str:
        """Return a short printable form of the session id for logs."""
        return self.session.hex()[:8]

    def open(self) -> None:
        """Make a fresh socket, connect it and say HELLO."""
        self.close_socket()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        if self._curve is not None:
            public, secret, server = self._curve
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = (
                public,
                secret,
                server,
            )
        sock.connect(self.address)
        self.socket, self.drained = sock, False
        self._hello()

    def _hello(self) -> None:
        self.ready = False
        now = time.monotonic()
        self._hello_at = self._last_heard = now
        self._send(
            Hello(
                role=self._role,
                name=self._name,
                session=self.session,
                python=self.runtime.python,
                cloudpickle=self.runtime.cloudpickle,
                capacity=self._capacity(),
                pid=os.getpid(),
                host=_socket.gethostname(),
                slots=self._slots,
            )
        )

    def close_socket(self) -> None:
        """Drop the socket (its queued messages go with it)."""
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
        self.ready = False

    def say_bye(self, message: Message) -> None:
        """Send a last message (BYE) and give it a moment to leave before closing."""
        if self.socket is not None and self.ready:
            self.socket.setsockopt(zmq.LINGER, 500)
            self._send(message)
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def tick(self, now: float) -> bool:
        """Heartbeat an idle link; reconnect a silent one. Return True if the socket changed."""
        if self.socket is None:
            if now >= self._retry_at:
                self.open()
                return True
            return False
        silent = now - self._last_heard
        limit = self._heartbeat * self._liveness if self.ready else _HELLO_TIMEOUT_S
        if silent > limit:
            log.info("no word from the broker at %s for %.1f s: reconnecting", self.address, silent)
            self.close_socket()
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
            return True
        if self.ready and now - self._last_sent >= self._heartbeat:
            self._send(Heartbeat())
        return False

    def next_tick(self, now: float) -> float:
        """Return how many seconds the owner may sleep before calling ``tick`` again."""
        if self.socket is None:
            return max(0.0, self._retry_at - now)
        return max(0.0, min(self._heartbeat, _HELLO_TIMEOUT_S) / 2)
