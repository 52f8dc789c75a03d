"""The built-in object host as a broker service: shared objects inside the broker's loop.

The broker calls it between two polls, so an object call costs one network hop.
It unpickles call arguments, which is why it lives in ``fabric.remote`` and is
plugged in by the CLI or the embedded Manager, never imported by the broker.
"""

from __future__ import annotations

import time

from fabric.broker.protocol import Call, Create, Reply
from fabric.broker.service import Outbox
from fabric.remote._host import ObjectHost
from fabric.remote._host import Reply as HostReply
from fabric.remote._proxies import BUILTIN_TYPES


class BuiltinHostService:
    """Host dict, list, Queue, Lock... for every client of the broker (host name ``""``)."""

    name = ""

    def __init__(self) -> None:
        self._host = ObjectHost(BUILTIN_TYPES)

    def handle(self, session: bytes, message: Create | Call) -> Outbox:
        """Run one CREATE or CALL; return every reply it makes possible."""
        now = time.monotonic()
        payload = message.payload[0] if message.payload else b""
        if type(payload) is not bytes:  # a frame off the socket: the local path passes bytes
            payload = bytes(payload)
        if isinstance(message, Create):
            replies = self._host.create(
                session, message.call, message.typeid, message.name, payload, now
            )
        else:
            replies = self._host.call(
                session, message.call, message.object, message.method, payload, now
            )
        return _outbox(replies)

    def peer_lost(self, session: bytes) -> Outbox:
        """Release the leases and anonymous objects of a session that ended."""
        return _outbox(self._host.session_lost(session, time.monotonic()))

    def close(self) -> None:
        """Drop every object (the broker is stopping)."""
        self._host = ObjectHost(BUILTIN_TYPES)

    def statistics(self) -> dict[str, int]:
        """Count objects, named objects, sessions and parked calls."""
        return self._host.statistics()


def _outbox(replies: list[HostReply]) -> list[tuple[bytes, Reply]]:
    return [
        (
            session,
            Reply(call=seq, status="ok" if ok else "error", session=session, payload=(blob,)),
        )
        for session, seq, ok, blob in replies
    ]
