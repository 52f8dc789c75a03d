"""The scheduler's rules, as plain unit tests and a hypothesis state machine."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fabric.broker.acks import BATCH
from fabric.broker.protocol import Ack, Cancel, Dispatch, Message, Reclaim, Reject, Result
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


# --- work stealing -----------------------------------------------------------------


def hand_back(s: Scheduler, worker: bytes, reclaim: Message, now: float = 0.0) -> list[Out]:
    """Answer a RECLAIM as a node holding every named task unstarted: each comes back."""
    assert isinstance(reclaim, Reclaim)
    outs: list[Out] = []
    for task, attempt in zip(reclaim.tasks, reclaim.attempts, strict=True):
        outs += s.result(worker, Result(task, attempt, "returned", credit=1), now)
    return outs


def test_idle_slots_are_filled_before_a_prefetch_window() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    s.add_worker(W1, 0, capacity=5, slots=1)  # 1 slot + 4 prefetched: the most credit
    s.add_worker(W2, 0, capacity=2, slots=1)
    outs = s.submit(A, b"1", (), 0)[1] + s.submit(A, b"2", (), 0)[1]
    assert [dest for dest, _ in dispatches(outs)] == [W1, W2]  # not W1 twice
    outs = s.submit(A, b"3", (), 0)[1]
    assert [dest for dest, _ in dispatches(outs)] == [W1]  # no slot idle: the most credit
    assert not sent(outs, Reclaim)


def test_an_idle_slot_reclaims_the_newest_prefetched_tasks() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    s.add_worker(W1, 0, capacity=4, slots=1)
    for i in range(4):
        s.submit(A, b"%d" % i, (), 0)  # 0 runs on W1; 1, 2 and 3 wait there
    outs = s.add_worker(W2, 0, capacity=3, slots=2)
    assert outs == [(W1, Reclaim((A + b"3", A + b"2"), (1, 1)))]  # as many as W2's idle slots
    s.check_invariants()
    outs = hand_back(s, W1, outs[0][1])
    assert outs == [(W2, Dispatch(A + b"3", 2)), (W2, Dispatch(A + b"2", 2))]
    stats = s.statistics(0)
    assert [(w.credit, w.running) for w in stats.worker_list] == [(2, 2), (1, 2)]
    assert (stats.tasks_failed, stats.duplicates) == (0, 0)
    s.check_invariants()
    (result,) = sent(finish(s, W2, Dispatch(A + b"3", 2)), Result, A)  # runs once, on W2
    assert result == Result(b"3", 2, "ok", payload=(b"v",))


def test_one_reclaim_at_a_time_and_a_kept_task_is_not_named_again() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    s.add_worker(W1, 0, capacity=4, slots=1)
    for i in range(4):
        s.submit(A, b"%d" % i, (), 0)
    assert s.add_worker(W2, 0, capacity=1, slots=1) == [(W1, Reclaim((A + b"3",), (1,)))]
    assert s.add_worker(W3, 0, capacity=1, slots=1) == []  # W1's answer is not in yet
    # W1 kept 3 (say it started): CREDIT(0) ends its answer; 3 is never named again
    assert s.credit(W1, 0) == [(W1, Reclaim((A + b"2", A + b"1"), (1, 1)))]
    outs = hand_back(s, W1, Reclaim((A + b"2", A + b"1"), (1, 1)))
    assert [dest for dest, _ in dispatches(outs)] == [W2, W3]
    assert not sent(outs, Reclaim)
    s.check_invariants()


def test_a_worker_that_does_not_say_its_slots_is_never_asked() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    s.add_worker(W1, 0, capacity=4)
    for i in range(4):
        s.submit(A, b"%d" % i, (), 0)
    assert s.add_worker(W2, 0, capacity=1, slots=1) == []


def test_a_reclaim_names_only_tasks_the_idle_worker_may_run() -> None:
    s = Scheduler()
    s.add_client(A, 0)
    s.add_worker(W1, 0, capacity=3, slots=1, labels={"gpu": "yes"})
    s.submit(A, b"c1", (), 0)
    s.submit(A, b"c2", (), 0)
    s.submit(A, b"g", (), 0, requires={"gpu": "yes"})  # the newest, but W2 may not run it
    outs = s.add_worker(W2, 0, capacity=2, slots=1, labels={"gpu": "no"})
    assert outs == [(W1, Reclaim((A + b"c2",), (1,)))]


def one_slot_holding_two_then_an_idle_one() -> tuple[Scheduler, list[Out]]:
    """W1 (one slot, a window of one) holds tasks 0 and 1; return W2's joining, one idle slot."""
    s = Scheduler()
    s.add_client(A, 0)
    s.add_worker(W1, 0, capacity=2, slots=1)
    s.submit(A, b"0", (), 0)
    s.submit(A, b"1", (), 0)
    return s, s.add_worker(W2, 0, capacity=1, slots=1)


