"""The cluster a Manager starts when given no address: broker, object host, worker node.

The broker runs on a thread of this process with the built-in object host in its
loop (the Manager's own calls run straight in it, see ``Broker.call_local``);
the worker node is a child process (``fabric worker``) with one task
process per core. The node dies with this process (PR_SET_PDEATHSIG, passed
down to its task processes), so nothing outlives the Manager.

CURVE is on even here: without a key directory the cluster makes throw-away
keys in memory and hands them to the node through its environment, never over
the network. The node connects over a unix socket (``ipc://``, in a directory
of its own) rather than the broker's TCP loopback port: same CURVE, less
kernel work per message. The same way it hands the node (and so its task processes) the
same-host lane (``_lane``): their object calls then cross shared memory to a
thread of this process instead of TCP and CURVE.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import zmq

from fabric.remote._keys import CURVE_ENV, Curve, encode_curve, load_curve
from fabric.remote._lane import LANE_ENV

log = logging.getLogger(__name__)


class EmbeddedCluster:
    """A loopback broker + built-in host + one local worker node."""

    def __init__(
        self,
        *,
        processes: int | None = None,
        keys: str | Path | None = None,
        lane: bool = True,
        prefetch: int | None = None,
    ) -> None:
        from fabric.broker.keys import Keyring
        from fabric.broker.server import Broker
        from fabric.remote._lane_server import LaneServer
        from fabric.remote._service import BuiltinHostService

        keyring: Keyring | str | Path
        if keys is None:
            keyring, peer = Keyring.ephemeral()
            self.curve: Curve | None = (peer.public, peer.secret, peer.server)
        else:
            keyring, self.curve = keys, load_curve(keys, "client")
        self._keys = keys
        self.lane = LaneServer() if lane else None
        # The node starts first and learns the address on its stdin once the broker is
        # bound: its interpreter and task processes start while the broker does.
        self._node: subprocess.Popen[bytes] | None = self._start_node(
            processes or os.cpu_count() or 1, prefetch
        )
        # the node reaches the broker over a unix socket (in a directory only we can enter):
        # the same CURVE, less kernel work per message than TCP loopback
        self._ipc_dir = tempfile.mkdtemp(prefix="fabric-") if zmq.has("ipc") else None
        node_address = "" if self._ipc_dir is None else f"ipc://{self._ipc_dir}/broker"
        try:
            self.broker = Broker(
                bind="tcp://127.0.0.1:0",
                keys=keyring,
                services=[BuiltinHostService()],
                also_bind=(node_address,) if node_address else (),
            )
            self.broker.start()
            self.address: str = self.broker.address
            if self.lane is not None:
                self.lane.serve(self.broker, self.address)
            assert self._node.stdin is not None
            self._node.stdin.write(f"{node_address or self.address}\n".encode())
            self._node.stdin.close()
        except BaseException:
            self._node.kill()
            self._node.wait()
            if self.lane is not None:
                self.lane.close()
            self._remove_ipc_dir()
            raise

    def _start_node(self, processes: int, prefetch: int | None) -> subprocess.Popen[bytes]:
        command = [
            sys.executable,
            "-m",
            "fabric.remote.cli",
            "worker",
            "-",
            "--processes",
            str(processes),
            "--name",
            f"embedded-{os.getpid()}",
            "--parent",
            str(os.getpid()),
        ]
        if prefetch is not None:  # None: the node's default window
            command += ["--prefetch", str(prefetch)]
        env = dict(os.environ)
        if self._keys is not None:
            command += ["--keys", str(self._keys)]
        elif self.curve is not None:
            env[CURVE_ENV] = encode_curve(self.curve)
        env.pop(LANE_ENV, None)  # a lane this process was handed is not its node's
        if self.lane is not None:
            env[LANE_ENV] = self.lane.env()
        return subprocess.Popen(command, stdin=subprocess.PIPE, env=env)

    def close(self, grace: float = 5.0) -> None:
        """Stop the worker node (drain, then stop), then the broker."""
        node, self._node = self._node, None
        if node is not None:
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                if node.poll() is not None:
                    break
                node.send_signal(sig)
                try:
                    node.wait(grace)
                except subprocess.TimeoutExpired:
                    log.warning("embedded worker node %d did not stop on %s", node.pid, sig.name)
            node.wait()
        if self.lane is not None:  # after the node: its draining tasks may still call objects
            self.lane.close()
        self.broker.close()
        self._remove_ipc_dir()

    def _remove_ipc_dir(self) -> None:
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None
