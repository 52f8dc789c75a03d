"""Process start+join per start method: fabric against multiprocessing, in one run.

Each figure is the mean time of ``BATCH`` consecutive ``start(); join()`` of a
no-op target from a module of its own (both libraries import it by reference
in a spawn or forkserver child, and nothing else with it), after one warm-up
start that launches either fork server.
``threading.Thread`` is measured alongside for scale.
"""

from __future__ import annotations

import compileall
import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fabric.local
from bench._harness import Stats, Table
from bench._noop import noop

BATCH = {"fork": 40, "forkserver": 40, "spawn": 8}


def _per_start_ms(make: Callable[..., Any], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        worker = make(target=noop)
        worker.start()
        worker.join()
    return (time.perf_counter() - start) / count * 1e3


def _side_by_side(makers: list[Callable[..., Any]], count: int, repeats: int) -> list[Stats]:
    """Alternate the candidates batch by batch, so a change in machine load hits all alike."""
    for make in makers:
        _per_start_ms(make, 1)  # warm up: imports, fork server start
    samples: list[list[float]] = [[] for _ in makers]
    for _ in range(repeats):
        for make, sample in zip(makers, samples, strict=True):
            sample.append(_per_start_ms(make, count))
    return [Stats(tuple(sample)) for sample in samples]


def _compile_sources() -> None:
    # An installed wheel ships .pyc files; a source checkout run with
    # PYTHONDONTWRITEBYTECODE would recompile fabric in every spawned child.
    root = Path(__file__).resolve().parent.parent
    for package in ("fabric", "bench"):
        compileall.compile_dir(root / package, quiet=1)


def run(repeats: int) -> list[Table]:
    _compile_sources()
    tables = []
    for method in ("fork", "forkserver", "spawn"):
        table = Table(
            f"Process start+join, {method}",
            "ms per start+join",
            higher_is_better=False,
            baseline=f"multiprocessing {method}",
            note=f"{BATCH[method]} start+join per measurement, the candidates alternating.",
        )
        makers = [
            multiprocessing.get_context(method).Process,  # type: ignore[attr-defined]
            fabric.local.get_context(method).Process,
            threading.Thread,
        ]
        names = [f"multiprocessing {method}", f"fabric {method}", "threading.Thread"]
        for name, stats in zip(names, _side_by_side(makers, BATCH[method], repeats), strict=True):
            table.add(name, stats)
        tables.append(table)
    return tables
