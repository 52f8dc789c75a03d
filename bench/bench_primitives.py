"""Locks, counters and wake-ups: fabric's primitives against threading and multiprocessing.

Three comparisons, every candidate measured in the same run:

* uncontended ``acquire(); release()`` in one thread;
* a shared counter incremented under a lock by 2 processes at once (the final
  count is checked, so a broken lock cannot look fast);
* ping-pong between 2 processes: one wakes the other and waits to be woken
  back, for Semaphore, Event and Condition; the figure is the median round
  trip (two wake-ups) of each measurement.

Children are forked with multiprocessing's fork context for every candidate,
so only the primitives differ. Each child times its own work from a shared
start signal, so process start-up is not counted. Candidates are measured in
rounds (each once per round), so load from other jobs hits them alike.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import fabric.local
from bench._harness import Stats, Table

UNCONTENDED_PAIRS = 200_000
COUNTER_INCREMENTS = 100_000  # per process
ROUND_TRIPS = 2_000

_mp = multiprocessing.get_context("fork")


def _interleaved(measures: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, Stats]:
    """Measure every candidate once per round, so a burst of load on the machine
    hits all of them alike instead of skewing whichever ran during it."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            values[name].append(measure())
    return {name: Stats(tuple(v)) for name, v in values.items()}


# ------------------------------------------------------------- uncontended


def _uncontended_ns(lock: Any) -> float:
    acquire, release = lock.acquire, lock.release
    start = time.perf_counter()
    for _ in range(UNCONTENDED_PAIRS):
        acquire()
        release()
    return (time.perf_counter() - start) / UNCONTENDED_PAIRS * 1e9


def _uncontended(repeats: int) -> Table:
    table = Table(
        "Uncontended Lock acquire+release",
        "ns per acquire+release pair",
        higher_is_better=False,
        baseline="multiprocessing.Lock",
        note=f"{UNCONTENDED_PAIRS:,} pairs per measurement, bound methods, one thread. "
        "Target: fabric.local.Lock ratio <= 1.1.",
    )
    candidates: list[tuple[str, Callable[[], Any]]] = [
        ("multiprocessing.Lock", _mp.Lock),
        ("threading.Lock", threading.Lock),
        ("fabric.local.Lock", fabric.local.Lock),
        ("multiprocessing.RLock", _mp.RLock),
        ("threading.RLock", threading.RLock),
        ("fabric.local.RLock", fabric.local.RLock),
    ]
    measures = {name: partial(_uncontended_ns, make()) for name, make in candidates}
    for name, stats in _interleaved(measures, repeats).items():
        table.add(name, stats)
    return table


# ----------------------------------------------------------------- counter


class _Counter:
    """An int64 shared value incremented under a lock: ``with lock: cell.value += 1``."""

    def __init__(self, lock: Any, cell: Any) -> None:
        self.lock, self.cell = lock, cell

    def run(self, n: int) -> None:
        lock, cell = self.lock, self.cell
        for _ in range(n):
            with lock:
                cell.value += 1

    @property
    def value(self) -> int:
        return int(self.cell.value)


class _ValueCounter(_Counter):
    """``with value.get_lock(): value.value += 1``: the idiom the docs show."""

    def __init__(self, value: Any) -> None:
        super().__init__(None, value)

    def run(self, n: int) -> None:
        cell = self.cell
        for _ in range(n):
            with cell.get_lock():
                cell.value += 1


def _timed_child(work: Callable[[], None], go: Any, ready: Any, seconds: Any, slot: int) -> None:
    ready.release()
    go.wait()
    start = time.perf_counter()
    work()
    seconds[slot] = time.perf_counter() - start


def _run_pair(works: list[Callable[[], None]]) -> float:
    """Run each work in its own forked child from a common start; return the slowest time."""
    go, ready, seconds = _mp.Event(), _mp.Semaphore(0), _mp.RawArray("d", len(works))
    kids = [
        _mp.Process(target=_timed_child, args=(work, go, ready, seconds, i))
        for i, work in enumerate(works)
    ]
    for kid in kids:
        kid.start()
    for _ in kids:
        ready.acquire()
    go.set()
    for kid in kids:
        kid.join()
        if kid.exitcode != 0:
            raise RuntimeError(f"benchmark child failed with exit code {kid.exitcode}")
    return float(max(seconds))


def _counter_rate(make: Callable[[], Any]) -> float:
    counter = make()
    elapsed = _run_pair([lambda: counter.run(COUNTER_INCREMENTS)] * 2)
    if counter.value != 2 * COUNTER_INCREMENTS:
        raise RuntimeError(f"lost increments: {counter.value} != {2 * COUNTER_INCREMENTS}")
    return 2 * COUNTER_INCREMENTS / elapsed


