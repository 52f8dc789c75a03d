"""The remote Process: the local Process API, run on a worker node."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import cloudpickle
import pytest

from fabric.remote import Process
from tests.remote.conftest import Cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def put_pid(d: Any) -> None:
    d["pid"] = os.getpid()


def wait_for(event: Any, started: Any) -> None:
    started.set()
    assert event.wait(60)


def fail() -> None:
    raise RuntimeError("remote failure")


class Subclassed(Process):
    def __init__(self, d: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.d = d

    def run(self) -> None:
        self.d["ran"] = self.name


def test_start_join_exitcode(cluster: Cluster) -> None:
    cluster.node(processes=2)
    mgr = cluster.manager()
    d = mgr.dict()
    proc = Process(target=put_pid, args=(d,), manager=mgr)
    assert proc.exitcode is None and not proc.is_alive()
    proc.start()
    with pytest.raises(RuntimeError, match="once"):
        proc.start()
    proc.join(60)
    assert proc.exitcode == 0 and not proc.is_alive() and d["pid"] != os.getpid()
    failing = mgr.Process(target=fail)
    failing.start()
    failing.join(60)
    assert failing.exitcode == 1 and isinstance(failing.exception, RuntimeError)
    sub = Subclassed(d, name="custom", manager=mgr)
    sub.start()
    sub.join(60)
    assert sub.exitcode == 0 and d["ran"] == "custom"


def test_join_timeout_and_terminate(cluster: Cluster) -> None:
    cluster.node(processes=1)
    mgr = cluster.manager()
    gate, started = mgr.Event(), mgr.Event()
    proc = mgr.Process(target=wait_for, args=(gate, started))
    proc.start()
    assert started.wait(60)
    proc.join(0.05)
    assert proc.is_alive() and proc.exitcode is None
    proc.terminate()
    proc.join(30)
    assert not proc.is_alive() and proc.exitcode == -signal.SIGTERM
    with pytest.raises(RuntimeError):
        Process(target=fail).start()  # no manager given and none active
