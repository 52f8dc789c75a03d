"""The rows of the scheduler's table (tasks, workers, clients) and the records it reports."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from fabric.broker.protocol import SESSION_BYTES, Payload, Result

__all__ = [
    "Client",
    "Requires",
    "SchedulerStats",
    "State",
    "Task",
    "Worker",
    "WorkerInfo",
    "task_key",
]

Requires = tuple[tuple[str, str], ...]


class State(enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RESULTED = "resulted"


@dataclass(eq=False)
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
    result: Result | None = None

    @property
    def owner(self) -> bytes:
        return self.key[:SESSION_BYTES]

    @property
    def lane(self) -> tuple[bytes, Requires]:
        return (self.owner, self.requires)


@dataclass(eq=False)
class Worker:
    session: bytes
    name: str
    host: str
    pid: int
    labels: dict[str, str]
    credit: int
    running: set[bytes] = field(default_factory=set)
    done: int = 0
    turn: int = 0  # when it last got a task, so ties go to the one that waited longest


@dataclass(eq=False)
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
