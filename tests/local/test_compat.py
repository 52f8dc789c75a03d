"""``import fabric.local as multiprocessing`` finds multiprocessing's names."""

import multiprocessing

import pytest

import fabric.local

NOT_PROVIDED = {"reducer", "set_executable"}  # documented in docs/from-multiprocessing.md


def test_every_multiprocessing_name_exists() -> None:
    missing = set(multiprocessing.__all__) - set(fabric.local.__all__) - NOT_PROVIDED
    assert not missing
    for name in fabric.local.__all__:
        assert getattr(fabric.local, name) is not None
        assert name in dir(fabric.local)


def test_timeout_is_caught_as_either_timeout_error() -> None:
    with fabric.local.Pool(1) as pool:
        result = pool.apply_async(fabric.local.Event().wait, (5,))
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(timeout=0.01)
        with pytest.raises(TimeoutError):
            result.get(timeout=0.01)


def test_exception_classes_are_multiprocessing_s() -> None:
    assert fabric.local.ProcessError is multiprocessing.ProcessError
    assert fabric.local.BufferTooShort is multiprocessing.BufferTooShort
    assert fabric.local.AuthenticationError is multiprocessing.AuthenticationError


def test_manager_serves_shared_objects() -> None:
    manager = fabric.local.Manager()
    try:
        shared = manager.dict()
        shared["answer"] = 42
        assert dict(shared) == {"answer": 42}
    finally:
        manager.shutdown()
