"""The object host: a registry of shared objects and the dispatch of calls to them (sans-IO).

Feed it CREATEs with ``create(...)``, CALLs with ``call(...)``, the death of a
session with ``session_lost(session, now)`` and the passing of time with
``expire(now)``; each returns the replies to send as ``(session, seq, ok,
payload)``. Every request also expires what is due, so a client that nudges
the host (method ``#tick``) at its own deadline gets its timed-out reply even
where nothing else drives the clock.
It owns no socket and no clock, so the built-in host runs inside the broker's
event loop and a client hosts its registered types with the same code.

Theory of operation:
- Objects are named (found again by ``(typeid, name)`` from any session and kept
  while the host lives) or anonymous (kept while a session that created or used
  them is alive).
- Calls are tagged ``(session, seq)``. The last ``reply_cache`` replies of each
  session are kept and a re-sent call gets the cached reply instead of running
  again; a re-sent call that is still parked gets nothing (its reply will come).
- A built-in method that must wait is a generator (see ``_ctx``). It is parked
  on its object; after any call to that object completes, the parked calls are
  resumed in arrival order until none progresses, so waiters go before late
  arrivals (no barging). Deadlines resume them with a timeout.
- ``session_lost`` closes the session's parked calls, tells each of its objects
  (leases are released there) and frees anonymous objects no live session holds.
"""

from __future__ import annotations

import inspect
import itertools
import pickle
import platform
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import cloudpickle

from fabric.remote._ctx import Ctx, Wait

Reply = tuple[bytes, int, bool, bytes]

TICK = "#tick"  # a no-op call that only lets time pass
RELEASE = "#release"  # the caller's session drops an anonymous object
RUNTIME = "#runtime"  # the host's Python and cloudpickle versions (they unpickle our calls)


@dataclass(frozen=True)
class TypeSpec:
    """How to build objects of one type id and which methods clients may call.

    ``hosted`` types (the built-ins) take a ``Ctx`` first and may block by
    yielding; registered custom types are plain Python objects.
    """

    typeid: str
    factory: Callable[..., Any]
    exposed: frozenset[str]
    method_to_typeid: Mapping[str, str] = field(default_factory=dict)
    hosted: bool = False


@dataclass(frozen=True)
class ObjRef:
    """The identity a proxy needs: type id, object id, exposed methods, host routing id."""

    typeid: str
    obj_id: str
    exposed: frozenset[str]
    host: str = ""


@dataclass
class _Entry:
    spec: TypeSpec
    obj: Any
    name: str | None
    holders: set[bytes]


@dataclass
class _Parked:
    session: bytes
    seq: int
    obj_id: str
    gen: Wait[Any]
    limit: float | None


@dataclass
class _Session:
    replies: OrderedDict[int, tuple[bool, bytes]] = field(default_factory=OrderedDict)
    parked: set[int] = field(default_factory=set)


def encode_ok(value: Any) -> bytes:
    """Pickle a successful reply."""
    try:
        return pickle.dumps((True, value), protocol=5)
    except Exception:
        return cloudpickle.dumps((True, value), protocol=5)  # type: ignore[no-any-return]


def encode_error(exc: BaseException, tb_text: str = "") -> bytes:
    """Pickle a failed reply; an exception that will not pickle travels as RemoteError."""
    from fabric.remote._errors import RemoteError

    try:
        return cloudpickle.dumps((False, (exc, tb_text)), protocol=5)  # type: ignore[no-any-return]
    except Exception:
        stand_in = RemoteError(type(exc).__qualname__, str(exc), tb_text)
        return pickle.dumps((False, (stand_in, tb_text)), protocol=5)


