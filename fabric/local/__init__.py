"""fabric.local: the ``threading`` API with processes, on a C shared-memory core.

Change ``from threading import Thread`` to ``from fabric.local import Process``
(or ``import multiprocessing`` to ``import fabric.local``) and the code runs on
every core. Nothing here imports zmq or the remote layer.
"""

from fabric.local._exceptions import ExceptionProxy, RemoteTraceback
from fabric.local.connection import Connection, Pipe, wait
from fabric.local.context import (
    Context,
    get_all_start_methods,
    get_context,
    get_start_method,
    set_start_method,
)
from fabric.local.executor import Executor
from fabric.local.pool import Pool
from fabric.local.process import (
    ExceptHookArgs,
    Process,
    active_children,
    active_count,
    cpu_count,
    current_process,
    enumerate,
    excepthook,
    parent_process,
)
from fabric.local.queues import JoinableQueue, Queue, SimpleQueue
from fabric.local.sharedctypes import Array, RawArray, RawValue, Value
from fabric.local.synchronize import (
    Barrier,
    BoundedSemaphore,
    BrokenBarrierError,
    Condition,
    Event,
    Lock,
    OwnerDiedWarning,
    RLock,
    Semaphore,
)

__all__: list[str] = [
    "Array",
    "Barrier",
    "BoundedSemaphore",
    "BrokenBarrierError",
    "Condition",
    "Connection",
    "Context",
    "Event",
    "ExceptHookArgs",
    "ExceptionProxy",
    "Executor",
    "JoinableQueue",
    "Lock",
    "OwnerDiedWarning",
    "Pipe",
    "Pool",
    "Process",
    "Queue",
    "RLock",
    "RawArray",
    "RawValue",
    "RemoteTraceback",
    "Semaphore",
    "SimpleQueue",
    "Value",
    "active_children",
    "active_count",
    "cpu_count",
    "current_process",
    "enumerate",
    "excepthook",
    "get_all_start_methods",
    "get_context",
    "get_start_method",
    "parent_process",
    "set_start_method",
    "wait",
]
