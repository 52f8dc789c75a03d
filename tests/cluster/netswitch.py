"""A learning Ethernet switch in user space that can delay, drop and cut per port.

Theory of operation: the lab's hosts are network namespaces whose ``eth0`` is a
TAP device created here (``netswitch.py PORT...`` makes one TAP per port in the
namespace it runs in, prints ``ready``, and the lab moves each TAP into its
host's namespace). Every frame a host sends is read from its TAP; the switch
learns the sender's MAC, then forwards the frame to the port that owns the
destination MAC, or floods it. The impairment of the *sending* port is applied
on the way in, which is what ``tc qdisc add dev eth0 root netem loss L delay D``
on every host would do: each frame is dropped with probability ``loss`` (seeded
RNG) or delivered ``delay`` seconds later, in order. This exists because the
kernel here is built without ``sch_netem``; cutting a link is still done by the
kernel (``ip link set eth0 down`` in the host's namespace).

Control, one command a line on stdin, each answered by ``ok ...`` on stdout:
``impair PORT LOSS DELAY`` (fraction, seconds), ``block PORT`` (drop everything
to and from it), ``unblock PORT``, ``stats`` (``ok forwarded=N dropped=N``).
EOF on stdin stops the switch, which closes the TAPs and so removes them.
"""

from __future__ import annotations

import fcntl
import heapq
import os
import random
import select
import struct
import sys
import time
from dataclasses import dataclass, field

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_MAX_FRAME = 65536


@dataclass
class _Port:
    name: str
    fd: int
    loss: float = 0.0
    delay: float = 0.0
    blocked: bool = False


@dataclass
class _Switch:
    ports: list[_Port]
    rng: random.Random
    macs: dict[bytes, _Port] = field(default_factory=dict)
    due: list[tuple[float, int, int, bytes]] = field(default_factory=list)
    seq: int = 0
    forwarded: int = 0
    dropped: int = 0

    def receive(self, port: _Port, frame: bytes, now: float) -> None:
        """Take one frame from ``port``: learn, impair, then queue or forward it."""
        if len(frame) < 14 or port.blocked or self.rng.random() < port.loss:
            self.dropped += 1
            return
        self.macs[frame[6:12]] = port
        target = self.macs.get(frame[0:6])
        outs = [target] if target is not None and not frame[0] & 1 else self.ports
        for out in outs:
            if out is not port:
                self.seq += 1
                heapq.heappush(self.due, (now + port.delay, self.seq, out.fd, frame))

    def flush(self, now: float) -> None:
        """Deliver every queued frame whose time has come."""
        by_fd = {p.fd: p for p in self.ports}
        while self.due and self.due[0][0] <= now:
            _, _, fd, frame = heapq.heappop(self.due)
            if by_fd[fd].blocked:
                self.dropped += 1
                continue
            try:
                os.write(fd, frame)
                self.forwarded += 1
            except OSError:  # the host's link is down: the frame is lost, as on a wire
                self.dropped += 1


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    return fd


def _command(switch: _Switch, line: str) -> str:
    words = line.split()
    ports = {p.name: p for p in switch.ports}
    if words == ["stats"]:
        return f"ok forwarded={switch.forwarded} dropped={switch.dropped}"
    if len(words) == 4 and words[0] == "impair" and words[1] in ports:
        ports[words[1]].loss, ports[words[1]].delay = float(words[2]), float(words[3])
        return "ok"
    if len(words) == 2 and words[0] in ("block", "unblock") and words[1] in ports:
        ports[words[1]].blocked = words[0] == "block"
        return "ok"
    return f"error: bad command {line!r}"


def serve(names: list[str], seed: int) -> None:
    """Run the switch until stdin closes."""
    switch = _Switch([_Port(name, _open_tap(name)) for name in names], random.Random(seed))
    by_fd = {p.fd: p for p in switch.ports}
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    pending = b""
    while True:
        timeout = max(0.0, switch.due[0][0] - time.monotonic()) if switch.due else None
        readable, _, _ = select.select([stdin, *by_fd], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            if fd == stdin:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    print(_command(switch, line.decode()), flush=True)
                continue
            while True:
                try:
                    frame = os.read(fd, _MAX_FRAME)
                except (BlockingIOError, OSError):
                    break
                switch.receive(by_fd[fd], frame, now)
        switch.flush(time.monotonic())


if __name__ == "__main__":
    serve(sys.argv[2:], int(sys.argv[1]))
