"""Fixtures of the agent tests: a watcher of everything on the test's Mosquitto, and a TCP
proxy in front of it (so a test can cut the agent's link without touching the broker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.procs import MosquittoProcess
from tests.test_agent_helpers import TcpProxy, Watcher


@pytest.fixture
def watcher(mosquitto: MosquittoProcess) -> Iterator[Watcher]:
    w = Watcher(mosquitto.host, mosquitto.port)
    yield w
    w.close()


@pytest.fixture
def proxy(mosquitto: MosquittoProcess) -> Iterator[TcpProxy]:
    p = TcpProxy(mosquitto.host, mosquitto.port)
    yield p
    p.close()
