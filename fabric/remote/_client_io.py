"""The I/O core of a client's connection: one socket, one I/O thread, any number of calling threads.

ZeroMQ sockets are not thread-safe, so every use of the socket happens under
``_sock_lock``. A calling thread sends its message itself (one thread hop less
per call), but for a submit made while many tasks await results: that one joins
the outbox, which the I/O thread (or the submit that fills it) sends as one
BATCH. One thread at a time, the *receiver* (``_receiver``), sleeps on the
socket's readiness fd (``zmq.FD``, which can be watched without touching the
socket), drains the socket and resolves what came back. A thread waiting for
its reply, or blocked in a task future's ``result()``, takes that role itself if
it is free (see ``Connection``); the I/O thread takes it when something else is
awaited (task results while no caller waits on one, and for ``TASK_LINGER_S``
after the last submit, host jobs, calls of threads that are not receiving, a
WELCOME) and otherwise sleeps on
its wake-up pipe and timers only, draining the socket at each timer tick.
``zmq.FD`` is edge-triggered and any socket call may consume its edge, so
whoever used the socket checks ``zmq.EVENTS`` before letting go and, if input
is pending, pokes the receiver through ``_input_r``. Task-result callbacks run
on the I/O thread outside the lock (a receiving caller hands them over, but
one awaiting a task result runs them itself).
Everything the broker has not acknowledged is re-sent on every new session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import cast

import zmq

from fabric.broker.protocol import Bye, Call, Create, Message, Submit, Welcome
from fabric.errors import BrokerUnavailable, FabricError
from fabric.remote._client_calls import PendingCall
from fabric.remote._client_tasks import TaskBook
from fabric.remote._link import Link, LinkRefused, Runtime

log = logging.getLogger(__name__)

RETRY_S = 0.05  # how often a thread waiting on the socket or a latch looks again
# the I/O thread keeps watching this long after the last task: a caller that submits
# one task after another's result does not wake it each time
TASK_LINGER_S = 0.1
# chores (heartbeats, held-back tasks, DONE batches) are looked at this often at most
# while nothing is queued to send: far finer than any of their own clocks
CHORES_S = 0.005
ZMQ_FD = int(zmq.FD)  # (plain ints: getsockopt's enum wrapping costs more than the call)
# a caller that awaited a result lately (within TASK_LINGER_S) is left this long after each
# submit to come back for its result and receive it itself; the I/O thread, which then looks
# at least this often, takes over from callers that do not
TASK_GRACE_S = 0.005
# while this many tasks await results, a submit joins the outbox instead of the socket: the
# I/O thread (which then looks at least every CHORES_S) sends what gathered as one BATCH,
# so a loop of submits costs the broker one message per batch, not one per task
COALESCE_AFTER = 8
OUTBOX_BATCH = 32  # a submit that fills the outbox to this sends it at once


class ClientIO(ABC):
    """The socket, the I/O thread and the receiver role under a client connection.

    A subclass fills the books (``_calls``, ``_tasks``), handles what arrives
    (``_dispatch``), may add threads of its own (``_stop_serving`` ends them),
    and calls ``_start`` last in its ``__init__``.
    """

    def __init__(
        self,
        address: str,
        *,
        curve: tuple[bytes, bytes, bytes] | None,
        role: str,
        name: str,
        runtime: Runtime | None,
        reconnect_timeout: float,
        endpoint: tuple[zmq.Context[zmq.Socket[bytes]], str] | None,
        hosting: bool,
    ) -> None:
        self._address = address
        link_address = address
        self._own_context = endpoint is None
        if endpoint is not None:  # no TCP, CURVE or I/O-thread hops to a broker in this process
            self._context, link_address = endpoint
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
        self._hosting = hosting  # host jobs may arrive at any time: always watch
        self._lock = threading.Lock()
        self._sock_lock = threading.RLock()
        self._outbox: list[Message] = []
        self._calls: dict[int, PendingCall] = {}
        self._tasks = TaskBook()
        self._wake_r, self._wake_w = os.pipe()
        self._input_r, self._input_w = os.pipe()  # "input is pending" for the receiver
        for fd in (self._wake_w, self._input_w):
            os.set_blocking(fd, False)  # a full pipe already says "look"
        self._receiver = threading.Lock()  # held by the one thread watching the socket
        self._watching = False  # the I/O thread is the receiver (guarded by _lock)
        self._tasks_at = 0.0  # when the last task was submitted (guarded by _lock)
        self._task_waiters = 0  # callers receiving for their own task results (guarded by _lock)
        self._waited_at = -TASK_LINGER_S  # when a caller last stopped awaiting one (ditto)
        self._sleep_until = 0.0  # when the I/O thread looks again at the latest (ditto)
        self._chores_at = 0.0  # the chores are due again (I/O thread only)
        self._poller, self._polled = select.poll(), ()  # the I/O thread's, and what it watches
        self._handoff: list[Callable[[], None]] = []  # callbacks a receiving caller got
        self._refused: LinkRefused | None = None
        self._closing = False
        self._fatal: Exception | None = None
        self._welcomed = threading.Event()
        self._lost_since: float | None = None
        self._threads = [threading.Thread(target=self._run, name="fabric-io", daemon=True)]

    @abstractmethod
    def _dispatch(self, message: Message) -> list[Callable[[], None]]:
        """Handle one message; return the task callbacks to run once the lock is released."""

    @abstractmethod
    def _stop_serving(self) -> None:
        """Tell the subclass's own threads (in ``_threads``) to finish; they are joined next."""

    def _start(self, timeout: float) -> None:
        """Start the threads and wait for the first WELCOME; raise why it did not come."""
        for thread in self._threads:
            thread.start()
        if not self._welcomed.wait(timeout) or self._fatal is not None:
            error = self._fatal or BrokerUnavailable(
                f"no answer from a broker at {self.address} within {timeout} s"
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

    def close(self) -> None:
        """Say BYE, stop the threads, close the socket. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._wake()
        self._stop_serving()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(10)
        # a caller still receiving (its call was just failed) lets go within RETRY_S:
        # only then may the pipes' fds be closed and reused
        if self._receiver.acquire(timeout=1.0):
            self._receiver.release()
        for fd in (self._wake_r, self._wake_w, self._input_r, self._input_w):
            os.close(fd)
        if self._own_context:
            self._context.term()

    def __del__(self) -> None:
        if not getattr(self, "_closing", True):
            warnings.warn(
                f"unclosed fabric connection to {self.address}", ResourceWarning, stacklevel=1
            )

    # --- sending, from any thread -----------------------------------------------------------
    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise BrokerUnavailable(f"the connection to {self.address} is closed")

    def _post(self, message: Message) -> None:
        with self._lock:
            self._check_open()
        self._send_or_queue(message)

    def _send_or_queue(self, message: Message) -> None:
        """Send from this thread if the session is up and nothing queued is ahead, else queue."""
        self._send_all_or_queue([message])

    def _send_all_or_queue(self, messages: list[Message]) -> None:
        """Send ``messages`` in order from this thread under one lock; queue what cannot go.

        Only for messages the broker takes twice harmlessly (see ``Link.send_many``).
        """
        sent = 0
        with self._sock_lock:
            if self._link.ready and not self._outbox:
                sent = self._link.send_many(messages)  # several to a BATCH
                if sent and self._input_pending():
                    self._poke_receiver()  # our sends may have eaten the edge it waits for
        if sent < len(messages):
            with self._lock:
                self._outbox += messages[sent:]
            self._wake()

    def _input_pending(self) -> bool:
        return self._link.input_pending()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # closed during shutdown
            os.write(self._wake_w, b"\0")

    def _poke_receiver(self) -> None:
        with contextlib.suppress(OSError):  # closed during shutdown
            os.write(self._input_w, b"\0")

    # --- receiving: whichever thread holds _receiver ------------------------------------
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
            while True:
                # receive() drains the socket: its last look at EVENTS found no input
                for message in self._link.receive():
                    callbacks += self._dispatch(message)
                # look again only if a send may have eaten the edge of input come since
                if not self._flush() or not self._input_pending():
                    return callbacks

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
            with self._lock:
                timeout = min(self._link.next_tick(now), self._tasks.next_due(now) - now)
                if now - self._waited_at < TASK_LINGER_S:
                    timeout = min(timeout, TASK_GRACE_S)  # see _callers_receive
                if now - self._tasks_at < TASK_LINGER_S:
                    timeout = min(timeout, CHORES_S)  # see _coalesce
                if self._outbox:
                    timeout = 0.0
                self._sleep_until = now + timeout
            self._turn(timeout)

    def _callers_receive(self, now: float) -> bool:
        """Whether callers receive the task results (under ``_lock``).

        So while one awaits a result, for ``TASK_GRACE_S`` after one did (a map's
        consumer is back for the next result by then), and for ``TASK_GRACE_S``
        after a submit if one did lately: a caller submitting one task after
        another's result wakes nobody. The I/O thread then looks every
        ``TASK_GRACE_S`` at most, so a result nobody awaits is received by it
        that much later at worst.
        """
        if self._task_waiters or now - self._waited_at < TASK_GRACE_S:
            return True
        return now - self._waited_at < TASK_LINGER_S and now - self._tasks_at < TASK_GRACE_S

    def _coalesce(self, now: float, messages: list[Message]) -> bool:
        """Queue a submit's ``messages`` for the I/O thread to send with others (under ``_lock``).

        Only while ``COALESCE_AFTER`` other tasks await results (a lone round
        trip goes at once) and the I/O thread looks again within ``CHORES_S``
        (a burst of submits keeps it that alert for ``TASK_LINGER_S``).
        """
        if len(self._tasks) - len(messages) < COALESCE_AFTER or self._closing:
            return False
        if self._sleep_until > now + CHORES_S or not self._link.ready:
            return False
        self._outbox += messages
        return True

    def _must_wake_for_tasks(self, now: float) -> bool:
        """Whether a submit must wake the I/O thread to watch (under ``_lock``)."""
        return not self._watching and (
            not self._callers_receive(now) or self._sleep_until > now + TASK_GRACE_S
        )

    def _turn(self, timeout: float) -> None:
        """Sleep until input, a wake-up or ``timeout``; then do all the socket work due.

        What arrived is received and its callbacks run first, the chores (queued
        sends, heartbeats, the lost-broker clock, held-back tasks) after, and
        at most every ``CHORES_S`` while nothing is queued: a result waits for
        nothing that is not its own, and a busy I/O thread spends little on them.
        """
        watching = self._watch()
        callbacks: list[Callable[[], None]] = []
        try:
            with self._sock_lock:
                sock = self._link.socket
                fd = cast(int, sock.get(ZMQ_FD)) if watching and sock else None
                ready = watching and self._input_pending()
            poller = self._poller_for((self._input_r,) if watching else (), fd)
            events = dict(poller.poll(0 if ready else max(0, int(timeout * 1000)) + 1))
            for pipe in (self._wake_r, self._input_r):
                if pipe in events:
                    os.read(pipe, 4096)
            if self._refused is not None:
                raise self._refused
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
        now = time.monotonic()
        if now >= self._chores_at or self._outbox or not self._link.ready:
            self._chores_at = now + CHORES_S
            with self._sock_lock:
                self._flush()
                self._link.tick(now)
                self._check_lost(now)
                self._resend_busy(now)
                self._flush()

    def _poller_for(self, pipes: tuple[int, ...], fd: int | None) -> select.poll:
        """Return a poller of the wake-up pipe, ``pipes`` and ``fd`` (kept while those stay)."""
        fds = (self._wake_r, *pipes, *(() if fd is None else (fd,)))
        if fds != self._polled:
            self._poller, self._polled = select.poll(), fds
            for each in fds:
                self._poller.register(each, select.POLLIN)
        return self._poller

    def _watch(self) -> bool:
        """Take the receiver role if something must be watched for; return whether taken."""
        receiver = self._receiver.acquire(blocking=False)
        with self._lock:  # decided and published at once: submit() reads it under _lock
            now = time.monotonic()
            tasks = bool(self._tasks) or now - self._tasks_at < TASK_LINGER_S
            self._watching = receiver and (
                (tasks and not self._callers_receive(now))
                or bool(self._calls)
                or self._hosting
                or self._closing
                or not self._link.ready
            )
            watch = self._watching
        if receiver and not watch:
            self._receiver.release()
        return watch

    def _flush(self, force: bool = False) -> bool:
        """Send what is queued; DONE only once a batch is full, due, or ``force``d.

        Return whether anything was sent.
        """
        if not self._link.ready:
            return False
        with self._lock:
            outbox, self._outbox = self._outbox, []
            outbox += self._tasks.take_done(time.monotonic(), force)
        if not outbox:
            return False
        # several to a BATCH: every message queued here is one the broker takes twice harmlessly
        sent = self._link.send_many(outbox)
        if sent < len(outbox):  # the socket is full: keep the rest, in order
            with self._lock:
                self._outbox[:0] = outbox[sent:]
        return sent > 0

    def _resend(self, welcome: Welcome) -> None:
        """Re-send what the broker has not acknowledged, in order, on a new session."""
        self._lost_since = None
        self._welcomed.set()
        with self._lock:
            self._outbox = [
                *(p.message for p in self._calls.values()),
                *self._tasks.unacked(),
                *(m for m in self._outbox if not isinstance(m, Call | Create | Submit)),
            ]

    def _resend_busy(self, now: float) -> None:
        """Send again the tasks the broker turned away as busy whose wait is over."""
        with self._lock:
            due = self._tasks.busy_due(now)
        for task in due:
            # not sent (link down or full): try again shortly; a new session re-sends it anyway
            sent = self._link.send(task.message)
            with self._lock:
                self._tasks.resent(task, sent, now)

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
            tasks = self._tasks.take_all()
            self._outbox = []
        for pending in calls.values():
            pending.fail(error)
        for task in tasks:
            task.on_result("unavailable", str(error), b"")
        self._welcomed.set()
