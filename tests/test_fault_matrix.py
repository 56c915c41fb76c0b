"""The fault matrix, as an operator would run it: real processes killed, stopped and restarted.

The cases other modules do not already hold (their tests are part of ``make faults`` too):

* the hub SIGKILLed under a stream of acknowledged activity, with Redis, on both brokers:
  nothing acknowledged is lost;
* Redis killed and restarted under a running hub: the hub keeps hearing and timing, and what
  was applied meanwhile reaches Redis once it is back;
* 500 of 2,000 devices killed at once: those 500 users go offline, no other user changes;
* a device agent process stopped (SIGSTOP) and continued (SIGCONT): offline by timeout, then
  back on its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bench import wire
from hub import create_presence_service
from hub.protocol import ActivityPayload, ConnPayload
from hub.stores.redis import RedisStore
from tests.support.hub_process import HubProcess
from tests.support.mqtt_clients import Watcher
from tests.support.procs import MosquittoProcess, RedisProcess, free_port
from tests.support.wait import async_wait_for, wait_for

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"


def _hub(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
         extra: list[str]) -> tuple[HubProcess, int]:
    if kind == "embedded":
        port = free_port()
        args = ["--broker", "embedded", "--listen", f"{HOST}:{port}", *extra]
    else:
        mosq: MosquittoProcess = request.getfixturevalue("mosquitto")
        port = mosq.port
        args = ["--broker", f"mqtt://{HOST}:{port}", *extra]
    return HubProcess(args, tmp_path).start(), port


# ------------------------------------------------------------------------------------------
# hub SIGKILL under acknowledged activity, Redis store


@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
async def test_hub_sigkill_under_activity_loses_nothing_acknowledged_with_redis(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, own_redis: RedisProcess
) -> None:
    namespace = f"fm-{kind}"
    hub, port = _hub(kind, request, tmp_path, ["--storage", "redis", "--redis-url", own_redis.url,
                                               "--prefix", "presence"])
    acked: list[int] = []
    lock = threading.Lock()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fm-publisher", clean_session=True)

    def on_publish(_c: object, _u: object, mid: int, *_rest: object) -> None:
        with lock:
            acked.append(mid)

    c.on_publish = on_publish
    c.connect(HOST, port, keepalive=30)
    c.loop_start()
    topic = "presence/devices/alice/pc/activity"
    mids: dict[int, int] = {}
    try:
        for n in range(60):
            body = ActivityPayload(type="message", data={"n": n}).to_json()
            info = c.publish(topic, body, qos=1)
            mids[info.mid] = n
        wait_for(lambda: len(acked) >= 30, 10, "half of the activity acknowledged")
        hub.kill()  # SIGKILL right in the stream
        with lock:
            sure = {mids[m] for m in acked}
    finally:
        c.loop_stop()
        c.disconnect()
    hub.start()
    store = RedisStore(own_redis.url, namespace="presence")
    await store.open()
    try:
        async def stored() -> set[int]:
            entries = await store.get_activity("alice", limit=1000)
            return {int((e.data or {})["n"]) for e in entries}

        await async_wait_for(lambda: _superset(stored, sure), 20,
                             f"every acknowledged entry in Redis ({namespace})")
    finally:
        await store.close()
        hub.close()


async def _superset(stored: object, sure: set[int]) -> bool:
    got = await stored()  # type: ignore[operator]
    return bool(got >= sure)


# ------------------------------------------------------------------------------------------
# Redis killed and restarted under a running hub


async def test_redis_killed_and_restarted_under_a_running_hub(own_redis: RedisProcess) -> None:
    presence = create_presence_service(
        storage="redis", redis_url=own_redis.url, heartbeat_interval_ms=200,
        away_after_ms=60_000, offline_after_ms=120_000, flush_interval_ms=100)
    async with presence:
        born = ConnPayload(state="online", session="s1", ts=1).to_json()
        presence.ingest([("presence/devices/alice/phone/conn", born)])
        assert await presence.durable(within=5)
        own_redis.kill()
        await presence.set_custom_status("alice", "written after the outage")
        await presence.record_activity("bob", {"type": "message", "channel_id": "c1"})
        # the phone falls silent: its timeout runs while Redis is gone
        await async_wait_for(lambda: presence.engine.get_status("alice").status == "offline",
                             5, "alice timed out during the outage")
        own_redis.restart()  # the same port, empty (no persistence): the hub writes it again
        assert await presence.durable(within=20)
    store = RedisStore(own_redis.url, namespace="presence")
    await store.open()
    try:
        (rec,) = [r for r in await store.load_users() if r.id == "alice"]
        assert rec.custom_status == "written after the outage"
        assert rec.status == "offline"
        assert [a.channel_id for a in await store.get_activity("bob")] == ["c1"]
    finally:
        await store.close()


# ------------------------------------------------------------------------------------------
# 500 of 2,000 devices killed at once


@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
def test_a_quarter_of_the_fleet_dies_at_once_and_only_they_go_offline(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    hub, port = _hub(kind, request, tmp_path, ["--storage", "memory",
                                               "--heartbeat-interval", "60s"])
    watcher = Watcher(HOST, port).start()
    socks = []
    try:
        for i in range(2000):
            user, base = f"u{i}", f"presence/devices/u{i}/d"
            will = (f"{base}/conn", ConnPayload(state="offline", session=f"s{i}",
                                                reason="lost").to_json(), 1, True)
            sock = wire.connect_blocking(HOST, port, f"fm-{i}", will=will)
            birth = ConnPayload(state="online", session=f"s{i}", ts=1).to_json()
            sock.sendall(wire.publish_packet(f"{base}/conn", birth, qos=0, retain=True))
            socks.append((user, sock))
        wait_for(lambda: all(watcher.status(u) == "online" for u, _ in socks), 60,
                 "2,000 users online")
        def changes(user: str) -> int:
            return sum(json.loads(p)["event"] == "statusChange"
                       for p in watcher.got(f"presence/events/{user}"))

        before = {u: changes(u) for u, _ in socks}
        for _, sock in socks[:500]:
            wire.kill(sock)
        wait_for(lambda: all(watcher.status(u) == "offline" for u, _ in socks[:500]), 30,
                 "the 500 dead users offline")
        changed = {u for u, _ in socks if changes(u) != before[u]}
        assert changed == {u for u, _ in socks[:500]}
        assert all(watcher.status(u) == "online" for u, _ in socks[500:])
    finally:
        for _, sock in socks[500:]:
            sock.close()
        watcher.close()
        hub.close()


# ------------------------------------------------------------------------------------------
# a device agent stopped and continued


@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
def test_a_stopped_agent_times_out_and_comes_back_when_continued(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    hub, port = _hub(kind, request, tmp_path, ["--storage", "memory",
                                               "--heartbeat-interval", "500ms"])
    watcher = Watcher(HOST, port).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    env.update(PRESENCE_STATE_FILE=str(tmp_path / "state.json"),
               PRESENCE_OUTBOX=str(tmp_path / "outbox.db"), PYTHONUNBUFFERED="1")
    agent = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "--broker", f"mqtt://{HOST}:{port}",
         "--user", "alice", "--device", "pi", "--heartbeat-interval", "500ms"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        watcher.wait_status("alice", "online", timeout=15)
        agent.send_signal(signal.SIGSTOP)
        watcher.wait_status("alice", "offline", timeout=10)  # timeout (1.25 s) or keepalive
        agent.send_signal(signal.SIGCONT)
        watcher.wait_status("alice", "online", timeout=30)
    finally:
        agent.send_signal(signal.SIGCONT)
        agent.terminate()
        agent.wait(10)
        watcher.close()
        hub.close()
