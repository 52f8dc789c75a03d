"""Run one task inside a task process: payload bytes in, result bytes out.

A task is ``(fn, args, kwargs, capture)`` pickled with cloudpickle. The result is
``(ok, value, stdout, stderr)``: ``value`` is the return value, or
``(exception, traceback text)``. An exception or return value that will not
pickle still comes back, as a RemoteError or a PicklingError naming the type.
``capture`` swaps sys.stdout/sys.stderr for buffers while the task runs (Python
level writes only; output written to fd 1/2 directly goes to the node's own
streams), so the client can print the output where the task was submitted.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import cloudpickle

from fabric.remote._errors import RemoteError


@dataclass(frozen=True)
class Task:
    """A call to run remotely."""

    fn: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    capture: bool = False


@dataclass(frozen=True)
class Outcome:
    """What came back from a task."""

    ok: bool
    value: Any
    stdout: str = ""
    stderr: str = ""


def encode_task(task: Task) -> bytes:
    """Pickle a task (cloudpickle, so lambdas and __main__ functions travel)."""
    return cloudpickle.dumps(task, protocol=5)  # type: ignore[no-any-return]


def decode_outcome(payload: bytes) -> Outcome:
    """Unpickle a task result payload."""
    outcome = cloudpickle.loads(payload)
    assert isinstance(outcome, Outcome)
    return outcome


def run_task(payload: bytes) -> tuple[bool, bytes]:
    """Run a pickled task; return ``(ok, pickled Outcome)``. Never raises for user errors."""
    out, err = io.StringIO(), io.StringIO()
    capture = False
    try:
        task = cloudpickle.loads(payload)
        capture = bool(task.capture)
        with _captured(out, err, capture):
            value = task.fn(*task.args, **(task.kwargs or {}))
        outcome = Outcome(True, value, out.getvalue(), err.getvalue())
    except BaseException as exc:  # a task's SystemExit/KeyboardInterrupt is its result too
        outcome = Outcome(False, (exc, _format(exc)), out.getvalue(), err.getvalue())
    return outcome.ok, _encode(outcome)


def _encode(outcome: Outcome) -> bytes:
    try:
        return cloudpickle.dumps(outcome, protocol=5)  # type: ignore[no-any-return]
    except Exception as exc:
        if outcome.ok:
            kind = type(outcome.value).__qualname__
            problem: BaseException = pickle.PicklingError(
                f"the task's return value ({kind}) cannot be pickled: {exc}"
            )
            value: Any = (problem, "")
        else:
            original, tb_text = outcome.value
            value = (RemoteError(type(original).__qualname__, str(original), tb_text), tb_text)
        safe = Outcome(False, value, outcome.stdout, outcome.stderr)
        return cloudpickle.dumps(safe, protocol=5)  # type: ignore[no-any-return]


@contextlib.contextmanager
def _captured(out: io.StringIO, err: io.StringIO, enabled: bool) -> Any:
    if not enabled:
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
