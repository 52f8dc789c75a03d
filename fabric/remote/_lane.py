"""The same-host lane: object calls from processes on the Manager's host over shared memory.

A call from a task process to the embedded Manager's built-in host would
otherwise cross CURVE over TCP with ZeroMQ I/O threads on both sides: about
six thread wake-ups per round trip, against two for a SyncManager. The lane
(``_lane_server`` in the Manager's process, ``_lane_client`` in the others)
carries the same CALL/CREATE as a pair of ``fabric.local`` shared-memory
rings per calling thread, with futex wake-ups after an adaptive spin, served
by a thread that applies the call in the Manager's process through the
broker's in-thread path (``Broker.call_local``): two wake-ups at most, none
while both sides are awake.

Attaching (a Unix stream socket, only for this): the socket sits in a fresh
0700 directory, the client proves it was handed the lane's secret (32 random
bytes, given to the worker node and its task processes through the
environment, beside the CURVE keys) and runs as the Manager's user
(``SO_PEERCRED``); the server answers, in plain text (nothing is unpickled
before this point), with the broker address it serves and its runtime. The
client then asks for channels (``CHANNEL``), each a pickled ``fabric.local``
Pipe end (it travels by ``/proc/<pid>/fd``, which
the kernel only opens for the same user). The attach socket stays open for
the client process's life: its end of file (the process exited, even by
``kill -9``) ends the process's broker session, which releases its leases.
"""

from __future__ import annotations

import os
import socket
import struct

LANE_ENV = "FABRIC_LANE"
TOKEN_BYTES = 32
CHANNEL = b"C"  # client -> server on the attach socket: open one more channel
CALL, CREATE = "call", "create"  # the request kinds on a channel

_LENGTH = struct.Struct("!I")
_MAX_FRAME = 1 << 20


def encode_env(path: str, token: bytes) -> str:
    """Write the lane's address and secret for ``FABRIC_LANE`` (a path has no tab)."""
    return f"{path}\t{token.hex()}"


def lane_from_env() -> tuple[str, bytes] | None:
    """Return the lane (socket path, secret) this process was handed, if any."""
    text = os.environ.get(LANE_ENV)
    if not text or "\t" not in text:
        return None
    path, token = text.rsplit("\t", 1)
    try:
        return path, bytes.fromhex(token)
    except ValueError:
        return None


def send_frame(sock: socket.socket, blob: bytes) -> None:
    """Send one length-prefixed frame."""
    sock.sendall(_LENGTH.pack(len(blob)) + blob)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes; EOFError if the peer closed first."""
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise EOFError("the lane's attach socket closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> bytes:
    """Read one length-prefixed frame (at most 1 MiB)."""
    (size,) = _LENGTH.unpack(recv_exact(sock, _LENGTH.size))
    if size > _MAX_FRAME:
        raise EOFError(f"a lane frame of {size} bytes is too long")
    return recv_exact(sock, size)


def peer_uid(sock: socket.socket) -> int:
    """Return the user id of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)