class ObjectHost:
    """Registry and dispatcher of shared objects; see the module docstring."""

    def __init__(self, types: Iterable[TypeSpec], reply_cache: int = 256) -> None:
        self._types = {spec.typeid: spec for spec in types}
        self._objects: dict[str, _Entry] = {}
        self._names: dict[str, str] = {}
        self._sessions: dict[bytes, _Session] = {}
        self._parked: dict[str, list[_Parked]] = {}
        self._ids = itertools.count(1)
        self._reply_cache = reply_cache

    # --- the sans-IO surface -------------------------------------------------------
    def register(self, spec: TypeSpec) -> None:
        """Add a type id (a custom type of the client hosting it)."""
        self._types[spec.typeid] = spec

    @property
    def typeids(self) -> frozenset[str]:
        """Return the type ids this host can create."""
        return frozenset(self._types)

    def create(
        self, session: bytes, seq: int, typeid: str, name: str, payload: bytes, now: float
    ) -> list[Reply]:
        """Create an object (or find the one named ``name``); reply with its ObjRef."""
        replies = self._cached(session, seq, now)
        if replies is not None:
            return replies
        try:
            args, kwargs = cloudpickle.loads(payload) if payload else ((), {})
            ref = self._create(session, typeid, name or None, args, kwargs)
        except Exception as exc:
            return [self._finish(session, seq, False, encode_error(exc, _format(exc)))]
        return [self._finish(session, seq, True, encode_ok(ref))]

    def call(
        self, session: bytes, seq: int, obj_id: str, method: str, payload: bytes, now: float
    ) -> list[Reply]:
        """Call ``method`` of object ``obj_id``; the reply may come now or later."""
        replies = self._cached(session, seq, now)
        if replies is not None:
            return replies
        if method == TICK:
            return [*self.expire(now), self._finish(session, seq, True, encode_ok(None))]
        if method == RUNTIME:
            versions = (platform.python_version(), cloudpickle.__version__)
            return [self._finish(session, seq, True, encode_ok(versions))]
        try:
            args, kwargs, thread, token = cloudpickle.loads(payload)
            if method == RELEASE:
                self._release(session, obj_id)
                return [self._finish(session, seq, True, encode_ok(None))]
        except Exception as exc:
            return [self._finish(session, seq, False, encode_error(exc, _format(exc)))]
        due = self.expire(now)
        return due + self._call(session, seq, now, obj_id, method, args, kwargs, thread, token)

    def _cached(self, session: bytes, seq: int, now: float) -> list[Reply] | None:
        """Answer a re-sent request from the reply cache (or with nothing while it is parked)."""
        state = self._session(session)
        if seq in state.replies:
            ok, payload = state.replies[seq]
            return [(session, seq, ok, payload)]
        if seq in state.parked:
            return []
        return None

    def session_lost(self, session: bytes, now: float) -> list[Reply]:
        """Forget a dead session: close its parked calls, revoke its leases, free orphans."""
        self._sessions.pop(session, None)
        touched: set[str] = set()
        for obj_id, parked in list(self._parked.items()):
            for call in [p for p in parked if p.session == session]:
                parked.remove(call)
                call.gen.close()
                touched.add(obj_id)
        for obj_id, entry in list(self._objects.items()):
            lost = getattr(entry.obj, "session_lost", None)
            if entry.spec.hosted and lost is not None and lost(session):
                touched.add(obj_id)
            entry.holders.discard(session)
            if entry.name is None and not entry.holders:
                self._drop(obj_id)
        replies: list[Reply] = []
        for obj_id in touched:
            replies += self._wake(obj_id, now)
        return replies

    def expire(self, now: float) -> list[Reply]:
        """Time out parked calls whose deadline has passed."""
        replies: list[Reply] = []
        if not self._parked:
            return replies
        for obj_id, parked in list(self._parked.items()):
            due = [p for p in parked if p.limit is not None and p.limit <= now]
            for entry in due:
                if entry in parked:
                    replies += self._resume(entry, True, now)
            if due:
                replies += self._wake(obj_id, now)
        return replies

    def next_deadline(self) -> float | None:
        """Return the earliest deadline of a parked call, or None."""
        limits = [p.limit for ps in self._parked.values() for p in ps if p.limit is not None]
        return min(limits, default=None)

    def statistics(self) -> dict[str, int]:
        """Count objects, named objects, sessions and parked calls."""
        return {
            "objects": len(self._objects),
            "named": len(self._names),
            "sessions": len(self._sessions),
            "parked": sum(len(p) for p in self._parked.values()),
        }

    # --- requests --------------------------------------------------------------------
    def _create(
        self,
        session: bytes,
        typeid: str,
        name: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> ObjRef:
        spec = self._types.get(typeid)
        if spec is None:
            raise TypeError(f"no type {typeid!r} is registered with this host")
        if name is not None and name in self._names:
            obj_id = self._names[name]
            found = self._objects[obj_id].spec.typeid
            if found != typeid:
                raise TypeError(f"the name {name!r} is already a {found}, not a {typeid}")
            return ObjRef(typeid, obj_id, spec.exposed)
        obj_id = self._add(spec, spec.factory(*args, **kwargs), name, session)
        return ObjRef(typeid, obj_id, spec.exposed)

    def _add(self, spec: TypeSpec, obj: Any, name: str | None, session: bytes) -> str:
        obj_id = str(next(self._ids))
        self._objects[obj_id] = _Entry(spec, obj, name, {session})
        if name is not None:
            self._names[name] = obj_id
        return obj_id

    def _release(self, session: bytes, obj_id: str) -> None:
        entry = self._objects.get(obj_id)
        if entry is not None:
            entry.holders.discard(session)
            if entry.name is None and not entry.holders:
                self._drop(obj_id)

    def _drop(self, obj_id: str) -> None:
        del self._objects[obj_id]
        for parked in self._parked.pop(obj_id, []):
            parked.gen.close()

    def _call(
        self,
        session: bytes,
        seq: int,
        now: float,
        obj_id: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        thread: int = 0,
        token: int | None = None,
    ) -> list[Reply]:
        try:
            entry = self._objects.get(obj_id)
            if entry is None:
                raise ReferenceError(f"shared object {obj_id} no longer exists on this host")
            if method not in entry.spec.exposed:
                raise AttributeError(f"method {method!r} of {entry.spec.typeid} is not exposed")
            entry.holders.add(session)
            func = getattr(entry.obj, method)
            if entry.spec.hosted:
                result = func(Ctx(session, thread, now, token), *args, **kwargs)
            else:
                result = func(*args, **kwargs)
            if entry.spec.hosted and inspect.isgenerator(result):
                gen = cast("Wait[Any]", result)
                try:
                    limit = next(gen)
                except StopIteration as stop:  # it did not have to wait (the common case)
                    result = stop.value
                except Exception as exc:  # it may have changed the object first: wake waiters
                    failed = self._finish(session, seq, False, encode_error(exc, _format(exc)))
                    return [failed, *self._wake(obj_id, now)]
                else:
                    parked = _Parked(session, seq, obj_id, gen, limit)
                    return self._resume(parked, None, now) + self._wake(obj_id, now)
            result = self._wrap(entry.spec, method, result, session)
        except Exception as exc:
            return [self._finish(session, seq, False, encode_error(exc, _format(exc)))]
        return [self._finish(session, seq, True, encode_ok(result)), *self._wake(obj_id, now)]

    def _wrap(self, spec: TypeSpec, method: str, result: Any, session: bytes) -> Any:
        typeid = spec.method_to_typeid.get(method)
        if typeid is None:
            return result
        child = self._types[typeid]
        return ObjRef(typeid, self._add(child, result, None, session), child.exposed)

    # --- parked calls ------------------------------------------------------------------
    def _resume(self, parked: _Parked, timed_out: bool | None, now: float) -> list[Reply]:
        """Advance a parked generator once; reply if it finished, (re)park it if not.

        ``timed_out`` None: the generator has just yielded ``parked.limit`` (a new call).
        """
        try:
            limit = parked.limit if timed_out is None else parked.gen.send(timed_out)
            while limit is not None and limit <= now:  # already due: time out at once
                limit = parked.gen.send(True)
        except StopIteration as stop:
            ok, payload = True, encode_ok(stop.value)
        except Exception as exc:
            ok, payload = False, encode_error(exc, _format(exc))
        else:
            parked.limit = limit
            queue = self._parked.setdefault(parked.obj_id, [])
            if parked not in queue:
                queue.append(parked)
                self._session(parked.session).parked.add(parked.seq)
            return []
        waiting = self._parked.get(parked.obj_id)
        if waiting is not None and parked in waiting:
            waiting.remove(parked)
            if not waiting:
                del self._parked[parked.obj_id]
        state = self._sessions.get(parked.session)
        if state is not None:
            state.parked.discard(parked.seq)
        return [self._finish(parked.session, parked.seq, ok, payload)]

    def _wake(self, obj_id: str, now: float) -> list[Reply]:
        """Resume the calls parked on an object until none makes progress."""
        replies: list[Reply] = []
        progress = True
        while progress and self._parked.get(obj_id):
            progress = False
            for parked in list(self._parked.get(obj_id, [])):
                done = self._resume(parked, False, now)
                if done:
                    replies += done
                    progress = True
        return replies

    def _session(self, session: bytes) -> _Session:
        state = self._sessions.get(session)
        if state is None:
            state = self._sessions[session] = _Session()
        return state

    def _finish(self, session: bytes, seq: int, ok: bool, payload: bytes) -> Reply:
        state = self._session(session)
        state.replies[seq] = (ok, payload)
        while len(state.replies) > self._reply_cache:
            state.replies.popitem(last=False)
        return (session, seq, ok, payload)


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
