"""Hosted containers: dict, list, Namespace, Value, Array, Queue, JoinableQueue.

Values are stored as the pickled bytes the client sent and handed back the same
way, so the host never needs the user's classes to keep or return them; only
keys, and values compared by ``list.index``/``remove``/``sort``, are unpickled.
Blocking methods are generators (see ``_ctx``).
"""

from __future__ import annotations

import array
import queue
from collections import deque
from collections.abc import Iterable
from typing import Any

import cloudpickle

from fabric.remote._ctx import Ctx, Wait, deadline

Blob = bytes


class Dict:
    """A dict whose values stay pickled on the host."""

    EXPOSED: tuple[str, ...] = (
        "__getitem__",
        "__setitem__",
        "__delitem__",
        "__contains__",
        "__len__",
        "keys",
        "values",
        "items",
        "get",
        "pop",
        "popitem",
        "setdefault",
        "update",
        "clear",
        "copy",
    )

    def __init__(self, items: Iterable[tuple[Any, Blob]] = ()) -> None:
        self._d: dict[Any, Blob] = dict(items)

    def __getitem__(self, ctx: Ctx, key: Any) -> Blob:
        return self._d[key]

    def __setitem__(self, ctx: Ctx, key: Any, value: Blob) -> None:
        self._d[key] = value

    def __delitem__(self, ctx: Ctx, key: Any) -> None:
        del self._d[key]

    def __contains__(self, ctx: Ctx, key: Any) -> bool:
        return key in self._d

    def __len__(self, ctx: Ctx) -> int:
        return len(self._d)

    def keys(self, ctx: Ctx) -> list[Any]:
        return list(self._d)

    def values(self, ctx: Ctx) -> list[Blob]:
        return list(self._d.values())

    def items(self, ctx: Ctx) -> list[tuple[Any, Blob]]:
        return list(self._d.items())

    def get(self, ctx: Ctx, key: Any) -> Blob | None:
        return self._d.get(key)

    def pop(self, ctx: Ctx, key: Any, default: Blob | None = None) -> Blob:
        if default is None:
            return self._d.pop(key)
        return self._d.pop(key, default)

    def popitem(self, ctx: Ctx) -> tuple[Any, Blob]:
        return self._d.popitem()

    def setdefault(self, ctx: Ctx, key: Any, default: Blob) -> Blob:
        return self._d.setdefault(key, default)

    def update(self, ctx: Ctx, items: list[tuple[Any, Blob]]) -> None:
        self._d.update(items)

    def clear(self, ctx: Ctx) -> None:
        self._d.clear()

    def copy(self, ctx: Ctx) -> dict[Any, Blob]:
        return dict(self._d)


class _Item:
    """A stored blob that compares by its unpickled value (for index/remove/sort)."""

    __slots__ = ("blob", "value")

    def __init__(self, blob: Blob) -> None:
        self.blob = blob
        self.value = cloudpickle.loads(blob)


class List:
    """A list whose items stay pickled on the host."""

    EXPOSED: tuple[str, ...] = (
        "__getitem__",
        "__setitem__",
        "__delitem__",
        "__len__",
        "__contains__",
        "append",
        "extend",
        "insert",
        "pop",
        "remove",
        "index",
        "count",
        "reverse",
        "sort",
        "clear",
        "copy",
    )

    def __init__(self, items: Iterable[Blob] = ()) -> None:
        self._l: list[Blob] = list(items)

    def __getitem__(self, ctx: Ctx, index: int | slice) -> Blob | list[Blob]:
        return self._l[index]

    def __setitem__(self, ctx: Ctx, index: int | slice, value: Any) -> None:
        self._l[index] = value

    def __delitem__(self, ctx: Ctx, index: int | slice) -> None:
        del self._l[index]

    def __len__(self, ctx: Ctx) -> int:
        return len(self._l)

    def _values(self) -> list[Any]:
        return [cloudpickle.loads(blob) for blob in self._l]

    def __contains__(self, ctx: Ctx, value: Blob) -> bool:
        return cloudpickle.loads(value) in self._values()

    def append(self, ctx: Ctx, value: Blob) -> None:
        self._l.append(value)

    def extend(self, ctx: Ctx, values: list[Blob]) -> None:
        self._l.extend(values)

    def insert(self, ctx: Ctx, index: int, value: Blob) -> None:
        self._l.insert(index, value)

    def pop(self, ctx: Ctx, index: int = -1) -> Blob:
        return self._l.pop(index)

    def remove(self, ctx: Ctx, value: Blob) -> None:
        del self._l[self._values().index(cloudpickle.loads(value))]

    def index(self, ctx: Ctx, value: Blob, *bounds: int) -> int:
        return self._values().index(cloudpickle.loads(value), *bounds)

    def count(self, ctx: Ctx, value: Blob) -> int:
        return self._values().count(cloudpickle.loads(value))

    def reverse(self, ctx: Ctx) -> None:
        self._l.reverse()

    def sort(self, ctx: Ctx, key: Blob | None = None, reverse: bool = False) -> None:
        keyfunc = cloudpickle.loads(key) if key is not None else None
        items = [_Item(blob) for blob in self._l]
        if keyfunc is None:
            items.sort(key=lambda item: item.value, reverse=reverse)
        else:
            items.sort(key=lambda item: keyfunc(item.value), reverse=reverse)
        self._l = [item.blob for item in items]

    def clear(self, ctx: Ctx) -> None:
        self._l.clear()

    def copy(self, ctx: Ctx) -> list[Blob]:
        return list(self._l)


