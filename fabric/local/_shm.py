"""Shared memory owned by fabric: memfd segments and blocks carved from them.

Theory of operation
-------------------
Every shared object (a Lock, a Queue's ring, a Value) lives in a *block* of a
*segment*. A segment is an anonymous ``memfd_create`` file mapped
``MAP_SHARED``; it has no name in ``/dev/shm`` and the kernel frees it when the
last process holding its fd or a mapping exits, so ``kill -9`` of any process
leaks nothing and no resource-tracker process is needed.

Segments travel between processes as file descriptors:

* ``fork`` inherits fds and mappings: nothing to do.
* A Process started with ``spawn`` or ``forkserver`` pickles its target and
  arguments inside :func:`passing_fds`; every segment met on the way records its
  fd in the list the context yields, the start method hands those fds to the
  child (``pass_fds`` or ``SCM_RIGHTS``), and the child calls
  :func:`adopt_passed_fds` before unpickling.
* Anywhere else (an object sent through a Queue to a running process) the
  receiver opens ``/proc/<sender pid>/fd/<fd>``, which needs the sender alive and
  owned by the same user; the inode is checked so a recycled fd is refused.

Small objects share 1 MiB segments (sparse: untouched pages cost nothing). A
block starts with a 64-byte header whose first word counts the processes that
may use it; the count is raised when the block is pickled and lowered when a
process's handle is collected. The allocating process reuses a block only when
the count is back to zero, so a block is never recycled under a live user; a
process killed while holding a reference leaks that block, never corrupts it.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
import weakref
from collections.abc import Iterator, Sequence

from fabric.errors import FabricError

__all__ = [
    "Block",
    "PassedFd",
    "Segment",
    "adopt_passed_fds",
    "allocate",
    "passing_fds",
]

CACHE_LINE = 64
HEADER = CACHE_LINE
CHUNK = 1 << 20
_LARGE = CHUNK // 4

_local = threading.local()
_passed: dict[int, int] = {}
_segments: weakref.WeakValueDictionary[int, Segment] = weakref.WeakValueDictionary()
_segments_lock = threading.Lock()


class Segment:
    """A memfd-backed shared mapping of ``size`` bytes."""

    __slots__ = ("__weakref__", "fd", "ino", "mmap", "size")

    def __init__(self, size: int, *, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("fabric", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                raise
        self.fd = fd
        self.size = size
        self.ino = os.fstat(fd).st_ino
        self.mmap = mmap.mmap(fd, size)
        weakref.finalize(self, _release, fd, self.mmap)
        with _segments_lock:
            _segments[self.ino] = self

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        fds: list[int] | None = getattr(_local, "fds", None)
        if fds is not None:
            if self.fd not in fds:
                fds.append(self.fd)
            return _attach_passed, (fds.index(self.fd), self.size, self.ino)
        return _attach_proc, (os.getpid(), self.fd, self.size, self.ino)

    def __repr__(self) -> str:
        return f"<Segment fd={self.fd} size={self.size}>"


def _release(fd: int, mapping: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):  # a live export keeps the mapping
        mapping.close()
    with contextlib.suppress(OSError):
        os.close(fd)


def _cached(ino: int, fd: int) -> Segment | None:
    with _segments_lock:
        seg = _segments.get(ino)
    if seg is not None:
        os.close(fd)
    return seg


def _adopt(fd: int, size: int, ino: int) -> Segment:
    if os.fstat(fd).st_ino != ino:
        os.close(fd)
        raise FabricError("shared memory handed over does not match the one pickled")
    return _cached(ino, fd) or Segment(size, fd=fd)


def _attach_passed(index: int, size: int, ino: int) -> Segment:
    with _segments_lock:
        seg = _segments.get(ino)
    if seg is not None:
        return seg
    try:
        fd = _passed[index]
    except KeyError:
        raise FabricError("a shared-memory segment was not passed to this process") from None
    return _adopt(os.dup(fd), size, ino)


def _attach_proc(pid: int, fd: int, size: int, ino: int) -> Segment:
    with _segments_lock:
        seg = _segments.get(ino)
    if seg is not None:
        return seg
    try:
        new_fd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise FabricError(
            f"cannot attach shared memory of process {pid}: it has exited or is not ours ({exc})"
        ) from None
    return _adopt(new_fd, size, ino)


@contextlib.contextmanager
def passing_fds() -> Iterator[list[int]]:
    """Collect the fds of the segments pickled in this thread inside the block."""
    previous = getattr(_local, "fds", None)
    fds: list[int] = []
    _local.fds = fds
    try:
        yield fds
    finally:
        _local.fds = previous


def adopt_passed_fds(fds: Sequence[int]) -> None:
    """Make the fds a parent passed at start available to the unpickler (in the child)."""
    _passed.clear()
    _passed.update(enumerate(fds))


class _Allocator:
    """Per-process carving of small blocks out of shared chunks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.chunk: Segment | None = None
        self.used = CHUNK
        self.free: dict[int, list[tuple[Segment, int]]] = {}
        self.pending: list[tuple[Segment, int, int]] = []

    def take(self, size: int) -> tuple[Segment, int]:
        span = HEADER + _round_up(size)
        with self.lock:
            self._collect_pending()
            bucket = self.free.get(span)
            if bucket:
                return bucket.pop()
            if self.chunk is None or self.used + span > CHUNK:
                self.chunk, self.used = Segment(CHUNK), 0
            offset, self.used = self.used, self.used + span
            return self.chunk, offset

    def give_back(self, segment: Segment, offset: int, span: int) -> None:
        # No lock: this runs from a Block's finalizer, which the garbage
        # collector may call inside take() while this thread holds self.lock.
        # list.append is atomic, and _collect_pending swaps the list out.
        self.pending.append((segment, offset, span))

    def _collect_pending(self) -> None:
        pending, self.pending = self.pending, []
        for segment, offset, span in pending:
            if _refcount(segment, offset).value == 0:
                self.free.setdefault(span, []).append((segment, offset))
            else:
                self.pending.append((segment, offset, span))


