"""Manager: shared objects, the cluster executor, Pool and Process, through one broker.

``Manager()`` with no address starts an embedded cluster on loopback (see
``_embedded``); ``Manager(address)`` joins a running broker. Objects created
through it live on the broker's built-in host (one network hop per call) or, for
types this client registers, on this client itself.
"""

from __future__ import annotations

import builtins
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from fabric.remote import _connections
from fabric.remote._connection import Connection
from fabric.remote._embedded import EmbeddedCluster
from fabric.remote._executor import Executor
from fabric.remote._host import ObjectHost, ObjRef, TypeSpec
from fabric.remote._keys import Curve, load_curve
from fabric.remote._proxies import register_proxy_type
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
from fabric.remote._proxy_base import AutoProxy, BaseProxy, decode_reply, dumps
from fabric.remote._worker import check_prefetch


def _public_methods(cls: type) -> frozenset[str]:
    return frozenset(n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n)))


class Manager:
    """Share objects and run tasks across a cluster; a context manager.

    ``address`` is a broker's ``tcp://host:port``; None starts an embedded
    cluster (broker, object host and a worker node with ``processes`` task
    processes) that ``shutdown()`` stops. ``keys`` is a key directory made by
    ``fabric keygen``. ``forward_output`` is the default for executors, pools
    and processes made here. ``lane`` (embedded cluster only): the task
    processes of the embedded worker node call shared objects over shared
    memory to a thread of this process instead of TCP (see the docs' "same-host
    lane"); False sends their calls over TCP like any remote client's.
    ``prefetch`` (embedded cluster only): tasks its worker node may hold beyond
    its free task processes (``fabric worker --prefetch``; None, the default,
    is the node's default window; 0 takes one task per free process).
    """

    def __init__(
        self,
        address: str | None = None,
        keys: str | Path | None = None,
        *,
        processes: int | None = None,
        forward_output: bool = False,
        name: str | None = None,
        timeout: float = 10.0,
        lane: bool = True,
        prefetch: int | None = None,
    ) -> None:
        self._prefetch = None if prefetch is None else check_prefetch(prefetch)
        self._address = address
        self._keys = keys
        self._processes = processes
        self.forward_output = forward_output
        self._name = name or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self._timeout = timeout
        self._lane = lane
        self._cluster: EmbeddedCluster | None = None
        self._conn: Connection | None = None
        self._host: ObjectHost | None = None
        self._host_conn: Connection | None = None
        self._lock = threading.Lock()

    # --- lifecycle --------------------------------------------------------------------
    @property
    def address(self) -> str | None:
        """Return the broker address (known once connected, for an embedded cluster too)."""
        return self._address

    def connect(self) -> Manager:
        """Start the embedded cluster if there is no address, then open the session."""
        with self._lock:
            if self._conn is not None:
                return self
            if self._address is None:
                self._cluster = EmbeddedCluster(
                    processes=self._processes,
                    keys=self._keys,
                    lane=self._lane,
                    prefetch=self._prefetch,
                )
                self._address = self._cluster.address
            try:
                self._conn = self._open(role="client", name="")
                self._conn.check_runtime()
                if self._host is not None:
                    self._host_conn = self._open(role="host", name=self._name, host=self._host)
            except BaseException:
                self._shutdown_locked()
                raise
            _connections.register(self._conn)
        return self

    start = connect

    def _open(self, role: str, name: str, host: ObjectHost | None = None) -> Connection:
        assert self._address is not None
        curve = self._curve()
        # a broker embedded in this process takes our object calls in the calling thread
        local = self._cluster.broker if self._cluster is not None else None
        return Connection(
            self._address,
            curve=curve,
            role=role,
            name=name,
            host=host,
            timeout=self._timeout,
            local=local,
        )

    def _curve(self) -> Curve | None:
        if self._cluster is not None:
            return self._cluster.curve
        return load_curve(self._keys, "client")

    def shutdown(self) -> None:
        """Close the session; stop the embedded cluster if this Manager started it."""
        with self._lock:
            self._shutdown_locked()

    def _shutdown_locked(self) -> None:
        for conn in (self._host_conn, self._conn):
            if conn is not None:
                _connections.unregister(conn)
                conn.close()
        self._conn = self._host_conn = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None
            self._address = None

    def __enter__(self) -> Manager:
        return self.connect()

    def __del__(self) -> None:
        if getattr(self, "_conn", None) is not None or getattr(self, "_cluster", None) is not None:
            warnings.warn(
                f"Manager for {self._address} collected without shutdown()",
                ResourceWarning,
                stacklevel=1,
            )

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

    @property
    def connection(self) -> Connection:
        """Return the open connection (RuntimeError before connect())."""
        if self._conn is None:
            raise RuntimeError("the Manager is not connected: use connect() or 'with'")
        return self._conn

    # --- shared objects -----------------------------------------------------------------
    def _new(self, typeid: str, name: str | None, *args: Any, host: str = "", **kw: Any) -> Any:
        reply = self.connection.create(host, typeid, name or "", dumps((args, kw)))
        ref = decode_reply(reply)
        assert isinstance(ref, ObjRef)
        ref = ObjRef(ref.typeid, ref.obj_id, ref.exposed, host)
        from fabric.remote._proxies import proxy_type

        return proxy_type(typeid)(ref, self.connection)

    def dict(
        self,
        name: str | Mapping[Any, Any] | None = None,
        data: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = (),
    ) -> DictProxy:
        """Return a shared dict; a ``name`` finds the same dict for every client.

        ``mgr.dict({"a": 1})`` (no name) works too. ``data`` fills a new dict; a named
        dict that exists already is returned as it is.
        """
        if name is not None and not isinstance(name, str):
            return self.dict(None, name)
        pairs = data.items() if isinstance(data, Mapping) else data
        proxy: DictProxy = self._new("dict", name, [(k, dumps(v)) for k, v in pairs])
        return proxy

    def list(self, name: str | Iterable[Any] | None = None, data: Iterable[Any] = ()) -> ListProxy:
        """Return a shared list; a ``name`` (a str) finds the same list for every client."""
        if name is not None and not isinstance(name, str):
            return self.list(None, name)
        proxy: ListProxy = self._new("list", name, [dumps(v) for v in data])
        return proxy

    def Namespace(self, *, name: str | None = None, **attrs: Any) -> NamespaceProxy:
        """Return a shared namespace (attributes by name)."""
        proxy: NamespaceProxy = self._new(
            "Namespace", name, [(k, dumps(v)) for k, v in attrs.items()]
        )
        return proxy

    def Queue(self, maxsize: int = 0, *, name: str | None = None) -> QueueProxy:
        """Return a shared FIFO queue."""
        proxy: QueueProxy = self._new("Queue", name, maxsize)
        return proxy

    def JoinableQueue(self, maxsize: int = 0, *, name: str | None = None) -> JoinableQueueProxy:
        """Return a shared queue with task_done()/join()."""
        proxy: JoinableQueueProxy = self._new("JoinableQueue", name, maxsize)
        return proxy

    def Lock(self, *, name: str | None = None) -> LockProxy:
        """Return a shared lock (a lease of the session holding it)."""
        proxy: LockProxy = self._new("Lock", name)
        return proxy

    def RLock(self, *, name: str | None = None) -> RLockProxy:
        """Return a shared reentrant lock."""
        proxy: RLockProxy = self._new("RLock", name)
        return proxy

    def Semaphore(self, value: int = 1, *, name: str | None = None) -> SemaphoreProxy:
        """Return a shared semaphore."""
        proxy: SemaphoreProxy = self._new("Semaphore", name, value)
        return proxy

    def BoundedSemaphore(self, value: int = 1, *, name: str | None = None) -> BoundedSemaphoreProxy:
        """Return a shared bounded semaphore."""
        proxy: BoundedSemaphoreProxy = self._new("BoundedSemaphore", name, value)
        return proxy

    def Event(self, *, name: str | None = None) -> EventProxy:
        """Return a shared event."""
        proxy: EventProxy = self._new("Event", name)
        return proxy

    def Condition(self, *, name: str | None = None) -> ConditionProxy:
        """Return a shared condition variable (over its own reentrant lock)."""
        proxy: ConditionProxy = self._new("Condition", name)
        return proxy

    def Barrier(
        self, parties: int, timeout: float | None = None, *, name: str | None = None
    ) -> BarrierProxy:
        """Return a shared barrier for ``parties`` callers (no ``action``)."""
        proxy: BarrierProxy = self._new("Barrier", name, parties, None, timeout)
        return proxy

    def Value(self, typecode: str, value: Any = 0, *, name: str | None = None) -> ValueProxy:
        """Return a shared typed value (``array`` type codes: 'i', 'd', ...)."""
        proxy: ValueProxy = self._new("Value", name, typecode, value)
        return proxy

    def Array(
        self, typecode: str, sequence: int | Sequence[Any], *, name: str | None = None
    ) -> ArrayProxy:
        """Return a shared typed array (``array`` type codes)."""
        proxy: ArrayProxy = self._new("Array", name, typecode, sequence)
        return proxy

    # --- custom types -------------------------------------------------------------------
    def register(
        self,
        typeid: str,
        callable: Callable[..., Any],
        *,
        exposed: Iterable[str] | None = None,
        method_to_typeid: Mapping[str, str] | None = None,
        proxytype: type[BaseProxy] = AutoProxy,
    ) -> Callable[..., Any]:
        """Host objects made by ``callable`` on this client; return their creator.

        The creator is also set as ``self.<typeid>(*args, name=None, **kwargs)``.
        Methods listed in ``exposed`` (default: the public ones of ``callable`` if
        it is a class) may be called through proxies from any node; calls run one
        at a time, in order, on this client's host thread.
        """
        if exposed is None:
            exposed = _public_methods(callable) if isinstance(callable, type) else ()
        spec = TypeSpec(typeid, callable, frozenset(exposed), dict(method_to_typeid or {}))
        register_proxy_type(typeid, proxytype)
        with self._lock:
            if self._host is None:
                self._host = ObjectHost(())
            self._host.register(spec)
            if self._conn is not None and self._host_conn is None:
                self._host_conn = self._open(role="host", name=self._name, host=self._host)

        def create(*args: Any, name: str | None = None, **kwargs: Any) -> Any:
            return self._new(typeid, name, *args, host=self._name, **kwargs)

        create.__name__ = typeid
        setattr(self, typeid, create)
        return create

    # --- tasks ----------------------------------------------------------------------------
    def Executor(
        self, *, forward_output: bool | None = None, requires: builtins.dict[str, str] | None = None
    ) -> Executor:
        """Return a concurrent.futures.Executor running tasks on the cluster's worker nodes."""
        forward = self.forward_output if forward_output is None else forward_output
        return Executor(self.connection, forward_output=forward, requires=requires)

    def Pool(
        self,
        processes: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        *,
        forward_output: bool | None = None,
    ) -> Any:
        """Return a multiprocessing.Pool-like pool over the cluster (see ``Pool``)."""
        from fabric.remote._pool import Pool

        forward = self.forward_output if forward_output is None else forward_output
        return Pool(self.Executor(forward_output=forward), processes, initializer, initargs)

    def Process(
        self,
        group: None = None,
        target: Callable[..., Any] | None = None,
        name: str | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        daemon: bool | None = None,
        forward_output: bool | None = None,
    ) -> Any:
        """Return a remote Process that runs ``target`` on a worker node."""
        from fabric.remote._process import Process

        forward = self.forward_output if forward_output is None else forward_output
        return Process(
            group, target, name, args, kwargs, daemon=daemon, manager=self, forward_output=forward
        )
