"""Where queued tasks wait and which worker takes the next one: fairness and credit.

A lane holds the keys of one client's QUEUED tasks with one set of
requirements, oldest first (a re-queued task goes back to the front). Lanes
take turns: a lane that gives a task goes to the back, so no client starves
another however many tasks it queues. A task goes to an eligible worker (its
labels hold every requirement) with the most idle slots, then the most free
credit (a prefetch window is filled only once no eligible slot is idle), ties
to the one that waited longest.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator

from fabric.broker.tasks import Requires, State, Task, Worker

__all__ = ["Lanes", "eligible", "pick"]

Lane = tuple[bytes, Requires]


def eligible(worker: Worker, requires: Requires) -> bool:
    """Return whether ``worker``'s labels hold every requirement of ``requires``."""
    verdict = worker.eligible.get(requires)
    if verdict is None:  # labels never change on a worker: decide once per requirement set
        verdict = worker.eligible[requires] = all(worker.labels.get(k) == v for k, v in requires)
    return verdict


def pick(workers: Iterable[Worker], requires: Requires) -> Worker | None:
    """Return the eligible worker with the most idle slots, then free credit, or None."""
    best: Worker | None = None
    best_key = (0, 0, 0)
    for worker in workers:
        if worker.credit <= 0 or not eligible(worker, requires):
            continue
        key = (worker.idle(), worker.credit, -worker.turn)
        if best is None or key > best_key:
            best, best_key = worker, key
    return best


class Lanes:
    """The QUEUED tasks, by lane, in turn order; not thread-safe."""

    def __init__(self) -> None:
        self._lanes: OrderedDict[Lane, deque[bytes]] = OrderedDict()

    def push(self, task: Task, *, front: bool) -> None:
        """Queue ``task`` at the back of its lane (``front``: a retry goes first)."""
        task.state = State.QUEUED
        lane = self._lanes.get(task.lane)
        if lane is None:
            lane = self._lanes[task.lane] = deque()
        if front:
            lane.appendleft(task.key)
        else:
            lane.append(task.key)

    def remove(self, task: Task) -> None:
        """Take a queued ``task`` out of its lane (cancelled, forgotten)."""
        lane = self._lanes[task.lane]
        lane.remove(task.key)
        if not lane:
            del self._lanes[task.lane]

    def take(self, workers: dict[bytes, Worker]) -> tuple[bytes, Worker] | None:
        """Pop the next task some worker can take, in lane turn order; None if none can."""
        if not self._lanes:
            return None
        for lane_key in self._lanes:
            worker = pick(workers.values(), lane_key[1])
            if worker is not None:
                break
        else:
            return None
        lane = self._lanes[lane_key]
        key = lane.popleft()
        if lane:
            self._lanes.move_to_end(lane_key)
        else:
            del self._lanes[lane_key]
        return key, worker

    def __iter__(self) -> Iterator[Lane]:
        return iter(self._lanes)

    def queued(self) -> list[bytes]:
        """Return every queued key (for the invariant checks)."""
        return [key for lane in self._lanes.values() for key in lane]

    def check(self) -> None:
        """Raise AssertionError if a lane is empty (an empty lane must be gone)."""
        assert all(self._lanes.values()), "an empty lane"
