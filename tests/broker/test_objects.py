"""Object routing rules, without sockets."""

from __future__ import annotations

from fabric.broker import protocol as p
from fabric.broker.objects import ObjectRouter
from tests.broker.test_server import CountingService

C1, C2, H = b"1" * 16, b"2" * 16, b"h" * 16


def test_calls_to_a_host_peer_are_routed_and_only_its_pending_replies_return() -> None:
    router = ObjectRouter()
    router.add_host("h", H)
    assert router.call(C1, p.Call("h", 7, "o", "m", payload=(b"a",))) == [
        (H, p.Call("h", 7, "o", "m", C1, (b"a",)))
    ]
    assert router.reply(C2, p.Reply(7, "ok", session=C1)) == []  # not the host it went to
    assert router.reply(H, p.Reply(8, "ok", session=C1)) == []  # not a pending call
    assert router.reply(H, p.Reply(7, "ok", session=C1, payload=(b"v",))) == [
        (C1, p.Reply(7, "ok", payload=(b"v",)))
    ]
    assert router.reply(H, p.Reply(7, "ok", session=C1)) == []  # answered once


def test_a_lost_host_answers_its_pending_calls_and_others_hear_gone() -> None:
    router = ObjectRouter()
    router.add_host("h", H)
    router.add_host("g", b"g" * 16)
    router.call(C1, p.Create("h", 1, "dict"))
    outs = router.session_gone(H)
    assert (C1, p.Reply(1, "host-lost", "the object host was lost before it replied")) in outs
    assert (b"g" * 16, p.Gone(H)) in outs
    assert router.hosts == {"g": b"g" * 16}
    assert router.call(C1, p.Call("h", 2, "o", "m"))[0][1] == p.Reply(
        2, "no-host", "no object host named 'h' is connected"
    )


def test_services_answer_in_process_and_host_names_are_unique() -> None:
    service = CountingService("")
    router = ObjectRouter([service])
    assert router.call(C1, p.Create("", 1, "dict")) == [(C1, p.Reply(1, "ok", payload=(b"1",)))]
    assert router.refusal("", H) == "host name '' is the broker's own"
    router.add_host("h", H)
    assert router.refusal("h", C2) == "another host is already named 'h'"
    assert router.refusal("h", H) is None
    router.session_gone(C1)
    assert service.lost == [C1]
    router.close()
    assert service.closed
