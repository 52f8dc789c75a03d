"""The framing and message kinds spoken on a pool worker's two pipes.

Each frame is an 8-byte little-endian length and a pickle of ``(kind, body)``.
The parent sends CONFIG once, then TASKS batches, then STOP; the worker answers
READY (or INIT_ERROR) and then DONE batches. Task arguments and results are
pickled one by one inside the batch so that one object that fails to pickle or
unpickle costs its own task, never the batch; only PLAIN values (which cannot
fail) skip their own pickle and travel in the batch's.
"""

from __future__ import annotations

import os
import pickle
import struct
import types
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

__all__ = [
    "CALL",
    "CONFIG",
    "DONE",
    "HEADER",
    "INIT_ERROR",
    "INLINE",
    "INLINE_LIST_MAX",
    "MAP",
    "PICKLED",
    "PLAIN",
    "RAISED",
    "READY",
    "STAR",
    "STOP",
    "TASKS",
    "Pickler",
    "encode",
    "plain",
    "read_frame",
    "write_all",
]

HEADER = struct.Struct("<Q")

# Parent -> worker.
CONFIG, TASKS, STOP = "C", "T", "S"
# Worker -> parent.
READY, INIT_ERROR, DONE = "R", "I", "D"
# How a task's payload is applied to its function.
CALL, MAP, STAR = 0, 1, 2
# How a DONE entry carries its outcome: a packed exception, a pickle of its
# own, or the value itself inside the batch's pickle.
RAISED, PICKLED, INLINE = 0, 1, 2
# Values of exactly these types cannot fail to pickle or unpickle, so they ride
# inside the batch's pickle: no pickle of their own, and still never able to
# cost another task of the batch its result.
PLAIN = frozenset((int, float, str, bytes, bool, type(None)))
# Lists up to this long are checked for plainness; a longer one costs one
# pickle call for many items anyway, less than checking each of them.
INLINE_LIST_MAX = 16


def plain(values: Iterable[Any]) -> bool:
    """Return whether every value is of a PLAIN type."""
    for value in values:  # noqa: SIM110 (a loop: three times faster than all() on one value)
        if type(value) not in PLAIN:
            return False
    return True


def encode(kind: str, body: Any) -> bytes:
    """Frame one message."""
    data = pickle.dumps((kind, body), 5)
    return HEADER.pack(len(data)) + data


def read_frame(stream: BinaryIO) -> tuple[str, Any] | None:
    """Read one message from a blocking stream; None at end of file."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    kind, body = pickle.loads(data)
    return kind, body


def write_all(fd: int, data: bytes) -> None:
    """Write every byte to a blocking fd."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Pickler:
    """Pickle what the parent sends: plain pickle where the worker can take it, else cloudpickle.

    A forked worker shares the parent's ``__main__``, so the plain pickler (by
    reference, fast) suffices whenever it works; a spawned or forkserver one
    (``by_value``) gets cloudpickle throughout, which carries ``__main__``
    functions and classes by value.
    """

    def __init__(self, by_value: bool) -> None:
        self._by_value = by_value
        self._by_reference: dict[int, tuple[Callable[..., Any], bytes]] = {}

    def dumps(self, obj: object) -> bytes:
        if not self._by_value:
            try:
                return pickle.dumps(obj, 5)
            except Exception:
                pass
        import cloudpickle

        return cloudpickle.dumps(obj, 5)  # type: ignore[no-any-return]

    def function(self, fn: Callable[..., Any]) -> bytes:
        # A module-level function pickles by reference, so its bytes never go stale
        # and are cached; anything pickled by value is pickled afresh per batch,
        # so a closure's or a global's later changes are seen, as with multiprocessing.
        cached = self._by_reference.get(id(fn))
        if cached is not None and cached[0] is fn:
            return cached[1]
        blob = self.dumps(fn)
        if (
            isinstance(fn, types.FunctionType | types.BuiltinFunctionType)
            and fn.__module__ != "__main__"
            and "<locals>" not in fn.__qualname__
            and fn.__name__ != "<lambda>"
        ):
            if len(self._by_reference) > 256:
                self._by_reference.clear()
            self._by_reference[id(fn)] = (fn, blob)
        return blob
