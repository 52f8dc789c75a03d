"""fabric.remote: Manager, shared-object proxies, the cluster executor and worker nodes.

``Manager()`` starts a whole cluster on loopback (broker, object host, a worker
node with a task process per core); ``Manager("tcp://host:port")`` joins a
running one. Names load on first use, so a task process that imports only the
task runner starts fast; nothing here imports ``fabric.local``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fabric.remote._errors import (
        LeaseLostError,
        OwnerLostWarning,
        RemoteError,
        RemoteTraceback,
    )
    from fabric.remote._executor import Executor
    from fabric.remote._manager import Manager
    from fabric.remote._pool import AsyncResult, Pool
    from fabric.remote._process import Process
    from fabric.remote._proxy_base import AutoProxy, BaseProxy
    from fabric.remote._worker import WorkerNode

_WHERE = {
    "AsyncResult": "_pool",
    "AutoProxy": "_proxy_base",
    "BaseProxy": "_proxy_base",
    "Executor": "_executor",
    "LeaseLostError": "_errors",
    "Manager": "_manager",
    "OwnerLostWarning": "_errors",
    "Pool": "_pool",
    "Process": "_process",
    "RemoteError": "_errors",
    "RemoteTraceback": "_errors",
    "WorkerNode": "_worker",
}

__all__ = [
    "AsyncResult",
    "AutoProxy",
    "BaseProxy",
    "Executor",
    "LeaseLostError",
    "Manager",
    "OwnerLostWarning",
    "Pool",
    "Process",
    "RemoteError",
    "RemoteTraceback",
    "WorkerNode",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fabric.remote' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fabric.remote.{module}"), name)
    globals()[name] = value
    return value