def _counter(repeats: int) -> Table:
    table = Table(
        "Contended counter, 2 processes",
        "increments/s",
        baseline="multiprocessing.Lock + RawValue",
        note=f"{COUNTER_INCREMENTS:,} increments per process under the lock; the final "
        "count is checked. The second row keeps multiprocessing's RawValue so only the lock "
        "differs. Target: fabric faster than multiprocessing.Lock + RawValue.",
    )
    measures: dict[str, Callable[[], float]] = {
        "multiprocessing.Lock + RawValue": partial(
            _counter_rate, lambda: _Counter(_mp.Lock(), _mp.RawValue("q", 0))
        ),
        "fabric.local.Lock + multiprocessing.RawValue": partial(
            _counter_rate, lambda: _Counter(fabric.local.Lock(), _mp.RawValue("q", 0))
        ),
        "fabric.local.Lock + fabric.local.RawValue": partial(
            _counter_rate, lambda: _Counter(fabric.local.Lock(), fabric.local.RawValue("q", 0))
        ),
        "multiprocessing.Value.get_lock()": partial(
            _counter_rate, lambda: _ValueCounter(_mp.Value("q", 0))
        ),
        "fabric.local.Value.get_lock()": partial(
            _counter_rate, lambda: _ValueCounter(fabric.local.Value("q", 0))
        ),
    }
    for name, stats in _interleaved(measures, repeats).items():
        table.add(name, stats)
    return table


# --------------------------------------------------------------- ping-pong


class _SemaphorePingPong:
    def __init__(self, module: Any) -> None:
        self.there, self.back = module.Semaphore(0), module.Semaphore(0)

    def serve(self, n: int) -> None:
        for _ in range(n):
            self.there.acquire()
            self.back.release()

    def trip(self) -> None:
        self.there.release()
        self.back.acquire()


class _EventPingPong:
    def __init__(self, module: Any) -> None:
        self.there, self.back = module.Event(), module.Event()

    def serve(self, n: int) -> None:
        for _ in range(n):
            self.there.wait()
            self.there.clear()
            self.back.set()

    def trip(self) -> None:
        self.there.set()
        self.back.wait()
        self.back.clear()


class _ConditionPingPong:
    def __init__(self, module: Any) -> None:
        self.cond = module.Condition(module.Lock())
        self.turn = _mp.RawValue("i", 0)

    def serve(self, n: int) -> None:
        cond, turn = self.cond, self.turn
        with cond:
            for _ in range(n):
                while turn.value != 1:
                    cond.wait()
                turn.value = 0
                cond.notify()

    def trip(self) -> None:
        cond, turn = self.cond, self.turn
        with cond:
            turn.value = 1
            cond.notify()
            while turn.value != 0:
                cond.wait()


def _serve_on(game: Any, cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    game.serve(ROUND_TRIPS)


def _ping_pong_us(make: Callable[[], Any], cpus: tuple[int, int] | None) -> float:
    game = make()
    allowed = os.sched_getaffinity(0)
    kid = _mp.Process(target=_serve_on, args=(game, cpus and cpus[1]))
    kid.start()
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[0]})
    try:
        times = []
        for _ in range(ROUND_TRIPS):
            start = time.perf_counter()
            game.trip()
            times.append(time.perf_counter() - start)
    finally:
        os.sched_setaffinity(0, allowed)
    kid.join()
    if kid.exitcode != 0:
        raise RuntimeError(f"ping-pong child failed with exit code {kid.exitcode}")
    return statistics.median(times) * 1e6


_PLACEMENTS = {
    "scheduler's choice": "both processes free to run on any CPU",
    "same CPU": "both processes pinned to one CPU: every wake-up is a context switch",
    "two CPUs": "one process pinned to each of two CPUs: every wake-up crosses CPUs",
}


def _ping_pong(repeats: int, placement: str, cpus: tuple[int, int] | None) -> Table:
    table = Table(
        f"Ping-pong between 2 processes, {placement}",
        "us per round trip (median of each measurement)",
        higher_is_better=False,
        baseline="multiprocessing.Semaphore",
        note=f"{_PLACEMENTS[placement]}. {ROUND_TRIPS:,} round trips per measurement; a round "
        "trip is two wake-ups. Target: every fabric row at most 0.5x multiprocessing.Semaphore.",
    )
    measures: dict[str, Callable[[], float]] = {}
    for kind, cls in [
        ("Semaphore", _SemaphorePingPong),
        ("Event", _EventPingPong),
        ("Condition", _ConditionPingPong),
    ]:
        measures[f"multiprocessing.{kind}"] = partial(_ping_pong_us, partial(cls, _mp), cpus)
        measures[f"fabric.local.{kind}"] = partial(_ping_pong_us, partial(cls, fabric.local), cpus)
    for name, stats in _interleaved(measures, repeats).items():
        table.add(name, stats)
    return table


def run(repeats: int) -> list[Table]:
    tables = [_uncontended(repeats), _counter(repeats)]
    tables.append(_ping_pong(repeats, "scheduler's choice", None))
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        tables.append(_ping_pong(repeats, "same CPU", (cpus[0], cpus[0])))
        tables.append(_ping_pong(repeats, "two CPUs", (cpus[0], cpus[1])))
    return tables
