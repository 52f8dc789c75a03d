"""Fixtures for the broker tests: keys and brokers that always close."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric.broker.keys import Keyring, PeerKeys
from fabric.broker.server import Broker


@pytest.fixture
def ephemeral() -> tuple[Keyring, PeerKeys]:
    return Keyring.ephemeral()


@pytest.fixture
def start_broker() -> Iterator[Callable[..., Broker]]:
    """Return a function starting a Broker (fast heartbeats by default); all close at the end."""
    made: list[Broker] = []

    def start(**kwargs: Any) -> Broker:
        kwargs.setdefault("heartbeat", 0.2)
        broker = Broker(**kwargs)
        made.append(broker)
        broker.start()
        return broker

    yield start
    for broker in made:
        broker.close()


class BrokerProcess:
    """``python -m fabric.broker broker`` in a child process, on a fixed port."""

    def __init__(self, port: int, *args: str) -> None:
        self.address = f"tcp://127.0.0.1:{port}"
        self.args = ["--bind", self.address, "--heartbeat", "0.2", *args]
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fabric.broker", "broker", *self.args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.kill()
            raise RuntimeError(f"the broker did not start: {line!r}")

    def rss(self) -> int:
        """Resident memory of the broker process, in bytes."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        (line,) = [x for x in status.splitlines() if x.startswith("VmRSS:")]
        return int(line.split()[1]) * 1024

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def broker_process() -> Iterator[Callable[..., BrokerProcess]]:
    """Return a function making (not starting) broker child processes; all are killed at the end."""
    made: list[BrokerProcess] = []

    def make(*args: str) -> BrokerProcess:
        process = BrokerProcess(free_port(), *args)
        made.append(process)
        return process

    yield make
    for process in made:
        process.kill()
