"""Errors and warnings of the remote layer, and the remote-traceback wrapper."""

from __future__ import annotations

from fabric.errors import FabricError


class LeaseLostError(FabricError):
    """A lock lease this client held was revoked (its session expired) before it was released."""


class RemoteError(FabricError):
    """Stand-in for a remote exception that could not be pickled back; keeps its type and text."""

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (RemoteError, (self.type_name, self.message, self.traceback_text))


class OwnerLostWarning(UserWarning):
    """A lock was acquired after its previous owner's session died while holding it."""


class RemoteTraceback(Exception):
    """Carry a remote traceback as text; set as ``__cause__`` of the re-raised exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def with_remote_traceback(exc: BaseException, tb_text: str) -> BaseException:
    """Attach ``tb_text`` to ``exc`` as its cause, the way concurrent.futures does."""
    if tb_text:
        exc.__cause__ = RemoteTraceback(f'\n"""\n{tb_text}"""')
    return exc
