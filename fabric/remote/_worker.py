"""The worker node: one supervisor process with a link to the broker and N task processes.

Theory of operation. The supervisor (this module, one thread) owns the broker
link and nothing else runs user code here: task processes are plain
``python -m fabric.remote._taskproc`` children fed through pipes, so a task
that hogs the GIL, blocks or crashes never stops the heartbeats.
- Credit = free places: HELLO announces the free slots plus the free part of
  the prefetch window (and the slots themselves), each RESULT hands one back
  (``credit=1``). The node takes up to ``prefetch`` tasks beyond its free
  slots (by default ``DEFAULT_PREFETCH`` per task process; 0: none), queues
  them here and hands each to the first task process that frees, in arrival
  order.
  The broker counts them DISPATCHED like running ones (its credit accounting),
  so a node that dies has them re-queued; CANCEL of a queued one answers
  ``cancelled`` at once.
- RECLAIM (the broker's work stealing: another node has an idle slot) names
  tasks; those still queued here go back at once, newest first, as
  ``returned`` with the credit of the place each frees; if any named one
  stays, ``CREDIT(0)`` after them ends the answer. A started task is never
  handed back.
- A RESULT is kept until the broker ACKs it and re-sent on every new session,
  so a broker restart or a network cut loses no result.
- A task process that dies mid-task is reported at once as ``crashed`` (with
  its signal or exit code) and replaced; the broker retries the task elsewhere.
- CANCEL of a running task kills its process (SIGTERM, then SIGKILL after
  ``grace``) and reports ``cancelled``.
- SIGTERM (or ``drain()``) drains: results go back with no credit, tasks that
  still arrive are not started, and once the running ones (and the prefetched
  ones queued before the drain, unless a RECLAIM takes them elsewhere: the
  broker would wait for the BYE anyway) are done and ACKed the node says BYE
  (the broker re-queues what it had not started) and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import FrameType
from typing import cast

import zmq

from fabric.broker.protocol import Ack, Bye, Cancel, Credit, Dispatch, Reclaim, Result, Welcome
from fabric.remote._link import Link, LinkRefused, Runtime
from fabric.remote._pipes import FrameReader, write_frame

log = logging.getLogger(__name__)

_ZMQ_FD = int(zmq.FD)  # (a plain int: getsockopt's enum wrapping costs more than the call)

# Measured with no-op tasks on 2 task processes (bench/bench_remote.py's setup): a window of
# 1, 2, 4 and 8 tasks per process gave ~0.85x, ~1.0x, ~1.25x and ~1.3x of the raw floor's
# throughput (none: ~0.6x); the broker's work stealing bounds what a window costs.
DEFAULT_PREFETCH = 4
"""The default prefetch window, per task process (see ``docs/remote.md``, "Worker nodes")."""


@dataclass
class _Slot:
    proc: subprocess.Popen[bytes]
    tasks: int  # write end: tasks to the process
    results: FrameReader  # read end: results from it
    task: tuple[bytes, int] | None = None
    cancelled: bool = False


def check_prefetch(prefetch: object) -> int:
    """Return ``prefetch`` if it is an int >= 0, else raise TypeError or ValueError."""
    if not isinstance(prefetch, int) or isinstance(prefetch, bool):
        raise TypeError(f"prefetch must be an int >= 0, not {type(prefetch).__name__}")
    if prefetch < 0:
        raise ValueError(
            f"prefetch must be >= 0 (tasks held beyond the free slots), not {prefetch}"
        )
    return prefetch


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class WorkerNode:
    """Run tasks from the broker at ``address`` on ``processes`` task processes.

    ``address`` may be a callable, called once the task processes are started:
    a Manager starts its node while its broker is still starting and hands the
    address over then, so the two start-ups overlap. ``prefetch``: tasks the
    node may hold beyond its free slots (None: ``DEFAULT_PREFETCH`` per task
    process; 0: one task per free slot).
    """

    def __init__(
        self,
        address: str | Callable[[], str],
        *,
        processes: int | None = None,
        name: str | None = None,
        curve: tuple[bytes, bytes, bytes] | None = None,
        runtime: Runtime | None = None,
        env: dict[str, str] | None = None,
        grace: float = 5.0,
        prefetch: int | None = None,
    ) -> None:
        if processes is not None and processes < 1:
            raise ValueError("processes must be >= 1")
        self.processes = processes or os.cpu_count() or 1
        self.prefetch = (
            DEFAULT_PREFETCH * self.processes if prefetch is None else check_prefetch(prefetch)
        )
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self._env = {**os.environ, **(env or {})}
        self._grace = grace
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._address = address
        self._link = Link(
            self._context,
            address if isinstance(address, str) else "",
            role="worker",
            name=self.name,
            curve=curve,
            capacity=self._free,
            slots=self.processes,
            runtime=runtime,
            on_welcome=self._resend,
        )
        self._slots: list[_Slot] = []
        self._spawned = 0  # task processes started so far: the loop's poller follows it
        self._queued: deque[Dispatch] = deque()  # prefetched, not started (arrival order)
        self._unacked: dict[tuple[bytes, int], Result] = {}
        self._unsent: list[tuple[bytes, int]] = []
        self._draining = False
        self._stop_now = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # --- control ----------------------------------------------------------------------
    def drain(self) -> None:
        """Finish the running tasks, start no new ones, then leave (async-signal-safe).

        A second call stops at once: running tasks are killed (the broker retries them).
        """
        self._stop_now = self._draining
        self._draining = True
        with contextlib.suppress(OSError):  # a full pipe already wakes the loop
            os.write(self._wake_w, b"\0")

    def install_signal_handlers(self) -> None:
        """Drain on SIGTERM and SIGINT, stop at once on the second (call from the main thread)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("worker node %s: %s, draining", self.name, signal.Signals(signum).name)
            self.drain()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> int:
        """Serve until drained; return the exit status (2 if the broker refused this node)."""
        try:
            self._slots = [self._spawn() for _ in range(self.processes)]
            if not isinstance(self._address, str):
                self._link.address = self._address()
            self._link.open()
            self._loop()
            return 0
        except LinkRefused as refused:
            log.error("worker node %s: %s", self.name, refused.error)
            return 2
        finally:
            self._shutdown()

    # --- the loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        # One select.poll of the wake-up pipe, the task processes' result pipes and the
        # socket's readiness fd (zmq.FD): one system call per turn, where zmq.Poller
        # looks at EVENTS before and after its poll. zmq.FD is edge-triggered and any
        # use of the socket may consume its edge, so input is looked for (EVENTS) before
        # sleeping unless the last use of the socket was such a look that found none.
        poller, by_fd, watched = select.poll(), {}, None
        link = self._link
        while not (self._draining and self._idle()) and not self._stop_now:
            sock = link.socket
            if watched != (sock, self._spawned):  # the socket or a task process changed
                watched = (sock, self._spawned)
                by_fd = {slot.results.fd: slot for slot in self._slots}
                poller = select.poll()
                for fd in (self._wake_r, *by_fd):
                    poller.register(fd, select.POLLIN)
                if sock is not None:
                    poller.register(cast(int, sock.get(_ZMQ_FD)), select.POLLIN)
            if link.input_pending():
                events = poller.poll(0)
            else:
                events = poller.poll(int(link.next_tick(time.monotonic()) * 1000) + 1)
            signalled = False  # the socket's fd: input may have come
            for fd, _ in events:
                if fd in by_fd:
                    self._collect(by_fd[fd])
                elif fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                else:
                    signalled = True
            self._send_unsent()  # the results collected above leave as one BATCH
            # drained and not signalled since: no input (it would have made the fd readable)
            if sock is not None and sock is link.socket and (signalled or not link.drained):
                for message in link.receive():  # ends on a look at EVENTS that found none
                    self._on_message(message)
                self._send_unsent()
            link.tick(time.monotonic())
        if link.ready and not self._stop_now:
            link.say_bye(Bye())
        log.info("worker node %s drained", self.name)

    def _idle(self) -> bool:
        return (
            all(slot.task is None for slot in self._slots)
            and not self._queued
            and not self._unacked
        )

    def _free(self) -> int:
        if self._draining:
            return 0
        idle = sum(slot.task is None for slot in self._slots)
        return idle + self.prefetch - len(self._queued)

    def _on_message(self, message: object) -> None:
        if isinstance(message, Dispatch):
            self._start(message)
        elif isinstance(message, Ack):
            for key in zip(message.tasks, message.attempts, strict=False):
                self._unacked.pop(key, None)
        elif isinstance(message, Cancel):
            self._cancel(message)
        elif isinstance(message, Reclaim):
            self._reclaim(message)

    def _start(self, message: Dispatch) -> None:
        if self._draining:
            log.info("draining: not starting task %s (the broker re-queues it)", message.task.hex())
            return
        if len(self._queued) >= self.prefetch and self._idle_slot() is None:
            # the broker overdrew our credit: hand the task back, unstarted
            log.info("no free slot for task %s: returned to the broker", message.task.hex())
            self._report(
                Result(
                    task=message.task,
                    attempt=message.attempt,
                    status="returned",
                    message="worker node had no free slot",
                    credit=0,
                )
            )
            return
        self._queued.append(message)
        self._feed()

    def _feed(self) -> None:
        """Hand queued tasks to idle task processes, oldest first."""
        while self._queued and (slot := self._idle_slot()) is not None:
            message = self._queued.popleft()
            slot.task, slot.cancelled = (message.task, message.attempt), False
            with contextlib.suppress(OSError):  # a dead process: _collect reports its EOF
                write_frame(slot.tasks, *message.payload)

    def _idle_slot(self) -> _Slot | None:
        for slot in self._slots:
            if slot.task is None:
                return slot
        return None

    def _collect(self, slot: _Slot) -> None:
        frame = slot.results.read()
        task = slot.task
        if frame is not None:
            slot.task = None
            self._feed()  # the next task first: the process is idle until it has one
            if task is not None:
                status = "ok" if frame[:1] == b"\1" else "error"
                self._finish(task, status, "", frame[1:])
            return
        returncode = self._reap(slot)
        self._slots[self._slots.index(slot)] = self._spawn()
        self._feed()
        if task is not None:
            if slot.cancelled:
                self._finish(task, "cancelled", "cancelled while running", b"")
            else:
                why = f"task process {slot.proc.pid} on {self.name} {_signal_name(returncode)}"
                log.warning("task %s: %s", task[0].hex(), why)
                self._finish(task, "crashed", why, b"")

    def _finish(self, task: tuple[bytes, int], status: str, why: str, payload: bytes) -> None:
        credit = 0 if self._draining else 1
        self._report(
            Result(
                task=task[0],
                attempt=task[1],
                status=status,
                message=why,
                credit=credit,
                payload=(payload,) if payload else (),
            )
        )

    def _report(self, result: Result) -> None:
        """Keep ``result`` until ACKed; it leaves with the loop's next ``_send_unsent``."""
        key = (result.task, result.attempt)
        self._unacked[key] = result
        self._unsent.append(key)

    def _cancel(self, message: Cancel) -> None:
        for queued in self._queued:
            if queued.task == message.task and queued.attempt == message.attempt:
                self._queued.remove(queued)
                self._finish(
                    (queued.task, queued.attempt), "cancelled", "cancelled before it ran", b""
                )
                return
        for slot in self._slots:
            if slot.task is not None and slot.task[0] == message.task:
                slot.cancelled = True
                slot.proc.terminate()

    def _reclaim(self, message: Reclaim) -> None:
        """Hand back the named tasks not started yet, newest first: another node idles.

        If any named task stays (started, finished, unknown), CREDIT(0) after the
        returned ones ends the answer: the broker then knows the rest stay here.
        """
        named = set(zip(message.tasks, message.attempts, strict=True))
        back = [d for d in reversed(self._queued) if (d.task, d.attempt) in named]
        if back:
            self._queued = deque(d for d in self._queued if (d.task, d.attempt) not in named)
            credit = 0 if self._draining else 1  # its queue place is free again
            for d in back:
                log.info("task %s handed back unstarted at a RECLAIM", d.task.hex())
                self._report(Result(d.task, d.attempt, "returned", "reclaimed", credit))
        if len(back) < len(named):
            self._send_unsent()  # the returned ones first
            self._link.send(Credit(0))

    def _resend(self, welcome: Welcome) -> None:
        # HELLO's capacity already counted the slots these results freed, and the
        # broker takes it as our whole credit: re-sent with their credit, they would
        # let it dispatch more tasks than we have slots (seen after a broker restart).
        self._unsent = []
        for key, result in self._unacked.items():
            self._unacked[key] = replace(result, credit=0)
            if not self._link.send(self._unacked[key]):
                self._unsent.append(key)

    def _send_unsent(self) -> None:
        """Send the results not sent yet, several to a BATCH; keep what the link refuses."""
        if not self._unsent:
            return
        results = [self._unacked[key] for key in self._unsent if key in self._unacked]
        sent = self._link.send_many(results)  # 0 while the link is down: re-sent on WELCOME
        self._unsent = [(result.task, result.attempt) for result in results[sent:]]

    # --- task processes ---------------------------------------------------------------
    def _spawn(self) -> _Slot:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fabric.remote._taskproc",
                str(task_r),
                str(result_w),
                str(os.getpid()),
            ],
            pass_fds=(task_r, result_w),
            stdin=subprocess.DEVNULL,
            env=self._env,
        )
        os.close(task_r)
        os.close(result_w)
        self._spawned += 1
        return _Slot(proc, task_w, FrameReader(result_r))

    def _reap(self, slot: _Slot) -> int:
        for fd in (slot.tasks, slot.results.fd):
            os.close(fd)
        try:
            return slot.proc.wait(self._grace)
        except subprocess.TimeoutExpired:
            slot.proc.kill()
            return slot.proc.wait()

    def _shutdown(self) -> None:
        for slot in self._slots:
            os.close(slot.tasks)  # EOF: an idle task process exits on its own
            if slot.task is not None:
                slot.proc.kill()
        for slot in self._slots:
            try:
                slot.proc.wait(self._grace)
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                slot.proc.wait()
            os.close(slot.results.fd)
        self._slots = []
        self._link.close_socket()
        self._context.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
