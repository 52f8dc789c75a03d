"""A lab of hosts on one machine: network namespaces joined by a switch.

Each host is a network namespace (``fclab-<suffix>-<host>``) with its own
``eth0`` and address on ``10.<a>.<b>.0/24``; the switch is ``netswitch.py``
running in a namespace of its own, so nothing of the lab is visible from, or
routed to, the machine's own network. Faults are explicit: ``link_down`` and
``link_up`` (the kernel's link state), ``impair`` (loss and delay in the
switch, like netem on the host's egress), ``block``/``unblock`` (a silent
partition). ``close`` kills every process started in the lab and deletes the
namespaces, whatever state the lab is in.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

SWITCH = Path(__file__).with_name("netswitch.py")
PREFIX = "fclab-"


def available() -> str | None:
    """Return why a lab cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; raise TimeoutError naming ``what`` after ``timeout``.

    For state only another system can report (a broker's view, Docker's), which
    has no event to wait on.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


class Lines:
    """The lines of a text pipe, read by a thread so a wait can have a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self._queue.put(line.rstrip("\n"))
        self._queue.put("")  # EOF

    def get(self, timeout: float) -> str:
        """Return the next line ("" once the pipe is closed); TimeoutError after ``timeout``."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line within {timeout} s") from None


@dataclass(frozen=True)
class Host:
    """One host of the lab: its name, namespace and address."""

    name: str
    netns: str
    address: str


class Lab:
    """Hosts in network namespaces on one switch; a context manager."""

    def __init__(self, names: Sequence[str], *, seed: int, logdir: Path) -> None:
        self.suffix = secrets.token_hex(3)
        net = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
        self.hosts = {
            name: Host(name, f"{PREFIX}{self.suffix}-{name}", f"{net}.{i + 1}")
            for i, name in enumerate(names)
        }
        self.logdir = logdir
        self._switch_ns = f"{PREFIX}{self.suffix}-sw"
        self._seed = seed
        self._switch: subprocess.Popen[str] | None = None
        self._procs: list[tuple[str, subprocess.Popen[str]]] = []
        self._made: list[str] = []

    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        for netns in [self._switch_ns, *(h.netns for h in self.hosts.values())]:
            _ip("netns", "add", netns)
            self._made.append(netns)
        ports = [f"p{i}" for i in range(len(self.hosts))]
        self._switch = subprocess.Popen(
            ["ip", "netns", "exec", self._switch_ns, sys.executable, str(SWITCH),
             str(self._seed), *ports],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._switch.stdout is not None
        self._answers = Lines(self._switch.stdout)
        if self._answers.get(30) != "ready":
            raise RuntimeError("the lab's switch did not start")
        for port, host in zip(ports, self.hosts.values(), strict=True):
            _ip("-n", self._switch_ns, "link", "set", port, "netns", host.netns)
            _ip("-n", host.netns, "link", "set", port, "name", "eth0")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        self._ports = dict(zip(self.hosts, ports, strict=True))

    def run(
        self,
        host: str,
        argv: Sequence[str],
        *,
        log: str,
        env: Mapping[str, str] | None = None,
        stdout: int | None = None,
    ) -> subprocess.Popen[str]:
        """Start ``argv`` on ``host``; stderr (and stdout unless piped) go to ``logdir/log``."""
        with open(self.logdir / log, "a") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[host].netns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out if stdout is None else stdout,
                stderr=out,
                env={**os.environ, **(env or {})},
                text=True,
            )
        self._procs.append((host, proc))
        return proc

    def processes(self, host: str) -> list[subprocess.Popen[str]]:
        """The processes started on ``host`` that are still running."""
        return [p for h, p in self._procs if h == host and p.poll() is None]

    def link_down(self, host: str) -> None:
        """Take the host's link down, as if its cable were pulled."""
        _ip("-n", self.hosts[host].netns, "link", "set", "eth0", "down")

    def link_up(self, host: str) -> None:
        """Bring the host's link back up."""
        _ip("-n", self.hosts[host].netns, "link", "set", "eth0", "up")

    def impair(self, host: str, *, loss: float, delay: float) -> None:
        """Drop ``loss`` of the host's outgoing frames and delay the rest by ``delay`` s."""
        self._control(f"impair {self._ports[host]} {loss} {delay}")

    def block(self, host: str) -> None:
        """Drop everything to and from the host, which keeps its link up (a partition)."""
        self._control(f"block {self._ports[host]}")

    def unblock(self, host: str) -> None:
        """End ``block``."""
        self._control(f"unblock {self._ports[host]}")

    def switch_stats(self) -> dict[str, int]:
        """Return the switch's frame counters (``forwarded``, ``dropped``)."""
        words = self._control("stats").split()[1:]
        return {k: int(v) for k, v in (w.split("=") for w in words)}

    def _control(self, command: str) -> str:
        assert self._switch is not None and self._switch.stdin
        self._switch.stdin.write(command + "\n")
        self._switch.stdin.flush()
        answer = self._answers.get(10)
        if not answer.startswith("ok"):
            raise RuntimeError(f"switch: {command!r}: {answer}")
        return answer

    def close(self) -> None:
        """Kill every process of the lab, stop the switch and delete the namespaces."""
        for _, proc in self._procs:
            stop(proc)
        if self._switch is not None:
            if self._switch.stdin:
                self._switch.stdin.close()
            stop(self._switch, grace=5.0)
        for netns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        self._made.clear()


def stop(proc: subprocess.Popen[str], grace: float = 0.0) -> None:
    """Wait ``grace`` seconds for ``proc`` to exit, then kill it, and reap it."""
    if proc.poll() is None and grace > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)
