"""Work stealing: take prefetched tasks back from a worker while another one's slot idles.

Theory of operation. A worker's credit covers its task processes (``slots``,
said in HELLO) plus a prefetch window: the tasks it holds past its slots wait
at the node behind its running ones. Left alone, that is Celery's starvation:
they wait there while another worker has an idle slot and nothing queued that
it can run. The scheduler calls :func:`reclaims` whenever credit is left over
after dispatching (so no queued task fits any worker with credit), and each
worker holding more tasks than it has slots gets a RECLAIM naming its newest
tasks that an idle worker could run: at most as many as it holds past its
slots, and all of them together (with those of RECLAIMs still out) at most as
many as there are idle slots.

The node answers at once: each named task it holds unstarted comes back as
``RESULT(returned)`` with the credit of the queue place it frees (so the
broker's credit for the node and the node's free places stay equal), newest
first; if it kept any (started, finished, unknown), a ``CREDIT(0)`` after
them ends the answer. The scheduler queues the returned ones again at the
front of their lanes, counting neither a crash nor a loss, and ``pick`` gives
them to idle slots first. A started task is never taken back. The bound on
the starvation is one broker -> node -> broker round trip.

No storms: at most one RECLAIM per worker is out at a time
(``Worker.reclaiming``: the names not answered yet; a RESULT for one answers
it, a CREDIT answers the rest, a new session forgets them), and a task the
node kept is marked ``started`` and never named again for that dispatch, so
a worker's session gets at most as many RECLAIMs as dispatches. A worker that
does not say its slots (0) is never asked.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from fabric.broker.lanes import eligible
from fabric.broker.protocol import Message, Reclaim
from fabric.broker.tasks import Task, Worker

__all__ = ["reclaims"]


def reclaims(
    workers: Collection[Worker], tasks: Mapping[bytes, Task]
) -> list[tuple[bytes, Message]]:
    """Return the RECLAIMs to send now, marking their workers as reclaiming.

    Call only when no queued task can go to any worker with credit (after
    dispatching). No I/O, no clock: it reads the workers and tasks and sets
    ``reclaiming``.
    """
    victims = [w for w in workers if w.slots and not w.reclaiming and len(w.running) > w.slots]
    if not victims:  # the common case (no window in use): called after every dispatch
        return []
    thieves = [worker for worker in workers if worker.idle() > 0]
    # the idle slots that the tasks named by RECLAIMs still out will fill are spoken for
    idle = sum(w.idle() for w in thieves) - sum(len(w.reclaiming) for w in workers)
    if idle <= 0:
        return []
    victims.sort(key=lambda w: len(w.running) - w.slots, reverse=True)
    outs: list[tuple[bytes, Message]] = []
    for victim in victims:
        want = min(len(victim.running) - victim.slots, idle)
        held = sorted((tasks[key] for key in victim.running), key=lambda t: t.turn, reverse=True)
        named = [
            t for t in held if not t.started and any(eligible(w, t.requires) for w in thieves)
        ][:want]
        if named:
            victim.reclaiming = {(t.key, t.attempt) for t in named}
            idle -= len(named)
            message = Reclaim(tuple(t.key for t in named), tuple(t.attempt for t in named))
            outs.append((victim.session, message))
            if not idle:
                break
    return outs
