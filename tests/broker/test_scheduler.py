"""The scheduler's rules, as plain unit tests and a hypothesis state machine."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fabric.broker.acks import BATCH
from fabric.broker.protocol import Ack, Cancel, Dispatch, Message, Reject, Result
from fabric.broker.scheduler import Admission, Limits, Out, Scheduler

A, B = b"A" * 16, b"B" * 16
W1, W2, W3 = b"1" * 16, b"2" * 16, b"3" * 16


def sent(outs: list[Out], kind: type[Message], to: bytes | None = None) -> list[Message]:
    return [m for dest, m in outs if isinstance(m, kind) and to in (None, dest)]


def dispatches(outs: list[Out]) -> list[tuple[bytes, Dispatch]]:
    return [(dest, m) for dest, m in outs if isinstance(m, Dispatch)]


def finish(
    s: Scheduler, worker: bytes, d: Dispatch, now: float = 0.0, status: str = "ok"
) -> list[Out]:
    return s.result(worker, Result(d.task, d.attempt, status, credit=1, payload=(b"v",)), now)


def test_submit_acks_then_dispatches_to_a_worker_with_credit() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    verdict, outs = s.submit(A, b"t1", (b"call",), 0)
    assert verdict is Admission.ACCEPTED
    assert not outs and not s.acks(everything=False)  # ACKs wait for a batch or a tick
    assert s.acks(everything=True) == [(A, Ack((b"t1",)))]
    outs = s.add_worker(W1, 0, capacity=1)
    assert dispatches(outs) == [(W1, Dispatch(A + b"t1", 1, (b"call",)))]
    outs = finish(s, W1, dispatches(outs)[0][1])
    assert sent(outs, Result, A) == [Result(b"t1", 1, "ok", payload=(b"v",))]
    assert s.acks(everything=True) == [(W1, Ack((A + b"t1",), (1,)))]
    assert s.done(A, (b"t1",), 0) == [A + b"t1"]
    s.check_invariants()
    stats = s.statistics(0)
    assert (stats.queued, stats.in_flight, stats.awaiting_done, stats.tasks_done) == (0, 0, 0, 1)
    assert stats.bytes == 0


def test_resubmit_of_a_known_task_is_not_queued_twice_and_a_done_one_is_refused() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    assert s.submit(A, b"t", (b"x",), 0)[0] is Admission.ACCEPTED
    s.acks(everything=True)
    verdict, outs = s.submit(A, b"t", (b"x",), 0)
    assert verdict is Admission.KNOWN
    assert not outs
    assert s.acks(everything=True) == [(A, Ack((b"t",)))]  # acknowledged again
    assert s.statistics(0).queued == 1
    (_, d), *_ = dispatches(s.add_worker(W1, 0, capacity=5))
    finish(s, W1, d)
    s.done(A, (b"t",), 0)
    verdict, outs = s.submit(A, b"t", (b"x",), 0)
    assert verdict is Admission.REJECTED
    (reject,) = sent(outs, Reject)
    assert isinstance(reject, Reject)
    assert reject.code == "duplicate"


def test_tombstones_expire_after_their_ttl() -> None:
    s = Scheduler(Limits(tombstone_ttl=10))
    s.add_client(A, 0)
    s.submit(A, b"t", (), 0)
    s.cancel(A, b"t", 0)
    s.done(A, (b"t",), 1)
    assert s.submit(A, b"t", (), 5)[0] is Admission.REJECTED
    s.tick(11.5)
    s.touch(A, 11.5)
    assert s.submit(A, b"t", (), 11.5)[0] is Admission.ACCEPTED


def test_back_pressure_rejects_busy_past_the_task_and_byte_limits() -> None:
    s = Scheduler(Limits(max_tasks=2, max_bytes=100, busy_retry_after=0.25))
    s.add_client(A, 0)
    assert s.submit(A, b"1", (b"x" * 10,), 0)[0] is Admission.ACCEPTED
    assert s.submit(A, b"2", (b"x" * 10,), 0)[0] is Admission.ACCEPTED
    verdict, outs = s.submit(A, b"3", (b"x",), 0)
    assert verdict is Admission.REJECTED
    assert sent(outs, Reject) == [Reject(b"3", "busy", "broker holds 2 tasks and 20 bytes", 0.25)]
    s.cancel(A, b"1", 0)
    s.done(A, (b"1",), 0)
    assert s.submit(A, b"3", (b"x" * 80,), 0)[0] is Admission.ACCEPTED
    assert s.submit(A, b"4", (b"x" * 11,), 0)[0] is Admission.REJECTED  # bytes: 90 + 11 > 100
    verdict, outs = s.submit(A, b"5", (b"x" * 101,), 0)
    assert verdict is Admission.REJECTED
    (reject,) = sent(outs, Reject)
    assert isinstance(reject, Reject)
    assert reject.code == "too-large"
    assert s.statistics(0).rejected_busy == 2


def test_clients_take_turns_so_none_starves() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    s.add_client(B, 0)
    for i in range(50):
        s.submit(A, b"a%d" % i, (), 0)
    for i in range(3):
        s.submit(B, b"b%d" % i, (), 0)
    order = []
    outs = s.add_worker(W1, 0, capacity=1)
    for _ in range(8):
        ((_, d),) = dispatches(outs)
        order.append(d.task[:16])
        outs = finish(s, W1, d)
    assert order == [A, B, A, B, A, B, A, A]


def test_per_client_order_is_kept() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    ids = [b"%03d" % i for i in range(20)]
    for task in ids:
        s.submit(A, task, (), 0)
    outs = s.add_worker(W1, 0, capacity=20)
    assert [d.task[16:] for _, d in dispatches(outs)] == ids


def test_dispatch_spreads_over_workers_by_free_credit() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    s.add_worker(W1, 0, capacity=2)
    s.add_worker(W2, 0, capacity=2)
    outs: list[Out] = []
    for i in range(4):
        outs += s.submit(A, b"%d" % i, (), 0)[1]
    assert Counter(dest for dest, _ in dispatches(outs)) == {W1: 2, W2: 2}
    assert s.submit(A, b"5", (), 0)[1] == []  # no credit left: stays queued


def test_requirements_route_only_to_matching_workers() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    s.add_worker(W1, 0, capacity=4, labels={"gpu": "no"})
    _, outs = s.submit(A, b"g", (), 0, requires={"gpu": "yes"})
    assert not dispatches(outs)
    _, outs = s.submit(A, b"c", (), 0)
    assert [d.task for _, d in dispatches(outs)] == [A + b"c"]  # not blocked behind b"g"
    outs = s.add_worker(W2, 0, capacity=1, labels={"gpu": "yes"})
    assert dispatches(outs) == [(W2, Dispatch(A + b"g", 1))]


def test_a_lost_worker_s_tasks_are_requeued_then_fail_as_lost_past_the_retry_limit() -> None:
    s = Scheduler(Limits(max_retries=1, liveness_timeout=3))
    s.add_client(A, 0)
    s.submit(A, b"t", (b"call",), 0)
    s.add_worker(W1, 0, name="w1", pid=41, host="h1", capacity=1)
    outs = s.add_worker(W2, 1, name="w2", pid=42, host="h2", capacity=1)
    assert not dispatches(outs)
    s.touch(W2, 3.5)
    s.touch(A, 3.5)
    dead, outs = s.tick(3.5)  # w1 silent since 0: dead
    assert dead == [W1]
    assert dispatches(outs) == [(W2, Dispatch(A + b"t", 2, (b"call",)))]
    dead, outs = s.tick(7)
    assert set(dead) == {W2, A}
    assert not sent(outs, Result)  # the client is gone too: the result is held
    outs = s.add_client(A, 8)
    ((_, result),) = outs
    assert isinstance(result, Result)
    assert (result.task, result.attempt, result.status) == (b"t", 2, "lost")
    assert "worker node 'w2' (pid 42 on h2) was lost: no heartbeat for 3.5 s" in result.message
    assert "ran 2 times, past the retry limit of 1" in result.message
    assert s.statistics(8).tasks_failed == 1
    s.check_invariants()


def test_bye_requeues_without_counting_a_loss() -> None:
    s = Scheduler(Limits(max_retries=0))
    s.add_client(A, 0)
    s.submit(A, b"t", (), 0)
    s.add_worker(W1, 0, capacity=1)
    s.remove(W1, 0, None)
    ((_, d),) = dispatches(s.add_worker(W2, 0, capacity=1))
    assert d.attempt == 2
    assert sent(finish(s, W2, d), Result, A)[0] == Result(b"t", 2, "ok", payload=(b"v",))


def test_a_task_that_crashes_its_process_is_poisoned_after_the_limit() -> None:
    s = Scheduler(Limits(poison_limit=2))
    s.add_client(A, 0)
    s.submit(A, b"p", (), 0)
    ((_, d),) = dispatches(s.add_worker(W1, 0, capacity=1))
    outs = s.result(W1, Result(d.task, 1, "crashed", "SIGKILL", credit=1), 0)
    ((_, d2),) = dispatches(outs)
    assert d2.attempt == 2
    outs = s.result(W1, Result(d.task, 2, "crashed", "SIGSEGV", credit=1), 0)
    (result,) = sent(outs, Result, A)
    assert isinstance(result, Result)
    assert result.status == "poisoned"
    assert "killed its task process 2 times (SIGKILL; SIGSEGV)" in result.message


def test_a_task_handed_back_unstarted_is_queued_again_without_counting() -> None:
    # a node the broker overdrew (a repeated HELLO re-stated its credit) hands tasks
    # back: however often, that is neither a crash toward poisoning nor a loss
    s = Scheduler(Limits(poison_limit=2, max_retries=0))
    s.add_client(A, 0)
    s.submit(A, b"t", (), 0)
    ((_, d),) = dispatches(s.add_worker(W1, 0, capacity=1))
    for attempt in range(1, 5):
        s.credit(W1, 1)  # the overdrawn credit, spent again on the same task
        ((_, d),) = dispatches(s.result(W1, Result(d.task, attempt, "returned"), 0))
        assert d.attempt == attempt + 1
    assert s.result(W1, Result(d.task, 5, "returned"), 0) == []  # no credit left: it waits
    ((_, d),) = dispatches(s.add_worker(W2, 0, capacity=1))
    assert sent(finish(s, W2, d), Result, A) == [Result(b"t", 6, "ok", payload=(b"v",))]


def test_first_result_wins_and_the_rerun_is_cancelled() -> None:
    s = Scheduler(Limits(liveness_timeout=1))
    s.add_client(A, 0)
    s.submit(A, b"t", (), 0)
    ((_, d1),) = dispatches(s.add_worker(W1, 0, capacity=1))
    s.remove(W1, 1, "partitioned")
    ((_, d2),) = dispatches(s.add_worker(W2, 1, capacity=1))
    s.add_worker(W1, 2, capacity=0)  # w1 comes back and reports attempt 1
    outs = finish(s, W1, d1)
    assert sent(outs, Result, A) == [Result(b"t", 1, "ok", payload=(b"v",))]
    assert sent(outs, Cancel, W2) == [Cancel(A + b"t", 2)]
    s.acks(everything=True)
    outs = finish(s, W2, d2)
    assert s.acks(everything=True) == [(W2, Ack((A + b"t",), (2,)))]
    assert not sent(outs, Result, A)
    assert s.statistics(2).duplicates == 1
    s.check_invariants()


def test_results_for_an_attempt_never_dispatched_are_dropped() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    s.submit(A, b"t", (), 0)
    s.add_worker(W1, 0, capacity=1)
    outs = s.result(W1, Result(A + b"t", 7, "ok", credit=0), 0)
    assert not sent(outs, Result)
    assert s.statistics(0).in_flight == 1


def test_cancel_answers_queued_tasks_and_asks_the_worker_for_running_ones() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    s.submit(A, b"q", (), 0)
    s.submit(A, b"r", (), 0)
    ((_, d),) = dispatches(s.add_worker(W1, 0, capacity=1))
    assert d.task == A + b"q"
    assert s.cancel(A, b"q", 0) == [(W1, Cancel(A + b"q", 1))]
    (result,) = sent(s.cancel(A, b"r", 0), Result, A)
    assert isinstance(result, Result)
    assert result.status == "cancelled"


def test_absent_clients_results_are_bounded_and_expire() -> None:
    s = Scheduler(Limits(result_limit=2, result_ttl=100))
    s.add_client(A, 0)
    for i in range(3):
        s.submit(A, b"%d" % i, (b"x",), 0)
    s.remove(A, 0, "gone")
    outs = s.add_worker(W1, 0, capacity=3)
    for _, d in dispatches(outs):
        finish(s, W1, d, now=1)
    outs = s.add_client(A, 2)
    assert [(m.task, m.status) for _, m in outs if isinstance(m, Result)] == [
        (b"0", "expired"),
        (b"1", "ok"),
        (b"2", "ok"),
    ]
    s.remove(A, 3, "gone again")
    s.tick(200)
    statuses = [m.status for _, m in s.add_client(A, 200) if isinstance(m, Result)]
    assert statuses == ["expired"] * 3
    assert sorted(s.drop_expired()) == [A + b"0", A + b"1", A + b"2"]
    assert s.drop_expired() == []
    assert s.statistics(200).bytes == 0
    assert s.done(A, (b"0", b"1", b"2"), 200) == [A + b"0", A + b"1", A + b"2"]
    s.check_invariants()


# --- the state machine -------------------------------------------------------------

CLIENTS = (A, B)
WORKERS = (W1, W2, W3)
TASK_IDS = st.binary(min_size=1, max_size=2)


class SchedulerMachine(RuleBasedStateMachine):
    """Random interleavings of every event; invariants checked after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(
            Limits(
                max_tasks=12,
                max_bytes=200,
                max_retries=2,
                poison_limit=2,
                result_limit=4,
                liveness_timeout=5,
            )
        )
        self.now = 0.0
        self.granted: Counter[bytes] = Counter()
        self.dispatched: Counter[bytes] = Counter()
        self.running: dict[bytes, list[Dispatch]] = {w: [] for w in WORKERS}
        self.accepted: set[bytes] = set()
        self.results: dict[bytes, Result] = {}
        self.present = {c: False for c in CLIENTS}
        self.alive: set[bytes] = set()
        self.orphans: list[Dispatch] = []  # dispatched to a worker since removed

    def apply(self, outs: list[Out]) -> None:
        for dest, message in outs:
            if isinstance(message, Dispatch):
                assert dest in self.running, "dispatch to an unknown worker"
                self.dispatched[dest] += 1
                self.running[dest].append(message)
                assert self.dispatched[dest] <= self.granted[dest], "worker over credit"
            elif isinstance(message, Result):
                assert self.present[dest], "result sent to an absent client"
                key = dest + message.task
                assert key in self.accepted, "result for a task never accepted"
                # one outcome per task: a re-sent result is the same result, except
                # that an unacknowledged one may expire while its client is away
                if message.status != "expired":
                    assert self.results.setdefault(key, message) == message
                self.results[key] = message

    @rule(client=st.sampled_from(CLIENTS))
    def client_joins(self, client: bytes) -> None:
        self.present[client] = True
        self.alive.add(client)
        self.apply(self.s.add_client(client, self.now))

    @rule(client=st.sampled_from(CLIENTS), lost=st.booleans())
    def client_leaves(self, client: bytes, lost: bool) -> None:
        self.present[client] = False
        self.alive.discard(client)
        self.apply(self.s.remove(client, self.now, "test" if lost else None))

    @precondition(lambda self: any(self.present.values()))
    @rule(data=st.data(), task=TASK_IDS, size=st.integers(0, 40))
    def submit(self, data: st.DataObject, task: bytes, size: int) -> None:
        client = data.draw(st.sampled_from([c for c in CLIENTS if self.present[c]]))
        verdict, outs = self.s.submit(client, task, (b"x" * size,), self.now)
        if verdict is Admission.ACCEPTED:
            key = client + task
            assert key not in self.accepted, "queued a known task twice"
            self.accepted.add(key)
            self.results.pop(key, None)
        self.apply(outs)

    @rule(worker=st.sampled_from(WORKERS), capacity=st.integers(0, 3))
    def worker_joins(self, worker: bytes, capacity: int) -> None:
        self.apply(self.s.remove(worker, self.now, "replaced"))
        self.orphans += self.running[worker]
        self.running[worker] = []
        self.granted[worker] = capacity
        self.dispatched[worker] = 0
        self.alive.add(worker)
        self.apply(self.s.add_worker(worker, self.now, capacity=capacity))

    @rule(worker=st.sampled_from(WORKERS), lost=st.booleans())
    def worker_leaves(self, worker: bytes, lost: bool) -> None:
        self.apply(self.s.remove(worker, self.now, "killed" if lost else None))
        self.granted[worker] = self.dispatched[worker] = 0
        self.orphans += self.running[worker]
        self.running[worker] = []
        self.alive.discard(worker)

    @rule(worker=st.sampled_from(WORKERS), n=st.integers(1, 2))
    def credit(self, worker: bytes, n: int) -> None:
        self.granted[worker] += n
        self.apply(self.s.credit(worker, n))

    @rule(data=st.data(), status=st.sampled_from(["ok", "error", "crashed", "cancelled"]))
    def worker_finishes(self, data: st.DataObject, status: str) -> None:
        busy = [w for w in WORKERS if self.running[w]]
        if not busy:
            return
        worker = data.draw(st.sampled_from(busy))
        d = self.running[worker].pop(data.draw(st.integers(0, len(self.running[worker]) - 1)))
        self.granted[worker] += 1
        self.apply(self.s.result(worker, Result(d.task, d.attempt, status, credit=1), self.now))

    @rule(data=st.data())
    def worker_hands_back(self, data: st.DataObject) -> None:
        """A node with no free slot returns a task unstarted, and no credit."""
        busy = [w for w in WORKERS if self.running[w]]
        if not busy:
            return
        worker = data.draw(st.sampled_from(busy))
        d = self.running[worker].pop(data.draw(st.integers(0, len(self.running[worker]) - 1)))
        self.apply(self.s.result(worker, Result(d.task, d.attempt, "returned"), self.now))

    @precondition(lambda self: self.orphans)
    @rule(data=st.data(), status=st.sampled_from(["ok", "crashed"]))
    def late_result(self, data: st.DataObject, status: str) -> None:
        """A worker presumed dead comes back (new session) and reports an old attempt."""
        d = self.orphans.pop(data.draw(st.integers(0, len(self.orphans) - 1)))
        worker = data.draw(st.sampled_from(WORKERS))
        if worker not in self.alive:
            return
        self.granted[worker] += 1
        self.apply(self.s.result(worker, Result(d.task, d.attempt, status, credit=1), self.now))

    @rule(client=st.sampled_from(CLIENTS))
    def client_done(self, client: bytes) -> None:
        mine = tuple(k[16:] for k in self.results if k[:16] == client)
        for key in self.s.done(client, mine, self.now):
            del self.results[key]
            self.accepted.discard(key)

    @rule(client=st.sampled_from(CLIENTS), task=TASK_IDS)
    def cancel(self, client: bytes, task: bytes) -> None:
        self.apply(self.s.cancel(client, task, self.now))

    @rule(dt=st.floats(0, 4))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        for session in self.alive:
            self.s.touch(session, self.now)
        dead, outs = self.s.tick(self.now)
        assert not dead
        self.apply(outs)

    @invariant()
    def consistent(self) -> None:
        self.s.check_invariants()
        stats = self.s.statistics(self.now)
        assert stats.queued + stats.in_flight + stats.awaiting_done <= 12 + 4


