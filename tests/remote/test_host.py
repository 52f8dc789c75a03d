"""The object host as pure logic: requests in, replies out, time passed in by hand."""

from __future__ import annotations

from typing import Any

import cloudpickle
import pytest

from fabric.remote._errors import LeaseLostError
from fabric.remote._host import RELEASE, TICK, ObjectHost, ObjRef, TypeSpec
from fabric.remote._proxies import BUILTIN_TYPES

A, B = b"a" * 16, b"b" * 16


def args(*a: Any, thread: int = 1, token: int | None = None, **kw: Any) -> bytes:
    blob: bytes = cloudpickle.dumps((a, kw, thread, token))
    return blob


def value(reply: tuple[bytes, int, bool, bytes]) -> Any:
    ok, result = cloudpickle.loads(reply[3])
    if not ok:
        raise result[0]
    return result


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def bump(self) -> int:
        self.n += 1
        return self.n

    def child(self) -> Counter:
        return Counter()


@pytest.fixture
def host() -> ObjectHost:
    return ObjectHost(BUILTIN_TYPES)


def new(host: ObjectHost, session: bytes, seq: int, typeid: str, name: str = "", *a: Any) -> str:
    (reply,) = host.create(session, seq, typeid, name, cloudpickle.dumps((a, {})), 0.0)
    ref = value(reply)
    assert isinstance(ref, ObjRef)
    return ref.obj_id


def test_named_objects_resolve_to_the_same_object(host: ObjectHost) -> None:
    first = new(host, A, 1, "dict", "results")
    assert new(host, B, 1, "dict", "results") == first
    assert new(host, B, 2, "dict") != first
    with pytest.raises(TypeError, match="already a dict"):
        new(host, B, 3, "list", "results")


def test_a_resent_call_is_answered_from_the_cache_not_run_twice(host: ObjectHost) -> None:
    lst = new(host, A, 1, "list")
    blob = cloudpickle.dumps("x")
    first = host.call(A, 2, lst, "append", args(blob), 0.0)
    again = host.call(A, 2, lst, "append", args(blob), 0.0)
    assert again == first
    assert value(host.call(A, 3, lst, "__len__", args(), 0.0)[0]) == 1


def test_a_resent_parked_call_gets_no_second_reply(host: ObjectHost) -> None:
    q = new(host, A, 1, "Queue")
    assert host.call(A, 2, q, "get", args(), 0.0) == []
    assert host.call(A, 2, q, "get", args(), 0.0) == []
    replies = host.call(B, 1, q, "put", args(cloudpickle.dumps(7)), 0.0)
    assert sorted((r[0], r[1]) for r in replies) == [(A, 2), (B, 1)]


def test_parked_waiters_are_served_before_late_arrivals(host: ObjectHost) -> None:
    lock = new(host, A, 1, "Lock")
    assert value(host.call(A, 2, lock, "acquire", args(), 0.0)[0])[0]
    assert host.call(B, 1, lock, "acquire", args(), 0.0) == []
    replies = host.call(A, 3, lock, "release", args(), 0.0)
    granted = [r for r in replies if r[0] == B]
    assert value(granted[0])[0] is True
    assert value(host.call(A, 4, lock, "acquire", args(True, 0), 0.0)[0]) == (False, 0, False)
    assert value(host.call(A, 5, lock, "acquire", args(False), 0.0)[0]) == (False, 0, False)


def test_deadlines_time_out_parked_calls(host: ObjectHost) -> None:
    q = new(host, A, 1, "Queue")
    assert host.call(A, 2, q, "get", args(True, 5.0), 0.0) == []
    assert host.next_deadline() == 5.0
    assert [r[:2] for r in host.call(B, 1, q, TICK, b"", 4.0)] == [(B, 1)]
    reply, tick = host.call(B, 2, q, TICK, b"", 5.0)
    assert tick[:3] == (B, 2, True)
    assert reply[:3] == (A, 2, False)
    with pytest.raises(Exception) as caught:
        value(reply)
    assert type(caught.value).__name__ == "Empty"
    assert host.next_deadline() is None


