"""Start methods and contexts: how children are created, chosen globally or per call.

``forkserver`` is the default: a small server process, started on first use
with ``fabric.local`` already imported, forks every child from its single
thread, so children never inherit a lock held by another thread of the parent
(the hazard of plain ``fork`` in a threaded program) and start in a few
milliseconds instead of the tens ``spawn`` needs to boot an interpreter.

A :class:`Context` carries ``Process`` and the module functions bound to one
start method. Any other public name of :mod:`fabric.local` (``Lock``,
``Queue``...) resolves on the context lazily; an object that depends on the
start method (a pool creating processes) defines a class attribute
``_fabric_bind_context(context)`` returning the constructor bound to it.
"""

from __future__ import annotations

from fabric.local import process
from fabric.local.process import Process

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from fabric.local.process import Popen

__all__ = [
    "Context",
    "get_all_start_methods",
    "get_context",
    "get_start_method",
    "set_forkserver_preload",
    "set_start_method",
]

_METHODS = ("fork", "forkserver", "spawn")
_DEFAULT = "forkserver"


class ForkProcess(Process):
    """A Process always started with ``fork``."""

    _start_method = "fork"


class ForkServerProcess(Process):
    """A Process always started by the fork server."""

    _start_method = "forkserver"


class SpawnProcess(Process):
    """A Process always started in a fresh interpreter."""

    _start_method = "spawn"


_PROCESS_TYPES: dict[str | None, type[Process]] = {
    None: Process,
    "fork": ForkProcess,
    "forkserver": ForkServerProcess,
    "spawn": SpawnProcess,
}


class _Choice:
    """The start method chosen for this process (set once, like ``multiprocessing``)."""

    method: str | None = None


def _check(method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"unknown start method {method!r}; expected one of {_METHODS}")
    return method


def popen_type(method: str) -> type[Popen]:
    """Return the class that starts a child with ``method``."""
    _check(method)
    if method == "fork":
        from fabric.local._popen_fork import ForkPopen

        return ForkPopen
    if method == "spawn":
        from fabric.local._popen_spawn import SpawnPopen

        return SpawnPopen
    from fabric.local._popen_forkserver import ForkServerPopen

    return ForkServerPopen


def get_all_start_methods() -> list[str]:
    """Return the start methods available, the default first."""
    return [_DEFAULT, *(m for m in _METHODS if m != _DEFAULT)]


def get_start_method(allow_none: bool = False) -> str | None:
    """Return the global start method, fixing it to the default unless ``allow_none``."""
    return _Choice.method if allow_none else chosen_method()


def chosen_method() -> str:
    """Return the global start method, fixing it to the default if none was chosen."""
    if _Choice.method is None:
        _Choice.method = _DEFAULT
    return _Choice.method


def set_start_method(method: str | None, force: bool = False) -> None:
    """Choose the global start method; raise ``RuntimeError`` if it was chosen, unless ``force``."""
    if _Choice.method is not None and not force:
        raise RuntimeError("the start method has already been set")
    _Choice.method = None if method is None else _check(method)


def set_forkserver_preload(module_names: list[str]) -> None:
    """Have the fork server import ``module_names`` once, so forkserver children start with them.

    Call it before the first forkserver child is started (the server starts then).
    """
    from fabric.local import _popen_forkserver

    _popen_forkserver.set_preload(module_names)


def get_context(method: str | None = None) -> Context:
    """Return a context for ``method`` (``fork``, ``forkserver``, ``spawn``), or the global one."""
    return Context(None if method is None else _check(method))


class Context:
    """``Process``, the module functions and the ``fabric.local`` API for one start method."""

    current_process = staticmethod(process.current_process)
    parent_process = staticmethod(process.parent_process)
    active_children = staticmethod(process.active_children)
    enumerate = staticmethod(process.enumerate)
    active_count = staticmethod(process.active_count)
    cpu_count = staticmethod(process.cpu_count)
    get_context = staticmethod(get_context)
    get_all_start_methods = staticmethod(get_all_start_methods)
    set_start_method = staticmethod(set_start_method)
    set_forkserver_preload = staticmethod(set_forkserver_preload)

    def __init__(self, method: str | None) -> None:
        self._method = method
        self.Process = _PROCESS_TYPES[method]

    def get_start_method(self, allow_none: bool = False) -> str | None:
        """Return this context's start method (the global one for the default context)."""
        return self._method or get_start_method(allow_none)

    def __getattr__(self, name: str) -> Any:
        import fabric.local

        if name.startswith("_") or name not in fabric.local.__all__:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")
        value = getattr(fabric.local, name)
        bind = getattr(value, "_fabric_bind_context", None)
        return value if bind is None else bind(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Context) and other._method == self._method

    def __hash__(self) -> int:
        return hash(self._method)

    def __repr__(self) -> str:
        return f"<fabric.local context {self._method or 'default'!r}>"
