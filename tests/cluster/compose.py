"""Drive docker/compose.yaml from tests: one uniquely named project per test.

``engine_problem`` says why Docker cannot be used here (no client, no engine
answering, no Compose); ``prepare_image`` builds the base images (with
docker/build-base.sh, which reuses them when present) and the fabric image once;
``Project`` runs compose commands under its own project name and, on ``down``,
removes every container, network and volume it made.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from tests.cluster import jobs
from tests.cluster.netlab import stop

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
IMAGE = "fabric-cluster:test"
LABEL = "com.docker.compose.project"


@cache
def compose_command() -> tuple[str, ...] | None:
    """The Compose CLI: ``docker compose`` (v2) if it answers, else ``docker-compose``."""
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    if v2.returncode == 0:
        return ("docker", "compose")
    return ("docker-compose",) if shutil.which("docker-compose") else None


def engine_problem() -> str | None:
    """Return why the Docker tests cannot run here, or None if they can."""
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "no Docker engine answered `docker info` within 30 s"
    if info.returncode != 0:
        said = info.stderr.strip().splitlines() or [f"`docker info` exited {info.returncode}"]
        return f"no Docker engine answers: {said[-1]}"
    if compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


def _image_exists(tag: str) -> bool:
    probe = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, timeout=60)
    return probe.returncode == 0


def base_env() -> dict[str, str]:
    """The environment compose needs: the base images and the image tag to build."""
    env = dict(os.environ, FABRIC_IMAGE=IMAGE)
    dotenv = ROOT / "docker" / ".env"
    if dotenv.exists():  # written by build-base.sh; the environment still wins
        for line in dotenv.read_text().splitlines():
            key, _, value = line.partition("=")
            env.setdefault(key, value)
    return env


def prepare_image() -> dict[str, str]:
    """Build the base images if no registry can serve the default one, then the image."""
    if not _image_exists("python:3.11-slim-bookworm"):
        subprocess.run(["bash", str(ROOT / "docker" / "build-base.sh")], check=True, timeout=900)
    env = base_env()
    run(["-p", "fabricbuild", "build", "broker"], env=env, timeout=900)
    return env


def run(
    args: Sequence[str], *, env: dict[str, str], timeout: float, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run one compose command; raise with its output if it fails and ``check``."""
    cmd = [*(compose_command() or ()), "-f", str(COMPOSE_FILE), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        output = done.stdout[-4000:] + done.stderr[-4000:]
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}\n{output}")
    return done


def docker(*args: str, timeout: float = 60, check: bool = True) -> str:
    """Run a docker command and return its stdout."""
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


class Project:
    """One compose project with a unique name."""

    def __init__(self, env: dict[str, str]) -> None:
        self.name = f"fabrictest{secrets.token_hex(4)}"
        self.env = env
        self._procs: list[subprocess.Popen[str]] = []

    def __call__(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``compose -p NAME ARGS...``."""
        return run(["-p", self.name, *args], env=self.env, timeout=timeout, check=check)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start ``compose -p NAME ARGS...`` with stdout piped (stderr joins it)."""
        cmd = [*(compose_command() or ()), "-f", str(COMPOSE_FILE), "-p", self.name, *args]
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._procs.append(proc)
        return proc

    def containers(self, service: str) -> list[str]:
        """Ids of the service's running containers."""
        out = docker(
            "ps", "-q", "--no-trunc", "--filter", f"label={LABEL}={self.name}",
            "--filter", f"label=com.docker.compose.service={service}",
        )  # fmt: skip
        return out.split()

    def workers(self) -> set[str]:
        """The worker nodes the broker lists now (``fabric status`` in its container)."""
        (broker,) = self.containers("broker")
        done = subprocess.run(
            ["docker", "exec", broker, "fabric", "status", "tcp://127.0.0.1:5555",
             "--keys", "/var/lib/fabric/keys", "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return jobs.worker_names(done.stdout) if done.returncode == 0 else set()

    def network(self) -> str:
        """The project's default network."""
        return f"{self.name}_default"

    def logs(self, service: str) -> str:
        """The service's logs, every replica."""
        return self("logs", "--no-color", service, check=False).stdout

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes that still carry this project's label."""
        label = f"label={LABEL}={self.name}"
        return {
            "containers": docker("ps", "-aq", "--filter", label).split(),
            "networks": docker("network", "ls", "-q", "--filter", label).split(),
            "volumes": docker("volume", "ls", "-q", "--filter", label).split(),
        }

    def down(self) -> None:
        """Stop the commands started here; remove the containers, networks and volumes."""
        for proc in self._procs:
            stop(proc)  # its reader sees EOF and closes the pipe
        self("down", "-v", "--remove-orphans", "-t", "5", timeout=120, check=False)


def container_hostname(container: str) -> str:
    """The hostname a container runs under (the short id unless set)."""
    inspect = json.loads(docker("inspect", container))
    return str(inspect[0]["Config"]["Hostname"])
