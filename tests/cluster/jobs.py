"""Follow a run of examples/cluster_job.py: its result lines and its summary."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.netlab import Lines

JOB = Path(__file__).resolve().parents[2] / "examples" / "cluster_job.py"
_SUMMARY = re.compile(r"submitted=(\d+) received=(\d+) duplicates=(\d+) lost=(\d+) wrong=(\d+)")


@dataclass(frozen=True)
class Summary:
    """The job's own count of what it submitted and received."""

    submitted: int
    received: int
    duplicates: int
    lost: int
    wrong: int

    def line(self, scenario: str) -> str:
        """The line a scenario prints."""
        return (
            f"{scenario}: tasks submitted={self.submitted} results received={self.received}"
            f" duplicates delivered={self.duplicates} lost={self.lost} wrong={self.wrong}"
        )


@dataclass
class JobRun:
    """A running job whose stdout is read line by line."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.proc.stdout is not None
        self._reader = Lines(self.proc.stdout)

    def next_result(self, timeout: float) -> tuple[int, str]:
        """Return (task index, node) of the next result line; skip other lines."""
        while True:
            line = self._reader.get(timeout)
            self.lines.append(line)
            if line == "":
                raise AssertionError("the job ended early:\n" + "\n".join(self.lines[-40:]))
            words = line.split()
            if len(words) == 3 and words[0] == "result":
                return int(words[1]), words[2]

    def explain(self) -> str:
        """What the job said besides its result lines, then its last lines."""
        said = [line for line in self.lines if not line.startswith("result ")]
        return "\n".join([*said[-40:], "... last lines:", *self.lines[-5:]])

    def finish(self, timeout: float) -> tuple[int, Summary]:
        """Read to the end; return the exit status and the summary line."""
        while (line := self._reader.get(timeout)) != "":
            self.lines.append(line)
        status = self.proc.wait(timeout)
        for line in reversed(self.lines):
            if match := _SUMMARY.search(line):
                return status, Summary(*(int(g) for g in match.groups()))
        raise AssertionError(f"no summary line (exit {status}):\n" + "\n".join(self.lines[-40:]))


def worker_names(status_json: str) -> set[str]:
    """The worker nodes in ``fabric status --json`` output."""
    return {worker["name"] for worker in json.loads(status_json)["worker_list"]}


def summary_of(text: str) -> Summary:
    """The summary line in a job's output."""
    matches = _SUMMARY.findall(text)
    assert matches, f"no summary line in:\n{text[-4000:]}"
    return Summary(*(int(g) for g in matches[-1]))
