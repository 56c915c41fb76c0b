"""The presence API in-process (no broker): the seed's TypeScript API, in Python's style."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from hub import PresenceError, PresenceService, create_presence_service, handle_command
from hub.core.clock import FakeClock
from tests.support.wait import async_wait_for

SEC = 1000


def make(clock: FakeClock, **kw: object) -> PresenceService:
    opts: dict[str, object] = dict(
        heartbeat_interval_ms=1 * SEC, away_after_ms=5 * SEC, offline_after_ms=20 * SEC,
        storage="memory", clock=clock,
    )
    opts.update(kw)
    return create_presence_service(**opts)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_unknown_user_is_offline(clock: FakeClock) -> None:
    async with make(clock) as p:
        s = await p.get_status("nobody")
        assert (s.status, s.custom_status, s.last_seen, s.active_device) == ("offline", None, None, None)


async def test_activity_without_device_is_a_virtual_device_named_after_its_channel(
    clock: FakeClock,
) -> None:
    async with make(clock) as p:
        await p.record_activity("user-1", {"type": "message", "channel_id": "telegram-123",
                                           "timestamp": clock.now()})
        s = await p.get_status("user-1")
        assert s.status == "online" and s.active_device == "telegram-123"
        [d] = await p.get_devices("user-1")
        assert (d.id, d.status, d.is_active, d.virtual) == ("telegram-123", "online", True, True)


async def test_camel_case_activity_keys_work_too(clock: FakeClock) -> None:
    async with make(clock) as p:
        await p.record_activity("u", {"type": "message", "channelId": "slack-9"})
        assert (await p.get_status("u")).active_device == "slack-9"


async def test_idle_timers_apply_to_virtual_devices(clock: FakeClock) -> None:
    async with make(clock) as p:
        await p.record_activity("u", {"type": "message", "channel_id": "c1"})
        clock.advance(5 * SEC)
        await p.tick()
        assert (await p.get_status("u")).status == "away"
        clock.advance(15 * SEC)
        await p.tick()
        assert (await p.get_status("u")).status == "offline"
        await p.record_activity("u", {"type": "message", "channel_id": "c1"})
        assert (await p.get_status("u")).status == "online"


async def test_get_statuses_returns_one_entry_per_user(clock: FakeClock) -> None:
    async with make(clock) as p:
        await p.record_activity("a", {"type": "message", "channel_id": "c"})
        got = await p.get_statuses(["a", "b"])
        assert {k: v.status for k, v in got.items()} == {"a": "online", "b": "offline"}


async def test_manual_status_and_custom_status(clock: FakeClock) -> None:
    async with make(clock) as p:
        await p.record_activity("u", {"type": "message", "channel_id": "c"})
        await p.set_status("u", "dnd")
        await p.set_custom_status("u", "Trading BTC")
        s = await p.get_status("u")
        assert (s.status, s.custom_status) == ("dnd", "Trading BTC")
        await p.clear_custom_status("u")
        await p.set_status("u", "online")
        s = await p.get_status("u")
        assert (s.status, s.custom_status) == ("online", None)


async def test_set_status_through_the_api_brings_an_absent_user_in(clock: FakeClock) -> None:
    async with make(clock) as p:
        await p.set_status("u", "dnd")
        assert (await p.get_status("u")).status == "dnd"
        clock.advance(20 * SEC)
        await p.tick()
        assert (await p.get_status("u")).status == "offline"


async def test_invisible_user_is_offline_to_others_and_not_in_who(clock: FakeClock) -> None:
    async with make(clock) as p:
        await p.record_activity("u", {"type": "message", "channel_id": "c"})
        await p.set_status("u", "offline")
        assert (await p.get_status("u")).status == "offline"
        assert await p.get_online_users() == []


async def test_get_online_users_optionally_per_channel(clock: FakeClock) -> None:
    async with make(clock) as p:
        await p.record_activity("a", {"type": "message", "channel_id": "telegram-1"})
        await p.record_activity("b", {"type": "message", "channel_id": "slack-2"})
        await p.set_status("b", "dnd")
        everyone = await p.get_online_users()
        assert [(u.user_id, u.status) for u in everyone] == [("a", "online"), ("b", "dnd")]
        on_tg = await p.get_online_users(channel_id="telegram-1")
        assert [u.user_id for u in on_tg] == ["a"]


async def test_activity_is_newest_first_with_limit_and_since(clock: FakeClock) -> None:
    async with make(clock) as p:
        for i in range(5):
            await p.record_activity("u", {"type": f"t{i}", "channel_id": "c",
                                          "timestamp": clock.now()})
            clock.advance(1000)
        got = await p.get_activity("u", limit=2)
        assert [a.type for a in got] == ["t4", "t3"]
        since = await p.get_activity("u", since=clock.now() - 2500)
        assert [a.type for a in since] == ["t4", "t3"]
        assert all(a.received_at >= a.timestamp for a in got)


async def test_set_device_status_and_devices(clock: FakeClock) -> None:
    async with make(clock) as p:
        d = await p.set_device_status("u", "phone", "online")
        assert (d.id, d.status, d.is_active) == ("phone", "online", True)
        await p.set_device_status("u", "phone", "away")
        assert (await p.get_status("u")).status == "away"
        await p.set_device_status("u", "phone", "offline")
        assert (await p.get_status("u")).status == "offline"
        await p.remove_device("u", "phone")
        assert await p.get_devices("u") == []


async def test_sync_status_counts_devices_that_can_ack(clock: FakeClock) -> None:
    async with make(clock) as p:
        p.ingest([("presence/devices/u/phone/conn", b'{"state":"online","session":"s1"}')])
        sync = await p.sync("u")
        assert (sync.synced, sync.total, sync.last_sync) == (0, 1, clock.now())
        v = (await p.get_status("u")).version
        p.ingest([("presence/devices/u/phone/ack", f'{{"version":{v}}}'.encode())])
        sync = await p.get_sync_status("u")
        assert (sync.synced, sync.total) == (1, 1)


async def test_events_reach_sync_and_async_callbacks(clock: FakeClock) -> None:
    seen: list[tuple[str, ...]] = []
    async_seen: list[str] = []

    async def on_offline(user_id: str) -> None:
        async_seen.append(user_id)

    async with make(clock) as p:
        p.on("statusChange", lambda user_id, old, new: seen.append((user_id, old, new)))
        p.on("online", lambda user_id: seen.append(("online", user_id)))
        p.on("offline", on_offline)
        await p.record_activity("u", {"type": "message", "channel_id": "c"})
        await p.set_status("u", "dnd")
        clock.advance(20 * SEC)
        await p.tick()
        await async_wait_for(lambda: async_seen, what="async offline callback")
    assert seen == [("u", "offline", "online"), ("online", "u"), ("u", "online", "dnd"),
                    ("u", "dnd", "offline")]
    assert async_seen == ["u"]


async def test_failing_callback_is_logged_and_never_breaks_the_engine(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(user_id: str, old: str, new: str) -> None:
        raise RuntimeError("callback bug")

    async def async_boom(user_id: str) -> None:
        raise RuntimeError("async callback bug")

    async with make(clock) as p:
        p.on("statusChange", boom)
        p.on("online", async_boom)
        calls: list[str] = []
        p.on("statusChange", lambda u, o, n: calls.append(n))
        with caplog.at_level(logging.ERROR):
            await p.record_activity("u", {"type": "message", "channel_id": "c"})
            await asyncio.sleep(0)
        assert (await p.get_status("u")).status == "online"
        assert calls == ["online"]
    assert "callback bug" in caplog.text


async def test_unsubscribe(clock: FakeClock) -> None:
    async with make(clock) as p:
        calls: list[str] = []
        off = p.on("statusChange", lambda u, o, n: calls.append(n))
        off()
        await p.record_activity("u", {"type": "message", "channel_id": "c"})
        assert calls == []


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: p.get_status("bad/id"), "invalid user id"),
        (lambda p: p.set_status("u", "busy"), "unknown status"),
        (lambda p: p.set_custom_status("u", "x" * 300), "limit is 256"),
        (lambda p: p.record_activity("u", {"channel_id": "c"}), "invalid activity"),
        (lambda p: p.record_activity("u", {"type": "m", "channel_id": "a b"}), "invalid activity"),
        (lambda p: p.set_device_status("u", "phone", "dnd"), "unknown device status"),
        (lambda p: p.remove_device("u", "nope"), "has no device"),
    ],
)
async def test_bad_calls_raise_presence_error_with_a_clear_message(
    clock: FakeClock, call: object, match: str
) -> None:
    async with make(clock) as p:
        with pytest.raises(PresenceError, match=match):
            await call(p)  # type: ignore[operator]


def test_bad_config_is_a_presence_error() -> None:
    with pytest.raises(PresenceError, match="offline_after_ms must be >= away_after_ms"):
        create_presence_service(away_after_ms=10, offline_after_ms=5)


async def test_ingest_drops_bad_input_with_counted_reasons_and_no_state_change(
    clock: FakeClock,
) -> None:
    async with make(clock) as p:
        p.ingest([("presence/devices/u/phone/conn", b'{"state":"online","session":"s1"}')])
        before = await p.get_state("u")
        rejected = p.ingest([
            ("presence/devices/u/phone/heartbeat", b"{oops"),
            ("presence/devices/u/phone/conn", b'{"state":"offline","session":7}'),
            ("presence/devices/u/x+y/conn", b"{}"),
            ("elsewhere/topic", b"{}"),
            ("presence/devices/u/phone/set", b'{"customStatus":"' + b"x" * 300 + b'"}'),
        ])
        assert rejected == 5
        assert await p.get_state("u") == before
        assert p.stats()["rejected"] == {"bad_payload": 3, "bad_id": 1, "unknown_topic": 1}


async def test_chat_commands_through_the_handler(clock: FakeClock) -> None:
    async with make(clock) as p:
        await p.record_activity("alice", {"type": "message", "channel_id": "telegram-123"})
        assert "alice" in await handle_command(p, "alice", "/presence who")
        assert "alice" in await handle_command(p, "alice", "/presence who telegram-123")
        assert "nobody" in await handle_command(p, "alice", "/presence who other-1")
        assert await handle_command(p, "alice", '/presence status "In a meeting"') == \
            'custom status set to "In a meeting"'
        assert (await p.get_status("alice")).custom_status == "In a meeting"
        assert await handle_command(p, "alice", "/presence dnd") == "status set to dnd"
        assert await handle_command(p, "alice", "/presence") == \
            'alice: dnd "In a meeting" (primary: telegram-123)'
        assert await handle_command(p, "alice", "/presence status --clear") == "custom status cleared"
        assert "message" in await handle_command(p, "alice", "/presence activity --limit 5 --since 1h")
        assert "telegram-123" in await handle_command(p, "alice", "/presence devices")
        assert "sync:" in await handle_command(p, "alice", "/presence sync")
        assert "unknown command" in await handle_command(p, "alice", "/presence frobnicate")
        assert "invalid duration" in await handle_command(p, "alice", "/presence activity --since soon")
        assert "/presence who" in await handle_command(p, "alice", "/presence help")


async def test_tinydb_state_and_activity_survive_a_restart(clock: FakeClock, tmp_path: Path) -> None:
    db = tmp_path / "presence.json"
    async with make(clock, storage="tinydb", db_path=str(db)) as p:
        await p.record_activity("u", {"type": "message", "channel_id": "c"})
        await p.set_custom_status("u", "Lunch")
        version = (await p.get_status("u")).version
    async with make(clock, storage="tinydb", db_path=str(db)) as p:
        s = await p.get_status("u")
        assert (s.status, s.custom_status, s.version) == ("online", "Lunch", version)
        assert [a.type for a in await p.get_activity("u")] == ["message"]


async def test_the_clock_task_fires_timers_on_real_time() -> None:
    p = create_presence_service(heartbeat_interval_ms=100, away_after_ms=150, offline_after_ms=300)
    async with p:
        await p.record_activity("u", {"type": "message", "channel_id": "c"})

        async def status() -> str:
            return (await p.get_status("u")).status

        await async_wait_for(lambda: _eq(status(), "away"), timeout=3, what="auto-away")
        await async_wait_for(lambda: _eq(status(), "offline"), timeout=3, what="auto-offline")


async def _eq(value: object, expected: str) -> bool:
    return await value == expected  # type: ignore[misc]


async def test_a_flooding_device_is_throttled_alone(clock: FakeClock) -> None:
    async with make(clock, device_rate=10.0, device_burst=20) as p:
        p.ingest([("presence/devices/u/calm/conn", b'{"state":"online","session":"c1"}')])
        flood = [("presence/devices/u/noisy/heartbeat", b'{"session":"n1"}')] * 500
        rejected = p.ingest(flood)
        assert rejected == 480  # the burst passes, the rest is dropped unparsed
        assert p.stats()["rejected"] == {"rate_limited": 480}
        clock.advance(1000)  # a second later the device has 10 more tokens
        assert p.ingest(flood[:15]) == 5
        assert p.ingest([("presence/devices/u/calm/heartbeat", b'{"session":"c1"}')]) == 0
        assert {d.id: d.status for d in await p.get_devices("u")} == {
            "calm": "online", "noisy": "online"}


async def test_junk_from_a_device_the_hub_does_not_know_is_throttled_too(clock: FakeClock) -> None:
    """The limit comes before parsing, so a device whose payloads never parse (and so never
    becomes a device) is still limited."""
    async with make(clock, device_rate=10.0, device_burst=20) as p:
        junk = [("presence/devices/u/ghost/heartbeat", b"not json")] * 100
        assert p.ingest(junk) == 100
        assert p.stats()["rejected"] == {"bad_payload": 20, "rate_limited": 80}
        assert await p.get_devices("u") == []


def test_the_rate_table_forgets_devices_whose_next_message_is_due() -> None:
    """A device past its due time is as good as unseen, so a sweep keeps only recent senders:
    the table does not grow with the fleet, and a flood of made-up ids is bounded."""
    from hub.app import ratelimit

    limiter = ratelimit.RateLimiter(rate=10.0, burst=20)  # one message per 100 ms
    for i in range(1000):
        assert limiter.allow("u", f"d{i}", 0)
    assert len(limiter) == 1000
    limiter.sweep(50)  # every entry is due at 100 ms
    assert len(limiter) == 1000
    limiter.sweep(100)
    assert len(limiter) == 0
    for _ in range(20):  # a burst pushes the due time 2 s ahead: kept across sweeps
        assert limiter.allow("u", "noisy", 100)
    assert not limiter.allow("u", "noisy", 100)
    limiter.sweep(1000)
    assert len(limiter) == 1  # its state survives: 9 tokens back after 900 ms, not 20
    assert sum(limiter.allow("u", "noisy", 1000) for _ in range(20)) == 9
    limiter.sweep(2000)
    assert len(limiter) == 1
    limiter.sweep(3000)
    assert len(limiter) == 0 and limiter.allow("u", "noisy", 3000)


def test_a_flood_of_made_up_ids_only_resets_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    from hub.app import ratelimit

    monkeypatch.setattr(ratelimit, "MAX_TRACKED", 50)
    limiter = ratelimit.RateLimiter(rate=10.0, burst=20)
    for i in range(120):
        limiter.allow("u", f"g{i}", 0)
    assert len(limiter) <= 50


async def test_devices_do_not_time_out_while_the_broker_link_is_down(clock: FakeClock) -> None:
    async with make(clock) as p:
        p.ingest([("presence/devices/u/phone/conn", b'{"state":"online","session":"s1"}')])
        p.link_down()
        clock.advance(10 * SEC)  # far past the 2.5 s heartbeat timeout: the hub heard nothing
        await p.tick()
        p.ingest([("presence/devices/u/other/heartbeat", b'{"session":"x1"}')])  # fires due work
        assert {d.id: d.status for d in await p.get_devices("u")}["phone"] != "offline"
        p.link_up()
        clock.advance(2 * SEC)  # within the grace: still connected
        await p.tick()
        assert (await p.get_devices("u"))[0].status != "offline"
        clock.advance(1 * SEC)  # grace over and nothing heard: now it times out
        await p.tick()
        assert (await p.get_devices("u"))[0].status == "offline"


async def test_a_birth_after_its_first_heartbeat_still_names_the_device(clock: FakeClock) -> None:
    async with make(clock) as p:
        p.ingest([("presence/devices/u/phone/heartbeat", b'{"session":"s1"}')])
        p.ingest([("presence/devices/u/phone/conn",
                   b'{"state":"online","session":"s1","name":"Old phone"}')])
        assert (await p.get_devices("u"))[0].name == "Old phone"
        assert (await p.get_state("u")).devices[0].name == "Old phone"  # type: ignore[union-attr]


async def test_the_memory_storage_of_a_service_keeps_activity_not_a_second_copy_of_users() -> None:
    from hub.stores import MemoryStore

    async with create_presence_service(storage="memory") as p:
        store = p.store
        assert isinstance(store, MemoryStore) and not store.keeps_users
        p.ingest([("presence/devices/u/d/conn", b'{"state":"online","session":"s1"}')])
        await p.record_activity("u", {"type": "message", "channel_id": "c"})
        await p.flush()
        assert await store.load_users() == []  # the engine holds the users; nothing reads this
        assert p.engine.take_dirty() == []  # the flush took them, without building records
        assert [a.type for a in await p.get_activity("u")] == ["message"]
        assert (await p.get_status("u")).status == "online"
