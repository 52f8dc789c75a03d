"""Process: the ``threading.Thread`` API on a child process, and the module functions around it.

A :class:`Process` behaves like a ``Thread`` wherever ``threading`` defines the
behaviour (constructor, ``start`` twice raises ``RuntimeError``, ``join(timeout)``
returns ``None``, ``run`` overridable, ``name``, ``daemon``, ``ident``,
``native_id``, ``is_alive``) and adds what only a process has: ``pid``,
``exitcode`` (``-N`` when killed by signal N), ``terminate``, ``kill``, ``close``,
``sentinel`` and ``exception``. How the child is created is the job of one
``_popen_<method>`` module per start method; what runs in it is ``_bootstrap``.
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
import weakref
from collections import namedtuple

TYPE_CHECKING = False  # typing is not imported at run time: a spawned child pays for it
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from types import TracebackType
    from typing import Any, NamedTuple, Protocol

__all__ = [
    "ExceptHookArgs",
    "Process",
    "active_children",
    "active_count",
    "cpu_count",
    "current_process",
    "enumerate",
    "excepthook",
    "parent_process",
]


if TYPE_CHECKING:

    class Popen(Protocol):
        """What a start method hands back: a started child seen from its parent."""

        pid: int
        sentinel: int

        def __init__(self, process_obj: Process, report_fd: int) -> None:
            """Start ``process_obj``; the child reports an exception through ``report_fd``."""

        def poll(self) -> int | None:
            """Return the exit code if the child has exited, else None (never blocks)."""

        def wait(self, timeout: float | None) -> int | None:
            """Wait up to ``timeout`` seconds for the child to exit; return its exit code."""

        def send_signal(self, sig: int) -> None:
            """Send ``sig`` to the child unless it has already been reaped."""

        def close(self) -> None:
            """Release the fds held for the child."""

    class ExceptHookArgs(NamedTuple):
        """The argument of :func:`excepthook`, like ``threading.ExceptHookArgs``."""

        exc_type: type[BaseException]
        exc_value: BaseException | None
        exc_traceback: TracebackType | None
        process: Process | None

else:
    ExceptHookArgs = namedtuple(
        "ExceptHookArgs", ["exc_type", "exc_value", "exc_traceback", "process"]
    )
    ExceptHookArgs.__doc__ = "The argument of :func:`excepthook`, as ``threading.ExceptHookArgs``."


def excepthook(args: ExceptHookArgs) -> None:
    """Report a process's uncaught exception and its traceback on stderr.

    The child calls ``fabric.local.excepthook`` when ``run`` raises; assign
    another callable there (before ``start`` for spawn and forkserver children,
    which receive it pickled) to report differently. ``SystemExit`` is ignored.
    """
    if args.exc_type is SystemExit:
        return
    stream = sys.stderr
    if stream is None:
        return
    import traceback

    name = args.process.name if args.process is not None else "<unknown>"
    stream.write(f"Exception in process {name} (pid {os.getpid()}):\n")
    stream.write(
        "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    )
    stream.flush()


class _State:
    """This process's view of the process tree; reset in every child."""

    def __init__(self, current: Process, parent: _ParentProcess | None) -> None:
        self.current = current
        self.parent = parent
        self.children: set[Process] = set()
        self.counter = itertools.count(1)


