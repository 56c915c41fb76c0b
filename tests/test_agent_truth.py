"""The agent's part of presence that tells the truth (issue 12), against a real Mosquitto.

* every connection has a client id of its own, so a reconnect is never a takeover;
* the birth announces the device's heartbeat interval and its user's idle time.

What the agent did is read from a raw paho watcher and from Mosquitto's own log, never from
the agent's opinion of itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent import PresenceAgent
from hub.protocol import ConnPayload
from tests.support.procs import MosquittoProcess
from tests.support.wait import wait_for
from tests.test_agent_helpers import (
    DEVICE,
    USER,
    TcpProxy,
    Watcher,
    agent_config,
    retained,
)

pytestmark = pytest.mark.slow

CONN_TOPIC = f"presence/devices/{USER}/{DEVICE}/conn"


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


# --------------------------------------------------------------------------------------------
# 2. The birth announces heartbeatMs and idleMs


def test_birth_announces_the_heartbeat_interval_and_the_idle_time(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    config = agent_config(tmp_path / "a", mosquitto.url, heartbeat_interval="250ms",
                          idle_source="command:echo 4321")
    with PresenceAgent(config) as agent:
        assert agent.wait_connected(5)
        session = agent.session
        birth = watcher.wait(lambda: [b for b in watcher.births() if b["session"] == session],
                             "birth with the announced fields")[0]
        kept = ConnPayload.model_validate_json(
            retained(mosquitto.host, mosquitto.port, CONN_TOPIC) or b"{}")
    assert birth["heartbeatMs"] == 250 and birth["idleMs"] == 4321
    assert birth["state"] == "online" and birth["name"] == "Alice's laptop"
    assert isinstance(birth["ts"], int)
    assert (kept.session, kept.heartbeat_ms, kept.idle_ms) == (session, 250, 4321), \
        "the retained birth carries them too (a hub that restarts reads it)"

    # A device that cannot sense its user's idle time leaves idleMs out: no guessing.
    with PresenceAgent(agent_config(tmp_path / "b", mosquitto.url, device="pi",
                                    heartbeat_interval="10m")) as agent:
        assert agent.wait_connected(5)
        pi = agent.session
        pi_birth = watcher.wait(lambda: [b for b in watcher.births() if b["session"] == pi],
                                "birth of the device without an idle source")[0]
    assert pi_birth["heartbeatMs"] == 600_000 and "idleMs" not in pi_birth
