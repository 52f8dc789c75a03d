"""Task scheduling as pure logic: fed events and the current time, it returns messages to send.

Theory of operation. A task is known by its *key*, the owner's 16-byte session
followed by the client's task id, and lives in one table row through these
states (the table below is the one ``docs/protocol.md`` draws)::

    QUEUED ──credit──> DISPATCHED ──RESULT──> RESULTED ──DONE──> tombstone
       ^                   │
       └──worker lost──────┘   (attempt + 1; past max_retries: RESULTED "lost")
          crashed, returned        (crashed poison_limit times: RESULTED "poisoned";
                                    returned unstarted: counts nothing)

Invariants, held after every call:

* a worker's ``running`` set holds exactly the DISPATCHED tasks whose
  ``worker`` is that worker, and a worker never holds more DISPATCHED tasks
  than the credit it was granted (credit is spent on dispatch, returned by
  RESULT.credit and CREDIT);
* a QUEUED task is in exactly one lane (FIFO per client and requirement set),
  lanes take turns, so no client starves another;
* the first RESULT taken for a task wins; later ones (a re-run after a
  presumed death, a duplicate) are counted and dropped;
* ``bytes`` is the payload held (queued calls and undelivered results); with
  the task count it bounds memory; SUBMITs past either are ``busy`` (back-pressure);
* at most one RECLAIM per worker is out (work stealing, see ``steal.py``).

Lanes and worker choice are in ``lanes.py``, work stealing in ``steal.py``, batched ACKs in
``acks.py``. Only ``server.py`` owns sockets and the clock; every method here takes ``now``.
"""

from __future__ import annotations

from collections import OrderedDict

from fabric.broker.acks import Acks
from fabric.broker.expiring import Expiring
from fabric.broker.lanes import Lanes
from fabric.broker.protocol import SESSION_BYTES, Cancel, Dispatch, Message, Payload, Reject, Result
from fabric.broker.steal import reclaims
from fabric.broker.tasks import (
    Admission,
    Client,
    Limits,
    Requires,
    SchedulerStats,
    State,
    Task,
    Worker,
    WorkerInfo,
    task_key,
)

__all__ = ["Admission", "Limits", "Out", "Scheduler", "SchedulerStats", "WorkerInfo", "task_key"]

Out = tuple[bytes, Message]
"""A message to send: (session id of the destination, message)."""

MAX_CREDIT = 1 << 16


