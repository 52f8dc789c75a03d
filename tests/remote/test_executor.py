"""The cluster executor: a real concurrent.futures.Executor over worker node processes."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from fabric.errors import WorkerLostError
from fabric.remote import Executor, Manager, RemoteTraceback
from tests.remote.conftest import HEARTBEAT, LIVENESS, Cluster, start_broker

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def fails(x: int) -> None:
    raise KeyError(f"no {x}")


def wait_for(event: Any) -> str:
    assert event.wait(60)
    return "released"


def chatty(x: int) -> int:
    print(f"out {x}")
    print(f"err {x}", file=sys.stderr)
    return x


def test_submit_map_and_as_completed(cluster: Cluster) -> None:
    cluster.node(processes=2)
    with cluster.manager().Executor() as ex:
        assert isinstance(ex, cf.Executor)
        futures = [ex.submit(pow, 2, i) for i in range(8)]
        assert all(isinstance(f, cf.Future) for f in futures)
        assert sorted(f.result() for f in cf.as_completed(futures, timeout=60)) == [
            2**i for i in range(8)
        ]
        done, not_done = cf.wait(futures, timeout=60)
        assert len(done) == 8 and not not_done
        assert list(ex.map(abs, range(-20, 0), timeout=60)) == list(range(20, 0, -1))
        assert list(ex.map(pow, range(30), [2] * 30, chunksize=7)) == [i**2 for i in range(30)]
        assert ex.submit(lambda x=3: x * 2).result(60) == 6


def test_exceptions_carry_the_remote_traceback(cluster: Cluster) -> None:
    cluster.node()
    ex = cluster.manager().Executor()
    with pytest.raises(KeyError, match="no 7") as caught:
        ex.submit(fails, 7).result(timeout=60)
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fails" in str(cause) and "Traceback (most recent call last)" in str(cause)
    with pytest.raises(KeyError):
        list(ex.map(fails, [1], timeout=60))


def test_output_is_forwarded_only_when_asked(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.node()
    mgr = cluster.manager()
    assert mgr.Executor().submit(chatty, 1).result(60) == 1
    assert "out 1" not in capsys.readouterr().out
    assert mgr.Executor(forward_output=True).submit(chatty, 2).result(60) == 2
    captured = capsys.readouterr()
    assert "out 2" in captured.out and "err 2" in captured.err


def one_task_running_on_a_gate(cluster: Cluster) -> tuple[Manager, Any, Executor, cf.Future[str]]:
    """A one-process node and its manager; an executor's task there waits on the gate."""
    cluster.node(processes=1)
    mgr = cluster.manager()
    gate = mgr.Event()
    ex = mgr.Executor()
    return mgr, gate, ex, ex.submit(wait_for, gate)


def test_shutdown_cancels_pending_futures(cluster: Cluster) -> None:
    mgr, _, ex, running = one_task_running_on_a_gate(cluster)
    queued = [ex.submit(abs, -i) for i in range(3)]
    ex.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(abs, 1)
    assert all(f.cancelled() for f in queued)
    assert running.cancelled()  # a running task is stopped on its node too
    done, _ = cf.wait([running, *queued], timeout=10)
    assert len(done) == 4
    # the node is free again: its task process was replaced
    assert mgr.Executor().submit(abs, -5).result(timeout=60) == 5


def test_a_cancelled_future_leaves_the_outstanding_ones(cluster: Cluster) -> None:
    _, gate, ex, running = one_task_running_on_a_gate(cluster)
    queued = ex.submit(abs, -1)
    assert set(ex.outstanding()) == {running, queued}
    assert queued.cancel() and queued.cancel()  # the second one changes nothing
    assert ex.outstanding() == [running]
    assert cf.wait([queued], timeout=0).done == {queued}  # notified: wait() sees it
    gate.set()
    assert running.result(timeout=60) == "released"
    assert not running.cancel()


def test_map_timeout_raises(cluster: Cluster) -> None:
    cluster.node(processes=1)
    mgr = cluster.manager()
    gate = mgr.Event()
    ex = mgr.Executor()
    with pytest.raises(TimeoutError):
        list(ex.map(wait_for, [gate], timeout=0.2))
    gate.set()
    ex.shutdown(wait=True)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_task_that_kills_its_process_is_reported_not_retried_forever(cluster: Cluster) -> None:
    cluster.node(processes=1)
    mgr = cluster.manager()
    with pytest.raises(WorkerLostError, match="SIGKILL"):
        mgr.Executor().submit(die).result(timeout=120)
    process = mgr.Process(target=die)
    process.start()
    process.join(120)
    assert process.exitcode == -signal.SIGKILL
    assert mgr.Executor().submit(abs, -4).result(timeout=60) == 4  # the node still serves


