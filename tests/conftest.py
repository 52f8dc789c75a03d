"""Suite-wide fixtures: every test must leave no child process and no /dev/shm entry."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SHM = Path("/dev/shm")
GRACE_S = 5.0


def child_pids() -> set[int]:
    """Pids of this process's live (non-zombie) children and their descendants."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def shm_entries() -> set[str]:
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves child processes or /dev/shm entries behind."""
    children_before, shm_before = child_pids(), shm_entries()
    yield
    deadline = time.monotonic() + GRACE_S
    while True:
        left = child_pids() - children_before
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # polling the OS for exits, not synchronising the test
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    new_shm = shm_entries() - shm_before
    problems = []
    if left:
        problems.append(f"child processes left running: {sorted(left)}")
    if new_shm:
        problems.append(f"/dev/shm entries left: {sorted(new_shm)}")
    if problems:
        pytest.fail(f"{request.node.nodeid} leaked: " + "; ".join(problems), pytrace=False)
