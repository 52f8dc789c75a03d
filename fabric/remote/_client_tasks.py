"""A client's tasks in flight: SUBMITs until ACK, busy REJECTs, RESULTs, batched DONEs (sans-IO).

A SUBMIT is kept until the broker ACKs it and re-sent on every new session
until then. A REJECT(busy) holds the task back until its ``retry_after``. A
RESULT is handed to its task's callback once; the broker keeps it until the
client DONEs it, and DONEs wait to travel many to a message.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from fabric.broker.protocol import Ack, Done, Reject, Result, Submit

log = logging.getLogger(__name__)

# at most 256 ids to a DONE: far below the protocol's 64 KiB control frame
_DONE_BATCH = 256
_DONE_DELAY_S = 0.05
_BUSY_RETRY_S = 0.05  # a held-back task the link could not send: try again after this

ResultCallback = Callable[[str, str, bytes], None]
"""Called once per task, on the I/O thread, with (status, message, payload)."""


@dataclass(slots=True)
class PendingTask:
    message: Submit
    on_result: ResultCallback
    acked: bool = False
    resend_at: float = 0.0


class TaskBook:
    """The tasks one connection has in flight; not thread-safe: call it under the connection's lock.

    Methods that take a result or a reject return the callbacks to run once
    the lock is released.
    """

    def __init__(self) -> None:
        self._tasks: dict[bytes, PendingTask] = {}
        self._busy: dict[bytes, PendingTask] = {}  # REJECTed busy: re-sent at their resend_at
        self._done: list[bytes] = []  # results held here, DONE'd in batches
        self._done_due = 0.0
        self._ids = itertools.count(1)

    def __bool__(self) -> bool:
        """Return whether any task awaits its result."""
        return bool(self._tasks)

    def __len__(self) -> int:
        """Return how many tasks await their result."""
        return len(self._tasks)

    def new_id(self) -> bytes:
        """Return a task id never used before in this session (safe without the lock).

        A counter, not random bytes: ``os.urandom`` releases the GIL, which on
        a busy client hands the interpreter to another thread at every submit.
        """
        return b"%x" % next(self._ids)

    def add(self, message: Submit, on_result: ResultCallback) -> None:
        """Track a task about to be submitted."""
        self._tasks[message.task] = PendingTask(message, on_result)

    def acked(self, ack: Ack) -> None:
        """Stop re-sending the tasks the broker acknowledged."""
        for task_id in ack.tasks:
            task = self._tasks.get(task_id)
            if task is not None:
                task.acked = True

    def result(self, message: Result, now: float) -> list[Callable[[], None]]:
        """Take a RESULT: DONE it in the next batch and return its delivery, if not delivered."""
        task = self._tasks.pop(message.task, None)
        self._busy.pop(message.task, None)
        if not self._done:
            self._done_due = now + _DONE_DELAY_S
        self._done.append(message.task)
        if task is None:
            return []  # a result re-sent after a resume: already delivered, DONE it again
        payload = bytes(message.payload[0]) if message.payload else b""

        def deliver() -> None:
            try:
                task.on_result(message.status, message.message, payload)
            except Exception:
                log.exception("a result callback raised (task %s)", message.task.hex())

        return [deliver]

    def rejected(self, message: Reject, now: float) -> list[Callable[[], None]]:
        """Take a REJECT: hold a busy task back; report any other refusal to its callback."""
        task = self._tasks.get(message.task)
        if task is None:
            return []
        if message.code == "busy":
            task.resend_at = now + max(message.retry_after, 0.01)
            self._busy[message.task] = task
            return []
        self._tasks.pop(message.task, None)
        self._busy.pop(message.task, None)
        if message.code == "duplicate":  # its result was delivered already
            return []
        why = f"{message.code}: {message.reason}"
        return [lambda: task.on_result("rejected", why, b"")]

    def unacked(self) -> list[Submit]:
        """Return the SUBMITs to send again on a new session, in order."""
        return [t.message for t in self._tasks.values() if not t.acked]

    def busy_due(self, now: float) -> list[PendingTask]:
        """Return the held-back tasks due to be sent again."""
        return [t for t in self._busy.values() if t.resend_at <= now]

    def resent(self, task: PendingTask, sent: bool, now: float) -> None:
        """Record the outcome of re-sending a held-back task (not sent: try again shortly)."""
        if sent:
            self._busy.pop(task.message.task, None)
        else:
            task.resend_at = now + _BUSY_RETRY_S

    def next_due(self, now: float) -> float:
        """Return when a held-back task or the DONE batch is next due (far off if none)."""
        due = min((t.resend_at for t in self._busy.values()), default=now + 3600.0)
        return min(due, self._done_due) if self._done else due

    def take_done(self, now: float, force: bool = False) -> list[Done]:
        """Return the DONEs to send: only once a batch is full, due, or ``force``d."""
        if not (len(self._done) >= _DONE_BATCH or force or now >= self._done_due):
            return []
        done, self._done = self._done, []
        return [
            Done(tasks=tuple(done[start : start + _DONE_BATCH]))
            for start in range(0, len(done), _DONE_BATCH)
        ]

    def take_all(self) -> list[PendingTask]:
        """Forget every task in flight and return them (the connection fails them)."""
        tasks, self._tasks = self._tasks, {}
        self._busy = {}
        return list(tasks.values())
