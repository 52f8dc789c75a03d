"""Run a checked workload through a fabric cluster; exit 0 only if every result is right.

Each task ``i`` computes ``sum(k * k for k in range(i))`` on a worker node and
returns it with its index and the node that ran it; the job compares every
result with the closed form ``(i - 1) i (2i - 1) / 6`` and, unless
``--no-shared-dict``, also reads back what each task stored in a shared dict.
It prints one line a result with ``--progress`` (``result INDEX NODE``), then the
summary line ``submitted=N received=N duplicates=0 lost=0 wrong=0``.

    python cluster_job.py tcp://broker:5555 --keys /var/lib/fabric/keys --tasks 200
    python cluster_job.py            # on a throw-away cluster on this machine
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections import Counter
from concurrent.futures import as_completed
from typing import Any

from fabric.remote import Manager


def square_sum(i: int, pause: float, shared: Any) -> tuple[int, int, str]:
    """The task: a sum of squares, stored in ``shared`` too when given."""
    if pause:
        time.sleep(pause)  # stands for real work, so a fault can land mid-task
    value = sum(k * k for k in range(i))
    if shared is not None:
        shared[i] = value
    return i, value, os.environ.get("FABRIC_NODE") or socket.gethostname()


def expected(i: int) -> int:
    """The closed form of ``square_sum``."""
    return (i - 1) * i * (2 * i - 1) // 6


def run(args: argparse.Namespace) -> int:
    """Submit the tasks, check every result, print the summary; return the exit status."""
    seen: Counter[int] = Counter()
    wrong = 0
    with Manager(args.address, keys=args.keys) as mgr:
        shared = None if args.no_shared_dict else mgr.dict(f"cluster-job-{os.getpid()}")
        with mgr.Executor() as executor:
            futures = [
                executor.submit(square_sum, i, args.task_seconds, shared) for i in range(args.tasks)
            ]
            try:
                for future in as_completed(futures, timeout=args.timeout):
                    try:
                        i, value, node = future.result()
                    except Exception as exc:  # counted as lost below, and said why
                        print(f"error {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                        continue
                    # The index comes from the task, so a result delivered to the
                    # wrong future shows up as one duplicate and one lost.
                    seen[i] += 1
                    wrong += value != expected(i)
                    if args.progress:
                        print(f"result {i} {node}", flush=True)
            except TimeoutError:
                print(f"error: timed out after {args.timeout} s", file=sys.stderr, flush=True)
                executor.shutdown(wait=False, cancel_futures=True)
        if shared is not None:
            stored = dict(shared.items())
            wrong += sum(stored.get(i) != expected(i) for i in range(args.tasks))
    duplicates = sum(n - 1 for n in seen.values())
    lost = args.tasks - len(seen)
    print(
        f"submitted={args.tasks} received={sum(seen.values())} "
        f"duplicates={duplicates} lost={lost} wrong={wrong}",
        flush=True,
    )
    return 0 if duplicates == lost == wrong == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the job."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "address", nargs="?", help="the broker, e.g. tcp://broker:5555 (none: a local cluster)"
    )
    parser.add_argument("--keys", help="the cluster's key directory (fabric keygen)")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--task-seconds", type=float, default=0.0, help="work time per task")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    parser.add_argument("--progress", action="store_true", help="print a line per result")
    parser.add_argument("--no-shared-dict", action="store_true")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
