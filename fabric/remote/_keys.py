"""CURVE credentials of remote peers: from a key directory, or handed down by a parent.

A key directory is what ``fabric keygen`` writes (``fabric.broker.keys``):
``broker.key`` plus ``<name>.key_secret`` per peer. A Manager's embedded
cluster uses throw-away keys instead and hands them to its worker node, and a
node to its task processes, through the ``FABRIC_CURVE`` environment variable
(never over the network), so proxies in a task can reach the broker.
"""

from __future__ import annotations

import os
from pathlib import Path

Curve = tuple[bytes, bytes, bytes]
"""(our public key, our secret key, the broker's public key), z85."""

CURVE_ENV = "FABRIC_CURVE"
KEYS_ENV = "FABRIC_KEYS"


def load_curve(keys: str | Path | None, name: str) -> Curve | None:
    """Load peer ``name``'s key pair and the broker's key from a key directory (None: none)."""
    if keys is None:
        return None
    from fabric.broker.keys import PeerKeys

    peer = PeerKeys.load(keys, name)
    return (peer.public, peer.secret, peer.server)


def encode_curve(curve: Curve) -> str:
    """Write credentials for ``FABRIC_CURVE`` (space is not a z85 character)."""
    return b" ".join(curve).decode()


def curve_from_env() -> Curve | None:
    """Return the client credentials this process was handed, if any."""
    text = os.environ.get(CURVE_ENV)
    if text:
        public, secret, server = (part.encode() for part in text.split(" "))
        return (public, secret, server)
    return load_curve(os.environ.get(KEYS_ENV), "client") if os.environ.get(KEYS_ENV) else None
