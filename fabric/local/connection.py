"""Pipe and Connection on shared-memory rings (the ``multiprocessing.connection`` API).

``Pipe(duplex=True)`` returns two :class:`Connection` ends, each direction a
single-producer ring in shared memory with futex wake-ups, so a message
costs no system call while the receiver is awake. An end pickles as its
rings, so it reaches children under every start method.

End of file. Each ring keeps a small table of the processes holding each
side. ``recv`` raises ``EOFError`` once the ring is empty and no live process
holds the other end (it was closed everywhere, or every holder died, even by
``kill -9``); ``send`` raises ``BrokenPipeError`` when no live process holds
the receiving end. A fork child holding an end counts as a holder, as with
file descriptors, and so does an end pickled but not yet unpickled.

``fileno()`` returns an eventfd (the substitute for a pipe's fd): it is
readable while a message or end of file waits, so ``selectors``,
``select.select`` and ``asyncio``'s ``loop.add_reader`` work. The first call
starts a small watcher thread for that end; ends nobody calls ``fileno`` on
pay nothing for it.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import weakref
from collections.abc import Iterable
from multiprocessing import BufferTooShort
from typing import Any

from fabric.local import _shm
from fabric.local._ring import HEADER_SIZE, Ring, wait_any

__all__ = ["Connection", "Pipe", "wait"]

DEFAULT_CAPACITY = 256 * 1024
_READERS, _WRITERS = 0, 1
_PEER_CHECK_S = 0.1  # how soon a blocked wait notices a peer killed with -9
_open_ends: weakref.WeakSet[Connection] = weakref.WeakSet()


def _new_ring(capacity: int) -> tuple[_shm.Block, Ring]:
    if not isinstance(capacity, int) or not 4096 <= capacity <= 1 << 30:
        raise ValueError(f"capacity must be an int in [4096, 2**30] bytes, got {capacity!r}")
    block = _shm.allocate(HEADER_SIZE + (1 << (capacity - 1).bit_length()))
    return block, Ring(block.buffer, create=True)


class _Side:
    """One ring seen from one end: the block, the ring and which side we hold."""

    __slots__ = ("block", "ring", "side")

    def __init__(self, block: _shm.Block, ring: Ring, side: int) -> None:
        self.block, self.ring, self.side = block, ring, side


def _detach(sides: list[_Side], pid: int) -> None:
    if os.getpid() == pid:  # a fork child's copy is detached by the child itself
        for s in sides:
            s.ring.detach(s.side)


class Connection:
    """One end of a Pipe (the ``multiprocessing.connection.Connection`` API)."""

    def __init__(self, reader: _Side | None, writer: _Side | None) -> None:
        self._reader, self._writer = reader, writer
        self._sides = [s for s in (reader, writer) if s is not None]
        for s in self._sides:
            s.ring.attach(s.side)
        self._finalizer = weakref.finalize(self, _detach, list(self._sides), os.getpid())
        self._bell: _Doorbell | None = None
        _open_ends.add(self)
        self._bind_fast_paths()

    def _bind_fast_paths(self) -> None:
        # The public send/recv methods call these four: the ring's C methods
        # (same arguments and errors) while this end is open, else the slow
        # versions of the class, which raise the right error or re-arm the
        # doorbell. close() unbinds them all, fileno() the receiving ones.
        # (Binding the public names themselves would save one more call, but
        # then `send = conn.send` would not keep the end open.)
        if self._writer is not None:
            ring = self._writer.ring
            self.__dict__.update(_send=ring.send, _send_bytes=ring.send_bytes)
        if self._reader is not None and self._bell is None:
            ring = self._reader.ring
            self.__dict__.update(_recv=ring.recv, _recv_bytes=ring.recv_bytes)

    def _unbind_fast_paths(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.__dict__.pop(name, None)

    def __reduce__(self) -> tuple[Any, ...]:
        self._check_open()
        for s in self._sides:  # count the copy in until it is unpickled
            s.ring.pending(s.side, 1)
        state = [(s.block, s.side) if s else None for s in (self._reader, self._writer)]
        return _rebuild, (state,)

    # -- state ---------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once ``close()`` was called on this end."""
        return not self._finalizer.alive

    @property
    def readable(self) -> bool:
        """True if this end can receive."""
        return self._reader is not None

    @property
    def writable(self) -> bool:
        """True if this end can send."""
        return self._writer is not None

    def _check_open(self) -> None:
        if self.closed:
            raise OSError("handle is closed")

    def _check_readable(self) -> Ring:
        self._check_open()
        if self._reader is None:
            raise OSError("connection is write-only")
        return self._reader.ring

    def _check_writable(self) -> Ring:
        self._check_open()
        if self._writer is None:
            raise OSError("connection is read-only")
        return self._writer.ring

    def close(self) -> None:
        """Close this end in this process (idempotent)."""
        self._unbind_fast_paths(("_send", "_send_bytes", "_recv", "_recv_bytes"))
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        self._finalizer()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = ("r" if self.readable else "") + ("w" if self.writable else "")
        return f"<Connection {mode}{' closed' if self.closed else ''}>"

    # -- sending -------------------------------------------------------
    def send(self, obj: object) -> None:
        """Send a picklable object (pickling errors raise here).

        Blocks only while the ring is full; ``BrokenPipeError`` if nobody
        holds the other end any more.
        """
        self._send(obj)

    def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """Send ``size`` bytes of a C-contiguous bytes-like object, from ``offset``."""
        self._send_bytes(buf, offset, size)

    def _send(self, obj: object) -> None:
        self._check_writable().send(obj)

    def _send_bytes(self, buf: Any, offset: int, size: int | None) -> None:
        self._check_writable().send_bytes(buf, offset, size)

    # -- receiving -----------------------------------------------------
    def recv(self, timeout: float | None = None) -> Any:
        """Return the next object sent.

        ``EOFError`` when nothing is left and the other end is gone;
        ``TimeoutError`` after ``timeout`` seconds (an addition to the
        multiprocessing API).
        """
        return self._recv(timeout)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Return the next message as bytes (``OSError`` if longer than maxlength)."""
        data: bytes = self._recv_bytes(maxlength)
        return data

    def recv_bytes_into(self, buf: Any, offset: int = 0) -> int:
        """Read the next message into ``buf`` at ``offset``; return its length.

        Raises ``multiprocessing.BufferTooShort`` (holding the message) if it
        does not fit.
        """
        view = memoryview(buf).cast("B")
        if offset < 0 or offset > len(view):
            raise ValueError("offset out of bounds" if offset > 0 else "negative offset")
        data: bytes = self._recv_bytes(None)
        if len(data) > len(view) - offset:
            raise BufferTooShort(data)
        view[offset : offset + len(data)] = data
        return len(data)

    def _recv(self, timeout: float | None) -> Any:
        ring = self._check_readable()
        try:
            return ring.recv(timeout)
        finally:
            self._rearm()

    def _recv_bytes(self, maxlength: int | None) -> Any:
        ring = self._check_readable()
        try:
            return ring.recv_bytes(maxlength)
        finally:
            self._rearm()

    def _rearm(self) -> None:
        if self._bell is not None:
            self._bell.rearm()

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Return whether a message (or end of file) is ready, waiting up to timeout.

        ``timeout=None`` waits forever.
        """
        ring = self._check_readable()
        return bool(ring.poll(timeout, _WRITERS))

    def fileno(self) -> int:
        """Return an eventfd readable while a message or end of file waits."""
        self._check_readable()
        if self._bell is None:
            assert self._reader is not None
            self._bell = _Doorbell(self._reader.ring)
            self._unbind_fast_paths(("_recv", "_recv_bytes"))
        return self._bell.fd


