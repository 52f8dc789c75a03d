"""Object-call routing as pure logic: CREATE/CALL to services or host peers, REPLY back.

Theory of operation. A host is either a :class:`~fabric.broker.service.Service`
run in the broker's loop (answered at once, no hop) or a peer session that
said HELLO as ``host`` with a unique name. A call to a host peer is recorded
as pending under ``(caller session, call)``; only that host's REPLY for that
pair is routed back, so a host cannot answer for another or reach a session
that did not call it. When a host dies its pending calls are answered with
``host-lost``; when any session ends, services and host peers are told so
they can release that session's leases.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fabric.broker import protocol as p
from fabric.broker.scheduler import Out
from fabric.broker.service import Service

__all__ = ["ObjectRouter"]

log = logging.getLogger(__name__)


class ObjectRouter:
    """Route object calls between sessions, services and host peers; not thread-safe."""

    def __init__(self, services: Iterable[Service] = (), max_pending: int = 100_000) -> None:
        self.services = {service.name: service for service in services}
        self.hosts: dict[str, bytes] = {}  # host name -> session id
        self._pending: dict[tuple[bytes, int], bytes] = {}  # (caller, call) -> host session
        self._max_pending = max_pending

    def refusal(self, name: str, session: bytes) -> str | None:
        """Return why ``session`` may not be host ``name``, or None if it may."""
        if name in self.services:
            return f"host name {name!r} is the broker's own"
        holder = self.hosts.get(name)
        if holder is not None and holder != session:
            return f"another host is already named {name!r}"
        return None

    def add_host(self, name: str, session: bytes) -> None:
        """Route calls for ``name`` to the host peer ``session``."""
        self.hosts[name] = session

    def call(self, caller: bytes, message: p.Create | p.Call) -> list[Out]:
        """Route a CREATE or CALL from ``caller``; return the messages it makes."""
        service = self.services.get(message.host)
        if service is not None:
            try:
                return list(service.handle(caller, message))
            except Exception as exc:  # a service bug must not take the broker down
                log.exception("service %r failed on call %d", message.host, message.call)
                return [(caller, p.Reply(message.call, "error", repr(exc)))]
        host = self.hosts.get(message.host)
        if host is None or len(self._pending) >= self._max_pending:
            text = f"no object host named {message.host!r} is connected"
            return [(caller, p.Reply(message.call, "no-host", text))]
        self._pending[(caller, message.call)] = host
        forwarded: p.Message
        if isinstance(message, p.Create):
            forwarded = p.Create(
                message.host, message.call, message.typeid, message.name, caller, message.payload
            )
        else:
            forwarded = p.Call(
                message.host, message.call, message.object, message.method, caller, message.payload
            )
        return [(host, forwarded)]

    def reply(self, host: bytes, reply: p.Reply) -> list[Out]:
        """Route a host peer's REPLY back to its caller, if that call is pending there."""
        if self._pending.get((reply.session, reply.call)) != host:
            log.info("dropped a REPLY for call %d not pending on its host", reply.call)
            return []
        del self._pending[(reply.session, reply.call)]
        return [
            (reply.session, p.Reply(reply.call, reply.status, reply.message, b"", reply.payload))
        ]

    def session_gone(self, session: bytes) -> list[Out]:
        """Forget ``session``: answer calls pending on it (if a host), tell the others."""
        outs: list[Out] = []
        self.hosts = {name: sid for name, sid in self.hosts.items() if sid != session}
        for (caller, call), host in list(self._pending.items()):
            if host == session:
                text = "the object host was lost before it replied"
                outs.append((caller, p.Reply(call, "host-lost", text)))
            if session in (host, caller):
                del self._pending[(caller, call)]
        for service in self.services.values():
            try:
                outs += service.peer_lost(session)
            except Exception:
                log.exception(
                    "service %r failed to release session %s", service.name, session.hex()
                )
        outs += [(host, p.Gone(session)) for host in self.hosts.values()]
        return outs

    def close(self) -> None:
        """Close every service."""
        for service in self.services.values():
            service.close()
