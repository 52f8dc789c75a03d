"""A client's object calls in flight: CALLs and CREATEs kept until their REPLY.

A call is re-sent on every new session until its REPLY comes (the host's reply
cache makes a re-sent CALL harmless). A broker embedded in this very process
(``LocalBroker``, the Manager's own) applies object calls in the calling
thread instead, under the broker's lock: no socket, no thread wake-up; a call
that parks is answered later over the socket as usual.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import zmq

from fabric.broker.protocol import Call, Create, Reply
from fabric.errors import BrokerUnavailable, VersionMismatchError
from fabric.remote._link import Runtime, compatible


class LocalBroker(Protocol):
    """A broker in this very process (``Broker.call_local``): object calls skip the socket,
    the rest travels over its inproc endpoint (``Broker.local_endpoint``)."""

    def local_endpoint(self) -> tuple[zmq.Context[zmq.Socket[bytes]], str]: ...

    def call_local(
        self, session: bytes, message: Call | Create, parked: Callable[[], object]
    ) -> list[Reply]: ...


class Latch:
    """A one-shot event for one waiter: a held lock that ``set`` releases (cheaper to make)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        """Let the waiter go; call at most once."""
        self._lock.release()

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: float | None = None) -> bool:
        """Return True once set, False if ``timeout`` passed first."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._lock.release()
        return True


@dataclass(slots=True)
class PendingCall:
    """One CALL or CREATE awaiting its REPLY; ``done`` is set once it is answered or failed."""

    message: Call | Create
    done: Latch = field(default_factory=Latch)
    reply: Reply | None = None
    error: Exception | None = None

    def answer(self, reply: Reply) -> None:
        """Hand the reply to the waiter."""
        self.reply = reply
        self.done.set()

    def fail(self, error: Exception) -> None:
        """Make the waiter raise ``error``."""
        self.error = error
        self.done.set()

    def payload(self) -> bytes:
        """Return the reply payload of an answered call, or raise why it failed."""
        if self.error is not None:
            raise self.error
        reply = self.reply
        assert reply is not None
        if reply.status in ("ok", "error"):
            return bytes(reply.payload[0])
        raise BrokerUnavailable(f"object call failed: {reply.status}: {reply.message}")


def check_host_runtime(reply: bytes, ours: Runtime, address: str) -> None:
    """Raise VersionMismatchError unless the host's runtime (a RUNTIME ``reply``) matches ours."""
    python, cloudpickle_version = pickle.loads(reply)[1]
    if not (compatible(python, ours.python) and compatible(cloudpickle_version, ours.cloudpickle)):
        raise VersionMismatchError(
            f"this client runs Python {ours.python} with cloudpickle {ours.cloudpickle}; "
            f"the broker's object host at {address} runs Python {python} with "
            f"cloudpickle {cloudpickle_version}: install matching versions"
        )
