"""The built-in shared types: their host-side specs and their client-side proxy classes."""

from __future__ import annotations

from fabric.remote import _hosted_data as data
from fabric.remote import _hosted_sync as sync
from fabric.remote._host import TypeSpec
from fabric.remote._proxies_data import (
    ArrayProxy,
    DictProxy,
    JoinableQueueProxy,
    ListProxy,
    NamespaceProxy,
    QueueProxy,
    ValueProxy,
)
from fabric.remote._proxies_sync import (
    BarrierProxy,
    BoundedSemaphoreProxy,
    ConditionProxy,
    EventProxy,
    LockProxy,
    RLockProxy,
    SemaphoreProxy,
)
from fabric.remote._proxy_base import AutoProxy, BaseProxy

_HOSTED: dict[str, tuple[type, type[BaseProxy]]] = {
    "dict": (data.Dict, DictProxy),
    "list": (data.List, ListProxy),
    "Namespace": (data.Namespace, NamespaceProxy),
    "Value": (data.Value, ValueProxy),
    "Array": (data.Array, ArrayProxy),
    "Queue": (data.Queue, QueueProxy),
    "JoinableQueue": (data.JoinableQueue, JoinableQueueProxy),
    "Lock": (sync.Lock, LockProxy),
    "RLock": (sync.RLock, RLockProxy),
    "Semaphore": (sync.Semaphore, SemaphoreProxy),
    "BoundedSemaphore": (sync.BoundedSemaphore, BoundedSemaphoreProxy),
    "Event": (sync.Event, EventProxy),
    "Condition": (sync.Condition, ConditionProxy),
    "Barrier": (sync.Barrier, BarrierProxy),
}

BUILTIN_TYPES: tuple[TypeSpec, ...] = tuple(
    TypeSpec(typeid, cls, frozenset(cls.EXPOSED), hosted=True)  # type: ignore[attr-defined]
    for typeid, (cls, _) in _HOSTED.items()
)

# Proxy classes of registered custom types (Manager.register(proxytype=...)), per process.
_custom: dict[str, type[BaseProxy]] = {}


def register_proxy_type(typeid: str, proxytype: type[BaseProxy]) -> None:
    """Use ``proxytype`` for objects of ``typeid`` in this process."""
    _custom[typeid] = proxytype


def proxy_type(typeid: str) -> type[BaseProxy]:
    """Return the proxy class for a type id (AutoProxy for unknown custom types)."""
    if typeid in _HOSTED:
        return _HOSTED[typeid][1]
    return _custom.get(typeid, AutoProxy)
