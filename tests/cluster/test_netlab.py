"""The lab itself: hosts reach each other, and each fault does what it says."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.cluster import netlab

pytestmark = pytest.mark.cluster

# A TCP echo server that prints its port, then echoes one connection per line read.
ECHO_SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    with conn, conn.makefile("rwb") as f:
        for line in f:
            f.write(line)
            f.flush()
"""

# Send N lines over one connection, one at a time; print the slowest round trip.
ECHO_CLIENT = """
import socket, sys, time
n, worst = int(sys.argv[3]), 0.0
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as s:
    f = s.makefile("rwb")
    for i in range(n):
        t = time.monotonic()
        f.write(b"%d\\n" % i)
        f.flush()
        assert f.readline() == b"%d\\n" % i
        worst = max(worst, time.monotonic() - t)
print(f"{n} {worst:.4f}")
"""


def _echo(lab: netlab.Lab, host: str) -> int:
    server = lab.run(host, [sys.executable, "-c", ECHO_SERVER, lab.hosts[host].address],
                     log="echo.log", stdout=subprocess.PIPE)  # fmt: skip
    assert server.stdout is not None
    return int(server.stdout.readline())


def _talk(lab: netlab.Lab, host: str, to: str, port: int, n: int) -> tuple[int, float]:
    client = lab.run(
        host, [sys.executable, "-c", ECHO_CLIENT, lab.hosts[to].address, str(port), str(n)],
        log="client.log", stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = client.communicate(timeout=50)
    assert client.returncode == 0, (lab.logdir / "client.log").read_text()
    count, worst = out.split()
    return int(count), float(worst)


def test_hosts_reach_each_other(make_lab: Callable[..., netlab.Lab]) -> None:
    lab = make_lab("a", "b", "c")
    port = _echo(lab, "a")
    assert _talk(lab, "b", "a", port, 20)[0] == 20
    assert _talk(lab, "c", "a", port, 20)[0] == 20


def test_impairment_delays_and_drops_but_tcp_delivers(
    make_lab: Callable[..., netlab.Lab],
) -> None:
    lab = make_lab("a", "b")
    port = _echo(lab, "a")
    for host in ("a", "b"):
        lab.impair(host, loss=0.1, delay=0.05)
    before = lab.switch_stats()["dropped"]
    count, worst = _talk(lab, "b", "a", port, 60)
    assert count == 60
    # Each way crosses one 50 ms delay, so no round trip can be shorter than 100 ms.
    assert worst >= 0.1
    assert lab.switch_stats()["dropped"] > before


def test_link_down_cuts_and_link_up_restores(make_lab: Callable[..., netlab.Lab]) -> None:
    lab = make_lab("a", "b")
    port = _echo(lab, "a")
    lab.link_down("a")
    client = lab.run("b", [sys.executable, "-c", ECHO_CLIENT, lab.hosts["a"].address,
                           str(port), "1"], log="cut.log")  # fmt: skip
    assert client.wait(60) != 0  # the connection attempt times out: nothing crosses
    lab.link_up("a")
    assert _talk(lab, "b", "a", port, 5)[0] == 5


def test_close_deletes_every_namespace(make_lab: Callable[..., netlab.Lab]) -> None:
    lab = make_lab("a", "b")
    _echo(lab, "a")
    names = [h.netns for h in lab.hosts.values()]
    lab.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
