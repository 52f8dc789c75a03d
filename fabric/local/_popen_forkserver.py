"""The ``forkserver`` start method, parent side: ask this process's fork server for a child.

The server (``_forkserver``) is started on first use and stopped when this
process exits (after its children were joined) or dies. The child's sentinel is
our end of its status socket: the server writes the exit code there when it
reaps the child, so the socket becomes readable exactly when the child is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import weakref

from fabric.errors import FabricError
from fabric.local import _launch
from fabric.local import process as _process
from fabric.local._forkserver import CODE, PID

__all__ = ["ForkServerPopen", "ensure_running", "set_preload", "stop"]

_log = logging.getLogger(__name__)
_MAX_FDS = 250  # SCM_MAX_FD (253) less the status socket and the launch memfd
_START_TIMEOUT = 60.0  # a fork takes milliseconds; this only catches a stopped server
_LOST = 255  # exit code reported when the server died before the child's status arrived


class _Server:
    """A running fork server: the subprocess and our end of its control socket."""

    def __init__(self, preload: tuple[str, ...]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            code = (
                f"from fabric.local._forkserver import main; main({theirs.fileno()}, {preload!r})"
            )
            self.proc = subprocess.Popen(
                _launch.python_command(code),
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.control = ours
        self.pid = os.getpid()

    def request(self, fds: list[int]) -> socket.socket:
        """Ask for a child; return our end of its status socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(self.control, [b"F"], [theirs.fileno(), *fds])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def stop(self, timeout: float) -> None:
        self.control.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Holder:
    """This process's server, if started; a forked child forgets its parent's."""

    lock = threading.Lock()
    server: _Server | None = None
    inherited: _Server | None = None
    preload: tuple[str, ...] = ()


def ensure_running() -> None:
    """Start this process's fork server if it is not running (it starts on first use anyway)."""
    _server()


def stop(timeout: float = 5.0) -> None:
    """Stop this process's fork server; children it started keep running."""
    with _Holder.lock:
        server, _Holder.server = _Holder.server, None
    if server is not None:
        server.stop(timeout)


def set_preload(module_names: list[str]) -> None:
    """Have the fork server import ``module_names`` before forking any child.

    Takes effect when the server next starts (it starts on first use); a module
    every child imports (numpy, your own package) then costs nothing per child.
    """
    if isinstance(module_names, str) or not all(isinstance(m, str) for m in module_names):
        raise TypeError("module_names must be a list of module names")
    with _Holder.lock:
        _Holder.preload = tuple(module_names)


def _server() -> _Server:
    with _Holder.lock:
        server = _Holder.server
        if server is None or server.proc.poll() is not None:
            server = _Holder.server = _Server(_Holder.preload)
        return server


def _forget_after_fork() -> None:
    server, _Holder.server = _Holder.server, None
    _Holder.lock = threading.Lock()
    if server is not None:
        server.control.close()  # or the server would outlive our parent
        # Kept, not collected: the parent's server is not ours to reap, and a
        # collected subprocess.Popen would warn that it is still running.
        _Holder.inherited = server


os.register_at_fork(after_in_child=_forget_after_fork)


class ForkServerPopen:
    """A child forked by the fork server for ``process_obj``."""

    def __init__(self, process_obj: _process.Process, report_fd: int) -> None:
        data, fds = _launch.prepare(process_obj, report_fd)
        if len(fds) > _MAX_FDS:
            raise FabricError(
                f"cannot pass {len(fds) - 1} shared-memory segments to a forkserver child "
                f"(at most {_MAX_FDS - 1})"
            )
        launch_fd = _launch.write_launch(data)
        try:
            self._status = self._request([launch_fd, *fds])
        finally:
            os.close(launch_fd)
        if not _process.wait_readable(self._status.fileno(), _START_TIMEOUT):
            self._status.close()
            raise FabricError(f"the fork server did not start the child within {_START_TIMEOUT} s")
        reply = self._status.recv(PID.size, socket.MSG_WAITALL)
        if len(reply) != PID.size:
            self._status.close()
            raise FabricError("the fork server exited before starting the child")
        (self.pid,) = PID.unpack(reply)
        self.sentinel = self._status.fileno()
        self.returncode: int | None = None
        self._lost = False  # the server died before reporting: the child may still run
        self._lock = threading.Lock()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:  # already exited and reaped by the server
            self._pidfd = -1
        self._closer = weakref.finalize(self, _release, self._status, self._pidfd)
        self._closer.atexit = False  # needed by the exit handler that reaps children

    @staticmethod
    def _request(fds: list[int]) -> socket.socket:
        try:
            return _server().request(fds)
        except OSError as exc:  # the server died (killed?): start another once
            _log.warning("fork server lost (%s); starting a new one", exc)
            stop()
            return _server().request(fds)

    def poll(self) -> int | None:
        if self.returncode is None:
            with self._lock:
                if self.returncode is None and _process.wait_readable(self.sentinel, 0):
                    self.returncode = self._read_code()
        return self.returncode

    def _read_code(self) -> int:
        reply = self._status.recv(CODE.size, socket.MSG_WAITALL)
        if len(reply) != CODE.size:
            _log.warning("fork server died before reporting child %d's exit code", self.pid)
            self._lost = True
            return _LOST
        (code,) = CODE.unpack(reply)
        return int(code)

    def wait(self, timeout: float | None) -> int | None:
        if self.returncode is None and not _process.wait_readable(self.sentinel, timeout):
            return None
        return self.poll()

    def send_signal(self, sig: int) -> None:
        if (self.returncode is not None and not self._lost) or self._pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    def close(self) -> None:
        self._closer()
        self._pidfd = -1


def _release(status: socket.socket, pidfd: int) -> None:
    status.close()
    if pidfd >= 0:
        os.close(pidfd)
