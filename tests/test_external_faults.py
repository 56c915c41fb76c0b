"""The hub on an external broker (a real Mosquitto) under the faults an operator meets.

Each test reproduces one defect of issue 11 with real processes: a real Mosquitto (from
``tests/support/procs.py``), the hub as a real ``presence-hub`` process that can be SIGKILLed,
frozen and restarted (or, where the test must read the hub's own log records, the same
transport in this process), and paho clients for devices and watchers. Timers are short and
every wait is on a condition with a deadline.

What is checked is what the broker and other clients see: retained topics, what a request to
the hub answers, and what the broker still holds for the hub's session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.app.factory import create_presence_service
from hub.mqtt import external
from hub.mqtt.client import (
    FAST_RETRY_S,
    FIGHT_MIN_S,
    PUBACK,
    HubMqttClient,
    Received,
    _Connection,
    encode_ack,
    encode_publish,
)
from hub.protocol import ActivityPayload
from tests.support.hub_process import HubProcess
from tests.support.mqtt_clients import MqttClient, SimDevice, Watcher
from tests.support.procs import MosquittoProcess
from tests.support.wait import async_wait_for, wait_for

pytestmark = pytest.mark.slow

HUB_STATUS = "presence/hub/status"


class World:
    """One Mosquitto and whatever runs against it; everything is closed at teardown."""

    def __init__(self, broker: MosquittoProcess, tmp_path: Path) -> None:
        self.broker = broker
        self.tmp_path = tmp_path
        self.hubs: list[HubProcess] = []
        self.clients: list[MqttClient] = []

    def hub_args(self, name: str = "a", *extra: str) -> list[str]:
        """A hub with its own TinyDB file: heartbeat 500 ms, long idle timers (no status
        moves by itself during a test), quick flushes so acks are not held for long."""
        return ["--broker", self.broker.url, "--storage", "tinydb",
                "--db", str(self.tmp_path / f"hub-{name}" / "presence.json"),
                "--heartbeat-interval", "500ms", "--away-after", "5m", "--offline-after", "1h",
                "--flush-interval", "200ms", *extra]

    def hub(self, name: str = "a", *extra: str) -> HubProcess:
        workdir = self.tmp_path / f"hub-{name}"
        workdir.mkdir(exist_ok=True)
        hub = HubProcess(self.hub_args(name, *extra), workdir)
        self.hubs.append(hub)
        return hub

    def watcher(self) -> Watcher:
        w = Watcher(self.broker.host, self.broker.port)
        self.clients.append(w)
        return w.start()

    def device(self, user: str, device: str) -> SimDevice:
        d = SimDevice(self.broker.host, self.broker.port, user, device,
                      client_id=f"sim-{user}-{device}-{uuid.uuid4().hex[:6]}")
        self.clients.append(d)
        return d

    def live(self, user: str, device: str) -> SimDevice:
        """A device that is born and keeps beating (every 250 ms: the hub's timeout is 1.25 s),
        so its status stays put while a test waits on it."""
        d = self.device(user, device).online()
        d.start_heartbeats(0.25)
        return d

    def client(self, **kw: Any) -> MqttClient:
        c = MqttClient(self.broker.host, self.broker.port, **kw)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for h in self.hubs:
            h.close()


@pytest.fixture
def world(mosquitto: MosquittoProcess, tmp_path: Path) -> Iterator[World]:
    """The hub's world on a Mosquitto with persistence (the fixture's default)."""
    w = World(mosquitto, tmp_path)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def bare_world(mosquitto_factory: Callable[..., MosquittoProcess],
               tmp_path: Path) -> Iterator[World]:
    """The hub's world on a Mosquitto without persistence: a restart forgets everything."""
    w = World(mosquitto_factory("persistence false\n"), tmp_path)
    try:
        yield w
    finally:
        w.close()


