"""A user loaded cold behaves exactly as one built at load.

``Engine.load`` takes a :class:`~hub.core.models.UserText` (a stored text with the fields a
restart needs read off it) and builds the user's devices only when it is first needed: an
event or a query about it, the end of its first hold (the timer loop), or the service's
background pass (``warm_some``). None of that may be visible. Hypothesis draws a history
(the same events as tests/test_engine_properties.py), writes what the engine hands to its
store as JSON, restarts twice from those texts (one engine given records, one given texts
where they can be read), and drives both through the same future: births, heartbeats,
wills, API calls, removals, broker link down and up, clock advances with ticks, background
passes and queries on the cold one. After every step both engines give the same effects for
each user, in order, the same published fields and the same ``who``; at the end every query
and the next store batch are equal, byte for byte.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from hub.core import Birth, DeviceTimedOut, Effect, Engine, EngineError, Event
from hub.core.events import Ack, RemoveUser
from hub.core.models import UserRecord, UserText
from tests.test_engine_properties import CHANNELS, CONFIG, DEVICES, T0, USERS, actions, expand

future_actions = st.one_of(
    actions,
    st.tuples(st.just("hold")),  # the broker link going down and up: more often than in
    st.tuples(st.just("release")),  # the history, as a cold user's hold has its own state
    st.builds(RemoveUser, st.sampled_from(USERS)),
    st.tuples(st.just("warm"), st.integers(1, 2)),
    # an NTP step of the wall clock (stored times are wall-clock; the engine's are not)
    st.tuples(st.just("wall"), st.sampled_from([-3_600_000, -5_000, 5_000, 3_600_000])),
    st.tuples(st.just("query"), st.sampled_from(USERS)),
)


def by_user(effects: list[Effect]) -> dict[str, list[Effect]]:
    """Effects per user, each user's in order (one tick may order users differently: a cold
    user's devices enter the timer heap when it is built)."""
    out: dict[str, list[Effect]] = defaultdict(list)
    for e in effects:
        out[e.user_id].append(e)  # type: ignore[attr-defined]
    return dict(out)


def step(engine: Engine, s: Any, now: int, versions: Engine) -> list[Effect] | str:
    """Apply one step at ``now`` as a hub does (what is due fires first); the effects, or
    ``"refused"``. ``versions`` answers what an ack refers to (the built engine, so that the
    cold one is not asked, which would build its users)."""
    effects = list(engine.tick(now))
    if s == ("hold",):
        engine.hold_timeouts()
    elif s == ("release",):
        engine.release_timeouts(now)
    elif s == ("tick",):
        pass
    else:
        ev: Event
        if isinstance(s, tuple):  # ack, relative to the user's version now
            _, uid, did, delta = s
            ev = Ack(uid, did, max(0, versions.get_status(uid).version + delta)
                     if versions.has_user(uid) else 0)
        else:
            ev = s
        try:
            effects += engine.handle(ev, now)
        except EngineError:
            return "refused"
    return effects


def visible(engine: Engine, now: int) -> tuple[Any, ...]:
    """What the hub reads of an engine without building any user."""
    return (sorted(engine.published_fields()), engine.device_count(),
            engine.get_online_users(None, now), sorted(engine.user_ids()),
            [engine.statuses(u) for u in sorted(engine.user_ids())])


def everything(engine: Engine, now: int) -> tuple[Any, ...]:
    """Every query (builds every user of a cold engine)."""
    per_user = [(engine.get_status(u), engine.get_devices(u), engine.get_sync_status(u),
                 engine.snapshot(u)) for u in sorted(engine.user_ids())]
    return (per_user, [engine.get_online_users(ch, now) for ch in (None, *CHANNELS)],
            engine.device_count())


def dirty_texts(engine: Engine) -> list[bytes]:
    return sorted(doc.to_json() for doc in engine.take_dirty_docs())


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=st.lists(actions, min_size=1, max_size=30),
       connect_all=st.booleans(),
       gap=st.sampled_from([0, 1, 999, 2_500, 10_000, 60_000]),
       crashed=st.booleans(),
       future=st.lists(future_actions, max_size=40))
# the link drops while users are cold: their holds last until it is back (not one timeout)
@example(history=[Birth("u1", "a", "s1", None)], connect_all=False, gap=0, crashed=False,
         future=[("hold",), ("advance", 12_000), ("tick",)])
# a step of the wall clock before a cold user is built: its stored (wall-clock) times are
# read as of the load, as a plain load read them
@example(history=[Birth("u1", "a", "s1", None)], connect_all=False, gap=0, crashed=False,
         future=[("wall", 3_600_000), ("advance", 1_000), ("tick",), ("query", "u1")])
# ... and when it is back, their holds count from then, not from the load
@example(history=[Birth("u1", "a", "s1", None)], connect_all=False, gap=0, crashed=False,
         future=[("hold",), ("advance", 1_000), ("release",), ("advance", 2_000), ("tick",)])