def Pipe(duplex: bool = True, *, capacity: int = DEFAULT_CAPACITY) -> tuple[Connection, Connection]:
    """Return two connected ends; with ``duplex=False`` the first only receives.

    ``capacity`` is each direction's ring size in bytes; larger messages are
    streamed through it.
    """
    b1, r1 = _new_ring(capacity)
    if not duplex:
        return Connection(_Side(b1, r1, _READERS), None), Connection(None, _Side(b1, r1, _WRITERS))
    b2, r2 = _new_ring(capacity)
    a = Connection(_Side(b1, r1, _READERS), _Side(b2, r2, _WRITERS))
    b = Connection(_Side(b2, r2, _READERS), _Side(b1, r1, _WRITERS))
    return a, b


def _rebuild(state: list[tuple[_shm.Block, int] | None]) -> Connection:
    sides = [None if s is None else _Side(s[0], Ring(s[0].buffer), s[1]) for s in state]
    conn = Connection(sides[0], sides[1])
    for s in conn._sides:
        s.ring.pending(s.side, -1)
    return conn


class _Doorbell:
    """An eventfd kept readable while a ring has a message, by a watcher thread.

    The thread sleeps on the ring's futex (``wait_any``) together with a
    private control ring; a receive re-arms it through the control ring.
    """

    def __init__(self, ring: Ring) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._ring = ring
        self._ctl_block = _shm.allocate(HEADER_SIZE + 4096)
        self._ctl = Ring(self._ctl_block.buffer, create=True)
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._watch, name="fabric-doorbell", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        rung = False
        while True:
            if not rung and self._ring.poll(0.0, _WRITERS):
                os.eventfd_write(self.fd, 1)
                rung = True
            # a peer killed with -9 wakes nobody: look again now and then
            wait_any(
                [self._ctl] if rung else [self._ctl, self._ring], None if rung else _PEER_CHECK_S
            )
            while self._ctl.poll(0.0):
                self._ctl.get(False)
                rung = False
            if self._stop:
                return

    def rearm(self) -> None:
        """Clear the bell after a receive; the watcher rings again if more waits."""
        with self._lock:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.fd)
            self._ctl.put(None)

    def close(self) -> None:
        self._stop = True
        self._ctl.put(None)
        self._thread.join(5)
        os.close(self.fd)