class Process:
    """A child process running ``target(*args, **kwargs)``, used like ``threading.Thread``.

    ``group`` must be None (as in ``threading``). ``daemon`` defaults to the
    creating process's flag; daemonic children are terminated when their
    parent exits and killed if it dies. The start method is the global one
    (:func:`fabric.local.set_start_method`) unless the class comes from a
    context (``get_context("spawn").Process``).
    """

    _start_method: str | None = None

    def __init__(
        self,
        group: None = None,
        target: Callable[..., object] | None = None,
        name: str | None = None,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        daemon: bool | None = None,
    ) -> None:
        if group is not None:
            raise ValueError("group argument must be None for now")
        creator = current_process()
        self._identity: tuple[int, ...] = (*creator._identity, next(_state.counter))
        self._target = target
        self._args = tuple(args)
        self._kwargs = dict(kwargs or {})
        self._name = str(name) if name is not None else _default_name(self._identity, target)
        self._daemon = creator.daemon if daemon is None else bool(daemon)
        self._parent_pid: int | None = os.getpid()
        self._parent_name = creator.name
        self._forget_start()

    def _forget_start(self) -> None:
        self._popen: Popen | None = None
        self._closed = False
        self._report_fd = -1
        self._exception: BaseException | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_popen", "_closed", "_report_fd", "_report_closer", "_exception"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forget_start()

    def run(self) -> None:
        """Call ``target(*args, **kwargs)``; override in a subclass to run something else."""
        if self._target is not None:
            self._target(*self._args, **self._kwargs)

    def start(self) -> None:
        """Start the child; raise ``RuntimeError`` if this object was started before."""
        self._check_closed()
        if self._popen is not None or self is _state.current:
            raise RuntimeError("processes can only be started once")
        if self._parent_pid != os.getpid():
            raise RuntimeError("can only start a process object created by the current process")
        from fabric.local import context

        popen_type = context.popen_type(self._start_method or context.chosen_method())
        _reap()
        report_fd = os.memfd_create("fabric-report", os.MFD_CLOEXEC)
        try:
            self._popen = popen_type(self, report_fd)
        except BaseException:
            os.close(report_fd)
            raise
        self._report_fd = report_fd
        # Closed once the exception is read, or when this object is collected.
        self._report_closer = weakref.finalize(self, os.close, report_fd)
        self._report_closer.atexit = False
        _state.children.add(self)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the child exits or ``timeout`` seconds pass; return None either way.

        Check :meth:`is_alive` (or :attr:`exitcode`) afterwards to tell which.
        """
        popen = self._child_popen("join")
        if popen.wait(timeout) is not None:
            _state.children.discard(self)

    def is_alive(self) -> bool:
        """Return whether the process is running (True for the current process)."""
        self._check_closed()
        if self is _state.current:
            return True
        if self._popen is None:
            return False
        popen = self._child_popen("test")
        if popen.poll() is None:
            return True
        _state.children.discard(self)
        return False

    def terminate(self) -> None:
        """Send SIGTERM to the child (nothing happens if it has already exited)."""
        import signal

        self._child_popen("terminate").send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL to the child (nothing happens if it has already exited)."""
        import signal

        self._child_popen("kill").send_signal(signal.SIGKILL)

    def interrupt(self) -> None:
        """Send SIGINT to the child, raising ``KeyboardInterrupt`` there (as Python 3.14's)."""
        import signal

        self._child_popen("interrupt").send_signal(signal.SIGINT)

    def close(self) -> None:
        """Release the fds held for the child; raise ``ValueError`` while it still runs.

        Most methods raise ``ValueError`` once the process object is closed.
        """
        if self._closed:
            return
        if self._popen is not None:
            if self._popen.poll() is None:
                raise ValueError(
                    "cannot close a process while it is still running; "
                    "call join() or terminate() first"
                )
            self._popen.close()
        if self._report_fd >= 0:
            self._report_closer()
            self._report_fd = -1
        _state.children.discard(self)
        self._closed = True

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        self._name = str(value)

    @property
    def daemon(self) -> bool:
        """Whether the process is terminated when its parent exits; set it before ``start``."""
        return self._daemon

    @daemon.setter
    def daemon(self, value: bool) -> None:
        if self._popen is not None:
            raise RuntimeError("cannot set daemon status of active process")
        self._daemon = bool(value)

    @property
    def pid(self) -> int | None:
        """The process id, None before ``start``."""
        self._check_closed()
        if self is _state.current:
            return os.getpid()
        return None if self._popen is None else self._popen.pid

    @property
    def ident(self) -> int | None:
        """Alias of :attr:`pid`, as ``Thread.ident``."""
        return self.pid

    @property
    def native_id(self) -> int | None:
        """Alias of :attr:`pid`, as ``Thread.native_id``."""
        return self.pid

    @property
    def exitcode(self) -> int | None:
        """The exit code once the child has exited (``-N`` for signal N), else None."""
        self._check_closed()
        return None if self._popen is None else self._popen.poll()

    @property
    def sentinel(self) -> int:
        """An fd that becomes readable when the child exits (for ``select`` and ``wait``)."""
        self._check_closed()
        if self._popen is None:
            raise ValueError("process not started")
        return self._popen.sentinel

    @property
    def exception(self) -> BaseException | None:
        """The exception that ended the child, once it has exited; None otherwise.

        It is the child's exception itself when it pickles (its ``__cause__`` is a
        :class:`~fabric.local.RemoteTraceback` with the child's traceback), else an
        :class:`~fabric.local.ExceptionProxy` with its type name, message and traceback.
        """
        if self.exitcode is None:
            return None
        return self._load_exception()

    def _load_exception(self) -> BaseException | None:
        if self._report_fd < 0:
            return self._exception
        fd, self._report_fd = self._report_fd, -1
        try:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            self._report_closer()
        if data:
            from fabric.local._exceptions import restore

            self._exception = restore(data)
        return self._exception

    def _child_popen(self, verb: str) -> Popen:
        self._check_closed()
        if self is _state.current:
            raise RuntimeError(f"cannot {verb} the current process")
        if self._popen is None:
            raise RuntimeError(f"cannot {verb} a process before it is started")
        if self._parent_pid != os.getpid():
            raise RuntimeError(f"can only {verb} a child process")
        return self._popen

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError("process object is closed")

    def __repr__(self) -> str:
        status = "initial"
        if self is _state.current:
            status = "started"
        elif self._closed:
            status = "closed"
        elif self._popen is not None:
            code = self._popen.poll() if self._parent_pid == os.getpid() else None
            status = "started" if code is None else f"stopped exitcode={code}"
        pid = f" pid={self.pid}" if not self._closed and self.pid is not None else ""
        daemon = " daemon" if self._daemon else ""
        return f"<{type(self).__name__} name={self._name!r}{pid} {status}{daemon}>"


