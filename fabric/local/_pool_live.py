"""The pools running in this process: terminated at interpreter exit, disowned by a fork.

Pools still running at interpreter exit are terminated, so Ctrl-C or an
uncaught exception never leaves workers behind. A forked child inherits the
pools but not their threads or workers: not its to use or stop. The set is
weak: it keeps no pool alive, and each pool removes itself when its loop ends.
"""

from __future__ import annotations

import atexit
import os
import weakref

TYPE_CHECKING = False
if TYPE_CHECKING:
    from fabric.local._pool_engine import Engine

__all__ = ["add", "discard"]

_live: weakref.WeakSet[Engine] = weakref.WeakSet()
add = _live.add
discard = _live.discard


def _orphan_all() -> None:
    for engine in list(_live):
        engine.orphan()
    _live.clear()


os.register_at_fork(after_in_child=_orphan_all)


@atexit.register
def _terminate_live() -> None:
    engines = list(_live)
    for engine in engines:
        if not (engine.drain_at_exit and engine.closing):
            engine.terminate()
    for engine in engines:
        engine.join(None if engine.drain_at_exit and engine.closing else 5.0)
