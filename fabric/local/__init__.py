"""fabric.local: the ``threading`` API with processes, on a C shared-memory core.

Change ``from threading import Thread`` to ``from fabric.local import Process``
(or ``import multiprocessing`` to ``import fabric.local``) and the code runs on
every core. Nothing here imports zmq or the remote layer.
"""

from fabric.local.queues import JoinableQueue, Queue, SimpleQueue

__all__: list[str] = [
    "JoinableQueue",
    "Queue",
    "SimpleQueue",
]
