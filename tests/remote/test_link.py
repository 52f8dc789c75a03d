"""A peer's link to the broker, against a bare ROUTER: what goes out on the socket."""

from __future__ import annotations

import zmq

from fabric.broker.protocol import Cancel, Error, Hello, Submit, Welcome, decode_many, encode
from fabric.remote._link import Link


def test_send_many_batches_in_order_and_a_lone_message_goes_plain() -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    link = Link(context, "inproc://link-test", role="client", name="t")
    try:
        router.bind("inproc://link-test")
        link.open()
        assert isinstance(decode_many(router.recv_multipart()[1:])[0], Hello)
        link.ready = True  # as after a WELCOME
        tasks = [Submit(task=b"%d" % i, payload=(b"p" * (i % 7) * 500,)) for i in range(100)]
        assert link.send_many(tasks) == 100
        assert link.send_many(tasks[:1]) == 1
        got: list[object] = []
        messages = 0
        while len(got) < len(tasks) + 1 and router.poll(10_000):
            got += decode_many(router.recv_multipart()[1:])
            messages += 1
        assert got == [*tasks, tasks[0]]
        assert messages < 20  # batched (a lone message is its own)
    finally:
        link.close_socket()
        router.close(linger=0)
        context.term()


def test_a_burst_of_hello_required_errors_gets_one_hello() -> None:
    # Each HELLO re-states the node's free slots as its whole credit: a second one
    # sent before the tasks the first allowed arrive would let the broker overdraw.
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    link = Link(context, "inproc://link-hello", role="worker", name="t")
    marker = Cancel(task=b"marker", attempt=1)

    def receive_until(wanted: object) -> None:
        while link.socket is not None and link.socket.poll(10_000):
            if wanted in link.receive():
                return
        raise AssertionError(f"{wanted} never came")

    try:
        router.bind("inproc://link-hello")
        link.open()
        route, *frames = router.recv_multipart()
        hello = decode_many(frames)[0]
        assert isinstance(hello, Hello)
        for message in (Welcome(hello.session, 1.0, 3, b"b1"), marker):
            router.send_multipart([route, *encode(message)])
        receive_until(marker)
        assert link.ready
        for _ in range(3):  # the answers to a burst sent after the broker forgot us
            router.send_multipart([route, *encode(Error("hello-required", "send HELLO first"))])
        router.send_multipart([route, *encode(marker)])
        receive_until(marker)  # every ERROR was handled before it
        hellos = []
        while router.poll(100):
            hellos += decode_many(router.recv_multipart()[1:])
        assert [type(m) for m in hellos] == [Hello]
    finally:
        link.close_socket()
        router.close(linger=0)
        context.term()
