"""A Monte-Carlo estimate of pi across a cluster, results in a shared dict.

With no argument it starts an embedded cluster on this machine; with an address
and a key directory it joins a running one:

    python examples/monte_carlo_cluster.py
    python examples/monte_carlo_cluster.py tcp://broker:5555 keys/
"""

import random
import sys

from fabric.remote import Manager


def throw(seed: int, darts: int, results) -> int:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    hits = sum(1 for _ in range(darts) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    results[seed] = hits
    return hits


def main(address: str | None, keys: str | None) -> None:
    batches, darts = 32, 20_000
    with Manager(address, keys=keys) as mgr:
        results = mgr.dict("monte-carlo")
        results.clear()
        with mgr.Executor() as ex:
            hits = sum(ex.map(throw, range(batches), [darts] * batches, [results] * batches))
        assert len(results) == batches and sum(results.values()) == hits
        estimate = 4 * hits / (batches * darts)
    assert abs(estimate - 3.14159) < 0.05, estimate
    print(f"pi ~ {estimate:.4f} from {batches * darts:,} darts in {batches} tasks")


if __name__ == "__main__":
    main(*(sys.argv[1:3] if len(sys.argv) > 2 else (None, None)))
