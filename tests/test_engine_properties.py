"""Random event sequences against the engine, checked by a reference model and invariants.

Hypothesis draws sequences of births and wills (sessions from a small pool, so stale wills,
revivals and implicit births are common), heartbeats with and without ``idleMs`` (also in runs
that keep a device alive for a while), activity (device and API), manual status, custom status,
API device status, acks, syncs, device removal, broker link down/up (``hold_timeouts`` /
``release_timeouts``), and clock advances with ticks, over two users with up to three devices
each. As a hub does, the engine is ticked at ``now`` before each event. Timers
are short (heartbeat 1 s, so timeout 2.5 s; away 8 s; offline 20 s) so every transition happens;
away is longer than two timeouts, so idle time moved by heartbeats is not written at once and a
restart depends on it being written in time.

After every step these must hold:

1. ``version`` never decreases; each non-forced ``PublishState`` carries exactly the previous
   version + 1, and a forced one (sync) carries the current version unchanged.
2. The primary is a present (online or away) device; when none is present it is the last
   primary still known, or None.
3. A user with no online or away device is offline.
4. A user's status is one of the four and follows the rule: offline without a present device,
   else the manual status (dnd, away, offline) if set, else online if a device is online, else
   away.
5. ``statusChange`` events match the observed status changes one for one, each event's ``old``
   is the previous event's ``new``, and ``online``/``offline`` events are emitted exactly on the
   transitions from/to offline.
6. Each device's status equals the rule recomputed from its fields (connected, virtual, last
   interaction) at ``now``: in particular every deadline due at ``now`` has fired.
7. Every effect is the one a plain reference model of DESIGN.md's rules predicts: the same
   timeouts, the same publishes (version, status, primary, custom status, devices), the same
   events, the same activity records; the same devices (with ``lastSeen``), sync status and
   who-is-online answers.
8. ``take_dirty_docs`` (written as JSON and accumulated as a store would) + ``load`` into a
   fresh engine at the same ``now`` yields the same statuses, versions, primaries, devices
   and sync status, and no effects (checked after every step: a restart may come at any
   moment).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

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
    SyncRequest,
)
from hub.core.models import UserRecord

#: wills at once here: the will grace has its own tests (tests/test_engine_truth.py)
CONFIG = EngineConfig(heartbeat_interval_ms=1_000, away_after_ms=8_000, offline_after_ms=20_000,
                      will_grace_ms=0)
FOREVER = 1 << 62
TIMEOUT = CONFIG.timeout_ms
AWAY = CONFIG.away_after_ms
OFFLINE = CONFIG.offline_after_ms
HYSTERESIS = CONFIG.hysteresis_ms
SKEW = CONFIG.max_clock_skew_ms
T0 = 1_700_000_000_000

USERS = ["u1", "u2"]
DEVICES = ["a", "b", "c"]
SESSIONS = ["s1", "s2"]
CHANNELS = ["ch1", "ch2"]


# --------------------------------------------------------------------------------------------
# The reference model: DESIGN.md's rules written as plainly as possible


@dataclass
class MDevice:
    id: str
    name: str
    virtual: bool
    session: str | None = None
    connected: bool = False
    ended: bool = False
    last_seen: int | None = None
    li: int | None = None  # last interaction
    acked: int = 0
    #: after a restart or during/after a link outage: the status holds until heard or this
    hold: int | None = None
    frozen: str = "offline"

    def status(self, now: int) -> str:
        if self.hold is not None and now < self.hold and (self.connected or self.virtual):
            return self.frozen
        if not (self.connected or self.virtual) or self.li is None:
            return "offline"
        idle = now - self.li
        return "offline" if idle >= OFFLINE else "away" if idle >= AWAY else "online"


@dataclass
class MUser:
    id: str
    devices: dict[str, MDevice] = field(default_factory=dict)
    manual: str | None = None
    custom: str | None = None
    primary: str | None = None
    status: str = "offline"
    version: int = 0
    key: tuple[Any, ...] | None = None
    last_sync: int | None = None
    channels: dict[str, int] = field(default_factory=dict)


class Model:
    """Predicts the effects of each event: (timed out devices, per-user effect list, records)."""

    def __init__(self) -> None:
        self.users: dict[str, MUser] = {}
        self.held = False  # the broker link is down: no heartbeat timeouts
        self.timed_out: list[tuple[str, str]] = []
        self.per_user: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        self.records: list[tuple[Any, ...]] = []

    def begin(self) -> None:
        self.timed_out = []
        self.per_user = defaultdict(list)
        self.records = []

    # -- rules

    def user_status(self, u: MUser, now: int) -> str:
        statuses = [d.status(now) for d in u.devices.values()]
        if "online" not in statuses and "away" not in statuses:
            return "offline"
        if u.manual is not None:
            return u.manual
        return "online" if "online" in statuses else "away"

    def choose_primary(self, u: MUser, now: int) -> str | None:
        cur = u.devices.get(u.primary) if u.primary else None
        present = [d for d in u.devices.values() if d.status(now) != "offline" and d.li is not None]
        if not present:
            return cur.id if cur else None
        real = [d for d in present if not d.virtual]
        candidates = real or present  # a real device over any virtual one
        best = candidates[0]
        for d in candidates[1:]:
            if d.li > best.li:  # type: ignore[operator]
                best = d
        if cur is None or cur.status(now) == "offline" or cur is best or (
                cur.virtual and not best.virtual):
            return best.id
        assert best.li is not None and cur.li is not None
        return best.id if best.li > cur.li + HYSTERESIS else cur.id

    def refresh(self, u: MUser, now: int, force: bool = False) -> None:
        old = u.status
        new = self.user_status(u, now)
        u.primary = self.choose_primary(u, now)
        u.status = new
        devices = tuple((d.id, d.name, d.status(now)) for d in u.devices.values())
        key = (u.id, new, u.custom, u.primary, devices)
        if key != u.key:
            u.key = key
            u.version += 1
            self.per_user[u.id].append(("publish", u.version, False, new, u.primary, u.custom,
                                        devices))
        elif force:
            self.per_user[u.id].append(("publish", u.version, True, new, u.primary, u.custom,
                                        devices))
        if new != old:
            self.per_user[u.id].append(("statusChange", old, new))
            if old == "offline":
                self.per_user[u.id].append(("online", old, new))
            elif new == "offline":
                self.per_user[u.id].append(("offline", old, new))

    def user(self, uid: str) -> MUser:
        if uid not in self.users:
            self.users[uid] = MUser(uid)
        return self.users[uid]

    def device(self, u: MUser, did: str, virtual: bool) -> MDevice:
        if did not in u.devices:
            u.devices[did] = MDevice(did, did, virtual)
        return u.devices[did]

    # -- time

    def expire(self, now: int) -> None:
        """What is due at ``now``: heartbeat timeouts; idle statuses are computed at ``now``."""
        for u in self.users.values():
            for d in u.devices.values():
                if d.hold is not None and d.hold <= now:
                    d.hold = None
                if self.held:
                    continue
                if d.connected and d.last_seen is not None and now - d.last_seen >= TIMEOUT:
                    d.connected = False
                    self.timed_out.append((u.id, d.id))
        for u in self.users.values():
            self.refresh(u, now)

    def hold(self, now: int) -> None:
        """The broker link is down: connected devices keep their status (nothing is heard)."""
        if not self.held:
            self.held = True
            for u in self.users.values():
                for d in u.devices.values():
                    if d.connected and not d.virtual:
                        d.frozen, d.hold = d.status(now), FOREVER

    def release(self, now: int) -> None:
        """The broker link is back: one timeout of grace for every connected device, whose
        status holds until it is heard or the grace is over."""
        if self.held:
            self.held = False
            for u in self.users.values():
                for d in u.devices.values():
                    if d.connected:
                        d.last_seen = now if d.last_seen is None else max(d.last_seen, now)
                        if d.hold is not None:
                            d.hold = now + TIMEOUT

    # -- events

    def connect(self, d: MDevice, session: str, now: int, name: str | None) -> None:
        d.virtual, d.session, d.connected, d.ended, d.last_seen = False, session, True, False, now
        d.hold = None
        d.li = now if d.li is None else max(d.li, now)
        if name:
            d.name = name

    def apply(self, ev: Event, now: int) -> bool:
        """Apply one event; False when the engine must refuse it (EngineError)."""
        if isinstance(ev, Birth):
            u = self.user(ev.user)
            d = self.device(u, ev.device, virtual=False)
            if d.session == ev.session:
                if not d.ended and ev.name:  # the birth after the heartbeat that stood in
                    d.name = ev.name
                if d.connected and not d.ended:
                    d.last_seen, d.hold = now, None
                elif not d.ended:  # a redelivered birth revives, without an interaction
                    d.connected, d.virtual, d.last_seen, d.hold = True, False, now, None
            else:
                self.connect(d, ev.session, now, ev.name)
            self.refresh(u, now)
        elif isinstance(ev, DeviceOffline):
            if ev.user not in self.users:  # unknown user: published offline (stale retained)
                u = self.user(ev.user)
                d = self.device(u, ev.device, virtual=False)
                d.session, d.ended = ev.session, True
                self.refresh(u, now)
                return True
            u = self.users.get(ev.user)  # type: ignore[assignment]
            d = u.devices.get(ev.device) if u else None  # type: ignore[assignment]
            if d is not None and d.session == ev.session and not d.ended:
                d.connected, d.ended = False, True
                if ev.reason != "lost":
                    d.last_seen = now
                self.refresh(u, now)
        elif isinstance(ev, Heartbeat):
            u = self.user(ev.user)
            d = u.devices.get(ev.device)  # type: ignore[assignment]
            li = None if ev.idle_ms is None else now - max(ev.idle_ms, 0)
            if d is not None and d.session == ev.session:
                if not d.ended:
                    if li is not None and (d.li is None or li > d.li):
                        d.li = li
                    d.connected, d.virtual, d.last_seen, d.hold = True, False, now, None
            elif d is not None and d.connected:
                pass  # another session while connected: stale
            else:
                d = self.device(u, ev.device, virtual=False)
                self.connect(d, ev.session, now, None)
            self.refresh(u, now)
        elif isinstance(ev, ActivityEvent):
            u = self.user(ev.user)
            did = ev.device or ev.channel_id or "api"
            if ev.device is None and did in u.devices and not u.devices[did].virtual:
                did = "api." + did  # a real device's name: not its activity
            d = self.device(u, did, virtual=ev.device is None)
            ts = ev.timestamp if ev.timestamp is not None else now
            if ts > now + SKEW:
                ts = now
            self.records.append((u.id, ev.type, ev.channel_id, ts, d.id, now))
            if ev.timestamp is not None and d.li is not None and ts < d.li - SKEW:
                return True  # older than its last interaction: history only
            if ev.channel_id is not None:
                u.channels[ev.channel_id] = now
            d.li = now
            d.hold = None
            if d.connected or d.virtual:
                d.last_seen = now
            real_present = any(not x.virtual and x.status(now) != "offline"
                               for x in u.devices.values())
            if d.status(now) != "offline" and (not d.virtual or not real_present):
                u.primary = d.id
            self.refresh(u, now)
        elif isinstance(ev, SetStatus):
            u = self.user(ev.user)
            u.manual = None if ev.status == "online" else ev.status
            d = u.devices.get(ev.device) if ev.device else None  # type: ignore[assignment]
            if d is None and ev.device is None and ev.status != "offline" and all(
                x.status(now) == "offline" for x in u.devices.values()
            ):
                d = self.device(u, "api", virtual=True)
            if d is not None and (d.connected or d.virtual):
                d.li = now if d.li is None else max(d.li, now)
                d.last_seen = now
                d.hold = None
            self.refresh(u, now)
        elif isinstance(ev, SetCustomStatus):
            text = ev.text.strip() if ev.text is not None else None
            if text is not None and len(text) > CONFIG.max_custom_status:
                return False
            u = self.user(ev.user)
            u.custom = text or None
            self.refresh(u, now)
        elif isinstance(ev, SetDeviceStatus):
            u = self.user(ev.user)
            d = self.device(u, ev.device, virtual=True)
            d.connected, d.virtual, d.last_seen, d.hold = False, True, now, None
            d.li = now - {"online": 0, "away": AWAY, "offline": OFFLINE}[ev.status]
            if ev.status == "online":
                u.primary = d.id
            self.refresh(u, now)
        elif isinstance(ev, Ack):
            u = self.users.get(ev.user)  # type: ignore[assignment]
            d = u.devices.get(ev.device) if u else None  # type: ignore[assignment]
            if d is not None and ev.version <= u.version:
                d.acked = max(d.acked, ev.version)
        elif isinstance(ev, SyncRequest):
            u = self.user(ev.user)
            u.last_sync = now
            self.refresh(u, now, force=True)
        elif isinstance(ev, RemoveDevice):
            u = self.users.get(ev.user)  # type: ignore[assignment]
            if u is None or ev.device not in u.devices:
                return False
            del u.devices[ev.device]
            if u.primary == ev.device:
                u.primary = None
            self.refresh(u, now)
        return True


# --------------------------------------------------------------------------------------------
# Strategies

users = st.sampled_from([*USERS, USERS[0]])  # u1 more often: more to happen to one user
devices = st.sampled_from(DEVICES)
sessions = st.sampled_from(SESSIONS)
advances = st.sampled_from([0, 1, 250, 999, 1_000, 1_500, 2_499, 2_500, 3_000, 5_000, 7_999,
                            8_000, 12_000, 19_999, 20_000, 50_000])
idles = st.one_of(st.none(), st.sampled_from([-5, 0, 500, 1_000, 2_500, 7_999, 8_000, 19_999,
                                              20_000, 50_000]))

# a device in steady use for a while: a heartbeat about every second, in phases whose idle
# time is absent, small (in use), or growing (left alone); drawn often, as only these keep a
# device connected long enough for its idle clock to matter
phases = st.lists(st.tuples(st.sampled_from(["plain", "active", "idle"]),
                            st.sampled_from([3, 6, 9, 15]), st.sampled_from([700, 1_000, 1_300])),
                  min_size=1, max_size=3)
runs = st.tuples(st.just("run"), users, devices, sessions, phases, st.integers(0, 699))

actions = st.one_of(
    st.tuples(st.just("advance"), advances),
    st.tuples(st.just("advance"), advances),
    st.tuples(st.just("tick")),
    st.tuples(st.just("hold")),
    st.tuples(st.just("release")),
    st.builds(Birth, users, devices, sessions, st.sampled_from([None, "Phone", "Laptop"])),
    st.builds(DeviceOffline, users, devices, sessions, st.sampled_from(["lost", "disconnect"])),
    st.builds(Heartbeat, users, devices, sessions, idles),
    st.builds(Heartbeat, users, devices, sessions, idles),
    st.builds(ActivityEvent, users, st.just("message"), st.one_of(st.none(), devices),
              st.one_of(st.none(), st.sampled_from(CHANNELS)),
              st.sampled_from([None, -10**9, 0, 10**9])),
    st.builds(SetStatus, users, st.sampled_from(["online", "away", "dnd", "offline"]),
              st.one_of(st.none(), devices)),
    st.builds(SetCustomStatus, users, st.sampled_from([None, "", "  busy ", "busy", "x" * 300])),
    st.builds(SetDeviceStatus, users, devices, st.sampled_from(["online", "away", "offline"])),
    st.tuples(st.just("ack"), users, devices, st.sampled_from([-1, 0, 1])),
    runs,
    runs,
    runs,
    st.builds(SyncRequest, users),
    st.builds(RemoveDevice, users, devices),
)


# --------------------------------------------------------------------------------------------
# Checks


def engine_view(effects: list[Effect]) -> tuple[list[tuple[str, str]], dict[str, list[Any]],
                                               list[tuple[Any, ...]]]:
    """The engine's effects in the model's shape."""
    timed_out = sorted((e.user_id, e.device_id) for e in effects if isinstance(e, DeviceTimedOut))
    per_user: dict[str, list[Any]] = defaultdict(list)
    records = []
    for e in effects:
        if isinstance(e, PublishState):
            s = e.state
            per_user[e.user_id].append(("publish", s.version, e.forced, s.status, s.active_device,
                                        s.custom_status,
                                        tuple((d.id, d.name, d.status) for d in s.devices)))
        elif isinstance(e, EmitEvent):
            per_user[e.user_id].append((e.event, e.old, e.new))
        elif isinstance(e, RecordActivity):
            a = e.activity
            records.append((e.user_id, a.type, a.channel_id, a.timestamp, a.device_id,
                            a.received_at))
    return timed_out, dict(per_user), records


def check_effects(effects: list[Effect], versions: dict[str, int],
                  statuses: dict[str, str], now: int) -> None:
    """Invariants 1 and 5 on the effects of one step."""
    last: dict[str, Effect] = {}
    for e in effects:
        if isinstance(e, PublishState):
            prev = versions.get(e.user_id, 0)
            assert e.state.version == (prev if e.forced else prev + 1), (e, prev)
            versions[e.user_id] = e.state.version
        elif isinstance(e, EmitEvent):
            assert e.ts == now
            if e.event == "statusChange":
                prev_status = statuses.get(e.user_id, "offline")
                assert e.old == prev_status != e.new, (e, prev_status)
                statuses[e.user_id] = e.new
                if "offline" not in (e.old, e.new):
                    last[e.user_id] = e
                    continue
            else:  # online / offline: right after the statusChange it belongs to
                before = last.get(e.user_id)
                assert isinstance(before, EmitEvent) and before.event == "statusChange", e
                assert (before.old, before.new) == (e.old, e.new), e
                assert e.event == ("online" if e.old == "offline" else "offline"), e
        if e.__class__ is not RecordActivity and e.__class__ is not DeviceTimedOut:
            prior = last.get(e.user_id)
            if isinstance(prior, EmitEvent) and prior.event == "statusChange" and "offline" in (
                prior.old, prior.new
            ):  # a transition from/to offline must be followed by its online/offline event
                assert isinstance(e, EmitEvent) and e.event != "statusChange", (prior, e)
            last[e.user_id] = e
    for e in last.values():
        if isinstance(e, EmitEvent) and e.event == "statusChange":
            assert "offline" not in (e.old, e.new), f"no online/offline event after {e}"


def check_state(engine: Engine, model: Model, statuses: dict[str, str], now: int,
                held: bool) -> None:
    """Invariants 2, 3, 4, 6 and the model's view of queries (7)."""
    for uid, mu in model.users.items():
        st_ = engine.get_status(uid)
        devs = engine.get_devices(uid)
        dstat = {d.id: d.status for d in devs}
        present = {i for i, s in dstat.items() if s != "offline"}
        # 4: the status rule
        if not present:
            rule = "offline"
        elif mu.manual is not None:
            rule = mu.manual
        else:
            rule = "online" if "online" in dstat.values() else "away"
        assert st_.status == rule, (uid, st_.status, rule)
        assert st_.status in ("online", "away", "dnd", "offline")
        # 3
        if not present:
            assert st_.status == "offline"
        # 2: primary
        if present:
            assert st_.active_device in present, (uid, st_.active_device, dstat)
        else:
            assert st_.active_device is None or st_.active_device in dstat
        assert [d.id for d in devs if d.is_active] == (
            [st_.active_device] if st_.active_device in dstat else [])
        # 5: the events seen so far lead to the current status
        assert statuses.get(uid, "offline") == st_.status
        # 6: device statuses from their own fields at now (every due deadline has fired)
        u = engine._users[uid]
        for d in u.devices.values():
            if d.hold_until is not None and now < d.hold_until and (d.connected or d.virtual):
                want = d.status  # held (link outage, restart): its timers wait to hear it
            elif not (d.connected or d.virtual) or d.last_interaction is None:
                want = "offline"
            else:
                idle = now - d.last_interaction
                want = "offline" if idle >= OFFLINE else "away" if idle >= AWAY else "online"
            assert d.status == want, (uid, d.id, d.status, want)
            assert not (d.connected and d.virtual)
            if d.connected and not held:
                assert d.last_seen is not None and now - d.last_seen < TIMEOUT
        # 7: the model agrees on everything visible
        assert (st_.status, st_.version, st_.active_device, st_.custom_status) == (
            mu.status, mu.version, mu.primary, mu.custom), uid
        assert [(d.id, d.name, d.status, d.virtual, d.last_seen) for d in devs] == [
            (d.id, d.name, d.status(now), d.virtual, d.last_seen) for d in mu.devices.values()]
        assert st_.last_seen == max(
            (d.last_seen for d in mu.devices.values() if d.last_seen is not None), default=None)
        sync = engine.get_sync_status(uid)
        real = [d for d in mu.devices.values() if not d.virtual]
        assert (sync.synced, sync.total, sync.last_sync) == (
            sum(d.acked >= mu.version for d in real), len(real), mu.last_sync)
    assert sorted(engine.user_ids()) == sorted(model.users)
    online = [u.user_id for u in engine.get_online_users(None, now)]
    assert online == sorted(uid for uid, mu in model.users.items() if mu.status != "offline")
    for ch in CHANNELS:
        on_ch = [u.user_id for u in engine.get_online_users(ch, now)]
        assert on_ch == sorted(
            uid for uid, mu in model.users.items()
            if mu.status != "offline" and now - mu.channels.get(ch, -10**15) <= OFFLINE)


