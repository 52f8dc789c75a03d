"""The proxy base: turn method calls into object-host requests over a connection.

A proxy is ``(ObjRef, broker address)``. It pickles as exactly that, so a proxy
sent to a task on another node reconnects there, through that process's
connection to the same broker (see ``_connections``), or through the same-host
lane if the process was handed one for that broker (see ``_lane``).
"""

from __future__ import annotations

import pickle
import threading
from typing import Any, ClassVar, Protocol

import cloudpickle

from fabric.remote._errors import with_remote_traceback
from fabric.remote._host import RELEASE, ObjRef


class Transport(Protocol):
    """What a proxy needs from a connection to the broker."""

    @property
    def address(self) -> str: ...

    def call(
        self, host: str, obj_id: str, method: str, payload: bytes, wait: float | None
    ) -> bytes:
        """Send one CALL and return its reply payload.

        ``wait`` is how long the host may park the call (None: without limit);
        the connection nudges the host when it passes.
        """
        ...

    def create(self, host: str, typeid: str, name: str, payload: bytes) -> bytes:
        """Send one CREATE and return its reply payload."""
        ...


# Values plain pickle writes exactly as cloudpickle does, ~8x faster (no Pickler subclass).
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def dumps(value: Any) -> bytes:
    """Pickle a user value for the host (cloudpickle, so __main__ classes travel too)."""
    if type(value) in _PLAIN:
        return pickle.dumps(value, protocol=5)
    return cloudpickle.dumps(value, protocol=5)  # type: ignore[no-any-return]


def _dumps_call(args: tuple[Any, ...], kwargs: dict[str, Any], token: int | None) -> bytes:
    envelope = (args, kwargs, threading.get_ident(), token)
    if not kwargs and _PLAIN.issuperset(map(type, args)):
        return pickle.dumps(envelope, protocol=5)
    return cloudpickle.dumps(envelope, protocol=5)  # type: ignore[no-any-return]


def loads(blob: bytes) -> Any:
    """Unpickle a value stored on the host."""
    return cloudpickle.loads(blob)


def decode_reply(payload: bytes) -> Any:
    """Return the value of a reply or raise its exception with the remote traceback."""
    ok, value = cloudpickle.loads(payload)
    if ok:
        return value
    exc, tb_text = value
    raise with_remote_traceback(exc, tb_text)


def _rebuild(cls: type[BaseProxy], ref: ObjRef, address: str) -> BaseProxy:
    from fabric.remote._lane_client import transport_for

    return cls(ref, transport_for(address))


class BaseProxy:
    """A handle on a shared object; every method is one round trip to its host."""

    _typeid: ClassVar[str] = ""

    def __init__(self, ref: ObjRef, conn: Transport) -> None:
        self._ref = ref
        self._conn = conn

    def __reduce__(self) -> tuple[Any, tuple[type[BaseProxy], ObjRef, str]]:
        return (_rebuild, (type(self), self._ref, self._conn.address))

    def __repr__(self) -> str:
        ref = self._ref
        return f"<{type(self).__name__} {ref.typeid} #{ref.obj_id} via {self._conn.address}>"

    def _call(
        self,
        method: str,
        *args: Any,
        wait: float | None = 0.0,
        token: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``method`` on the host, which may park it ``wait`` seconds (None: forever)."""
        payload = _dumps_call(args, kwargs, token)
        reply = self._conn.call(self._ref.host, self._ref.obj_id, method, payload, wait)
        return decode_reply(reply)

    def _release(self) -> None:
        """Tell the host this session no longer holds the object (anonymous objects are freed)."""
        self._call(RELEASE)


class AutoProxy(BaseProxy):
    """A proxy for a registered custom type: its exposed methods become attributes."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        if name not in self._ref.exposed:
            raise AttributeError(f"{self._ref.typeid} does not expose {name!r}")

        def method(*args: Any, **kwargs: Any) -> Any:
            return self._wrap(self._call(name, *args, wait=None, **kwargs))

        method.__name__ = name
        return method

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, ObjRef):  # method_to_typeid: the host returned a new shared object
            from fabric.remote._proxies import proxy_type

            ref = ObjRef(value.typeid, value.obj_id, value.exposed, self._ref.host)
            return proxy_type(ref.typeid)(ref, self._conn)
        return value