def test_a_dead_sessions_lock_goes_to_the_next_waiter_marked_owner_lost(host: ObjectHost) -> None:
    lock = new(host, A, 1, "Lock")
    _, token, _ = value(host.call(A, 2, lock, "acquire", args(), 0.0)[0])
    assert host.call(B, 1, lock, "acquire", args(), 0.0) == []
    (granted,) = host.session_lost(A, 1.0)
    ok, new_token, owner_lost = value(granted)
    assert granted[:2] == (B, 1) and ok and owner_lost and new_token > token
    # the lost holder's late release is fenced off instead of freeing B's lock
    with pytest.raises(LeaseLostError):
        value(host.call(A, 3, lock, "release", args(token=token), 0.0)[0])
    assert value(host.call(B, 2, lock, "locked", args(), 0.0)[0]) is True


def test_semaphore_permits_of_a_dead_session_return(host: ObjectHost) -> None:
    sem = new(host, A, 1, "BoundedSemaphore", "", 2)
    assert value(host.call(A, 2, sem, "acquire", args(), 0.0)[0])[0]
    assert value(host.call(A, 3, sem, "acquire", args(), 0.0)[0])[0]
    assert host.call(B, 1, sem, "acquire", args(), 0.0) == []
    (reply,) = host.session_lost(A, 0.0)
    assert value(reply)[2] is True
    assert value(host.call(B, 2, sem, "get_value", args(), 0.0)[0]) == 1


def test_anonymous_objects_die_with_their_last_session(host: ObjectHost) -> None:
    anon = new(host, A, 1, "dict")
    named = new(host, A, 2, "dict", "keep")
    host.call(B, 1, anon, "__len__", args(), 0.0)  # B now holds it too
    host.session_lost(A, 0.0)
    assert host.statistics()["objects"] == 2
    value(host.call(B, 2, anon, RELEASE, args(), 0.0)[0])
    assert host.statistics()["objects"] == 1
    with pytest.raises(ReferenceError):
        value(host.call(B, 3, anon, "__len__", args(), 0.0)[0])
    assert value(host.call(B, 4, named, "__len__", args(), 0.0)[0]) == 0


def test_a_dead_barrier_waiter_breaks_the_barrier(host: ObjectHost) -> None:
    barrier = new(host, A, 1, "Barrier", "", 3)
    assert host.call(A, 2, barrier, "wait", args(), 0.0) == []
    assert host.call(B, 1, barrier, "wait", args(), 0.0) == []
    (reply,) = host.session_lost(A, 0.0)
    assert reply[:3] == (B, 1, False)


def test_custom_types_expose_only_what_was_registered(host: ObjectHost) -> None:
    host.register(TypeSpec("Counter", Counter, frozenset({"bump", "child"}), {"child": "Counter"}))
    counter = new(host, A, 1, "Counter")
    assert value(host.call(A, 2, counter, "bump", args(), 0.0)[0]) == 1
    child = value(host.call(A, 3, counter, "child", args(), 0.0)[0])
    assert isinstance(child, ObjRef) and child.typeid == "Counter"
    assert value(host.call(A, 4, child.obj_id, "bump", args(), 0.0)[0]) == 1
    with pytest.raises(AttributeError, match="not exposed"):
        value(host.call(A, 5, counter, "__init__", args(), 0.0)[0])


def test_bad_requests_get_errors_not_crashes(host: ObjectHost) -> None:
    with pytest.raises(TypeError, match="no type"):
        value(host.create(A, 1, "nope", "", b"", 0.0)[0])
    (reply,) = host.call(A, 2, "1", "get", b"not a pickle", 0.0)
    assert reply[2] is False


def test_refusals_become_the_errors_users_catch() -> None:
    from fabric.broker.protocol import Refuse
    from fabric.errors import AuthenticationError, VersionMismatchError
    from fabric.remote._link import refusal_error

    skew = refusal_error(Refuse("version", "peer speaks 2, broker speaks 1"))
    assert isinstance(skew, VersionMismatchError) and "speaks 2" in str(skew)
    assert isinstance(refusal_error(Refuse("runtime", "py3.10 vs py3.11")), VersionMismatchError)
    assert isinstance(refusal_error(Refuse("role", "no")), AuthenticationError)
