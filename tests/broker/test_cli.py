"""``fabric keygen``, ``fabric broker`` and ``fabric status`` as a user runs them."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fabric.broker.keys import Keyring, PeerKeys, generate
from fabric.broker.status import query
from fabric.errors import AuthenticationError, BrokerUnavailable
from tests.broker.conftest import BrokerProcess
from tests.broker.peers import peers


def fabric_broker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fabric.broker", *args], capture_output=True, text=True, timeout=60
    )


def test_keygen_writes_the_documented_layout_with_private_secrets(tmp_path: Path) -> None:
    out = fabric_broker(
        "keygen", str(tmp_path / "k"), "--peer", "alice=client,host", "--peer", "w1=worker"
    )
    assert out.returncode == 0, out.stderr
    root = tmp_path / "k"
    files = sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file())
    assert files == [
        "alice.key_secret",
        "allow/client/alice.key",
        "allow/host/alice.key",
        "allow/worker/w1.key",
        "broker.key",
        "broker.key_secret",
        "w1.key_secret",
    ]
    for secret in root.glob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    keyring = Keyring.load(root)
    alice = PeerKeys.load(root, "alice")
    assert keyring.allowed[alice.public].roles == {"client", "host"}
    assert alice.server == keyring.public
    assert fabric_broker("keygen", str(root)).returncode != 0  # never overwrites silently


def test_a_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    generate(tmp_path)
    (tmp_path / "client.key_secret").chmod(0o644)
    with pytest.raises(AuthenticationError, match="readable by others"):
        PeerKeys.load(tmp_path, "client")


def test_status_prints_the_cluster(broker_process: Callable[..., BrokerProcess],
                                   tmp_path: Path) -> None:  # fmt: skip
    generate(tmp_path)
    broker = broker_process("--keys", str(tmp_path))
    broker.start()
    with peers(broker.address, PeerKeys.load(tmp_path, "worker")) as make:
        worker = make()
        worker.keepalive = 0.05
        worker.hello("worker", "node-7", capacity=4)
        out = fabric_broker("status", broker.address, "--keys", str(tmp_path))
        stats = query(broker.address, keys=tmp_path, name="admin")
    assert out.returncode == 0, out.stderr
    assert "queued 0  in flight 0" in out.stdout
    assert "node-7" in out.stdout
    assert stats["workers"] == 1
    assert stats["worker_list"][0]["credit"] == 4
    with pytest.raises(BrokerUnavailable):
        query(broker.address, timeout=0.5)  # no key: CURVE refuses silently


def test_the_broker_refuses_a_public_bind_without_keys() -> None:
    out = fabric_broker("broker", "--bind", "tcp://0.0.0.0:0")
    assert out.returncode != 0
    assert "refusing to bind tcp://0.0.0.0:0 without keys" in out.stderr
