"""The ``fork`` start method: the child is a copy of this process; nothing is pickled.

Also the base of every start method whose child is our own child: a pidfd is
the sentinel (readable once the child exits, usable with ``select``), and
``pidfd_send_signal`` cannot hit a recycled pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
import weakref

from fabric.local import _bootstrap
from fabric.local import process as _process


class PidfdPopen:
    """A child of this process, watched through a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sentinel = os.pidfd_open(pid)
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._closer = weakref.finalize(self, os.close, self.sentinel)
        self._closer.atexit = False  # needed by the exit handler that reaps children

    def _reap(self) -> int | None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler set to SIG_IGN)
            return 255
        return os.waitstatus_to_exitcode(status) if pid else None

    def poll(self) -> int | None:
        if self.returncode is None:
            with self._lock:
                if self.returncode is None:
                    self.returncode = self._reap()
        return self.returncode

    def wait(self, timeout: float | None) -> int | None:
        if self.returncode is None and not _process.wait_readable(self.sentinel, timeout):
            return None
        return self.poll()

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
            signal.pidfd_send_signal(self.sentinel, sig)

    def close(self) -> None:
        self._closer()
        self.sentinel = -1


class ForkPopen(PidfdPopen):
    """Start ``process_obj`` in a forked copy of this process."""

    def __init__(self, process_obj: _process.Process, report_fd: int) -> None:
        _warn_if_threads()
        long_lived = threading.current_thread() is threading.main_thread()
        parent_name, parent_pid = _process.current_process().name, os.getpid()
        _bootstrap.flush_std_streams()  # or buffered output would be written twice
        devnull = _devnull()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # As multiprocessing does: a child reading the parent's terminal
                # would race it (spawn and forkserver children get /dev/null too).
                os.dup2(devnull, 0)
                code = _bootstrap.run(
                    process_obj,
                    report_fd,
                    parent_name,
                    parent_pid,
                    expected_ppid=parent_pid,
                    long_lived_starter=long_lived,
                )
            finally:
                os._exit(code)
        super().__init__(pid)


class _DevNull:
    fd = -1


def _devnull() -> int:
    # Opened once: a read-only /dev/null fd shared by every fork child's stdin.
    if _DevNull.fd < 0:
        _DevNull.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _DevNull.fd


def _warn_if_threads() -> None:
    # Python 3.12+ warns in os.fork() itself; mirror that warning before.
    if sys.version_info >= (3, 12):
        return
    try:
        count = len(os.listdir("/proc/self/task"))
    except OSError:
        count = threading.active_count()
    if count > 1:
        warnings.warn(
            f"this process (pid {os.getpid()}) has {count} threads; using fork() may deadlock "
            "the child (use the forkserver or spawn start method)",
            DeprecationWarning,
            stacklevel=4,
        )
