"""A CPU-bound job on every core: estimate pi by integrating 4 / (1 + x^2) in slices.

Run: python examples/cpu_bound.py [slices]
"""

import sys
import time

from fabric.local import Pool, cpu_count


def integrate(bounds: tuple[int, int, int]) -> float:
    """Midpoint rule over slices lo..hi of n equal slices of [0, 1]."""
    lo, hi, n = bounds
    width = 1.0 / n
    return sum(4.0 / (1.0 + ((i + 0.5) * width) ** 2) for i in range(lo, hi)) * width


def main(n: int) -> None:
    step = n // 64
    parts = [(lo, min(lo + step, n), n) for lo in range(0, n, step)]
    start = time.perf_counter()
    serial = sum(integrate(p) for p in parts)
    serial_s = time.perf_counter() - start
    with Pool() as pool:
        start = time.perf_counter()
        parallel = sum(pool.map(integrate, parts))
        parallel_s = time.perf_counter() - start
    assert abs(parallel - serial) < 1e-9, (parallel, serial)
    print(f"pi ~ {parallel:.12f}")
    print(f"serial {serial_s:.2f} s, Pool({cpu_count()}) {parallel_s:.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000)
