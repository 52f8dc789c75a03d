"""Shared memory and processes end with their owners, under every start method.

Normal exit, an exception, ``kill -9`` of a child and ``kill -9`` of a parent:
afterwards no child or fork server is left running and nothing is in
``/dev/shm`` (the autouse leak fixture checks the latter for every test too).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fabric.local import Context, _shm
from tests.conftest import shm_entries
from tests.local._helpers import Gate, signal_gate, wait_gate

TIMEOUT = 30.0


def write_then_block(block: _shm.Block, started: object, gate: object) -> None:
    block.buffer[:5] = b"alive"
    signal_gate(started)  # type: ignore[arg-type]
    wait_gate(gate, TIMEOUT)  # type: ignore[arg-type]


def write_then_raise(block: _shm.Block) -> None:
    block.buffer[:6] = b"raised"
    raise RuntimeError("after writing")


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` (not necessarily our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_block_survives_a_child_killed_while_using_it(ctx: Context) -> None:
    block = _shm.allocate(4096)
    started, gate = Gate(), Gate()
    try:
        proc = ctx.Process(target=write_then_block, args=(block, started.write_end, gate.read_end))
        proc.start()
        assert wait_gate(started.read_end, TIMEOUT)
        proc.kill()
        proc.join(TIMEOUT)
        assert proc.exitcode == -signal.SIGKILL
        assert bytes(block.buffer[:5]) == b"alive"
        block.buffer[:4] = b"mine"
        assert bytes(block.buffer[:4]) == b"mine"
    finally:
        started.close()
        gate.close()


def test_block_written_before_an_exception_is_kept(ctx: Context) -> None:
    block = _shm.allocate(64)
    proc = ctx.Process(target=write_then_raise, args=(block,))
    proc.start()
    proc.join(TIMEOUT)
    assert proc.exitcode == 1
    assert isinstance(proc.exception, RuntimeError)
    assert bytes(block.buffer[:6]) == b"raised"


PARENT_SCRIPT = """
    import os, signal, sys, threading
    import fabric.local
    from fabric.local import _shm

    def child(block, hold):
        block.buffer[:2] = b"ok"
        print("child", os.getpid(), flush=True)
        if hold:
            signal.pause()

    if __name__ == "__main__":
        ctx = fabric.local.get_context(sys.argv[1])
        block = _shm.allocate(1 << 20)  # a segment of its own
        daemon = ctx.Process(target=child, args=(block, True), daemon=True)
        if sys.argv[3] == "thread":  # PR_SET_PDEATHSIG would fire when this thread ends
            starter = threading.Thread(target=daemon.start)
            starter.start()
            starter.join()
        else:
            daemon.start()
        line = sys.stdin.readline()  # wait for the test to read the child's pid
        server = sys.modules.get("fabric.local._popen_forkserver")
        holder = server._Holder.server if server else None
        print("server", holder.proc.pid if holder else 0, flush=True)
        if sys.argv[2] == "exit":
            sys.exit(0)
        signal.pause()
"""


def run_parent(
    tmp_path: Path, method: str, how: str, starter: str = "main"
) -> tuple[subprocess.Popen[str], int, int]:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT_SCRIPT))
    parent = subprocess.Popen(
        [sys.executable, str(script), method, how, starter],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdin is not None and parent.stdout is not None
    kind, pid = parent.stdout.readline().split()
    assert kind == "child"
    parent.stdin.write("go\n")
    parent.stdin.flush()
    kind, server = parent.stdout.readline().split()
    assert kind == "server"
    return parent, int(pid), int(server)


@pytest.mark.parametrize("starter", ["main", "thread"])
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_parent_killed_takes_daemonic_children_and_server_along(
    tmp_path: Path, method: str, starter: str
) -> None:
    before = shm_entries()
    parent, child, server = run_parent(tmp_path, method, "kill", starter)
    try:
        parent.kill()
        parent.wait(TIMEOUT)
        assert wait_gone(child, TIMEOUT), f"child {child} outlived its SIGKILLed parent"
        if method == "forkserver":
            assert server > 0
            assert wait_gone(server, TIMEOUT), f"fork server {server} outlived its parent"
    finally:
        for pid in (child, server):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        parent.communicate()
    assert shm_entries() - before == set()


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_parent_exit_terminates_daemonic_children_and_server(tmp_path: Path, method: str) -> None:
    parent, child, server = run_parent(tmp_path, method, "exit")
    try:
        assert parent.wait(TIMEOUT) == 0
        assert wait_gone(child, 0), f"daemonic child {child} outlived its parent's exit"
        if server:
            assert wait_gone(server, 0), f"fork server {server} outlived its parent's exit"
    finally:
        parent.communicate()
