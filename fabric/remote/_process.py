"""Process: the local Process API (start/join/is_alive/exitcode/terminate) on a worker node.

The process object is pickled (cloudpickle) into one task, so ``run`` may be
overridden in a subclass as usual. ``exitcode`` is 0 when ``run`` returned, 1
when it raised (the exception, with its remote traceback, is ``exception``;
the traceback is also written to the task's stderr, as a local child would),
``-SIGTERM``/``-SIGKILL`` after ``terminate()``/``kill()``, and ``-N`` when the
task's process died of signal N past the broker's retries.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import itertools
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fabric.errors import WorkerLostError

if TYPE_CHECKING:
    from fabric.remote._manager import Manager

_counter = itertools.count(1)
current_manager: contextvars.ContextVar[Manager | None] = contextvars.ContextVar(
    "fabric_remote_manager", default=None
)


def _run_remote(process: Process) -> None:
    try:
        process.run()
    except BaseException:
        sys.stderr.write(f"Process {process.name}:\n{traceback.format_exc()}")
        raise


class Process:
    """Run ``target(*args, **kwargs)`` on a worker node, with the Process API."""

    def __init__(
        self,
        group: None = None,
        target: Callable[..., Any] | None = None,
        name: str | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        daemon: bool | None = None,
        manager: Manager | None = None,
        forward_output: bool = False,
    ) -> None:
        if group is not None:
            raise ValueError("group argument must be None for now")
        self._target = target
        self._args = tuple(args)
        self._kwargs = dict(kwargs or {})
        self.name = name or f"RemoteProcess-{next(_counter)}"
        self.daemon = bool(daemon)
        self._manager = manager
        self._forward = forward_output
        self._future: cf.Future[Any] | None = None
        self._signal: int | None = None
        self.exception: BaseException | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_manager=None, _future=None)
        return state

    def run(self) -> None:
        """Call the target (override in a subclass to do something else)."""
        if self._target is not None:
            self._target(*self._args, **self._kwargs)

    def start(self) -> None:
        """Submit the process to a worker node; RuntimeError if started twice."""
        if self._future is not None:
            raise RuntimeError("processes can only be started once")
        manager = self._manager or current_manager.get()
        if manager is None:
            raise RuntimeError("a remote Process needs manager=... or an active 'with Manager()'")
        executor = manager.Executor(forward_output=self._forward)
        self._future = executor.submit(_run_remote, self)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the process ends or ``timeout`` passes; return None either way."""
        if self._future is None:
            raise RuntimeError("can only join a started process")
        cf.wait([self._future], timeout)

    def is_alive(self) -> bool:
        return self._future is not None and not self._future.done()

    @property
    def exitcode(self) -> int | None:
        """Return None while running, else 0, 1 or -signal (see the module docstring)."""
        future = self._future
        if future is None or not future.done():
            return None
        if future.cancelled():
            return -(self._signal or signal.SIGTERM)
        error = future.exception()
        if error is None:
            return 0
        self.exception = error
        if isinstance(error, WorkerLostError):
            found = re.search(r"killed by (SIG[A-Z0-9]+)", str(error))
            return -int(signal.Signals[found.group(1)]) if found else -signal.SIGKILL
        return 1

    def terminate(self) -> None:
        """Stop the process: cancelled if queued, its task process killed if running."""
        self._stop(signal.SIGTERM)

    def kill(self) -> None:
        """Same as terminate() on a remote node; the exit code says SIGKILL."""
        self._stop(signal.SIGKILL)

    def _stop(self, sig: int) -> None:
        if self._future is not None and not self._future.done():
            self._signal = sig
            self._future.cancel()

    def close(self) -> None:
        """Release the process object; ValueError if it is still running."""
        if self.is_alive():
            raise ValueError("Cannot close a process while it is still running")

    def __repr__(self) -> str:
        state = "initial" if self._future is None else ("started" if self.is_alive() else "stopped")
        return f"<RemoteProcess name={self.name!r} {state}>"
