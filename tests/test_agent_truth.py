"""The agent's part of presence that tells the truth (issue 12), against a real Mosquitto.

* every connection has a client id of its own, so a reconnect is never a takeover;
* the birth announces the device's heartbeat interval and its user's idle time;
* a second agent for the same device is named in one clear warning, not left to flap;
* a device can announce a sleep, disconnect without a will, and wake with a new session;
* activity replayed from the outbox keeps the time it was recorded.

What the agent did is read from a raw paho watcher and from Mosquitto's own log, never from
the agent's opinion of itself.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import Outbox, PresenceAgent, queue_activity
from device_agent import agent as agent_module
from hub.protocol import ConnPayload
from tests.support.procs import MosquittoProcess, free_port
from tests.support.wait import wait_for
from tests.test_agent_helpers import (
    DEVICE,
    USER,
    TcpProxy,
    Watcher,
    agent_config,
    agent_env,
    retained,
)

pytestmark = pytest.mark.slow

CONN_TOPIC = f"presence/devices/{USER}/{DEVICE}/conn"
RIVAL_WARNING = "another agent is running as alice/laptop"


def conn_messages(watcher: Watcher) -> list[dict[str, object]]:
    """Every conn message as it arrived (live ones; a watcher sees the retained one once)."""
    return [m.json() for m in watcher.snapshot() if m.topic == CONN_TOPIC and m.payload]


def rival_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "device_agent" and RIVAL_WARNING in r.getMessage()]


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


# --------------------------------------------------------------------------------------------
# 3. Two agents for one device


def test_two_agents_for_one_device_each_warn_once_naming_the_other(
    mosquitto: MosquittoProcess, watcher: Watcher, proxy: TcpProxy, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same user/device on two machines: separate outboxes, so no lock file sees it."""
    caplog.set_level(logging.INFO, logger="device_agent")
    first = PresenceAgent(agent_config(tmp_path / "one", proxy.url))
    second = PresenceAgent(agent_config(tmp_path / "two", proxy.url, name="Spare laptop"))
    try:
        first.start()
        assert first.wait_connected(5)
        first_session = first.session
        second.start()
        assert second.wait_connected(5)
        second_session = second.session
        # The second sees the first's retained birth; the first sees the second's live one.
        wait_for(lambda: first.rival_session == second_session, what="the first notices")
        wait_for(lambda: second.rival_session == first_session, what="the second notices")

        # Both reconnect (new sessions, new births): each sees the other again, warns no more.
        proxy.cut()
        wait_for(lambda: first.stats["rivals"] >= 2 and second.stats["rivals"] >= 2,
                 what="each agent sees the other's next birth")
        assert first.connected or first.wait_connected(5)
        assert second.connected or second.wait_connected(5)
        assert first.error is None and second.error is None
    finally:
        first.close()
        second.close()

    warnings = rival_warnings(caplog)
    assert len(warnings) == 2, warnings
    by_first = next(w for w in warnings if f"session {second_session} " in w)
    by_second = next(w for w in warnings if f"session {first_session} " in w)
    assert "Spare laptop" in by_first and "Alice's laptop" in by_second, "names the machine"
    assert "make its presence flap: stop one" in by_first
    assert all(r.levelno == logging.WARNING for r in caplog.records
               if RIVAL_WARNING in r.getMessage())