def test_a_task_handed_back_after_its_cancel_went_out_is_cancelled_not_run() -> None:
    s, ((_, reclaim),) = one_slot_holding_two_then_an_idle_one()
    assert s.cancel(A, b"1", 0) == [(W1, Cancel(A + b"1", 1))]
    outs = hand_back(s, W1, reclaim)  # the RECLAIM reached the node before the CANCEL
    assert outs == [(A, Result(b"1", 1, "cancelled", "cancelled before it ran"))]
    s.check_invariants()


def test_a_result_crossing_a_reclaim_answers_its_name() -> None:
    s, outs = one_slot_holding_two_then_an_idle_one()
    assert outs == [(W1, Reclaim((A + b"1",), (1,)))]
    finish(s, W1, Dispatch(A + b"0", 1))  # not named: the RECLAIM is still out
    outs = finish(s, W1, Dispatch(A + b"1", 1))  # it ran after all: its name is answered
    assert not sent(outs, Reclaim) and not dispatches(outs)
    assert s.credit(W1, 0) == []  # the node's answer: it had nothing to hand back
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
        self.slots: dict[bytes, int] = dict.fromkeys(WORKERS, 0)
        self.reclaimed: dict[bytes, set[tuple[bytes, int]]] = {w: set() for w in WORKERS}
        self.ever_named: set[tuple[bytes, int]] = set()

    def apply(self, outs: list[Out]) -> None:
        for dest, message in outs:
            if isinstance(message, Dispatch):
                assert dest in self.running, "dispatch to an unknown worker"
                self.dispatched[dest] += 1
                self.running[dest].append(message)
                assert self.dispatched[dest] <= self.granted[dest], "worker over credit"
            elif isinstance(message, Reclaim):
                assert not self.reclaimed[dest], "a second RECLAIM before the first's answer"
                held = {(d.task, d.attempt) for d in self.running[dest]}
                named = set(zip(message.tasks, message.attempts, strict=True))
                assert named and named <= held, "a RECLAIM names a task the worker lacks"
                assert len(named) <= len(held) - self.slots[dest], "reclaims more than prefetched"
                assert not named & self.ever_named, "a task named twice for one dispatch"
                self.ever_named |= named
                self.reclaimed[dest] = named
            elif isinstance(message, Result):
                assert self.present[dest], "result sent to an absent client"
                key = dest + message.task
                assert key in self.accepted, "result for a task never accepted"
                # one outcome per task: a re-sent result is the same result, except
                # that an unacknowledged one may expire while its client is away
                if message.status != "expired":
                    assert self.results.setdefault(key, message) == message
                self.results[key] = message

    @initialize(capacity=st.integers(2, 3))
    def start(self, capacity: int) -> None:
        """Begin with a client and a worker with a prefetch window, where stealing starts."""
        self.client_joins(A)
        self.worker_joins(W1, capacity, 1)

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

    @rule(worker=st.sampled_from(WORKERS), capacity=st.integers(0, 3), slots=st.integers(0, 2))
    def worker_joins(self, worker: bytes, capacity: int, slots: int) -> None:
        self.apply(self.s.remove(worker, self.now, "replaced"))
        self.orphans += self.running[worker]
        self.running[worker] = []
        self.reclaimed[worker] = set()
        self.granted[worker] = capacity
        self.dispatched[worker] = 0
        self.slots[worker] = slots
        self.alive.add(worker)
        self.apply(self.s.add_worker(worker, self.now, capacity=capacity, slots=slots))

    @rule(worker=st.sampled_from(WORKERS), lost=st.booleans())
    def worker_leaves(self, worker: bytes, lost: bool) -> None:
        self.apply(self.s.remove(worker, self.now, "killed" if lost else None))
        self.granted[worker] = self.dispatched[worker] = 0
        self.orphans += self.running[worker]
        self.running[worker] = []
        self.reclaimed[worker] = set()
        self.alive.discard(worker)

    @rule(worker=st.sampled_from(WORKERS), n=st.integers(1, 2))
    def credit(self, worker: bytes, n: int) -> None:
        self.granted[worker] += n
        self.reclaimed[worker] = set()  # a CREDIT ends a RECLAIM's answer
        self.apply(self.s.credit(worker, n))

    def report(self, worker: bytes, result: Result) -> None:
        """Send a worker's RESULT: it answers a RECLAIM's name for its task, if any."""
        self.reclaimed[worker].discard((result.task, result.attempt))
        self.granted[worker] += result.credit
        self.apply(self.s.result(worker, result, self.now))

    @precondition(lambda self: any(self.reclaimed.values()))
    @rule(data=st.data())
    def worker_answers_reclaim(self, data: st.DataObject) -> None:
        """Hand back the named tasks still unstarted (any subset); CREDIT(0) if one stays."""
        worker = data.draw(st.sampled_from([w for w in WORKERS if self.reclaimed[w]]))
        named = self.reclaimed[worker]
        back = [
            d
            for d in reversed(self.running[worker])
            if (d.task, d.attempt) in named and data.draw(st.booleans(), "unstarted")
        ]
        for d in back:
            self.running[worker].remove(d)
            self.report(worker, Result(d.task, d.attempt, "returned", credit=1))
        if len(back) < len(named):
            self.credit(worker, 0)

    @rule(data=st.data(), status=st.sampled_from(["ok", "error", "crashed", "cancelled"]))
    def worker_finishes(self, data: st.DataObject, status: str) -> None:
        busy = [w for w in WORKERS if self.running[w]]
        if not busy:
            return
        worker = data.draw(st.sampled_from(busy))
        d = self.running[worker].pop(data.draw(st.integers(0, len(self.running[worker]) - 1)))
        self.report(worker, Result(d.task, d.attempt, status, credit=1))

    @rule(data=st.data())
    def worker_hands_back(self, data: st.DataObject) -> None:
        """A node with no free slot returns a task unstarted, and no credit."""
        busy = [w for w in WORKERS if self.running[w]]
        if not busy:
            return
        worker = data.draw(st.sampled_from(busy))
        d = self.running[worker].pop(data.draw(st.integers(0, len(self.running[worker]) - 1)))
        self.report(worker, Result(d.task, d.attempt, "returned"))

    @precondition(lambda self: self.orphans)
    @rule(data=st.data(), status=st.sampled_from(["ok", "crashed"]))
    def late_result(self, data: st.DataObject, status: str) -> None:
        """A worker presumed dead comes back (new session) and reports an old attempt."""
        d = self.orphans.pop(data.draw(st.integers(0, len(self.orphans) - 1)))
        worker = data.draw(st.sampled_from(WORKERS))
        if worker not in self.alive:
            return
        self.report(worker, Result(d.task, d.attempt, status, credit=1))

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
        # quiescent: every event dispatched all it could and sent every RECLAIM it should
        assert self.s._dispatch() == []
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


