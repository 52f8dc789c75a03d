"""The plug-in interface for object hosts that run inside the broker's loop.

A service answers CREATE and CALL messages addressed to its ``name`` (``""``
is the built-in host) without a network hop: the broker calls it directly,
on its own thread, between two polls. A service must therefore never block;
a call that has to wait (a lock held by someone else) is answered later, from
the ``handle`` or ``peer_lost`` call that makes it answerable, by returning a
reply addressed to the waiting session.

The broker never unpickles; a service may (its module lives in
``fabric.remote``), because every frame it sees came from a peer that passed
CURVE authentication and whose role allows CREATE/CALL.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from fabric.broker.protocol import Call, Create, Reply

__all__ = ["Outbox", "Service"]

Outbox = Iterable[tuple[bytes, Reply]]
"""Replies to send: ``(session id of the caller, REPLY)`` pairs."""


@runtime_checkable
class Service(Protocol):
    """An object host the broker runs in-process."""

    @property
    def name(self) -> str:
        """The host name CREATE/CALL messages address (``""`` for the built-in host)."""
        ...

    def handle(self, session: bytes, message: Create | Call) -> Outbox:
        """Take one CREATE or CALL from ``session`` and return the replies it makes possible.

        Answer every ``call`` exactly once, now or later, with ``Reply(call=...)``.
        Raising is a bug in the service: the broker logs it and answers the
        caller with ``Reply(status="error", message=...)`` and no payload.
        """
        ...

    def peer_lost(self, session: bytes) -> Outbox:
        """Forget ``session`` (it said BYE or stopped heartbeating): release its leases."""
        ...

    def close(self) -> None:
        """Release whatever the service holds; the broker calls it once, when it stops."""
        ...