def test_a_restarted_agent_does_not_take_its_predecessors_birth_for_another_agent(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a crash the broker keeps the dead connection's birth retained until its keepalive
    runs out. The outbox remembers the device's sessions, so the next agent knows it."""
    caplog.set_level(logging.INFO, logger="device_agent")
    config = agent_config(tmp_path / "here", mosquitto.url)
    with PresenceAgent(config) as crashed:
        assert crashed.wait_connected(5)
        old = crashed.session
        assert old is not None
    # What the broker holds after a crash it has not noticed yet: the old session's birth.
    stale = ConnPayload(state="online", session=old, name="Alice's laptop", ts=1).to_json()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-stale-birth")
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    try:
        publisher.publish(CONN_TOPIC, stale, qos=1, retain=True).wait_for_publish(5)
    finally:
        publisher.disconnect()
        publisher.loop_stop()

    with PresenceAgent(config) as restarted:
        # The retained stale birth and then our own birth's echo have both been read.
        wait_for(lambda: restarted.stats["conn_seen"] >= 2, what="the restarted agent reads conn")
        assert restarted.rival_session is None
        # An agent on another machine (its own outbox) is still told about this one.
        with PresenceAgent(agent_config(tmp_path / "elsewhere", mosquitto.url)) as other:
            wait_for(lambda: other.rival_session == restarted.session,
                     what="the other machine's agent notices the restarted one")
            wait_for(lambda: restarted.rival_session == other.session,
                     what="and the restarted one notices the other machine's agent")
    warnings = rival_warnings(caplog)
    assert len(warnings) == 2 and not [w for w in warnings if old in w], warnings


def test_a_broker_that_hides_the_conn_topic_from_the_device_is_said_once(
    mosquitto_factory: Callable[..., MosquittoProcess], tmp_path: Path,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mosquitto grants a subscription its ACL does not let the client read, then delivers
    nothing: the agent notices that its own birth never comes back and says so, once."""
    caplog.set_level(logging.INFO, logger="device_agent")
    acl = tmp_path / "acl"
    acl.write_text(f"user {USER}/{DEVICE}\n"
                   f"topic write presence/devices/{USER}/{DEVICE}/+\n"
                   f"topic read presence/users/{USER}/+\n"
                   f"topic read presence/replies/{USER}/{DEVICE}\n")
    broker = mosquitto_factory(f"acl_file {acl}\n")
    monkeypatch.setattr(agent_module, "CONN_ECHO_TIMEOUT_S", 0.3)
    config = agent_config(tmp_path, broker.url, broker_username=f"{USER}/{DEVICE}")
    with PresenceAgent(config) as agent:
        assert agent.wait_connected(5)
        wait_for(lambda: "does not let this device read its own conn topic" in caplog.text,
                 what="the agent to notice that it cannot watch its conn topic")
        assert agent.connected and agent.stats["conn_seen"] == 0
    noted = [r for r in caplog.records if "its own conn topic" in r.getMessage()]
    assert len(noted) == 1 and noted[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], \
        "the presence part works: nothing to warn about"


# --------------------------------------------------------------------------------------------
# 4. Sleeping


def test_sleep_announces_disconnects_without_a_will_and_wakes_with_a_new_session(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    with PresenceAgent(agent_config(tmp_path, mosquitto.url)) as agent:
        assert agent.wait_connected(5)
        asleep = agent.session
        assert agent.sleep(400) is True
        assert agent.sleeping and not agent.connected and agent.session is None
        assert agent.wake_at is not None
        agent.record_activity("message", data={"n": 1})  # waits in the outbox while asleep
        woke = watcher.wait(lambda: [b for b in watcher.births() if b["session"] != asleep],
                            "a birth of a new session after the sleep")[0]
        watcher.wait(lambda: [a for a in watcher.of("activity") if a["data"] == {"n": 1}],
                     "the activity recorded while asleep, after waking")
        assert agent.wait_connected(5) and not agent.sleeping
        assert agent.session == woke["session"]

    sleeping = [c for c in conn_messages(watcher) if c["state"] == "sleeping"]
    assert len(sleeping) == 1
    assert sleeping[0]["session"] == asleep and sleeping[0]["sleepMs"] == 400
    assert isinstance(sleeping[0]["ts"], int)
    assert ConnPayload.model_validate(sleeping[0]).state == "sleeping"
    order = [(c["state"], c["session"]) for c in conn_messages(watcher)]
    assert order.index(("online", asleep)) < order.index(("sleeping", asleep)) \
        < order.index(("online", woke["session"]))
    assert not watcher.offlines("lost"), "a clean DISCONNECT: the broker drops the will"
    assert woke["heartbeatMs"] == 200


def test_wake_up_ends_a_sleep_early_and_a_stop_while_asleep_leaves_it_announced(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    agent = PresenceAgent(agent_config(tmp_path, mosquitto.url))
    try:
        agent.start()
        assert agent.wait_connected(5)
        first = agent.session
        assert agent.sleep(3_600_000)
        agent.wake_up()
        assert agent.wait_connected(5), "woken long before the hour is over"
        second = agent.session
        assert second not in (None, first)

        assert agent.sleep(3_600_000)
        agent.stop()
        assert agent.wait(5) and agent.error is None
    finally:
        agent.close()
    kept = json.loads(retained(mosquitto.host, mosquitto.port, CONN_TOPIC) or b"{}")
    assert kept["state"] == "sleeping" and kept["session"] == second, \
        "a stop while asleep does not connect: the announcement stands"
    assert not watcher.offlines(), "neither a will nor a clean offline"


def test_sleep_without_a_connection_gives_up_in_time_and_changes_nothing(tmp_path: Path) -> None:
    agent = PresenceAgent(agent_config(tmp_path, f"mqtt://127.0.0.1:{free_port()}"))
    with pytest.raises(RuntimeError, match="start the agent"):
        agent.sleep(1000)
    try:
        agent.start()
        with pytest.raises(ValueError, match="sleep must be"):
            agent.sleep(0)
        assert agent.sleep(1000, timeout=0.2) is False
        assert not agent.sleeping
    finally:
        agent.close()


def test_presence_agent_sleep_delivers_the_outbox_announces_and_exits(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    env = agent_env(tmp_path, mosquitto.url)
    agent = [sys.executable, "-m", "device_agent.cli"]
    queued = subprocess.run([*agent, "activity", "--data", '{"n": 5}'], env=env,
                            capture_output=True, text=True, timeout=30)
    assert queued.returncode == 0, queued.stderr
    done = subprocess.run([*agent, "sleep", "--for", "10m"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"{USER}/{DEVICE} sleeps for 10m" in done.stdout
    assert "Traceback" not in done.stderr

    watcher.wait(lambda: [c for c in conn_messages(watcher) if c["state"] == "sleeping"],
                 "the sleep announcement")
    kinds = [(m.kind, m.json().get("state")) for m in watcher.snapshot()
             if m.topic.startswith(f"presence/devices/{USER}/{DEVICE}/") and m.payload]
    assert kinds.index(("conn", "online")) < kinds.index(("activity", None)) \
        < kinds.index(("conn", "sleeping")), "birth, the queued activity, then the sleep"
    sleeping = next(c for c in conn_messages(watcher) if c["state"] == "sleeping")
    assert sleeping["sleepMs"] == 600_000
    kept = json.loads(retained(mosquitto.host, mosquitto.port, CONN_TOPIC) or b"{}")
    assert kept == sleeping and not watcher.offlines()

    bad = subprocess.run([*agent, "sleep", "--for", "8d"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--for must be more than 0 and at most 7d" in bad.stderr


# --------------------------------------------------------------------------------------------
# 6. Replays keep their time


def test_activity_replayed_from_the_outbox_keeps_the_time_it_was_recorded(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """The hub treats activity older than the device's last interaction as history, so a
    replay stamped with its delivery time would move the primary device: it must not be."""
    watcher = Watcher(mosquitto.host, mosquitto.port, persistent=True)  # across the restart
    config = agent_config(tmp_path, mosquitto.url)
    two_hours_ago = int(time.time() * 1000) - 2 * 3600 * 1000
    queue_activity(config, "message", "telegram-123", {"n": 0}, timestamp=two_hours_ago)
    agent = PresenceAgent(config)
    try:
        agent.record_activity("message", data={"n": 1})  # not started: waits on disk
        with Outbox(config.outbox_path, owner=f"{USER}/{DEVICE}") as outbox:
            on_disk = [row.payload for row in outbox.pending()]
        assert len(on_disk) == 2
        agent.start()
        watcher.wait(lambda: len(watcher.of("activity")) == 2, "both replayed")
        sent = [m.payload for m in watcher.snapshot() if m.kind == "activity"]
        assert sent == on_disk, "byte for byte what was recorded, timestamps included"
        assert json.loads(sent[0])["timestamp"] == two_hours_ago

        # Recorded during a broker outage, delivered after it: still the recording time.
        mosquitto.stop()
        wait_for(lambda: not agent.connected, what="the agent notices the outage")
        before = int(time.time() * 1000)
        agent.record_activity("message", data={"n": 2})
        after = int(time.time() * 1000)
        mosquitto.start()
        late = watcher.wait(lambda: [a for a in watcher.of("activity") if a["data"]["n"] == 2],
                            "activity from the outage", timeout=15)[0]
        assert before <= late["timestamp"] <= after
    finally:
        agent.close()
        watcher.close()


# --------------------------------------------------------------------------------------------
# 7. Acks after a sync


def test_every_state_message_is_acked_again_even_an_unchanged_version(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path
) -> None:
    """A sync republishes the same version and asks every device to ack: the agent acks each
    state message it receives, not only new versions."""
    state = json.dumps({"userId": USER, "name": "Alice", "status": "online", "customStatus": None,
                        "lastSeen": 1, "activeDevice": DEVICE, "version": 9, "devices": []})
    with PresenceAgent(agent_config(tmp_path, mosquitto.url)) as agent:
        assert agent.wait_connected(5)
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-hub-sync")
        publisher.connect(mosquitto.host, mosquitto.port)
        publisher.loop_start()
        try:
            for expected in (1, 2):  # the state, then the same state again (a sync)
                publisher.publish(f"presence/users/{USER}/state", state, qos=1,
                                  retain=True).wait_for_publish(5)
                watcher.wait(lambda n=expected: watcher.of("ack").count({"version": 9}) == n,
                             f"ack number {expected} of version 9")
        finally:
            publisher.disconnect()
            publisher.loop_stop()
        assert agent.stats["acks"] == 2
