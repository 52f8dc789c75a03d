"""The Manager's end of the same-host lane (see ``_lane``): admit clients, serve their channels.

One thread (``fabric-lane``) watches the attach sockets: it admits a client
(secret and user checked), opens a channel when asked, and ends the client's
broker session when its attach socket closes. Each channel has a thread of
its own that takes one request at a time off its ring and applies it through
a broker ``Connection`` made in this process for that client (in-thread
``call_local``, so a call costs no socket), so a call that parks (a lock held
elsewhere, ``get`` on an empty queue) holds up only its own channel, and the
client's leases live and die with that session, as over TCP.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import pickle
import selectors
import shutil
import socket
import tempfile
import threading
from typing import Any

from fabric.broker.protocol import Call
from fabric.errors import BrokerUnavailable, FabricError, ProtocolError
from fabric.local import Pipe
from fabric.local.connection import Connection as End
from fabric.remote._client_calls import LocalBroker, PendingCall
from fabric.remote._connection import Connection
from fabric.remote._lane import (
    CALL,
    CHANNEL,
    CREATE,
    TOKEN_BYTES,
    encode_env,
    peer_uid,
    recv_exact,
    send_frame,
)
from fabric.remote._link import Runtime

log = logging.getLogger(__name__)

_POLL_S = 0.1  # how soon an idle channel thread notices the lane closing
_ADMIT_S = 2.0  # how long a connecting client may take to show its secret
_JOIN_S = 10.0  # threads end within _POLL_S of close(); this only bounds a bug


class _Session(Connection):
    """The broker session of one lane client; its calls run in the calling channel's thread."""

    def apply(
        self, host: str, obj_id: str, method: str, payload: bytes, wait: float | None
    ) -> bytes:
        """Do what ``call`` does, minus the booking of calls the broker answers at once.

        Most calls are answered inside ``call_local``; only one that parks is
        booked (under the broker's lock, before its reply can come over the
        socket) and then awaited like any other.
        """
        assert self._local is not None
        message = Call(
            host=host, call=next(self._seq), object=obj_id, method=method, payload=(payload,)
        )
        booked: list[PendingCall] = []

        def parked() -> None:
            pending = PendingCall(message)
            with self._lock:
                self._calls[message.call] = pending
            booked.append(pending)

        try:
            replies = self._local.call_local(self.session, message, parked)
        except LookupError:  # no session (any more): the usual path says why
            return self.call(host, obj_id, method, payload, wait)
        answer = None
        for reply in replies:
            if reply.call == message.call:
                answer = reply
            else:
                self._replied(reply)
        if answer is None:
            return self._await_call(booked[0], wait)
        if answer.status in ("ok", "error"):
            return bytes(answer.payload[0])
        raise BrokerUnavailable(f"object call failed: {answer.status}: {answer.message}")


