"""The benchmark page's figures: drawn as small PNGs from measured Stats and samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench._harness import Stats
from bench._plots import Lines, Samples, draw

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_lines_are_drawn_as_a_small_png(tmp_path: Path) -> None:
    figure = Lines(
        "sizes", "throughput", "message size", "MB/s", xticks={64: "64 B", 4096: "4 KiB"}
    )
    for x in (64, 4096):
        figure.add("a", x, Stats((1.0 * x, 2.0 * x, 3.0 * x)))
        figure.add("b", x, Stats((0.5 * x,)))
    path = draw(figure, tmp_path / "out")
    assert path == tmp_path / "out" / "sizes.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) < 100_000


def test_samples_are_drawn_as_a_png(tmp_path: Path) -> None:
    figure = Samples("trip", "round trip", "us")
    figure.add("a", [10.0, 20.0, 30.0])
    figure.add("a", [40.0])
    figure.add("b", [5.0, 500.0])
    assert figure.samples["a"] == [10.0, 20.0, 30.0, 40.0]
    assert draw(figure, tmp_path).read_bytes().startswith(PNG_MAGIC)
