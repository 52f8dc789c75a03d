"""Start-method choice and contexts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import fabric.local
from fabric.local import context


@pytest.fixture
def fresh_choice() -> Iterator[None]:
    saved = context._Choice.method
    context._Choice.method = None
    yield
    context._Choice.method = saved


def test_default_start_method_is_forkserver(fresh_choice: None) -> None:
    assert fabric.local.get_start_method(allow_none=True) is None
    assert fabric.local.get_start_method() == "forkserver"
    assert fabric.local.get_start_method(allow_none=True) == "forkserver"


def test_set_start_method_once_unless_forced(fresh_choice: None) -> None:
    fabric.local.set_start_method("spawn")
    assert fabric.local.get_start_method() == "spawn"
    with pytest.raises(RuntimeError):
        fabric.local.set_start_method("fork")
    fabric.local.set_start_method("fork", force=True)
    assert fabric.local.get_start_method() == "fork"
    fabric.local.set_start_method(None, force=True)
    assert fabric.local.get_start_method(allow_none=True) is None


def test_global_method_applies_to_plain_process(fresh_choice: None) -> None:
    fabric.local.set_start_method("spawn")
    proc = fabric.local.Process(target=len, args=((),))
    proc.start()
    proc.join(30)
    assert type(proc._popen).__name__ == "SpawnPopen"
    assert proc.exitcode == 0


def test_unknown_method_is_refused(fresh_choice: None) -> None:
    with pytest.raises(ValueError, match="unknown start method"):
        fabric.local.get_context("vfork")
    with pytest.raises(ValueError):
        fabric.local.set_start_method("threads")


def test_all_start_methods_default_first() -> None:
    assert fabric.local.get_all_start_methods() == ["forkserver", "fork", "spawn"]


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_context_pins_its_method(method: str) -> None:
    ctx = fabric.local.get_context(method)
    assert ctx.get_start_method() == method
    assert ctx.Process._start_method == method
    assert issubclass(ctx.Process, fabric.local.Process)
    assert ctx == fabric.local.get_context(method)
    assert ctx.current_process() is fabric.local.current_process()
    assert ctx.cpu_count() == fabric.local.cpu_count()


def test_context_resolves_public_names_lazily() -> None:
    ctx = fabric.local.get_context("fork")
    assert ctx.ExceptionProxy is fabric.local.ExceptionProxy
    with pytest.raises(AttributeError):
        _ = ctx.no_such_thing
    with pytest.raises(AttributeError):
        _ = ctx._private


class _NeedsContext:
    def __init__(self, *, context: Any) -> None:
        self.context = context

    @classmethod
    def _fabric_bind_context(cls, ctx: Any) -> Any:
        return lambda: cls(context=ctx)


def test_context_binds_constructors_that_ask_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fabric.local, "NeedsContext", _NeedsContext, raising=False)
    monkeypatch.setattr(fabric.local, "__all__", [*fabric.local.__all__, "NeedsContext"])
    ctx = fabric.local.get_context("spawn")
    assert ctx.NeedsContext().context is ctx
