"""Presence truth end to end, on both brokers: long-interval, sleeping and idle-reporting
devices, a hub restart that flips nobody, and a request the hub cannot parse answered anyway.

The hub is a real process with the short timers of tests/test_hub_mqtt.py (heartbeat 0.5 s, so
its own timeout is 1.25 s; away 2 s; offline 4 s); devices speak the protocol by hand.
"""

from __future__ import annotations

import json
import time

import pytest

from hub.protocol import ActivityPayload, ConnPayload
from tests.support.mqtt_clients import MqttClient, SimDevice
from tests.support.wait import wait_for
from tests.test_hub_mqtt import HB, World, world  # noqa: F401 - the fixture, both brokers

pytestmark = pytest.mark.slow


def _birth(d: SimDevice, **fields: object) -> None:
    """Connect with a new session and publish a birth with ``fields`` (heartbeatMs, idleMs)."""
    d.online(**fields)


def changes(w: World, user: str) -> list[tuple[str, str]]:
    out = []
    for raw in w.watcher.got(f"presence/events/{user}"):
        ev = json.loads(raw)
        if ev["event"] == "statusChange":
            out.append((ev["old"], ev["new"]))
    return out


def test_a_long_interval_device_is_timed_out_on_its_own_interval(world: World) -> None:  # noqa: F811
    w = world
    d = w.device("meter", "m1")
    _birth(d, heartbeat_ms=int(HB * 1000 * 4))  # its timeout: 5 s, the hub's own is 1.25 s
    d.heartbeat(idle_ms=0)
    w.watcher.wait_status("meter", "online")
    # a probe born after the meter and silent since: once the hub times it out, the hub's
    # own timeout has passed for the meter too, which must still be connected (online, or
    # away if a loaded machine let its 2 s idle clock run out first: a true change)
    probe = w.device("zz", "probe")
    probe.online()
    probe.heartbeat(idle_ms=0)
    w.watcher.wait_status("zz", "offline", timeout=10)
    assert w.watcher.status("meter") in ("online", "away")
    w.watcher.wait_status("meter", "offline", timeout=15)  # silent past 2.5 x its interval
    # (its idle clock turns it away after 2 s on the way: a true change, not a timeout)
    assert changes(w, "meter") == [("offline", "online"), ("online", "away"), ("away", "offline")]


def test_a_sleeping_device_is_not_lost_while_it_sleeps_and_wakes_without_a_flap(
    world: World,  # noqa: F811
) -> None:
    w = world
    d = w.device("carol", "badge")
    _birth(d)
    d.heartbeat(idle_ms=0)
    w.watcher.wait_status("carol", "online")
    sleep = ConnPayload(state="sleeping", session=d.session, sleep_ms=3_000,
                        ts=int(time.time() * 1000))
    d.publish(d.topic("conn"), sleep.to_json(), qos=1, retain=True)
    wait_for(lambda: (w.watcher.state("carol") or {}).get("devices", [{}])[0].get("sleeping"),
             what="the state to show the badge sleeping")
    d.disconnect()  # clean: no will
    state = w.watcher.state("carol")
    assert state is not None and state["devices"][0]["wakeAt"] is not None
    d.close()
    woken = w.device("carol", "badge", client_id="badge-woken")
    _birth(woken)  # a new session ends the sleep
    woken.heartbeat(idle_ms=0)
    wait_for(lambda: (w.watcher.state("carol") or {}).get("devices", [{}])[0].get("sleeping")
             is False, what="the badge awake again")
    assert changes(w, "carol") == [("offline", "online")]


def test_reconnecting_with_a_long_idle_time_does_not_bring_the_user_online(
    world: World,  # noqa: F811
) -> None:
    w = world
    d = w.device("dave", "phone")
    _birth(d, idle_ms=3 * 3_600_000)  # a pocketed phone: its user idle for hours
    wait_for(lambda: w.watcher.state("dave") is not None, what="dave's state")
    assert w.watcher.status("dave") == "offline"


def test_a_request_the_hub_cannot_parse_is_answered(world: World) -> None:  # noqa: F811
    w = world
    c = MqttClient(w.host, w.port)
    c.connect()
    try:
        c.subscribe("presence/replies/erin/cli")
        c.publish("presence/devices/erin/cli/req", b'{"id":"r-bad","command":""}', qos=1)
        reply = wait_for(lambda: c.last("presence/replies/erin/cli"), what="an error reply")
        body = json.loads(reply)
        assert (body["id"], body["ok"]) == ("r-bad", False) and "bad request" in body["text"]
    finally:
        c.close()


def test_removing_a_device_clears_its_retained_birth(world: World) -> None:  # noqa: F811
    """Otherwise the next subscriber (the hub itself after a restart) gets the birth again and
    the removed device comes back."""
    w = world
    d = w.device("fred", "old-phone")
    d.online()
    d.heartbeat(idle_ms=0)
    w.watcher.wait_status("fred", "online")
    d.clean_offline()
    conn = "presence/devices/fred/old-phone/conn"
    c = MqttClient(w.host, w.port)
    c.connect()
    try:
        c.subscribe("presence/replies/fred/cli")
        req = b'{"id":"r-rm","command":"/presence devices remove old-phone"}'
        c.publish("presence/devices/fred/cli/req", req, qos=1)
        reply = json.loads(wait_for(lambda: c.last("presence/replies/fred/cli"), what="reply"))
        assert reply["ok"], reply
        wait_for(lambda: w.watcher.last(conn) == b"", what="the retained birth cleared")
    finally:
        c.close()
    fresh = MqttClient(w.host, w.port)
    fresh.connect()
    try:
        fresh.subscribe("presence/users/fred/state")
        wait_for(lambda: fresh.last("presence/users/fred/state"), what="fred's retained state")
        fresh.subscribe(conn)  # nothing retained there any more: only the state came
        assert fresh.last(conn) in (None, b"")
    finally:
        fresh.close()


def test_activity_replayed_late_does_not_move_the_primary(world: World) -> None:  # noqa: F811
    w = world
    laptop, phone = w.device("gina", "laptop"), w.device("gina", "phone")
    laptop.online()
    phone.online()
    laptop.heartbeat(idle_ms=0)
    phone.heartbeat(idle_ms=0)
    laptop.activity("chat")
    wait_for(lambda: (w.watcher.state("gina") or {}).get("activeDevice") == "laptop",
             what="the laptop primary")
    old = ActivityPayload(type="message", channel_id="chat",
                          timestamp=int(time.time() * 1000) - 2 * 3_600_000)
    phone.publish(phone.topic("activity"), old.to_json(), qos=1)  # from its outbox, 2 h late
    phone.set(customStatus="marker")  # same connection, so handled after the replay
    wait_for(lambda: (w.watcher.state("gina") or {}).get("customStatus") == "marker",
             what="the marker")
    assert (w.watcher.state("gina") or {})["activeDevice"] == "laptop"
