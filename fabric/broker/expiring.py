"""A bounded set of keys that expire: results held for absent clients, tombstones."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["Expiring"]


class Expiring:
    """Keys with a deadline ``ttl`` after they were (re)added, at most ``limit`` of them.

    The oldest go first when the limit is passed; not thread-safe.
    """

    def __init__(self, ttl: float, limit: int) -> None:
        self.ttl, self.limit = ttl, limit
        self._deadlines: OrderedDict[bytes, float] = OrderedDict()

    def add(self, key: bytes, now: float) -> list[bytes]:
        """Add (or renew) ``key``; return the oldest keys pushed out past the limit."""
        self._deadlines[key] = now + self.ttl
        self._deadlines.move_to_end(key)
        out: list[bytes] = []
        while len(self._deadlines) > self.limit:
            out.append(self._deadlines.popitem(last=False)[0])
        return out

    def discard(self, key: bytes) -> None:
        """Forget ``key`` if present."""
        self._deadlines.pop(key, None)

    def due(self, now: float) -> list[bytes]:
        """Remove and return the keys whose deadline has passed, oldest first."""
        out: list[bytes] = []
        while self._deadlines and next(iter(self._deadlines.values())) <= now:
            out.append(self._deadlines.popitem(last=False)[0])
        return out

    def __contains__(self, key: object) -> bool:
        return key in self._deadlines
