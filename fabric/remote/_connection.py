"""A client's connection to the broker: object calls and tasks over one shared session.

The socket, the I/O thread and the receiver role live in ``ClientIO``. What
this module adds is the callers' side. A thread waiting for an object-call
reply takes the receiver role itself if it is free, so the reply wakes the
caller and nobody else (one thread hop less); otherwise it waits on its latch,
and a caller that gives up the role while others still wait wakes the I/O
thread to take it. If a task-result callback (on the I/O thread) calls a
shared object, the I/O thread pumps the socket itself until the reply is in.
Tasks are booked in a ``TaskBook``; calls to a broker embedded in this very
process take the in-thread path (``LocalBroker``).

A connection opened as role ``host`` also serves CREATE/CALL for the custom
types this client registered, on a thread of its own, so a custom method that
blocks (or calls other shared objects) never stalls the I/O thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from fabric.broker.protocol import (
    Ack,
    Call,
    Cancel,
    Create,
    Gone,
    Message,
    Reject,
    Reply,
    Result,
    Submit,
)
from fabric.errors import BrokerUnavailable
from fabric.remote._client_calls import LocalBroker, PendingCall, check_host_runtime
from fabric.remote._client_io import OUTBOX_BATCH, RETRY_S, TASK_GRACE_S, ZMQ_FD, ClientIO
from fabric.remote._client_tasks import ResultCallback
from fabric.remote._host import RUNTIME, TICK, ObjectHost
from fabric.remote._link import LinkRefused, Runtime

log = logging.getLogger(__name__)

T = TypeVar("T")


class AwaitedFuture(cf.Future[T]):
    """A task's future that ``Connection.await_task`` receives for.

    ``poke_armed``: the done-callback that pokes the receiver is on it already
    (added once per future, however often its result is polled).
    """

    poke_armed = False


class Connection(ClientIO):
    """A session with the broker shared by every thread of this client (thread-safe)."""

    def __init__(
        self,
        address: str,
        *,
        curve: tuple[bytes, bytes, bytes] | None = None,
        role: str = "client",
        name: str = "",
        host: ObjectHost | None = None,
        runtime: Runtime | None = None,
        timeout: float = 10.0,
        reconnect_timeout: float = 60.0,
        local: LocalBroker | None = None,
    ) -> None:
        super().__init__(
            address,
            curve=curve,
            role=role,
            name=name,
            runtime=runtime,
            reconnect_timeout=reconnect_timeout,
            endpoint=None if local is None else local.local_endpoint(),
            hosting=host is not None,
        )
        self._local = local
        self._awaiting = threading.local()  # the future a thread receives for (await_task)
        self._seq = itertools.count(1)
        self._host = host
        self._host_jobs: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        if host is not None:
            self._threads.append(
                threading.Thread(target=self._serve, name="fabric-host", daemon=True)
            )
        self._start(timeout)

    # --- calls from user threads ---------------------------------------------------------
    def call(
        self, host: str, obj_id: str, method: str, payload: bytes, wait: float | None
    ) -> bytes:
        """Send one CALL and return its reply payload (see ``Transport.call``)."""
        seq = next(self._seq)
        pending = self._post_call(
            Call(host=host, call=seq, object=obj_id, method=method, payload=(payload,))
        )
        return self._await_call(pending, wait)

    def _await_call(self, pending: PendingCall, wait: float | None) -> bytes:
        """Wait for a posted CALL's reply, nudging the host past ``wait`` (see ``call``)."""
        if wait is not None and wait > 0 and not pending.done.is_set():
            # (0: the host answers at once, parked or not.)
            # Let the host's clock pass our deadline even where nothing else drives it.
            # The host timed the call from when it got it, a little after we sent it,
            # so keep nudging (less and less often) until the reply comes.
            host, obj_id = pending.message.host, cast(Call, pending.message).object
            pause = wait
            while not pending.done.wait(pause):
                self._post_call(Call(host=host, call=next(self._seq), object=obj_id, method=TICK))
                pause = min(max(pause, 0.005) * 2, 1.0)
        return self._await(pending)

    def check_runtime(self) -> None:
        """Refuse a broker whose object host runs another Python or cloudpickle (X.Y).

        The host unpickles every call this client makes, so a mismatch would fail
        inside unpickling later; VersionMismatchError names both runtimes now. A
        broker with no built-in host has nothing to compare and passes.
        """
        try:
            reply = self.call("", "", RUNTIME, b"", 0.0)
        except BrokerUnavailable:
            return  # no built-in host ("no-host")
        check_host_runtime(reply, self._link.runtime, self.address)

    def create(self, host: str, typeid: str, name: str, payload: bytes) -> bytes:
        """Send one CREATE and return its reply payload."""
        seq = next(self._seq)
        message = Create(host=host, call=seq, typeid=typeid, name=name, payload=(payload,))
        return self._await(self._post_call(message))

    def new_task_id(self) -> bytes:
        """Return a task id never used before in this session (thread-safe)."""
        return self._tasks.new_id()

    def submit(
        self,
        task: bytes,
        payload: bytes,
        on_result: ResultCallback,
        requires: dict[str, str] | None = None,
    ) -> None:
        """Submit a task; ``on_result`` runs once, on the I/O thread, when its result is in."""
        self.submit_many([(task, payload, on_result)], requires)

    def submit_many(
        self,
        tasks: list[tuple[bytes, bytes, ResultCallback]],
        requires: dict[str, str] | None = None,
    ) -> None:
        """Submit ``(task id, payload, on_result)`` tasks in order, under one lock each way."""
        messages: list[Message] = []
        requires = requires or {}  # one map for all (a message's fields are never changed)
        with self._lock:
            self._check_open()
            for task, payload, on_result in tasks:
                message = Submit(task=task, requires=requires, payload=(payload,))
                self._tasks.add(message, on_result)
                messages.append(message)
            self._tasks_at = now = time.monotonic()
            wake = self._must_wake_for_tasks(now)
            queued = not wake and self._coalesce(now, messages)
            full = len(self._outbox) >= OUTBOX_BATCH
        if not queued:
            self._send_all_or_queue(messages)
        elif full:
            with self._sock_lock:
                self._flush()
                if self._input_pending():
                    self._poke_receiver()  # our sends may have eaten the edge it waits for
        if wake:
            self._wake()  # the I/O thread must watch for the results

    def await_task(self, future: AwaitedFuture[Any], timeout: float | None) -> None:
        """Receive in this thread until ``future`` is settled or ``timeout`` passes.

        A caller blocked on a task's result takes the receiver role and runs
        the result callbacks itself: the result wakes the caller and nobody
        else (a map's consumer keeps the role from one result to the next, see
        ``_hand_back``). If the I/O thread is watching, it is poked to let the
        role go, unless a lone task is in flight (then return at once: the
        caller waits on its future). If another thread receives meanwhile, the
        caller waits for the role; settling its future pokes the receiver,
        which may be the caller asleep on the socket.
        """
        if threading.current_thread() is self._threads[0] or future.done():
            return  # a result callback waiting on another task: the I/O thread must not block
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        with self._lock:
            watching = self._watching
            if watching and len(self._tasks) == 1:
                self._waited_at = now  # one task at a time: leave the next ones to callers
                return
            self._task_waiters += 1
            due = self._tasks.next_due(now)
        if watching:  # many in flight: the I/O thread lets the role go at the end of its turn
            self._poke_receiver()
        self._awaiting.future = future  # settling it here needs no poke
        if not future.poke_armed:
            future.poke_armed = True
            future.add_done_callback(self.poke_receiver)
        try:
            while not future.done() and self._fatal is None and not self._closing:
                pause = RETRY_S if deadline is None else min(RETRY_S, deadline - time.monotonic())
                if pause <= 0:
                    return
                if not self._receiver.acquire(timeout=pause):
                    continue
                try:  # (another receiver may have settled it meanwhile)
                    callbacks = [] if future.done() else self._receive_once(pause)
                finally:
                    self._receiver.release()
                if callbacks is None:  # the link is down: the I/O thread reconnects
                    cf.wait([future], pause)
                for callback in callbacks or ():
                    callback()
        finally:
            self._awaiting.future = None
            with self._lock:
                self._task_waiters -= 1
                self._waited_at = time.monotonic()
                # a DONE batch started here: the I/O thread's timer must know of it
                sooner = self._tasks.next_due(time.monotonic()) < due
            if sooner:
                self._wake()
            self._hand_back()

    def poke_receiver(self, future: object) -> None:
        """Wake whichever thread receives (a waited-on future settled; a done callback)."""
        if getattr(self._awaiting, "future", None) is not future:  # not this thread's own
            self._poke_receiver()

    def _receive_once(self, pause: float) -> list[Callable[[], None]] | None:
        """Sleep up to ``pause`` on the socket, then drain it; None if the link is down."""
        with self._sock_lock:
            sock = self._link.socket
            if sock is None or not self._link.ready:
                return None
            fd = cast(int, sock.get(ZMQ_FD))
            ready = self._input_pending()
        if not ready:
            self._sleep_on(fd, pause)
        try:
            return self._receive()
        except LinkRefused as refused:
            self._refused = refused  # the I/O thread ends the session
            self._wake()
            return None

    def cancel(self, task: bytes) -> None:
        """Ask the broker to cancel a task (its RESULT says whether it was)."""
        self._post(Cancel(task=task))

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing for user threads ---------------------------------------------------------
    def _post_call(self, message: Call | Create) -> PendingCall:
        pending = PendingCall(message)
        if self._local is not None and self._call_local(pending):
            return pending
        with self._lock:
            self._check_open()
            self._calls[message.call] = pending
        self._send_or_queue(message)
        return pending

    def _call_local(self, pending: PendingCall) -> bool:
        """Apply a call in this thread through a broker of this process; False: use the socket."""
        assert self._local is not None
        self._check_open()
        message = pending.message

        def parked() -> None:  # under the broker's lock: a later reply finds its waiter
            with self._lock:
                self._calls[message.call] = pending

        try:
            replies = self._local.call_local(self.session, message, parked)
        except LookupError:  # no session there yet (or any more): the socket path re-sends
            return False
        for reply in replies:
            if reply.call == message.call:
                pending.answer(reply)
            else:
                self._replied(reply)
        return True

    def _await(self, pending: PendingCall) -> bytes:
        if not pending.done.is_set() and threading.current_thread() is self._threads[0]:
            while not pending.done.is_set() and not self._closing:  # a callback called us
                self._turn(0.05)
        while not pending.done.is_set():
            if self._receiver.acquire(blocking=False):
                try:
                    self._receive_until(pending)
                finally:
                    self._receiver.release()
                    self._hand_back()
            if not pending.done.is_set():
                pending.done.wait(RETRY_S)  # another thread receives; or the link is down
        return pending.payload()

    def _receive_until(self, pending: PendingCall) -> None:
        """Watch the socket in this calling thread until ``pending`` is answered.

        Return early if the link is down (the I/O thread reconnects) or the
        connection fails; the caller then waits on its latch.
        """
        while not pending.done.is_set() and self._fatal is None and not self._closing:
            callbacks = self._receive_once(RETRY_S)
            if callbacks is None:
                return
            if callbacks:
                with self._lock:
                    self._handoff += callbacks
                self._wake()

    def _hand_back(self) -> None:
        """After a caller let the receiver role go: wake the I/O thread if others wait.

        Task results alone wake it only if it sleeps past ``TASK_GRACE_S``: the
        caller is likely back for its next result by then (a map's consumer),
        and the I/O thread looks that often anyway (see ``_callers_receive``).
        """
        with self._lock:
            waiting = bool(self._calls or self._outbox or self._handoff) or (
                bool(self._tasks) and self._sleep_until > time.monotonic() + TASK_GRACE_S
            )
        if waiting:
            self._wake()

    # --- what arrives (on whichever thread receives) ---------------------------------------
    def _dispatch(self, message: Message) -> list[Callable[[], None]]:
        if isinstance(message, Result):
            with self._lock:
                return self._tasks.result(message, time.monotonic())
        if isinstance(message, Reply):
            self._replied(message)
        elif isinstance(message, Ack):
            with self._lock:
                self._tasks.acked(message)
        elif isinstance(message, Reject):
            with self._lock:
                return self._tasks.rejected(message, time.monotonic())
        elif isinstance(message, Create | Call | Gone) and self._host is not None:
            self._host_jobs.put(message)
        else:
            log.debug("ignored %s from the broker", type(message).__name__)
        return []

    def _replied(self, reply: Reply) -> None:
        with self._lock:
            pending = self._calls.pop(reply.call, None)
        if pending is not None:
            pending.answer(reply)

    # --- the host thread (custom types registered by this client) ------------------------
    def _stop_serving(self) -> None:
        self._host_jobs.put(None)

    def _serve(self) -> None:
        assert self._host is not None
        while (job := self._host_jobs.get()) is not None:
            now = time.monotonic()
            if isinstance(job, Gone):
                replies = self._host.session_lost(job.session, now)
            elif isinstance(job, Create):
                payload = bytes(job.payload[0]) if job.payload else b""
                replies = self._host.create(
                    job.session, job.call, job.typeid, job.name, payload, now
                )
            else:
                assert isinstance(job, Call)
                payload = bytes(job.payload[0]) if job.payload else b""
                replies = self._host.call(
                    job.session, job.call, job.object, job.method, payload, now
                )
            for session, seq, ok, blob in replies:
                status = "ok" if ok else "error"
                self._post(Reply(call=seq, status=status, session=session, payload=(blob,)))
