"""Workers that die mid-task, and Ctrl-C: the caller never hangs, nothing is left behind."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fabric.errors import WorkerLostError
from fabric.local import Executor, Pool
from tests.local import _pool_helpers as h

CRASHES = {
    "sigkill": "killed by SIGKILL",
    "segfault": "killed by SIGSEGV",
    "exit": "exited with code 7",
}


@pytest.mark.parametrize("how", sorted(CRASHES))
def test_crashed_task_is_retried_once_and_succeeds(how: str, tmp_path: Path) -> None:
    with Pool(2) as pool:
        assert pool.apply(h.die_once, (str(tmp_path / "marker"), how)) == "second try"
        stats = pool.statistics()
        assert (stats.retries, stats.workers_lost, stats.workers) == (1, 1, 2)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize("how", sorted(CRASHES))
def test_task_that_always_crashes_fails_naming_task_pid_and_cause(how: str, method: str) -> None:
    with Pool(2, context=method) as pool:
        result = pool.apply_async(h.die, (how,))
        with pytest.raises(WorkerLostError) as info:
            result.get(30)
        error = info.value
        assert CRASHES[how] in str(error)
        assert "(die)" in str(error) and f"pid {error.pid}" in str(error)
        assert error.attempts == 2
        assert error.exitcode == (
            7 if how == "exit" else -int(signal.SIGKILL if how == "sigkill" else signal.SIGSEGV)
        )
        assert pool.apply(h.square, (3,)) == 9  # the pool goes on


def test_retries_zero_fails_at_once() -> None:
    with Pool(1, retries=0) as pool:
        with pytest.raises(WorkerLostError) as info:
            pool.apply(h.die, ("sigkill",))
        assert info.value.attempts == 1
        assert pool.statistics().retries == 0


def test_only_the_crashing_task_is_affected() -> None:
    with Pool(2) as pool:
        before = [pool.apply_async(h.square, (i,)) for i in range(50)]
        crash = pool.apply_async(h.die, ("sigkill",))
        after = [pool.apply_async(h.square, (i,)) for i in range(50)]
        assert [r.get(30) for r in before + after] == [i * i for i in range(50)] * 2
        with pytest.raises(WorkerLostError):
            crash.get(30)


def test_crash_inside_a_map_chunk_names_the_items() -> None:
    with Pool(2) as pool, pytest.raises(WorkerLostError, match=r"over items 2\.\.3"):
        pool.map(h.exit_on_three, range(6), 2)


def test_executor_survives_a_crash_unlike_process_pool_executor() -> None:
    with Executor(2) as executor:
        crash = executor.submit(h.die, "segfault")
        others = [executor.submit(h.square, i) for i in range(20)]
        with pytest.raises(WorkerLostError, match="SIGSEGV"):
            crash.result(30)
        assert [f.result(30) for f in others] == [i * i for i in range(20)]
        assert executor.submit(h.square, 5).result(30) == 25


SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from fabric.local import Executor, Pool

    def hold(_):
        os.write(1, b"%d\\n" % os.getpid())  # one write: lines from two workers never mix
        time.sleep(120)  # the long task Ctrl-C must interrupt

    if __name__ == "__main__":
        os.write(1, b"%d\\n" % os.getpid())
        if sys.argv[1] == "pool":
            with Pool(2, context=sys.argv[2]) as pool:
                pool.map(hold, range(4), 1)
        else:
            with Executor(2, mp_context=sys.argv[2]) as executor:
                list(executor.map(hold, range(4)))
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize("api", ["pool", "executor"])
def test_ctrl_c_stops_workers_and_raises_keyboard_interrupt(
    api: str, method: str, tmp_path: Path
) -> None:
    script = tmp_path / "ctrl_c.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, str(script), api, method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        parent = int(proc.stdout.readline())
        workers = {int(proc.stdout.readline()) for _ in range(2)}  # both tasks are running
        assert parent == proc.pid and parent not in workers
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert not [pid for pid in workers if _alive(pid)]


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_worker_crash_is_retried_under_other_start_methods(method: str, tmp_path: Path) -> None:
    with Pool(1, context=method) as pool:
        assert pool.apply(h.die_once, (str(tmp_path / "marker"), "exit")) == "second try"
        assert pool.statistics().workers_lost == 1


def test_imap_unordered_survives_a_crash(tmp_path: Path) -> None:
    with Pool(2) as pool:
        marker = str(tmp_path / "marker")
        crash_once = functools.partial(h.die_once, how="exit")
        results = list(pool.imap_unordered(crash_once, [marker] * 6, 1))
        assert results == ["second try"] * 6


def test_idle_worker_killed_from_outside_is_replaced() -> None:
    with Pool(1) as pool:
        pid = pool.apply(os.getpid)
        os.kill(pid, signal.SIGKILL)
        assert pool.apply(os.getpid) != pid  # waits for the replacement, never hangs
        stats = pool.statistics()
        assert (stats.workers, stats.workers_lost, stats.failed) == (1, 1, 0)


def test_retries_is_configurable() -> None:
    with Pool(1, retries=2) as pool, pytest.raises(WorkerLostError) as info:
        pool.apply(h.die, ("exit",))
    assert info.value.attempts == 3
    assert "retries=2" in str(info.value)


def test_random_kills_lose_no_task_and_duplicate_no_result() -> None:
    rng = random.Random(1234)
    kill_at = set(rng.sample(range(50, 1500), 6))
    with Pool(2, retries=10) as pool:
        seen: dict[int, int] = {}
        for n, (value, pid) in enumerate(pool.imap_unordered(h.square_and_pid, range(2000), 1)):
            seen[value] = seen.get(value, 0) + 1
            if n in kill_at:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert seen == {x * x: 1 for x in range(2000)}
        assert pool.statistics().workers_lost >= 1
