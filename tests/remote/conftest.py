"""Real clusters on loopback: a broker thread with the built-in host, worker node processes.

Every broker, node and Manager made here is stopped at teardown, so the suite's
leak check sees no process left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fabric.broker.keys import generate
from fabric.broker.server import Broker
from fabric.remote import Manager
from fabric.remote._service import BuiltinHostService

HEARTBEAT, LIVENESS = 0.2, 5  # a dead peer is noticed within a second


@dataclass
class Cluster:
    """A broker on loopback with CURVE keys, plus helpers to add nodes and clients."""

    keys: Path
    broker: Broker
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    managers: list[Manager] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.broker.address

    def node(self, processes: int = 1, name: str = "node", *extra: str) -> subprocess.Popen[bytes]:
        """Start a worker node process (``fabric worker``)."""
        command = [
            sys.executable,
            "-m",
            "fabric.remote.cli",
            "worker",
            self.address,
            "--processes",
            str(processes),
            "--keys",
            str(self.keys),
            "--name",
            name,
            "--parent",
            str(os.getpid()),
            *extra,
        ]
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        self.nodes.append(proc)
        return proc

    def manager(self, **kwargs: object) -> Manager:
        """Connect a Manager (a client) to this cluster's broker."""
        mgr = Manager(self.address, keys=self.keys, **kwargs).connect()  # type: ignore[arg-type]
        self.managers.append(mgr)
        return mgr

    def close(self) -> None:
        for mgr in self.managers:
            mgr.shutdown()
        for proc in self.nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        self.broker.close()


def start_broker(keys: Path, bind: str = "tcp://127.0.0.1:0", **options: Any) -> Broker:
    broker = Broker(
        bind,
        keys=keys,
        services=[BuiltinHostService()],
        heartbeat=HEARTBEAT,
        liveness=LIVENESS,
        **options,
    )
    broker.start()
    return broker


@pytest.fixture(scope="session")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys"
    generate(path)
    return path


@pytest.fixture
def cluster(keydir: Path) -> Iterator[Cluster]:
    made = Cluster(keydir, start_broker(keydir))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def run_client(keydir: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a Python snippet as a separate client process (killed at teardown)."""
    procs: list[subprocess.Popen[str]] = []

    def start(code: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(keydir), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
