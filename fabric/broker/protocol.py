"""The wire protocol, sans-IO: typed messages to ZeroMQ frames and back.

The public import point: the messages are defined in
:mod:`fabric.broker._messages`, and the codec, with the protocol's theory of
operation, in :mod:`fabric.broker._codec`. ``MAX_ID_BYTES``, ``SESSION_BYTES``
and ``Payload`` are importable from here too, for the broker and the tests,
outside ``__all__``.
"""

from __future__ import annotations

from fabric.broker._codec import (
    BATCH,
    INLINE_BYTES,
    MAGIC,
    MAX_BATCH,
    MAX_CONTROL_BYTES,
    MAX_PAYLOAD_FRAMES,
    MAX_TASK_ID_BYTES,
    VERSION,
    decode,
    decode_many,
    encode,
    encode_alone,
    encode_many,
)
from fabric.broker._codec import MAX_ID_BYTES as MAX_ID_BYTES
from fabric.broker._messages import (
    MESSAGES,
    ROLES,
    SENDABLE,
    STATUSES,
    Ack,
    Bye,
    Call,
    Cancel,
    Create,
    Credit,
    Dispatch,
    Done,
    Error,
    Gone,
    Heartbeat,
    Hello,
    Message,
    Reclaim,
    Refuse,
    Reject,
    Reply,
    Result,
    Stats,
    Status,
    Submit,
    Welcome,
)
from fabric.broker._messages import SESSION_BYTES as SESSION_BYTES
from fabric.broker._messages import Payload as Payload

__all__ = [
    "BATCH",
    "INLINE_BYTES",
    "MAGIC",
    "MAX_BATCH",
    "MAX_CONTROL_BYTES",
    "MAX_PAYLOAD_FRAMES",
    "MAX_TASK_ID_BYTES",
    "MESSAGES",
    "ROLES",
    "SENDABLE",
    "STATUSES",
    "VERSION",
    "Ack",
    "Bye",
    "Call",
    "Cancel",
    "Create",
    "Credit",
    "Dispatch",
    "Done",
    "Error",
    "Gone",
    "Heartbeat",
    "Hello",
    "Message",
    "Reclaim",
    "Refuse",
    "Reject",
    "Reply",
    "Result",
    "Stats",
    "Status",
    "Submit",
    "Welcome",
    "decode",
    "decode_many",
    "encode",
    "encode_alone",
    "encode_many",
]
