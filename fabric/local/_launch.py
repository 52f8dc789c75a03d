"""Prepare what a spawn or forkserver child needs: launch data and the fds to hand over.

The process object (target, arguments, subclass and all) is pickled with
cloudpickle inside :func:`fabric.local._shm.passing_fds`, so lambdas, closures
and functions of ``__main__`` travel by value and every shared-memory segment
met on the way is collected to be passed with the launch.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading

from fabric.local import process as _process

_log = logging.getLogger(__name__)


def prepare(process_obj: _process.Process, report_fd: int) -> tuple[bytes, list[int]]:
    """Return the pickled launch data and the fds to pass (report fd first)."""
    import cloudpickle

    import fabric.local
    from fabric.local import _shm

    with _shm.passing_fds() as shm_fds:
        body = cloudpickle.dumps(process_obj)
    launch = {
        "sys_path": list(sys.path),
        "argv": list(sys.argv),
        "cwd": _cwd(),
        "parent_name": _process.current_process().name,
        "parent_pid": os.getpid(),
        "long_lived_starter": threading.current_thread() is threading.main_thread(),
        "excepthook": _pickled_hook(getattr(fabric.local, "excepthook", _process.excepthook)),
        "process": body,
    }
    return pickle.dumps(launch, protocol=pickle.HIGHEST_PROTOCOL), [report_fd, *shm_fds]


def _pickled_hook(hook: object) -> bytes | None:
    """Return a custom excepthook pickled for the child; None for the default."""
    if hook is _process.excepthook:
        return None
    import cloudpickle

    try:
        data: bytes = cloudpickle.dumps(hook)
    except Exception as exc:  # the child's exception still reaches us via Process.exception
        _log.warning(
            "fabric.local.excepthook cannot be pickled (%s); children use the default", exc
        )
        return None
    return data


def write_launch(data: bytes) -> int:
    """Return a memfd holding ``data`` (the child reads it with pread, so nothing blocks)."""
    fd = os.memfd_create("fabric-launch", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def python_command(code: str) -> list[str]:
    """Return the command running ``code`` in a fresh interpreter with this one's flags and path."""
    import subprocess

    prologue = f"import sys; sys.path[:] = {list(sys.path)!r}; "
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    return [sys.executable, *flags, "-c", prologue + code]


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the directory was removed; the child keeps its own
        return None
