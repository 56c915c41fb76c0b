"""Presence that tells the truth on real networks: each rule of issue 12, driven by a fake clock.

Every test reads as the false status it pins down: a reconnect that flapped the user, a device
timed out against someone else's heartbeat interval, a sleeping device taken for a dead one, a
reconnect taken for use, an outage turned into an event storm, a clock step turned into a mass
timeout. No sleeps: integer milliseconds in, effects out.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from hub.core import (
    ActivityEvent,
    Birth,
    DeviceOffline,
    DeviceRemoved,
    DeviceTimedOut,
    Effect,
    EmitEvent,
    Engine,
    EngineConfig,
    FakeClock,
    Heartbeat,
    PublishState,
    RemoveDevice,
    SetStatus,
    Sleep,
)

T0 = 1_700_000_000_000
HB = 30_000
TIMEOUT = 75_000
AWAY = 300_000
OFFLINE = 3_600_000
GRACE = 1_000


@pytest.fixture
def engine() -> Engine:
    return Engine(EngineConfig())  # the defaults: heartbeat 30 s, will grace 1 s


def events(effects: Sequence[Effect]) -> list[tuple[str, str, str]]:
    return [(e.event, e.old, e.new) for e in effects if isinstance(e, EmitEvent)]


def publishes(effects: Sequence[Effect]) -> list[PublishState]:
    return [e for e in effects if isinstance(e, PublishState)]


def device(engine: Engine, device_id: str, user: str = "u") -> str:
    (d,) = [d for d in engine.get_devices(user) if d.id == device_id]
    return d.status


def collect(engine: Engine, *steps: tuple[int, object]) -> list[Effect]:
    """Feed ``(now, event-or-None)`` in order; None ticks. Returns every effect."""
    out: list[Effect] = []
    for now, ev in steps:
        out += engine.tick(now)
        if ev is not None:
            out += engine.handle(ev, now)  # type: ignore[arg-type]
    return out


# ------------------------------------------------------------------------ the will grace


def test_a_reconnect_within_the_will_grace_does_not_flap_the_user(engine: Engine) -> None:
    """Wi-Fi to LTE: the broker sends the old connection's will just before the new birth."""
    engine.handle(Birth("u", "phone", "s1"), T0)
    version = engine.get_status("u").version
    fx = collect(engine, (T0 + 10_000, DeviceOffline("u", "phone", "s1", "lost")),
                 (T0 + 10_300, Birth("u", "phone", "s2")), (T0 + 20_000, None))
    assert events(fx) == [] and publishes(fx) == []
    assert engine.get_status("u").version == version
    assert device(engine, "phone") == "online"
    assert engine.counters["will_voided_by_reconnect"] == 1


