"""fabric.local: the ``threading`` API with processes, on a C shared-memory core.

Change ``from threading import Thread`` to ``from fabric.local import Process``
(or ``import multiprocessing`` to ``import fabric.local``) and the code runs on
every core. Nothing here imports zmq or the remote layer.
"""

from fabric.local._exceptions import ExceptionProxy, RemoteTraceback
from fabric.local.context import (
    Context,
    get_all_start_methods,
    get_context,
    get_start_method,
    set_forkserver_preload,
    set_start_method,
)
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

TYPE_CHECKING = False
if TYPE_CHECKING:
    from fabric.local._compat import (
        AuthenticationError,
        BufferTooShort,
        Manager,
        ProcessError,
        TimeoutError,
        allow_connection_pickling,
        freeze_support,
        get_logger,
        log_to_stderr,
    )
    from fabric.local.connection import Connection, Pipe, wait
    from fabric.local.executor import Executor
    from fabric.local.pool import Pool
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

# Imported on first use (add new public names here): every spawned child imports
# this package before its target runs, and these modules pull in typing, ctypes,
# concurrent.futures and cloudpickle (~30 ms). The fork server preloads them all.
_LAZY = {
    "AuthenticationError": "fabric.local._compat",
    "BufferTooShort": "fabric.local._compat",
    "Manager": "fabric.local._compat",
    "ProcessError": "fabric.local._compat",
    "TimeoutError": "fabric.local._compat",
    "allow_connection_pickling": "fabric.local._compat",
    "freeze_support": "fabric.local._compat",
    "get_logger": "fabric.local._compat",
    "log_to_stderr": "fabric.local._compat",
    "Executor": "fabric.local.executor",
    "Pool": "fabric.local.pool",
    "JoinableQueue": "fabric.local.queues",
    "Queue": "fabric.local.queues",
    "SimpleQueue": "fabric.local.queues",
    "Connection": "fabric.local.connection",
    "Pipe": "fabric.local.connection",
    "wait": "fabric.local.connection",
    "Array": "fabric.local.sharedctypes",
    "RawArray": "fabric.local.sharedctypes",
    "RawValue": "fabric.local.sharedctypes",
    "Value": "fabric.local.sharedctypes",
    "Barrier": "fabric.local.synchronize",
    "BoundedSemaphore": "fabric.local.synchronize",
    "BrokenBarrierError": "fabric.local.synchronize",
    "Condition": "fabric.local.synchronize",
    "Event": "fabric.local.synchronize",
    "Lock": "fabric.local.synchronize",
    "OwnerDiedWarning": "fabric.local.synchronize",
    "RLock": "fabric.local.synchronize",
    "Semaphore": "fabric.local.synchronize",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__: list[str] = [
    "Array",
    "AuthenticationError",
    "Barrier",
    "BoundedSemaphore",
    "BrokenBarrierError",
    "BufferTooShort",
    "Condition",
    "Connection",
    "Context",
    "Event",
    "ExceptHookArgs",
    "ExceptionProxy",
    "Executor",
    "JoinableQueue",
    "Lock",
    "Manager",
    "OwnerDiedWarning",
    "Pipe",
    "Pool",
    "Process",
    "ProcessError",
    "Queue",
    "RLock",
    "RawArray",
    "RawValue",
    "RemoteTraceback",
    "Semaphore",
    "SimpleQueue",
    "TimeoutError",
    "Value",
    "active_children",
    "active_count",
    "allow_connection_pickling",
    "cpu_count",
    "current_process",
    "enumerate",
    "excepthook",
    "freeze_support",
    "get_all_start_methods",
    "get_context",
    "get_logger",
    "get_start_method",
    "log_to_stderr",
    "parent_process",
    "set_forkserver_preload",
    "set_start_method",
    "wait",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
