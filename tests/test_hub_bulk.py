"""The hub with thousands of users at once, on a real Mosquitto: restart and timeout storm.

What is checked is correctness at a size where the hub works in slices (the republish at start
in slices of REPUBLISH_SLICE users, a mass expiry in slices of TICK_SLICE devices): every user
ends up with the right retained state, nobody is forgotten at a slice boundary, and the hub
keeps serving a live device while it works. How fast is for ``make bench``, not for tests.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from hub import create_presence_service
from hub.app import service as hub_service
from hub.core.models import DeviceRecord, UserRecord
from hub.mqtt import hub as hub_mqtt
from hub.stores.tinydb import TinyDBStore
from tests.support.mqtt_clients import SimDevice, Watcher
from tests.support.procs import MosquittoProcess
from tests.support.wait import async_wait_for

USERS = 3 * hub_mqtt.REPUBLISH_SLICE + 7  # several slices and a ragged end
assert 2 * USERS > 2 * hub_service.TICK_SLICE


async def _write_store(path: Path, users: int) -> None:
    now = int(time.time() * 1000)
    records = [
        UserRecord(id=f"u{k}", name=f"u{k}", status="online", active_device="d0", version=1,
                   devices=[DeviceRecord(id=f"d{j}", name=f"d{j}", session=f"s{k}x{j}",
                                         connected=True, status="online", last_seen=now,
                                         last_interaction=now) for j in range(2)])
        for k in range(users)]
    store = TinyDBStore(path)
    await store.open()
    await store.save_users(records)
    await store.close()


def _count(watcher: Watcher, kind: str, value: bytes | None = None) -> int:
    with watcher._lock:  # the network thread adds to it
        view = dict(watcher.retained_view)
    return sum(1 for topic, payload in view.items()
               if topic.startswith("presence/users/u") and topic.endswith(f"/{kind}")
               and (value is None or payload == value))


async def test_restart_republishes_everyone_then_the_storm_takes_everyone_offline(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    db = tmp_path / "presence.json"
    await _write_store(db, USERS)
    watcher = await asyncio.to_thread(lambda: Watcher(mosquitto.host, mosquitto.port).start())
    live = None
    try:
        # heartbeat 1 s: the loaded devices get one timeout (2.5 s) of grace, then all expire
        service = create_presence_service(storage="tinydb", db_path=str(db), broker=mosquitto.url,
                                          heartbeat_interval_ms=1000, device_rate=None)
        async with service:
            await async_wait_for(lambda: _count(watcher, "state") == USERS, timeout=20,
                                 what=f"the retained state of all {USERS} users")
            assert _count(watcher, "status", b"online") == USERS
            # a device that stays alive through the storm, on its own user
            live = await asyncio.to_thread(
                lambda: SimDevice(mosquitto.host, mosquitto.port, "alive", "phone").online())
            live.start_heartbeats(0.3, idle_ms=0)
            await async_wait_for(lambda: watcher.status("alive") == "online", what="alive online")
            await async_wait_for(lambda: _count(watcher, "status", b"offline") == USERS,
                                 timeout=30, what=f"all {USERS} loaded users offline")
            assert watcher.status("alive") == "online"
            state = watcher.state(f"u{USERS - 1}")
            assert state is not None and [d["status"] for d in state["devices"]] == ["offline"] * 2
            assert service.engine.counters["device_timeout"] == 2 * USERS
    finally:
        if live is not None:
            live.close()
        watcher.close()