def ask(world: World, user: str, command: str, timeout: float = 10.0) -> dict[str, Any]:
    """Send a chat command over the request/response scheme (topics.md) and return the reply.

    A requester of its own (a new client id each time), as the ``presence`` command is."""
    device = f"cli-{uuid.uuid4().hex[:6]}"
    requester = world.client()
    requester.connect()
    requester.subscribe(f"presence/replies/{user}/{device}", 1)
    rid = uuid.uuid4().hex
    requester.publish(f"presence/devices/{user}/{device}/req",
                      json.dumps({"id": rid, "command": command}).encode(), qos=1)

    def reply() -> dict[str, Any] | None:
        for raw in requester.got(f"presence/replies/{user}/{device}"):
            doc = json.loads(raw)
            if doc.get("id") == rid:
                return dict(doc)
        return None

    got = wait_for(reply, timeout, f"the hub's reply to {command!r}")
    requester.close()
    assert got is not None
    return got


def activity(device: SimDevice, channel: str) -> int:
    """One activity message of ``device`` on ``channel`` (QoS 1, acked by the broker); its
    timestamp."""
    ts = int(time.time() * 1000)
    act = ActivityPayload(type="message", channel_id=channel, timestamp=ts)
    device.publish(device.topic("activity"), act.to_json(), qos=1)
    return ts


def channels_logged(world: World, user: str) -> list[str]:
    reply = ask(world, user, "/presence activity --limit 1000")
    assert reply["ok"], reply
    return [entry["channelId"] for entry in reply["data"]]


# ---------------------------------------------------------------------------- defect 1


def test_messages_behind_the_connack_in_one_read_belong_to_the_new_connection() -> None:
    """The mechanism of defect 1, without a broker: a CONNACK and a PUBLISH in one read. The
    PUBLISH is handed on with the new connection's generation, so its ack is sent."""

    async def run() -> None:
        got: list[tuple[int, list[Received]]] = []
        client = HubMqttClient("127.0.0.1", 1, client_id="x",
                               on_messages=lambda batch: got.append((client.generation, batch)))
        conn = _Connection(client)
        conn.data_received(b"\x20\x02\x01\x00" + encode_publish("t/a", b"queued", 1, False, 7))
        assert got == [(1, [("t/a", b"queued", 7, 1)])]
        client.ack(7, 1, got[0][0])
        assert bytes(conn.out).endswith(encode_ack(PUBACK, 7))

    asyncio.run(run())


def test_a_copy_sent_again_after_a_reconnect_is_acked_not_handed_on_twice() -> None:
    """The bookkeeping behind the in-flight test below, without a broker. Two messages come,
    the link goes; one is acked (persisted) while the link is down, the other after its copy
    came on the next connection. Neither copy is handed on; each is acked on the new link."""

    async def run(session_present: bool) -> tuple[list[int], bytes]:
        got: list[int] = []
        client = HubMqttClient("127.0.0.1", 1, client_id="x",
                               on_messages=lambda batch: got.extend(m[2] for m in batch))
        first = _Connection(client)
        first.data_received(b"\x20\x02\x00\x00" + encode_publish("t", b"a", 1, False, 7)
                            + encode_publish("t", b"b", 1, False, 8))
        gen = client.generation
        client._conn = None
        client._carry_unacked()  # what _connect_once does when the link is gone
        client.ack(7, 1, gen)  # persisted while no link is up
        second = _Connection(client)
        second.data_received(bytes((0x20, 2, int(session_present), 0))
                             + encode_publish("t", b"a", 1, False, 7, dup=True)
                             + encode_publish("t", b"b", 1, False, 8, dup=True)
                             + encode_publish("t", b"c", 1, False, 9))
        client.ack(8, 1, gen)  # persisted now
        return got, bytes(second.out)

    got, out = asyncio.run(run(session_present=True))
    assert got == [7, 8, 9]
    assert out.endswith(encode_ack(PUBACK, 7) + encode_ack(PUBACK, 8))
    # without a session the broker forgot them: a packet id may be a new message
    got, out = asyncio.run(run(session_present=False))
    assert got == [7, 8, 7, 8, 9]
    assert encode_ack(PUBACK, 7) not in out and encode_ack(PUBACK, 8) not in out


