"""Pool and Executor against multiprocessing, concurrent.futures, loky and mpire.

Four tables, every row measured in the same run with the same worker count,
each candidate once per round (a fresh pool each time), so a burst of load on
the shared machine hits every candidate alike instead of whichever ran during
it:

* per-task throughput on 20k no-op tasks, each task sent on its own
  (``submit``/``apply_async``, or ``imap_unordered`` with ``chunksize=1``),
  one timed run after a warm-up over a tenth of them;
* ``map`` throughput on 20k no-op tasks with each library's automatic chunks.
  Such a map takes a few ms, so each round warms the fresh pool up with one
  full-size map (the first one pays every process's heap growth and the
  copy-on-write of the input's pages shared with the just-forked workers: page
  faults worth several ms on a VM, alike for every library) and then takes the
  median of five timed maps, so one burst of load elsewhere cannot decide a round;
* efficiency on 200 tasks of ~10 ms of pure-Python work, two ways, both against
  the work's own CPU time, which each task measures around its loop
  (``time.thread_time``) and returns: wall-clock (that CPU time spread evenly
  over the workers, over the pool's wall time) and CPU (that CPU time over all
  the CPU the pool's processes spent, parent and workers); 100% is ideal. The
  ideal comes from the very run it is compared with, so a change of CPU speed
  between runs (common on a VM) moves both sides alike;
* start-up: constructor to the first result of a trivial task.

loky and mpire are optional (the ``bench`` extra); missing ones are skipped
and named in the table's note.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import importlib.util
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

from bench._harness import Stats, Table
from fabric.local import Executor, Pool
from fabric.local.pool import default_processes

N_NOOP = 20_000
MAP_RUNS = 5  # timed maps per pool and round (one takes a few ms)
N_CPU = 200
CPU_TASK_S = 0.010

_spins = 0  # loop count for ~CPU_TASK_S, calibrated once per run


def noop(x: Any) -> Any:
    return x


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def timed_spin(n: int) -> float:
    """Run ``spin(n)`` and return the CPU seconds it took in its own thread."""
    start = time.thread_time()
    spin(n)
    return time.thread_time() - start


def _calibrate() -> int:
    n = 10_000
    while True:
        took = timed_spin(n)  # CPU time, so a busy machine does not shrink the tasks
        if took > 0.05:
            return int(n * CPU_TASK_S / took)
        n *= 2


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# -- candidates: each maker returns (context manager, per-task, map, cpu-style runners) --


def _mp_pool(workers: int) -> Any:
    return multiprocessing.get_context("fork").Pool(workers)


def _ppe(workers: int) -> Any:
    return cf.ProcessPoolExecutor(workers, multiprocessing.get_context("fork"))


def _loky(workers: int) -> Any:
    import loky

    return loky.ProcessPoolExecutor(workers)


def _mpire(workers: int) -> Any:
    from mpire import WorkerPool

    return WorkerPool(n_jobs=workers, start_method="fork")


def _submit_all(executor: Any, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    futures = [executor.submit(fn, x) for x in items]
    return [future.result() for future in futures]


def _apply_all(pool: Any, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    results = [pool.apply_async(fn, (x,)) for x in items]
    return [result.get() for result in results]


def _drain(iterator: Iterable[Any]) -> list[Any]:
    return list(iterator)


# name -> (maker, runner(pool, fn, items) -> results in order or not)
Runner = Callable[[Any, Any, list[Any]], list[Any]]
PER_TASK: dict[str, tuple[Callable[[int], Any], Runner]] = {
    "fabric Executor.submit": (Executor, _submit_all),
    "fabric Pool.apply_async": (Pool, _apply_all),
    "fabric Pool.imap_unordered chunksize=1": (
        Pool,
        lambda p, f, xs: _drain(p.imap_unordered(f, xs, 1)),
    ),
    "mp.Pool.imap_unordered chunksize=1": (
        _mp_pool,
        lambda p, f, xs: _drain(p.imap_unordered(f, xs, 1)),
    ),
    "mp.Pool.apply_async": (_mp_pool, _apply_all),
    "ProcessPoolExecutor.submit": (_ppe, _submit_all),
    "loky submit": (_loky, _submit_all),
    "mpire apply_async": (_mpire, _apply_all),
}

MAPS: dict[str, tuple[Callable[[int], Any], Runner]] = {
    "fabric Pool.map (auto chunks)": (Pool, lambda p, f, xs: p.map(f, xs)),
    "fabric Pool.imap_unordered (auto chunks)": (
        Pool,
        lambda p, f, xs: _drain(p.imap_unordered(f, xs)),
    ),
    "fabric Executor.map chunksize=len/8": (
        Executor,
        lambda p, f, xs: _drain(p.map(f, xs, chunksize=max(1, len(xs) // 8))),
    ),
    "mp.Pool.map (auto chunks)": (_mp_pool, lambda p, f, xs: p.map(f, xs)),
    "ProcessPoolExecutor.map chunksize=len/8": (
        _ppe,
        lambda p, f, xs: _drain(p.map(f, xs, chunksize=max(1, len(xs) // 8))),
    ),
    "loky map chunksize=len/8": (
        _loky,
        lambda p, f, xs: _drain(p.map(f, xs, chunksize=max(1, len(xs) // 8))),
    ),
    "mpire map (auto chunks)": (_mpire, lambda p, f, xs: p.map(f, xs)),
}

CPU: dict[str, tuple[Callable[[int], Any], Runner]] = {
    "fabric Pool.map (auto chunks)": MAPS["fabric Pool.map (auto chunks)"],
    "fabric Pool.imap_unordered (auto chunks)": MAPS["fabric Pool.imap_unordered (auto chunks)"],
    "fabric Executor.submit": PER_TASK["fabric Executor.submit"],
    "mp.Pool.map (auto chunks)": MAPS["mp.Pool.map (auto chunks)"],
    "mp.Pool.imap_unordered chunksize=1": PER_TASK["mp.Pool.imap_unordered chunksize=1"],
    "ProcessPoolExecutor.submit": PER_TASK["ProcessPoolExecutor.submit"],
    "loky submit": PER_TASK["loky submit"],
    "mpire map (auto chunks)": MAPS["mpire map (auto chunks)"],
}

_OPTIONAL = {"loky": "loky", "mpire": "mpire"}


def _available(name: str) -> bool:
    return all(_have(mod) for key, mod in _OPTIONAL.items() if name.startswith(key))


def _shut(pool: Any) -> None:
    if hasattr(pool, "shutdown"):
        pool.shutdown(wait=True)
    elif hasattr(pool, "terminate"):
        pool.terminate()
        if hasattr(pool, "join"):
            pool.join()


def _interleaved(measures: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Measure every candidate once per round, ``repeats`` rounds."""
    values: dict[str, list[Any]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            values[name].append(measure())
    return values


def _rate(
    maker: Callable[[int], Any],
    runner: Runner,
    items: list[Any],
    workers: int,
    warm_up: int,
    runs: int,
) -> float:
    """Return tasks/s of ``runner`` over no-op tasks on a fresh pool.

    The pool first runs ``warm_up`` of the items (its workers started), then
    the median time of ``runs`` timed runs over all of them counts.
    """
    pool = maker(workers)
    try:
        runner(pool, noop, items[:warm_up])
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            runner(pool, noop, items)
            times.append(time.perf_counter() - start)
        return len(items) / statistics.median(times)
    finally:
        _shut(pool)


def _throughput_table(
    table: Table, candidates: dict[str, Any], workers: int, repeats: int, warm_up: int, runs: int
) -> None:
    items = list(range(N_NOOP))
    measures = {
        name: functools.partial(_rate, maker, runner, items, workers, warm_up, runs)
        for name, (maker, runner) in candidates.items()
        if _available(name)
    }
    for name, rates in _interleaved(measures, repeats).items():
        table.add(name, Stats(tuple(rates)))


def _startup(maker: Callable[[int], Any], workers: int) -> float:
    """Return the ms from the constructor to the first result of a trivial task."""
    start = time.perf_counter()
    pool = maker(workers)
    try:
        if hasattr(pool, "submit"):
            pool.submit(noop, 1).result()
        else:
            pool.apply_async(noop, (1,)).get()
        return (time.perf_counter() - start) * 1e3
    finally:
        _shut(pool)


def run(repeats: int) -> list[Table]:
    global _spins
    workers = min(2, default_processes())
    _spins = _calibrate()
    skipped = sorted({k for k in _OPTIONAL if not _have(_OPTIONAL[k])})
    note = f"{workers} workers; fork start method everywhere."
    if skipped:
        note += f" Not installed, skipped: {', '.join(skipped)}."

    per_task = Table(
        f"{N_NOOP // 1000}k no-op tasks, one task per message",
        "tasks/s",
        baseline="mp.Pool.imap_unordered chunksize=1",
        note=note,
    )
    _throughput_table(per_task, PER_TASK, workers, repeats, warm_up=N_NOOP // 10, runs=1)

    maps = Table(
        f"{N_NOOP // 1000}k no-op tasks, map with chunks",
        "tasks/s",
        baseline="mp.Pool.map (auto chunks)",
        note=note + f" Each round: a fresh pool, one full-size map to warm it up, then the "
        f"median of {MAP_RUNS} timed maps.",
    )
    _throughput_table(maps, MAPS, workers, repeats, warm_up=N_NOOP, runs=MAP_RUNS)

    wall = Table(
        f"{N_CPU} tasks of ~{CPU_TASK_S * 1e3:.0f} ms CPU each: wall-clock efficiency",
        "% of ideal",
        baseline="mp.Pool.map (auto chunks)",
        note=note + " Ideal: the CPU time the tasks measured in their own threads, spread "
        "evenly over the workers, against the pool's wall time from the call to the last "
        "result; another program taking a core lowers it.",
    )
    cpu = Table(
        f"{N_CPU} tasks of ~{CPU_TASK_S * 1e3:.0f} ms CPU each: CPU efficiency",
        "% (CPU time of the work alone / CPU time of all pool processes)",
        baseline="mp.Pool.map (auto chunks)",
        note=note + " The work's CPU time is what the tasks measured in their own threads; "
        "pool processes are counted from the constructor to shutdown (workers reaped), "
        "so start-up and IPC are the overhead.",
    )
    efficiency = {
        name: functools.partial(_efficiency, maker, runner, workers)
        for name, (maker, runner) in CPU.items()
        if _available(name)
    }
    for name, pairs in _interleaved(efficiency, repeats).items():
        wall.add(name, Stats(tuple(by_wall for by_wall, _ in pairs)))
        cpu.add(name, Stats(tuple(by_cpu for _, by_cpu in pairs)))

    startup = Table(
        "start-up: constructor to the first result",
        "ms",
        higher_is_better=False,
        baseline="mp.Pool",
        note=note,
    )
    starters: dict[str, Callable[[int], Any]] = {
        "fabric Pool": Pool,
        "fabric Executor": Executor,
        "mp.Pool": _mp_pool,
        "ProcessPoolExecutor": _ppe,
        "loky": _loky,
        "mpire": _mpire,
    }
    starts = {
        name: functools.partial(_startup, maker, workers)
        for name, maker in starters.items()
        if _available(name)
    }
    for name, times in _interleaved(starts, repeats).items():
        startup.add(name, Stats(tuple(times)))
    return [per_task, maps, wall, cpu, startup]


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _efficiency(maker: Callable[[int], Any], runner: Runner, workers: int) -> tuple[float, float]:
    """Return (wall-clock efficiency, CPU efficiency) of one map, in percent.

    Both compare against the CPU time the tasks themselves report, taken in
    the same run: the wall-clock figure spreads it evenly over the workers,
    the CPU figure divides it by every CPU second the pool's processes spent,
    parent and reaped workers, from the constructor to shutdown.
    """
    items = [_spins] * N_CPU
    before = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
    pool = maker(workers)
    try:
        start = time.perf_counter()
        work = runner(pool, timed_spin, items)
        took = time.perf_counter() - start
    finally:
        _shut(pool)
    spent = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) - before
    if len(work) != N_CPU:
        raise RuntimeError(f"{len(work)} results for {N_CPU} tasks")
    work_cpu = sum(work)
    return 100.0 * work_cpu / workers / took, 100.0 * work_cpu / spent
