"""The Celery app a benchmark worker runs: a no-op task, redis URL from the environment."""

from __future__ import annotations

import os

from celery import Celery  # type: ignore[import-untyped]

URL = os.environ.get("FABRIC_BENCH_REDIS", "redis://127.0.0.1:6379/0")
app = Celery("fabric_bench", broker=URL, backend=URL)


@app.task(name="fabric_bench.noop")  # type: ignore[untyped-decorator]
def noop(x: int) -> int:
    """Return ``x``."""
    return x
