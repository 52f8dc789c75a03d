"""Measure candidates side by side and print markdown tables of ratios.

A benchmark module ``bench/bench_<family>.py`` defines ``run(repeats: int) ->
list[Table]``. Each :class:`Table` holds rows measured in the same run; the
first row named as ``baseline`` is the reference every ratio is computed
against. Figures are never asserted: they are printed, and ``bench/run.py
--markdown FILE`` writes them out for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stats:
    """min/median/max of repeated measurements of one quantity."""

    values: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def max(self) -> float:
        return max(self.values)


def repeat(measure: Callable[[], float], repeats: int) -> Stats:
    """Call ``measure`` (which returns one figure) ``repeats`` times."""
    return Stats(tuple(measure() for _ in range(repeats)))


def rate(count: int, body: Callable[[], None]) -> float:
    """Run ``body`` once and return ``count`` per second."""
    start = time.perf_counter()
    body()
    return count / (time.perf_counter() - start)


@dataclass
class Table:
    """One comparison: rows of (candidate, Stats) in one unit."""

    title: str
    unit: str
    higher_is_better: bool = True
    baseline: str | None = None
    rows: list[tuple[str, Stats]] = field(default_factory=list)
    note: str = ""

    def add(self, name: str, stats: Stats) -> None:
        self.rows.append((name, stats))

    def markdown(self) -> str:
        base = dict(self.rows).get(self.baseline or "", None)
        better = "higher" if self.higher_is_better else "lower"
        lines = [
            f"### {self.title}",
            "",
            f"Unit: {self.unit} ({better} is better); ratio = median / median of `{self.baseline}`."
            if base
            else f"Unit: {self.unit} ({better} is better).",
            "",
            "| candidate | min | median | max | ratio |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, st in self.rows:
            ratio = f"{st.median / base.median:.2f}x" if base and base.median else "-"
            lines.append(
                f"| {name} | {_fmt(st.min)} | {_fmt(st.median)} | {_fmt(st.max)} | {ratio} |"
            )
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"  # 2,120,000 reads at a glance where 2.12e+06 does not
    return f"{x:,.3g}"
