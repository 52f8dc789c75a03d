"""Value/Array/RawValue/RawArray: multiprocessing parity, sharing across processes, zero-copy."""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.sharedctypes as mp_sharedctypes
import pickle
from typing import Any

import numpy as np
import pytest

from fabric.local import get_context, sharedctypes
from fabric.local.queues import Queue


class Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_double)]


@pytest.fixture(params=["fabric", "stdlib"])
def sct(request: pytest.FixtureRequest) -> Any:
    """Parity: the same test against multiprocessing.sharedctypes."""
    return sharedctypes if request.param == "fabric" else mp_sharedctypes


def test_value_typecodes_and_types(sct: Any) -> None:
    assert sct.Value("i", 7).value == 7
    assert sct.Value("d", 1.5).value == 1.5
    assert sct.Value(ctypes.c_long, -3).value == -3
    assert sct.Value("c", b"x").value == b"x"
    assert sct.RawValue("I", 5).value == 5
    p = sct.RawValue(Point, 1, 2.5)
    assert (p.x, p.y) == (1, 2.5)
    with pytest.raises(TypeError):
        sct.Value("z", 1)


def test_array_slicing_and_string(sct: Any) -> None:
    a = sct.Array("i", range(10))
    assert len(a) == 10
    assert a[:3] == [0, 1, 2]
    a[2:4] = [20, 30]
    assert a[1:5] == [1, 20, 30, 4]
    assert list(a)[-1] == 9
    s = sct.Array("c", b"hello")
    assert s.value == b"hello"
    s.value = b"hi"
    assert s.raw[:3] == b"hi\x00"
    r = sct.RawArray("d", 4)
    assert r[:] == [0.0] * 4


def test_lock_options(sct: Any) -> None:
    v = sct.Value("i", 1)
    assert v.get_lock().acquire()
    v.get_lock().release()
    with v:
        v.value += 1
    assert v.get_obj().value == 2
    raw = sct.Value("i", 3, lock=False)
    assert not hasattr(raw, "get_lock") and raw.value == 3
    lock = multiprocessing.get_context("fork").Lock() if sct is mp_sharedctypes else None
    if lock is None:
        from fabric.local import Lock

        lock = Lock()
    assert sct.Value("i", lock=lock).get_lock() is lock
    with pytest.raises(AttributeError):
        sct.Value("i", lock=object())


def test_buffer_protocol_is_zero_copy() -> None:
    raw = sharedctypes.RawArray("d", 1000)
    view = np.frombuffer(raw, dtype=np.float64)
    view[10] = 3.25
    assert raw[10] == 3.25  # same memory
    arr = sharedctypes.Array("i", 100)
    np.frombuffer(arr.get_obj(), dtype=np.int32)[:] = np.arange(100)
    assert arr[99] == 99
    m = memoryview(raw)
    assert (m.format, m.nbytes, m.readonly) == ("<d", 8000, False)


VARIANTS = {
    "Array": lambda: sharedctypes.Array("q", 4),
    "Array lock=False": lambda: sharedctypes.Array("q", 4, lock=False),
    "Array own lock": lambda: sharedctypes.Array("q", 4, lock=sharedctypes._lock_for(True)),
    "RawArray": lambda: sharedctypes.RawArray("q", 4),
    "Value": lambda: sharedctypes.Value("q", 0),
    "Value lock=False": lambda: sharedctypes.Value("q", 0, lock=False),
    "RawValue": lambda: sharedctypes.RawValue("q", 0),
    "synchronized(RawArray)": lambda: sharedctypes.synchronized(sharedctypes.RawArray("q", 4)),
}


def _write_through_numpy(obj: Any) -> None:
    view = np.frombuffer(obj, dtype=np.int64)
    view[:] = np.arange(7, 7 + len(view))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_exports_its_shared_buffer(variant: str) -> None:
    obj = VARIANTS[variant]()
    m = memoryview(obj)
    assert (m.format, m.readonly, m.nbytes % 8) == ("<q", False, 0)
    p = get_context("fork").Process(target=_write_through_numpy, args=(obj,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    # the child wrote the shared memory itself: no copy on either side
    expected = list(range(7, 7 + m.nbytes // 8))
    assert m.cast("B").cast("q").tolist() == expected
    assert (obj[:] if hasattr(obj, "__len__") else [obj.value]) == expected


def test_synchronized_buffer_travels_through_pickle_under_spawn() -> None:
    arr = sharedctypes.Array("q", 3)
    p = get_context("spawn").Process(target=_write_through_numpy, args=(arr,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert np.frombuffer(arr, dtype=np.int64).tolist() == [7, 8, 9]


def _add(v: Any, a: Any, n: int) -> None:
    for _ in range(n):
        with v.get_lock():
            v.value += 1
    with a.get_lock():
        a[0] += n
    np.frombuffer(a.get_obj(), dtype=np.int64)[1] = 42


def test_shared_across_processes_under_every_start_method(ctx: Any) -> None:
    v, a = sharedctypes.Value("i", 0), sharedctypes.Array("q", 4)
    procs = [ctx.Process(target=_add, args=(v, a, 500)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert v.value == 1000
    assert a[:2] == [1000, 42]


def test_travels_through_a_queue_and_pickle_shares_memory() -> None:
    raw = sharedctypes.RawArray("i", [1, 2, 3])
    q = Queue()
    q.put(raw)
    other = q.get(timeout=5)
    other[0] = 100
    assert raw[0] == 100
    v = sharedctypes.Value("d", 1.0)
    v2 = pickle.loads(pickle.dumps(v))
    v2.value = 2.0
    assert v.value == 2.0


def test_copy_and_synchronized() -> None:
    raw = sharedctypes.RawArray("i", [4, 5])
    c = sharedctypes.copy(raw)
    c[0] = 9
    assert raw[:] == [4, 5] and c[:] == [9, 5]
    s = sharedctypes.synchronized(sharedctypes.RawValue("i", 1))
    with s.get_lock():
        s.value = 2
    assert s.value == 2


def test_bad_sizes_are_clear_errors() -> None:
    with pytest.raises(ValueError):
        sharedctypes.RawArray("i", -1)
    with pytest.raises(TypeError):
        sharedctypes.RawValue(int)