# a device heard while the link is down, then beating on: a built user's heap entry from
# before the drop wrote its idle clock when it popped, a cold one's at its own deadline (held
# devices now have no entry, built or cold)
@example(history=[("advance", 0)], connect_all=True, gap=0, crashed=False,
         future=[("hold",), ("run", "u1", "a", "s2", [("active", 3, 700), ("plain", 3, 700)], 0)])
def test_cold_and_built_users_behave_alike(history: list[Any], connect_all: bool, gap: int,
                                           crashed: bool, future: list[Any]) -> None:
    # the history, with what the engine hands its store kept as the store writes it
    engine = Engine(CONFIG)
    texts: dict[str, bytes] = {}
    now = T0
    if connect_all:  # every device of both users connected: cold-loadable users are common
        history = history + [Birth(u, d, "s2", None) for u in USERS for d in DEVICES]
    for s in expand(history):
        if isinstance(s, tuple) and s[0] == "advance":
            now += s[1]
            continue
        step(engine, s, now, engine)
        for doc in engine.take_dirty_docs():
            texts[doc.id] = doc.to_json()

    # the restart: one engine from records, one from texts where they can be read
    now += gap
    built, cold = Engine(CONFIG), Engine(CONFIG)
    wall = 0
    items = [UserText.read(t) or UserRecord.model_validate_json(t) for t in texts.values()]
    event(f"users loaded cold: {sum(type(i) is UserText for i in items)}")
    effects_b = list(built.load([UserRecord.model_validate_json(t) for t in texts.values()],
                                now, crashed))
    effects_c = list(cold.load(items, now, crashed))
    assert by_user(effects_c) == by_user(effects_b)
    assert (cold.loaded_users, cold.loaded_digest) == (built.loaded_users, built.loaded_digest)
    assert cold.changed_at_load == built.changed_at_load
    assert visible(cold, now) == visible(built, now)

    for s in expand(future):
        if isinstance(s, tuple) and s[0] == "advance":
            now += s[1]
            continue
        if isinstance(s, tuple) and s[0] == "wall":
            wall += s[1]
            built.set_wall_offset(wall)
            cold.set_wall_offset(wall)
        elif isinstance(s, tuple) and s[0] == "warm":  # the service's background pass
            effects_c = list(cold.warm_some(s[1]))
            assert effects_c == []
        elif isinstance(s, tuple) and s[0] == "query":  # a query builds the user it asks for
            assert cold.get_status(s[1]) == built.get_status(s[1])
            assert cold.get_devices(s[1]) == built.get_devices(s[1])
        else:
            effects_b = step(built, s, now, built)
            effects_c = step(cold, s, now, built)
            if effects_b == "refused" or effects_c == "refused":
                assert effects_b == effects_c, s
            else:
                assert isinstance(effects_b, list) and isinstance(effects_c, list)
                assert by_user(effects_c) == by_user(effects_b), s
        assert visible(cold, now) == visible(built, now), s
        assert dirty_texts(cold) == dirty_texts(built), s

    assert everything(cold, now) == everything(built, now)
    assert cold.cold_users == 0
    assert dirty_texts(cold) == dirty_texts(built)


def test_a_mass_end_of_holds_builds_cold_users_a_slice_at_a_time() -> None:
    """Ticks with a limit (as the hub ticks a storm) build a group's users a slice at a time
    and end where one unlimited tick of a plain engine ends."""
    engine = Engine(CONFIG)
    for k in range(7):
        engine.handle(Birth(f"u{k}", "a", "s1", None), T0)
        engine.handle(Birth(f"u{k}", "b", "s1", None), T0)
    texts = [doc.to_json() for doc in engine.take_dirty_docs()]
    now = T0 + 1_000
    built, cold = Engine(CONFIG), Engine(CONFIG)
    built.load([UserRecord.model_validate_json(t) for t in texts], now)
    cold.load([UserText.read(t) for t in texts], now)  # type: ignore[misc]
    assert cold.cold_users == 7
    now += CONFIG.timeout_ms
    expected = by_user(list(built.tick(now)))
    got: list[Effect] = []
    slices = 0
    while (due := cold.next_deadline()) is not None and due <= now:
        got += cold.tick(now, limit=1)
        slices += 1
    assert slices > 3 and cold.cold_users == 0
    # the same timeouts and the same statuses (not the same versions: a user whose devices
    # fall in two slices publishes twice, built cold or not; see Engine.tick)
    def timeouts(effects: list[Effect]) -> list[Effect]:
        return sorted((e for e in effects if type(e) is DeviceTimedOut), key=repr)

    assert len(timeouts(got)) == 14
    assert timeouts(got) == timeouts([e for es in expected.values() for e in es])
    for engine in (built, cold):
        assert {(u, engine.get_status(u).status) for u in engine.user_ids()} == {
            (f"u{k}", "offline") for k in range(7)}
        assert {d.status for u in engine.user_ids() for d in engine.get_devices(u)} == {"offline"}