class Scheduler:
    """The broker's task table, credits, lanes and liveness deadlines. Not thread-safe."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._tasks: dict[bytes, Task] = {}
        self._lanes = Lanes()
        self._workers: dict[bytes, Worker] = {}
        self._clients: dict[bytes, Client] = {}
        self._deadlines: dict[bytes, float] = {}
        self._seen: dict[bytes, float] = {}
        limits = self.limits
        self._held = Expiring(limits.result_ttl, limits.result_limit)  # for absent clients
        self._expired: OrderedDict[bytes, Result] = OrderedDict()
        self._dropped: list[bytes] = []  # expired since the last drop_expired()
        self._tombstones = Expiring(limits.tombstone_ttl, limits.tombstone_limit)
        self._acks = Acks()
        self._bytes = 0
        self._free = 0  # the workers' credit in all: dispatching needs none while it is 0
        self._turns = 0
        self._counts = {"done": 0, "failed": 0, "retries": 0, "duplicates": 0, "busy": 0}

    # --- sessions ----------------------------------------------------------------

    def touch(self, session: bytes, now: float) -> None:
        """Note that ``session`` was heard from: push its death deadline back."""
        self._deadlines[session] = now + self.limits.liveness_timeout
        self._seen[session] = now

    def add_worker(
        self,
        session: bytes,
        now: float,
        *,
        name: str = "",
        host: str = "",
        pid: int = 0,
        capacity: int = 0,
        labels: dict[str, str] | None = None,
        slots: int = 0,
    ) -> list[Out]:
        """Welcome a worker with ``capacity`` free credit; return the dispatches it allows.

        ``slots``: its task processes (0: not said; credit past them is its
        prefetch window). A worker that re-sends HELLO on its session keeps its
        running tasks (they still run there); ``capacity`` replaces its credit.
        """
        self.touch(session, now)
        credit = min(capacity, MAX_CREDIT)
        old = self._workers.get(session)
        worker = Worker(
            session, name, host, pid, dict(labels or {}), credit, min(slots, MAX_CREDIT)
        )
        if old is not None:
            worker.running, worker.done, worker.turn = old.running, old.done, old.turn
            self._free -= old.credit
        self._workers[session] = worker
        self._free += credit
        return self._dispatch()

    def add_client(self, session: bytes, now: float) -> list[Out]:
        """Welcome (back) a client; return every result it has not acknowledged yet."""
        self.touch(session, now)
        client = self._clients.setdefault(session, Client())
        client.present = True
        outs: list[Out] = []
        for key in sorted(client.tasks):
            self._held.discard(key)
            task = self._tasks.get(key)
            result = task.result if task is not None else self._expired.get(key)
            if result is not None:
                outs.append((session, result))
        return outs

    def add_peer(self, session: bytes, now: float) -> None:
        """Track the liveness of a session that has no task role (host, admin)."""
        self.touch(session, now)

    def remove(self, session: bytes, now: float, reason: str | None) -> list[Out]:
        """End ``session``: ``reason`` says why it was lost, ``None`` means it said BYE.

        A worker's running tasks are re-queued (a loss counts toward
        ``max_retries`` unless it said BYE); a client's results are kept for
        it, bounded by ``result_limit`` and ``result_ttl``.
        """
        self._deadlines.pop(session, None)
        self._seen.pop(session, None)
        self._acks.drop(session)
        outs: list[Out] = []
        worker = self._workers.pop(session, None)
        if worker is not None:
            self._free -= worker.credit
            for key in sorted(worker.running):
                outs += self._requeue(self._tasks[key], worker, reason, now)
        client = self._clients.get(session)
        if client is not None:
            client.present = False
            for key in sorted(client.tasks):
                task = self._tasks.get(key)
                if task is not None and task.state is State.RESULTED:
                    self._hold(key, now)
            self._drop_client_if_idle(session)
        return outs + self._dispatch()

    def tick(self, now: float) -> tuple[list[bytes], list[Out]]:
        """Declare dead every session past its deadline and expire old results.

        Return the dead sessions (already removed here) and the messages their
        removal makes.
        """
        dead = [s for s, deadline in self._deadlines.items() if deadline <= now]
        outs: list[Out] = []
        for session in dead:
            silent = now - self._seen.get(session, now)
            outs += self.remove(session, now, f"no heartbeat for {silent:.1f} s")
        for key in self._held.due(now):
            self._expire(key)
        self._tombstones.due(now)
        return dead, outs

    # --- tasks -------------------------------------------------------------------

    def submit(
        self,
        session: bytes,
        task: bytes,
        payload: Payload,
        now: float,
        requires: dict[str, str] | None = None,
    ) -> tuple[Admission, list[Out]]:
        """Take a client's SUBMIT; on ACCEPTED the caller journals it, then sends the ACK."""
        key = task_key(session, task)
        if key in self._tasks or key in self._expired:
            self._acks.submit(session, task)
            return Admission.KNOWN, []
        if key in self._tombstones:
            reason = f"task {task!r} already completed and acknowledged"
            return Admission.REJECTED, [(session, Reject(task, "duplicate", reason))]
        size = sum(map(len, payload))
        limits = self.limits
        if size > limits.max_bytes:
            reason = f"task {task!r} carries {size} bytes, over the broker's {limits.max_bytes}"
            return Admission.REJECTED, [(session, Reject(task, "too-large", reason))]
        if len(self._tasks) >= limits.max_tasks or self._bytes + size > limits.max_bytes:
            self._counts["busy"] += 1
            reason = f"broker holds {len(self._tasks)} tasks and {self._bytes} bytes"
            reject = Reject(task, "busy", reason, limits.busy_retry_after)
            return Admission.REJECTED, [(session, reject)]
        self._queue(session, key, payload, size, requires)
        self._acks.submit(session, task)
        return Admission.ACCEPTED, self._dispatch()

    def restore(
        self,
        session: bytes,
        task: bytes,
        payload: Payload,
        now: float,
        requires: dict[str, str] | None = None,
    ) -> None:
        """Queue a task without admission checks (journal replay); dispatch on the next event."""
        key = task_key(session, task)
        if key not in self._tasks:
            size = sum(map(len, payload))
            self._queue(session, key, payload, size, requires)

    def _queue(
        self,
        session: bytes,
        key: bytes,
        payload: Payload,
        size: int,
        requires: dict[str, str] | None,
    ) -> None:
        entry = Task(key, tuple(sorted(requires.items())) if requires else (), payload, size)
        self._tasks[key] = entry
        self._bytes += size
        client = self._clients.get(session)
        if client is None:
            client = self._clients[session] = Client(present=False)
        client.tasks.add(key)
        self._lanes.push(entry, front=False)

    def credit(self, session: bytes, n: int) -> list[Out]:
        """Grant ``n`` more slots to a worker; return the dispatches they allow.

        A CREDIT also ends the answer to the worker's RECLAIM: the tasks it
        named and the worker did not hand back are running there (or done),
        and are not named again.
        """
        worker = self._workers.get(session)
        if worker is None:
            return []
        for key, attempt in worker.reclaiming:
            task = self._tasks.get(key)
            if task is not None and task.worker == session and task.attempt == attempt:
                task.started = True
        worker.reclaiming.clear()
        self._grant(worker, n)
        return self._dispatch()

    def result(self, session: bytes, message: Result, now: float) -> list[Out]:
        """Take a worker's RESULT: ACK it, return its credit, and settle the task if it wins.

        The ACK waits for the next batch (see :meth:`acks`) unless the RESULT
        returns no credit: a draining worker waits for its ACKs to leave. A
        RESULT for a task a RECLAIM named answers that name.
        """
        self._acks.result(session, message.task, message.attempt, urgent=message.credit == 0)
        outs: list[Out] = []
        worker = self._workers.get(session)
        if worker is not None:
            if worker.reclaiming:
                worker.reclaiming.discard((message.task, message.attempt))
            self._grant(worker, message.credit)
        task = self._tasks.get(message.task)
        if task is None or task.state is State.RESULTED or not 1 <= message.attempt <= task.attempt:
            # already settled, or an attempt never dispatched (not to be trusted)
            self._counts["duplicates"] += 1
            return self._dispatch()
        current = task.worker == session and message.attempt == task.attempt
        if message.status in ("crashed", "returned"):
            if not current:
                self._counts["duplicates"] += 1
                return self._dispatch()
            assert worker is not None
            if message.status == "crashed":
                outs += self._crashed(task, message.message, worker, now)
            elif task.cancelling:  # handed back unstarted after a CANCEL went out for it
                self._unassign(task, worker)
                outs += self._settle(
                    task, message.attempt, "cancelled", "cancelled before it ran", (), now
                )
            else:  # never started there (overdrawn, or reclaimed): counting neither crash nor loss
                outs += self._requeue(task, worker, None, now)
        else:
            if current and worker is not None:
                self._unassign(task, worker)
                worker.done += 1
            outs += self._settle(
                task, message.attempt, message.status, message.message, message.payload, now
            )
        return [*self._dispatch(), *outs]  # a waiting worker first: it is on the critical path

    def done(self, session: bytes, tasks: tuple[bytes, ...], now: float) -> list[bytes]:
        """Forget the client's acknowledged results; return the keys forgotten (to journal)."""
        forgotten: list[bytes] = []
        client = self._clients.get(session)
        for task in tasks:
            key = task_key(session, task)
            entry = self._tasks.get(key)
            if entry is not None and entry.state is State.RESULTED:
                self._forget(entry)
            elif self._expired.pop(key, None) is None:
                continue
            if client is not None:
                client.tasks.discard(key)
            self._tombstone(key, now)
            forgotten.append(key)
        self._drop_client_if_idle(session)
        return forgotten

    def forget(self, key: bytes, now: float) -> None:
        """Forget a task whatever its state (journal replay of a DONE)."""
        entry = self._tasks.get(key)
        if entry is not None:
            if entry.state is State.QUEUED:
                self._lanes.remove(entry)
            self._forget(entry)
        client = self._clients.get(key[:SESSION_BYTES])
        if client is not None:
            client.tasks.discard(key)
            self._drop_client_if_idle(key[:SESSION_BYTES])
        self._tombstone(key, now)

    def cancel(self, session: bytes, task: bytes, now: float) -> list[Out]:
        """Cancel a client's task: answer at once if queued, ask its worker if running."""
        entry = self._tasks.get(task_key(session, task))
        if entry is None:
            return []
        if entry.state is State.QUEUED:
            return self._settle(
                entry, entry.attempt, "cancelled", "cancelled before it ran", (), now
            )
        if entry.state is State.DISPATCHED and entry.worker is not None:
            entry.cancelling = True
            return [(entry.worker, Cancel(task=entry.key, attempt=entry.attempt))]
        return []

    def acks(self, everything: bool) -> list[Out]:
        """Return the batched ACKs due now, or all waiting ones (see ``acks.py``)."""
        return self._acks.take(everything)

    def unrunnable(self) -> list[tuple[bytes, Requires]]:
        """Return the (client, requirements) of queued tasks no connected worker can run.

        Empty while no worker is connected at all: that is a cluster starting up.
        """
        if not self._workers:
            return []
        return [
            (owner, requires)
            for owner, requires in self._lanes
            if not any(
                all(w.labels.get(k) == v for k, v in requires) for w in self._workers.values()
            )
        ]

    def worker_labels(self, key: str) -> set[str]:
        """Return the values of label ``key`` among connected workers."""
        return {w.labels.get(key, "?") for w in self._workers.values()}

    def holds_tasks_of(self, session: bytes) -> bool:
        """Return True while the scheduler holds tasks or results of client ``session``."""
        return session in self._clients

    def drop_expired(self) -> list[bytes]:
        """Return the keys whose results expired since the last call (to journal as forgotten)."""
        dropped, self._dropped = self._dropped, []
        return dropped

    # --- introspection -----------------------------------------------------------

    def statistics(self, now: float) -> SchedulerStats:
        """Return a snapshot of the counters and workers."""
        states = [t.state for t in self._tasks.values()]
        workers = tuple(
            WorkerInfo(
                w.name,
                w.host,
                w.pid,
                w.credit,
                len(w.running),
                w.done,
                now - self._seen.get(w.session, now),
            )
            for w in self._workers.values()
        )
        c = self._counts
        return SchedulerStats(
            queued=states.count(State.QUEUED),
            in_flight=states.count(State.DISPATCHED),
            awaiting_done=states.count(State.RESULTED) + len(self._expired),
            bytes=self._bytes,
            clients=sum(client.present for client in self._clients.values()),
            workers=len(self._workers),
            tasks_done=c["done"],
            tasks_failed=c["failed"],
            retries=c["retries"],
            duplicates=c["duplicates"],
            rejected_busy=c["busy"],
            worker_list=workers,
        )

    def check_invariants(self) -> None:
        """Raise AssertionError if the table is inconsistent (tests call it after each step)."""
        queued = self._lanes.queued()
        assert len(queued) == len(set(queued)), "a task is queued twice"
        for key, task in self._tasks.items():
            assert (key in queued) == (task.state is State.QUEUED), f"lane/state of {key!r}"
            running = task.state is State.DISPATCHED and task.worker in self._workers
            if task.worker is not None:
                assert running and key in self._workers[task.worker].running, f"owner of {key!r}"
        assert self._free == sum(w.credit for w in self._workers.values()), "free credit"
        for worker in self._workers.values():
            assert worker.credit >= 0
            for key in worker.running:
                assert self._tasks[key].worker == worker.session
        assert self._bytes == sum(t.size for t in self._tasks.values()), "byte count"
        self._lanes.check()

    # --- internals ---------------------------------------------------------------

    def _grant(self, worker: Worker, n: int) -> None:
        credit = min(worker.credit + n, MAX_CREDIT)
        self._free += credit - worker.credit
        worker.credit = credit

    def _dispatch(self) -> list[Out]:
        outs: list[Out] = []
        while self._free and (taken := self._lanes.take(self._workers)) is not None:
            key, worker = taken
            task = self._tasks[key]
            task.state, task.worker = State.DISPATCHED, worker.session
            worker.running.add(key)
            worker.credit -= 1
            self._free -= 1
            self._turns += 1
            worker.turn = task.turn = self._turns
            task.started = False
            outs.append((worker.session, Dispatch(key, task.attempt, task.payload)))
        if self._free:  # credit left that no queued task can use: an idle slot may steal
            outs += reclaims(self._workers.values(), self._tasks)
        return outs

    def _unassign(self, task: Task, worker: Worker) -> None:
        worker.running.discard(task.key)
        task.worker = None

    def _retry(self, task: Task) -> None:
        """Queue ``task`` again, first in its lane, as its next attempt."""
        self._counts["retries"] += 1
        task.attempt += 1
        self._lanes.push(task, front=True)

    def _requeue(self, task: Task, worker: Worker, reason: str | None, now: float) -> list[Out]:
        self._unassign(task, worker)
        if reason is not None:
            task.losses += 1
        if task.losses > self.limits.max_retries:
            who = f"worker node {worker.name!r} (pid {worker.pid} on {worker.host or '?'})"
            message = (
                f"{who} was lost: {reason}; task {task.key[SESSION_BYTES:]!r} ran"
                f" {task.attempt} times, past the retry limit of {self.limits.max_retries}"
            )
            return self._settle(task, task.attempt, "lost", message, (), now)
        self._retry(task)
        return []

    def _crashed(self, task: Task, cause: str, worker: Worker, now: float) -> list[Out]:
        self._unassign(task, worker)
        task.crashes.append(cause or "unknown cause")
        if len(task.crashes) >= self.limits.poison_limit:
            text = (
                f"task {task.key[SESSION_BYTES:]!r} is poisoned: it killed its task process"
                f" {len(task.crashes)} times ({'; '.join(task.crashes)})"
            )
            return self._settle(task, task.attempt, "poisoned", text, (), now)
        self._retry(task)
        return []

    def _settle(
        self, task: Task, attempt: int, status: str, text: str, payload: Payload, now: float
    ) -> list[Out]:
        outs: list[Out] = []
        if task.state is State.QUEUED:
            self._lanes.remove(task)
        elif task.worker is not None:
            # a late result of an earlier attempt won: stop the re-run
            self._workers[task.worker].running.discard(task.key)
            outs.append((task.worker, Cancel(task=task.key, attempt=task.attempt)))
            task.worker = None
        self._counts["done" if status in ("ok", "error") else "failed"] += 1
        size = sum(map(len, payload)) if payload else 0
        self._bytes += size - task.size
        task.state, task.size, task.payload = State.RESULTED, size, ()
        task.result = Result(task.key[SESSION_BYTES:], attempt, status, text, 0, payload)
        owner = task.owner
        client = self._clients.get(owner)
        if client is not None and client.present:
            outs.append((owner, task.result))
            self._acks.resulted(owner, task.result.task)
        else:
            self._hold(task.key, now)
        return outs

    def _hold(self, key: bytes, now: float) -> None:
        for old in self._held.add(key, now):
            self._expire(old)

    def _expire(self, key: bytes) -> None:
        self._held.discard(key)
        task = self._tasks.get(key)
        if task is None:
            return
        self._forget(task)
        self._dropped.append(key)
        text = "the result waited for its absent client past the broker's result limits"
        self._expired[key] = Result(key[SESSION_BYTES:], task.attempt, "expired", text)
        while len(self._expired) > self.limits.tombstone_limit:
            old, _ = self._expired.popitem(last=False)
            client = self._clients.get(old[:SESSION_BYTES])
            if client is not None:
                client.tasks.discard(old)

    def _forget(self, task: Task) -> None:
        del self._tasks[task.key]
        self._held.discard(task.key)
        self._bytes -= task.size

    def _tombstone(self, key: bytes, now: float) -> None:
        self._tombstones.add(key, now)

    def _drop_client_if_idle(self, session: bytes) -> None:
        client = self._clients.get(session)
        if client is not None and not client.present and not client.tasks:
            del self._clients[session]
