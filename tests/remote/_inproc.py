"""An in-process object host driven by one thread: proxies tested with no broker at all.

It plays the broker's part for object calls only (route, deliver replies, report
a session gone) and never drives the host's clock, so timed-out calls rely on
the connection's nudge exactly as they do behind the real broker.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from typing import Any

from fabric.remote._host import TICK, ObjectHost, ObjRef, Reply
from fabric.remote._proxies import BUILTIN_TYPES, proxy_type
from fabric.remote._proxy_base import BaseProxy, decode_reply, dumps

_Job = tuple[str, bytes, int, tuple[Any, ...]]


class InprocHost:
    """Run an ObjectHost in a thread; ``client()`` gives sessions that talk to it."""

    def __init__(self) -> None:
        self.host = ObjectHost(BUILTIN_TYPES)
        self._inbox: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._waiting: dict[tuple[bytes, int], tuple[threading.Event, list[bytes]]] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            kind, session, seq, args = self._inbox.get()
            now = time.monotonic()
            if kind == "stop":
                return
            if kind == "lost":
                self._deliver(self.host.session_lost(session, now))
            elif kind == "create":
                typeid, name, payload = args
                self._deliver(self.host.create(session, seq, typeid, name, payload, now))
            else:
                obj_id, method, payload = args
                self._deliver(self.host.call(session, seq, obj_id, method, payload, now))

    def _deliver(self, replies: list[Reply]) -> None:
        for session, seq, _ok, payload in replies:
            waiter = self._waiting.pop((session, seq), None)
            if waiter is not None:
                waiter[1].append(payload)
                waiter[0].set()

    def send(
        self, kind: str, session: bytes, seq: int, *args: Any
    ) -> tuple[threading.Event, list[bytes]]:
        waiter: tuple[threading.Event, list[bytes]] = (threading.Event(), [])
        self._waiting[(session, seq)] = waiter
        self._inbox.put((kind, session, seq, args))
        return waiter

    def lose(self, session: bytes) -> None:
        self._inbox.put(("lost", session, 0, ()))

    def client(self, name: str) -> InprocClient:
        return InprocClient(self, name.encode())

    def close(self) -> None:
        self._inbox.put(("stop", b"", 0, ()))
        self._thread.join(5)

    def __enter__(self) -> InprocHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InprocClient:
    """One session: a proxy Transport plus ``new(typeid, ...)``."""

    address = "inproc://test"

    def __init__(self, hub: InprocHost, session: bytes) -> None:
        self.hub, self.session = hub, session
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def _next(self) -> int:
        with self._lock:
            return next(self._seq)

    def call(
        self, host: str, obj_id: str, method: str, payload: bytes, wait: float | None
    ) -> bytes:
        done, box = self.hub.send("call", self.session, self._next(), obj_id, method, payload)
        pause = wait
        while pause is not None and not done.wait(pause):
            self.hub.send("call", self.session, self._next(), obj_id, TICK, b"")
            pause = min(max(pause, 0.005) * 2, 1.0)
        if not done.wait(10):
            raise TimeoutError("no reply from the in-process host")
        return box[0]

    def create(self, host: str, typeid: str, name: str, payload: bytes) -> bytes:
        done, box = self.hub.send("create", self.session, self._next(), typeid, name, payload)
        if not done.wait(10):
            raise TimeoutError("no reply from the in-process host")
        return box[0]

    def new(self, typeid: str, *args: object, name: str = "") -> Any:
        ref = decode_reply(self.create("", typeid, name, dumps((args, {}))))
        assert isinstance(ref, ObjRef)
        proxy: BaseProxy = proxy_type(typeid)(ref, self)
        return proxy

    def close(self) -> None:
        self.hub.lose(self.session)
