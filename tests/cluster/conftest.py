"""Fixtures of the cluster tests: a lab of network-namespace hosts."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.cluster import compose, netlab


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[..., netlab.Lab]]:
    """Build labs of named hosts; every lab is torn down after the test, whatever happened."""
    reason = netlab.available()
    if reason is not None:
        pytest.skip(f"no network-namespace lab here: {reason}")
    with ExitStack() as stack:

        def make(*names: str, seed: int = 8) -> netlab.Lab:
            logdir = tmp_path / f"lab{random.randrange(1 << 30)}"
            logdir.mkdir()
            return stack.enter_context(netlab.Lab(names, seed=seed, logdir=logdir))

        yield make


@pytest.fixture(scope="session")
def compose_env() -> dict[str, str]:
    """The environment for compose, once the fabric image is built; skip without Docker."""
    reason = compose.engine_problem()
    if reason is not None:
        pytest.skip(f"docker tests need a Docker engine: {reason}")
    return compose.prepare_image()


@pytest.fixture
def project(compose_env: dict[str, str]) -> Iterator[compose.Project]:
    """A compose project of its own, taken down with its volumes after the test."""
    proj = compose.Project(dict(compose_env))
    try:
        yield proj
    finally:
        proj.down()
