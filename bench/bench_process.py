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
from bench._harness import Stats, Table, repeat
from bench._noop import noop

BATCH = {"fork": 40, "forkserver": 40, "spawn": 8}


def _per_start_ms(make: Callable[..., Any], count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        worker = make(target=noop)
        worker.start()
        worker.join()
    return (time.perf_counter() - start) / count * 1e3


def _measure(make: Callable[..., Any], count: int, repeats: int) -> Stats:
    _per_start_ms(make, 1)  # warm up: imports, fork server start
    return repeat(lambda: _per_start_ms(make, count), repeats)


def _compile_sources() -> None:
    # An installed wheel ships .pyc files; a source checkout run with
    # PYTHONDONTWRITEBYTECODE would recompile fabric in every spawned child.
    root = Path(__file__).resolve().parent.parent
    for package in ("fabric", "bench"):
        compileall.compile_dir(root / package, quiet=1)


def run(repeats: int) -> list[Table]:
    _compile_sources()
    tables = []
    thread = _measure(threading.Thread, BATCH["fork"], repeats)
    for method in ("fork", "forkserver", "spawn"):
        table = Table(
            f"Process start+join, {method}",
            "ms per start+join",
            higher_is_better=False,
            baseline=f"multiprocessing {method}",
            note=f"{BATCH[method]} start+join per measurement; threading.Thread for scale.",
        )
        count = BATCH[method]
        table.add(
            f"multiprocessing {method}",
            _measure(multiprocessing.get_context(method).Process, count, repeats),  # type: ignore[attr-defined]
        )
        table.add(
            f"fabric {method}", _measure(fabric.local.get_context(method).Process, count, repeats)
        )
        table.add("threading.Thread", thread)
        tables.append(table)
    return tables
