"""Task peers of the remote layer: dask distributed, ipyparallel, Ray and Celery.

Each is optional: :func:`missing` names the ones whose package (or, for Celery,
``redis-server``) is not here. A peer is started by its class, serves
``submit_all``/``map_all``/``trip`` with 2 worker processes, and ``close``
stops every process it started and removes its temporary directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, ClassVar

WORKERS = 2
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _identity(x: int) -> int:
    return x


class Peer:
    """One running peer; subclasses start it in ``__init__``."""

    module: ClassVar[str]
    has_map: ClassVar[bool] = True

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fabric-bench-")
        # worker processes import the task's module (bench/) like any user's code
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if _ROOT not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [_ROOT, *paths] if p)

    def submit_all(self, items: list[int]) -> list[Any]:
        raise NotImplementedError

    def map_all(self, items: list[int]) -> list[Any]:
        raise NotImplementedError

    def trip(self) -> Any:
        return self.submit_all([1])

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class Dask(Peer):
    module = "distributed"

    def __init__(self) -> None:
        super().__init__()
        import dask
        import distributed

        dask.config.set({"temporary-directory": self.tmp})  # its locks too, not /tmp's
        self.cluster: Any = distributed.LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            local_directory=self.tmp,
        )
        self.client: Any = distributed.Client(self.cluster)  # type: ignore[no-untyped-call]

    def submit_all(self, items: list[int]) -> list[Any]:
        return list(self.client.gather([self.client.submit(abs, i, pure=False) for i in items]))

    def map_all(self, items: list[int]) -> list[Any]:
        return list(self.client.gather(self.client.map(abs, items, pure=False)))

    def trip(self) -> Any:
        return self.client.submit(abs, 1, pure=False).result(timeout=60)

    def close(self) -> None:
        self.client.close()
        self.cluster.close()
        super().close()


class IPyParallel(Peer):
    module = "ipyparallel"

    def __init__(self) -> None:
        super().__init__()
        import ipyparallel as ipp  # type: ignore[import-untyped]

        self.cluster = ipp.Cluster(n=WORKERS, profile_dir=self.tmp, log_level=40)
        self.rc = self.cluster.start_and_connect_sync()
        self.view = self.rc.load_balanced_view()

    def submit_all(self, items: list[int]) -> list[Any]:
        return [ar.get(timeout=120) for ar in [self.view.apply_async(abs, i) for i in items]]

    def map_all(self, items: list[int]) -> list[Any]:
        return list(self.view.map_async(abs, items).get(timeout=120))

    def trip(self) -> Any:
        return self.view.apply_async(abs, 1).get(timeout=60)

    def close(self) -> None:
        self.rc.close()
        self.cluster.stop_cluster_sync()
        super().close()


class Ray(Peer):
    module = "ray"
    has_map = False  # Ray core has no map; ray.util's Pool is a different API

    def __init__(self) -> None:
        super().__init__()
        import ray

        self.ray = ray
        ray.init(
            num_cpus=WORKERS,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            _temp_dir=self.tmp,
        )
        self.fn = ray.remote(_identity)

    def submit_all(self, items: list[int]) -> list[Any]:
        return list(self.ray.get([self.fn.remote(i) for i in items], timeout=120))

    def trip(self) -> Any:
        return self.ray.get(self.fn.remote(1), timeout=60)

    def close(self) -> None:
        self.ray.shutdown()
        super().close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Celery(Peer):
    """Celery over a redis broker and backend, both started here and stopped by PID."""

    module = "celery"
    _TASK = "fabric_bench.noop"

    def __init__(self) -> None:
        super().__init__()
        from celery import Celery as App  # type: ignore[import-untyped]

        port = _free_port()
        url = f"redis://127.0.0.1:{port}/0"
        self.procs: list[subprocess.Popen[bytes]] = []
        redis = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
        redis += ["--save", "", "--appendonly", "no", "--dir", self.tmp]
        self.procs.append(subprocess.Popen(redis, stdout=subprocess.DEVNULL))
        worker = [sys.executable, "-m", "celery", "-A", "bench._celery_app", "worker"]
        worker += ["--concurrency", str(WORKERS), "--pool", "prefork", "--loglevel", "ERROR"]
        worker += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        env = {**os.environ, "FABRIC_BENCH_REDIS": url}
        out = subprocess.DEVNULL
        self.procs.append(subprocess.Popen(worker, env=env, cwd=self.tmp, stdout=out, stderr=out))
        self.app = App("fabric_bench_client", broker=url, backend=url)
        self.app.conf.broker_connection_retry_on_startup = True

    def submit_all(self, items: list[int]) -> list[Any]:
        results = [self.app.send_task(self._TASK, (i,)) for i in items]
        return [r.get(timeout=120) for r in results]

    def map_all(self, items: list[int]) -> list[Any]:
        from celery import group

        sigs = [self.app.signature(self._TASK, (i,)) for i in items]
        return list(group(sigs, app=self.app).apply_async().get(timeout=120))

    def trip(self) -> Any:
        return self.app.send_task(self._TASK, (1,)).get(timeout=60)

    def close(self) -> None:
        self.app.close()
        for proc in reversed(self.procs):  # the worker first, then its redis
            _stop(proc)
        super().close()


PEERS: dict[str, type[Peer]] = {
    "dask distributed": Dask,
    "ipyparallel": IPyParallel,
    "Ray": Ray,
    "Celery (redis)": Celery,
}


def missing(name: str) -> str | None:
    """Why peer ``name`` cannot run here, or None if it can."""
    peer = PEERS[name]
    if importlib.util.find_spec(peer.module) is None:
        return "not installed"
    if peer is Celery and shutil.which("redis-server") is None:
        return "redis-server not on PATH"
    return None


def cold_start(peer: type[Peer]) -> tuple[float, Peer]:
    """Start ``peer`` and return the seconds to its first result, and the running peer."""
    start = time.perf_counter()
    running = peer()
    try:
        running.trip()
    except BaseException:
        running.close()
        raise
    return time.perf_counter() - start, running