class _Client:
    """One attached client process: its attach socket and its broker session (made lazily)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn: _Session | None = None

    def close(self) -> None:
        self.sock.close()
        if self.conn is not None:
            self.conn.close()  # BYE: the host releases this client's leases


class LaneServer:
    """Serve object calls of same-host processes for a broker of this process; a context manager.

    Make it before the processes that will use it (``env()`` is what they
    must be handed), then ``serve`` once the broker is up; ``close`` ends
    every session and removes the socket and its directory.
    """

    def __init__(self, *, timeout: float = 10.0) -> None:
        self._dir = tempfile.mkdtemp(prefix="fabric-lane-")  # 0700: only our user gets in
        self.path = os.path.join(self._dir, "lane")
        self._token = os.urandom(TOKEN_BYTES)
        self._timeout = timeout
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            self._listener.listen(64)
        except BaseException:
            self._listener.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._stop_r, self._stop_w = os.pipe()
        self._clients: dict[socket.socket, _Client] = {}
        self._channels: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closing = False
        self._broker: LocalBroker | None = None
        self._address = ""
        self._thread: threading.Thread | None = None

    def env(self) -> str:
        """Return the ``FABRIC_LANE`` value that lets a process attach (a secret: pass it on
        only as the CURVE keys are, to processes of this user)."""
        return encode_env(self.path, self._token)

    def serve(self, broker: LocalBroker, address: str) -> None:
        """Start admitting clients for ``broker`` (of this process), reached at ``address``."""
        self._broker, self._address = broker, address
        self._thread = threading.Thread(target=self._run, name="fabric-lane", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """End every session and channel; remove the socket. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(_JOIN_S)
        for client in self._clients.values():
            client.close()  # fails the calls its channels await
        self._clients.clear()
        for thread in self._channels:
            thread.join(_JOIN_S)
        self._listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LaneServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> dict[str, int]:
        """Count attached client processes and live channels."""
        return {
            "clients": len(self._clients),
            "channels": sum(t.is_alive() for t in self._channels),
        }

    # --- the attach thread ---------------------------------------------------------------
    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._stop_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._stop_r:
                        return
                    if key.fileobj is self._listener:
                        client = self._admit()
                        if client is not None:
                            self._clients[client.sock] = client
                            sel.register(client.sock, selectors.EVENT_READ)
                    else:
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        if not self._asked(self._clients[sock]):
                            sel.unregister(sock)
                            self._clients.pop(sock).close()

    def _admit(self) -> _Client | None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return None
        try:
            sock.settimeout(_ADMIT_S)
            token = recv_exact(sock, TOKEN_BYTES)
            if peer_uid(sock) != os.getuid() or not hmac.compare_digest(token, self._token):
                log.warning("the same-host lane refused a process without its credentials")
                sock.close()
                return None
            runtime = Runtime()
            hello = "\t".join((self._address, runtime.python, runtime.cloudpickle))
            send_frame(sock, hello.encode())
            sock.settimeout(self._timeout)
        except (OSError, EOFError):
            sock.close()
            return None
        return _Client(sock)

    def _asked(self, client: _Client) -> bool:
        """Answer what a client sent on its attach socket; False: it is gone (or misbehaved)."""
        try:
            if client.sock.recv(1) != CHANNEL:
                return False
            if client.conn is None:
                assert self._broker is not None
                client.conn = _Session(
                    self._address, role="client", local=self._broker, timeout=self._timeout
                )
            mine, theirs = Pipe()
            # the pickled end is counted as held until the client unpickles it
            blob = pickle.dumps(theirs)
            theirs.close()
            send_frame(client.sock, blob)
        except (OSError, EOFError, FabricError) as exc:  # it left, or no session for it
            log.debug("a same-host lane client was dropped: %s", exc)
            return False
        self._channels = [t for t in self._channels if t.is_alive()]
        thread = threading.Thread(
            target=self._serve_channel, args=(mine, client.conn), name="fabric-lane-ch", daemon=True
        )
        self._channels.append(thread)
        thread.start()
        return True

    # --- a channel's thread ------------------------------------------------------------------
    def _serve_channel(self, end: End, conn: _Session) -> None:
        with end:
            while True:
                try:
                    request = end.recv(_POLL_S)
                except TimeoutError:
                    if self._closing:
                        return
                    continue
                except (EOFError, OSError):
                    return  # the client closed this channel or exited
                try:
                    end.send(_answer(conn, request))
                except (OSError, EOFError):
                    return


def _answer(conn: _Session, request: Any) -> tuple[bool, Any]:
    """Apply one request; return (True, reply payload) or (False, the error to raise there)."""
    try:
        kind, host, target, what, payload, wait = request
        if kind == CALL:
            return True, conn.apply(host, target, what, payload, wait)
        if kind == CREATE:
            return True, conn.create(host, target, what, payload)
        raise ProtocolError(f"unknown same-host lane request {kind!r}")
    except Exception as exc:  # the client raises it, as a TCP call would
        with contextlib.suppress(Exception):
            pickle.dumps(exc)
            return False, exc
        return False, BrokerUnavailable(f"object call failed: {exc!r}")