class Namespace:
    """Attributes by name, values kept pickled."""

    EXPOSED: tuple[str, ...] = ("get", "set", "delete", "items")

    def __init__(self, items: Iterable[tuple[str, Blob]] = ()) -> None:
        self._attrs: dict[str, Blob] = dict(items)

    def get(self, ctx: Ctx, name: str) -> Blob:
        try:
            return self._attrs[name]
        except KeyError:
            raise AttributeError(f"'Namespace' object has no attribute '{name}'") from None

    def set(self, ctx: Ctx, name: str, value: Blob) -> None:
        self._attrs[name] = value

    def delete(self, ctx: Ctx, name: str) -> None:
        try:
            del self._attrs[name]
        except KeyError:
            raise AttributeError(name) from None

    def items(self, ctx: Ctx) -> list[tuple[str, Blob]]:
        return list(self._attrs.items())


class Array:
    """A typed array (``array`` module type codes), like a manager's Array."""

    EXPOSED: tuple[str, ...] = ("__getitem__", "__setitem__", "__len__", "tolist", "typecode")

    def __init__(self, typecode: str, sequence: int | Iterable[Any]) -> None:
        init = [0] * sequence if isinstance(sequence, int) else sequence
        self._a = array.array(typecode, init)

    def __getitem__(self, ctx: Ctx, index: int | slice) -> Any:
        item = self._a[index]
        return item.tolist() if isinstance(item, array.array) else item

    def __setitem__(self, ctx: Ctx, index: int | slice, value: Any) -> None:
        if isinstance(index, slice):
            value = array.array(self._a.typecode, value)
        self._a[index] = value

    def __len__(self, ctx: Ctx) -> int:
        return len(self._a)

    def tolist(self, ctx: Ctx) -> list[Any]:
        return self._a.tolist()

    def typecode(self, ctx: Ctx) -> str:
        return self._a.typecode


class Value(Array):
    """One typed value, like a manager's Value; ``get``/``set`` back the ``value`` property."""

    EXPOSED: tuple[str, ...] = ("get", "set", "typecode")

    def __init__(self, typecode: str, value: Any = 0) -> None:
        super().__init__(typecode, [value])

    def get(self, ctx: Ctx) -> Any:
        return self._a[0]

    def set(self, ctx: Ctx, value: Any) -> None:
        self._a[0] = value


class Queue:
    """A FIFO queue of pickled items, like queue.Queue across clients."""

    EXPOSED: tuple[str, ...] = ("put", "get", "qsize", "empty", "full", "get_many")

    def __init__(self, maxsize: int = 0) -> None:
        self._maxsize = maxsize
        self._items: deque[Blob] = deque()

    def _full(self) -> bool:
        return 0 < self._maxsize <= len(self._items)

    def put(
        self, ctx: Ctx, item: Blob, block: bool = True, timeout: float | None = None
    ) -> Wait[None]:
        limit = deadline(ctx.now, block, timeout)
        while self._full():
            if (yield limit):
                raise queue.Full
        self._items.append(item)
        self._added(1)

    def _added(self, n: int) -> None:
        """Let JoinableQueue count unfinished tasks."""

    def get(self, ctx: Ctx, block: bool = True, timeout: float | None = None) -> Wait[Blob]:
        limit = deadline(ctx.now, block, timeout)
        while not self._items:
            if (yield limit):
                raise queue.Empty
        return self._items.popleft()

    def get_many(
        self, ctx: Ctx, max_items: int, block: bool = True, timeout: float | None = None
    ) -> Wait[list[Blob]]:
        limit = deadline(ctx.now, block, timeout)
        while not self._items:
            if (yield limit):
                raise queue.Empty
        return [self._items.popleft() for _ in range(min(max_items, len(self._items)))]

    def qsize(self, ctx: Ctx) -> int:
        return len(self._items)

    def empty(self, ctx: Ctx) -> bool:
        return not self._items

    def full(self, ctx: Ctx) -> bool:
        return self._full()


class JoinableQueue(Queue):
    """A Queue with ``task_done``/``join``, like queue.Queue's task tracking."""

    EXPOSED: tuple[str, ...] = (*Queue.EXPOSED, "task_done", "join")

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self._unfinished = 0

    def _added(self, n: int) -> None:
        self._unfinished += n

    def task_done(self, ctx: Ctx) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1

    def join(self, ctx: Ctx, timeout: float | None = None) -> Wait[None]:
        limit = deadline(ctx.now, True, timeout)
        while self._unfinished:
            if (yield limit):
                raise TimeoutError(f"{self._unfinished} queued tasks still unfinished")