def test_a_will_takes_the_device_offline_once_its_grace_has_passed(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(DeviceOffline("u", "phone", "s1", "lost"), T0 + 5_000)
    assert engine.tick(T0 + 5_000 + GRACE - 1) == ()
    assert device(engine, "phone") == "online"
    fx = engine.tick(T0 + 5_000 + GRACE)
    assert events(fx) == [("statusChange", "online", "offline"), ("offline", "online", "offline")]


def test_heartbeats_of_a_session_whose_will_came_are_stale(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(DeviceOffline("u", "phone", "s1", "lost"), T0 + 5_000)
    engine.handle(Heartbeat("u", "phone", "s1"), T0 + 5_100)  # in flight when the link died
    engine.tick(T0 + 5_000 + GRACE)
    assert device(engine, "phone") == "offline"


def test_a_clean_stop_takes_effect_at_once(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    fx = engine.handle(DeviceOffline("u", "phone", "s1", "disconnect"), T0 + 5_000)
    assert events(fx)[0] == ("statusChange", "online", "offline")


def test_no_grace_applies_wills_at_once() -> None:
    engine = Engine(EngineConfig(will_grace_ms=0))
    engine.handle(Birth("u", "phone", "s1"), T0)
    fx = engine.handle(DeviceOffline("u", "phone", "s1", "lost"), T0 + 5_000)
    assert events(fx)[0] == ("statusChange", "online", "offline")


def test_wills_that_come_just_before_the_link_drops_are_void(engine: Engine) -> None:
    """A broker shutting down sends every client's will, then drops the hub: the devices did
    not go anywhere, they reconnect once the broker is back."""
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(Birth("v", "laptop", "s9"), T0)
    engine.handle(DeviceOffline("u", "phone", "s1", "lost"), T0 + 5_000)
    engine.handle(DeviceOffline("v", "laptop", "s9", "lost"), T0 + 5_000)
    engine.hold_timeouts()
    assert engine.tick(T0 + 60_000) == ()
    engine.release_timeouts(T0 + 60_000)
    fx = collect(engine, (T0 + 61_000, Birth("u", "phone", "s2")),
                 (T0 + 62_000, Birth("v", "laptop", "s10")), (T0 + 100_000, None))
    assert events(fx) == []
    assert engine.counters["will_voided_by_link_loss"] == 2


# ------------------------------------------------------------------------ per-device intervals


def test_a_device_announcing_a_long_interval_is_not_timed_out_early(engine: Engine) -> None:
    engine.handle(Birth("u", "badge", "s1", heartbeat_ms=120_000, ts=1), T0)
    assert engine.tick(T0 + 2 * TIMEOUT) == ()  # past the hub's own timeout: still there
    engine.handle(Heartbeat("u", "badge", "s1"), T0 + 120_000)
    fx = engine.tick(T0 + 120_000 + 300_000 - 1)
    assert [e for e in fx if isinstance(e, DeviceTimedOut)] == []
    fx = engine.tick(T0 + 120_000 + 300_000)
    assert [e.device_id for e in fx if isinstance(e, DeviceTimedOut)] == ["badge"]


def test_a_fast_device_times_out_on_its_own_interval(engine: Engine) -> None:
    engine.handle(Birth("u", "sensor", "s1", heartbeat_ms=5_000, ts=1), T0)
    fx = engine.tick(T0 + 12_500)
    assert [e.device_id for e in fx if isinstance(e, DeviceTimedOut)] == ["sensor"]


def test_an_announced_interval_is_bounded_by_the_hubs_maximum() -> None:
    engine = Engine(EngineConfig(max_heartbeat_interval_ms=60_000))
    engine.handle(Birth("u", "badge", "s1", heartbeat_ms=3_600_000, ts=1), T0)
    fx = engine.tick(T0 + 150_000)
    assert [e.device_id for e in fx if isinstance(e, DeviceTimedOut)] == ["badge"]


def test_heartbeats_much_later_than_announced_are_counted_and_logged(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    engine.handle(Birth("u", "pi", "s1", heartbeat_ms=10_000, ts=1), T0)
    engine.handle(Heartbeat("u", "pi", "s1"), T0 + 10_000)  # on time
    engine.handle(Heartbeat("u", "pi", "s1"), T0 + 24_000)  # 14 s: late, but within 1.5 x
    engine.handle(Heartbeat("u", "pi", "s1"), T0 + 40_000)  # 16 s: later than 1.5 intervals
    engine.handle(Heartbeat("u", "pi", "s1"), T0 + 57_000)
    assert engine.counters["late_heartbeat"] == 2
    lines = [r.getMessage() for r in caplog.records if "heartbeat of u/pi" in r.getMessage()]
    assert len(lines) == 1 and "interval is 10000 ms" in lines[0]


# ------------------------------------------------------------------------ sleeping devices


def test_a_sleeping_device_is_neither_lost_nor_timed_out_while_it_sleeps(engine: Engine) -> None:
    engine.handle(Birth("u", "badge", "s1", heartbeat_ms=HB, ts=1), T0)
    fx = engine.handle(Sleep("u", "badge", "s1", 600_000), T0 + 1_000)
    (pub,) = publishes(fx)
    (entry,) = pub.state.devices
    assert (entry.sleeping, entry.wake_at) == (True, T0 + 601_000)
    assert b'"sleeping":true' in pub.state.to_json() and b'"wakeAt"' in pub.state.to_json()
    # its link drops instead of a clean disconnect: the will changes nothing
    engine.handle(DeviceOffline("u", "badge", "s1", "lost"), T0 + 2_000)
    fx = engine.tick(T0 + 601_000 + TIMEOUT - 1)
    assert [e for e in fx if isinstance(e, DeviceTimedOut)] == []
    assert device(engine, "badge") == "away"  # its idle clock ran on
    fx = engine.tick(T0 + 601_000 + TIMEOUT)
    assert [e.device_id for e in fx if isinstance(e, DeviceTimedOut)] == ["badge"]


def test_a_birth_ends_the_sleep(engine: Engine) -> None:
    engine.handle(Birth("u", "badge", "s1", ts=1), T0)
    engine.handle(Sleep("u", "badge", "s1", 60_000), T0 + 1_000)
    fx = engine.handle(Birth("u", "badge", "s2", ts=2), T0 + 61_000)
    (pub,) = publishes(fx)
    assert (pub.state.devices[0].sleeping, pub.state.devices[0].wake_at) == (False, None)
    assert events(fx) == []
    assert b'"sleeping":false,"wakeAt":null' in pub.state.to_json()


def test_idle_timers_run_as_usual_while_a_device_sleeps(engine: Engine) -> None:
    engine.handle(Birth("u", "badge", "s1", ts=1), T0)
    engine.handle(Sleep("u", "badge", "s1", 3 * AWAY), T0)
    fx = engine.tick(T0 + AWAY)
    assert events(fx) == [("statusChange", "online", "away")]


# ------------------------------------------------------------------------ idle that means idle


def test_reconnecting_is_not_using_the_device(engine: Engine) -> None:
    """A phone in a pocket reconnects every few minutes, reporting its user idle for hours."""
    engine.handle(Birth("u", "phone", "s1", idle_ms=3 * 3_600_000, ts=1), T0)
    assert device(engine, "phone") == "offline"
    engine.handle(Birth("u", "phone", "s2", idle_ms=3 * 3_600_000 + 240_000, ts=2), T0 + 240_000)
    assert engine.get_status("u").status == "offline"


def test_a_pocketed_phone_does_not_take_the_primary_from_the_laptop_in_use(engine: Engine) -> None:
    engine.handle(Birth("u", "laptop", "l1", ts=1), T0)
    engine.handle(ActivityEvent("u", "keypress", "laptop"), T0 + 100_000)
    for k in range(1, 6):  # reconnects with its user idle 3 min and more
        engine.handle(Birth("u", "phone", f"p{k}", idle_ms=180_000 + k * 240_000, ts=k),
                      T0 + 100_000 + k * 1_000)
        assert engine.get_status("u").active_device == "laptop"


def test_activity_replayed_from_an_outbox_does_not_move_the_primary(engine: Engine) -> None:
    engine.handle(Birth("u", "laptop", "l1", ts=1), T0)
    engine.handle(Birth("u", "phone", "p1", ts=1), T0)
    engine.handle(ActivityEvent("u", "keypress", "laptop"), T0 + 200_000)
    two_hours_ago = T0 + 200_000 - 2 * 3_600_000
    engine.handle(ActivityEvent("u", "message", "phone", "chat", two_hours_ago), T0 + 201_000)
    assert engine.get_status("u").active_device == "laptop"
    assert engine.counters["activity_history"] == 1


# ------------------------------------------------------------------------ sessions, primary


def test_a_late_birth_of_an_old_session_does_not_take_over(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "new", ts=T0 + 500), T0 + 1_000)
    engine.handle(Birth("u", "phone", "old", ts=T0), T0 + 1_100)  # overtaken in flight
    for k in range(1, 5):  # the live session's heartbeats keep counting
        engine.handle(Heartbeat("u", "phone", "new"), T0 + 1_000 + k * HB)
    assert engine.tick(T0 + 1_000 + 4 * HB + TIMEOUT - 1) == ()
    assert device(engine, "phone") == "online"


def test_a_virtual_api_device_is_not_primary_over_a_connected_device(engine: Engine) -> None:
    engine.handle(Birth("u", "laptop", "l1", ts=1), T0)
    engine.handle(ActivityEvent("u", "message", None, "telegram-1"), T0 + 60_000)
    assert engine.get_status("u").active_device == "laptop"


def test_api_activity_on_a_channel_named_like_a_device_is_not_that_devices(engine: Engine) -> None:
    engine.handle(Birth("u", "laptop", "l1", ts=1), T0)
    engine.handle(ActivityEvent("u", "message", None, "laptop"), T0 + 60_000)
    assert sorted(d.id for d in engine.get_devices("u")) == ["api.laptop", "laptop"]


def test_removing_a_device_clears_its_retained_birth(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    fx = engine.handle(RemoveDevice("u", "phone"), T0 + 1_000)
    assert [e for e in fx if isinstance(e, DeviceRemoved)] == [DeviceRemoved("u", "phone")]
    engine.handle(SetStatus("u", "online"), T0 + 2_000)  # an API device: nothing retained
    fx = engine.handle(RemoveDevice("u", "api"), T0 + 3_000)
    assert [e for e in fx if isinstance(e, DeviceRemoved)] == []


# ------------------------------------------------------------------------ clocks


def test_a_wall_clock_step_moves_labels_not_timers(engine: Engine) -> None:
    """NTP steps a Raspberry Pi's clock 2 h forward: no device times out for it, and lastSeen
    says the new wall time."""
    clock = FakeClock(T0)
    engine.handle(Birth("u", "pi", "s1"), clock.now())
    clock.advance(HB)
    clock.step_wall(2 * 3_600_000)
    engine.set_wall_offset(clock.wall() - clock.now())
    assert engine.tick(clock.now()) == ()
    engine.handle(Heartbeat("u", "pi", "s1"), clock.now())
    assert device(engine, "pi") == "online"
    assert engine.get_status("u").last_seen == clock.wall()


def test_a_backward_wall_clock_step_does_not_keep_a_dead_device(engine: Engine) -> None:
    clock = FakeClock(T0)
    engine.handle(Birth("u", "pi", "s1"), clock.now())
    clock.step_wall(-3_600_000)
    engine.set_wall_offset(clock.wall() - clock.now())
    clock.advance(TIMEOUT)
    fx = engine.tick(clock.now())
    assert [e.device_id for e in fx if isinstance(e, DeviceTimedOut)] == ["pi"]


# ------------------------------------------------------------------------ who, paged


def test_who_is_answered_in_pages_by_user_id(engine: Engine) -> None:
    for i in range(25):
        engine.handle(Birth(f"user{i:02d}", "d", "s"), T0)
    first = engine.get_online_users(None, T0, limit=10)
    assert [u.user_id for u in first] == [f"user{i:02d}" for i in range(10)]
    rest = engine.get_online_users(None, T0, limit=100, after=first[-1].user_id)
    assert [u.user_id for u in rest] == [f"user{i:02d}" for i in range(10, 25)]


# ------------------------------------------------------------------------ the service around it


async def test_status_changes_found_at_start_up_reach_the_sinks(tmp_path: object) -> None:
    """A record whose stored status contradicts its devices is corrected at load; the event of
    that correction goes out on P/events like any other (the sinks attach after the load)."""
    from hub.app.service import PresenceService, ServiceConfig
    from hub.core.models import DeviceRecord, UserRecord
    from hub.stores import MemoryStore

    class Seeded(MemoryStore):
        async def load_users(self) -> list[UserRecord]:
            return [UserRecord(id="u", name="u", status="online", version=3, devices=[
                DeviceRecord(id="gone", name="gone", status="offline")])]

    class Sink:
        def __init__(self) -> None:
            self.events: list[tuple[str, str, str]] = []

        def publish_state(self, state: object, forced: bool) -> None: ...
        def publish_event(self, event: EmitEvent) -> None:
            self.events.append((event.event, event.old, event.new))
        def device_timed_out(self, effect: object) -> None: ...
        def device_removed(self, effect: object) -> None: ...
        def before_flush(self) -> None: ...
        def after_flush(self) -> None: ...

    sink = Sink()

    class Attach:
        async def start(self) -> None:
            service.add_sink(sink)  # as the MQTT side does, after the load

        async def stop(self) -> None: ...

    service = PresenceService(ServiceConfig(EngineConfig()), store=Seeded(), clock=FakeClock(T0))
    service.attach(Attach())
    async with service:
        assert sink.events == [("statusChange", "online", "offline"),
                               ("offline", "online", "offline")]


async def test_requests_have_their_own_rate_limit() -> None:
    """A device asking in a loop is limited in its asking, not in its heartbeats."""
    from hub import create_presence_service

    clock = FakeClock(T0)
    async with create_presence_service(clock=clock, device_rate=10.0, device_burst=20) as p:
        served: list[str] = []

        async def handler(msg: object) -> None:
            served.append("x")

        p.set_request_handler(handler)  # type: ignore[arg-type]
        asks = [("presence/devices/u/cli/req", b'{"id":"r1","command":"/presence who"}')] * 50
        assert p.ingest(asks) == 30  # the request burst (20) passes
        assert p.stats()["rejected"] == {"requests_limited": 30}
        beats = [("presence/devices/u/cli/heartbeat", b'{"session":"s1"}')] * 20
        assert p.ingest(beats) == 0  # its heartbeat budget is untouched


async def test_who_pages_through_the_chat_command() -> None:
    from hub import create_presence_service, run_command

    async with create_presence_service(clock=FakeClock(T0)) as p:
        for i in range(7):
            await p.set_status(f"user{i}", "online")
        first = await run_command(p, "user0", "/presence who --limit 3")
        assert [u["userId"] for u in first.data["users"]] == ["user0", "user1", "user2"]
        assert first.data["next"] == "user2" and "--after user2" in first.text
        last = await run_command(p, "user0", "/presence who --limit 5 --after user2")
        assert [u["userId"] for u in last.data["users"]] == ["user3", "user4", "user5", "user6"]
        assert last.data["next"] is None
        bad = await run_command(p, "user0", "/presence who --limit 0")
        assert not bad.ok


async def test_the_service_follows_a_wall_clock_step_with_labels_only() -> None:
    """The clock step through the whole service: +2 h of NTP on a Pi without a real-time
    clock times nobody out, and the labels follow the new wall time."""
    from hub import create_presence_service

    clock = FakeClock(T0)
    async with create_presence_service(clock=clock, heartbeat_interval_ms=1_000) as p:
        beat = [("presence/devices/u/pi/heartbeat", b'{"session":"s1"}')]
        p.ingest([("presence/devices/u/pi/conn", b'{"state":"online","session":"s1"}')])
        clock.advance(1_000)
        clock.step_wall(2 * 3_600_000)
        p.ingest(beat)
        await p.tick()
        assert (await p.get_status("u")).status == "online"
        assert (await p.get_status("u")).last_seen == clock.wall()
        clock.step_wall(-3 * 3_600_000)  # and back, further than it came
        clock.advance(2_000)
        p.ingest(beat)
        await p.tick()
        assert (await p.get_status("u")).status == "online"
        clock.advance(2_500)  # silence for a heartbeat timeout: gone, whatever the wall says
        await p.tick()
        assert (await p.get_status("u")).status == "offline"


def test_an_offline_of_an_unknown_user_publishes_them_offline(engine: Engine) -> None:
    """storage=memory forgets users at a restart, while the broker keeps their retained
    'online': the first word about them (a will) corrects it."""
    fx = engine.handle(DeviceOffline("u", "phone", "s1", "lost"), T0)
    (pub,) = publishes(fx)
    assert (pub.state.status, pub.state.devices[0].status) == ("offline", "offline")
    engine.handle(Heartbeat("u", "phone", "s1"), T0 + 1_000)  # its session is over
    assert device(engine, "phone") == "offline"


def test_wills_queued_over_a_broker_restart_wait_for_the_devices_to_come_back(
    engine: Engine,
) -> None:
    """A broker restarted with persistence queues every client's will for the hub; the hub
    reconnects first, the devices a moment later: they have the hold to be heard again."""
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.hold_timeouts()
    engine.release_timeouts(T0 + 10_000)
    engine.handle(DeviceOffline("u", "phone", "s1", "lost"), T0 + 10_050)  # queued, delivered
    assert engine.tick(T0 + 10_050 + GRACE) == ()
    fx = collect(engine, (T0 + 12_000, Birth("u", "phone", "s2")), (T0 + 60_000, None))
    assert events(fx) == []
    # once heard, a will takes the usual grace
    engine.handle(DeviceOffline("u", "phone", "s2", "lost"), T0 + 61_000)
    assert events(engine.tick(T0 + 61_000 + GRACE))[0] == ("statusChange", "online", "offline")


def test_the_birth_after_a_heartbeat_that_stood_in_for_it_brings_its_interval(
    engine: Engine,
) -> None:
    """After a hub restart the heartbeat of a new session may come before its birth: the birth
    that follows still announces the device's own interval."""
    engine.handle(Heartbeat("u", "meter", "s1"), T0)  # an implicit birth: the hub's timeout
    engine.handle(Birth("u", "meter", "s1", heartbeat_ms=120_000, ts=5), T0 + 10)
    fx = engine.tick(T0 + 2 * TIMEOUT)
    assert [e for e in fx if isinstance(e, DeviceTimedOut)] == []
    fx = engine.tick(T0 + 10 + 300_000)
    assert [e.device_id for e in fx if isinstance(e, DeviceTimedOut)] == ["meter"]


def test_after_a_crash_versions_continue_above_what_may_have_been_published() -> None:
    first = Engine(EngineConfig())
    first.handle(Birth("u", "phone", "s1"), T0)
    (saved,) = first.take_dirty()  # persisted: version 1, reserved ahead
    assert saved.version == 1 and saved.version_reserved > saved.version
    first.handle(SetStatus("u", "dnd"), T0 + 1_000)  # published as version 2, then a crash
    assert first.get_status("u").version == 2
    clean = Engine(EngineConfig())
    clean.load([saved], T0 + 2_000)
    assert clean.get_status("u").version == 1  # a clean stop: nothing to skip
    crashed = Engine(EngineConfig())
    crashed.load([saved], T0 + 2_000, crashed=True)
    assert crashed.get_status("u").version > 2
    (rec,) = crashed.take_dirty()  # and the store learns it
    assert rec.version == crashed.get_status("u").version


async def test_a_hub_that_crashed_never_publishes_a_version_again(tmp_path: object) -> None:
    """Through the service and a real TinyDB file: the first hub publishes version 2 and dies
    before its flush; the next one starts above it."""
    from pathlib import Path

    from hub import create_presence_service

    db = str(Path(str(tmp_path)) / "presence.json")
    clock = FakeClock(T0)
    first = create_presence_service(storage="tinydb", db_path=db, clock=clock,
                                    flush_interval_ms=3_600_000)
    await first.start()
    first.ingest([("presence/devices/u/phone/conn", b'{"state":"online","session":"s1"}')])
    assert await first.durable(within=5)
    await first.set_status("u", "dnd")  # published as version 2 by a running hub ...
    published = (await first.get_status("u")).version
    # ... which dies here: no flush, no clean stop (its clock task is simply abandoned)
    assert first._runner is not None
    first._runner.cancel()
    first.store._unlock()  # type: ignore[attr-defined]  # as the kernel does for a dead process
    second = create_presence_service(storage="tinydb", db_path=db, clock=clock)
    async with second:
        assert (await second.get_status("u")).version > published
    third = create_presence_service(storage="tinydb", db_path=db, clock=clock)
    async with third:  # the second stopped cleanly: no jump this time
        assert (await third.get_status("u")).version == (await second.get_status("u")).version
