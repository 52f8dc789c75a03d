"""Figures a benchmark family returns beside its tables, drawn as small PNGs.

A family's ``run`` may return :class:`Lines` (a quantity against a parameter,
one line per candidate, median with a min-max band) and :class:`Samples`
(every sample of a latency, drawn as one CDF per candidate) among its
:class:`~bench._harness.Table` objects. ``bench/run.py --markdown FILE``
draws them with matplotlib (imported only then) into a folder next to FILE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._harness import Stats

DPI = 100
SIZE = (6.4, 3.6)  # inches: 640x360 px at DPI, a few tens of KB as PNG


@dataclass
class Lines:
    """One line per candidate: ``y`` (median, min-max band) against ``x``."""

    name: str  # the PNG's file stem
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, Stats]]] = field(default_factory=dict)
    logx: bool = True
    logy: bool = True
    xticks: dict[float, str] = field(default_factory=dict)  # x -> label; empty: matplotlib's
    references: set[str] = field(default_factory=set)  # computed, not measured: dashed

    def add(self, candidate: str, x: float, stats: Stats) -> None:
        self.series.setdefault(candidate, []).append((x, stats))


@dataclass
class Samples:
    """Every measured sample per candidate, drawn as a CDF on a log axis."""

    name: str
    title: str
    unit: str
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, candidate: str, values: Sequence[float]) -> None:
        self.samples.setdefault(candidate, []).extend(values)


Figure = Lines | Samples


def draw(figure: Figure, outdir: Path) -> Path:
    """Write ``figure`` as ``outdir/<name>.png`` and return the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: only files
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=SIZE, dpi=DPI, layout="constrained")
    try:
        if isinstance(figure, Lines):
            _draw_lines(ax, figure)
        else:
            _draw_samples(ax, figure)
        ax.set_title(figure.title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
        path = outdir / f"{figure.name}.png"
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path


def _draw_lines(ax: object, figure: Lines) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    for candidate, points in figure.series.items():
        points = sorted(points, key=lambda p: p[0])
        xs = [x for x, _ in points]
        style: dict[str, Any] = (
            {"ls": "--", "color": "gray"} if candidate in figure.references else {"marker": "o"}
        )
        (line,) = ax.plot(xs, [s.median for _, s in points], ms=3, label=candidate, **style)
        ax.fill_between(
            xs,
            [s.min for _, s in points],
            [s.max for _, s in points],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    if figure.logx:
        ax.set_xscale("log")
    if figure.logy:
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
    if figure.xticks:
        ax.set_xticks(list(figure.xticks), list(figure.xticks.values()))
        ax.minorticks_off()
    ax.set_xlabel(figure.xlabel)
    ax.set_ylabel(f"{figure.ylabel} (median, band: min-max)")


def _draw_samples(ax: object, figure: Samples) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    for candidate, values in figure.samples.items():
        ordered = sorted(values)
        n = len(ordered)
        if n:
            ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=candidate)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_ylim(0, 1)
    ax.set_xlabel(figure.unit)
    ax.set_ylabel("fraction of samples <= x")


def _plain_log_ticks(axis: object) -> None:
    """Label a log axis at 1, 2 and 5 times each power of ten, as plain numbers."""
    from matplotlib.axis import Axis
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    assert isinstance(axis, Axis)
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(
        FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}")
    )
    axis.set_minor_formatter(NullFormatter())
