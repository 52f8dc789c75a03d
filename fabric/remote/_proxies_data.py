"""Proxies for the hosted containers: dict, list, Namespace, Value, Array, Queue."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from fabric.remote._proxy_base import BaseProxy, dumps, loads

_MISSING: Any = object()


class DictProxy(BaseProxy):
    """Behave like a dict shared by every client of the broker."""

    _typeid = "dict"

    def __getitem__(self, key: Any) -> Any:
        return loads(self._call("__getitem__", key))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._call("__setitem__", key, dumps(value))

    def __delitem__(self, key: Any) -> None:
        self._call("__delitem__", key)

    def __contains__(self, key: Any) -> bool:
        return bool(self._call("__contains__", key))

    def __len__(self) -> int:
        return int(self._call("__len__"))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __eq__(self, other: object) -> bool:
        return self.copy() == (other.copy() if isinstance(other, DictProxy) else other)

    __hash__ = None  # type: ignore[assignment]

    def keys(self) -> list[Any]:
        """Return a snapshot list of the keys."""
        return list(self._call("keys"))

    def values(self) -> list[Any]:
        """Return a snapshot list of the values."""
        return [loads(blob) for blob in self._call("values")]

    def items(self) -> list[tuple[Any, Any]]:
        """Return a snapshot list of the items."""
        return [(key, loads(blob)) for key, blob in self._call("items")]

    def get(self, key: Any, default: Any = None) -> Any:
        blob = self._call("get", key)
        return default if blob is None else loads(blob)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        if default is _MISSING:
            return loads(self._call("pop", key))
        return loads(self._call("pop", key, dumps(default)))

    def popitem(self) -> tuple[Any, Any]:
        key, blob = self._call("popitem")
        return key, loads(blob)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        return loads(self._call("setdefault", key, dumps(default)))

    def update(self, other: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = (), **kw: Any) -> None:
        pairs = list(other.items() if isinstance(other, Mapping) else other) + list(kw.items())
        self._call("update", [(key, dumps(value)) for key, value in pairs])

    def clear(self) -> None:
        self._call("clear")

    def copy(self) -> dict[Any, Any]:
        """Return a plain dict copy of the shared dict."""
        return {key: loads(blob) for key, blob in self._call("copy").items()}


class ListProxy(BaseProxy):
    """Behave like a list shared by every client of the broker."""

    _typeid = "list"

    def __getitem__(self, index: int | slice) -> Any:
        found = self._call("__getitem__", index)
        return [loads(b) for b in found] if isinstance(index, slice) else loads(found)

    def __setitem__(self, index: int | slice, value: Any) -> None:
        blob = [dumps(v) for v in value] if isinstance(index, slice) else dumps(value)
        self._call("__setitem__", index, blob)

    def __delitem__(self, index: int | slice) -> None:
        self._call("__delitem__", index)

    def __len__(self) -> int:
        return int(self._call("__len__"))

    def __contains__(self, value: Any) -> bool:
        return bool(self._call("__contains__", dumps(value)))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.copy())

    def __eq__(self, other: object) -> bool:
        return self.copy() == (other.copy() if isinstance(other, ListProxy) else other)

    __hash__ = None  # type: ignore[assignment]

    def __iadd__(self, values: Iterable[Any]) -> ListProxy:
        self.extend(values)
        return self

    def append(self, value: Any) -> None:
        self._call("append", dumps(value))

    def extend(self, values: Iterable[Any]) -> None:
        self._call("extend", [dumps(v) for v in values])

    def insert(self, index: int, value: Any) -> None:
        self._call("insert", index, dumps(value))

    def pop(self, index: int = -1) -> Any:
        return loads(self._call("pop", index))

    def remove(self, value: Any) -> None:
        self._call("remove", dumps(value))

    def index(self, value: Any, *bounds: int) -> int:
        return int(self._call("index", dumps(value), *bounds))

    def count(self, value: Any) -> int:
        return int(self._call("count", dumps(value)))

    def reverse(self) -> None:
        self._call("reverse")

    def sort(self, *, key: Callable[[Any], Any] | None = None, reverse: bool = False) -> None:
        """Sort on the host; ``key`` travels by cloudpickle and runs there."""
        self._call("sort", None if key is None else dumps(key), reverse)

    def clear(self) -> None:
        self._call("clear")

    def copy(self) -> list[Any]:
        """Return a plain list copy of the shared list."""
        return [loads(blob) for blob in self._call("copy")]


class NamespaceProxy(BaseProxy):
    """Attributes shared by every client; names starting with ``_`` stay local."""

    _typeid = "Namespace"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return loads(self._call("get", name))

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            self._call("set", name, dumps(value))

    def __delattr__(self, name: str) -> None:
        if name.startswith("_"):
            object.__delattr__(self, name)
        else:
            self._call("delete", name)

    def __repr__(self) -> str:
        attrs = ", ".join(f"{k}={loads(v)!r}" for k, v in self._call("items"))
        return f"Namespace({attrs})"


class ValueProxy(BaseProxy):
    """One shared typed value: ``value`` property, ``get()`` and ``set()``."""

    _typeid = "Value"

    def get(self) -> Any:
        return self._call("get")

    def set(self, value: Any) -> None:
        self._call("set", value)

    value = property(get, set)


class ArrayProxy(BaseProxy):
    """A shared typed array: indexing, slicing, ``len`` and ``tolist()``."""

    _typeid = "Array"

    def __getitem__(self, index: int | slice) -> Any:
        return self._call("__getitem__", index)

    def __setitem__(self, index: int | slice, value: Any) -> None:
        self._call("__setitem__", index, list(value) if isinstance(index, slice) else value)

    def __len__(self) -> int:
        return int(self._call("__len__"))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tolist())

    def tolist(self) -> list[Any]:
        return list(self._call("tolist"))


class QueueProxy(BaseProxy):
    """Behave like queue.Queue shared by every client (``queue.Empty``/``queue.Full``)."""

    _typeid = "Queue"

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._call("put", dumps(item), block, timeout, wait=timeout if block else 0.0)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return loads(self._call("get", block, timeout, wait=timeout if block else 0.0))

    def put_nowait(self, item: Any) -> None:
        self.put(item, False)

    def get_nowait(self) -> Any:
        return self.get(False)

    def put_many(
        self, items: Iterable[Any], block: bool = True, timeout: float | None = None
    ) -> None:
        """Put each item in turn (one round trip each); stops at the first ``queue.Full``."""
        for item in items:
            self.put(item, block, timeout)

    def get_many(
        self, max_items: int, block: bool = True, timeout: float | None = None
    ) -> list[Any]:
        """Wait for at least one item, then take up to ``max_items`` in one round trip."""
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        wait = timeout if block else 0.0
        return [loads(b) for b in self._call("get_many", max_items, block, timeout, wait=wait)]

    def qsize(self) -> int:
        return int(self._call("qsize"))

    def empty(self) -> bool:
        return bool(self._call("empty"))

    def full(self) -> bool:
        return bool(self._call("full"))


class JoinableQueueProxy(QueueProxy):
    """A shared queue with ``task_done()`` and ``join(timeout)``."""

    _typeid = "JoinableQueue"

    def task_done(self) -> None:
        self._call("task_done")

    def join(self, timeout: float | None = None) -> None:
        """Wait until every item put has been marked done; TimeoutError past ``timeout``."""
        self._call("join", timeout, wait=timeout)
