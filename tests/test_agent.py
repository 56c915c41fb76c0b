"""PresenceAgent against a real Mosquitto: sessions and wills, heartbeats, outbox, state, requests.

Every observation is made by a raw paho subscriber (``Watcher``) on ``presence/#``, never by
asking the agent what it thinks it did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import (
    AgentLocked,
    BrokerUnavailable,
    GaveUp,
    HubUnavailable,
    PresenceAgent,
)
from hub.protocol import DeviceEntry, ReplyPayload, UserStatePayload
from tests.support.hub_process import HubProcess
from tests.support.procs import MosquittoProcess, free_port
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
def real_hub(mosquitto: MosquittoProcess, tmp_path: Path) -> Iterator[HubProcess]:
    """The real hub on the same Mosquitto, answering requests with its command handler."""
    workdir = tmp_path / "hub"
    workdir.mkdir()
    hub = HubProcess(["--broker", mosquitto.url, "--storage", "memory"], workdir)
    hub.env = {k: v for k, v in hub.env.items() if not k.startswith("PRESENCE_")}
    hub.start()
    yield hub
    hub.close()


def user_state(version: int, status: str = "online", custom: str | None = "In a meeting",
               active: str | None = DEVICE) -> UserStatePayload:
    return UserStatePayload(
        user_id=USER, name="Alice", status=status, custom_status=custom,  # type: ignore[arg-type]
        last_seen=1_700_000_000_000, active_device=active, version=version,
        devices=[DeviceEntry(id=DEVICE, name="Alice's laptop", status="online", is_active=True)],
    )


def publish_retained(mosquitto: MosquittoProcess, topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-publisher")
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


# --------------------------------------------------------------------------------------------
# Sessions, wills, stop


def test_every_connection_has_a_new_session_and_a_will_of_that_session(
    mosquitto: MosquittoProcess, watcher: Watcher, proxy: TcpProxy, tmp_path: Path
) -> None:
    agent = PresenceAgent(agent_config(tmp_path, proxy.url))
    with agent:
        watcher.wait(lambda: len(watcher.births()) == 1, "first birth")
        proxy.cut()  # the broker sees the socket close without DISCONNECT: will
        watcher.wait(lambda: len(watcher.offlines("lost")) == 1, "will of the first session")
        watcher.wait(lambda: len(watcher.births()) == 2, "birth after the cut")

        mosquitto.kill()  # a crashed broker sends no wills; the agent must reconnect anew
        mosquitto.start()
        watcher.wait(lambda: len(watcher.births()) == 3, "birth after the broker restart",
                     timeout=15)
        assert wait_for(agent.wait_connected, what="agent connected after broker restart")
        proxy.cut()
        watcher.wait(lambda: len(watcher.offlines("lost")) == 2, "will after the restart")
        watcher.wait(lambda: len(watcher.births()) == 4, "birth after the second cut")

    births, wills = watcher.births(), watcher.offlines("lost")
    sessions = [b["session"] for b in births]
    assert len(set(sessions)) == 4, f"sessions must differ per connection: {sessions}"
    # Each will carries the session of the connection that died, never an older one.
    assert wills[0]["session"] == sessions[0]
    assert wills[1]["session"] == sessions[2]
    assert all(w.get("reason") == "lost" and "ts" not in w for w in wills)
    assert all(b["name"] == "Alice's laptop" and isinstance(b["ts"], int) for b in births)
    conn = [m for m in watcher.snapshot() if m.topic == CONN_TOPIC and not m.retain]
    assert conn, "births and wills go to the conn topic"


def test_birth_is_retained_qos1_and_clean_stop_is_offline_disconnect(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    agent = PresenceAgent(agent_config(tmp_path, mosquitto.url))
    agent.start()
    assert agent.wait_connected(5)
    session = agent.session
    birth = json.loads(retained(mosquitto.host, mosquitto.port, CONN_TOPIC) or b"{}")
    assert birth["state"] == "online" and birth["session"] == session

    agent.stop()
    assert agent.wait(1) and agent.error is None
    offline = watcher.wait(lambda: watcher.offlines("disconnect"), "clean offline")[0]
    assert offline["session"] == session and isinstance(offline["ts"], int)
    kept = json.loads(retained(mosquitto.host, mosquitto.port, CONN_TOPIC) or b"{}")
    assert kept == offline, "the clean offline stays retained (and no will replaced it)"
    assert not watcher.offlines("lost")
    agent.close()


def test_gives_up_after_max_reconnect_attempts(tmp_path: Path) -> None:
    closed = f"mqtt://127.0.0.1:{free_port()}"
    agent = PresenceAgent(agent_config(tmp_path, closed, max_reconnect_attempts=3,
                                       reconnect_min="10ms", reconnect_max="20ms"))
    agent.start()
    assert agent.wait(5), "the agent should stop trying"
    assert isinstance(agent.error, GaveUp)
    assert "after 3 attempts" in str(agent.error) and closed in str(agent.error)
    agent.close()


def test_a_second_agent_for_the_same_device_is_refused(tmp_path: Path) -> None:
    closed = f"mqtt://127.0.0.1:{free_port()}"
    first = PresenceAgent(agent_config(tmp_path, closed))
    first.start()
    try:
        second = PresenceAgent(agent_config(tmp_path, closed))
        with pytest.raises(AgentLocked, match="already runs for alice/laptop"):
            second.start()
        second.close()
    finally:
        first.close()


# --------------------------------------------------------------------------------------------
# Activity and the outbox


def activity_numbers(watcher: Watcher) -> list[int]:
    """Activity ``data.n`` in first-arrival order (QoS 1 may repeat one after a lost PUBACK)."""
    seen: list[int] = []
    for payload in watcher.of("activity"):
        n = payload["data"]["n"]
        if n not in seen:
            seen.append(n)
    return seen


def test_activity_recorded_before_start_is_sent_after_the_birth(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    agent = PresenceAgent(agent_config(tmp_path, mosquitto.url))
    before = int(time.time() * 1000)
    agent.record_activity("message", channel_id="telegram-123", data={"n": 0})
    with agent:
        watcher.wait(lambda: activity_numbers(watcher) == [0], "the early activity")
        wait_for(lambda: agent.pending_count == 0, what="outbox emptied after PUBACK")
    kinds = [m.kind for m in watcher.snapshot() if m.topic.startswith("presence/devices/")]
    assert kinds.index("conn") < kinds.index("activity")
    sent = watcher.of("activity")[0]
    assert sent["type"] == "message" and sent["channelId"] == "telegram-123"
    assert before <= sent["timestamp"] <= int(time.time() * 1000), "stamped when recorded"


def test_activity_during_a_broker_outage_arrives_after_restart_in_order(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    watcher = Watcher(mosquitto.host, mosquitto.port, persistent=True)
    agent = PresenceAgent(agent_config(tmp_path, mosquitto.url))
    try:
        agent.start()
        assert agent.wait_connected(5)
        for n in range(3):
            agent.record_activity("message", channel_id="telegram-123", data={"n": n})
        watcher.wait(lambda: activity_numbers(watcher) == [0, 1, 2], "activity before outage")

        mosquitto.stop()
        wait_for(lambda: not agent.connected, what="agent notices the outage")
        for n in range(3, 40):
            agent.record_activity("message", channel_id="telegram-123", data={"n": n})
        assert agent.pending_count == 37, "everything recorded in the outage is on disk"
        mosquitto.start()

        watcher.wait(lambda: len(activity_numbers(watcher)) == 40, "all activity after restart",
                     timeout=15)
        assert activity_numbers(watcher) == list(range(40)), "in recording order"
        wait_for(lambda: agent.pending_count == 0, what="outbox emptied")
    finally:
        agent.close()
        watcher.close()


def test_set_status_and_custom_status_publish_set_messages(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    with PresenceAgent(agent_config(tmp_path, mosquitto.url)) as agent:
        agent.set_status("dnd")
        agent.set_custom_status("In a meeting")
        agent.set_custom_status(None)
        watcher.wait(lambda: len(watcher.of("set")) == 3, "three set messages")
        with pytest.raises(ValueError, match="invalid status 'busy'"):
            agent.set_status("busy")
        with pytest.raises(ValueError, match="invalid custom status"):
            agent.set_custom_status("x" * 300)
    assert watcher.of("set") == [
        {"status": "dnd"},
        {"customStatus": "In a meeting"},
        {"customStatus": None},
    ]


def test_bad_activity_is_refused_before_it_reaches_the_outbox(tmp_path: Path) -> None:
    agent = PresenceAgent(agent_config(tmp_path, f"mqtt://127.0.0.1:{free_port()}"))
    with pytest.raises(ValueError, match=r"channelId|channel_id"):
        agent.record_activity("message", channel_id="tele/gram")
    with pytest.raises(ValueError, match="invalid activity"):
        agent.record_activity("")
    assert agent.pending_count == 0
    agent.close()


# --------------------------------------------------------------------------------------------
# Heartbeats


def heartbeats_of(watcher: Watcher, session: str) -> list[dict[str, Any]]:
    return [h for h in watcher.of("heartbeat") if h["session"] == session]


def test_heartbeats_carry_seq_ts_and_idle_ms_from_a_file(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    touched = tmp_path / "last-input"
    touched.write_text("")
    five_s_ago = time.time() - 5
    os.utime(touched, (five_s_ago, five_s_ago))
    config = agent_config(tmp_path, mosquitto.url, idle_source=f"file:{touched}")
    with PresenceAgent(config) as agent:
        assert agent.wait_connected(5)
        session = agent.session
        assert session is not None
        watcher.wait(lambda: len(heartbeats_of(watcher, session)) >= 3, "three heartbeats")
    beats = heartbeats_of(watcher, session)
    assert [b["seq"] for b in beats[:3]] == [0, 1, 2]
    now = int(time.time() * 1000)
    for beat in beats:
        assert now - 10_000 < beat["ts"] <= now
        assert 5_000 <= beat["idleMs"] < 15_000


def test_heartbeat_idle_ms_from_a_command_and_none_without_a_source(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    with PresenceAgent(agent_config(tmp_path / "a", mosquitto.url,
                                    idle_source="command:echo 1234")) as agent:
        assert agent.wait_connected(5)
        session = agent.session
        assert session is not None
        watcher.wait(lambda: len(heartbeats_of(watcher, session)) >= 2, "command heartbeats")
    assert {b["idleMs"] for b in heartbeats_of(watcher, session)} == {1234}

    with PresenceAgent(agent_config(tmp_path / "b", mosquitto.url, device="pi")) as agent:
        assert agent.wait_connected(5)
        pi_session = agent.session
        assert pi_session is not None
        watcher.wait(lambda: heartbeats_of(watcher, pi_session), "liveness heartbeat")
    assert all("idleMs" not in b for b in heartbeats_of(watcher, pi_session))


# --------------------------------------------------------------------------------------------
# User state from the hub


def test_retained_state_drives_callbacks_state_file_and_ack(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    state_topic = f"presence/users/{USER}/state"
    publish_retained(mosquitto, state_topic, user_state(3).to_json())
    calls: list[tuple[str, Any]] = []
    config = agent_config(tmp_path, mosquitto.url)
    agent = PresenceAgent(
        config,
        on_state=lambda s: calls.append(("state", s.version)),
        on_status=lambda s: calls.append(("status", s)),
        on_custom_status=lambda s: calls.append(("custom", s)),
        on_primary_change=lambda s: calls.append(("primary", s)),
    )
    with agent:
        watcher.wait(lambda: {"version": 3} in watcher.of("ack"), "ack of version 3")
        assert calls == [("state", 3), ("status", "online"), ("custom", "In a meeting"),
                         ("primary", DEVICE)]
        assert config.state_file is not None
        document = json.loads(config.state_file.read_text())
        assert document["status"] == "online" and document["version"] == 3
        assert document["customStatus"] == "In a meeting"
        assert document["agent"]["connected"] is True
        assert document["agent"]["session"] == agent.session

        # Only what changed is reported: the status; custom status and primary stay.
        calls.clear()
        publish_retained(mosquitto, state_topic, user_state(4, status="dnd").to_json())
        watcher.wait(lambda: {"version": 4} in watcher.of("ack"), "ack of version 4")
        assert calls == [("state", 4), ("status", "dnd")]
        assert agent.state is not None and agent.state.status == "dnd"

        # Garbage is dropped and counted, never acked, never fatal.
        publish_retained(mosquitto, state_topic, b'{"status": "sleepy"}')
        wait_for(lambda: agent.stats["dropped"] == 1, what="malformed state dropped")
        publish_retained(mosquitto, state_topic, user_state(5, custom=None).to_json())
        watcher.wait(lambda: {"version": 5} in watcher.of("ack"), "ack of version 5")
        assert ("custom", None) in calls
    assert json.loads(config.state_file.read_text())["agent"]["connected"] is False


# --------------------------------------------------------------------------------------------
# Requests to the hub


def test_request_returns_the_hubs_reply_for_its_own_id(
    mosquitto: MosquittoProcess, real_hub: HubProcess, tmp_path: Path
) -> None:
    with PresenceAgent(agent_config(tmp_path, mosquitto.url)) as agent:
        assert agent.wait_connected(10)
        reply = wait_for(lambda: _who(agent), what="the hub to list the agent's user")
        assert reply.ok and USER in reply.text
        assert [u["userId"] for u in reply.data["users"]] == [USER]
        assert agent.request("/presence bogus", timeout=5).ok is False


def _who(agent: PresenceAgent) -> ReplyPayload | None:
    reply = agent.request("/presence who", timeout=5)
    return reply if reply.data["users"] else None


def test_request_without_a_hub_raises_hub_unavailable_in_time(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    with PresenceAgent(agent_config(tmp_path, mosquitto.url)) as agent:
        assert agent.wait_connected(5)
        started = time.monotonic()
        with pytest.raises(HubUnavailable, match=r"no reply from the hub within 0\.3s") as info:
            agent.request("/presence", timeout=0.3)
        assert time.monotonic() - started < 2
        assert mosquitto.url in str(info.value)
        assert not isinstance(info.value, BrokerUnavailable)


def test_request_without_a_broker_says_the_broker_is_unreachable(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    with PresenceAgent(agent_config(tmp_path, url)) as agent, \
            pytest.raises(BrokerUnavailable, match=f"not connected to the broker at {url}"):
        agent.request("/presence", timeout=0.2)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX lock files")
def test_record_activity_works_while_stopped_and_is_sent_on_the_next_start(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    config = agent_config(tmp_path, mosquitto.url)
    first = PresenceAgent(config)
    first.start()
    assert first.wait_connected(5)
    first.stop()
    first.record_activity("message", data={"n": 7})  # stopped: waits on disk
    first.close()
    with PresenceAgent(config):
        watcher.wait(lambda: activity_numbers(watcher) == [7], "activity from the last run")


# --------------------------------------------------------------------------------------------
# TLS


def make_certs(folder: Path) -> dict[str, Path]:
    """A private CA and a server certificate for 127.0.0.1 (EC keys: fast to make)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in
                                  ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for argv in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=test-ca",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    return {"ca": ca, "cert": cert, "key": key}


