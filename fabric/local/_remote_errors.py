"""Carry an exception raised in a worker back to the caller, always.

The worker packs ``(exception, formatted traceback)``. The exception travels
as itself when it survives a pickle round trip *in the worker* (checked there,
because an exception whose ``__init__`` takes other arguments pickles fine and
only fails to unpickle, which is how ``multiprocessing.Pool.map`` hangs
forever); otherwise a :class:`~fabric.errors.RemoteError` proxy carries its
type name, message and traceback. The caller sees the exception with a
:class:`RemoteTraceback` as ``__cause__``, as ``concurrent.futures`` does.
"""

from __future__ import annotations

import pickle
import traceback

import cloudpickle

from fabric.errors import RemoteError

__all__ = ["RemoteTraceback", "pack_exception", "unpack_exception"]


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def pack_exception(exc: BaseException) -> bytes:
    """Pickle ``exc`` and its traceback so that unpickling cannot fail."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for dumps in (pickle.dumps, cloudpickle.dumps):
        try:
            data: bytes = dumps((exc, tb), 5)
            pickle.loads(data)
        except Exception:
            continue
        return data
    proxy = RemoteError(type(exc).__qualname__, _safe_str(exc), tb)
    return pickle.dumps((proxy, tb), 5)


def unpack_exception(data: bytes) -> BaseException:
    """Rebuild a packed exception with its worker traceback as ``__cause__``."""
    try:
        exc, tb = pickle.loads(data)
    except Exception as err:  # the parent lacks something the worker had
        tb = f"(the worker's exception could not be unpickled in the caller: {err!r})\n"
        exc = RemoteError("UnpicklableException", str(err), tb)
    exc.__cause__ = RemoteTraceback(tb)
    return exc  # type: ignore[no-any-return]


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<str() of {type(exc).__qualname__} failed>"
