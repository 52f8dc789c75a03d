"""Every script in examples/ runs to completion (each checks its own results)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))
SMALL_ARGS = {"cpu_bound.py": ["200000"], "pipeline.py": ["20000"], "scraper.py": ["50"]}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(script), *SMALL_ARGS.get(script.name, [])],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
