"""Length-prefixed frames over a pipe between a worker node and its task processes."""

from __future__ import annotations

import os
import struct

_HEADER = struct.Struct("!Q")
_FIRST_READ = 1 << 16  # a frame of up to this much (header included) takes one read
_Buffer = bytes | bytearray | memoryview


def write_frame(fd: int, *parts: _Buffer) -> None:
    """Write one frame made of ``parts`` (blocking until all of it is in the pipe).

    One ``writev`` call in the common case: header and parts are not joined first.
    """
    size = sum(map(len, parts))
    written = os.writev(fd, (_HEADER.pack(size), *parts))
    if written < size + _HEADER.size:  # bigger than the pipe's buffer: the rest in pieces
        view = memoryview(b"".join((_HEADER.pack(size), *parts)))[written:]
        while view:
            view = view[os.write(fd, view) :]


class FrameReader:
    """Read frames from a pipe, the header and a small frame in one ``read`` call.

    What a read brings past the end of a frame is kept for the next one (a poll
    of the pipe does not see it: the node and its task processes never have
    more than one frame in flight each way).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._rest = b""

    def read(self) -> bytes | None:
        """Read one frame; None if the pipe closed first (the writer died or finished)."""
        data = self._rest
        while len(data) < _HEADER.size:
            chunk = os.read(self.fd, _FIRST_READ)
            if not chunk:
                return None
            data += chunk
        end = _HEADER.size + _HEADER.unpack_from(data)[0]
        if len(data) >= end:
            self._rest = data[end:]
            return data[_HEADER.size : end]
        self._rest = b""
        rest = _read_exact(self.fd, end - len(data))
        return None if rest is None else data[_HEADER.size :] + rest


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
