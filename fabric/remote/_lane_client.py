"""A client's end of the same-host lane (see ``_lane``), and the choice of a proxy's transport.

``transport_for(address)`` is what a proxy unpickled in this process talks
through: the lane if this process was handed one (``FABRIC_LANE``) for that
very broker, else the process's broker connection (``_connections``).
Anything that keeps the lane from attaching (no such socket, a refusal,
another broker, another Python or cloudpickle) falls back to the connection,
which is also where a version mismatch is reported.

Each calling thread takes a channel (a ring pair) from the lane's pool for
one round trip and gives it back, so concurrent and blocking calls never
wait for each other; a fork child attaches afresh.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import socket
import threading
import weakref
from typing import Any

from fabric.errors import BrokerUnavailable
from fabric.local.connection import Connection as End
from fabric.remote._connections import connection_for
from fabric.remote._lane import CALL, CHANNEL, CREATE, lane_from_env, peer_uid, recv_frame
from fabric.remote._link import Runtime, compatible
from fabric.remote._proxy_base import Transport

log = logging.getLogger(__name__)

_lock = threading.Lock()
_lanes: dict[str, LaneClient | None] = {}  # broker address -> its lane (None: use the socket)
_live: weakref.WeakSet[LaneClient] = weakref.WeakSet()


class LaneUnavailable(Exception):
    """The lane could not be attached (the caller falls back to the broker connection)."""


def transport_for(address: str) -> Transport:
    """Return how this process should call objects of the broker at ``address``."""
    with _lock:
        if address not in _lanes:
            _lanes[address] = _attach(address)
        lane = _lanes[address]
    return lane if lane is not None else connection_for(address)


def _attach(address: str) -> LaneClient | None:
    handed = lane_from_env()
    if handed is None:
        return None
    try:
        lane = LaneClient(handed[0], handed[1], address)
    except LaneUnavailable as why:
        log.debug("no same-host lane to %s: %s", address, why)
        return None
    atexit.register(lane.close)
    return lane


class LaneClient:
    """Object calls to one broker's built-in host over the same-host lane (a ``Transport``).

    Thread-safe. Raise LaneUnavailable if the lane at ``path`` cannot be
    attached for ``address``.
    """

    def __init__(self, path: str, token: bytes, address: str, timeout: float = 10.0) -> None:
        self._path, self._token, self._address = path, token, address
        self._timeout = timeout
        self._free: list[End] = []
        self._attach_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._closed = False
        with self._attach_lock:
            self._connect()
        _live.add(self)

    @property
    def address(self) -> str:
        """Return the broker address (what proxies pickle as)."""
        return self._address

    def call(
        self, host: str, obj_id: str, method: str, payload: bytes, wait: float | None
    ) -> bytes:
        """Send one CALL and return its reply payload (see ``Transport.call``)."""
        return self._round((CALL, host, obj_id, method, payload, wait))

    def create(self, host: str, typeid: str, name: str, payload: bytes) -> bytes:
        """Send one CREATE and return its reply payload."""
        return self._round((CREATE, host, typeid, name, payload, None))

    def close(self) -> None:
        """Close every channel and the attach socket (the server ends our session)."""
        self._closed = True
        self._drop()

    def _round(self, request: tuple[Any, ...]) -> bytes:
        try:
            end = self._free.pop()  # atomic: each thread gets a channel of its own
        except IndexError:
            end = self._channel()
        try:
            end.send(request)
            ok, value = end.recv()
        except (EOFError, OSError) as exc:
            end.close()
            raise BrokerUnavailable(
                f"the same-host lane to {self._address} closed: {exc}"
            ) from None
        except BaseException:
            end.close()  # interrupted mid-call: its reply would answer the next caller
            raise
        self._free.append(end)
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def _channel(self) -> End:
        with self._attach_lock:
            if self._closed:
                raise BrokerUnavailable(f"the same-host lane to {self._address} is closed")
            try:
                if self._sock is None:  # a fork child: attach as ourselves
                    self._connect()
                assert self._sock is not None
                self._sock.sendall(CHANNEL)
                end = pickle.loads(recv_frame(self._sock))
            except (OSError, EOFError, LaneUnavailable) as exc:
                raise BrokerUnavailable(
                    f"the same-host lane to {self._address} refused a channel: {exc}"
                ) from None
        assert isinstance(end, End)
        return end

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._timeout)
            sock.connect(self._path)
            if peer_uid(sock) != os.getuid():
                raise LaneUnavailable("the lane's socket belongs to another user")
            sock.sendall(self._token)
            served, python, cloudpickle_version = recv_frame(sock).decode().split("\t")
        except (OSError, EOFError, ValueError) as exc:
            sock.close()
            raise LaneUnavailable(f"{self._path}: {exc}") from None
        except LaneUnavailable:
            sock.close()
            raise
        ours = Runtime()
        if served != self._address:
            sock.close()
            raise LaneUnavailable(f"it serves {served}")
        if not (
            compatible(python, ours.python) and compatible(cloudpickle_version, ours.cloudpickle)
        ):
            sock.close()
            raise LaneUnavailable(f"it runs Python {python}, cloudpickle {cloudpickle_version}")
        self._sock = sock

    def _drop(self) -> None:
        """Forget the channels and the attach socket (closing our copies of them)."""
        while self._free:
            self._free.pop().close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _after_fork_in_child() -> None:
    # the parent's channels and session are not ours: a child that calls attaches anew
    for lane in list(_live):
        lane._attach_lock = threading.Lock()  # another thread may have held it at the fork
        lane._drop()


os.register_at_fork(after_in_child=_after_fork_in_child)
