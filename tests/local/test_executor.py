"""fabric.local.Executor: a concurrent.futures.Executor, in parity with ProcessPoolExecutor."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import (
    BrokenExecutor,
    CancelledError,
    Future,
    ProcessPoolExecutor,
    as_completed,
    wait,
)
from pathlib import Path
from typing import Any

import pytest

from fabric.local import Context, Executor, RemoteTraceback
from tests.local import _pool_helpers as h

EXECUTORS: dict[str, Callable[..., Any]] = {
    "fabric": Executor,
    "concurrent.futures": lambda n: ProcessPoolExecutor(n, multiprocessing.get_context("fork")),
}


@pytest.fixture
def gate() -> Iterator[h.Gate]:
    g = h.Gate()
    yield g
    g.close()


@pytest.fixture(params=sorted(EXECUTORS))
def any_executor(request: pytest.FixtureRequest, gate: h.Gate) -> Iterator[Any]:
    """The same body against fabric.local.Executor and ProcessPoolExecutor."""
    with EXECUTORS[request.param](2) as executor:
        yield executor


@pytest.fixture
def executor(gate: h.Gate) -> Iterator[Executor]:
    with Executor(2) as ex:
        yield ex


def test_submit_map_and_real_futures(any_executor: Any) -> None:
    future = any_executor.submit(h.add, 1, b=2)
    assert isinstance(future, Future) and future.result(30) == 3
    assert list(any_executor.map(h.square, range(10))) == [x * x for x in range(10)]
    assert list(any_executor.map(h.add, range(5), range(5), chunksize=2)) == [0, 2, 4, 6, 8]
    futures = [any_executor.submit(h.square, i) for i in range(10)]
    assert sorted(f.result() for f in as_completed(futures, timeout=30)) == [
        i * i for i in range(10)
    ]
    done, _ = wait(futures, timeout=30)
    assert len(done) == 10


def test_exception_reaches_future_with_traceback(any_executor: Any) -> None:
    future = any_executor.submit(h.fail, "boom")
    with pytest.raises(ValueError, match="boom") as info:
        future.result(30)
    assert "in fail" in str(info.value.__cause__)
    assert isinstance(future.exception(), ValueError)


def test_map_raises_in_order_and_checks_chunksize(any_executor: Any) -> None:
    results = any_executor.map(h.fail_on_three, range(6))
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(results)
    with pytest.raises(ValueError):
        any_executor.map(h.square, range(3), chunksize=0)


def test_map_timeout(any_executor: Any, gate: h.Gate) -> None:
    results = any_executor.map(h.pass_gate, [gate.read_fd], timeout=0.05)
    with pytest.raises(TimeoutError):
        next(results)
    gate.open(1)


def test_submit_after_shutdown_raises(any_executor: Any) -> None:
    any_executor.shutdown()
    with pytest.raises(RuntimeError):
        any_executor.submit(h.square, 2)


def test_shutdown_cancel_futures(any_executor: Any, gate: h.Gate) -> None:
    running = [any_executor.submit(h.enter_gate, gate.started_w, gate.read_fd) for _ in range(2)]
    gate.wait_started(2)
    queued = [any_executor.submit(h.square, i) for i in range(20)]
    any_executor.shutdown(wait=False, cancel_futures=True)
    gate.open(2)
    assert [f.result(30) for f in running] == ["passed", "passed"]
    assert any(f.cancelled() for f in queued)
    for f in queued:
        if f.cancelled():
            with pytest.raises(CancelledError):
                f.result()
    any_executor.shutdown(wait=True)


def test_cancel_before_start(executor: Executor, gate: h.Gate) -> None:
    blockers = [executor.submit(h.pass_gate, gate.read_fd) for _ in range(2)]
    queued = [executor.submit(h.square, 3) for _ in range(50)]
    cancelled = [f for f in queued if f.cancel()]
    gate.open(2)
    assert all(f.result(30) == "passed" for f in blockers)
    assert all(f.cancelled() for f in cancelled)
    assert all(f.result(30) == 9 for f in queued if f not in cancelled)


def test_run_in_executor(executor: Executor) -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(
            *(loop.run_in_executor(executor, h.square, i) for i in range(5))
        )

    assert asyncio.run(main()) == [0, 1, 4, 9, 16]


def test_lambdas_and_cause(executor: Executor) -> None:
    base = 5
    assert executor.submit(lambda x: x + base, 1).result(30) == 6
    error = executor.submit(h.fail, "x").exception(30)
    assert isinstance(error, ValueError) and isinstance(error.__cause__, RemoteTraceback)


def test_initializer_and_failing_initializer() -> None:
    with Executor(1, initializer=h.set_tag, initargs=("on",)) as executor:
        assert executor.submit(h.get_tag, None).result(30) == "on"
    with (
        Executor(1, initializer=h.fail, initargs=("no",)) as executor,
        pytest.raises(BrokenExecutor),
    ):
        executor.submit(h.square, 1).result(30)


def test_max_tasks_per_child() -> None:
    with Executor(1, max_tasks_per_child=3) as executor:
        pids = [executor.submit(os.getpid).result(30) for _ in range(9)]
    assert len(set(pids)) == 3


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Executor(0)
    with pytest.raises(ValueError):
        Executor(1, max_tasks_per_child=0)


def test_every_start_method_through_its_context(ctx: Context) -> None:
    offset = 10
    with ctx.Executor(2) as executor:
        assert list(executor.map(lambda x: x * offset, range(3))) == [0, 10, 20]
        parent = executor.submit(lambda: (os.getppid(), offset)).result(60)
    assert parent == (os.getpid(), 10) or ctx.get_start_method() == "forkserver"


def test_spawn_context() -> None:
    with Executor(1, mp_context="spawn") as executor:
        assert executor.submit(lambda: os.getppid()).result(60) == os.getpid()


EXIT_SCRIPT = """
import os, time
from fabric.local import Executor

def write(path):
    time.sleep(0.5)  # still running when the interpreter starts to exit
    with open(path, "w") as f:
        f.write("done")

if __name__ == "__main__":
    executor = Executor(1)
    executor.submit(write, os.environ["TARGET"])
    executor.shutdown(wait=False)
"""


def test_work_queued_before_shutdown_wait_false_finishes_at_exit(tmp_path: Path) -> None:
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    target = tmp_path / "target"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), TARGET=str(target))
    subprocess.run([sys.executable, str(script)], env=env, timeout=60, check=True)
    assert target.read_text() == "done"
