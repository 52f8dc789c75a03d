"""Pool over the cluster: the multiprocessing.Pool API."""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any

import cloudpickle
import pytest

from tests.remote.conftest import Cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def init(value: int) -> None:
    # the environment of the task process: this module travels by value, its globals too
    os.environ["POOL_INIT"] = str(value)


def initialized(x: int) -> tuple[int, int]:
    return x, int(os.environ["POOL_INIT"])


def fails(x: int) -> int:
    raise ValueError(x)


def wait_for(event: Any) -> None:
    assert event.wait(60)


def test_pool_api(cluster: Cluster) -> None:
    cluster.node(processes=2)
    mgr = cluster.manager()
    with mgr.Pool(initializer=init, initargs=(7,)) as pool:
        assert pool.apply(divmod, (7, 2)) == (3, 1)
        assert pool.map(abs, range(-10, 0)) == list(range(10, 0, -1))
        assert pool.map(abs, range(-10, 0), chunksize=3) == list(range(10, 0, -1))
        assert pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
        assert list(pool.imap(abs, [-1, -2, -3])) == [1, 2, 3]
        assert sorted(pool.imap_unordered(abs, [-1, -2, -3])) == [1, 2, 3]
        assert pool.map(initialized, [1, 2]) == [(1, 7), (2, 7)]
        got: list[Any] = []
        result = pool.apply_async(os.getpid, callback=got.append)
        pid = result.get(timeout=60)
        assert result.ready() and result.successful() and got == [pid]
        errors: list[BaseException] = []
        failed = pool.map_async(fails, [1], error_callback=errors.append)
        failed.wait(60)
        assert not failed.successful() and isinstance(errors[0], ValueError)
        with pytest.raises(ValueError):
            failed.get(timeout=1)


def test_async_result_times_out_and_terminate_stops_work(cluster: Cluster) -> None:
    cluster.node(processes=1)
    mgr = cluster.manager()
    gate = mgr.Event()
    pool = mgr.Pool()
    result = pool.apply_async(wait_for, (gate,))
    with pytest.raises(multiprocessing.TimeoutError):
        result.get(timeout=0.1)
    with pytest.raises(ValueError, match="not ready"):
        result.successful()
    pool.close()
    with pytest.raises(ValueError, match="not running"):
        pool.apply_async(abs, (1,))
    pool.terminate()
    pool.join(timeout=30)
    assert result.ready()