@pytest.fixture
def tls_broker(mosquitto_factory: Any, tmp_path: Path) -> tuple[MosquittoProcess, str]:
    """A Mosquitto with its usual plain listener plus a TLS one; returns (broker, mqtts URL)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    certs = make_certs(tmp_path / "certs")
    tls_port = free_port()
    broker = mosquitto_factory(
        f"listener {tls_port} 127.0.0.1\n"
        f"certfile {certs['cert']}\nkeyfile {certs['key']}\n"
    )
    wait_for(lambda: f"port {tls_port}" in broker.log_text(), what="TLS listener open")
    return broker, f"mqtts://127.0.0.1:{tls_port}"


def test_mqtts_with_a_private_ca(tls_broker: tuple[MosquittoProcess, str], tmp_path: Path) -> None:
    broker, url = tls_broker
    watcher = Watcher(broker.host, broker.port)
    try:
        config = agent_config(tmp_path, url, ca_file=str(tmp_path / "certs" / "ca.pem"))
        with PresenceAgent(config) as agent:
            assert agent.wait_connected(5)
            watcher.wait(watcher.births, "birth over TLS")

        # Without the private CA the broker's certificate is refused, and the error says so.
        from device_agent.command import ask_hub

        with pytest.raises(BrokerUnavailable, match=f"cannot connect to the broker at {url}:"
                                                    " TLS certificate not accepted"):
            ask_hub(agent_config(tmp_path / "other", url), "/presence", timeout=2)
    finally:
        watcher.close()