def test_hub_restart_with_a_backlog_applies_and_acks_all_of_it(world: World) -> None:
    """Issue 11 defect 1: 25 QoS 1 messages queued for the hub's session while it was dead.

    Mosquitto hands them over right behind the CONNACK (20 at once, its in-flight window), in
    the same TCP read. Their acks were dropped as stale, the window stayed full and the hub
    heard no QoS 1 message again. Now: all 25 are in the activity log, a later birth is heard,
    and the broker has nothing left to redeliver to the hub's session.
    """
    watcher = world.watcher()
    hub = world.hub().start()
    wait_for(lambda: watcher.last(HUB_STATUS) == b"online", what="hub online")
    pc = world.live("alice", "pc")
    watcher.wait_device("alice", "pc", "online")
    hub.kill()
    wait_for(lambda: watcher.last(HUB_STATUS) == b"offline", what="the hub's will")
    sent = [f"backlog-{i:02d}" for i in range(25)]
    for channel in sent:
        activity(pc, channel)
    hub.start()
    tablet = world.live("alice", "tablet")  # a QoS 1 birth after the backlog
    watcher.wait_device("alice", "tablet", "online", timeout=10)
    logged = channels_logged(world, "alice")
    assert sorted(c for c in logged if c.startswith("backlog-")) == sent
    tablet.close()
    pc.close()
    assert hub.stop() == 0
    assert_nothing_left_for_the_hub(world, "presence/devices/alice/pc/activity")


def assert_nothing_left_for_the_hub(world: World, topic: str) -> None:
    """Nothing published to ``topic`` waits in the hub's broker session (the hub is stopped).

    What the hub acked, the broker forgets; anything unacked is sent again to the session.
    A stand-in takes the session, and a marker sent after it tells when all of it is in."""
    stand_in = world.client(client_id="presence-hub", clean_session=False)
    stand_in.connect()
    stand_in.subscribe("presence/devices/+/+/+", 1)
    marker = world.client().connect()
    marker.publish("presence/devices/zz/marker/activity", b"{}", qos=1)
    wait_for(lambda: stand_in.got("presence/devices/zz/marker/activity"),
             what="the marker through the hub's session")
    left = stand_in.got(topic)
    assert left == [], f"{len(left)} message(s) on {topic} were never acked by the hub"
    stand_in.close()


def test_messages_in_flight_over_a_mosquitto_restart_are_applied_once_and_acked(
    world: World,
) -> None:
    """Activity the hub has taken but not acked yet (its flush is still to come) when the
    link goes is sent again by the broker on the next connection, with DUP. It was handed on
    twice and logged twice; now the copy is recognised by its packet id, not handed on, and
    acked once the first one is persisted."""
    watcher = world.watcher()
    hub = world.hub("a", "--flush-interval", "1h").start()  # acks wait for the stop's flush
    wait_for(lambda: watcher.last(HUB_STATUS) == b"online", what="hub online")
    devices = {"pc": world.live("alice", "pc"), "phone": world.live("alice", "phone")}
    watcher.wait_device("alice", "phone", "online")
    primary = watcher.topics.user("alice", "primary")
    now = wait_for(lambda: watcher.last(primary), what="a primary device").decode()
    other = "pc" if now == "phone" else "phone"
    before = len(watcher.got(primary))
    # each activity moves the primary device: the published primary shows the hub took all
    # three (asking for the activity log would flush and so ack them)
    sent = [f"in-flight-{i}" for i in range(3)]
    order = [other, now, other]
    for channel, device in zip(sent, order, strict=True):
        activity(devices[device], channel)
    wait_for(lambda: watcher.got(primary)[before:] == [d.encode() for d in order],
             what=f"the hub taking the three activities (primary: {watcher.got(primary)})")
    world.broker.restart()
    wait_for(lambda: hub.output().count("hub connected to") == 2, timeout=10,
             what="the hub back on the restarted broker")
    assert "session present: True" in hub.output()
    world.live("alice", "tablet")  # a QoS 1 message behind the copies: they are in
    world.watcher().wait_device("alice", "tablet", "online")
    logged = [c for c in channels_logged(world, "alice") if c.startswith("in-flight-")]
    assert sorted(logged) == sent
    assert hub.stop() == 0
    for device in ("pc", "phone"):
        assert_nothing_left_for_the_hub(world, f"presence/devices/alice/{device}/activity")


# ---------------------------------------------------------------------------- defect 3


