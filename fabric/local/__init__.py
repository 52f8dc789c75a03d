"""fabric.local: the ``threading`` API with processes, on a C shared-memory core.

Change ``from threading import Thread`` to ``from fabric.local import Process``
(or ``import multiprocessing`` to ``import fabric.local``) and the code runs on
every core. Nothing here imports zmq or the remote layer.
"""

from fabric.local.executor import Executor
from fabric.local.pool import Pool

__all__: list[str] = ["Executor", "Pool"]
