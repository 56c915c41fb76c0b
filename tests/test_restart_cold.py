"""A restart from TinyDB loads connected users from their stored text and builds them later.

The engine side is checked against a plain load in tests/test_engine_cold.py; here the
service on a real TinyDB file: what is known right after ``start`` (who, versions, custom
statuses, the digest a warm restart compares), that the first heartbeat after the restart
meets a user built on the spot, that the background pass builds the rest and says so, that
the grace ends for devices nobody heard, and that a stop leaves users not built yet exactly
as they were in the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hub import PresenceService, create_presence_service
from hub.core.clock import FakeClock
from hub.core.models import UserText
from hub.web.metrics import StatusCounts
from tests.support.wait import async_wait_for

SEC = 1000
BIRTH = b'{"state":"online","session":"%s"}'


def make(clock: FakeClock, db: Path) -> PresenceService:
    return create_presence_service(
        heartbeat_interval_ms=1 * SEC, away_after_ms=60 * SEC, offline_after_ms=120 * SEC,
        storage="tinydb", db_path=str(db), clock=clock,
    )


async def fill(clock: FakeClock, db: Path) -> None:
    """alice (phone, laptop) and bob (phone) connected, carol's phone gone (all three load
    cold), dave active through the API only (a virtual device: built at load)."""
    async with make(clock, db) as p:
        p.ingest([
            ("presence/devices/alice/phone/conn", BIRTH % b"a1"),
            ("presence/devices/alice/laptop/conn", BIRTH % b"a2"),
            ("presence/devices/bob/phone/conn", BIRTH % b"b1"),
            ("presence/devices/carol/phone/conn", BIRTH % b"c1"),
            ("presence/devices/carol/phone/conn", b'{"state":"offline","session":"c1"}'),
        ])
        clock.advance(2 * SEC)  # carol's offline takes effect after the will grace
        p.ingest([("presence/devices/alice/phone/heartbeat", b'{"session":"a1"}'),
                  ("presence/devices/alice/laptop/heartbeat", b'{"session":"a2"}'),
                  ("presence/devices/bob/phone/heartbeat", b'{"session":"b1"}')])
        await p.tick()
        await p.set_custom_status("bob", "On call")
        await p.record_activity("dave", {"type": "message", "channel_id": "general"})


async def test_connected_users_load_cold_and_answer_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "presence.json"
    clock = FakeClock()
    await fill(clock, db)
    before = db.read_bytes()
    caplog.set_level(logging.INFO)
    p = make(clock, db)
    await p.start()
    try:
        engine = p.engine
        # start returns once loaded; the background pass has not had a turn yet
        assert engine.cold_users == 3  # alice, bob and carol; dave (virtual device) was built
        assert "3 to be built from their stored text in the background" in caplog.text
        # what is known without building anyone
        assert [u.user_id for u in await p.get_online_users()] == ["alice", "bob", "dave"]
        assert engine.device_count() == 5
        assert engine.cold_users == 3
        # /metrics counts by status without building anyone (the engine's statuses())
        assert [engine.statuses(u) for u in ("alice", "carol")] == [
            ("online", ["online", "online"]), ("offline", ["offline"])]
        assert engine.cold_users == 3
        # a query builds the one user it asks for
        s = await p.get_status("bob")
        assert (s.status, s.custom_status, s.active_device) == ("online", "On call", "phone")
        assert engine.cold_users == 2
        assert (await p.get_status("carol")).status == "offline"
        assert engine.cold_users == 1
        # the rest are built in the background, and the log says so
        await async_wait_for(lambda: engine.cold_users == 0, timeout=5, what="background build")
        await async_wait_for(lambda: "built the 3 users loaded from their stored text"
                             in caplog.text, timeout=5, what="the log line")
        counts = await StatusCounts(engine).get()  # the same, every user built
        assert {k: v for k, v in counts.users.items() if v} == {"online": 3, "offline": 1}
        assert {k: v for k, v in counts.devices.items() if v} == {"online": 4, "offline": 1}
    finally:
        await p.stop()
    # nothing changed, nothing written: the users are in the file as they were
    assert db.read_bytes() == before


async def test_a_heartbeat_after_the_restart_meets_a_built_user_and_the_grace_ends(
        tmp_path: Path) -> None:
    db = tmp_path / "presence.json"
    clock = FakeClock()
    await fill(clock, db)
    clock.advance(10 * SEC)  # down for a while: the grace counts from the restart
    p = make(clock, db)
    await p.start()
    try:
        # the first heartbeat of alice's phone, before the background pass built her
        assert p.engine.cold_users == 3
        p.ingest([("presence/devices/alice/phone/heartbeat", b'{"session":"a1"}')])
        assert p.engine.counters["implicit_birth"] == 0  # her session was known, not reborn
        clock.advance(2 * SEC)
        await p.tick()
        assert (await p.get_status("alice")).status == "online"
        # nobody heard alice's laptop or bob's phone: their grace (2.5 s) ends
        clock.advance(1 * SEC)
        await p.tick()
        devices = {d.id: d.status for d in await p.get_devices("alice")}
        assert devices == {"phone": "offline", "laptop": "offline"}  # phone: silent 3 s too
        assert (await p.get_status("bob")).status == "offline"
    finally:
        await p.stop()


async def test_the_digest_of_a_cold_load_is_the_plain_loads(tmp_path: Path) -> None:
    """A warm restart compares the loaded (user, version) digest with the broker's: cold
    users count in it as they are, before any is built."""
    db = tmp_path / "presence.json"
    clock = FakeClock()
    await fill(clock, db)
    p = make(clock, db)
    await p.start()
    try:
        cold = (p.engine.loaded_users, p.engine.loaded_digest)
        assert p.engine.cold_users == 3
    finally:
        await p.stop()
    from hub.core.engine import Engine, EngineConfig
    from hub.stores.tinydb import TinyDBStore

    store = TinyDBStore(db)
    await store.open()
    try:
        plain = Engine(EngineConfig())
        plain.load(await store.load_users(), clock.now())
    finally:
        await store.close()
    assert cold == (plain.loaded_users, plain.loaded_digest)


def test_a_text_that_turns_out_unreadable_is_dropped_when_built(
        caplog: pytest.LogCaptureFixture) -> None:
    """The quick read checks every field, so this takes a text made by hand; the engine
    drops the user as a plain load skips a bad record, and one of the same id that comes
    back continues above its versions."""
    from hub.core.engine import Engine, EngineConfig
    from hub.core.events import Birth

    engine = Engine(EngineConfig())
    bogus = UserText(b'{"schema":1}', "ghost", "ghost", "online", None, "phone", 7, 9, 1,
                     None, True)
    assert list(engine.load([bogus], 1_000)) == []
    assert engine.has_user("ghost") and engine.cold_users == 1
    caplog.set_level(logging.WARNING)
    assert engine.get_status("ghost").status == "offline"  # built: unreadable, dropped
    assert "skipping unreadable user 'ghost'" in caplog.text
    assert not engine.has_user("ghost") and engine.cold_users == 0
    effects = engine.handle(Birth("ghost", "phone", "s1", None), 2_000)
    versions = [e.state.version for e in effects if hasattr(e, "state")]
    assert versions and versions[0] > 9