def test_mosquitto_restart_without_persistence_brings_the_retained_state_back(
    bare_world: World,
) -> None:
    """Issue 11 defect 3: a Mosquitto without persistence forgets every retained message when
    it restarts. The hub republished only on its first connect, so a new subscriber to
    ``presence/users/#`` saw nothing. Now every CONNACK without a session republishes."""
    world = bare_world
    watcher = world.watcher()
    hub = world.hub().start()
    wait_for(lambda: watcher.last(HUB_STATUS) == b"online", what="hub online")
    dev = world.live("alice", "laptop")
    dev.set(customStatus="kept across the restart")
    watcher.wait_text("alice", "custom", "kept across the restart")
    dev.clean_offline()  # alice is offline for good: nothing of hers changes from here on
    watcher.wait_status("alice", "offline")
    world.broker.restart()
    fresh = world.watcher()  # subscribes after the restart: sees only what is retained now
    fresh.wait_text("alice", "custom", "kept across the restart", timeout=10)
    fresh.wait_status("alice", "offline")
    state = fresh.state("alice")
    assert state is not None and [d["id"] for d in state["devices"]] == ["laptop"]
    wait_for(lambda: "may have been lost" in hub.output(), what="the warning in the hub's log")


# ---------------------------------------------------------------------------- defect 4


def _retry_delays(records: list[logging.LogRecord]) -> list[float]:
    return [float(m.group(1)) for r in records if r.name == "hub.mqtt.client"
            and (m := re.search(r"retrying in ([0-9.]+) s", r.getMessage()))]