def _round_up(size: int) -> int:
    return (max(size, 1) + CACHE_LINE - 1) // CACHE_LINE * CACHE_LINE


_allocators: dict[int, _Allocator] = {}


def _allocator() -> _Allocator:
    pid = os.getpid()
    alloc = _allocators.get(pid)
    if alloc is None:  # first use, or first use after a fork
        _allocators.clear()
        alloc = _allocators[pid] = _Allocator()
    return alloc


def _refcount(segment: Segment, offset: int) -> ctypes.c_uint32:
    return ctypes.c_uint32.from_buffer(segment.mmap, offset)


def _atomic_add(segment: Segment, offset: int, delta: int) -> None:
    # Counts change rarely (pickle, collection); a lock-free add keeps it correct
    # across processes without a lock of its own.
    from fabric.local import _sync

    _sync.atomic_add_u32(segment.mmap, offset, delta)


class Block:
    """``size`` usable bytes of shared memory, 64-byte aligned; picklable.

    ``buffer`` is a writable memoryview of the block; C objects take
    ``(block.segment.mmap, block.offset)``. The block stays valid while any
    process holds a handle to it.
    """

    __slots__ = ("__weakref__", "offset", "segment", "size")

    def __init__(self, segment: Segment, offset: int, size: int) -> None:
        self.segment = segment
        self.offset = offset
        self.size = size

    @property
    def buffer(self) -> memoryview:
        return memoryview(self.segment.mmap)[self.offset : self.offset + self.size]

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        if self.offset >= HEADER:  # the pickled copy holds a reference of its own
            _atomic_add(self.segment, self.offset - HEADER, 1)
        return _attach_block, (self.segment, self.offset, self.size)

    def __repr__(self) -> str:
        return f"<Block fd={self.segment.fd} offset={self.offset} size={self.size}>"


def _attach_block(segment: Segment, offset: int, size: int) -> Block:
    block = Block(segment, offset, size)
    if offset >= HEADER:
        weakref.finalize(block, _drop, segment, offset - HEADER, os.getpid(), None)
    return block


def _drop(segment: Segment, header: int, pid: int, span: int | None) -> None:
    if os.getpid() != pid:  # an inherited copy after fork holds no reference
        return
    _atomic_add(segment, header, -1)
    if span is not None:
        alloc = _allocators.get(pid)
        if alloc is not None:
            alloc.give_back(segment, header, span)


def allocate(size: int) -> Block:
    """Return a zero-filled shared block of at least ``size`` bytes.

    Large blocks (a quarter of a chunk or more) get a segment of their own,
    which the kernel frees with its last user.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if size >= _LARGE:
        return Block(Segment(_round_up(size)), 0, size)
    alloc = _allocator()
    segment, header = alloc.take(size)
    span = HEADER + _round_up(size)
    segment.mmap[header : header + span] = bytes(span)
    _atomic_add(segment, header, 1)
    block = Block(segment, header + HEADER, size)
    weakref.finalize(block, _drop, segment, header, os.getpid(), span)
    return block


class PassedFd:
    """An fd handed to a spawn or forkserver child along with its process object.

    Pickled inside :func:`passing_fds`, it joins the fds passed with the launch
    and unpickles in the child as the child's number for that fd (an int the
    child then owns). Pickled anywhere else it refuses: an fd number means
    nothing in another process.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        fds: list[int] | None = getattr(_local, "fds", None)
        if fds is None:
            raise TypeError("a PassedFd travels only in the launch of a spawn or forkserver child")
        if self.fd not in fds:
            fds.append(self.fd)
        return _passed_fd, (fds.index(self.fd),)


def _passed_fd(index: int) -> int:
    try:
        return _passed[index]
    except KeyError:
        raise FabricError("an fd was not passed to this process") from None
