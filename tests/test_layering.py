"""The layers stay apart: importing fabric or fabric.local never loads zmq or the remote layer."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["fabric", "fabric.local"])
def test_import_does_not_load_zmq_or_remote(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in sys.modules if m == 'zmq' or m.startswith(('zmq.', 'fabric.remote', "
        "'fabric.broker'))]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_leak_fixture_sees_children() -> None:
    from tests.conftest import child_pids

    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert proc.pid in child_pids()
    finally:
        proc.communicate(b"")
    assert proc.pid not in child_pids()
