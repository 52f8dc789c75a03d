"""A client's connection to the broker: one I/O thread, any number of calling threads.

ZeroMQ sockets are not thread-safe, so every use of the socket happens under
``_sock_lock``. A calling thread sends its message itself (one thread hop less
per call). One thread at a time, the *receiver* (``_receiver``), sleeps on the
socket's readiness fd (``zmq.FD``, which can be watched without touching the
socket), drains the socket and resolves what came back. A thread waiting for
its reply takes that role itself if it is free, so the reply wakes the caller
and nobody else (one thread hop less again); otherwise it waits on its latch.
The I/O thread takes the role when something else is awaited (task results,
host jobs, calls of threads that are not receiving, a WELCOME) and otherwise
sleeps on its wake-up pipe and timers only, draining the socket at each timer
tick. ``zmq.FD`` is edge-triggered and any socket call may consume its edge,
so whoever used the socket checks ``zmq.EVENTS`` before letting go and, if
input is pending, pokes the receiver through ``_input_r``; a caller that
gives up the role while others still wait wakes the I/O thread to take it.
Task-result callbacks run on the I/O thread outside the lock (a receiving
caller hands them over); if such a callback calls a shared object, the I/O
thread pumps the socket itself until the reply is in. Everything that matters is kept until
the broker acknowledges it and re-sent on every new session: SUBMITs until
ACK, CALLs and CREATEs until REPLY (the host's reply cache makes a re-sent CALL
harmless). RESULTs are handed to their task's callback once and DONE'd.

A connection to a broker embedded in this very process (``local``, the
Manager's own) applies its object calls in the calling thread, under the
broker's lock (``Broker.call_local``): no socket, no thread wake-up; a call
that parks is answered later over the socket as usual.

A connection opened as role ``host`` also serves CREATE/CALL for the custom
types this client registered, on a thread of its own, so a custom method that
blocks (or calls other shared objects) never stalls the I/O thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import queue
import select
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import zmq

from fabric.broker.protocol import (
    Ack,
    Bye,
    Call,
    Cancel,
    Create,
    Done,
    Gone,
    Message,
    Reject,
    Reply,
    Result,
    Submit,
    Welcome,
)
from fabric.errors import BrokerUnavailable, FabricError, VersionMismatchError
from fabric.remote._host import RUNTIME, TICK, ObjectHost
from fabric.remote._link import Link, LinkRefused, Runtime, compatible

log = logging.getLogger(__name__)

_RETRY_S = 0.05  # how often a thread waiting on the socket or a latch looks again
# The broker keeps a result until the client DONEs it; DONEs wait to travel many to a
# message (at most 256 ids: far below the protocol's 64 KiB control frame).
_DONE_BATCH = 256
_DONE_DELAY_S = 0.05

ResultCallback = Callable[[str, str, bytes], None]
"""Called once per task, on the I/O thread, with (status, message, payload)."""


class LocalBroker(Protocol):
    """A broker in this very process (``Broker.call_local``): object calls skip the socket,
    the rest travels over its inproc endpoint (``Broker.local_endpoint``)."""

    def local_endpoint(self) -> tuple[zmq.Context[zmq.Socket[bytes]], str]: ...

    def call_local(
        self, session: bytes, message: Call | Create, parked: Callable[[], object]
    ) -> list[Reply]: ...


class _Latch:
    """A one-shot event for one waiter: a held lock that ``set`` releases (cheaper to make)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        """Let the waiter go; call at most once."""
        self._lock.release()

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: float | None = None) -> bool:
        """Return True once set, False if ``timeout`` passed first."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._lock.release()
        return True


@dataclass(slots=True)
class _Pending:
    message: Call | Create
    done: _Latch = field(default_factory=_Latch)
    reply: Reply | None = None
    error: Exception | None = None


@dataclass
class _Task:
    message: Submit
    on_result: ResultCallback
    acked: bool = False
    resend_at: float = 0.0


class Connection:
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
        self._local = local
        self._address = address
        link_address = address
        self._own_context = local is None
        if local is not None:  # no TCP, CURVE or I/O-thread hops to a broker in this process
            self._context, link_address = local.local_endpoint()
            curve = None
        else:
            self._context = zmq.Context()
        self._link = Link(
            self._context,
            link_address,
            role=role,
            name=name,
            curve=curve,
            runtime=runtime,
            on_welcome=self._resend,
        )
        self._reconnect_timeout = reconnect_timeout
        self._lock = threading.Lock()
        self._sock_lock = threading.RLock()
        self._outbox: list[Message] = []
        self._calls: dict[int, _Pending] = {}
        self._tasks: dict[bytes, _Task] = {}
        self._busy: dict[bytes, _Task] = {}  # REJECTed busy: re-sent at their resend_at
        self._done: list[bytes] = []  # results held here, DONE'd in batches
        self._done_due = 0.0
        self._seq = itertools.count(1)
        self._task_ids = itertools.count(1)
        self._wake_r, self._wake_w = os.pipe()
        self._input_r, self._input_w = os.pipe()  # "input is pending" for the receiver
        for fd in (self._wake_w, self._input_w):
            os.set_blocking(fd, False)  # a full pipe already says "look"
        self._receiver = threading.Lock()  # held by the one thread watching the socket
        self._watching = False  # the I/O thread is the receiver (guarded by _lock)
        self._handoff: list[Callable[[], None]] = []  # callbacks a receiving caller got
        self._refused: LinkRefused | None = None
        self._closing = False
        self._fatal: Exception | None = None
        self._welcomed = threading.Event()
        self._lost_since: float | None = None
        self._host = host
        self._host_jobs: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name="fabric-io", daemon=True)]
        if host is not None:
            self._threads.append(
                threading.Thread(target=self._serve, name="fabric-host", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        if not self._welcomed.wait(timeout) or self._fatal is not None:
            error = self._fatal or BrokerUnavailable(
                f"no answer from a broker at {address} within {timeout} s"
            )
            self.close()
            raise error

    @property
    def address(self) -> str:
        """Return the broker address this connection talks to."""
        return self._address

    @property
    def session(self) -> bytes:
        """Return this client's 16-byte session id."""
        return self._link.session

    # --- calls from user threads ---------------------------------------------------------
    def call(
        self, host: str, obj_id: str, method: str, payload: bytes, wait: float | None
    ) -> bytes:
        """Send one CALL and return its reply payload (see ``Transport.call``)."""
        seq = next(self._seq)
        pending = self._post_call(
            Call(host=host, call=seq, object=obj_id, method=method, payload=(payload,))
        )
        if wait is not None and wait > 0:  # 0: the host answers at once, parked or not
            # Let the host's clock pass our deadline even where nothing else drives it.
            # The host timed the call from when it got it, a little after we sent it,
            # so keep nudging (less and less often) until the reply comes.
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
        python, cloudpickle_version = pickle.loads(reply)[1]
        ours = self._link.runtime
        if not (
            compatible(python, ours.python) and compatible(cloudpickle_version, ours.cloudpickle)
        ):
            raise VersionMismatchError(
                f"this client runs Python {ours.python} with cloudpickle {ours.cloudpickle}; "
                f"the broker's object host at {self.address} runs Python {python} with "
                f"cloudpickle {cloudpickle_version}: install matching versions"
            )

    def create(self, host: str, typeid: str, name: str, payload: bytes) -> bytes:
        """Send one CREATE and return its reply payload."""
        seq = next(self._seq)
        message = Create(host=host, call=seq, typeid=typeid, name=name, payload=(payload,))
        return self._await(self._post_call(message))

    def new_task_id(self) -> bytes:
        """Return a task id never used before in this session (thread-safe).

        A counter, not random bytes: ``os.urandom`` releases the GIL, which on
        a busy client hands the interpreter to another thread at every submit.
        """
        return b"%x" % next(self._task_ids)

    def submit(
        self,
        task: bytes,
        payload: bytes,
        on_result: ResultCallback,
        requires: dict[str, str] | None = None,
    ) -> None:
        """Submit a task; ``on_result`` runs once, on the I/O thread, when its result is in."""
        message = Submit(task=task, requires=requires or {}, payload=(payload,))
        with self._lock:
            self._check_open()
            self._tasks[task] = _Task(message, on_result)
            watching = self._watching
        self._send_or_queue(message)
        if not watching:
            self._wake()  # the I/O thread must watch for the result

    def cancel(self, task: bytes) -> None:
        """Ask the broker to cancel a task (its RESULT says whether it was)."""
        self._post(Cancel(task=task))

    def close(self) -> None:
        """Say BYE, stop the threads, close the socket. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._wake()
        self._host_jobs.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(10)
        # a caller still receiving (its call was just failed) lets go within _RETRY_S:
        # only then may the pipes' fds be closed and reused
        if self._receiver.acquire(timeout=1.0):
            self._receiver.release()
        for fd in (self._wake_r, self._wake_w, self._input_r, self._input_w):
            os.close(fd)
        if self._own_context:
            self._context.term()

    def __enter__(self) -> Connection:
        return self

    def __del__(self) -> None:
        if not getattr(self, "_closing", True):
            warnings.warn(
                f"unclosed fabric connection to {self.address}", ResourceWarning, stacklevel=1
            )

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing for user threads ---------------------------------------------------------
    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise BrokerUnavailable(f"the connection to {self.address} is closed")

    def _post_call(self, message: Call | Create) -> _Pending:
        pending = _Pending(message)
        if self._local is not None and self._call_local(pending):
            return pending
        with self._lock:
            self._check_open()
            self._calls[message.call] = pending
        self._send_or_queue(message)
        return pending

    def _call_local(self, pending: _Pending) -> bool:
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
                pending.reply = reply
                pending.done.set()
            else:
                self._replied(reply)
        return True

    def _post(self, message: Message) -> None:
        with self._lock:
            self._check_open()
        self._send_or_queue(message)

    def _send_or_queue(self, message: Message) -> None:
        """Send from this thread if the session is up and nothing queued is ahead, else queue."""
        with self._sock_lock:
            if self._link.ready and not self._outbox and self._link.send(message):
                if self._input_pending():
                    self._poke_receiver()  # our send may have eaten the edge it waits for
                return
        with self._lock:
            self._outbox.append(message)
        self._wake()

    def _input_pending(self) -> bool:
        sock = self._link.socket
        return sock is not None and bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def _await(self, pending: _Pending) -> bytes:
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
                pending.done.wait(_RETRY_S)  # another thread receives; or the link is down
        if pending.error is not None:
            raise pending.error
        reply = pending.reply
        assert reply is not None
        if reply.status in ("ok", "error"):
            return bytes(reply.payload[0])
        raise BrokerUnavailable(f"object call failed: {reply.status}: {reply.message}")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # closed during shutdown
            os.write(self._wake_w, b"\0")

    def _poke_receiver(self) -> None:
        with contextlib.suppress(OSError):  # closed during shutdown
            os.write(self._input_w, b"\0")

    # --- receiving: whichever thread holds _receiver ------------------------------------
    def _receive_until(self, pending: _Pending) -> None:
        """Watch the socket in this calling thread until ``pending`` is answered.

        Return early if the link is down (the I/O thread reconnects) or the
        connection fails; the caller then waits on its latch.
        """
        while not pending.done.is_set() and self._fatal is None and not self._closing:
            with self._sock_lock:
                sock = self._link.socket
                if sock is None or not self._link.ready:
                    return
                fd = cast(int, sock.getsockopt(zmq.FD))
                ready = self._input_pending()
            if not ready:
                self._sleep_on(fd, _RETRY_S)
            try:
                callbacks = self._receive()
            except LinkRefused as refused:
                self._refused = refused  # the I/O thread ends the session
                self._wake()
                return
            if callbacks:
                with self._lock:
                    self._handoff += callbacks
                self._wake()

    def _sleep_on(self, fd: int | None, timeout: float) -> set[int]:
        """Sleep until the socket (``fd``) or a poke is ready or ``timeout``; return what was."""
        poller = select.poll()
        poller.register(self._input_r, select.POLLIN)
        if fd is not None:
            poller.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(max(0, int(timeout * 1000)) + 1)}
        if self._input_r in ready:
            with contextlib.suppress(OSError):
                os.read(self._input_r, 4096)
        return ready

    def _receive(self) -> list[Callable[[], None]]:
        """Drain the socket and dispatch; return the task callbacks to run (lock released)."""
        callbacks: list[Callable[[], None]] = []
        with self._sock_lock:
            while self._input_pending():
                for message in self._link.receive():
                    callbacks += self._dispatch(message)
                self._flush()
        return callbacks

    def _hand_back(self) -> None:
        """After a caller let the receiver role go: wake the I/O thread if others wait."""
        with self._lock:
            waiting = bool(self._calls or self._tasks or self._outbox or self._handoff)
        if waiting:
            self._wake()

    # --- the I/O thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with self._sock_lock:
                self._link.open()
            self._loop()
        except LinkRefused as refused:
            self._fail_all(refused.error)
        except Exception as exc:  # a bug: fail every waiter loudly instead of hanging them
            log.exception("fabric client I/O thread crashed")
            self._fail_all(FabricError(f"the client I/O thread crashed: {exc!r}"))
        finally:
            with self._sock_lock:
                if self._closing:
                    self._flush(force=True)
                    self._link.say_bye(Bye())
                self._link.close_socket()
            if self._closing:
                self._fail_all(BrokerUnavailable(f"the connection to {self.address} was closed"))
            self._welcomed.set()

    def _loop(self) -> None:
        while not self._closing:
            now = time.monotonic()
            wait = min(self._link.next_tick(now), self._next_resend(now) - now)
            if self._done:
                wait = min(wait, self._done_due - now)
            self._turn(wait)

    def _turn(self, timeout: float) -> None:
        """Sleep until input, a wake-up or ``timeout``; then do all the socket work due."""
        watching = self._watch()
        callbacks: list[Callable[[], None]] = []
        try:
            with self._sock_lock:
                sock = self._link.socket
                fd = cast(int, sock.getsockopt(zmq.FD)) if watching and sock else None
                ready = watching and self._input_pending()
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            if watching:
                poller.register(self._input_r, select.POLLIN)
            if fd is not None:
                poller.register(fd, select.POLLIN)
            events = dict(poller.poll(0 if ready else max(0, int(timeout * 1000)) + 1))
            for pipe in (self._wake_r, self._input_r):
                if pipe in events:
                    os.read(pipe, 4096)
            if self._refused is not None:
                raise self._refused
            with self._sock_lock:
                self._flush()
                now = time.monotonic()
                self._link.tick(now)
                self._check_lost(now)
                self._resend_rejected(now)
                self._flush()
            # not watching: drain at each turn anyway (heartbeats), unless a caller receives
            if watching or self._receiver.acquire(blocking=False):
                try:
                    callbacks += self._receive()
                finally:
                    if not watching:
                        self._receiver.release()
        finally:
            if watching:
                self._receiver.release()
        with self._lock:
            callbacks, self._handoff = self._handoff + callbacks, []
        for callback in callbacks:
            callback()

    def _watch(self) -> bool:
        """Take the receiver role if something must be watched for; return whether taken."""
        receiver = self._receiver.acquire(blocking=False)
        with self._lock:  # decided and published at once: submit() reads it under _lock
            self._watching = receiver and bool(
                self._tasks
                or self._calls
                or self._host is not None
                or self._closing
                or not self._link.ready
            )
            watch = self._watching
        if receiver and not watch:
            self._receiver.release()
        return watch

    def _flush(self, force: bool = False) -> None:
        """Send what is queued; DONE only once a batch is full, due, or ``force``d."""
        if not self._link.ready:
            return
        with self._lock:
            outbox, self._outbox = self._outbox, []
            done: list[bytes] = []
            if len(self._done) >= _DONE_BATCH or force or time.monotonic() >= self._done_due:
                done, self._done = self._done, []
        for start in range(0, len(done), _DONE_BATCH):
            outbox.append(Done(tasks=tuple(done[start : start + _DONE_BATCH])))
        for sent, message in enumerate(outbox):
            if not self._link.send(message):  # the socket is full: keep the rest, in order
                with self._lock:
                    self._outbox[:0] = outbox[sent:]
                return

    def _resend(self, welcome: Welcome) -> None:
        """Re-send what the broker has not acknowledged, in order, on a new session."""
        self._lost_since = None
        self._welcomed.set()
        with self._lock:
            self._outbox = [
                *(p.message for p in self._calls.values()),
                *(t.message for t in self._tasks.values() if not t.acked),
                *(m for m in self._outbox if not isinstance(m, Call | Create | Submit)),
            ]

    def _dispatch(self, message: Message) -> list[Callable[[], None]]:
        """Handle one message; return the task callbacks to run once the lock is released."""
        if isinstance(message, Result):
            return self._result(message)
        if isinstance(message, Reply):
            self._replied(message)
        elif isinstance(message, Ack):
            for acked in message.tasks:
                task = self._tasks.get(acked)
                if task is not None:
                    task.acked = True
        elif isinstance(message, Reject):
            return self._rejected(message)
        elif isinstance(message, Create | Call | Gone) and self._host is not None:
            self._host_jobs.put(message)
        else:
            log.debug("ignored %s from the broker", type(message).__name__)
        return []

    def _replied(self, reply: Reply) -> None:
        with self._lock:
            pending = self._calls.pop(reply.call, None)
        if pending is not None:
            pending.reply = reply
            pending.done.set()

    def _result(self, message: Result) -> list[Callable[[], None]]:
        with self._lock:
            task = self._tasks.pop(message.task, None)
            self._busy.pop(message.task, None)
            if not self._done:
                self._done_due = time.monotonic() + _DONE_DELAY_S
            self._done.append(message.task)
        if task is None:
            return []  # a result re-sent after a resume: already delivered, DONE it again
        payload = bytes(message.payload[0]) if message.payload else b""

        def deliver() -> None:
            try:
                task.on_result(message.status, message.message, payload)
            except Exception:
                log.exception("a result callback raised (task %s)", message.task.hex())

        return [deliver]

    def _rejected(self, message: Reject) -> list[Callable[[], None]]:
        task = self._tasks.get(message.task)
        if task is None:
            return []
        with self._lock:
            if message.code == "busy":
                task.resend_at = time.monotonic() + max(message.retry_after, 0.01)
                self._busy[message.task] = task
                return []
            self._tasks.pop(message.task, None)
            self._busy.pop(message.task, None)
        if message.code == "duplicate":  # its result was delivered already
            return []
        why = f"{message.code}: {message.reason}"
        return [lambda: task.on_result("rejected", why, b"")]

    def _next_resend(self, now: float) -> float:
        with self._lock:
            return min((t.resend_at for t in self._busy.values()), default=now + 3600.0)

    def _resend_rejected(self, now: float) -> None:
        with self._lock:
            due = [(k, t) for k, t in self._busy.items() if t.resend_at <= now]
        for key, task in due:
            # not sent (link down or full): try again shortly; a new session re-sends it anyway
            if self._link.send(task.message):
                with self._lock:
                    self._busy.pop(key, None)
            else:
                task.resend_at = now + 0.05

    def _check_lost(self, now: float) -> None:
        """Fail everything in flight once the broker has been gone for reconnect_timeout."""
        if self._link.ready:
            self._lost_since = None
            return
        if self._lost_since is None:
            self._lost_since = now
        elif now - self._lost_since > self._reconnect_timeout:
            self._lost_since = now
            self._fail_all(
                BrokerUnavailable(
                    f"the broker at {self.address} has been unreachable for "
                    f"{self._reconnect_timeout:.0f} s"
                ),
                keep_open=True,
            )

    def _fail_all(self, error: Exception, keep_open: bool = False) -> None:
        with self._lock:
            if not keep_open:
                self._fatal = error
            calls, self._calls = self._calls, {}
            tasks, self._tasks = self._tasks, {}
            self._busy = {}
            self._outbox = []
        for pending in calls.values():
            pending.error = error
            pending.done.set()
        for task in tasks.values():
            task.on_result("unavailable", str(error), b"")
        self._welcomed.set()

    # --- the host thread (custom types registered by this client) ------------------------
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