def test_map_shows_a_progress_bar_when_asked(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    cluster.node(processes=2)
    mgr = cluster.manager()
    assert list(mgr.Executor().map(abs, range(-10, 0), progress="force", chunksize=3)) == list(
        range(10, 0, -1)
    )
    assert "10/10" in capsys.readouterr().err
    assert mgr.Pool().map(abs, range(-6, 0), progress="force") == list(range(6, 0, -1))
    assert "6/6" in capsys.readouterr().err
    assert not [t for t in threading.enumerate() if "tqdm" in t.name]  # no monitor thread left
    list(mgr.Executor().map(abs, range(3)))
    assert capsys.readouterr().err == ""  # off by default
    with pytest.raises(ValueError, match="progress must be"):
        mgr.Executor().map(abs, range(3), progress="yes")  # type: ignore[arg-type]


def test_a_busy_broker_pushes_back_and_every_task_still_runs(keydir: Path) -> None:
    from fabric.broker.scheduler import Limits

    limits = Limits(max_tasks=2, liveness_timeout=HEARTBEAT * LIVENESS)
    busy = Cluster(keydir, start_broker(keydir, limits=limits))
    try:
        busy.node(processes=1)
        ex = busy.manager().Executor()
        futures = [ex.submit(abs, -i) for i in range(12)]  # 10 of them are refused at first
        assert [f.result(timeout=60) for f in futures] == list(range(12))
        assert busy.broker.statistics().tasks.rejected_busy > 0
    finally:
        busy.close()


def test_results_reach_waiting_threads_and_callbacks_alike(cluster: Cluster) -> None:
    # callers blocked in result() receive for themselves; results nobody blocks on (a
    # submit right after a result(), awaited through cf.wait) still come through
    cluster.node(processes=2)
    with cluster.manager().Executor() as ex:
        assert ex.submit(pow, 2, 3).result(timeout=60) == 8
        later = ex.submit(pow, 2, 4)
        done, _ = cf.wait([later], timeout=60)
        assert done == {later} and later.result(timeout=0) == 16
        assert ex.submit(abs, -1).exception(timeout=60) is None
        results: list[int] = []

        def wait_for(i: int) -> None:
            results.append(ex.submit(pow, 2, i).result(timeout=60))

        threads = [threading.Thread(target=wait_for, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert sorted(results) == [2**i for i in range(6)]


def test_polling_result_arms_the_receiver_poke_once(cluster: Cluster) -> None:
    # while the main thread waits on one result (after a round trip, so it receives for
    # itself and the I/O thread leaves task results to callers), another thread polls
    # result(timeout=small) on a second task, taking the receiver role at each poll: the
    # done-callback that pokes the receiver is added once per future, not once per poll
    cluster.node(processes=2)
    mgr = cluster.manager()
    gate = mgr.Event()
    ex = mgr.Executor()
    assert ex.submit(abs, -1).result(timeout=60) == 1
    future, other = ex.submit(wait_for, gate), ex.submit(wait_for, gate)
    timeouts: list[int] = []

    def poll_then_open() -> None:
        try:
            for _ in range(30):
                try:
                    future.result(timeout=0.01)
                except TimeoutError:
                    timeouts.append(1)
        finally:
            gate.set()

    poller = threading.Thread(target=poll_then_open)
    poller.start()
    assert other.result(timeout=60) == "released"
    poller.join(60)
    assert len(timeouts) == 30 and future.result(timeout=60) == "released"
    conn = mgr._conn
    assert conn is not None
    callbacks = future._done_callbacks  # type: ignore[attr-defined]
    assert len([cb for cb in callbacks if cb == conn.poke_receiver]) <= 1


def test_submits_gathered_while_many_tasks_wait_reach_the_broker_with_no_result_coming(
    cluster: Cluster,
) -> None:
    # past COALESCE_AFTER tasks awaiting results, a submit joins the outbox for the I/O
    # thread to send with others; with every task blocked, no result wakes that thread,
    # and still every submit reaches the broker
    from fabric.remote._client_io import COALESCE_AFTER

    cluster.node(processes=1)
    mgr = cluster.manager()
    gate = mgr.Event()
    ex = mgr.Executor()
    futures = [ex.submit(wait_for, gate) for _ in range(COALESCE_AFTER + 4)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tasks = cluster.broker.statistics().tasks
        if tasks.queued + tasks.in_flight == len(futures):
            break
        time.sleep(0.02)  # polling the broker's view, not synchronising the test
    assert tasks.queued + tasks.in_flight == len(futures)
    gate.set()
    assert [f.result(timeout=60) for f in futures] == ["released"] * len(futures)


def test_a_caller_awaiting_one_of_many_results_receives_them_itself(cluster: Cluster) -> None:
    # with many tasks in flight, a caller blocked in result() takes the receiver role from
    # the I/O thread: results then wake the caller (it runs their callbacks) and no one else
    cluster.node(processes=2)
    with cluster.manager().Executor() as ex:
        threads: list[str] = []
        futures = [ex.submit(abs, -i) for i in range(200)]
        for future in futures:
            future.add_done_callback(lambda f: threads.append(threading.current_thread().name))
        assert futures[-1].result(timeout=60) == 199
        assert [f.result(timeout=60) for f in futures] == list(range(200))
        assert threading.current_thread().name in threads
