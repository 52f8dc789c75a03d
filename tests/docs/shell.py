"""Run a shell block through bash: long-running commands in the background, then stop them.

A block is cut into commands (a ``console`` block: the ``$`` lines, each followed
by the output it shows; a ``bash`` block: its lines, with continuations and
here-documents). The commands that serve until stopped are known here and run
in the background, each in a process group of its own:

- ``fabric broker``: ready once ``fabric status`` answers at its address;
- ``fabric worker ... --name N``: ready once that broker lists worker N;
- ``docker compose ... logs -f``: follows logs, nothing to wait for.

Any other command runs in the foreground and must succeed. When the script ends,
however it ends, it stops its background commands (SIGTERM to each group, then
waits for them). The script runs in a session of its own; whatever is still
alive in that session afterwards is killed by PID and reported as leaked. The
output a console block shows under a command must appear in that command's output.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fabric.cli import build_parser

READY_S = 60
PRELUDE = r"""set -euo pipefail
set -m  # job control: each background command gets a process group of its own
__pids=()
__stop() {
    local pid
    for pid in "${__pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${__pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap __stop EXIT
__started() { __pids+=("$1"); }
__poll() {  # PID SECONDS PROBE: run PROBE until it succeeds, as long as PID lives
    local pid=$1 deadline=$((SECONDS + $2))
    until eval "$3" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null ||
            { echo "snippet test: exited before it was ready" >&2; return 1; }
        ((SECONDS < deadline)) || { echo "snippet test: not ready after $2 s: $3" >&2; return 1; }
    done
}
"""
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(?P<word>\w+)\1")


@dataclass
class Command:
    """One command of a block, as written, and the output lines the page shows under it."""

    text: str
    expected: list[str] = field(default_factory=list)


def commands(code: str, lang: str) -> list[Command]:
    """Cut a block into commands (``console``: ``$`` lines; otherwise every line)."""
    lines = code.splitlines()
    found: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if lang == "console" and not line.startswith("$ "):
            if not found:
                raise AssertionError(f"output line before any $ command: {line!r}")
            found[-1].expected.append(line.rstrip())
            i += 1
            continue
        text = [line[2:] if lang == "console" else line]
        while text[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            text.append(lines[i][2:] if lang == "console" else lines[i])
        for heredoc in HEREDOC.finditer("\n".join(text)):
            while i + 1 < len(lines):
                i += 1
                text.append(lines[i])
                if lines[i].strip() == heredoc["word"]:
                    break
        found.append(Command("\n".join(text)))
        i += 1
    return found


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # a here-document or other syntax shlex does not know: not a server
        return []


def _fabric_args(words: list[str]) -> argparse.Namespace | None:
    """The parsed ``fabric`` command line, as the installed CLI parses it."""
    if not words or Path(words[0]).name != "fabric":
        return None
    try:
        return build_parser().parse_args(words[1:])
    except SystemExit as exc:
        raise AssertionError(f"fabric rejects this command line: {shlex.join(words)}") from exc


def _local(address: str) -> str:
    """Where to reach a broker bound to ``address`` from this machine."""
    return re.sub(r"//(0\.0\.0\.0|\*)(?=:)", "//127.0.0.1", address)


class Background:
    """Decides which commands run in the background and how to tell they are ready."""

    def __init__(self) -> None:
        self.broker: tuple[str, str | None] | None = None  # address, keys of the last broker

    def probe(self, text: str) -> str | None:
        """None for a foreground command; else a shell probe of readiness ('' for none)."""
        words = _words(text)
        if words[:1] in (["docker"], ["docker-compose"]) and "logs" in words:
            return "" if {"-f", "--follow"} & set(words) else None
        args = _fabric_args(words)
        if args is None:
            return None
        if args.command == "broker":
            address, keys = _local(args.bind), args.keys
            self.broker = (address, keys)
            return _status(address, keys)
        if args.command == "worker":
            if self.broker is None:
                raise AssertionError("`fabric worker` with no `fabric broker` earlier in its block")
            if args.name is None:
                raise AssertionError("give `fabric worker` a --name: readiness is its listing")
            listed = (
                'import json, sys; names = [w["name"] for w in json.load(sys.stdin)["worker_list"]]'
            )
            check = f"{listed}; sys.exit({args.name!r} not in names)"
            python = shlex.quote(sys.executable)
            return f"{_status(*self.broker)} --json | {python} -c {shlex.quote(check)}"
        return None


def _status(address: str, keys: str | None) -> str:
    keys_arg = f" --keys {shlex.quote(keys)}" if keys else ""
    return f"fabric status {shlex.quote(address)}{keys_arg} --timeout 2"


def script(cmds: list[Command], harness: Path) -> str:
    """The bash script that runs ``cmds``, each command's output also kept in harness/out.N."""
    parts = [PRELUDE]
    background = Background()
    for n, cmd in enumerate(cmds):
        out = shlex.quote(str(harness / f"out.{n}"))
        probe = background.probe(cmd.text)
        if probe is not None:
            parts += [f"{{ {cmd.text}\n}} >{out} 2>&1 &", "__started $!"]
            if probe:
                parts.append(f"__poll $! {READY_S} {shlex.quote(probe)}")
        elif cmd.expected:
            parts.append(f"{{ {cmd.text}\n}} 2>&1 | tee {out}")
        else:
            parts.append(cmd.text)
    return "\n".join(parts) + "\n"


@dataclass
class Outcome:
    """What a run did: exit status, output, each command's output, leaked processes."""

    returncode: int | None  # None: timed out
    output: str
    outputs: dict[int, str]
    leaked: list[int]

    def missing(self, cmds: list[Command]) -> list[str]:
        """The output lines shown under the commands that they did not print."""
        return [
            line
            for n, cmd in enumerate(cmds)
            for line in cmd.expected
            if line not in self.outputs.get(n, "").splitlines()
        ]

    def explain(self) -> str:
        logs = "".join(f"\n--- output of command {n}:\n{text}" for n, text in self.outputs.items())
        return f"exit status {self.returncode}\n--- script output:\n{self.output}{logs}"


def run(
    cmds: list[Command],
    cwd: Path,
    harness: Path,
    env: dict[str, str],
    timeout: float,
    grace: float = 10.0,
) -> Outcome:
    """Run the commands in ``cwd`` within ``timeout``; leave no process behind."""
    harness.mkdir(parents=True, exist_ok=True)
    path = harness / "run.sh"
    path.write_text(script(cmds, harness))
    log = harness / "output"
    with log.open("w") as sink:  # a file, not a pipe: a process left behind cannot hold it open
        proc = subprocess.Popen(
            ["bash", str(path)],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    returncode: int | None
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_all(session_pids(proc.pid) | {proc.pid})
        proc.wait(timeout=30)
        returncode = None
    leaked = reap(proc.pid, grace)
    output = log.read_text(errors="replace")
    outputs = {
        n: (harness / f"out.{n}").read_text(errors="replace")
        for n in range(len(cmds))
        if (harness / f"out.{n}").exists()
    }
    return Outcome(returncode, output, outputs, leaked)


def session_pids(sid: int) -> set[int]:
    """The live (non-zombie) processes of session ``sid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.add(int(entry.name))
    return found


def reap(sid: int, grace: float) -> list[int]:
    """Wait up to ``grace`` s for session ``sid`` to empty, then kill what is left; return it."""
    _wait_exits(session_pids(sid), grace)
    left = session_pids(sid)
    _kill_all(left)
    _wait_exits(left, 10.0)
    return sorted(left)


def _wait_exits(pids: set[int], timeout: float) -> None:
    """Return once every process of ``pids`` has exited, or ``timeout`` s have passed."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
