"""The C pickle fast path for small plain messages: same values, same types, real pickle."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.local import Pipe, Queue

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too: those leave the fast path
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()  # lone surrogates leave the fast path
    | st.binary(max_size=300)
)
# nested deeper than the fast path takes, and wider than its 1 KiB buffer
plain = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6).map(tuple), max_leaves=40)


def _shape(obj: Any) -> Any:
    """The value with every type spelled out, so 1 == 1.0 == True do not pass for each other."""
    if isinstance(obj, tuple):
        return ("tuple", [_shape(x) for x in obj])
    return (type(obj).__name__, obj)


@settings(max_examples=300, deadline=None)
@given(plain)
def test_plain_objects_round_trip_with_their_types(obj: Any) -> None:
    with Queue() as q:
        q.put(obj)
        assert _shape(q.get(timeout=10)) == _shape(obj)


@settings(max_examples=150, deadline=None)
@given(plain)
def test_what_the_fast_path_writes_is_standard_pickle(obj: Any) -> None:
    a, b = Pipe()
    with a, b:
        a.send((obj,))  # in a tuple: a bare bytes object is sent raw, not pickled
        assert _shape(pickle.loads(b.recv_bytes())) == _shape((obj,))


def test_shared_references_and_other_types_still_go_through_pickle() -> None:
    s = "shared" * 3
    items: list[Any] = [(s, s), ([1], {"k": (1, 2)}), frozenset({1}), 2**80, ("\ud800",)]
    with Queue() as q:
        for item in items:
            q.put(item)
        assert [q.get(timeout=10) for _ in items] == items


def test_put_and_get_take_keywords_like_queue_queue() -> None:
    with Queue() as q:
        q.put(obj=(1, 2), block=True, timeout=1.0)
        assert q.get(block=False) == (1, 2)
        with pytest.raises(TypeError, match="unexpected keyword"):
            q.put(1, blocking=True)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="multiple values"):
            q.put(1, obj=2)  # type: ignore[misc]
        with pytest.raises(TypeError, match="at most"):
            q.get(True, 1.0, 3)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="missing"):
            q.put()  # type: ignore[call-arg]
