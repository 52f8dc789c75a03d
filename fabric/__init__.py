"""fabric: the threading API with processes, then with a cluster.

``fabric.local`` runs code on every core of this machine through a C-backed
shared-memory core; ``fabric.remote`` spreads it over a cluster through the
``fabric.broker``. Importing this package imports neither layer (nor zmq).
"""

from fabric._version import __version__
from fabric.errors import (
    AuthenticationError,
    BrokerUnavailable,
    FabricError,
    ProtocolError,
    VersionMismatchError,
    WorkerLostError,
)

__all__ = [
    "AuthenticationError",
    "BrokerUnavailable",
    "FabricError",
    "ProtocolError",
    "VersionMismatchError",
    "WorkerLostError",
    "__version__",
]
