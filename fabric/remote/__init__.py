"""fabric.remote: Manager, shared-object proxies, the cluster executor and worker nodes.

``Manager()`` starts a whole cluster on loopback (broker, object host, a worker
node with a task process per core); ``Manager("tcp://host:port")`` joins a
running one. Importing this package imports pyzmq but never ``fabric.local``.
"""

from fabric.remote._errors import LeaseLostError, OwnerLostWarning, RemoteError, RemoteTraceback
from fabric.remote._executor import Executor
from fabric.remote._manager import Manager
from fabric.remote._pool import AsyncResult, Pool
from fabric.remote._process import Process
from fabric.remote._proxy_base import AutoProxy, BaseProxy
from fabric.remote._worker import WorkerNode

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
