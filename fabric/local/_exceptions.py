"""Carry an exception from a child process to its parent, even one that does not pickle.

The child calls :func:`capture` on the exception it could not handle; the
parent calls :func:`restore` on the bytes. An exception that round-trips
through cloudpickle comes back as itself with a :class:`RemoteTraceback` as its
``__cause__`` (the child's formatted traceback, the idiom of
``concurrent.futures``); one that does not (a custom ``__init__`` signature, an
unpicklable attribute) comes back as an :class:`ExceptionProxy` holding its type
name, message and traceback, so an exception always arrives.
"""

from __future__ import annotations

import pickle

__all__ = ["ExceptionProxy", "RemoteTraceback", "capture", "restore"]


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in another process."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n" + self.tb


class ExceptionProxy(Exception):
    """Stand-in for a child's exception that could not be pickled.

    ``type_name`` is the qualified name of the original type, ``message`` its
    ``str()``, ``traceback`` the child's formatted traceback.
    """

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(type_name, message, traceback)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def capture(exc: BaseException) -> bytes:
    """Return ``exc`` and its traceback as bytes that :func:`restore` always accepts."""
    import traceback

    import cloudpickle

    described = (_type_name(exc), _safe_str(exc), "".join(traceback.format_exception(exc)))
    try:
        data = cloudpickle.dumps(exc)
        pickle.loads(data)  # a custom __init__ signature only fails here
    except Exception:
        data = None
    return pickle.dumps((data, *described))


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__} object>"


def restore(data: bytes) -> BaseException:
    """Rebuild the exception :func:`capture` produced, with the child's traceback attached."""
    payload, type_name, message, tb = pickle.loads(data)
    if payload is not None:
        try:
            exc: BaseException = pickle.loads(payload)
        except Exception:  # e.g. the exception's module is not importable here
            pass
        else:
            exc.__cause__ = RemoteTraceback(tb)
            return exc
    return ExceptionProxy(type_name, message, tb)
