"""Soak a broker: a million no-op tasks, then minutes of mixed shared-object calls.

Not part of CI (it runs for a quarter of an hour by default). It starts a
broker (CURVE keys, journal on) and worker nodes on loopback, then:

1. runs ``--tasks`` no-op tasks through ``Manager.Executor`` with at most
   ``--window`` in flight, and
2. for ``--minutes``, runs a mix of shared dict, Queue, Lock and Value calls,

printing every ``--interval`` seconds the throughput of that interval and the
broker's resident memory, then the broker's peak RSS and how much its RSS grew
over the second half of each phase (flat memory: close to zero). Figures are
printed, never asserted.

    python bench/soak.py                       # the full soak
    python bench/soak.py --tasks 20000 --minutes 0.5 --interval 2   # a quick look
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fabric.remote import Manager

FABRIC = [sys.executable, "-m", "fabric"]


def noop() -> None:
    """The task."""


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field} of pid {pid}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def cluster(workers: int, processes: int) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    """A broker and worker nodes on loopback; yield (address, keys, broker process)."""
    with tempfile.TemporaryDirectory(prefix="fabric-soak-") as tmp:
        keys = Path(tmp) / "keys"
        subprocess.run([*FABRIC, "keygen", str(keys)], check=True, capture_output=True)
        address = f"tcp://127.0.0.1:{_free_port()}"
        procs = [
            subprocess.Popen(
                [*FABRIC, "broker", "--bind", address, "--keys", str(keys),
                 "--journal", str(Path(tmp) / "journal")],
                stdout=subprocess.PIPE, text=True,
            )
        ]  # fmt: skip
        try:
            assert procs[0].stdout is not None
            if "listening" not in procs[0].stdout.readline():
                raise RuntimeError("the broker did not start")
            for i in range(workers):
                procs.append(
                    subprocess.Popen(
                        [*FABRIC, "worker", address, "--processes", str(processes),
                         "--keys", str(keys), "--name", f"soak-w{i}"],
                        text=True,
                    )
                )  # fmt: skip
            yield address, keys, procs[0]
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in reversed(procs):
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Sampler:
    """Print, every ``interval`` s, the rate of ``count()`` and the broker's RSS."""

    def __init__(self, phase: str, count: Callable[[], int], pid: int, interval: float) -> None:
        self.phase, self.count, self.pid, self.interval = phase, count, pid, interval
        self.rows: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        print(f"\n### {self.phase}\n\n| t (s) | per second | broker RSS (MiB) |\n|---:|---:|---:|")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        start = last_t = time.monotonic()
        last_n = self.count()
        while not self._stop.wait(self.interval):
            now, n = time.monotonic(), self.count()
            rss = _rss_kib(self.pid)
            self.rows.append((now - start, (n - last_n) / (now - last_t), rss))
            print(f"| {now - start:.0f} | {self.rows[-1][1]:,.0f} | {rss / 1024:.1f} |", flush=True)
            last_t, last_n = now, n

    def growth_mib(self) -> float:
        """RSS growth over the second half of the phase, in MiB."""
        half = self.rows[len(self.rows) // 2 :]
        return (half[-1][2] - half[0][2]) / 1024 if len(half) >= 2 else 0.0


def soak_tasks(mgr: Manager, n: int, window: int, sampler_args: tuple[int, float]) -> Sampler:
    """Run ``n`` no-op tasks with at most ``window`` in flight."""
    slots = threading.BoundedSemaphore(window)
    done = [0]
    lock = threading.Lock()

    def finished(_: object) -> None:
        with lock:
            done[0] += 1
        slots.release()

    sampler = Sampler(f"{n:,} no-op tasks", lambda: done[0], *sampler_args)
    with sampler, mgr.Executor() as executor:
        for _ in range(n):
            if not slots.acquire(timeout=300):
                raise TimeoutError("no task finished for 300 s")
            executor.submit(noop).add_done_callback(finished)
    return sampler


def soak_objects(mgr: Manager, seconds: float, sampler_args: tuple[int, float]) -> Sampler:
    """Run mixed shared-object calls for ``seconds``."""
    shared, queue, lock, value = mgr.dict(), mgr.Queue(), mgr.Lock(), mgr.Value("q", 0)
    ops = [0]
    sampler = Sampler(f"{seconds / 60:g} min of mixed object calls", lambda: ops[0], *sampler_args)
    deadline = time.monotonic() + seconds
    with sampler:
        i = 0
        while time.monotonic() < deadline:
            key = i % 1000  # a bounded key set: growth would be a leak, not data
            shared[key] = i
            assert shared[key] == i
            queue.put(i)
            assert queue.get(timeout=30) == i
            with lock:
                value.value = i
            ops[0] += 6
            i += 1
    return sampler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1, help="task processes per worker")
    parser.add_argument("--window", type=int, default=2000, help="tasks in flight at most")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between rows")
    args = parser.parse_args()
    with cluster(args.workers, args.processes) as (address, keys, broker):
        with Manager(address, keys=keys) as mgr:
            tasks = soak_tasks(mgr, args.tasks, args.window, (broker.pid, args.interval))
            objects = soak_objects(mgr, args.minutes * 60, (broker.pid, args.interval))
        peak = _rss_kib(broker.pid, "VmHWM") / 1024
        print(
            f"\nbroker peak RSS {peak:.1f} MiB; RSS growth over the second half:"
            f" tasks {tasks.growth_mib():+.1f} MiB, object calls {objects.growth_mib():+.1f} MiB"
            f" ({args.workers} worker nodes x {args.processes} task processes)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
