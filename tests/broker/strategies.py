"""Hypothesis strategies for wire messages, derived from the message dataclasses."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import msgpack
from hypothesis import strategies as st

from fabric.broker import protocol as p

ids = st.binary(max_size=p.MAX_ID_BYTES)
task_ids = st.binary(max_size=p.MAX_TASK_ID_BYTES)
texts = st.text(max_size=40)
counts = st.integers(min_value=0, max_value=2**63 - 1)
payloads = st.lists(st.binary(max_size=64), max_size=4).map(tuple)

_BY_HINT: dict[Any, st.SearchStrategy[Any]] = {
    bytes: ids,
    str: texts,
    int: counts,
    bool: st.booleans(),
    float: st.floats(min_value=0, max_value=1e9, allow_nan=False),
    tuple[bytes, ...]: st.lists(ids, max_size=8).map(tuple),
    tuple[int, ...]: st.lists(counts, max_size=8).map(tuple),
    dict[str, str]: st.dictionaries(texts, texts, max_size=4),
    dict[str, Any]: st.dictionaries(texts, st.one_of(counts, texts, st.booleans()), max_size=4),
}

# Fields whose values the schema restricts beyond their type.
_SPECIAL: dict[tuple[type[p.Message], str], st.SearchStrategy[Any]] = {
    (p.Hello, "role"): st.sampled_from(p.ROLES),
    (p.Hello, "session"): st.binary(min_size=16, max_size=16),
    (p.Result, "status"): st.sampled_from(p.STATUSES),
    (p.Submit, "task"): task_ids,
    (p.Cancel, "task"): task_ids,
    (p.Done, "tasks"): st.lists(task_ids, max_size=8).map(tuple),
}


def _acks() -> st.SearchStrategy[p.Message]:
    # attempts are empty (to a client) or one per task (to a worker)
    to_client = st.lists(ids, max_size=8).map(lambda tasks: p.Ack(tuple(tasks)))
    to_worker = st.lists(st.tuples(ids, counts), max_size=8).map(
        lambda pairs: p.Ack(tuple(t for t, _ in pairs), tuple(a for _, a in pairs))
    )
    return st.one_of(to_client, to_worker)


def _reclaims() -> st.SearchStrategy[p.Message]:
    # one attempt per task
    return st.lists(st.tuples(ids, counts), max_size=8).map(
        lambda pairs: p.Reclaim(tuple(t for t, _ in pairs), tuple(a for _, a in pairs))
    )


def message_of(cls: type[p.Message]) -> st.SearchStrategy[p.Message]:
    if cls is p.Ack:
        return _acks()
    if cls is p.Reclaim:
        return _reclaims()
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name == "payload":
            kwargs[f.name] = payloads
        else:
            kwargs[f.name] = _SPECIAL.get((cls, f.name), _BY_HINT[hints[f.name]])
    return st.builds(cls, **kwargs)


MESSAGE_CLASSES: list[type[p.Message]] = list(p.MESSAGES)
messages = st.one_of([message_of(cls) for cls in MESSAGE_CLASSES])

# Valid msgpack of arbitrary shape, to put wrong types into control fields.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats() | texts | ids,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=8,
)


def _packable(value: Any) -> bytes | None:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return None
    return packed


@st.composite
def hostile_frames(draw: st.DrawFn) -> list[bytes]:
    """Frames that look like a message (a valid header) but may break any rule after it."""
    version = draw(st.sampled_from([p.VERSION, p.VERSION, 0, 2, 255]))
    kind = draw(st.sampled_from([*(c.TYPE for c in MESSAGE_CLASSES), 0, 0x7E, 0xFF]))
    head = p.MAGIC + bytes((version, kind))
    shape = draw(st.integers(0, 3))
    if shape == 0:  # a valid message of another type, re-headed
        body = p.encode(draw(messages))[0][4:]
    elif shape == 1:  # a map with arbitrary values
        body = _packable(draw(st.dictionaries(texts, msgpack_values, max_size=6))) or b""
    elif shape == 2:  # arbitrary msgpack
        body = _packable(draw(msgpack_values)) or b""
    else:  # arbitrary bytes
        body = draw(st.binary(max_size=64))
    frame = bytes(head + body)
    cut = draw(st.none() | st.integers(0, len(frame)))
    first = frame if cut is None else frame[:cut]
    return [first, *draw(st.lists(st.binary(max_size=16), max_size=3))]
