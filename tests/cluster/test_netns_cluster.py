"""A broker, worker nodes and a client on hosts of their own, and the faults of a network.

Hosts are network namespaces on the lab's switch (``netlab``): the broker on
``broker``, worker nodes on ``w1`` and ``w2``, the job (examples/cluster_job.py)
on ``client``. Every scenario prints its line (tasks submitted, results
received, duplicates delivered, lost) and passes only with lost = 0 and
duplicates delivered = 0, every result checked against its closed form.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import jobs, netlab

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

PORT = 5555
# Heartbeats every 0.5 s, a peer silent for 6 of them (3 s) is dead.
FAST_LIVENESS = ["--heartbeat", "0.5", "--liveness", "6"]
FABRIC = [sys.executable, "-m", "fabric"]


class FabricLab:
    """Fabric's processes on the lab's hosts, with one key directory and one journal."""

    def __init__(self, lab: netlab.Lab, state: Path) -> None:
        self.lab = lab
        self.keys = state / "keys"
        self.journal = state / "broker.journal"
        self.address = f"tcp://{lab.hosts['broker'].address}:{PORT}"
        subprocess.run([*FABRIC, "keygen", str(self.keys)], check=True, timeout=60)

    def start_broker(self) -> subprocess.Popen[str]:
        """Start the broker on its host, journaling to the same file every time."""
        return self.lab.run(
            "broker",
            [*FABRIC, "-v", "broker", "--bind", self.address, "--keys", str(self.keys),
             "--journal", str(self.journal), *FAST_LIVENESS],
            log="broker.log",
        )  # fmt: skip

    def start_worker(self, host: str) -> subprocess.Popen[str]:
        """Start a worker node with two task processes on ``host``."""
        return self.lab.run(
            host,
            [*FABRIC, "-v", "worker", self.address, "--processes", "2",
             "--keys", str(self.keys), "--name", host],
            log=f"{host}.log",
            env={"FABRIC_NODE": host},
        )  # fmt: skip

    def job(self, *args: str) -> jobs.JobRun:
        """Run the checked job on the client host, a line a result."""
        proc = self.lab.run(
            "client",
            [sys.executable, str(jobs.JOB), self.address, "--keys", str(self.keys), "--progress",
             *args],
            log="job.log",
            stdout=subprocess.PIPE,
        )  # fmt: skip
        return jobs.JobRun(proc)

    def explain(self, run: jobs.JobRun) -> str:
        """The end of the job's output and of every log, for a failure message."""
        parts = ["job stdout:", run.explain()]
        for log in sorted(self.lab.logdir.glob("*.log")):
            parts += [f"--- {log.name}:", *log.read_text().splitlines()[-20:]]
        return "\n".join(parts)

    def status(self) -> dict[str, Any] | None:
        """The broker's ``fabric status --json``, asked from the client host (None: no answer)."""
        proc = self.lab.run(
            "client", [*FABRIC, "status", self.address, "--keys", str(self.keys), "--json"],
            log="status.log", stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = proc.communicate(timeout=60)
        return json.loads(out) if proc.returncode == 0 else None

    def workers(self) -> set[str]:
        """The worker nodes the broker lists now."""
        status = self.status()
        return {w["name"] for w in status["worker_list"]} if status else set()


@pytest.fixture
def fabric_lab(make_lab: Callable[..., netlab.Lab], tmp_path: Path) -> Iterator[FabricLab]:
    """Four hosts with the broker started and two worker nodes joined."""
    lab = make_lab("broker", "w1", "w2", "client")
    flab = FabricLab(lab, tmp_path)
    yield flab


def _start(flab: FabricLab) -> None:
    flab.start_broker()
    flab.start_worker("w1")
    flab.start_worker("w2")
    netlab.wait_until(lambda: flab.workers() == {"w1", "w2"}, 120, "both worker nodes to join")


def _report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print("\n" + line)


def test_worker_host_loses_its_link_mid_task(
    fabric_lab: FabricLab, capsys: pytest.CaptureFixture[str]
) -> None:
    _start(fabric_lab)
    run = fabric_lab.job("--tasks", "40", "--task-seconds", "0.5")
    while run.next_result(timeout=120)[1] != "w1":
        pass
    fabric_lab.lab.link_down("w1")  # w1's other task process is mid-task
    netlab.wait_until(lambda: "w1" not in fabric_lab.workers(), 120, "w1 to be declared dead")
    fabric_lab.lab.link_up("w1")  # its late results must now be fenced off
    status, summary = run.finish(timeout=240)
    broker = fabric_lab.status()
    assert broker is not None
    _report(
        capsys,
        summary.line(
            f"worker host w1 lost its link mid-task ({broker['retries']} tasks re-run,"
            f" {broker['duplicates']} late results dropped by the broker)"
        ),
    )
    assert status == 0, fabric_lab.explain(run)
    assert summary == jobs.Summary(40, 40, 0, 0, 0)
    assert broker["retries"] >= 1  # w1's running tasks ran again elsewhere


def test_lossy_slow_network_for_a_whole_run(
    fabric_lab: FabricLab, capsys: pytest.CaptureFixture[str]
) -> None:
    for host in fabric_lab.lab.hosts:
        fabric_lab.lab.impair(host, loss=0.1, delay=0.05)
    _start(fabric_lab)
    dropped = fabric_lab.lab.switch_stats()["dropped"]
    run = fabric_lab.job("--tasks", "30")
    status, summary = run.finish(timeout=240)
    dropped = fabric_lab.lab.switch_stats()["dropped"] - dropped
    _report(capsys, summary.line(f"10% loss, 50 ms delay ({dropped} frames dropped in the run)"))
    assert dropped > 0
    assert status == 0, fabric_lab.explain(run)
    assert summary == jobs.Summary(30, 30, 0, 0, 0)


def test_broker_host_killed_and_restarted_with_its_journal(
    fabric_lab: FabricLab, capsys: pytest.CaptureFixture[str]
) -> None:
    _start(fabric_lab)
    # The shared dict lives in the broker's memory, so this run checks results only.
    run = fabric_lab.job("--tasks", "60", "--task-seconds", "0.2", "--no-shared-dict")
    for _ in range(10):
        run.next_result(timeout=120)
    broker = fabric_lab.lab.processes("broker")[0]
    broker.kill()  # SIGKILL mid-run: whatever was not journaled is gone
    broker.wait(30)
    fabric_lab.start_broker()
    status, summary = run.finish(timeout=240)
    _report(capsys, summary.line("broker killed (SIGKILL) and restarted with its journal"))
    assert status == 0, fabric_lab.explain(run)
    assert summary == jobs.Summary(60, 60, 0, 0, 0)
