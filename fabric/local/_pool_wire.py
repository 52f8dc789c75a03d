"""The framing and message kinds spoken on a pool worker's two pipes.

Each frame is an 8-byte little-endian length and a pickle of ``(kind, body)``.
The parent sends CONFIG once, then TASKS batches, then STOP; the worker answers
READY (or INIT_ERROR) and then DONE batches. Task and result bodies are pickled
one by one inside the batch so that one object that fails to pickle or
unpickle costs its own task, never the batch.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any, BinaryIO

__all__ = [
    "CALL",
    "CONFIG",
    "DONE",
    "HEADER",
    "INIT_ERROR",
    "MAP",
    "READY",
    "STAR",
    "STOP",
    "TASKS",
    "encode",
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