def check_restart(engine: Engine, store: dict[str, UserRecord], now: int) -> None:
    """Invariant 8."""
    fresh = Engine(CONFIG)
    assert list(fresh.load(list(store.values()), now)) == []
    for uid in engine.user_ids():
        a, b = engine.get_status(uid), fresh.get_status(uid)
        assert (a.status, a.version, a.active_device, a.custom_status) == (
            b.status, b.version, b.active_device, b.custom_status), uid
        assert [(d.id, d.name, d.status, d.is_active, d.virtual) for d in engine.get_devices(uid)] \
            == [(d.id, d.name, d.status, d.is_active, d.virtual) for d in fresh.get_devices(uid)]
        sa, sb = engine.get_sync_status(uid), fresh.get_sync_status(uid)
        assert (sa.synced, sa.total, sa.version, sa.last_sync) == (
            sb.synced, sb.total, sb.version, sb.last_sync)
    assert engine.get_online_users(None, now) == fresh.get_online_users(None, now)
    for ch in CHANNELS:
        assert engine.get_online_users(ch, now) == fresh.get_online_users(ch, now)
    assert fresh.take_dirty() == []


# --------------------------------------------------------------------------------------------
# The property


def expand(steps: list[Any]) -> list[Any]:
    """Unfold each ``run`` into its clock advances and heartbeats."""
    out: list[Any] = []
    for step in steps:
        if isinstance(step, tuple) and step[0] == "run":
            _, uid, did, sid, phases_, jitter = step
            for mode, beats, every in phases_:
                for k in range(1, beats + 1):
                    out.append(("advance", every))
                    idle = {"plain": None, "active": (k * 379 + jitter) % 700,
                            "idle": k * every}[mode]
                    out.append(Heartbeat(uid, did, sid, idle))
        else:
            out.append(step)
    return out