def _before_fork() -> None:
    for conn in list(_open_ends):
        if not conn.closed:
            for s in conn._sides:
                s.ring.pending(s.side, 1)


def _after_fork_in_child() -> None:
    for conn in list(_open_ends):
        if not conn.closed:
            if conn._bell is not None:  # its watcher thread did not survive the fork
                os.close(conn._bell.fd)
                conn._bell = None
            conn._finalizer.detach()
            conn._finalizer = weakref.finalize(conn, _detach, list(conn._sides), os.getpid())
            for s in conn._sides:
                s.ring.attach(s.side)
                s.ring.pending(s.side, -1)


def _after_fork_in_parent() -> None:
    """Nothing: the child attaches and drops the pending count itself."""


os.register_at_fork(
    before=_before_fork, after_in_child=_after_fork_in_child, after_in_parent=_after_fork_in_parent
)


def _ring_of(obj: object) -> tuple[Ring, int] | None:
    """The ring to watch for ``obj`` and the pipe side whose loss means EOF (-1: none)."""
    if isinstance(obj, Connection):
        return obj._check_readable(), _WRITERS
    ring = getattr(obj, "_ring", None)
    return (ring, -1) if isinstance(ring, Ring) else None


def _ready_rings(rings: list[tuple[object, Ring, int]]) -> list[object]:
    return [obj for obj, ring, side in rings if ring.poll(0.0, side)]


def _ready_fds(fds: list[tuple[object, int]], timeout: float) -> list[object]:
    if not fds:
        return []
    r, _, _ = select.select([fd for _, fd in fds], [], [], timeout)
    return [obj for obj, fd in fds if fd in r]


def wait(object_list: Iterable[object], timeout: float | None = None) -> list[object]:
    """Wait until one of the objects is ready; return the ready ones (``[]`` on timeout).

    Like ``multiprocessing.connection.wait``: accepts Connections (ready when
    a message or end of file waits), fabric Queues and SimpleQueues (ready
    when an item waits), process sentinels and anything else that is an int
    file descriptor or has ``fileno()``. Rings are waited on with one
    ``futex_waitv`` call, with no thread, unless file descriptors are mixed in.
    """
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    deadline = None if timeout is None else time.monotonic() + timeout
    rings: list[tuple[object, Ring, int]] = []
    fds: list[tuple[object, int]] = []
    for obj in object_list:
        found = _ring_of(obj)
        if found is not None:
            rings.append((obj, found[0], found[1]))
        elif isinstance(obj, int):
            fds.append((obj, obj))
        elif hasattr(obj, "fileno"):
            fds.append((obj, obj.fileno()))
        else:
            raise TypeError(f"cannot wait on {obj!r}: not a Connection, Queue or file descriptor")
    slice_s = _PEER_CHECK_S if any(side >= 0 for _, _, side in rings) else None
    while True:
        ready = _ready_rings(rings) + _ready_fds(fds, 0)
        left = None if deadline is None else deadline - time.monotonic()
        if ready or (left is not None and left <= 0):
            return ready
        if slice_s is not None:
            left = slice_s if left is None else min(left, slice_s)
        if not fds:
            wait_any([ring for _, ring, _ in rings], left)
        elif not rings:
            return _ready_fds(fds, left if left is not None else None)  # type: ignore[arg-type]
        else:
            _wait_mixed([ring for _, ring, _ in rings], [fd for _, fd in fds], left)


_local = threading.local()


def _control_ring() -> Ring:
    ring: Ring | None = getattr(_local, "ring", None)
    if ring is None or getattr(_local, "pid", None) != os.getpid():
        _local.block = _shm.allocate(HEADER_SIZE + 4096)
        ring = _local.ring = Ring(_local.block.buffer, create=True)
        _local.pid = os.getpid()
    return ring


def _wait_mixed(rings: list[Ring], fds: list[int], timeout: float | None) -> None:
    """Sleep until a ring may be ready or an fd is readable: a helper thread
    sleeps on the rings' futexes and signals an eventfd the select includes."""
    ctl = _control_ring()
    bell = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def watch() -> None:
        wait_any([ctl, *rings], None)
        os.eventfd_write(bell, 1)

    helper = threading.Thread(target=watch, name="fabric-wait", daemon=True)
    helper.start()
    try:
        select.select([*fds, bell], [], [], timeout)
    finally:
        ctl.put(None)
        helper.join()
        while ctl.poll(0.0):
            ctl.get(False)
        os.close(bell)
