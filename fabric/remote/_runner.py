"""Run one task inside a task process: payload bytes in, result bytes out.

A task travels as ``(function blob, args, kwargs, capture, many)`` pickled with
cloudpickle, the function pickled on its own first: a map pickles its function
once for all its chunks, and a task process unpickles a function only when it
differs from the previous task's (``TaskRunner``). ``many`` marks a chunk:
``args`` is then a tuple of argument tuples and the value a list. The result is
a plain ``(ok, value, stdout, stderr)`` tuple: ``value`` is the return value,
or ``(exception, traceback text)``. It is pickled with the C pickler, and with
cloudpickle only if that fails (a lambda or a class made inside the task); an
exception or return value that will not pickle at all still comes back, as a
RemoteError or a PicklingError naming the type. ``capture`` swaps
sys.stdout/sys.stderr for buffers while the task runs (Python level writes
only; output written to fd 1/2 directly goes to the node's own streams), so the
client can print the output where the task was submitted.
"""

from __future__ import annotations

import io
import pickle
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import cloudpickle

from fabric.remote._errors import RemoteError

# cloudpickle's own test (by reference unless defined in __main__, dynamically, or in a
# module registered by value); without it every function goes through cloudpickle
_should_pickle_by_reference = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)


class Outcome(NamedTuple):
    """What came back from a task."""

    ok: bool
    value: Any
    stdout: str = ""
    stderr: str = ""


def encode_function(fn: Callable[..., Any]) -> bytes:
    """Pickle a task's function (cloudpickle, so lambdas and __main__ functions travel).

    A function cloudpickle would send by reference anyway (a builtin, or one a
    module exports) goes through the C pickler: the same bytes, several times faster.
    """
    if _by_reference(fn):
        return pickle.dumps(fn, protocol=5)
    return cloudpickle.dumps(fn, protocol=5)  # type: ignore[no-any-return]


def _by_reference(fn: Any) -> bool:
    if isinstance(fn, types.BuiltinFunctionType):
        return isinstance(fn.__self__, types.ModuleType)  # abs, os.getpid: not a bound method
    if isinstance(fn, types.FunctionType) and _should_pickle_by_reference is not None:
        return bool(_should_pickle_by_reference(fn))
    return False


def encode_task(
    fn_blob: bytes,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    capture: bool = False,
    many: bool = False,
) -> bytes:
    """Pickle a call of ``fn_blob`` (from ``encode_function``); a chunk of calls if ``many``.

    Arguments that are plain data (numbers, strings, bytes, None, tuples of them)
    go through the C pickler: the same bytes cloudpickle would make, in half the
    time (no cloudpickle pickler set up for every task).
    """
    task = (fn_blob, args, kwargs or None, capture, many)
    if not kwargs and _plain(args):
        return pickle.dumps(task, protocol=5)
    return cloudpickle.dumps(task, protocol=5)  # type: ignore[no-any-return]


_PLAIN = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _plain(values: tuple[Any, ...]) -> bool:
    for v in values:  # noqa: SIM110 (all() over a generator costs twice as much per task)
        if type(v) not in _PLAIN and not (type(v) is tuple and _plain(v)):
            return False
    return True


def decode_outcome(payload: bytes) -> Outcome:
    """Unpickle a task result payload."""
    return Outcome(*pickle.loads(payload))


class TaskRunner:
    """Run pickled tasks one after another, keeping the last function unpickled."""

    def __init__(self) -> None:
        self._blob = b""
        self._fn: Callable[..., Any] | None = None

    def run(self, payload: bytes) -> tuple[bool, bytes]:
        """Run a pickled task; return ``(ok, pickled outcome)``. Never raises for user errors."""
        out = err = None
        try:
            fn_blob, args, kwargs, capture, many = pickle.loads(payload)
            fn = self._function(fn_blob)
            if capture:
                out, err = io.StringIO(), io.StringIO()
                saved = sys.stdout, sys.stderr
                sys.stdout, sys.stderr = out, err
            try:
                if many:
                    value: Any = [fn(*a) for a in args]
                else:
                    value = fn(*args, **kwargs) if kwargs else fn(*args)
            finally:
                if capture:
                    sys.stdout, sys.stderr = saved
            outcome = (True, value, *_text(out, err))
        except BaseException as exc:  # a task's SystemExit/KeyboardInterrupt is its result too
            outcome = (False, (exc, _format(exc)), *_text(out, err))
        return outcome[0], _encode(outcome)

    def _function(self, blob: bytes) -> Callable[..., Any]:
        if blob != self._blob or self._fn is None:
            self._fn, self._blob = pickle.loads(blob), blob
        return self._fn


def _text(out: io.StringIO | None, err: io.StringIO | None) -> tuple[str, str]:
    return (out.getvalue() if out else "", err.getvalue() if err else "")


def _encode(outcome: tuple[bool, Any, str, str]) -> bytes:
    try:
        return pickle.dumps(outcome, protocol=5)
    except Exception:
        pass  # made in the task or in __main__: cloudpickle sends it by value
    try:
        return cloudpickle.dumps(outcome, protocol=5)  # type: ignore[no-any-return]
    except Exception as exc:
        ok, value, stdout, stderr = outcome
        if ok:
            kind = type(value).__qualname__
            problem: BaseException = pickle.PicklingError(
                f"the task's return value ({kind}) cannot be pickled: {exc}"
            )
            safe: Any = (problem, "")
        else:
            original, tb_text = value
            safe = (RemoteError(type(original).__qualname__, str(original), tb_text), tb_text)
        return cloudpickle.dumps((False, safe, stdout, stderr), protocol=5)  # type: ignore[no-any-return]


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
