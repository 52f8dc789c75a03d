"""fabric.broker: the ZeroMQ broker that routes tasks and object calls.

It never unpickles anything and never imports ``fabric.local`` or
``fabric.remote``. The names below load their modules on first use, so
importing ``fabric.broker.cli`` (for ``fabric --help``) does not load zmq.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fabric.broker.journal import Journal, JournalError
    from fabric.broker.keys import Keyring, PeerKeys, generate
    from fabric.broker.scheduler import Limits
    from fabric.broker.server import Broker, BrokerStats
    from fabric.broker.service import Service
    from fabric.broker.status import query
    from fabric.broker.tasks import SchedulerStats, WorkerInfo

__all__ = [
    "Broker",
    "BrokerStats",
    "Journal",
    "JournalError",
    "Keyring",
    "Limits",
    "PeerKeys",
    "SchedulerStats",
    "Service",
    "WorkerInfo",
    "generate",
    "query",
]

_HOMES = {
    "Broker": "server",
    "BrokerStats": "server",
    "Journal": "journal",
    "JournalError": "journal",
    "Keyring": "keys",
    "PeerKeys": "keys",
    "generate": "keys",
    "Limits": "scheduler",
    "SchedulerStats": "tasks",
    "WorkerInfo": "tasks",
    "Service": "service",
    "query": "status",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fabric.broker' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fabric.broker.{home}"), name)
