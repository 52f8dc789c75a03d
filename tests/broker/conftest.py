"""Fixtures for the broker tests: keys and brokers that always close."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fabric.broker.keys import Keyring, PeerKeys
from fabric.broker.server import Broker


@pytest.fixture
def ephemeral() -> tuple[Keyring, PeerKeys]:
    return Keyring.ephemeral()


@pytest.fixture
def start_broker() -> Iterator[Callable[..., Broker]]:
    """Return a function starting a Broker (fast heartbeats by default); all close at the end."""
    made: list[Broker] = []

    def start(**kwargs: Any) -> Broker:
        kwargs.setdefault("heartbeat", 0.2)
        broker = Broker(**kwargs)
        made.append(broker)
        broker.start()
        return broker

    yield start
    for broker in made:
        broker.close()