async def test_reconnects_stay_prompt_while_mosquitto_restarts(
    mosquitto: MosquittoProcess, caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 11 defect 4: the hub's reconnect delay had doubled to 2.9 s by the time a
    restarted Mosquitto was back, so devices (back after 0.5-1 s) published before the hub had
    subscribed again. Now the first attempts are retried within 0.1-0.25 s.

    The hub runs in this process so its log records can be read; the outage lasts for a dozen
    failed attempts, which took minutes with the old doubling backoff."""
    caplog.set_level(logging.DEBUG, logger="hub.mqtt")  # the quick retries log at debug
    presence = create_presence_service(broker=mosquitto.url, storage="memory",
                                       heartbeat_interval_ms=500)

    def connects() -> int:
        return sum("hub connected to" in r.getMessage() for r in caplog.records)

    async with presence:
        await async_wait_for(lambda: connects() == 1, what="the hub connected")
        await asyncio.to_thread(mosquitto.stop)
        await async_wait_for(lambda: len(_retry_delays(caplog.records)) >= 12, timeout=20,
                             what="a dozen failed attempts while the broker is down")
        await asyncio.to_thread(mosquitto.start)
        await async_wait_for(lambda: connects() == 2, timeout=10, what="the hub back")
    delays = _retry_delays(caplog.records)
    assert delays and max(delays) <= FAST_RETRY_S[1], delays


def test_activity_published_while_the_hub_is_away_survives_a_mosquitto_restart(
    world: World,
) -> None:
    """With ``persistence true`` Mosquitto keeps the hub's session (its subscription and what
    is queued for it) across its own restart: activity a device publishes while the hub has not
    reconnected yet is delivered when it does. The hub is frozen (SIGSTOP) over the restart, so
    it is certainly away when the device publishes."""
    watcher = world.watcher()
    hub = world.hub().start()
    wait_for(lambda: watcher.last(HUB_STATUS) == b"online", what="hub online")
    world.live("alice", "pc")
    watcher.wait_device("alice", "pc", "online")
    assert hub.proc is not None
    os.kill(hub.proc.pid, signal.SIGSTOP)
    try:
        world.broker.restart()
        back = world.device("alice", "pc").online()  # a new session, as an agent reconnects
        activity(back, "while-the-hub-was-away")
    finally:
        os.kill(hub.proc.pid, signal.SIGCONT)
    assert "while-the-hub-was-away" in channels_logged(world, "alice")
    assert "session present: True" in hub.output()


# ---------------------------------------------------------------------------- defect 12


def test_a_second_hub_refuses_to_start_and_the_first_keeps_its_session(world: World) -> None:
    """Issue 11 defect 12: a second hub on the same broker and prefix took the first one's
    session (the same client id), and the two kicked each other out ~10 times a second. Now it
    reads the retained ``presence/hub/status`` first and refuses with one line."""
    watcher = world.watcher()
    first = world.hub("a").start()
    wait_for(lambda: watcher.last(HUB_STATUS) == b"online", what="hub online")
    (world.tmp_path / "hub-b").mkdir()
    second = subprocess.run([sys.executable, "-m", "hub.cli", *world.hub_args("b")],
                            cwd=world.tmp_path / "hub-b", capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 1, second.stdout + second.stderr
    errors = [line for line in second.stderr.splitlines() if line.startswith("presence-hub: ")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
    assert errors[0].startswith(
        f"presence-hub: another presence hub is active on the MQTT broker {world.broker.url} "
        "with prefix 'presence'"), errors[0]
    assert "presence hub running" not in second.stdout
    # the first hub never lost its session, and still hears
    world.live("bob", "phone")
    watcher.wait_device("bob", "phone", "online")
    assert first.output().count("hub connected to") == 1
    assert watcher.got(HUB_STATUS) == [b"online"]
    assert "closing old connection" not in world.broker.log_text()


def test_two_hubs_on_one_session_stop_fighting_and_the_survivor_hears(world: World) -> None:
    """If two hubs do end up on one session (here: the first one's status was cleared by hand
    while it ran), each sees its connection closed right after the broker accepted it. Each
    logs one clear error and backs off strongly instead of taking the session back at once;
    once the other one is stopped, the survivor hears again (it used to stay deaf)."""
    watcher = world.watcher()
    first = world.hub("a").start()
    wait_for(lambda: watcher.last(HUB_STATUS) == b"online", what="hub online")
    world.client().connect().publish(HUB_STATUS, b"offline", retain=True)
    second = world.hub("b").start()
    hubs = (first, second)
    fight = "take the session from each other"
    wait_for(lambda: any(fight in h.output() for h in hubs), timeout=20,
             what="a hub noticing the fight")
    assert second.stop() == 0
    wait_for(lambda: watcher.last(HUB_STATUS) == b"online", timeout=30,
             what="the first hub back online")
    world.live("carol", "tablet")
    watcher.wait_device("carol", "tablet", "online", timeout=30)
    assert "carol" in ask(world, "carol", "/presence")["text"]
    for hub in hubs:
        out = hub.output()
        # one line per connection of the hub at most (its main session and its live one)
        for client_id in ("'presence-hub'", "'presence-hub/live'"):
            assert out.count(f"client id {client_id} (a second hub") <= 1, out
        after = out.split(fight, 1)[1] if fight in out else ""
        delays = [float(d) for d in re.findall(
            r"closed the hub's connection again .*retrying in ([0-9.]+) s", after)]
        assert all(d >= FIGHT_MIN_S / 2 for d in delays), delays


async def test_a_hub_that_could_not_check_at_start_waits_while_another_is_active(
    mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hub that starts while the broker is down cannot ask at once whether another hub is
    active; it starts anyway and asks before its first connection. While the answer is
    ``online`` it waits instead of taking the session over, and connects once it is not.
    In this process, so the start-up wait can be short and the log read."""
    caplog.set_level(logging.INFO, logger="hub.mqtt")

    def set_status(status: bytes) -> None:
        other = MqttClient(mosquitto.host, mosquitto.port).connect()
        other.publish(HUB_STATUS, status, retain=True)
        other.disconnect()

    await asyncio.to_thread(set_status, b"online")  # as an active hub leaves it
    await asyncio.to_thread(mosquitto.stop)  # saved, and restored at the next start
    monkeypatch.setattr(external, "START_WAIT_S", 0.5)
    presence = create_presence_service(broker=mosquitto.url, storage="memory")
    async with presence:
        assert "cannot ask the MQTT broker" in caplog.text
        await asyncio.to_thread(mosquitto.start)
        await async_wait_for(lambda: "this hub waits and asks again" in caplog.text,
                             timeout=10, what="the hub waiting for the other one")
        assert " as presence-hub (" not in mosquitto.log_text()  # never took the session
        await asyncio.to_thread(set_status, b"offline")  # the other hub's will
        await async_wait_for(lambda: "hub connected to" in caplog.text, timeout=30,
                             what="the hub connecting once the other one is gone")
    assert " as presence-hub (" in mosquitto.log_text()
