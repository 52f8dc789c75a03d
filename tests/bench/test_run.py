"""bench/run.py: the page it writes, its figures, and a family that fails."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import run as runner
from bench._harness import Stats, Table
from bench._plots import Lines

pytest.importorskip("matplotlib")


def _fake_run(repeats: int) -> list[Table | Lines]:
    table = Table("fake table", "ops/s", baseline="peer")
    table.add("peer", Stats((1.0,) * repeats))
    table.add("fabric", Stats((3.0,) * repeats))
    figure = Lines("fake_plot", "fake plot", "x", "ops/s")
    figure.add("fabric", 1, Stats((3.0,)))
    figure.add("fabric", 2, Stats((6.0,)))
    return [table, figure]


def _broken_run(repeats: int) -> list[Table]:
    raise RuntimeError("peer crashed")


@pytest.fixture
def families() -> Iterator[None]:
    for name, run in (("fake", _fake_run), ("broken", _broken_run)):
        module = types.ModuleType(f"bench.bench_{name}", f"Measure {name} things.")
        module.run = run  # type: ignore[attr-defined]
        sys.modules[module.__name__] = module
    yield
    for name in ("fake", "broken"):
        del sys.modules[f"bench.bench_{name}"]


@pytest.mark.usefixtures("families")
def test_the_page_has_the_tables_the_plots_and_the_command(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gone.png").write_bytes(b"stale")
    assert runner.main(["fake", "--repeats", "2", "--markdown", str(page)]) == 0
    text = page.read_text()
    assert "## fake\n\nMeasure fake things." in text
    assert "| fabric | 3 | 3 | 3 | 3.00x |" in text
    assert "![fake plot](benchmarks/fake_plot.png)" in text
    assert f"`python bench/run.py fake --repeats 2 --markdown {page}`" in text
    assert "cores" in text and "Python" in text
    assert sorted(p.name for p in (tmp_path / "benchmarks").iterdir()) == ["fake_plot.png"]


@pytest.mark.usefixtures("families")
def test_a_failing_family_is_on_the_page_and_in_the_exit_status(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    assert runner.main(["broken", "fake", "--repeats", "1", "--markdown", str(page)]) == 1
    text = page.read_text()
    assert "**This family failed in this run:** `RuntimeError: peer crashed`" in text
    assert "| fabric | 3 | 3 | 3 | 3.00x |" in text  # the families after it still ran
