"""Value, Array, RawValue and RawArray: ctypes objects in fabric's shared memory.

The ``multiprocessing.sharedctypes`` API. Each object lives in its own
shared block and pickles as that block, so it reaches children under every
start method and travels through Queues, Pipes and Pool arguments (not only
"through inheritance"). Raw objects are plain ctypes objects; they and the
synchronized wrappers returned by ``Value``/``Array`` support the buffer
protocol: ``memoryview(obj)`` and ``numpy.frombuffer(obj, ...)`` are views of
the shared memory, with no copy. The wrappers add a lock (a fabric ``RLock``
by default, which a process killed while holding it does not leave locked
forever); the buffer views bypass it.

Read-modify-write such as ``v.value += 1`` is not atomic: hold the lock
(``with v.get_lock(): v.value += 1``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from typing import Any

from fabric.local import _shm
from fabric.local._ring import BufferProxy

__all__ = ["Array", "RawArray", "RawValue", "Value", "copy", "synchronized"]

typecode_to_type: dict[str, type[Any]] = {
    "c": ctypes.c_char,
    "u": ctypes.c_wchar,
    "b": ctypes.c_byte,
    "B": ctypes.c_ubyte,
    "h": ctypes.c_short,
    "H": ctypes.c_ushort,
    "i": ctypes.c_int,
    "I": ctypes.c_uint,
    "l": ctypes.c_long,
    "L": ctypes.c_ulong,
    "q": ctypes.c_longlong,
    "Q": ctypes.c_ulonglong,
    "f": ctypes.c_float,
    "d": ctypes.c_double,
}


_CTYPES = (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)


def _ctype(typecode_or_type: str | type[Any]) -> type[Any]:
    if isinstance(typecode_or_type, str):
        try:
            return typecode_to_type[typecode_or_type]
        except KeyError:
            codes = "".join(typecode_to_type)
            raise TypeError(
                f"bad typecode {typecode_or_type!r} (must be one of {codes!r} or a ctypes type)"
            ) from None
    if not (isinstance(typecode_or_type, type) and issubclass(typecode_or_type, _CTYPES)):
        raise TypeError(f"{typecode_or_type!r} is not a typecode or a ctypes type")
    return typecode_or_type


_shared_types: dict[type[Any], type[Any]] = {}  # one subclass per ctypes type


def _shared_type(base: type[Any]) -> type[Any]:
    """A subclass of ``base`` whose instances pickle as their shared block."""
    cls = _shared_types.get(base)
    if cls is None:

        def __reduce__(self: Any) -> tuple[Any, ...]:
            return _rebuild_raw, (_type_spec(base), self._fabric_block)

        cls = type(f"Shared_{base.__name__}", (base,), {"__reduce__": __reduce__})
        cls = _shared_types.setdefault(base, cls)
    return cls


def _new_raw(base: type[Any]) -> Any:
    block = _shm.allocate(ctypes.sizeof(base))
    obj = _shared_type(base).from_buffer(block.buffer)
    obj._fabric_block = block  # the block outlives every view of it
    return obj


def _type_spec(base: type[Any]) -> type[Any] | tuple[Any, int]:
    # array types are made on the fly (c_int * 10) and do not pickle by
    # reference: send the item type and the length instead
    if issubclass(base, ctypes.Array):
        return (_type_spec(getattr(base, "_type_")), getattr(base, "_length_"))  # noqa: B009
    return base


def _from_spec(spec: type[Any] | tuple[Any, int]) -> type[Any]:
    if isinstance(spec, tuple):
        item, length = spec
        return _from_spec(item) * length  # type: ignore[no-any-return]
    return spec


def _rebuild_raw(spec: type[Any] | tuple[Any, int], block: _shm.Block) -> Any:
    obj = _shared_type(_from_spec(spec)).from_buffer(block.buffer)
    obj._fabric_block = block
    return obj


def RawValue(typecode_or_type: str | type[Any], *args: Any) -> Any:
    """Return a shared ctypes object (no lock), initialised with ``args``."""
    obj: Any = _new_raw(_ctype(typecode_or_type))
    if args:
        if isinstance(obj, ctypes.Structure | ctypes.Union):
            init: Any = type(obj).__init__
            init(obj, *args)
        else:
            obj.value = args[0] if len(args) == 1 else args
    return obj


def RawArray(typecode_or_type: str | type[Any], size_or_initializer: int | Sequence[Any]) -> Any:
    """Return a shared ctypes array (no lock), zero-filled or copied from a sequence."""
    item = _ctype(typecode_or_type)
    if isinstance(size_or_initializer, int):
        if size_or_initializer < 0:
            raise ValueError(f"array size must be >= 0, got {size_or_initializer}")
        return _new_raw(item * size_or_initializer)
    init = list(size_or_initializer)
    obj = _new_raw(item * len(init))
    obj[:] = init
    return obj


def _lock_for(lock: Any) -> Any:
    if lock is True or lock is None:
        from fabric.local.synchronize import RLock

        return RLock()
    if not hasattr(lock, "acquire"):
        raise AttributeError(f"{lock!r} has no method 'acquire'")
    return lock


def Value(typecode_or_type: str | type[Any], *args: Any, lock: Any = True) -> Any:
    """Return a synchronized shared ctypes object; ``lock=False`` returns it raw."""
    obj = RawValue(typecode_or_type, *args)
    if lock is False:
        return obj
    return synchronized(obj, _lock_for(lock))


def Array(
    typecode_or_type: str | type[Any], size_or_initializer: int | Sequence[Any], *, lock: Any = True
) -> Any:
    """Return a synchronized shared ctypes array; ``lock=False`` returns it raw."""
    obj = RawArray(typecode_or_type, size_or_initializer)
    if lock is False:
        return obj
    return synchronized(obj, _lock_for(lock))


def copy(obj: Any) -> Any:
    """Return a new shared raw object with the same contents as ``obj``."""
    new = _new_raw(type(obj).__mro__[1] if hasattr(obj, "_fabric_block") else type(obj))
    ctypes.pointer(new)[0] = obj
    return new


def synchronized(obj: Any, lock: Any = None) -> Synchronized:
    """Wrap a shared ctypes object with a lock (a new RLock by default)."""
    lock = _lock_for(lock)
    if isinstance(obj, ctypes.Array):
        if obj._type_ is ctypes.c_char:
            return SynchronizedString(obj, lock)
        return SynchronizedArray(obj, lock)
    return Synchronized(obj, lock)


class Synchronized(BufferProxy):
    """A shared ctypes object and the lock guarding it.

    Exports the object's buffer: ``memoryview(wrapper)`` and
    ``numpy.frombuffer(wrapper, ...)`` are views of the shared memory, no copy
    and no lock (hold ``get_lock()`` around accesses that must be atomic).
    """

    def __init__(self, obj: Any, lock: Any) -> None:
        self._obj, self._lock = obj, lock
        self.acquire, self.release = lock.acquire, lock.release

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self._obj, self._lock)

    def __enter__(self) -> bool:
        return bool(self._lock.__enter__())

    def __exit__(self, *exc: Any) -> None:
        self._lock.__exit__(*exc)

    def get_obj(self) -> Any:
        """Return the raw shared object (supports the buffer protocol)."""
        return self._obj

    def get_lock(self) -> Any:
        """Return the lock guarding the object."""
        return self._lock

    @property
    def value(self) -> Any:
        with self._lock:
            return self._obj.value

    @value.setter
    def value(self, value: Any) -> None:
        with self._lock:
            self._obj.value = value

    def __repr__(self) -> str:
        return f"<{type(self).__name__} wrapper for {self._obj!r}>"


class SynchronizedArray(Synchronized):
    """A shared ctypes array whose item and slice access hold the lock."""

    def __len__(self) -> int:
        return len(self._obj)

    def __getitem__(self, i: Any) -> Any:
        with self._lock:
            return self._obj[i]

    def __setitem__(self, i: Any, value: Any) -> None:
        with self._lock:
            self._obj[i] = value

    def __iter__(self) -> Iterator[Any]:
        with self._lock:
            items = self._obj[:]
        return iter(items)


class SynchronizedString(SynchronizedArray):
    """A shared ``c_char`` array with ``value`` and ``raw`` under the lock."""

    @property
    def raw(self) -> bytes:
        with self._lock:
            return bytes(self._obj.raw)

    @raw.setter
    def raw(self, value: bytes) -> None:
        with self._lock:
            self._obj.raw = value