class StealMachine(RuleBasedStateMachine):
    """Nodes modelled as they run: FIFO, the oldest ``slots`` held tasks started.

    Beyond the scheduler's invariants: no node ever idles while another holds
    an unstarted task and no RECLAIM is out to it (the starvation is bounded by
    one RECLAIM's round trip), and each task runs to one result.
    """

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(Limits(liveness_timeout=1e9))
        self.s.add_client(A, 0)
        self.held: dict[bytes, list[Dispatch]] = {}  # arrival order: held[:slots] run
        self.slots: dict[bytes, int] = {}
        self.reclaimed: dict[bytes, set[tuple[bytes, int]]] = {}
        self.results: Counter[bytes] = Counter()
        self.submitted = 0

    def apply(self, outs: list[Out]) -> None:
        for dest, message in outs:
            if isinstance(message, Dispatch):
                self.held[dest].append(message)
                assert len(self.held[dest]) <= self.slots[dest] + 2, "past slots + prefetch"
            elif isinstance(message, Reclaim):
                assert not self.reclaimed[dest], "a second RECLAIM before the first's answer"
                self.reclaimed[dest] = set(zip(message.tasks, message.attempts, strict=True))
            elif isinstance(message, Result):
                assert message.status == "ok", message
                self.results[message.task] += 1

    @rule(worker=st.sampled_from(WORKERS), slots=st.integers(1, 2))
    def node_joins(self, worker: bytes, slots: int) -> None:
        if worker in self.held:
            return
        self.held[worker], self.slots[worker], self.reclaimed[worker] = [], slots, set()
        self.apply(self.s.add_worker(worker, 0, capacity=slots + 2, slots=slots))

    @rule(n=st.integers(1, 4))
    def submit(self, n: int) -> None:
        for _ in range(n):
            self.submitted += 1
            self.apply(self.s.submit(A, b"%d" % self.submitted, (), 0)[1])

    @rule(data=st.data())
    def node_finishes(self, data: st.DataObject) -> None:
        busy = [w for w, held in self.held.items() if held]
        if not busy:
            return
        worker = data.draw(st.sampled_from(busy))
        started = self.held[worker][: self.slots[worker]]
        d = started[data.draw(st.integers(0, len(started) - 1))]
        self.held[worker].remove(d)
        self.reclaimed[worker].discard((d.task, d.attempt))
        self.apply(self.s.result(worker, Result(d.task, d.attempt, "ok", credit=1), 0))

    @precondition(lambda self: any(self.reclaimed.values()))
    @rule(data=st.data())
    def node_answers_reclaim(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from([w for w, r in self.reclaimed.items() if r]))
        named, held = self.reclaimed[worker], self.held[worker]
        back = [d for d in reversed(held[self.slots[worker] :]) if (d.task, d.attempt) in named]
        for d in back:
            held.remove(d)
            named.discard((d.task, d.attempt))
            self.apply(self.s.result(worker, Result(d.task, d.attempt, "returned", credit=1), 0))
        if named:
            named.clear()
            self.apply(self.s.credit(worker, 0))

    @invariant()
    def no_slot_idles_while_an_unstarted_task_waits_unclaimed(self) -> None:
        self.s.check_invariants()
        assert self.s._dispatch() == []
        # slots idle beyond what the RECLAIMs out will fill: each holder of an unstarted
        # task has one out (one at a time: its answer brings the next)
        idle = sum(max(0, self.slots[w] - len(held)) for w, held in self.held.items())
        if idle > sum(map(len, self.reclaimed.values())):
            for worker, held in self.held.items():
                if len(held) > self.slots[worker]:
                    assert self.reclaimed[worker], "an unstarted task waits while a slot idles"

    @invariant()
    def each_task_has_at_most_one_result(self) -> None:
        assert all(n == 1 for n in self.results.values())


StealMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_steal_state_machine = StealMachine.TestCase
