"""An append-only journal of accepted tasks, so a restarted broker loses none.

Theory of operation. The file is ``b"FBJ1\\n"`` followed by records::

    length u32 | crc32 u32 | body (``length`` bytes)
    body: b"S" + msgpack [session, task, requires, [payload frames], user]   a task accepted
          b"D" + key                                                  a task forgotten (DONE)

Records are buffered during a poll iteration and written by :meth:`commit`,
which the server calls before it sends the ACKs of that iteration (group
commit): an ACKed task is always in the file. With ``fsync="always"`` the
commit also fsyncs, so an ACK survives power loss; with ``fsync="os"`` the
data is in the kernel's page cache, which survives the broker's SIGKILL but
not the machine's crash; ``"never"`` is for tests and benchmarks.

Why a log and not SQLite: the broker only appends and, at start, reads
everything once; a log does that with one ``write`` (and one ``fsync``) per
poll iteration, needs no schema, and its failure mode is simple: a torn last
record (crash mid-write) fails its CRC and is cut off at replay. The file is
compacted (live records copied to a new file, fsynced, renamed over the old
one) when dead records outnumber live ones.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgpack

from fabric.broker.protocol import Payload
from fabric.errors import FabricError

__all__ = ["FsyncPolicy", "Journal", "JournalError", "Submitted"]

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "os", "never"]
_MAGIC = b"FBJ1\n"
_HEAD = struct.Struct("!II")
_MAX_RECORD = 1 << 31


class JournalError(FabricError):
    """The journal file cannot be used (not a journal, unreadable, unwritable)."""


@dataclass(frozen=True)
class Submitted:
    """An accepted task read back from the journal."""

    session: bytes
    task: bytes
    requires: dict[str, str]
    payload: tuple[bytes, ...]
    user: str = ""  # the User-Id (key) that owns the session

    @property
    def key(self) -> bytes:
        return self.session + self.task


class Journal:
    """The append-only task journal at ``path``; not thread-safe."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: FsyncPolicy = "always") -> None:
        if fsync not in ("always", "os", "never"):
            raise ValueError(f"fsync must be 'always', 'os' or 'never', not {fsync!r}")
        self.path = Path(path)
        self.fsync = fsync
        self._pending: list[bytes] = []
        self._live: dict[bytes, tuple[int, int]] = {}  # key -> (offset, size) of its record
        self._dead = 0
        try:
            self._replayed, self._forgotten = self._load()
            self._file = open(self.path, "ab")  # noqa: SIM115 - held open for the broker's life
        except OSError as exc:
            raise JournalError(f"cannot use {self.path} as a journal: {exc}") from exc

    def replay(self) -> tuple[list[Submitted], list[bytes]]:
        """Return the tasks accepted and not forgotten, in order, and the forgotten keys."""
        return self._replayed, self._forgotten

    def submit(
        self,
        session: bytes,
        task: bytes,
        requires: dict[str, str],
        payload: Payload,
        user: str = "",
    ) -> None:
        """Record an accepted task of ``user``'s session (written at the next :meth:`commit`)."""
        frames = [bytes(frame) for frame in payload]
        body = b"S" + msgpack.packb([session, task, requires, frames, user], use_bin_type=True)
        self._pending.append(body)

    def done(self, key: bytes) -> None:
        """Record that a task was forgotten (written at the next :meth:`commit`)."""
        self._pending.append(b"D" + key)

    def commit(self) -> None:
        """Write the records buffered since the last commit, and fsync per the policy."""
        if not self._pending:
            return
        offset = self._file.tell()
        chunks = []
        for body in self._pending:
            record = _HEAD.pack(len(body), zlib.crc32(body)) + body
            self._index(body, offset, len(record))
            offset += len(record)
            chunks.append(record)
        self._pending.clear()
        try:
            self._file.write(b"".join(chunks))
            self._file.flush()
            if self.fsync == "always":
                os.fsync(self._file.fileno())
        except OSError as exc:
            raise JournalError(f"cannot write the journal {self.path}: {exc}") from exc
        if self._dead > max(1000, 2 * len(self._live)):
            self._compact()

    def close(self) -> None:
        """Commit what is pending and close the file."""
        if not self._file.closed:
            self.commit()
            self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------

    def _index(self, body: bytes, offset: int, size: int) -> None:
        if body[:1] == b"S":
            session, task = msgpack.unpackb(body[1:], raw=False)[:2]
            self._live[session + task] = (offset, size)
        else:
            self._dead += 1 + (self._live.pop(body[1:], None) is not None)

    def _load(self) -> tuple[list[Submitted], list[bytes]]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.write_bytes(_MAGIC)
            return [], []
        data = self.path.read_bytes()
        if not data.startswith(_MAGIC):
            raise JournalError(f"{self.path} is not a fabric journal")
        submitted: dict[bytes, Submitted] = {}
        forgotten: list[bytes] = []
        offset = len(_MAGIC)
        while offset < len(data):
            body = self._record_at(data, offset)
            if body is None:
                log.warning("journal %s: torn record at byte %d cut off", self.path, offset)
                with open(self.path, "r+b") as f:
                    f.truncate(offset)
                break
            size = _HEAD.size + len(body)
            try:
                self._index(body, offset, size)
                if body[:1] == b"S":
                    session, task, requires, frames, user = msgpack.unpackb(body[1:], raw=False)
                    entry = Submitted(session, task, requires, tuple(frames), user)
                    submitted[entry.key] = entry
                else:
                    submitted.pop(body[1:], None)
                    forgotten.append(body[1:])
            except (ValueError, TypeError) as exc:
                raise JournalError(f"{self.path}: bad record at byte {offset}: {exc}") from exc
            offset += size
        return list(submitted.values()), forgotten

    @staticmethod
    def _record_at(data: bytes, offset: int) -> bytes | None:
        if offset + _HEAD.size > len(data):
            return None
        length, crc = _HEAD.unpack_from(data, offset)
        start = offset + _HEAD.size
        body = data[start : start + length]
        if length > _MAX_RECORD or len(body) != length or zlib.crc32(body) != crc:
            return None
        return body if body[:1] in (b"S", b"D") else None

    def _compact(self) -> None:
        tmp = self.path.with_name(self.path.name + ".compact")
        live = sorted(self._live.items(), key=lambda item: item[1][0])
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(_MAGIC)
            offset = len(_MAGIC)
            for key, (start, size) in live:
                src.seek(start)
                dst.write(src.read(size))
                self._live[key] = (offset, size)
                offset += size
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)
        dirfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        self._file.close()
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._dead = 0
        log.info("journal %s compacted to %d live tasks", self.path, len(self._live))
