"""Length-prefixed frames over a pipe between a worker node and its task processes."""

from __future__ import annotations

import os
import struct

_HEADER = struct.Struct("!Q")


def write_frame(fd: int, data: bytes) -> None:
    """Write one frame (blocking until all of it is in the pipe)."""
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def read_frame(fd: int) -> bytes | None:
    """Read one frame; None if the pipe closed first (the writer died or finished)."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    return _read_exact(fd, _HEADER.unpack(header)[0])


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
