"""Removing a user (``presence forget --yes``, ``/presence forget --yes``,
``presence.remove_user``): its devices, state, retained topics, Home Assistant configs and
activity go; a tombstone keeps its version, so a user of the same id that comes back later
continues above it (a version never goes back), across restarts too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from device_agent import AgentConfig
from device_agent.command import ask_hub
from hub import create_presence_service
from hub.core.clock import FakeClock
from hub.core.engine import Engine, EngineConfig, EngineError
from hub.core.events import Birth, DeviceRemoved, RemoveUser, UserRemoved
from hub.mqtt.homeassistant import KINDS, Discovery
from hub.protocol import Topics
from hub.stores.tinydb import TinyDBStore
from hub.web.live import Stream
from tests.support.hub_process import HubProcess
from tests.support.mqtt_clients import SimDevice, Watcher
from tests.support.procs import free_port
from tests.support.wait import wait_for

T0 = 1_000_000


def test_the_engine_forgets_the_user_and_keeps_its_version() -> None:
    engine = Engine(EngineConfig())
    engine.handle(Birth("alice", "laptop", "s1", None), T0)
    engine.handle(Birth("alice", "phone", "s2", None), T0)
    version = engine.snapshot("alice").version  # type: ignore[union-attr]
    effects = engine.handle(RemoveUser("alice"), T0 + 1)
    assert {e for e in effects if isinstance(e, DeviceRemoved)} == {
        DeviceRemoved("alice", "laptop"), DeviceRemoved("alice", "phone")}
    assert UserRemoved("alice") in effects
    assert not engine.has_user("alice")
    assert engine.get_online_users(None, T0 + 1, None, None) == []
    [tombstone] = engine.take_dirty()
    assert tombstone.removed and tombstone.version >= version and not tombstone.devices
    with pytest.raises(EngineError, match="unknown user"):
        engine.handle(RemoveUser("alice"), T0 + 2)
    # back again: a new user, whose versions continue above every one published before
    engine.handle(Birth("alice", "laptop", "s3", None), T0 + 3)
    assert engine.snapshot("alice").version > tombstone.version  # type: ignore[union-attr]
    # after a restart, from the stored tombstone
    fresh = Engine(EngineConfig())
    fresh.load([tombstone], T0 + 4)
    assert not fresh.has_user("alice")
    fresh.handle(Birth("alice", "laptop", "s4", None), T0 + 5)
    assert fresh.snapshot("alice").version > tombstone.version  # type: ignore[union-attr]


async def test_the_store_forgets_the_activity_and_keeps_the_tombstone(tmp_path: Path) -> None:
    db = tmp_path / "presence.json"
    clock = FakeClock(T0)
    async with create_presence_service(storage="tinydb", db_path=str(db), clock=clock) as p:
        await p.record_activity("bob", {"type": "message", "channel_id": "c1"})
        await p.set_custom_status("bob", "Gone fishing")
        await p.flush()
        assert await p.get_activity("bob")
        await p.remove_user("bob")
        await p.flush()
        assert await p.get_activity("bob") == []
    store = TinyDBStore(db)
    await store.open()
    try:
        [record] = await store.load_users()
        assert record.id == "bob" and record.removed and record.custom_status is None
        assert await store.get_activity("bob") == []
    finally:
        await store.close()
    async with create_presence_service(storage="tinydb", db_path=str(db), clock=clock) as p:
        assert [u.user_id for u in await p.get_online_users()] == []
        assert (await p.get_status("bob")).custom_status is None


def test_a_dashboard_drops_a_removed_user_and_takes_a_new_one_after() -> None:
    from hub.protocol import UserStatePayload

    stream = Stream()
    state = UserStatePayload(user_id="carol", name="carol", status="online", version=3)
    stream.state(state)
    stream.gone("carol")  # the state queued before the removal is not sent
    assert stream.take() == b'event: gone\ndata: {"userId": "carol"}\n\n'
    stream.gone("carol")
    stream.state(state)  # back again: gone first, then the new user
    out = stream.take()
    assert out.index(b"event: gone") < out.index(b"event: user")


@pytest.mark.slow
def test_presence_forget_clears_every_retained_topic_of_the_user(tmp_path: Path) -> None:
    port = free_port()
    hub = HubProcess(["--broker", "embedded", "--listen", f"127.0.0.1:{port}", "--storage",
                      "tinydb", "--db", str(tmp_path / "presence.json"), "--homeassistant"],
                     tmp_path)
    watcher = Watcher("127.0.0.1", port)
    device = SimDevice("127.0.0.1", port, "dave", "phone")
    config = AgentConfig.from_values(broker=f"127.0.0.1:{port}", user="dave", device="cli",
                                     state_file="", outbox=os.devnull)
    discovery = Discovery(Topics("presence"), origin={"name": "mqtt-presence"})
    try:
        hub.start()
        watcher.start()
        watcher.subscribe("homeassistant/#")
        device.online()
        watcher.wait_status("dave", "online")
        assert ask_hub(config, '/presence status "Back soon"', 8.0).ok
        wait_for(lambda: all(watcher.last(discovery.config_topic("dave", k)) for k in KINDS),
                 10, "dave's Home Assistant configs")
        device.clean_offline()  # the agent stopped first, as the command asks
        watcher.wait_status("dave", "offline")
        refused = ask_hub(config, "/presence forget", 8.0)  # no undo: only with --yes
        assert not refused.ok and "usage: /presence forget --yes" in refused.text
        reply = ask_hub(config, "/presence forget --yes", 8.0)
        assert reply.ok, reply.text
        topics = Topics("presence")
        gone = [topics.user("dave", k) for k in ("state", "status", "custom", "primary")]
        gone += [topics.device("dave", "phone", "conn")]
        gone += [discovery.config_topic("dave", k) for k in KINDS]
        wait_for(lambda: all(watcher.last(t) == b"" for t in gone), 10,
                 "every retained topic of dave cleared")
        users = ask_hub(config, "/presence users", 8.0)
        assert "dave" not in [u["userId"] for u in users.data["users"]]
        hub.stop()
        hub.start()  # the tombstone is no user: nothing of dave comes back
        assert "dave" not in [u["userId"] for u in ask_hub(config, "/presence users",
                                                             8.0).data["users"]]
    finally:
        device.close()
        watcher.close()
        hub.close()
