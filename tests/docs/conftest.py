"""The Docker prerequisites of ``docker`` blocks, and the summary of what the doc tests ran."""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest

from tests.cluster import compose
from tests.docs.blocks import PYTHON, ROOT, SHELL, all_blocks

COLLECTED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Skip without a Docker engine; else make sure the local base images exist.

    The pages' commands use them (``--build-arg BASE=fabric-base:bookworm``); the
    script reuses them when present, as .ci/cluster-prep leaves them.
    """
    reason = compose.engine_problem()
    if reason is not None:
        pytest.skip(f"docker blocks need a Docker engine: {reason}")
    subprocess.run(["bash", str(ROOT / "docker" / "build-base.sh")], check=True, timeout=900)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[COLLECTED] = any(item.nodeid.startswith("tests/docs/") for item in items)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """List the blocks tagged not-run, with their reasons, and count every kind."""
    if not config.stash.get(COLLECTED, False):
        return
    blocks = [block for block in all_blocks() if block.lang in SHELL | PYTHON]
    modes = Counter(
        f"{block.mode} {'python' if block.lang in PYTHON else 'shell'}" for block in blocks
    )
    not_run = [block for block in blocks if block.mode == "not-run"]
    write = terminalreporter.write_line
    terminalreporter.section("documentation blocks (tests/docs)")
    write(", ".join(f"{count} {kind}" for kind, count in sorted(modes.items())))
    write(f"{len(not_run)} of {len(blocks)} code blocks are tagged not-run:")
    for block in not_run:
        write(f"  {block.id}: {block.reason}")
