"""A peer's link to the broker, against a bare ROUTER: what goes out on the socket."""

from __future__ import annotations

import zmq

from fabric.broker.protocol import Hello, Submit, decode_many
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
