"""fabric.local.Pool: the multiprocessing.Pool API, and what mp.Pool gets wrong."""

from __future__ import annotations

import enum
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fabric.local import Context, ExceptionProxy, Pool, RemoteTraceback
from tests.local import _pool_helpers as h

POOLS: dict[str, Callable[..., Any]] = {
    "fabric": Pool,
    "multiprocessing": multiprocessing.get_context("fork").Pool,
}


@pytest.fixture
def gate() -> Iterator[h.Gate]:
    g = h.Gate()
    yield g
    g.close()


@pytest.fixture(params=sorted(POOLS))
def any_pool(request: pytest.FixtureRequest, gate: h.Gate) -> Iterator[Any]:
    """The same test body against fabric.local.Pool and multiprocessing.Pool.

    Takes ``gate`` first so the workers, forked after it, inherit its pipe.
    """
    with POOLS[request.param](2) as pool:
        yield pool
        pool.close()
        pool.join()


@pytest.fixture
def pool(gate: h.Gate) -> Iterator[Pool]:
    with Pool(2) as p:
        yield p


class Kind(enum.IntEnum):
    A = 1
    B = 2


# -- parity with multiprocessing.Pool ---------------------------------------------


def test_apply_and_maps_match(any_pool: Any) -> None:
    assert any_pool.apply(h.square, (7,)) == 49
    assert any_pool.apply(h.add, (1,), {"b": 2}) == 3
    assert any_pool.map(h.square, range(50)) == [x * x for x in range(50)]
    assert any_pool.map(h.square, range(50), 7) == [x * x for x in range(50)]
    assert any_pool.map(h.square, []) == []
    assert any_pool.starmap(h.add, [(1, 2), (3, 4)]) == [3, 7]
    assert list(any_pool.imap(h.square, range(30), 4)) == [x * x for x in range(30)]
    assert sorted(any_pool.imap_unordered(h.square, range(30))) == [x * x for x in range(30)]
    assert any_pool.map_async(h.square, range(5)).get(timeout=30) == [0, 1, 4, 9, 16]
    assert any_pool.starmap_async(h.add, [(1, 1)]).get(timeout=30) == [2]


def test_async_result_states(any_pool: Any, gate: h.Gate) -> None:
    result = any_pool.apply_async(h.pass_gate, (gate.read_fd,))
    assert not result.ready()
    with pytest.raises(ValueError):
        result.successful()
    result.wait(0.01)
    assert not result.ready()
    gate.open(1)
    assert result.get(timeout=30) == "passed"
    assert result.ready() and result.successful()
    failed = any_pool.apply_async(h.fail, ("boom",))
    failed.wait(30)
    assert failed.ready() and not failed.successful()
    with pytest.raises(ValueError, match="boom"):
        failed.get()


def test_callbacks_run_before_get_returns(any_pool: Any) -> None:
    seen: list[object] = []
    assert any_pool.apply_async(h.square, (3,), callback=seen.append).get(30) == 9
    with pytest.raises(ValueError):
        any_pool.apply_async(h.fail, ("x",), error_callback=seen.append).get(30)
    assert any_pool.map_async(h.square, [1, 2], callback=seen.append).get(30) == [1, 4]
    assert seen[0] == 9 and isinstance(seen[1], ValueError) and seen[2] == [1, 4]


def test_map_raises_first_error(any_pool: Any) -> None:
    with pytest.raises(ValueError, match="bad item 3"):
        any_pool.map(h.fail_on_three, range(10), 1)


