"""The scheduler's data: its knobs, the rows of its table (tasks, workers, clients), its records."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from fabric.broker.protocol import SESSION_BYTES, Payload, Result

__all__ = [
    "Admission",
    "Client",
    "Limits",
    "Requires",
    "SchedulerStats",
    "State",
    "Task",
    "Worker",
    "WorkerInfo",
    "task_key",
]

Requires = tuple[tuple[str, str], ...]


class Admission(enum.Enum):
    """What became of a SUBMIT."""

    ACCEPTED = "accepted"  # new: journal it, then send the ACK
    KNOWN = "known"  # a re-send of a task still held: ACK again, nothing to journal
    REJECTED = "rejected"  # busy, duplicate or too large: a REJECT is on its way


@dataclass(frozen=True)
class Limits:
    """The scheduler's knobs (see ``docs/protocol.md``)."""

    max_tasks: int = 100_000
    max_bytes: int = 1 << 30
    max_retries: int = 3
    poison_limit: int = 3
    liveness_timeout: float = 10.0
    result_limit: int = 10_000
    result_ttl: float = 3600.0
    tombstone_limit: int = 100_000
    tombstone_ttl: float = 3600.0
    busy_retry_after: float = 0.05


class State(enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RESULTED = "resulted"


@dataclass(eq=False, slots=True)
class Task:
    key: bytes
    requires: Requires
    payload: Payload
    size: int
    state: State = State.QUEUED
    attempt: int = 1
    losses: int = 0
    crashes: list[str] = field(default_factory=list)
    worker: bytes | None = None
    turn: int = 0  # when it was last dispatched: a RECLAIM names the newest first
    started: bool = False  # its worker kept it at a RECLAIM: running there, never named again
    cancelling: bool = False  # its worker was asked to stop it: handed back, it is cancelled
    result: Result | None = None
    owner: bytes = b""  # the client's session: the key's first SESSION_BYTES
    lane: tuple[bytes, Requires] = (b"", ())

    def __post_init__(self) -> None:
        self.owner = self.key[:SESSION_BYTES]
        self.lane = (self.owner, self.requires)


@dataclass(eq=False, slots=True)
class Worker:
    session: bytes
    name: str
    host: str
    pid: int
    labels: dict[str, str]
    credit: int
    slots: int = 0  # task processes (0: not said); tasks held past them are prefetched
    running: set[bytes] = field(default_factory=set)
    done: int = 0
    turn: int = 0  # when it last got a task, so ties go to the one that waited longest
    eligible: dict[Requires, bool] = field(default_factory=dict)  # labels hold requirements?
    reclaiming: set[tuple[bytes, int]] = field(default_factory=set)  # RECLAIM's unanswered names

    def idle(self) -> int:
        """Return its slots with no task, as the broker sees it (its credit if slots unknown)."""
        if not self.slots:
            return self.credit
        return max(0, min(self.credit, self.slots - len(self.running)))


@dataclass(eq=False, slots=True)
class Client:
    present: bool = True
    tasks: set[bytes] = field(default_factory=set)


class WorkerInfo(NamedTuple):
    """One worker as ``statistics()`` sees it."""

    name: str
    host: str
    pid: int
    credit: int
    running: int
    done: int
    last_seen: float


class SchedulerStats(NamedTuple):
    """A snapshot of the scheduler's counters."""

    queued: int
    in_flight: int
    awaiting_done: int
    bytes: int
    clients: int
    workers: int
    tasks_done: int
    tasks_failed: int
    retries: int
    duplicates: int
    rejected_busy: int
    worker_list: tuple[WorkerInfo, ...]


def task_key(session: bytes, task: bytes) -> bytes:
    """Return the broker's id of a client's task."""
    return session + task
