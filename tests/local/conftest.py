"""Fixtures for the local layer: a context per start method, and a fork server started up front.

The fork server lives for the whole session, so it is started before the
per-test leak check takes its snapshot of child processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fabric.local import Context, _popen_forkserver, get_context

START_METHODS = ["fork", "forkserver", "spawn"]


@pytest.fixture(scope="session", autouse=True)
def _fork_server() -> Iterator[None]:
    _popen_forkserver.ensure_running()
    yield
    _popen_forkserver.stop()


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> Context:
    """A context for each start method (tests using it run three times)."""
    return get_context(request.param)
