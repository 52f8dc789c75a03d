"""Every shell block of README.md and docs/ runs through bash against the installed ``fabric``.

How a block runs (its directory, its substitutions, Docker) is its tag's business:
see tests/docs/blocks.py; how long-running commands are started, awaited and
stopped: see tests/docs/shell.py. A block tagged not-run is skipped with its
reason, and the run ends with the list of them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import compose
from tests.docs import shell
from tests.docs.blocks import PYTHON, ROOT, SHELL, TEXT, Block, all_blocks, stray_tags, substitute

TIMEOUT = {"local": 120, "checkout": 300, "docker": 900, "not-run": 10}
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv*", ".tox", "build", "dist", "site", "__pycache__", "*.so", "*.egg-info",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
)  # fmt: skip


def params() -> list[object]:
    found: list[object] = []
    for block in all_blocks():
        if block.lang not in SHELL:
            continue
        marks = [pytest.mark.timeout(TIMEOUT.get(block.mode, 10))]
        if block.mode == "docker":
            marks.append(pytest.mark.docker)
        if block.mode == "not-run":
            marks.append(pytest.mark.skip(reason=f"not run (tagged): {block.reason}"))
        found.append(pytest.param(block, id=block.id, marks=marks))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def compose_project(project: str) -> Iterator[None]:
    """Take the project down with its volumes and remove its image tags, whatever happened."""
    try:
        yield
    finally:
        down = ["-p", project, "down", "-v", "--remove-orphans", "-t", "5"]
        compose.run(down, env=dict(os.environ), timeout=300, check=False)
        compose.docker("image", "rm", f"fabric-cluster:{project}", project, check=False)
    label = f"label={compose.LABEL}={project}"
    left = [
        compose.docker(kind, "ls", "-aq" if kind == "container" else "-q", "--filter", label)
        for kind in ("container", "network", "volume")
    ]
    assert not "".join(left).split(), f"compose project {project} left {left}"


SHIM = """import os, sys

args = sys.argv[1:]
if args[:1] != ["compose"]:
    os.execv(DOCKER, [DOCKER, *args])
args = args[1:]
i = 0  # past the global options, to the compose command
while i < len(args) and args[i].startswith("-"):
    i += 2 if args[i] in ("-f", "--file", "-p", "--project-name", "--env-file") else 1
if args[i : i + 1] in (["run"], ["exec"]) and not sys.stdin.isatty():
    args.insert(i + 1, "-T")  # v2 allocates no TTY without a terminal; v1 must be told
