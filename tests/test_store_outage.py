"""Never deaf during a store outage (issue 11, defect 6): liveness runs in memory, only what
needs durability waits, and the log says it once.

A real redis-server is frozen with SIGSTOP (it accepts connections and answers nothing, as a
stalled Redis does) under a running hub on the embedded broker; a TinyDB hub writes to a file
that fails like a full disk.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from hub import create_presence_service, run_command
from hub.protocol import ConnPayload, new_session_id
from tests.support.procs import RedisProcess, free_port
from tests.support.wait import async_wait_for
from tests.test_store_faults import frozen

pytestmark = pytest.mark.slow


def birth(user: str, device: str) -> list[tuple[str, bytes]]:
    payload = ConnPayload(state="online", session=new_session_id(), ts=1).to_json()
    return [(f"presence/devices/{user}/{device}/conn", payload)]


async def test_a_stalled_redis_stops_no_timer_and_no_ingest(
    own_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    presence = create_presence_service(
        storage="redis", redis_url=own_redis.url, heartbeat_interval_ms=200,
        away_after_ms=60_000, offline_after_ms=120_000, broker="embedded",
        listen=f"127.0.0.1:{free_port()}")
    async with presence:
        presence.ingest(birth("alice", "phone"))
        assert (await presence.get_status("alice")).status == "online"
        with frozen(own_redis):
            presence.ingest(birth("carol", "pi"))
            presence.request_flush()  # a flush now hangs on the frozen server
            # the device falls silent: its timeout (500 ms) runs although no flush can finish
            await async_wait_for(
                lambda: _status(presence, "alice") == "offline", 5, "alice timed out")
            presence.ingest(birth("bob", "laptop"))  # and the hub still hears new devices
            assert (await presence.get_status("bob")).status == "online"
            answer = await run_command(presence, "bob", "/presence dnd")
            assert not answer.ok and "not saved yet" in answer.text
        await async_wait_for(lambda: presence.durable(within=5), 15, "the store to be back")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(r.exc_info is None for r in errors), "a store outage logs lines, not tracebacks"


def _status(presence: object, user: str) -> str:
    return presence.engine.get_status(user).status  # type: ignore[attr-defined,no-any-return]


async def test_a_full_disk_is_logged_once_and_nothing_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "presence.json"
    presence = create_presence_service(storage="tinydb", db_path=str(db), flush_interval_ms=50)
    real_replace = os.replace

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with presence:
        monkeypatch.setattr(os, "replace", full)
        await presence.set_custom_status("alice", "written later")
        assert not await presence.durable(within=1.0)  # about 20 failed flushes
        monkeypatch.setattr(os, "replace", real_replace)
        assert await presence.durable(within=10)
    lines = [r.getMessage() for r in caplog.records if "disk is full" in r.getMessage()]
    assert len(lines) == 1, lines
    assert any("work again" in r.getMessage() for r in caplog.records)
    again = create_presence_service(storage="tinydb", db_path=str(db))
    async with again:
        assert (await again.get_status("alice")).custom_status == "written later"