SchedulerMachine.TestCase.settings = settings(
    max_examples=500, stateful_step_count=40, deadline=None
)
test_scheduler_state_machine = SchedulerMachine.TestCase


def test_acks_travel_in_batches_and_a_result_acknowledges_its_submit() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    for i in range(BATCH - 1):
        s.submit(A, b"%d" % i, (), 0)
    assert not s.acks(everything=False)
    s.submit(A, b"last", (), 0)  # a full batch leaves without waiting for the tick
    ((dest, ack),) = s.acks(everything=False)
    assert dest == A and isinstance(ack, Ack) and len(ack.tasks) == BATCH and not ack.attempts
    s.submit(A, b"x", (), 0)
    s.submit(A, b"y", (), 0)
    ((_, d), *_) = dispatches(s.add_worker(W1, 0, capacity=1))
    assert d.task == A + b"0"
    finish(s, W1, d)
    s.cancel(A, b"y", 0)  # a broker-made RESULT acknowledges too
    assert s.acks(everything=True) == [(A, Ack((b"x",))), (W1, Ack((A + b"0",), (1,)))]


def test_a_result_without_credit_is_acknowledged_at_once() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    s.submit(A, b"t", (), 0)
    ((_, d),) = dispatches(s.add_worker(W1, 0, capacity=1))
    s.acks(everything=True)
    s.result(W1, Result(d.task, d.attempt, "ok", credit=0), 0)  # a draining worker
    assert s.acks(everything=False) == [(W1, Ack((d.task,), (1,)))]


def test_an_ack_batch_is_split_below_the_control_frame_limit() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    for i in range(BATCH * 2 + 3):
        s.submit(A, b"%d" % i, (), 0)
    sizes = [len(ack.tasks) for _, ack in s.acks(everything=True) if isinstance(ack, Ack)]
    assert sizes == [BATCH, BATCH, 3]
