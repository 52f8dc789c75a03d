"""Ask a running broker for its statistics, as ``fabric status`` does."""

from __future__ import annotations

import os
import platform
import socket
import time
from typing import Any

import zmq

from fabric.broker import protocol as p
from fabric.broker.keys import PeerKeys
from fabric.errors import BrokerUnavailable, FabricError

__all__ = ["query"]


def query(
    address: str,
    *,
    keys: str | os.PathLike[str] | PeerKeys | None = None,
    name: str = "admin",
    timeout: float = 5.0,
) -> dict[str, Any]:
    """Connect to the broker at ``address`` as an admin and return its STATS map.

    ``keys`` is a key directory holding ``<name>.key_secret`` and
    ``broker.key`` (or loaded :class:`PeerKeys`). Raise ``BrokerUnavailable``
    if no answer comes within ``timeout`` seconds (a wrong or missing key
    looks the same: CURVE refuses silently).
    """
    deadline = time.monotonic() + timeout
    peer_keys = keys if isinstance(keys, PeerKeys) or keys is None else PeerKeys.load(keys, name)
    with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
        sock.linger = 0
        if peer_keys is not None:
            peer_keys.configure(sock)
        sock.connect(address)
        hello = p.Hello(
            "admin",
            name,
            os.urandom(16),
            platform.python_version(),
            "-",
            pid=os.getpid(),
            host=socket.gethostname(),
        )
        sock.send_multipart(p.encode(hello))
        reply = _expect(sock, address, deadline)
        if isinstance(reply, p.Refuse):
            raise FabricError(f"broker at {address} refused: {reply.reason}")
        sock.send_multipart(p.encode(p.Status()))
        stats = _expect(sock, address, deadline)
        sock.send_multipart(p.encode(p.Bye()))
        if not isinstance(stats, p.Stats):
            raise FabricError(f"broker at {address} answered {stats!r} to STATUS")
        return stats.stats


def _expect(sock: zmq.Socket[bytes], address: str, deadline: float) -> p.Message:
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000) + 1):
            raise BrokerUnavailable(
                f"no answer from a broker at {address} (or the key was refused)"
            )
        # the admin asks one thing at a time: a BATCH holds at most its answer and heartbeats
        for message in p.decode_many(sock.recv_multipart()):
            if not isinstance(message, p.Heartbeat):
                return message