def _default_name(identity: tuple[int, ...], target: object) -> str:
    name = "Process-" + ":".join(str(i) for i in identity)
    target_name = getattr(target, "__name__", None)
    return f"{name} ({target_name})" if isinstance(target_name, str) else name


class _MainProcess(Process):
    """The process the interpreter started in."""

    def __init__(self) -> None:
        self._identity = ()
        self._target = None
        self._args = ()
        self._kwargs = {}
        self._name = "MainProcess"
        self._daemon = False
        self._parent_pid = None
        self._parent_name = ""
        self._forget_start()


class _ParentProcess:
    """The parent seen from a child: ``name``, ``pid``, ``sentinel``, ``is_alive``, ``join``."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = self.ident = self.native_id = pid
        self.daemon = False
        try:
            self.sentinel = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone: a sentinel that is readable at once
            read, write = os.pipe2(os.O_CLOEXEC)
            os.close(write)
            self.sentinel = read

    def is_alive(self) -> bool:
        return not wait_readable(self.sentinel, 0)

    def join(self, timeout: float | None = None) -> None:
        wait_readable(self.sentinel, timeout)

    def __repr__(self) -> str:
        return f"<_ParentProcess name={self.name!r} pid={self.pid}>"


def wait_readable(fd: int, timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds (None: forever) for ``fd`` to become readable."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return bool(poller.poll(ms))


_state = _State(_MainProcess(), None)


def current_process() -> Process:
    """Return the Process object of the calling process, like ``threading.current_thread``."""
    return _state.current


def parent_process() -> _ParentProcess | None:
    """Return the parent of the calling process, or None in the main process."""
    return _state.parent


def active_children() -> list[Process]:
    """Return the started children still alive, reaping those that have exited."""
    _reap()
    return list(_state.children)


def enumerate() -> list[Process]:
    """Return the current process and its live children, like ``threading.enumerate``."""
    return [_state.current, *active_children()]


def active_count() -> int:
    """Return ``len(enumerate())``, like ``threading.active_count``."""
    return len(enumerate())


def cpu_count() -> int:
    """Return the number of CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _reap() -> None:
    for child in list(_state.children):
        popen = child._popen
        if popen is None or popen.poll() is not None:
            _state.children.discard(child)


def _become(process: Process, parent_name: str, parent_pid: int) -> None:
    """Make ``process`` the current process of a new child (called by the bootstrap)."""
    global _state
    _state = _State(process, _ParentProcess(parent_name, parent_pid))


def _exit_function() -> None:
    """Terminate daemonic children and wait for the others, as ``multiprocessing`` does at exit."""
    children = list(_state.children)
    for child in children:
        if child.daemon and child.is_alive():
            child.terminate()
    for child in children:
        if child._popen is not None and child._parent_pid == os.getpid():
            child._popen.wait(None)
    _state.children.clear()
    forkserver = sys.modules.get("fabric.local._popen_forkserver")
    if forkserver is not None:  # only once no child needs it to report an exit code
        forkserver.stop()


atexit.register(_exit_function)
