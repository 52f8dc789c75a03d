"""The example job judges results honestly: it passes on a good run and fails on a bad one."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from tests.cluster import jobs


def _load_job() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cluster_job", jobs.JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_passes_when_every_result_is_right(capsys: pytest.CaptureFixture[str]) -> None:
    job = _load_job()
    assert job.main(["--tasks", "20"]) == 0
    assert jobs.summary_of(capsys.readouterr().out) == jobs.Summary(20, 20, 0, 0, 0)


def test_job_fails_on_a_wrong_result(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _load_job()
    right = job.expected
    monkeypatch.setattr(job, "expected", lambda i: right(i) + (i == 7))
    assert job.main(["--tasks", "20", "--no-shared-dict"]) == 1
    assert jobs.summary_of(capsys.readouterr().out) == jobs.Summary(20, 20, 0, 0, 1)


def test_job_counts_a_misdelivered_result_as_duplicate_and_lost(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _load_job()
    real = job.square_sum

    def misdelivered(i: int, pause: float, shared: object) -> tuple[int, int, str]:
        _, value, node = real(i - (i == 5), pause, shared)  # task 5 answers as task 4
        return i - (i == 5), value, node

    monkeypatch.setattr(job, "square_sum", misdelivered)
    assert job.main(["--tasks", "20", "--no-shared-dict"]) == 1
    assert jobs.summary_of(capsys.readouterr().out) == jobs.Summary(20, 20, 1, 1, 0)
