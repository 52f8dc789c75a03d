"""What runs in a new child: become the Process, run it, report how it ended.

Import-light on purpose: a spawned child pays for every import made here before
user code runs, so only small standard modules are imported up front;
``cloudpickle`` is imported by the unpickler only when the target needs it, and
``ctypes`` only for a daemonic child.

Launch data (spawn and forkserver) is a plain-pickled dict built by
``_launch.prepare`` in the parent; ``fds`` are the descriptors that came with it,
the report fd first, then the shared-memory segments met while pickling.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys

from fabric.local import process as _process

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_PR_SET_PDEATHSIG = 1


def spawn_main() -> None:
    """Entry point of a spawned interpreter: ``-c ... spawn_main()`` LAUNCH_FD FD...

    Exits the interpreter with the child's exit code (atexit handlers run).
    """
    launch_fd, *fds = (int(arg) for arg in sys.argv[1:])
    launch = read_launch(launch_fd)
    sys.exit(
        child_main(
            launch,
            fds,
            expected_ppid=launch["parent_pid"],
            long_lived_starter=launch["long_lived_starter"],
        )
    )


def read_launch(fd: int) -> dict[str, Any]:
    """Read and close the launch file the parent wrote."""
    try:
        data = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    launch: dict[str, Any] = pickle.loads(data)
    return launch


def child_main(
    launch: dict[str, Any], fds: list[int], *, expected_ppid: int, long_lived_starter: bool
) -> int:
    """Unpickle the process object of ``launch`` and run it; return the exit code."""
    sys.path[:] = launch["sys_path"]
    sys.argv[:] = launch["argv"]
    with contextlib.suppress(OSError):  # a removed directory: keep the one we have
        if launch["cwd"] is not None and launch["cwd"] != os.getcwd():
            os.chdir(launch["cwd"])
    report_fd, shm_fds = fds[0], fds[1:]
    try:
        if shm_fds:
            from fabric.local import _shm

            _shm.adopt_passed_fds(shm_fds)
        if launch["excepthook"] is not None:
            import fabric.local

            fabric.local.excepthook = pickle.loads(launch["excepthook"])
        process_obj: _process.Process = pickle.loads(launch["process"])
    except BaseException as exc:
        _report(None, exc, report_fd)
        flush_std_streams()
        return 1
    return run(
        process_obj,
        report_fd,
        launch["parent_name"],
        launch["parent_pid"],
        expected_ppid=expected_ppid,
        long_lived_starter=long_lived_starter,
    )


def run(
    process_obj: _process.Process,
    report_fd: int,
    parent_name: str,
    parent_pid: int,
    *,
    expected_ppid: int,
    long_lived_starter: bool,
) -> int:
    """Run ``process_obj`` as the current process and return its exit code.

    ``expected_ppid`` is the pid that created this process (the fork server for
    forkserver children); ``long_lived_starter`` says whether the thread that
    created it lives as long as its process, which ``PR_SET_PDEATHSIG`` needs.
    """
    _process._become(process_obj, parent_name, parent_pid)
    if process_obj.daemon:
        _die_with_parent(expected_ppid, long_lived_starter)
    try:
        try:
            process_obj.run()
        finally:
            _process._exit_function()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException as exc:
        code = 1
        _report(process_obj, exc, report_fd)
    finally:
        _join_threads()
        flush_std_streams()
    return code


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    if sys.stderr is not None:
        sys.stderr.write(f"{exc.code}\n")
    return 1


def _report(process_obj: _process.Process | None, exc: BaseException, report_fd: int) -> None:
    """Call the excepthook, then hand the exception to the parent through ``report_fd``."""
    import fabric.local

    args = _process.ExceptHookArgs(type(exc), exc, exc.__traceback__, process_obj)
    hook = getattr(fabric.local, "excepthook", _process.excepthook)
    try:
        hook(args)
    except BaseException as hook_exc:
        _process.excepthook(args)
        _process.excepthook(
            _process.ExceptHookArgs(type(hook_exc), hook_exc, hook_exc.__traceback__, None)
        )
    try:
        from fabric.local._exceptions import capture

        data = capture(exc)
        view = memoryview(data)
        while view:
            view = view[os.write(report_fd, view) :]
    except BaseException:  # the excepthook already reported it; the parent sees exitcode 1
        pass


def _die_with_parent(expected_ppid: int, long_lived_starter: bool) -> None:
    """Arrange for SIGKILL when the parent dies.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that created us exits, so it is
    used only when that thread lives as long as its process (the main thread,
    the fork server); otherwise a watchdog thread waits on the parent's pidfd.
    """
    if long_lived_starter:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != expected_ppid:  # the parent died before prctl took effect
            os._exit(1)
        return
    parent = _process.parent_process()
    if parent is None:
        return
    import threading

    threading.Thread(
        target=_watch_parent, args=(parent.sentinel,), name="fabric-parent-watch", daemon=True
    ).start()


def _watch_parent(sentinel: int) -> None:
    import signal

    _process.wait_readable(sentinel, None)
    os.kill(os.getpid(), signal.SIGKILL)


def _join_threads() -> None:
    threading = sys.modules.get("threading")
    if threading is None:
        return
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon and thread is not threading.current_thread():
            thread.join()


def flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