@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(actions, min_size=4, max_size=60))
# a named birth of the known session while the link is down ends the freeze like a nameless one
@example([Birth("u1", "a", "s1", None), ("hold",), ("advance", 8_000),
          Birth("u1", "a", "s1", "Phone")])
def test_random_event_sequences_keep_every_invariant(steps: list[Any]) -> None:
    engine = Engine(CONFIG)
    model = Model()
    store: dict[str, UserRecord] = {}
    versions: dict[str, int] = {}
    statuses: dict[str, str] = {}
    now = T0
    for step in expand(steps):
        model.begin()
        if isinstance(step, tuple) and step[0] == "advance":
            now += step[1]
            continue
        # what is due fires before the step itself: the engine fires deadlines only on tick,
        # and a hub ticks whenever next_deadline comes, so events meet ticked state
        model.expire(now)
        effects = list(engine.tick(now))
        if step == ("hold",):
            model.hold(now)
            engine.hold_timeouts()
        elif step == ("release",):
            model.release(now)
            engine.release_timeouts(now)
        elif step != ("tick",):
            ev: Event
            if isinstance(step, tuple):  # ack, relative to the version the user has now
                _, uid, did, delta = step
                ev = Ack(uid, did, max(0, model.user(uid).version + delta)
                         if uid in model.users else 0)
            else:
                ev = step
            ok = model.apply(ev, now)
            try:
                effects += engine.handle(ev, now)
                assert ok, f"engine accepted {ev!r}"
            except EngineError:
                assert not ok, f"engine refused {ev!r}"
        timed_out, per_user, records = engine_view(effects)
        assert timed_out == sorted(model.timed_out)
        assert per_user == {k: v for k, v in model.per_user.items() if v}
        assert records == model.records
        check_effects(effects, versions, statuses, now)
        check_state(engine, model, statuses, now, model.held)
        for doc in engine.take_dirty_docs():
            # through the JSON a store writes, byte for byte the record's own
            text = doc.to_json()
            assert text == doc.record().to_json()
            store[doc.id] = UserRecord.model_validate_json(text)
        check_restart(engine, store, now)  # a restart now would see the same
