"""Every ``python`` block of README.md and docs/ runs, each in a fresh interpreter.

Tags (``<!-- snippet: not-run: WHY -->``) are described in tests/docs/blocks.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.blocks import PYTHON, Block, all_blocks


def params() -> list[object]:
    found: list[object] = []
    for block in all_blocks():
        if block.lang in PYTHON:
            skip = block.mode == "not-run"
            marks = [pytest.mark.skip(reason=f"not run (tagged): {block.reason}")] if skip else []
            found.append(pytest.param(block, id=block.id, marks=marks))
    return found


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", params())
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    assert not block.problems, block.problems
    assert block.mode == "local" and not block.subs, "python blocks run as written, in a temp dir"
    script = tmp_path / "snippet.py"
    script.write_text(block.code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=110
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
