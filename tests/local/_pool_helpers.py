"""Task functions and fixtures shared by the pool and executor tests.

Module-level so multiprocessing.Pool and ProcessPoolExecutor can pickle them
by reference, and fabric's pools run them under every start method.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from pathlib import Path

_tag = "unset"


class Gate:
    """A pipe a task blocks on until the test opens it (fork inherits the fd)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.started_r, self.started_w = os.pipe()

    def open(self, passes: int) -> None:
        os.write(self.write_fd, b"x" * passes)

    def wait_started(self, count: int) -> None:
        """Block until ``count`` tasks have entered :func:`enter_gate`."""
        while count > 0:
            count -= len(os.read(self.started_r, count))

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd, self.started_r, self.started_w):
            os.close(fd)


class TwoArgError(Exception):
    """Pickles fine, but unpickling calls __init__ with one argument and fails."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a} and {b}")


class LockError(Exception):
    """Does not pickle at all: it holds a lock."""

    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def square(x: int) -> int:
    return x * x


DEFAULT_MARKER = "as imported"
_marker = DEFAULT_MARKER


def set_marker(value: str) -> None:
    global _marker
    _marker = value


def get_marker() -> str:
    return _marker


def identity(value: object) -> object:
    return value


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def pass_gate(fd: int) -> str:
    os.read(fd, 1)
    return "passed"


def enter_gate(started_fd: int, fd: int) -> str:
    os.write(started_fd, b"s")
    os.read(fd, 1)
    return "passed"


def raise_two_arg_error() -> None:
    raise TwoArgError(1, 2)


def raise_lock_error() -> None:
    raise LockError()


def return_lock() -> object:
    return threading.Lock()


def set_tag(tag: str) -> None:
    global _tag
    _tag = tag


def get_tag(_: object) -> str:
    return _tag


def die(how: str) -> None:
    """End this process the way a crash would."""
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "segfault":
        ctypes.string_at(0)
    os._exit(7)


def die_once(marker: str, how: str) -> str:
    """Crash the first time (leaving a marker), succeed when retried."""
    path = Path(marker)
    if not path.exists():
        path.touch()
        die(how)
    return "second try"


def exit_on_three(x: int) -> int:
    if x == 3:
        os._exit(7)
    return x


def _refuse_to_build() -> None:
    raise RuntimeError("cannot be rebuilt here")


class BadReduce:
    """Pickles fine; unpickling (in the caller) raises."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return _refuse_to_build, ()


def return_bad_reduce() -> BadReduce:
    return BadReduce()


def square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()