os.execvp("docker-compose", ["docker-compose", *args])
"""


def compose_v1_shim(bin_dir: Path) -> Path:
    """A directory whose ``docker`` runs ``docker compose ...`` as Compose v1 would.

    Only where Compose v1 alone is installed (the cluster page says every command
    takes either): ``docker-compose ...``, with ``-T`` for ``run`` and ``exec``
    when there is no terminal, as Compose v2 decides by itself.
    """
    bin_dir.mkdir()
    if compose.compose_command() == ("docker-compose",):
        shim = bin_dir / "docker"
        docker = repr(shutil.which("docker"))
        shim.write_text(f"#!{sys.executable}\nDOCKER = {docker}\n{SHIM}")
        shim.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("block", params())
def test_shell_block_runs(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    assert not block.problems, block.problems
    project = f"fabricsnippet{secrets.token_hex(4)}"
    cmds = shell.commands(
        substitute(block, {"port": str(free_port()), "project": project}), block.lang
    )
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    assert shutil.which("fabric", path=path), "the fabric command is not installed"
    env = dict(os.environ, PATH=path)
    cwd = tmp_path / "work"
    with contextlib.ExitStack() as stack:
        if block.mode == "docker":
            request.getfixturevalue("docker_engine")
            env.update(COMPOSE_PROJECT_NAME=project, FABRIC_IMAGE=f"fabric-cluster:{project}")
            env["PATH"] = f"{compose_v1_shim(tmp_path / 'bin')}{os.pathsep}{env['PATH']}"
            stack.enter_context(compose_project(project))
        if block.mode == "local":
            cwd.mkdir()
        else:
            shutil.copytree(ROOT, cwd, ignore=NOT_COPIED, symlinks=True)
        outcome = shell.run(cmds, cwd, tmp_path / "harness", env, TIMEOUT[block.mode] - 30)
    assert outcome.returncode == 0, outcome.explain()
    assert not outcome.leaked, f"left running (killed): {outcome.leaked}\n{outcome.explain()}"
    missing = outcome.missing(cmds)
    assert not missing, f"not printed, though the page shows it: {missing}\n{outcome.explain()}"


def test_every_block_has_a_known_kind() -> None:
    unknown = [
        f"{b.id} ({b.lang or 'no label'})"
        for b in all_blocks()
        if b.lang not in PYTHON | SHELL | TEXT
    ]
    assert not unknown, f"label these blocks python, a shell (bash, console) or text: {unknown}"


def test_every_tag_applies_to_a_code_block() -> None:
    misplaced = stray_tags() + [
        f"{b.id}: a text block is never run, a tag on it says otherwise"
        for b in all_blocks()
        if b.lang in TEXT and (b.mode != "local" or b.subs)
    ]
    assert not misplaced, misplaced
    problems = [f"{b.id}: {p}" for b in all_blocks() for p in b.problems]
    assert not problems, problems


# The harness itself: each way a block can go wrong is caught.


def _run(code: str, lang: str, tmp_path: Path, grace: float = 10.0) -> shell.Outcome:
    cmds = shell.commands(code, lang)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    (tmp_path / "work").mkdir()
    env = dict(os.environ, PATH=path)
    return shell.run(cmds, tmp_path / "work", tmp_path / "harness", env, 60, grace)


def test_a_failing_command_fails_its_block(tmp_path: Path) -> None:
    outcome = _run("echo one\nfalse\necho two\n", "bash", tmp_path)
    assert outcome.returncode != 0
    assert "one" in outcome.output and "two" not in outcome.output


def test_output_a_page_shows_but_the_command_does_not_print_is_caught(tmp_path: Path) -> None:
    code = "$ echo hello\nhello\n$ echo bye\nfarewell\n"
    outcome = _run(code, "console", tmp_path)
    assert outcome.returncode == 0
    assert outcome.missing(shell.commands(code, "console")) == ["farewell"]


def test_a_server_that_dies_before_it_is_ready_fails_its_block(tmp_path: Path) -> None:
    code = "$ fabric broker --bind tcp://no-such-host.invalid:1\n$ echo after\n"
    outcome = _run(code, "console", tmp_path)
    assert outcome.returncode != 0
    assert "exited before it was ready" in outcome.output and "after" not in outcome.output


def test_a_broker_and_worker_are_awaited_then_stopped(tmp_path: Path) -> None:
    port = free_port()
    code = (
        f"$ fabric broker --bind tcp://127.0.0.1:{port}\n"
        f"$ fabric worker tcp://127.0.0.1:{port} --name w1 --processes 1\n"
        f"$ fabric status tcp://127.0.0.1:{port}\n"
    )
    outcome = _run(code, "console", tmp_path)
    assert outcome.returncode == 0, outcome.explain()
    assert "\nw1 " in outcome.output, outcome.explain()  # the status lists it: it was awaited
    assert not outcome.leaked


def test_processes_a_block_leaves_behind_are_killed_and_reported(tmp_path: Path) -> None:
    outcome = _run("sleep 600 &\necho $! >sleeper\n", "bash", tmp_path, grace=0.5)
    assert outcome.returncode == 0, outcome.explain()
    sleeper = int((tmp_path / "work" / "sleeper").read_text())
    assert outcome.leaked == [sleeper]
    stat = Path(f"/proc/{sleeper}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
