"""Length-prefixed frames over a pipe between a worker node and its task processes."""

from __future__ import annotations

import os
import struct

_HEADER = struct.Struct("!Q")


def write_frame(fd: int, *parts: bytes) -> None:
    """Write one frame made of ``parts`` (blocking until all of it is in the pipe).

    One ``writev`` call in the common case: header and parts are not joined first.
    """
    buffers = [_HEADER.pack(sum(len(part) for part in parts)), *parts]
    written = os.writev(fd, buffers)
    total = sum(len(buffer) for buffer in buffers)
    if written < total:  # a frame bigger than the pipe's buffer: write the rest in pieces
        view = memoryview(b"".join(buffers))[written:]
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
