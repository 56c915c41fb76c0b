"""The agent's part of presence that tells the truth (issue 12), against a real Mosquitto.

* every connection has a client id of its own, so a reconnect is never a takeover.

What the agent did is read from a raw paho watcher and from Mosquitto's own log, never from
the agent's opinion of itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent import PresenceAgent
from tests.support.procs import MosquittoProcess
from tests.support.wait import wait_for
from tests.test_agent_helpers import (
    DEVICE,
    USER,
    TcpProxy,
    Watcher,
    agent_config,
)

pytestmark = pytest.mark.slow


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


# --------------------------------------------------------------------------------------------
# 1. A client id of its own for every connection


def test_each_connection_has_a_client_id_of_its_own_with_a_clean_session(
    mosquitto: MosquittoProcess, watcher: Watcher, proxy: TcpProxy, tmp_path: Path
) -> None:
    with PresenceAgent(agent_config(tmp_path, proxy.url)):
        watcher.wait(lambda: len(watcher.births()) == 1, "first birth")
        proxy.cut()
        watcher.wait(lambda: len(watcher.births()) == 2, "birth after the cut")
    first, second = (b["session"] for b in watcher.births())
    for session in (first, second):
        # Mosquitto: "New client connected from ... as ID (p2, c1, k60)": 3.1.1, clean session
        wait_for(lambda s=session: f" as presence-agent/{USER}/{DEVICE}/{s} (p2, c1, k60)"
                 in mosquitto.log_text(), what=f"the broker's log line for session {session}")
    assert "already connected" not in mosquitto.log_text(), "a reconnect must not take over"


def test_a_client_id_template_is_filled_in_and_a_fixed_one_is_honoured_with_a_warning(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="device_agent")
    templated = agent_config(tmp_path / "a", mosquitto.url, client_id="acme-{device}.{session}")
    with PresenceAgent(templated) as agent:
        assert agent.wait_connected(5)
        session = agent.session
        wait_for(lambda: f" as acme-{DEVICE}.{session} (" in mosquitto.log_text(),
                 what="the templated client id in the broker's log")
    assert not [r for r in caplog.records if "has no {session}" in r.getMessage()]

    fixed = agent_config(tmp_path / "b", mosquitto.url, client_id="kitchen-panel")
    with PresenceAgent(fixed) as agent:
        assert agent.wait_connected(5)
        wait_for(lambda: " as kitchen-panel (" in mosquitto.log_text(),
                 what="the fixed client id in the broker's log")
    warned = [r for r in caplog.records if "has no {session}" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "'kitchen-panel'" in warned[0].getMessage()
