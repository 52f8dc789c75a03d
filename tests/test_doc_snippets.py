"""Every ```python block in README.md and docs/ runs, each in a fresh interpreter.

A block preceded by the line ``<!-- not-run: reason -->`` is skipped (for example
one that needs a running cluster); the reason is reported.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(?:<!-- not-run: (?P<reason>.*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def snippets() -> list[object]:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, m in enumerate(BLOCK.finditer(path.read_text()), 1):
            marks = [pytest.mark.skip(reason=m["reason"])] if m["reason"] else []
            found.append(pytest.param(m["code"], id=f"{path.relative_to(ROOT)}#{n}", marks=marks))
    return found


@pytest.mark.timeout(120)
@pytest.mark.parametrize("code", snippets())
def test_snippet_runs(code: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=110
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
