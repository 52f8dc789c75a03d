"""CURVE authentication through a ZAP handler that fails closed.

libzmq lets every CURVE client in when no ZAP handler answers (the ZAP domain
is enforced only on request), so the broker: checks libzmq >= 4.3.2
(CVE-2019-13132, a pre-auth overflow in older CURVE servers); binds its ZAP
handler before its ROUTER; sets ``ZAP_ENFORCE_DOMAIN`` where libzmq has it;
and self-tests before serving: a throw-away peer with an unlisted key must
be consulted about and refused, and none of its frames may arrive. If any of
that fails the broker does not start.

The handler answers each allowed key with the key itself (z85) as User-Id;
the server reads it from every message and checks it against the session the
message claims, and the key's roles against the message type.

The handler is not a thread: the server polls its socket in the same loop as
the ROUTER, so a flood of handshakes cannot race the broker's state.
"""

from __future__ import annotations

import logging
import time

import zmq
from zmq.utils import z85

from fabric.broker.keys import Identity, Keyring
from fabric.errors import AuthenticationError

__all__ = ["DOMAIN", "ZapHandler", "check_libzmq", "configure_server", "self_test"]

log = logging.getLogger(__name__)

DOMAIN = b"fabric"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
MIN_LIBZMQ = (4, 3, 2)


def check_libzmq() -> None:
    """Refuse a libzmq older than 4.3.2 or built without CURVE."""
    if zmq.zmq_version_info() < MIN_LIBZMQ:
        raise AuthenticationError(
            f"libzmq {zmq.zmq_version()} is older than 4.3.2 (CVE-2019-13132): upgrade pyzmq"
        )
    if not zmq.has("curve"):
        raise AuthenticationError("this libzmq was built without CURVE support")


def configure_server(socket: zmq.Socket[bytes], keyring: Keyring) -> None:
    """Make ``socket`` a CURVE server that asks the ZAP handler about every peer."""
    socket.curve_server = True
    socket.curve_publickey = keyring.public
    socket.curve_secretkey = keyring.secret
    socket.zap_domain = DOMAIN
    enforce = getattr(zmq, "ZAP_ENFORCE_DOMAIN", None)
    if enforce is not None:
        socket.setsockopt(enforce, 1)


class ZapHandler:
    """Answer ZAP requests from the allow list; poll :attr:`socket`, then call :meth:`serve`."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], keyring: Keyring) -> None:
        self.keyring = keyring
        self.socket: zmq.Socket[bytes] = context.socket(zmq.REP)
        self.socket.linger = 0
        try:
            self.socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self.socket.close()
            raise AuthenticationError(f"cannot bind the ZAP handler: {exc}") from exc
        self.allowed = 0
        self.denied = 0
        self.denied_keys: list[bytes] = []  # the last few, for the self-test and logs
        self.probes: set[bytes] = set()  # the self-test's keys: refused without a warning

    def serve(self) -> None:
        """Answer every ZAP request waiting, without blocking."""
        while True:
            try:
                request = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.socket.send_multipart(self._answer(request))

    def identity(self, user_id: str) -> Identity | None:
        """Return who the User-Id of a message is, or None."""
        return self.keyring.allowed.get(user_id.encode())

    def close(self) -> None:
        self.socket.close()

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism, *credentials = request
        if version != b"1.0":
            return [b"1.0", request_id, b"500", b"unsupported ZAP version", b"", b""]
        key = z85.encode(credentials[0]) if credentials and len(credentials[0]) == 32 else b""
        identity = self.keyring.allowed.get(key)
        if domain != DOMAIN or mechanism != b"CURVE" or identity is None:
            self.denied += 1
            self.denied_keys = [*self.denied_keys[-7:], key]
            log.log(
                logging.DEBUG if key in self.probes else logging.WARNING,
                "refused %s peer from %s (key %s)",
                mechanism.decode(errors="replace"),
                address.decode(errors="replace"),
                key.decode() or "-",
            )
            return [b"1.0", request_id, b"400", b"key not allowed", b"", b""]
        self.allowed += 1
        log.info("authenticated %r from %s", identity.name, address.decode(errors="replace"))
        return [b"1.0", request_id, b"200", b"OK", key, b""]


def self_test(
    context: zmq.Context[zmq.Socket[bytes]], zap: ZapHandler, timeout: float = 10.0
) -> None:
    """Prove the handler guards CURVE sockets: an unlisted key must be asked about and refused.

    Raise ``AuthenticationError`` (the broker must not start) if the handler
    is never consulted, lets the probe in, or the probe's frame arrives.
    """
    probe_public, probe_secret = zmq.curve_keypair()
    zap.probes.add(probe_public)
    server = context.socket(zmq.ROUTER)
    client = context.socket(zmq.DEALER)
    server.linger = client.linger = 0
    try:
        configure_server(server, zap.keyring)
        server.bind("tcp://127.0.0.1:*")
        client.curve_publickey, client.curve_secretkey = probe_public, probe_secret
        client.curve_serverkey = zap.keyring.public
        client.connect(server.getsockopt_string(zmq.LAST_ENDPOINT))
        client.send(b"probe", zmq.NOBLOCK)
        poller = zmq.Poller()
        poller.register(server, zmq.POLLIN)
        poller.register(zap.socket, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while probe_public not in zap.denied_keys:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AuthenticationError("the ZAP handler was never consulted: refusing to start")
            events = dict(poller.poll(int(left * 1000) + 1))
            if server in events:
                raise AuthenticationError("an unlisted CURVE key got in: refusing to start")
            if zap.socket in events:
                zap.serve()
        # a refused handshake never delivers; look once more to be sure
        if server.poll(50):
            raise AuthenticationError("an unlisted CURVE key got in: refusing to start")
    finally:
        client.close()
        server.close()
