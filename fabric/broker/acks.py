"""Batched acknowledgements: the broker's ACKs wait, then travel many to a message.

An ACK only tells a peer what it need not re-send on a new session (clients
keep SUBMITs, workers keep RESULTs until acknowledged), so no peer waits for
one. The scheduler notes each acknowledgement here; the server sends them as
one ACK per peer once ``BATCH`` are waiting, at once when one is urgent (a
draining worker waits for its last ACKs to leave), and for everyone at every
tick. A SUBMIT whose RESULT reaches the client first needs no ACK: the RESULT
acknowledges it. On a busy broker this turns two ACK messages per task into a
few per second; with the journal on, an ACK still leaves only after the
journal commit of the loop iteration that accepted the task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fabric.broker.protocol import Ack, Message

__all__ = ["BATCH", "Acks"]

BATCH = 256
"""Ids per ACK message: 256 broker ids of <= 80 bytes stay far below the 64 KiB control limit."""


@dataclass(eq=False)
class _Waiting:
    results: bool  # a worker's RESULTs (ACK carries attempts), else a client's SUBMITs
    items: dict[tuple[bytes, int], None] = field(default_factory=dict)


class Acks:
    """The acknowledgements not sent yet, per session. Not thread-safe."""

    def __init__(self) -> None:
        self._waiting: dict[bytes, _Waiting] = {}
        self._due: set[bytes] = set()

    def submit(self, session: bytes, task: bytes) -> None:
        """Note that a client's SUBMIT of ``task`` is accepted."""
        self._add(session, (task, 0), results=False, urgent=False)

    def result(self, session: bytes, task: bytes, attempt: int, *, urgent: bool) -> None:
        """Note that a worker's RESULT for ``(task, attempt)`` is taken."""
        self._add(session, (task, attempt), results=True, urgent=urgent)

    def resulted(self, session: bytes, task: bytes) -> None:
        """Forget the SUBMIT ACK of a task whose RESULT goes to the client now."""
        waiting = self._waiting.get(session)
        if waiting is not None:
            waiting.items.pop((task, 0), None)

    def drop(self, session: bytes) -> None:
        """Forget a session's acknowledgements (it ended; it re-sends on a new one)."""
        self._waiting.pop(session, None)
        self._due.discard(session)

    def take(self, everything: bool) -> list[tuple[bytes, Message]]:
        """Return the ACKs to send now: the full or urgent batches, or ``everything``."""
        sessions = list(self._waiting) if everything else list(self._due)
        self._due.clear()
        outs: list[tuple[bytes, Message]] = []
        for session in sessions:
            waiting = self._waiting.pop(session, None)
            if waiting is None or not waiting.items:
                continue
            items = list(waiting.items)
            for start in range(0, len(items), BATCH):
                chunk = items[start : start + BATCH]
                tasks = tuple(task for task, _ in chunk)
                attempts = tuple(attempt for _, attempt in chunk) if waiting.results else ()
                outs.append((session, Ack(tasks, attempts)))
        return outs

    def _add(self, session: bytes, item: tuple[bytes, int], *, results: bool, urgent: bool) -> None:
        waiting = self._waiting.get(session)
        if waiting is None:
            waiting = self._waiting[session] = _Waiting(results)
        waiting.items[item] = None
        if urgent or len(waiting.items) >= BATCH:
            self._due.add(session)
