"""The presence engine, rule by rule (DESIGN.md "Semantics"), on a fake clock.

Every test drives :class:`hub.core.engine.Engine` with plain integer milliseconds: no sleeps, no
I/O. Default timers: heartbeat 30 s (timeout 75 s), away after 5 min, offline after 1 h.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from hub.core import (
    Ack,
    ActivityEvent,
    Birth,
    DeviceOffline,
    DeviceTimedOut,
    Effect,
    EmitEvent,
    Engine,
    EngineConfig,
    EngineError,
    Event,
    Heartbeat,
    PublishState,
    RecordActivity,
    RemoveDevice,
    SetCustomStatus,
    SetDeviceStatus,
    SetStatus,
    Sleep,
    SyncRequest,
    events_from_message,
)
from hub.core.clock import FakeClock
from hub.core.models import UserRecord
from hub.protocol import DeviceMessage, Topics, dumps

T0 = 1_700_000_000_000
HB = 30_000
TIMEOUT = 75_000
AWAY = 300_000
OFFLINE_AFTER = 3_600_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def engine() -> Engine:
    """Wills at once: the will grace has its own tests (tests/test_engine_truth.py)."""
    return Engine(EngineConfig(will_grace_ms=0))


def publishes(effects: Sequence[Effect]) -> list[PublishState]:
    return [e for e in effects if isinstance(e, PublishState)]


def events(effects: Sequence[Effect]) -> list[tuple[str, str, str]]:
    return [(e.event, e.old, e.new) for e in effects if isinstance(e, EmitEvent)]


def timed_out(effects: Sequence[Effect]) -> list[tuple[str, str]]:
    return [(e.user_id, e.device_id) for e in effects if isinstance(e, DeviceTimedOut)]


def status(engine: Engine, user: str = "u") -> str:
    return engine.get_status(user).status


def device_status(engine: Engine, device: str, user: str = "u") -> str:
    (d,) = [d for d in engine.get_devices(user) if d.id == device]
    return d.status


def primary(engine: Engine, user: str = "u") -> str | None:
    return engine.get_status(user).active_device


def run_until(engine: Engine, clock: FakeClock, until: int, heartbeats: Sequence[Heartbeat] = (),
              every: int = HB) -> list[Effect]:
    """Advance the clock to ``until`` in steps of ``every``, sending ``heartbeats`` and ticking
    at each step, as a hub with live devices would. Returns every effect."""
    out: list[Effect] = []
    while clock.t + every <= until:
        clock.advance(every)
        out += engine.tick(clock.t)
        for hb in heartbeats:
            out += engine.handle(hb, clock.t)
    if clock.t < until:
        clock.t = until
        out += engine.tick(clock.t)
    return out


# --------------------------------------------------------------------------------------------
# Connection and sessions


def test_birth_makes_device_and_user_online(engine: Engine) -> None:
    fx = engine.handle(Birth("u", "phone", "s1", "Phone"), T0)
    (pub,) = publishes(fx)
    assert pub.state.status == "online"
    assert pub.state.version == 1
    assert pub.state.active_device == "phone"
    assert [(d.id, d.name, d.status, d.is_active) for d in pub.state.devices] == [
        ("phone", "Phone", "online", True)
    ]
    assert events(fx) == [("statusChange", "offline", "online"), ("online", "offline", "online")]


def test_late_will_of_old_session_is_ignored(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(Birth("u", "phone", "s2"), T0 + 1_000)  # reconnected before the old will
    fx = engine.handle(DeviceOffline("u", "phone", "s1", "lost"), T0 + 2_000)
    assert fx == ()
    assert device_status(engine, "phone") == "online"
    assert engine.counters["stale_session"] == 1


def test_will_of_current_session_takes_device_offline(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    fx = engine.handle(DeviceOffline("u", "phone", "s1", "lost"), T0 + 1_000)
    assert device_status(engine, "phone") == "offline"
    assert events(fx) == [("statusChange", "online", "offline"), ("offline", "online", "offline")]


def test_clean_stop_counts_as_seeing_the_device(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(DeviceOffline("u", "phone", "s1", "disconnect"), T0 + 5_000)
    assert engine.get_devices("u")[0].last_seen == T0 + 5_000


def test_will_does_not_count_as_seeing_the_device(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(Heartbeat("u", "phone", "s1"), T0 + HB)
    engine.handle(DeviceOffline("u", "phone", "s1", "lost"), T0 + HB + 45_000)
    assert engine.get_devices("u")[0].last_seen == T0 + HB


def test_birth_after_its_own_will_is_stale(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(DeviceOffline("u", "phone", "s1"), T0 + 1_000)
    assert engine.handle(Birth("u", "phone", "s1"), T0 + 2_000) == ()
    assert device_status(engine, "phone") == "offline"


def test_heartbeat_timeout_takes_connected_device_offline_without_a_will(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    assert engine.tick(T0 + TIMEOUT - 1) == ()
    fx = engine.tick(T0 + TIMEOUT)
    assert timed_out(fx) == [("u", "phone")]
    assert [e.session for e in fx if isinstance(e, DeviceTimedOut)] == ["s1"]
    assert device_status(engine, "phone") == "offline"
    assert status(engine) == "offline"
    assert engine.counters["device_timeout"] == 1


def test_heartbeat_timeout_defaults_to_two_and_a_half_intervals() -> None:
    assert EngineConfig(heartbeat_interval_ms=10_000).timeout_ms == 25_000
    engine = Engine(EngineConfig(heartbeat_interval_ms=10_000, heartbeat_timeout_ms=12_000))
    engine.handle(Birth("u", "phone", "s1"), T0)
    assert engine.tick(T0 + 11_999) == ()
    assert timed_out(engine.tick(T0 + 12_000)) == [("u", "phone")]


def test_any_message_of_the_session_keeps_the_device_alive(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(Heartbeat("u", "phone", "s1"), T0 + 60_000)
    engine.handle(ActivityEvent("u", "message", "phone", "chat"), T0 + 120_000)
    assert engine.tick(T0 + 120_000 + TIMEOUT - 1) == ()
    assert timed_out(engine.tick(T0 + 120_000 + TIMEOUT)) == [("u", "phone")]


def test_heartbeat_from_timed_out_device_revives_it_in_the_same_session(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.tick(T0 + TIMEOUT)
    fx = engine.handle(Heartbeat("u", "phone", "s1"), T0 + 100_000)
    assert device_status(engine, "phone") == "online"
    assert events(fx) == [("statusChange", "offline", "online"), ("online", "offline", "online")]
    assert engine.counters["device_revived"] == 1
    # the same session, so a will of it still counts
    engine.handle(DeviceOffline("u", "phone", "s1"), T0 + 110_000)
    assert device_status(engine, "phone") == "offline"


def test_revival_by_plain_heartbeat_keeps_the_idle_clock(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.tick(T0 + TIMEOUT)
    engine.handle(Heartbeat("u", "phone", "s1"), T0 + AWAY - 10_000)
    assert device_status(engine, "phone") == "online"
    engine.tick(T0 + AWAY)  # idle since the birth, not since the heartbeat
    assert device_status(engine, "phone") == "away"


def test_heartbeat_of_another_session_while_connected_is_ignored(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    assert engine.handle(Heartbeat("u", "phone", "s0", idle_ms=0), T0 + HB) == ()
    assert engine.counters["stale_session"] == 1
    # it proved nothing: the current session still times out on its own silence
    assert timed_out(engine.tick(T0 + TIMEOUT)) == [("u", "phone")]


def test_heartbeat_of_another_session_while_disconnected_counts_as_birth(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(DeviceOffline("u", "phone", "s1"), T0 + 1_000)
    fx = engine.handle(Heartbeat("u", "phone", "s2", idle_ms=AWAY * 2), T0 + 50_000)
    assert device_status(engine, "phone") == "online"  # a birth is an interaction
    assert ("online", "offline", "online") in events(fx)
    assert engine.counters["implicit_birth"] == 1
    # s2 is now the current session: its will counts, s1's would not
    assert engine.handle(DeviceOffline("u", "phone", "s1"), T0 + 60_000) == ()
    engine.handle(DeviceOffline("u", "phone", "s2"), T0 + 70_000)
    assert device_status(engine, "phone") == "offline"


def test_heartbeat_of_unknown_device_counts_as_birth(engine: Engine) -> None:
    engine.handle(Heartbeat("u", "pi", "s9"), T0)
    assert device_status(engine, "pi") == "online"
    assert engine.get_sync_status("u").total == 1


def test_heartbeat_of_an_ended_session_is_ignored(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(DeviceOffline("u", "phone", "s1"), T0 + 1_000)
    assert engine.handle(Heartbeat("u", "phone", "s1", idle_ms=0), T0 + 2_000) == ()
    assert device_status(engine, "phone") == "offline"


def test_redelivered_birth_of_timed_out_session_revives_without_resetting_idle(
    engine: Engine,
) -> None:
    # a hub that re-subscribes gets the retained birth again: the broker still holds the
    # session, so the device is alive, but nobody touched it
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(Birth("u", "tablet", "t1"), T0 + 60_000)
    for t in range(T0 + HB, T0 + 200_000, HB):
        engine.handle(Heartbeat("u", "tablet", "t1"), t)
    engine.tick(T0 + TIMEOUT)
    assert device_status(engine, "phone") == "offline"
    engine.handle(Birth("u", "phone", "s1"), T0 + 200_000)
    assert device_status(engine, "phone") == "online"
    assert primary(engine) == "tablet"  # no new interaction, so the primary stays
    engine.handle(Heartbeat("u", "phone", "s1"), T0 + 260_000)
    engine.tick(T0 + AWAY)
    assert device_status(engine, "phone") == "away"  # idle since the first birth


def test_redelivered_birth_while_connected_changes_nothing_visible(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    assert engine.handle(Birth("u", "phone", "s1"), T0 + 60_000) == ()
    assert engine.tick(T0 + 60_000 + TIMEOUT - 1) == ()  # but it did prove liveness


def test_birth_after_its_stand_in_heartbeat_names_the_device(engine: Engine) -> None:
    # the hub heard a heartbeat before the (retained) birth of the same session
    engine.handle(Heartbeat("u", "phone", "s1"), T0)
    assert engine.get_devices("u")[0].name == "phone"
    (pub,) = publishes(engine.handle(Birth("u", "phone", "s1", "Anna's phone"), T0 + 1_000))
    assert [(d.name, d.status) for d in pub.state.devices] == [("Anna's phone", "online")]
    assert engine.counters["implicit_birth"] == 1
    # the same session: no new interaction, the idle clock runs from the stand-in
    run_until(engine, FakeClock(T0 + 1_000), T0 + AWAY, [Heartbeat("u", "phone", "s1")])
    assert device_status(engine, "phone") == "away"


def test_timeouts_are_held_while_the_broker_link_is_down(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.hold_timeouts()
    assert engine.tick(T0 + 3 * TIMEOUT) == ()  # the hub hears nobody: nobody is silent
    assert device_status(engine, "phone") == "online"
    fx = engine.tick(T0 + AWAY)  # nor idle: no heartbeat could have said otherwise
    assert device_status(engine, "phone") == "online"
    assert fx == ()
    back = T0 + AWAY + 5_000
    engine.release_timeouts(back)  # one timeout of grace to be heard again
    assert engine.tick(back + TIMEOUT - 1) == ()
    assert timed_out(engine.tick(back + TIMEOUT)) == [("u", "phone")]


def test_a_device_heard_while_the_link_is_down_is_scheduled_afresh(engine: Engine) -> None:
    # its deadline from before the outage is void: the idle clock its heartbeats move is
    # written at its own next deadline, as for a user built from its text during the outage
    # (tests/test_engine_cold.py), not when a leftover entry happens to pop
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.take_dirty()
    engine.hold_timeouts()
    engine.handle(Heartbeat("u", "phone", "s1", idle_ms=0), T0 + 1_000)  # heard: written
    assert [r.id for r in engine.take_dirty()] == ["u"]
    engine.handle(Heartbeat("u", "phone", "s1", idle_ms=0), T0 + 2_000)  # moved, not written
    assert engine.take_dirty() == []
    assert engine.tick(T0 + TIMEOUT) == () and engine.take_dirty() == []
    engine.tick(T0 + 1_000 + AWAY)
    assert [r.id for r in engine.take_dirty()] == ["u"]


@pytest.mark.parametrize("name", [None, "Phone"])
def test_birth_of_the_known_session_ends_the_hold_named_or_not(engine: Engine,
                                                               name: str | None) -> None:
    # the hub's other connection hears the retained birth again while this link is down:
    # being heard ends the freeze, and the birth is liveness, not an interaction
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.hold_timeouts()
    assert engine.tick(T0 + AWAY) == ()
    assert device_status(engine, "phone") == "online"  # frozen
    fx = engine.handle(Birth("u", "phone", "s1", name), T0 + AWAY)
    assert [(p.state.status, [d.name for d in p.state.devices]) for p in publishes(fx)] == [
        ("away", [name or "phone"])]
    assert events(fx) == [("statusChange", "online", "away")]


def test_device_heard_within_the_grace_after_the_link_returns_stays(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(Birth("u", "tablet", "t1"), T0)
    engine.hold_timeouts()
    engine.release_timeouts(T0 + 200_000)
    engine.release_timeouts(T0 + 300_000)  # not held any more: no second grace
    engine.handle(Heartbeat("u", "phone", "s1"), T0 + 230_000)
    fx = engine.tick(T0 + 200_000 + TIMEOUT)
    assert timed_out(fx) == [("u", "tablet")]
    assert device_status(engine, "phone") == "online"


# --------------------------------------------------------------------------------------------
# Idle time


def test_idle_ms_takes_device_away_then_offline(engine: Engine, clock: FakeClock) -> None:
    engine.handle(Birth("u", "laptop", "s1"), clock.t)
    engine.handle(Heartbeat("u", "laptop", "s1", idle_ms=0), clock.advance(HB))
    last_input = clock.t
    fx: list[Effect] = []
    while clock.t < last_input + OFFLINE_AFTER:
        clock.advance(HB)
        fx += engine.tick(clock.t)
        fx += engine.handle(Heartbeat("u", "laptop", "s1", idle_ms=clock.t - last_input), clock.t)
        if clock.t - last_input < AWAY:
            assert device_status(engine, "laptop") == "online"
        elif clock.t - last_input < OFFLINE_AFTER:
            assert device_status(engine, "laptop") == "away"
    assert device_status(engine, "laptop") == "offline"
    assert status(engine) == "offline"
    assert timed_out(fx) == []  # still connected, just idle
    assert [e[1:] for e in events(fx) if e[0] == "statusChange"] == [
        ("online", "away"), ("away", "offline")
    ]


def test_heartbeat_with_small_idle_brings_an_away_device_back(engine: Engine) -> None:
    engine.handle(Birth("u", "laptop", "s1"), T0)
    engine.handle(Heartbeat("u", "laptop", "s1", idle_ms=AWAY + 10_000), T0 + AWAY + 10_000)
    engine.tick(T0 + AWAY + 10_000)
    assert device_status(engine, "laptop") == "away"
    fx = engine.handle(Heartbeat("u", "laptop", "s1", idle_ms=2_000), T0 + AWAY + 40_000)
    assert device_status(engine, "laptop") == "online"
    assert events(fx) == [("statusChange", "away", "online")]


def test_heartbeat_without_idle_ms_proves_liveness_only(engine: Engine, clock: FakeClock) -> None:
    engine.handle(Birth("u", "pi", "s1"), clock.t)
    plain = [Heartbeat("u", "pi", "s1")]
    fx = run_until(engine, clock, T0 + AWAY - 1, plain)
    assert device_status(engine, "pi") == "online"
    fx += run_until(engine, clock, T0 + AWAY, plain, every=1)
    assert device_status(engine, "pi") == "away"
    fx += run_until(engine, clock, T0 + OFFLINE_AFTER, plain)
    assert device_status(engine, "pi") == "offline"
    assert timed_out(fx) == []


def test_idle_counts_from_the_latest_of_birth_activity_and_heartbeat(
    engine: Engine, clock: FakeClock
) -> None:
    engine.handle(Birth("u", "laptop", "s1"), T0)
    # the OS says idle for an hour, but the device was born just now: idle counts from birth
    engine.handle(Heartbeat("u", "laptop", "s1", idle_ms=OFFLINE_AFTER), clock.advance(HB))
    assert device_status(engine, "laptop") == "online"
    engine.handle(ActivityEvent("u", "message", "laptop"), clock.advance(40_000))
    # an older idle report does not move the clock back
    engine.handle(Heartbeat("u", "laptop", "s1", idle_ms=200_000), clock.advance(20_000))
    plain = [Heartbeat("u", "laptop", "s1")]
    assert run_until(engine, clock, T0 + 70_000 + AWAY - 1, plain) == []
    run_until(engine, clock, T0 + 70_000 + AWAY, plain)  # idle since the activity
    assert device_status(engine, "laptop") == "away"


def test_virtual_device_goes_away_and_offline_by_silence(engine: Engine) -> None:
    engine.handle(ActivityEvent("u", "message", None, "telegram-1"), T0)
    (d,) = engine.get_devices("u")
    assert (d.id, d.virtual, d.status) == ("telegram-1", True, "online")
    assert engine.tick(T0 + AWAY - 1) == ()
    fx = engine.tick(T0 + AWAY)
    assert device_status(engine, "telegram-1") == "away"
    assert events(fx) == [("statusChange", "online", "away")]
    fx = engine.tick(T0 + OFFLINE_AFTER)
    assert device_status(engine, "telegram-1") == "offline"
    assert timed_out(fx) == []  # no connection, no heartbeat timeout


def test_activity_far_in_the_future_is_clamped_to_receive_time(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    fx = engine.handle(ActivityEvent("u", "message", "phone", "c", T0 + 10 * 86_400_000), T0 + 5)
    (rec,) = [e.activity for e in fx if isinstance(e, RecordActivity)]
    assert (rec.timestamp, rec.received_at) == (T0 + 5, T0 + 5)
    assert engine.counters["clock_skew_clamped"] == 1


def test_activity_older_than_the_last_interaction_is_history_only(
    engine: Engine, clock: FakeClock
) -> None:
    """Replayed from an outbox a day late: logged with its own time, but it moves no idle
    clock (the user did not just do it)."""
    engine.handle(Birth("u", "phone", "s1"), T0)
    plain = [Heartbeat("u", "phone", "s1")]
    run_until(engine, clock, T0 + 200_000, plain)
    fx = engine.handle(ActivityEvent("u", "message", "phone", "c", T0 - 86_400_000), clock.t)
    (rec,) = [e.activity for e in fx if isinstance(e, RecordActivity)]
    assert (rec.timestamp, rec.received_at) == (T0 - 86_400_000, T0 + 200_000)
    assert publishes(fx) == []
    run_until(engine, clock, T0 + AWAY, plain)
    assert device_status(engine, "phone") == "away"  # idle from the birth, not the replay


def test_negative_idle_counts_as_interaction_now(engine: Engine) -> None:
    # the wire refuses idleMs < 0; the engine still never lets a device's idle clock run
    # into the future
    clock = FakeClock(T0)
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(Heartbeat("u", "phone", "s1", idle_ms=-10 * AWAY), clock.advance(HB))
    plain = [Heartbeat("u", "phone", "s1")]
    assert run_until(engine, clock, T0 + HB + AWAY - 1, plain) == []
    run_until(engine, clock, T0 + HB + AWAY, plain)
    assert device_status(engine, "phone") == "away"


# --------------------------------------------------------------------------------------------
# User status


def test_user_is_offline_when_no_device_is_online_or_away(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(Birth("u", "b", "s2"), T0)
    engine.handle(DeviceOffline("u", "a", "s1"), T0 + 1)
    assert status(engine) == "online"
    engine.handle(DeviceOffline("u", "b", "s2"), T0 + 2)
    assert status(engine) == "offline"


def test_user_is_away_when_every_present_device_is_away(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(Birth("u", "b", "s2"), T0 + 60_000)
    beats = [Heartbeat("u", "a", "s1"), Heartbeat("u", "b", "s2")]
    clock = FakeClock(T0 + 60_000)
    run_until(engine, clock, T0 + AWAY, beats)
    assert (device_status(engine, "a"), device_status(engine, "b"), status(engine)) == (
        "away", "online", "online")
    run_until(engine, clock, T0 + 60_000 + AWAY, beats)
    assert status(engine) == "away"


def test_manual_dnd_persists_while_devices_come_and_go(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    fx = engine.handle(SetStatus("u", "dnd", "phone"), T0 + 1_000)
    assert status(engine) == "dnd"
    assert events(fx) == [("statusChange", "online", "dnd")]
    engine.handle(Birth("u", "laptop", "l1"), T0 + 2_000)
    assert status(engine) == "dnd"  # a new device does not lift it
    engine.handle(DeviceOffline("u", "phone", "s1"), T0 + 3_000)
    assert status(engine) == "dnd"
    fx = engine.handle(DeviceOffline("u", "laptop", "l1"), T0 + 4_000)
    assert status(engine) == "offline"  # no device present
    assert events(fx) == [("statusChange", "dnd", "offline"), ("offline", "dnd", "offline")]
    assert engine.get_online_users(None, T0 + 4_000) == []
    fx = engine.handle(Birth("u", "phone", "s2"), T0 + 5_000)
    assert status(engine) == "dnd"  # dnd again when one returns
    assert events(fx) == [("statusChange", "offline", "dnd"), ("online", "offline", "dnd")]


def test_manual_away_wins_over_an_online_device(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(SetStatus("u", "away", "phone"), T0 + 1)
    assert (status(engine), device_status(engine, "phone")) == ("away", "online")


def test_invisible_user_looks_offline_and_is_not_in_who_is_online(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(Birth("v", "phone", "s2"), T0)
    fx = engine.handle(SetStatus("u", "offline", "phone"), T0 + 1)
    assert status(engine) == "offline"
    assert device_status(engine, "phone") == "online"  # the device is still there
    assert events(fx) == [("statusChange", "online", "offline"), ("offline", "online", "offline")]
    assert publishes(fx)[0].state.status == "offline"
    assert [u.user_id for u in engine.get_online_users(None, T0 + 1)] == ["v"]
    fx = engine.handle(SetStatus("u", "online", "phone"), T0 + 2)
    assert status(engine) == "online"
    assert events(fx) == [("statusChange", "offline", "online"), ("online", "offline", "online")]


def test_setting_online_clears_the_manual_status(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(SetStatus("u", "dnd", "phone"), T0 + 1)
    engine.handle(SetStatus("u", "online", "phone"), T0 + 2)
    assert status(engine) == "online"
    run_until(engine, FakeClock(T0 + 2), T0 + 2 + AWAY, [Heartbeat("u", "phone", "s1")])
    assert status(engine) == "away"  # derived again, no manual status left
    assert engine.take_dirty()[0].manual_status is None


def test_every_device_offline_then_one_returns(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(Birth("u", "b", "s2"), T0)
    engine.tick(T0 + TIMEOUT)
    assert status(engine) == "offline"
    fx = engine.handle(Birth("u", "b", "s3"), T0 + 100_000)
    assert status(engine) == "online"
    assert primary(engine) == "b"
    assert events(fx) == [("statusChange", "offline", "online"), ("online", "offline", "online")]


def test_status_set_through_the_api_with_no_device_present_uses_the_api_device(
    engine: Engine,
) -> None:
    fx = engine.handle(SetStatus("u", "dnd"), T0)
    assert status(engine) == "dnd"
    assert [(d.id, d.virtual) for d in engine.get_devices("u")] == [("api", True)]
    assert events(fx)[0] == ("statusChange", "offline", "dnd")
    engine.tick(T0 + OFFLINE_AFTER)  # the API device has idle timers like any virtual device
    assert status(engine) == "offline"


def test_api_status_change_of_an_invisible_user_adds_no_virtual_device(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(SetStatus("u", "offline"), T0 + 1)
    engine.handle(SetStatus("u", "dnd"), T0 + 2)
    assert status(engine) == "dnd"
    assert [d.id for d in engine.get_devices("u")] == ["phone"]


def test_invisible_through_the_api_with_no_device_creates_nothing(engine: Engine) -> None:
    engine.handle(SetStatus("u", "offline"), T0)
    assert engine.get_devices("u") == []
    assert status(engine) == "offline"


def test_set_status_from_a_device_is_an_interaction(engine: Engine) -> None:
    clock = FakeClock(T0)
    engine.handle(Birth("u", "phone", "s1"), T0)
    plain = [Heartbeat("u", "phone", "s1")]
    run_until(engine, clock, T0 + 200_000, plain)
    engine.handle(SetStatus("u", "dnd", "phone"), clock.t)
    run_until(engine, clock, T0 + 200_000 + AWAY - 1, plain)
    assert device_status(engine, "phone") == "online"
    run_until(engine, clock, T0 + 200_000 + AWAY, plain)
    assert device_status(engine, "phone") == "away"


def test_unknown_status_is_refused(engine: Engine) -> None:
    with pytest.raises(EngineError, match="unknown status"):
        engine.handle(SetStatus("u", "busy"), T0)  # type: ignore[arg-type]
    assert not engine.has_user("u")


# --------------------------------------------------------------------------------------------
# Primary device


def test_primary_is_the_present_device_with_the_latest_interaction(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(Birth("u", "b", "s2"), T0 + 1_000)
    assert primary(engine) == "a"  # b is newer, but not by more than the hysteresis
    engine.handle(Birth("u", "c", "s3"), T0 + HB + 1)
    assert primary(engine) == "c"
    snap = engine.snapshot("u")
    assert snap is not None
    assert [(d.id, d.is_active) for d in snap.devices] == [("a", False), ("b", False), ("c", True)]


def test_two_devices_in_use_at_once_do_not_flap_the_primary(engine: Engine) -> None:
    engine.handle(Birth("u", "laptop", "l1"), T0)
    engine.handle(Birth("u", "phone", "p1"), T0 + 5_000)
    first = primary(engine)
    fx: list[Effect] = []
    # both in use: each reports a few seconds of idle, the phone 15 s after the laptop
    for k in range(1, 200):
        t = T0 + k * HB
        fx += engine.handle(Heartbeat("u", "laptop", "l1", idle_ms=(k * 7_919) % 9_000), t)
        fx += engine.tick(t + 15_000)
        fx += engine.handle(Heartbeat("u", "phone", "p1", idle_ms=(k * 4_001) % 9_000), t + 15_000)
    assert publishes(fx) == []
    assert primary(engine) == first
    assert status(engine) == "online"


def test_activity_moves_the_primary_at_once(engine: Engine) -> None:
    engine.handle(Birth("u", "laptop", "l1"), T0)
    engine.handle(Birth("u", "phone", "p1"), T0 + 1_000)
    assert primary(engine) == "laptop"
    fx = engine.handle(ActivityEvent("u", "message", "phone", "chat"), T0 + 2_000)
    assert primary(engine) == "phone"
    assert publishes(fx)[0].state.active_device == "phone"
    # and the laptop in use a moment later does not take it straight back
    engine.handle(Heartbeat("u", "laptop", "l1", idle_ms=0), T0 + 3_000)
    assert primary(engine) == "phone"


def test_primary_moves_when_another_device_leads_by_more_than_the_hysteresis(
    engine: Engine,
) -> None:
    engine.handle(Birth("u", "laptop", "l1"), T0)
    engine.handle(Birth("u", "phone", "p1"), T0)
    assert primary(engine) == "laptop"
    assert engine.handle(Heartbeat("u", "phone", "p1", idle_ms=0), T0 + HB) == ()
    fx = engine.handle(Heartbeat("u", "phone", "p1", idle_ms=0), T0 + HB + 1)
    assert primary(engine) == "phone"
    assert len(publishes(fx)) == 1


def test_primary_hysteresis_is_configurable() -> None:
    engine = Engine(EngineConfig(primary_hysteresis_ms=0))
    engine.handle(Birth("u", "laptop", "l1"), T0)
    engine.handle(Birth("u", "phone", "p1"), T0 + 1)
    assert primary(engine) == "phone"


def test_last_primary_stays_named_when_no_device_is_present(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(Birth("u", "b", "s2"), T0 + 40_000)
    assert primary(engine) == "b"
    engine.handle(DeviceOffline("u", "a", "s1"), T0 + 50_000)
    engine.handle(DeviceOffline("u", "b", "s2"), T0 + 60_000)
    assert (status(engine), primary(engine)) == ("offline", "b")
    engine.handle(Birth("u", "a", "s3"), T0 + 70_000)
    assert primary(engine) == "a"


def test_primary_leaves_a_device_that_goes_offline(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(Birth("u", "b", "s2"), T0 + 1_000)
    engine.handle(ActivityEvent("u", "message", "a"), T0 + 2_000)
    engine.handle(DeviceOffline("u", "a", "s1"), T0 + 3_000)
    assert primary(engine) == "b"


# --------------------------------------------------------------------------------------------
# Version


def test_version_moves_only_when_published_state_changes(engine: Engine, clock: FakeClock) -> None:
    engine.handle(Birth("u", "phone", "s1"), clock.t)
    v = engine.get_status("u").version
    fx = run_until(engine, clock, T0 + AWAY - 1, [Heartbeat("u", "phone", "s1", idle_ms=1_000)])
    assert publishes(fx) == []  # lastSeen moved every heartbeat; nothing published
    assert engine.get_status("u").version == v
    assert engine.get_status("u").last_seen == clock.t - (clock.t - T0) % HB


def test_republishing_unchanged_state_does_not_bump_the_version(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(SetCustomStatus("u", "Trading"), T0 + 1)
    v = engine.get_status("u").version
    assert engine.handle(SetCustomStatus("u", "Trading"), T0 + 2) == ()
    assert engine.handle(SetCustomStatus("u", "  Trading "), T0 + 3) == ()
    assert engine.handle(SetStatus("u", "online"), T0 + 4) == ()
    assert engine.get_status("u").version == v


def test_each_published_change_bumps_the_version_by_one(engine: Engine) -> None:
    versions = []
    sequence: list[Event] = [
        Birth("u", "phone", "s1"),
        SetCustomStatus("u", "Lunch"),
        SetStatus("u", "dnd", "phone"),
        Birth("u", "laptop", "l1", "Laptop"),
        SetCustomStatus("u", None),
    ]
    for i, ev in enumerate(sequence):
        (pub,) = publishes(engine.handle(ev, T0 + i))
        versions.append(pub.state.version)
    assert versions == [1, 2, 3, 4, 5]


def test_device_name_change_is_published(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1", "Phone"), T0)
    (pub,) = publishes(engine.handle(Birth("u", "phone", "s2", "Anna's phone"), T0 + 1))
    assert pub.state.devices[0].name == "Anna's phone"
    assert pub.state.version == 2


def test_sync_forces_a_publish_with_the_same_version(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    v = engine.get_status("u").version
    fx = engine.handle(SyncRequest("u"), T0 + 10)
    (pub,) = publishes(fx)
    assert (pub.forced, pub.state.version) == (True, v)
    assert engine.get_sync_status("u").last_sync == T0 + 10


# --------------------------------------------------------------------------------------------
# Sync status and acks


def test_sync_status_counts_acks_of_the_current_version(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(Birth("u", "b", "s2"), T0)
    v = engine.get_status("u").version
    engine.handle(Ack("u", "a", v), T0 + 1)
    engine.handle(Ack("u", "b", v - 1), T0 + 1)
    s = engine.get_sync_status("u")
    assert (s.synced, s.total, s.version) == (1, 2, v)
    engine.handle(Ack("u", "b", v), T0 + 2)
    assert engine.get_sync_status("u").synced == 2
    engine.handle(SetCustomStatus("u", "new"), T0 + 3)  # new version: nobody has it yet
    assert engine.get_sync_status("u").synced == 0


def test_virtual_devices_are_not_counted_in_the_sync_total(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(ActivityEvent("u", "message", None, "telegram-1"), T0)
    engine.handle(SetDeviceStatus("u", "panel", "online"), T0)
    assert engine.get_sync_status("u").total == 1


def test_ack_of_a_future_version_or_unknown_device_is_refused(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    v = engine.get_status("u").version
    engine.handle(Ack("u", "a", v + 5), T0 + 1)
    engine.handle(Ack("u", "nope", v), T0 + 1)
    assert engine.get_sync_status("u").synced == 0
    assert engine.counters["ack_future_version"] == 1
    assert engine.counters["ack_unknown_device"] == 1


def test_sync_status_of_an_unknown_user_is_empty(engine: Engine) -> None:
    s = engine.get_sync_status("ghost")
    assert (s.synced, s.total, s.version, s.last_sync) == (0, 0, 0, None)


# --------------------------------------------------------------------------------------------
# Who is online


def test_who_is_online_lists_online_away_and_dnd_users(engine: Engine) -> None:
    engine.handle(Birth("on", "d", "s1"), T0)
    engine.handle(Birth("dnd", "d", "s2"), T0)
    engine.handle(SetStatus("dnd", "dnd", "d"), T0)
    engine.handle(Birth("aw", "d", "s3"), T0)
    engine.handle(SetStatus("aw", "away", "d"), T0)
    engine.handle(Birth("off", "d", "s4"), T0)
    engine.handle(DeviceOffline("off", "d", "s4"), T0)
    online = engine.get_online_users(None, T0)
    assert [(u.user_id, u.status) for u in online] == [
        ("aw", "away"), ("dnd", "dnd"), ("on", "online")
    ]


def test_who_is_online_on_a_channel_needs_activity_there_within_offline_after(
    engine: Engine,
) -> None:
    engine.handle(Birth("a", "d", "s1"), T0)
    engine.handle(ActivityEvent("a", "message", "d", "telegram-1"), T0)
    engine.handle(Birth("b", "d", "s2"), T0)
    engine.handle(ActivityEvent("b", "message", "d", "slack-1"), T0)
    assert [u.user_id for u in engine.get_online_users("telegram-1", T0)] == ["a"]
    engine.handle(ActivityEvent("b", "message", "d", "telegram-1"), T0 + 10)
    assert [u.user_id for u in engine.get_online_users("telegram-1", T0 + 10)] == ["a", "b"]
    # a stays present (heartbeats with idleMs), but its channel activity ages out
    late = T0 + OFFLINE_AFTER + 1
    engine.handle(Heartbeat("a", "d", "s1", idle_ms=0), late - HB)
    engine.handle(Heartbeat("b", "d", "s2", idle_ms=0), late - HB)
    assert status(engine, "a") == "online"
    assert [u.user_id for u in engine.get_online_users("telegram-1", late)] == ["b"]
    assert engine.get_online_users("nobody-here", late) == []


# --------------------------------------------------------------------------------------------
# Events


def test_events_match_status_changes_exactly(engine: Engine) -> None:
    seen: list[tuple[str, str, str]] = []
    steps: list[tuple[Event, int]] = [
        (Birth("u", "phone", "s1"), T0),
        (Heartbeat("u", "phone", "s1"), T0 + HB),
        (SetStatus("u", "dnd", "phone"), T0 + HB + 1),
        (SetStatus("u", "dnd", "phone"), T0 + HB + 2),
        (SetStatus("u", "offline", "phone"), T0 + HB + 3),
        (SetStatus("u", "online", "phone"), T0 + HB + 4),
        (DeviceOffline("u", "phone", "s1"), T0 + HB + 5),
    ]
    for ev, t in steps:
        seen += events(engine.handle(ev, t))
    assert seen == [
        ("statusChange", "offline", "online"), ("online", "offline", "online"),
        ("statusChange", "online", "dnd"),
        ("statusChange", "dnd", "offline"), ("offline", "dnd", "offline"),
        ("statusChange", "offline", "online"), ("online", "offline", "online"),
        ("statusChange", "online", "offline"), ("offline", "online", "offline"),
    ]


def test_events_carry_the_hub_time(engine: Engine) -> None:
    fx = engine.handle(Birth("u", "phone", "s1"), T0 + 42)
    assert {e.ts for e in fx if isinstance(e, EmitEvent)} == {T0 + 42}


# --------------------------------------------------------------------------------------------
# Device status set through the API


def test_set_device_status_makes_a_virtual_device_with_idle_timers(engine: Engine) -> None:
    engine.handle(SetDeviceStatus("u", "panel", "online"), T0)
    (d,) = engine.get_devices("u")
    assert (d.id, d.status, d.virtual, d.is_active) == ("panel", "online", True, True)
    assert engine.tick(T0 + AWAY - 1) == ()
    engine.tick(T0 + AWAY)
    assert device_status(engine, "panel") == "away"
    engine.tick(T0 + OFFLINE_AFTER)
    assert device_status(engine, "panel") == "offline"


def test_set_device_status_away_turns_offline_when_idle_reaches_offline_after(
    engine: Engine,
) -> None:
    engine.handle(SetDeviceStatus("u", "panel", "away"), T0)
    assert (device_status(engine, "panel"), status(engine)) == ("away", "away")
    assert engine.tick(T0 + OFFLINE_AFTER - AWAY - 1) == ()
    engine.tick(T0 + OFFLINE_AFTER - AWAY)
    assert device_status(engine, "panel") == "offline"


def test_set_device_status_offline_takes_a_device_out(engine: Engine) -> None:
    engine.handle(SetDeviceStatus("u", "panel", "online"), T0)
    engine.handle(SetDeviceStatus("u", "panel", "offline"), T0 + 1)
    assert (device_status(engine, "panel"), status(engine)) == ("offline", "offline")
    assert engine.tick(T0 + OFFLINE_AFTER * 2) == ()  # no timer left that changes anything


def test_set_device_status_on_a_real_device_holds_until_it_speaks_again(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(SetDeviceStatus("u", "phone", "away"), T0 + 1_000)
    assert device_status(engine, "phone") == "away"
    assert engine.get_devices("u")[0].virtual
    assert timed_out(engine.tick(T0 + 1_000 + TIMEOUT)) == []  # no connection claim
    fx = engine.handle(Heartbeat("u", "phone", "s1", idle_ms=0), T0 + 100_000)
    assert device_status(engine, "phone") == "online"
    assert not engine.get_devices("u")[0].virtual  # a real, connected device again
    assert engine.get_sync_status("u").total == 1
    assert events(fx) == [("statusChange", "away", "online")]
    # so its silence times it out again
    assert timed_out(engine.tick(T0 + 100_000 + TIMEOUT)) == [("u", "phone")]


def test_set_device_status_refuses_dnd(engine: Engine) -> None:
    with pytest.raises(EngineError, match="unknown device status"):
        engine.handle(SetDeviceStatus("u", "panel", "dnd"), T0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Removing devices, limits, custom status


def test_remove_device_drops_it_and_its_timers(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(Birth("u", "b", "s2"), T0 + 1)
    engine.handle(ActivityEvent("u", "message", "a"), T0 + 2)
    fx = engine.handle(RemoveDevice("u", "a"), T0 + 3)
    assert [d.id for d in engine.get_devices("u")] == ["b"]
    assert primary(engine) == "b"
    assert publishes(fx)[0].state.active_device == "b"
    assert timed_out(engine.tick(T0 + 1 + TIMEOUT)) == [("u", "b")]  # nothing for a
    # a late will of the removed device's session is stale
    assert engine.handle(DeviceOffline("u", "a", "s1"), T0 + 200_000) == ()


def test_removing_an_unknown_device_is_refused(engine: Engine) -> None:
    with pytest.raises(EngineError, match="no device"):
        engine.handle(RemoveDevice("u", "ghost"), T0)


def test_devices_beyond_the_limit_are_refused() -> None:
    engine = Engine(EngineConfig(max_devices_per_user=2))
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(Birth("u", "b", "s2"), T0)
    assert engine.handle(Birth("u", "c", "s3"), T0) == ()
    assert engine.handle(Heartbeat("u", "c", "s3"), T0) == ()
    assert engine.counters["too_many_devices"] == 2
    assert [d.id for d in engine.get_devices("u")] == ["a", "b"]
    with pytest.raises(EngineError, match="already has 2 devices"):
        engine.handle(SetDeviceStatus("u", "c", "online"), T0)
    engine.handle(Birth("v", "c", "s4"), T0)  # the limit is per user
    assert [d.id for d in engine.get_devices("v")] == ["c"]


def test_custom_status_is_trimmed_limited_and_clearable(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    (pub,) = publishes(engine.handle(SetCustomStatus("u", "  In a meeting "), T0 + 1))
    assert pub.state.custom_status == "In a meeting"
    with pytest.raises(EngineError, match="limit is 256"):
        engine.handle(SetCustomStatus("u", "x" * 257), T0 + 2)
    assert engine.get_status("u").custom_status == "In a meeting"
    engine.handle(SetCustomStatus("u", "x" * 256), T0 + 3)
    engine.handle(SetCustomStatus("u", "   "), T0 + 4)  # blank clears
    assert engine.get_status("u").custom_status is None
    engine.handle(SetCustomStatus("u", "back"), T0 + 5)
    (pub,) = publishes(engine.handle(SetCustomStatus("u", None), T0 + 6))
    assert pub.state.custom_status is None


def test_custom_status_limit_is_configurable() -> None:
    engine = Engine(EngineConfig(max_custom_status=5))
    engine.handle(SetCustomStatus("u", "12345"), T0)
    with pytest.raises(EngineError):
        engine.handle(SetCustomStatus("u", "123456"), T0)


def test_config_refuses_impossible_timers() -> None:
    with pytest.raises(ValueError, match="offline_after_ms"):
        EngineConfig(away_after_ms=10, offline_after_ms=5)
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        EngineConfig(heartbeat_interval_ms=0)
    with pytest.raises(ValueError, match="heartbeat_timeout_ms"):
        EngineConfig(heartbeat_timeout_ms=-1)


# --------------------------------------------------------------------------------------------
# Persistence: take_dirty and load


def restart(engine: Engine, store: dict[str, UserRecord], now: int) -> tuple[Engine, list[Effect]]:
    """Flush what is dirty into ``store`` and load it into a fresh engine at ``now``."""
    for rec in engine.take_dirty():
        store[rec.id] = rec
    fresh = Engine(engine.config)
    fx = list(fresh.load(list(store.values()), now))
    return fresh, fx


def test_a_stored_users_json_is_the_records_own_with_any_text(engine: Engine) -> None:
    """The flush writes the engine's plain UserDoc without building the record; what it
    writes must be exactly what the record writes (quotes, newlines, non-ASCII), and load
    back as the same record."""
    engine.handle(Birth("u", "a", "s1", name='Zoë\'s "phone"\n', heartbeat_ms=10_000,
                        ts=7), T0)
    engine.handle(ActivityEvent("u", "message", "a", "tg", T0), T0)
    engine.handle(SetCustomStatus("u", "Café ☕ \u2028 \\o/"), T0)
    (doc,) = engine.take_dirty_docs()
    record = doc.record()
    assert doc.to_json() == record.to_json()
    assert UserRecord.model_validate_json(doc.to_json()) == record
    assert (record.custom_status, record.devices[0].name) == ("Café ☕ \u2028 \\o/",
                                                              'Zoë\'s "phone"\n')


def test_take_dirty_returns_each_changed_user_once(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(Birth("v", "a", "s2"), T0)
    assert sorted(r.id for r in engine.take_dirty()) == ["u", "v"]
    assert engine.take_dirty() == []
    engine.handle(Heartbeat("u", "a", "s1"), T0 + HB)  # liveness alone is not written
    assert engine.take_dirty() == []
    engine.handle(SetCustomStatus("u", "x"), T0 + HB)
    (rec,) = engine.take_dirty()
    assert (rec.id, rec.custom_status, rec.status) == ("u", "x", "online")


def test_restart_gives_connected_devices_one_timeout_of_grace(engine: Engine) -> None:
    store: dict[str, UserRecord] = {}
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(Birth("u", "tablet", "t1"), T0)
    engine.handle(DeviceOffline("u", "tablet", "t1"), T0 + 1)
    # the hub is down for longer than a heartbeat timeout
    down_until = T0 + 3 * TIMEOUT
    fresh, fx = restart(engine, store, down_until)
    assert timed_out(fx) == [] and publishes(fx) == []  # no false offline
    assert device_status(fresh, "phone") == "online"
    assert device_status(fresh, "tablet") == "offline"
    # the device's heartbeats carry on in the same session
    assert fresh.handle(Heartbeat("u", "phone", "s1"), down_until + HB) == ()
    assert timed_out(fresh.tick(down_until + HB + TIMEOUT)) == [("u", "phone")]


def test_silent_device_times_out_one_timeout_after_restart(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    fresh, _ = restart(engine, {}, T0 + 10_000)
    assert fresh.tick(T0 + 10_000 + TIMEOUT - 1) == ()
    assert timed_out(fresh.tick(T0 + 10_000 + TIMEOUT)) == [("u", "phone")]


def test_unchanged_user_keeps_its_version_after_load(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1", "Phone"), T0)
    engine.handle(SetCustomStatus("u", "Lunch"), T0 + 1)
    engine.handle(SetStatus("u", "dnd", "phone"), T0 + 2)
    engine.handle(Ack("u", "phone", 3), T0 + 3)
    before = engine.snapshot("u")
    fresh, fx = restart(engine, {}, T0 + 20_000)
    assert fx == []
    after = fresh.snapshot("u")
    assert before is not None and after is not None
    assert after.model().model_copy(update={"last_seen": None, "devices": []}) == before.model().model_copy(
        update={"last_seen": None, "devices": []})
    assert [(d.id, d.name, d.status, d.is_active) for d in after.devices] == [
        ("phone", "Phone", "online", True)]
    assert fresh.get_sync_status("u") == engine.get_sync_status("u")
    assert fresh.take_dirty() == []


def test_a_restart_changes_no_status_until_the_device_is_heard(engine: Engine) -> None:
    """Down past the away time: nothing changes at load (no event storm); the device's first
    heartbeat then lets its idle clock speak, and that transition is real."""
    engine.handle(Birth("u", "phone", "s1"), T0)
    v = engine.get_status("u").version
    back = T0 + AWAY + 5_000
    fresh, fx = restart(engine, {}, back)
    assert (device_status(fresh, "phone"), fx) == ("online", [])
    assert fresh.tick(back + TIMEOUT - 1) == ()
    fx = fresh.handle(Heartbeat("u", "phone", "s1"), back + 1_000)
    (pub,) = publishes(fx)
    assert (pub.state.status, pub.state.version) == ("away", v + 1)
    assert events(fx) == [("statusChange", "online", "away")]
    # and the store learns the new state, so a second restart does not repeat the event
    (rec,) = fresh.take_dirty()
    assert (rec.status, rec.version) == ("away", v + 1)


def test_a_device_not_heard_within_the_restart_grace_times_out(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    back = T0 + AWAY + 5_000
    fresh, _ = restart(engine, {}, back)
    fx = fresh.tick(back + TIMEOUT)
    assert timed_out(fx) == [("u", "phone")]
    assert events(fx) == [("statusChange", "online", "offline"), ("offline", "online", "offline")]


def test_a_record_inconsistent_with_its_devices_is_corrected_at_load(engine: Engine) -> None:
    """Load skips re-deriving users whose devices did not change, but not one whose stored
    status or primary contradicts its devices (a hand-edited or foreign file)."""
    from hub.core.models import DeviceRecord

    stale = UserRecord(id="u", name="u", status="online", active_device="gone", version=4,
                       devices=[DeviceRecord(id="d", name="d", status="offline", last_seen=T0)])
    fx = engine.load([stale], T0 + 1_000)
    state = engine.snapshot("u")
    assert state is not None and (state.status, state.active_device) == ("offline", None)
    assert [p.state.status for p in publishes(fx)] == ["offline"]


def test_loading_over_live_state_leaves_no_stray_timers(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    records = engine.take_dirty()
    engine.load(records, T0 + 1_000)
    fx = engine.tick(T0 + 1_000 + TIMEOUT)
    assert timed_out(fx) == [("u", "phone")]  # once, from the loaded device only
    assert status(engine) == "offline"


def test_idle_clock_moved_by_heartbeats_is_persisted_before_it_matters(engine: Engine) -> None:
    store: dict[str, UserRecord] = {}
    clock = FakeClock(T0)
    engine.handle(Birth("u", "laptop", "s1"), T0)
    # the user works for four minutes: heartbeats move the idle clock, without a write each
    for _ in range(8):
        clock.advance(HB)
        engine.tick(clock.t)
        engine.handle(Heartbeat("u", "laptop", "s1", idle_ms=1_000), clock.t)
        for rec in engine.take_dirty():  # the service flushes now and then
            store[rec.id] = rec
    last_input = clock.t - 1_000
    # ...then stops; the laptop keeps reporting its growing idle time
    while clock.t < last_input + AWAY - HB:
        clock.advance(HB)
        engine.tick(clock.t)
        engine.handle(Heartbeat("u", "laptop", "s1", idle_ms=clock.t - last_input), clock.t)
        for rec in engine.take_dirty():
            store[rec.id] = rec
        # a restart at any moment sees what the running hub sees
        fresh, fx = restart(engine, store, clock.t)
        assert (device_status(fresh, "laptop"), fx) == (device_status(engine, "laptop"), [])
    assert device_status(engine, "laptop") == "online"
    fresh, _ = restart(engine, store, clock.t)
    fresh.handle(Heartbeat("u", "laptop", "s1"), clock.t)  # heard: its timers act again
    run_until(fresh, clock, last_input + AWAY - 1, [Heartbeat("u", "laptop", "s1")])
    assert device_status(fresh, "laptop") == "online"
    run_until(fresh, clock, last_input + AWAY, [Heartbeat("u", "laptop", "s1")])
    assert device_status(fresh, "laptop") == "away"


def test_restart_just_after_a_user_returns_from_a_long_idle_does_not_turn_them_away(
    engine: Engine,
) -> None:
    clock = FakeClock(T0)
    store: dict[str, UserRecord] = {}
    engine.handle(Birth("u", "laptop", "s1"), T0)
    while clock.t < T0 + AWAY - 2 * HB:  # idle, the device says so
        clock.advance(HB)
        engine.tick(clock.t)
        engine.handle(Heartbeat("u", "laptop", "s1", idle_ms=clock.t - T0), clock.t)
        for rec in engine.take_dirty():  # the service flushes now and then
            store[rec.id] = rec
    engine.handle(Heartbeat("u", "laptop", "s1", idle_ms=0), clock.advance(HB))  # back
    fresh, fx = restart(engine, store, clock.advance(1_000))
    assert fx == []
    fx = run_until(fresh, clock, clock.t + AWAY - HB, [Heartbeat("u", "laptop", "s1", idle_ms=0)])
    assert publishes(fx) == []
    assert device_status(fresh, "laptop") == "online"


def test_restart_keeps_the_primary(engine: Engine) -> None:
    store: dict[str, UserRecord] = {}
    engine.handle(Birth("u", "laptop", "l1"), T0)
    # in use: its idle clock moves (not yet written), so the phone does not take over
    engine.handle(Heartbeat("u", "laptop", "l1", idle_ms=0), T0 + HB)
    engine.handle(Birth("u", "phone", "p1"), T0 + HB + 5_000)
    assert primary(engine) == "laptop"
    fresh, fx = restart(engine, store, T0 + 45_000)
    assert primary(fresh) == "laptop"
    assert fx == []


def test_records_round_trip_every_field(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1", "Phone"), T0)
    engine.handle(ActivityEvent("u", "message", "phone", "telegram-1"), T0 + 1)
    engine.handle(SetStatus("u", "dnd", "phone"), T0 + 2)
    engine.handle(SetCustomStatus("u", "busy"), T0 + 3)
    engine.handle(SyncRequest("u"), T0 + 4)
    engine.handle(Ack("u", "phone", engine.get_status("u").version), T0 + 5)
    (rec,) = engine.take_dirty()
    again = UserRecord.model_validate_json(rec.model_dump_json(by_alias=True))
    fresh = Engine()
    fresh.load([again], T0 + 6)
    (rec2,) = [fresh._doc(fresh._users["u"]).record()]
    assert rec2.model_dump(exclude={"devices"}) == rec.model_dump(exclude={"devices"})
    d1, d2 = rec.devices[0].model_dump(), rec2.devices[0].model_dump()
    assert d2.pop("last_seen") == T0 + 6  # connected: one timeout of grace from the load
    d1.pop("last_seen")
    assert d1 == d2


# --------------------------------------------------------------------------------------------
# Deadlines


def test_thousands_of_devices_expiring_at_once_all_expire_in_one_tick(engine: Engine) -> None:
    n = 5_000
    for i in range(n):
        engine.handle(Birth(f"u{i // 2}", f"d{i % 2}", f"s{i}"), T0)
    assert engine.next_deadline() == T0 + TIMEOUT
    fx = engine.tick(T0 + TIMEOUT)
    assert len(timed_out(fx)) == n
    assert all(d.status == "offline" for u in engine.user_ids() for d in engine.get_devices(u))
    assert len(publishes(fx)) == n // 2  # one per user, not one per device
    assert engine.next_deadline() is None
    assert engine.tick(T0 + 10 * OFFLINE_AFTER) == ()


def test_a_mass_expiry_in_slices_ends_where_one_tick_ends() -> None:
    """``tick(now, limit)`` hands out the work in slices; the final state is the same, and a
    user split across two slices is published twice (online, then offline), never lost."""
    whole, sliced = Engine(), Engine()
    for e in (whole, sliced):
        for i in range(1001):
            e.handle(Birth(f"u{i // 2}", f"d{i % 2}", f"s{i}"), T0)
    at = T0 + TIMEOUT
    fx_whole = whole.tick(at)
    slices: list[Sequence[Effect]] = []
    while (due := sliced.next_deadline()) is not None and due <= at:
        slices.append(sliced.tick(at, limit=99))  # odd: some users' two devices fall apart
    assert len(slices) == 11
    assert all(len(timed_out(fx)) == 99 for fx in slices[:-1]) and len(timed_out(slices[-1])) == 11
    assert sum(len(timed_out(fx)) for fx in slices) == len(timed_out(fx_whole)) == 1001

    def statuses(e: Engine) -> dict[str, tuple[str, list[str]]]:
        return {u: (s.status, [d.status for d in s.devices])
                for u in e.user_ids() if (s := e.snapshot(u)) is not None}

    # the same statuses; the primary of a split user may differ (its other device was the
    # last one online, so it became primary before it expired too)
    assert statuses(whole) == statuses(sliced)
    last = {p.state.user_id: p.state.status for fx in slices for p in publishes(fx)}
    assert set(last.values()) == {"offline"} and len(last) == 501


def test_devices_of_one_user_expiring_together_publish_one_state(engine: Engine) -> None:
    engine.handle(Birth("u", "a", "s1"), T0)
    engine.handle(Birth("u", "b", "s2"), T0)
    engine.handle(SetDeviceStatus("u", "panel", "away"), T0)
    engine.tick(T0 + 1)
    fx = engine.tick(T0 + TIMEOUT)
    assert len(timed_out(fx)) == 2
    (pub,) = publishes(fx)
    assert pub.state.status == "away"
    assert events(fx) == [("statusChange", "online", "away")]


def test_superseded_heap_entries_are_harmless(engine: Engine, clock: FakeClock) -> None:
    engine.handle(Birth("u", "phone", "s1"), clock.t)
    fx = run_until(engine, clock, T0 + 200 * HB, [Heartbeat("u", "phone", "s1", idle_ms=0)])
    assert fx == []
    assert len(engine._heap) <= 2  # lazy rescheduling: one live entry, at most one stale
    stop = clock.t
    assert timed_out(engine.tick(stop + TIMEOUT)) == [("u", "phone")]


def test_next_deadline_is_the_earliest_work(engine: Engine) -> None:
    assert engine.next_deadline() is None
    engine.handle(ActivityEvent("u", "message", None, "c"), T0)
    assert engine.next_deadline() == T0 + AWAY
    engine.handle(Birth("v", "phone", "s1"), T0 + 10)
    assert engine.next_deadline() == T0 + 10 + TIMEOUT
    engine.handle(Heartbeat("v", "phone", "s1"), T0 + HB)
    # may be early (the stale entry pops as a no-op), never late
    due = engine.next_deadline()
    assert due is not None and due <= T0 + HB + TIMEOUT
    assert engine.tick(due) == ()
    assert engine.next_deadline() == T0 + HB + TIMEOUT
    assert timed_out(engine.tick(T0 + HB + TIMEOUT)) == [("v", "phone")]
    assert engine.next_deadline() == T0 + AWAY


def test_deadlines_fire_only_on_tick(engine: Engine) -> None:
    # the caller owns time: the service pauses ticks while it cannot hear its broker, so
    # events arriving meanwhile must not time anybody out
    engine.handle(Birth("u", "phone", "s1"), T0)
    engine.handle(Birth("u", "tablet", "t1"), T0)
    late = T0 + 10 * TIMEOUT
    assert publishes(engine.handle(SetCustomStatus("u", "back"), late))[0].state.status == "online"
    assert timed_out(engine.handle(Heartbeat("u", "tablet", "t1"), late)) == []
    assert engine.handle(Heartbeat("u", "phone", "s2"), late) == ()  # s1 still connected
    assert engine.counters["stale_session"] == 1
    assert timed_out(engine.tick(late)) == [("u", "phone")]  # the tablet was heard
    engine.handle(Heartbeat("u", "phone", "s2"), late + 1)
    assert engine.counters["implicit_birth"] == 1
    assert device_status(engine, "phone") == "online"


def test_tick_before_any_deadline_does_nothing(engine: Engine) -> None:
    engine.handle(Birth("u", "phone", "s1"), T0)
    assert engine.tick(T0 + 1) == ()
    assert engine.tick(T0) == ()


# --------------------------------------------------------------------------------------------
# From wire messages to events


def parse(kind: str, body: dict[str, object]) -> DeviceMessage:
    msg = Topics().parse(f"presence/devices/u/phone/{kind}", dumps(body))
    assert isinstance(msg, DeviceMessage), msg
    return msg


def test_events_from_message_maps_every_device_topic() -> None:
    assert events_from_message(
        parse("conn", {"state": "online", "session": "s1", "name": "Phone", "ts": 1,
                       "heartbeatMs": 60_000, "idleMs": 5})
    ) == [Birth("u", "phone", "s1", "Phone", heartbeat_ms=60_000, idle_ms=5, ts=1)]
    assert events_from_message(
        parse("conn", {"state": "sleeping", "session": "s1", "sleepMs": 600_000, "ts": 2})
    ) == [Sleep("u", "phone", "s1", 600_000)]
    assert events_from_message(parse("conn", {"state": "offline", "session": "s1"})) == [
        DeviceOffline("u", "phone", "s1", "lost")
    ]
    assert events_from_message(
        parse("conn", {"state": "offline", "session": "s1", "reason": "disconnect"})
    ) == [DeviceOffline("u", "phone", "s1", "disconnect")]
    assert events_from_message(parse("heartbeat", {"session": "s1", "seq": 3, "idleMs": 5})) == [
        Heartbeat("u", "phone", "s1", 5)
    ]
    assert events_from_message(
        parse("activity", {"type": "message", "channelId": "c-1", "timestamp": 9, "data": {"k": 1}})
    ) == [ActivityEvent("u", "message", "phone", "c-1", 9, {"k": 1})]
    assert events_from_message(parse("set", {"status": "dnd", "customStatus": "x"})) == [
        SetStatus("u", "dnd", "phone"), SetCustomStatus("u", "x", "phone")
    ]
    assert events_from_message(parse("set", {"customStatus": None})) == [
        SetCustomStatus("u", None, "phone")
    ]
    assert events_from_message(parse("set", {"status": "away"})) == [
        SetStatus("u", "away", "phone")
    ]
    assert events_from_message(parse("ack", {"version": 4})) == [Ack("u", "phone", 4)]
    assert events_from_message(parse("req", {"id": "r1", "command": "/presence"})) == []
