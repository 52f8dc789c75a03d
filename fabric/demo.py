"""``fabric demo``: one job on this machine's cores, then through a local cluster.

The job counts the primes below a bound, cut into chunks. It runs serially,
then on a ``fabric.local.Pool`` (one process per core), then through a broker
and two worker nodes started on this machine with ephemeral CURVE keys. Every
result is checked against the serial one; every process started is stopped.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def count_primes(bounds: tuple[int, int]) -> int:
    """Count the primes in ``[lo, hi)`` by trial division (deliberately CPU-bound)."""
    lo, hi = bounds
    return sum(1 for n in range(max(lo, 2), hi) if all(n % d for d in range(2, math.isqrt(n) + 1)))


def chunks(limit: int, count: int) -> list[tuple[int, int]]:
    """Cut ``[0, limit)`` into ``count`` contiguous ranges."""
    step = -(-limit // count)
    return [(lo, min(lo + step, limit)) for lo in range(0, limit, step)]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand."""
    demo = subparsers.add_parser("demo", help="run a parallel job locally, then on a local cluster")
    demo.add_argument("--limit", type=int, default=300_000, help="count primes below this")
    demo.add_argument("--chunks", type=int, default=48, help="tasks to cut the job into")
    demo.add_argument("--workers", type=int, default=2, help="worker nodes for the cluster part")
    demo.set_defaults(func=run)


def _timed(label: str, job: Callable[[], list[int]], expected: list[int] | None) -> list[int]:
    start = time.perf_counter()
    results = job()
    elapsed = time.perf_counter() - start
    verdict = "" if expected is None else ("  ok" if results == expected else "  WRONG")
    print(f"  {label:<34} {sum(results):>8} primes in {elapsed * 1e3:8.1f} ms{verdict}")
    if expected is not None and results != expected:
        raise SystemExit(f"fabric demo: {label} returned wrong results")
    return results


@contextmanager
def _local_cluster(workers: int) -> Iterator[tuple[str, str]]:
    """Start a CURVE-secured broker and ``workers`` worker nodes; yield (address, keys)."""
    from fabric.broker.keys import generate
    from fabric.broker.server import Broker
    from fabric.remote.cli import broker_services

    with tempfile.TemporaryDirectory(prefix="fabric-demo-") as keys:
        generate(keys)
        services = [factory() for factory in broker_services()]
        with Broker("tcp://127.0.0.1:0", keys=keys, services=services) as broker:
            nodes = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fabric",
                        "worker",
                        broker.address,
                        "--keys",
                        keys,
                        "--processes",
                        "1",
                        "--name",
                        f"demo-worker-{i}",
                    ],
                )
                for i in range(1, workers + 1)
            ]
            try:
                yield broker.address, keys
            finally:
                for node in nodes:
                    node.terminate()
                for node in nodes:
                    try:
                        node.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        node.kill()
                        node.wait()


def run(args: argparse.Namespace) -> int:
    """Run the demo; return 0 when every result is right."""
    import fabric.local
    from fabric.remote import Manager

    work = chunks(args.limit, args.chunks)
    cores = os.cpu_count() or 1
    print(f"fabric demo: primes below {args.limit:,} in {len(work)} tasks, {cores} cores\n")

    print("local layer (fabric.local)")
    expected = _timed("serial, one process", lambda: [count_primes(c) for c in work], None)
    with fabric.local.Pool() as pool:
        _timed(f"Pool({cores}).map", lambda: pool.map(count_primes, work), expected)
    with fabric.local.Executor() as executor:
        _timed("Executor.map", lambda: list(executor.map(count_primes, work)), expected)

    print(f"\ncluster (broker + {args.workers} worker nodes on loopback, CURVE keys)")
    start = time.perf_counter()
    with _local_cluster(args.workers) as (address, keys), Manager(address, keys=keys) as mgr:
        print(f"  broker at {address}, up in {(time.perf_counter() - start) * 1e3:.0f} ms")
        results = mgr.dict("demo-results")
        with mgr.Executor() as executor:
            cluster = _timed(
                "cluster Executor.map",
                lambda: list(executor.map(count_primes, work)),
                expected,
            )
        results.update({f"{lo}-{hi}": n for (lo, hi), n in zip(work, cluster, strict=True)})
        print(f"  shared dict 'demo-results' holds {len(results)} entries")
    print("\nall results correct; broker and workers stopped")
    return 0
