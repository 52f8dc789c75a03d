"""Pack a worker's exception so that it always reaches the caller.

The format and the types are :mod:`fabric.local._exceptions`' (shared with
Process): unpack with its ``restore``, which gives the exception with a
``RemoteTraceback`` as ``__cause__``, or an ``ExceptionProxy`` when it cannot
travel. Pool workers first try the plain pickler, by reference: a forked
worker shares the caller's ``__main__``, so an exception class defined there
comes back as *the same class* and ``except MyError`` in the caller matches
(cloudpickle would rebuild ``__main__`` classes by value as new classes).
"""

from __future__ import annotations

import pickle
import traceback

from fabric.local._exceptions import capture, restore

__all__ = ["pack_exception", "restore"]


def pack_exception(exc: BaseException) -> bytes:
    """Return bytes that ``restore`` turns back into ``exc`` (or its proxy)."""
    try:
        data = pickle.dumps(exc, 5)
        pickle.loads(data)  # a custom __init__ signature only fails here
    except Exception:
        return capture(exc)  # cloudpickle, else a proxy
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ != "builtins":
        name = f"{cls.__module__}.{name}"
    tb = "".join(traceback.format_exception(exc))
    return pickle.dumps((data, name, _safe_str(exc), tb), 5)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__} object>"
