"""The fork server: a single-threaded process that forks every forkserver child.

Theory of operation
-------------------
The parent spawns the server lazily with one end of a ``SOCK_SEQPACKET``
socketpair (the *control* socket) and keeps the other end; there is no listening
address, so no other process can ask for a fork. The server imports
``fabric.local`` and cloudpickle once, so a child starts with them loaded.

A request is one message of one byte carrying, by ``SCM_RIGHTS``, a fresh
*status* socket, the launch memfd, the report fd and the shared-memory fds. The
server forks; the child closes everything of the server's, reads the launch and
runs the process. The server writes the child's pid (8 bytes) on the status
socket, watches the child through a pidfd and, when it exits, reaps it and
writes its exit code (4 bytes, ``-N`` for signal N) before closing the socket.
The parent's end of the status socket is thus the child's sentinel.

The server exits when the control socket reaches end of file, which happens
when the parent exits or dies (forked children of the parent close their
inherited copy). Daemonic children, forked by the server's only thread, carry
``PR_SET_PDEATHSIG`` and die with it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import selectors
import signal
import socket
import struct

_MAX_FDS = 253  # the kernel's SCM_MAX_FD
PID = struct.Struct("=q")
CODE = struct.Struct("=i")


def main(control_fd: int, preload: tuple[str, ...] = ()) -> None:
    """Serve fork requests on ``control_fd`` until it reaches end of file.

    ``preload`` names modules to import first, so every child starts with them.
    """
    _preload(preload)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle
    control = socket.socket(fileno=control_fd)
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, status socket)
    while True:
        for key, _ in selector.select():
            if key.fileobj is control:
                try:
                    message, fds, _flags, _addr = socket.recv_fds(control, 1, _MAX_FDS)
                except ConnectionResetError:
                    message, fds = b"", []
                if not message:
                    return
                _fork(fds, control, selector, children)
            else:
                _child_exited(int(key.fd), selector, children)


def _preload(extra: tuple[str, ...]) -> None:
    # Loaded once here instead of in every child.
    import importlib
    import logging

    import cloudpickle  # noqa: F401

    import fabric.local
    from fabric.local import _bootstrap, _exceptions, _shm  # noqa: F401

    for module in sorted(set(fabric.local._LAZY.values())):
        importlib.import_module(module)
    for module in extra:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a child importing it will see the error where it matters
            logging.getLogger(__name__).warning("fork server cannot preload %r: %s", module, exc)


def _fork(
    fds: list[int],
    control: socket.socket,
    selector: selectors.BaseSelector,
    children: dict[int, tuple[int, socket.socket]],
) -> None:
    status = socket.socket(fileno=fds[0])
    launch_fd, child_fds = fds[1], fds[2:]
    server_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            selector.close()
            control.close()
            status.close()
            for _pid, other in children.values():
                other.close()
            for pidfd in children:
                os.close(pidfd)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            code = _run_child(launch_fd, child_fds, server_pid)
        finally:
            os._exit(code)
    os.close(launch_fd)
    for fd in child_fds:
        os.close(fd)
    with contextlib.suppress(OSError):  # the parent gave up on this child; still reap it
        status.sendall(PID.pack(pid))
    pidfd = os.pidfd_open(pid)
    children[pidfd] = (pid, status)
    selector.register(pidfd, selectors.EVENT_READ)


def _run_child(launch_fd: int, fds: list[int], server_pid: int) -> int:
    from fabric.local import _bootstrap

    launch = _bootstrap.read_launch(launch_fd)
    code = _bootstrap.child_main(launch, fds, expected_ppid=server_pid, long_lived_starter=True)
    # Like a spawned interpreter, run the exit handlers registered here (weakref
    # finalizers dropping shared-block references, logging's flush); the server
    # registered none of its own that could misfire in a child.
    atexit._run_exitfuncs()
    _bootstrap.flush_std_streams()
    return code


def _child_exited(
    pidfd: int, selector: selectors.BaseSelector, children: dict[int, tuple[int, socket.socket]]
) -> None:
    pid, status = children.pop(pidfd)
    selector.unregister(pidfd)
    os.close(pidfd)
    _pid, wait_status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        status.sendall(CODE.pack(os.waitstatus_to_exitcode(wait_status)))
    status.close()
