"""Small raw-pyzmq peers (fake clients and workers) that speak the wire protocol in tests."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import zmq

from fabric.broker import protocol as p
from fabric.broker.keys import PeerKeys

M = TypeVar("M", bound=p.Message)
PY, CP = "3.11.7", "3.1.1"


class Peer:
    """A DEALER connected to the broker, sending and receiving typed messages."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        address: str,
        keys: PeerKeys | None = None,
        session: bytes | None = None,
    ) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.linger = 0
        if keys is not None:
            keys.configure(self.socket)
        self.socket.connect(address)
        self.session = session or os.urandom(16)
        self.keepalive: float | None = None  # send HEARTBEATs this often while in recv()
        self.pending: deque[p.Message] = deque()  # the rest of a BATCH being read

    def send(self, message: p.Message) -> None:
        self.socket.send_multipart(p.encode(message))

    def send_raw(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def recv(self, timeout: float = 10.0) -> p.Message:
        """Return the next message that is not a HEARTBEAT; TimeoutError past ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            while self.pending:
                message = self.pending.popleft()
                if not isinstance(message, p.Heartbeat):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"nothing from the broker within {timeout} s")
            wait = left if self.keepalive is None else min(left, self.keepalive)
            if not self.socket.poll(int(wait * 1000) + 1):
                if self.keepalive is not None:
                    self.send(p.Heartbeat())
                continue
            self.pending += p.decode_many(self.socket.recv_multipart())

    def take(self, timeout: float = 0.0) -> p.Message | None:
        """Return a message that arrives within ``timeout`` (a HEARTBEAT too), or None."""
        if not self.pending:
            if not self.socket.poll(int(timeout * 1000)):
                return None
            self.pending += p.decode_many(self.socket.recv_multipart())
        return self.pending.popleft()

    def expect(self, kind: type[M], timeout: float = 10.0) -> M:
        message = self.recv(timeout)
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    def hello(
        self, role: str, name: str = "", capacity: int = 0, labels: dict[str, str] | None = None
    ) -> p.Welcome:
        hello = p.Hello(role, name or role, self.session, PY, CP, capacity, labels=labels or {})
        self.send(hello)
        return self.expect(p.Welcome)

    def silent(self, timeout: float = 0.2) -> bool:
        """Return True if nothing but heartbeats arrives within ``timeout``."""
        try:
            self.recv(timeout)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.socket.close()


@contextmanager
def peers(address: str, keys: PeerKeys | None = None) -> Iterator[PeerFactory]:
    """Yield a factory of peers, all closed (and their context) on exit."""
    with zmq.Context() as context:
        factory = PeerFactory(context, address, keys)
        try:
            yield factory
        finally:
            for peer in factory.made:
                peer.close()


class PeerFactory:
    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], address: str, keys: PeerKeys | None
    ) -> None:
        self.context, self.address, self.keys = context, address, keys
        self.made: list[Peer] = []

    def __call__(self, keys: PeerKeys | None = None, session: bytes | None = None) -> Peer:
        peer = Peer(self.context, self.address, keys or self.keys, session)
        self.made.append(peer)
        return peer