def test_closed_pool_refuses_work_and_join_needs_close(any_pool: Any) -> None:
    with pytest.raises(ValueError):
        any_pool.join()
    any_pool.close()
    with pytest.raises(ValueError):
        any_pool.apply_async(h.square, (1,))
    any_pool.join()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Pool(0)
    with pytest.raises(TypeError):
        Pool(1, initializer=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Pool(1, maxtasksperchild=0)


# -- what fabric adds --------------------------------------------------------------


def test_get_timeout_raises_timeout_error(pool: Pool, gate: h.Gate) -> None:
    result = pool.apply_async(h.pass_gate, (gate.read_fd,))
    with pytest.raises(TimeoutError):
        result.get(timeout=0.05)
    gate.open(1)
    assert result.get(30) == "passed"


def test_lambdas_and_closures_travel(pool: Pool) -> None:
    offset = 10
    assert pool.apply(lambda: offset + 1) == 11
    assert pool.map(lambda x: x + offset, [1, 2]) == [11, 12]
    assert list(pool.imap_unordered(lambda x: -x, [5])) == [-5]


def test_map_takes_its_input_when_called(pool: Pool, gate: h.Gate) -> None:
    # A list is not copied but cut into chunks before map_async returns: changing
    # it afterwards, while the workers are busy, changes nothing.
    busy = [pool.apply_async(h.pass_gate, (gate.read_fd,)) for _ in range(2)]
    items = list(range(1000))
    result = pool.map_async(h.square, items)
    items[:] = [-1] * 5
    gate.open(2)
    assert result.get(30) == [x * x for x in range(1000)]
    assert [b.get(30) for b in busy] == ["passed", "passed"]


def test_exception_carries_worker_traceback(pool: Pool) -> None:
    with pytest.raises(ValueError, match="boom") as info:
        pool.apply(h.fail, ("boom",))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fail" in cause.tb and "ValueError: boom" in cause.tb


def test_exception_that_does_not_unpickle_arrives_as_proxy(pool: Pool) -> None:
    with pytest.raises(ExceptionProxy) as info:
        pool.apply(h.raise_two_arg_error)
    assert info.value.type_name.endswith("TwoArgError")
    assert "1 and 2" in info.value.message
    assert "raise_two_arg_error" in info.value.traceback


def test_exception_that_does_not_pickle_arrives_as_proxy(pool: Pool) -> None:
    with pytest.raises(ExceptionProxy, match="LockError: holds a lock"):
        pool.apply(h.raise_lock_error)


def test_values_keep_their_exact_type_both_ways(pool: Pool) -> None:
    # Plain values skip their own pickle; anything else (an int subclass too) keeps it.
    values = [0, 1.5, "é\ud800", b"\x00", True, None, Kind.B, (1, "a"), [2], {"k": 3}]
    results = [pool.apply_async(h.identity, (v,)) for v in values]
    got = [r.get(30) for r in results]
    assert got == values
    assert [type(v) for v in got] == [type(v) for v in values]
    assert pool.apply(h.identity, (), {"value": Kind.A}) is Kind.A


def test_unpicklable_result_and_argument_fail_only_their_task(pool: Pool) -> None:
    with pytest.raises(TypeError, match="pickle"):
        pool.apply(h.return_lock)
    bad = pool.apply_async(h.square, (threading.Lock(),))
    good = pool.apply_async(h.square, (4,))
    with pytest.raises(TypeError, match="pickle"):
        bad.get(30)
    assert good.get(30) == 16


def test_initializer_runs_in_each_worker() -> None:
    with Pool(2, initializer=h.set_tag, initargs=("ready",)) as pool:
        assert set(pool.map(h.get_tag, range(20), 1)) == {"ready"}


def test_failing_initializer_breaks_the_pool_without_hanging() -> None:
    from concurrent.futures import BrokenExecutor

    with Pool(1, initializer=h.fail, initargs=("init boom",)) as pool:
        # Raised by apply_async once the pool knows it is broken, by get() before.
        with pytest.raises(BrokenExecutor, match="initializer") as info:
            pool.apply_async(h.square, (2,)).get(30)
        assert isinstance(info.value.__cause__, ValueError)
        with pytest.raises(BrokenExecutor):
            pool.apply(h.square, (2,))


def test_maxtasksperchild_replaces_workers() -> None:
    with Pool(2, maxtasksperchild=2) as pool:
        pids = [pool.apply_async(os.getpid).get(30) for _ in range(10)]
        assert max(pids.count(pid) for pid in set(pids)) <= 2
        assert len(set(pids)) >= 5
        assert pool.map(h.square, range(40)) == [x * x for x in range(40)]


def test_imap_reads_input_lazily(pool: Pool) -> None:
    pulled = []

    def source() -> Iterator[int]:
        for i in range(1_000_000):
            pulled.append(i)
            yield i

    results = pool.imap(h.square, source())
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    # The window (at most 16384 items per worker, and two chunks of at most 4096), not the million.
    assert len(pulled) < 2 * 16384 + 4096
    pool.terminate()


def test_imap_error_in_place_then_continues(pool: Pool) -> None:
    results = pool.imap(h.fail_on_three, range(6), 1)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(results)
    assert list(results) == [4, 5]


def test_imap_next_timeout(pool: Pool, gate: h.Gate) -> None:
    results = pool.imap(h.pass_gate, [gate.read_fd])
    with pytest.raises(TimeoutError):
        results.next(timeout=0.05)
    gate.open(1)
    assert results.next(timeout=30) == "passed"


def test_terminate_fails_unfinished_results(gate: h.Gate) -> None:
    from fabric.local.pool import TerminatedError

    pool = Pool(1)
    running = pool.apply_async(h.pass_gate, (gate.read_fd,))
    queued = pool.apply_async(h.square, (2,))
    pool.terminate()
    for result in (running, queued):
        with pytest.raises(TerminatedError):
            result.get(30)
    pool.join()
    assert pool.statistics().workers == 0


def test_close_finishes_queued_work() -> None:
    pool = Pool(2)
    results = [pool.apply_async(h.square, (i,)) for i in range(100)]
    pool.close()
    pool.join(30)
    assert [r.get(0) for r in results] == [i * i for i in range(100)]


def test_every_start_method_through_its_context(ctx: Context) -> None:
    offset = 10
    h.set_marker("changed in the parent")  # a forked worker sees it, a fresh one does not
    try:
        with ctx.Pool(2) as pool:
            assert pool.map(lambda x: x + offset, range(4)) == [10, 11, 12, 13]
            assert list(pool.imap_unordered(lambda x: -x, [5])) == [-5]
            ppid, marker = pool.apply(lambda: (os.getppid(), h.get_marker()))
    finally:
        h.set_marker(h.DEFAULT_MARKER)
    method = ctx.get_start_method()
    assert (ppid == os.getpid()) == (method != "forkserver")  # the fork server's child
    assert (marker == "changed in the parent") == (method == "fork")


def test_spawn_start_method() -> None:
    with Pool(1, context="spawn") as pool:
        assert pool.map(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]
        assert pool.apply(os.getppid) == os.getpid()


def test_statistics_counts(pool: Pool) -> None:
    pool.map(h.square, range(10), 1)
    stats = pool.statistics()
    assert stats.workers == 2 and stats.done == 10 and stats.failed == 0 and stats.pending == 0


def test_progress_bar_only_when_forced_off_a_terminal(
    pool: Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    assert pool.map(h.square, range(8), progress=True) == [x * x for x in range(8)]
    assert "8/8" not in capsys.readouterr().err
    assert pool.map(h.square, range(8), progress="force") == [x * x for x in range(8)]
    assert "8/8" in capsys.readouterr().err
    # the bar leaves no thread behind (tqdm's monitor would make every later fork warn)
    assert not [t for t in threading.enumerate() if "tqdm" in t.name]
    with pytest.raises(ValueError):
        pool.map(h.square, range(8), progress="sometimes")  # type: ignore[arg-type]


def test_result_that_does_not_unpickle_fails_only_its_task(pool: Pool) -> None:
    with pytest.raises(ExceptionProxy, match="could not be unpickled"):
        pool.apply(h.return_bad_reduce)
    assert pool.apply(h.square, (5,)) == 25


def test_join_timeout_while_a_task_runs(gate: h.Gate) -> None:
    pool = Pool(1)
    result = pool.apply_async(h.enter_gate, (gate.started_w, gate.read_fd))
    gate.wait_started(1)
    pool.close()
    with pytest.raises(TimeoutError):
        pool.join(0.05)
    gate.open(1)
    pool.join(30)
    assert result.get(0) == "passed"


def test_unclosed_pool_warns_when_collected() -> None:
    import gc

    pool = Pool(1)
    engine = pool._engine
    with pytest.warns(ResourceWarning, match="unclosed running pool"):
        del pool
        gc.collect()
    assert engine.join(30)


def test_imap_progress_bar_forced(pool: Pool, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    assert list(pool.imap(h.square, range(6), progress="force")) == [x * x for x in range(6)]
    assert "6/6" in capsys.readouterr().err


def test_workers_that_cannot_start_break_the_pool() -> None:
    from concurrent.futures import BrokenExecutor

    with (
        Pool(1, initializer=os._exit, initargs=(3,)) as pool,
        pytest.raises(BrokenExecutor, match=r"died before they were ready.*code 3"),
    ):
        pool.apply(h.square, (2,))


def test_imap_results_all_arrive_after_close() -> None:
    pool = Pool(2)
    results = pool.imap(h.square, range(5000))
    assert next(results) == 0
    pool.close()
    assert list(results) == [x * x for x in range(1, 5000)]
    pool.join(30)


def test_imap_after_terminate_raises_instead_of_truncating() -> None:
    from fabric.local.pool import TerminatedError

    pool = Pool(2)
    results = pool.imap(h.square, range(100_000))
    assert next(results) == 0
    pool.terminate()
    with pytest.raises(TerminatedError):
        for _ in results:
            pass


def test_imap_input_error_raised_in_place(pool: Pool) -> None:
    def source() -> Iterator[int]:
        yield from range(3)
        raise OSError("input broke")

    results = pool.imap(h.square, source(), 1)
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(OSError, match="input broke"):
        next(results)
    assert list(results) == []


def test_large_arguments_and_results_cross_both_ways(pool: Pool) -> None:
    blob = os.urandom(8 << 20)
    results = [pool.apply_async(bytes.upper, (blob,)) for _ in range(3)]
    assert all(r.get(60) == blob.upper() for r in results)


def test_multiprocessing_context_object_picks_the_start_method() -> None:
    with Pool(1, context=multiprocessing.get_context("spawn")) as pool:
        assert pool.apply(os.getppid) == os.getpid()
    with pytest.raises(ValueError, match="vfork"):
        Pool(1, context="vfork")


def test_a_forked_child_cannot_use_or_stop_the_parents_pool(pool: Pool) -> None:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports what it saw through the pipe, then leaves
        code = 1
        try:
            try:
                pool.apply_async(h.square, (2,))
            except RuntimeError as exc:
                os.write(write_fd, str(exc).encode())
            pool.terminate()  # returns at once: nothing of the parent's is touched
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    message = os.read(read_fd, 1000).decode()
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "forked" in message
    assert pool.apply(h.square, (3,)) == 9
