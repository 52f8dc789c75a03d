"""One connection per broker address per process, for proxies that arrive by pickle.

A proxy unpickled in a task process (or any process) finds the connection this
process already has to that broker (a Manager's), or opens one. Task processes
of a worker node learn the client credentials from the node through the
environment (see ``_keys``).
"""

from __future__ import annotations

import atexit
import threading

from fabric.remote._connection import Connection
from fabric.remote._keys import curve_from_env

_lock = threading.Lock()
_open: dict[str, Connection] = {}


def register(conn: Connection) -> None:
    """Let proxies for ``conn.address`` in this process use ``conn``."""
    with _lock:
        _open.setdefault(conn.address, conn)


def unregister(conn: Connection) -> None:
    """Forget ``conn`` (it is closing)."""
    with _lock:
        if _open.get(conn.address) is conn:
            del _open[conn.address]


def connection_for(address: str) -> Connection:
    """Return this process's connection to ``address``, opening one if needed."""
    with _lock:
        conn = _open.get(address)
        if conn is None:
            conn = Connection(address, curve=curve_from_env())
            try:
                conn.check_runtime()
            except BaseException:
                conn.close()
                raise
            _open[address] = conn
            atexit.register(_close, conn)
        return conn


def _close(conn: Connection) -> None:
    unregister(conn)
    conn.close()
