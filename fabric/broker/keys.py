"""CURVE key pairs and the allow list: ``fabric keygen DIR`` and what reads its output.

Layout of a key directory (public files are ZeroMQ certificates, readable by
``zmq.auth.load_certificate``; secret files are mode 0600, the directory 0700)::

    DIR/broker.key                 the broker's public key: give it to every peer
    DIR/broker.key_secret          the broker's key pair: stays on the broker's host
    DIR/<name>.key_secret          a peer's key pair: give it (and broker.key) to that peer only
    DIR/allow/<role>/<name>.key    the allow list: a public key the broker accepts in <role>

A peer's roles are the ``allow/<role>`` directories its public key is in, so
the same key may be allowed as ``client`` and ``host``. Revoking a peer is
deleting its ``allow`` files and restarting the broker.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.auth.certs import load_certificate

from fabric.broker.protocol import ROLES
from fabric.errors import AuthenticationError

__all__ = ["Identity", "Keyring", "PeerKeys", "generate"]


@dataclass(frozen=True)
class Identity:
    """Who an allowed public key is, and which roles it may take."""

    name: str
    roles: frozenset[str]


@dataclass(frozen=True)
class PeerKeys:
    """What a peer needs to connect: its key pair and the broker's public key (z85)."""

    public: bytes
    secret: bytes
    server: bytes

    def configure(self, socket: zmq.Socket[bytes]) -> None:
        """Make ``socket`` a CURVE client of the broker (before ``connect``)."""
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.curve_serverkey = self.server

    @classmethod
    def load(cls, directory: str | os.PathLike[str], name: str) -> PeerKeys:
        """Read peer ``name``'s key pair and the broker's public key from a key directory."""
        root = Path(directory)
        public, secret = _load(root / f"{name}.key_secret", secret=True)
        server, _ = _load(root / "broker.key", secret=False)
        assert secret is not None
        return cls(public, secret, server)


@dataclass(frozen=True)
class Keyring:
    """The broker's key pair and its allow list (z85 public key -> identity)."""

    public: bytes
    secret: bytes
    allowed: Mapping[bytes, Identity] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Keyring:
        """Read the broker's keys and the allow list written by :func:`generate`."""
        root = Path(directory)
        public, secret = _load(root / "broker.key_secret", secret=True)
        assert secret is not None
        roles: dict[bytes, set[str]] = {}
        names: dict[bytes, str] = {}
        for role in ROLES:
            for path in sorted((root / "allow" / role).glob("*.key")):
                key, _ = _load(path, secret=False)
                roles.setdefault(key, set()).add(role)
                names.setdefault(key, path.stem)
        allowed = {key: Identity(names[key], frozenset(r)) for key, r in roles.items()}
        if not allowed:
            raise AuthenticationError(f"{root / 'allow'} allows no key: nobody could connect")
        return cls(public, secret, allowed)

    @classmethod
    def ephemeral(cls, roles: Iterable[str] = ROLES) -> tuple[Keyring, PeerKeys]:
        """Make throw-away keys in memory: a keyring allowing one peer key pair in ``roles``."""
        public, secret = zmq.curve_keypair()
        peer_public, peer_secret = zmq.curve_keypair()
        identity = Identity("embedded", frozenset(roles))
        return cls(public, secret, {peer_public: identity}), PeerKeys(
            peer_public, peer_secret, public
        )


def generate(
    directory: str | os.PathLike[str],
    peers: Mapping[str, Iterable[str]] | None = None,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write the broker's key pair and a key pair per peer, allowed in its roles.

    ``peers`` maps a peer name to its roles; the default is one ``client``
    (also allowed as ``host``), one ``worker`` and one ``admin``. Refuse to
    overwrite existing keys unless ``overwrite``. Return the files written.
    """
    if peers is None:
        peers = {"client": ("client", "host"), "worker": ("worker",), "admin": ("admin",)}
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    if (root / "broker.key_secret").exists() and not overwrite:
        raise FileExistsError(f"{root} already holds broker keys (pass overwrite=True)")
    written = _write_pair(root, "broker")
    for name, roles in peers.items():
        unknown = set(roles) - set(ROLES)
        if unknown or not name.isidentifier() or name == "broker":
            raise ValueError(f"bad peer {name!r} or roles {sorted(unknown)}; roles: {ROLES}")
        public, secret = zmq.curve_keypair()
        written.append(_write(root / f"{name}.key_secret", public, secret, 0o600))
        for role in roles:
            allow = root / "allow" / role
            allow.mkdir(mode=0o700, parents=True, exist_ok=True)
            written.append(_write(allow / f"{name}.key", public, None, 0o644))
    return written


def _write_pair(root: Path, name: str) -> list[Path]:
    public, secret = zmq.curve_keypair()
    return [
        _write(root / f"{name}.key", public, None, 0o644),
        _write(root / f"{name}.key_secret", public, secret, 0o600),
    ]


def _write(path: Path, public: bytes, secret: bytes | None, mode: int) -> Path:
    lines = ["#   fabric CURVE certificate (ZeroMQ format)", "metadata", "curve"]
    lines.append(f'    public-key = "{public.decode()}"')
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, mode)  # the umask may have narrowed it; never widened a secret
    return path


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise AuthenticationError(f"key file {path} is missing")
    if secret and path.stat().st_mode & 0o077:
        raise AuthenticationError(f"secret key file {path} is readable by others: chmod 600 it")
    public, secret_key = load_certificate(path)
    if secret and secret_key is None:
        raise AuthenticationError(f"{path} holds no secret key")
    return public, secret_key
