"""The docker compose cluster: the one-line check, and what it survives.

Each test has a compose project of its own (``project`` fixture), taken down
with its volumes afterwards. Without a Docker engine the tests are skipped with
the reason.
"""

from __future__ import annotations

import pytest

from tests.cluster import compose, jobs
from tests.cluster.netlab import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

KEYS = "/var/lib/fabric/keys"
# Heartbeats every 0.5 s, a peer silent for 6 of them (3 s) is dead.
FAST_LIVENESS = "--heartbeat 0.5 --liveness 6"


def _job(project: compose.Project, *args: str) -> jobs.JobRun:
    """Start the job service with these arguments, printing a line a result."""
    return jobs.JobRun(
        project.popen(
            "run", "--rm", "-T", "job", "tcp://broker:5555", "--keys", KEYS, "--progress", *args
        )
    )


def test_one_line_check_passes_and_down_leaves_nothing(
    project: compose.Project, capsys: pytest.CaptureFixture[str]
) -> None:
    done = project(
        "up", "--build", "--abort-on-container-exit", "--exit-code-from", "job",
        timeout=900, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    summary = jobs.summary_of(output)
    with capsys.disabled():
        print("\n" + summary.line("compose up"))
    assert summary == jobs.Summary(200, 200, 0, 0, 0)
    workers = compose.docker("ps", "-aq", "--filter", f"label={compose.LABEL}={project.name}",
                             "--filter", "label=com.docker.compose.service=worker")  # fmt: skip
    assert len(workers.split()) == 3
    project.down()
    assert project.leftovers() == {"containers": [], "networks": [], "volumes": []}


def test_job_survives_a_killed_worker_container_of_four(
    project: compose.Project, capsys: pytest.CaptureFixture[str]
) -> None:
    project("up", "-d", "--scale", "worker=4", "broker", "worker")
    workers = {compose.container_hostname(c): c for c in project.containers("worker")}
    assert len(workers) == 4
    run = _job(project, "--tasks", "60", "--task-seconds", "0.5")
    _, node = run.next_result(timeout=300)
    compose.docker("kill", workers[node])  # its other slot is still running a task
    status, summary = run.finish(timeout=300)
    with capsys.disabled():
        print("\n" + summary.line(f"worker container {node} killed"))
    assert status == 0, run.explain()
    assert summary == jobs.Summary(60, 60, 0, 0, 0)


def test_disconnected_worker_rejoins_and_takes_work(
    project: compose.Project, capsys: pytest.CaptureFixture[str]
) -> None:
    project.env["FABRIC_BROKER_ARGS"] = FAST_LIVENESS
    project("up", "-d", "broker", "worker")
    container = project.containers("worker")[0]
    node = compose.container_hostname(container)
    wait_until(lambda: node in project.workers(), 120, f"{node} to join")
    compose.docker("network", "disconnect", project.network(), container)
    wait_until(lambda: node not in project.workers(), 120, f"{node} to be declared dead")
    compose.docker("network", "connect", project.network(), container)
    wait_until(lambda: node in project.workers(), 120, f"{node} to rejoin")
    run = _job(project, "--tasks", "60", "--task-seconds", "0.2")
    status, summary = run.finish(timeout=300)
    nodes = {line.split()[2] for line in run.lines if line.startswith("result ")}
    with capsys.disabled():
        print("\n" + summary.line(f"worker {node} disconnected, reconnected"))
    assert status == 0, run.explain()
    assert summary == jobs.Summary(60, 60, 0, 0, 0)
    assert node in nodes


def test_restarted_broker_loses_no_accepted_task(
    project: compose.Project, capsys: pytest.CaptureFixture[str]
) -> None:
    project("up", "-d", "broker", "worker")
    (broker,) = project.containers("broker")
    # The shared dict lives in the broker's memory, so this run checks results only.
    run = _job(project, "--tasks", "80", "--task-seconds", "0.3", "--no-shared-dict")
    for _ in range(10):
        run.next_result(timeout=300)
    compose.docker("kill", broker)  # SIGKILL: no chance to flush anything
    compose.docker("start", broker)
    status, summary = run.finish(timeout=300)
    with capsys.disabled():
        print("\n" + summary.line("broker container killed and restarted"))
    assert status == 0, run.explain()
    assert summary == jobs.Summary(80, 80, 0, 0, 0)
