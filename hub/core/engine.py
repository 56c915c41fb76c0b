"""The presence engine: every status rule of mqtt-presence, in one sans-I/O module.

Inputs are small immutable events (:class:`Birth`, :class:`DeviceOffline`, :class:`Heartbeat`,
:class:`ActivityEvent`, :class:`SetStatus`, ...) and the hub's clock ``now`` in integer
milliseconds. Outputs are effects (:class:`PublishState`, :class:`EmitEvent`,
:class:`RecordActivity`, :class:`DeviceTimedOut`) plus a set of users whose records must be
persisted (:meth:`Engine.take_dirty`). The engine never touches a socket, a file, a task or
the real clock, so tests drive it with a fake clock and run in microseconds.

If you want to know "when does a user become away?", every answer is in this file:

Device status (``_device_status``)
    A real (MQTT) device is *connected* from its current session's birth until a will or clean
    offline of that session, or until it has sent nothing for ``heartbeat_timeout_ms``
    (reason ``timeout``, effect :class:`DeviceTimedOut`; its next heartbeat of the same session
    revives it). A virtual device (activity or status set through the API) has no connection
    and no heartbeat timeout. A device that is connected (or virtual) is ``online`` while
    idle < ``away_after_ms``, ``away`` while idle < ``offline_after_ms``, else ``offline``.
    Idle is measured from the device's last interaction: the latest of its birth, its last
    activity, a status set from it, and ``now - idleMs`` of a heartbeat that carries ``idleMs``
    (a heartbeat without it proves liveness only). All times are the hub's receive times;
    an activity's own timestamp is only its label (clamped when it is in the future).

Sessions (Sparkplug's bdSeq idea)
    A birth makes its session the device's current one. A will/offline whose session is not the
    current one is stale and ignored, so a late will of an old connection never takes down a
    device that has already reconnected. A heartbeat of another session is ignored while the
    device is connected; when it is not, the heartbeat counts as the (lost) birth of that
    session. The current session's birth arriving again (a retained copy redelivered) proves
    liveness like a heartbeat but is no new interaction; after the session's will it is stale.
    A will does not count as seeing the device (the broker speaks for a silent device); a clean
    stop does.

Device status set through the API (``_set_device_status``)
    The device becomes virtual with the idle clock set so that it *is* that status now
    (``online``: idle 0; ``away``: idle = ``away_after_ms``; ``offline``: idle =
    ``offline_after_ms``); idle timers then run as usual. A real device so set keeps no
    connection claim until its session speaks again (heartbeat or birth), which makes it real
    and connected again.

User status (``_user_status``)
    ``offline`` when no device is online or away; else a manual status (dnd, away, or offline =
    invisible) wins; else ``online`` if any device is online, otherwise ``away``. Setting
    ``online`` clears the manual status. The manual status outlives devices coming and going.
    A status other than ``offline`` set through the API while no device is present is carried
    by the virtual device ``api`` (the caller is evidently there).

Primary device (``_choose_primary``)
    The present device with the most recent interaction. Activity (and an API ``online``
    device status) moves it at once; other interactions move it only when another device is
    ahead by more than ``primary_hysteresis_ms`` (one heartbeat interval by default) so two
    devices in use at once do not make it flap. When no device is present the last primary
    stays named.

Version
    Moves by exactly one when the published state changes (name, status, custom status,
    primary, and each device's id/name/status) and never otherwise: ``lastSeen`` alone is not a
    change. A sync republishes (``forced``) with the same version.

Timers (``_fire``)
    Each device has at most one live entry in one heap, at its next deadline (heartbeat timeout,
    away, or offline). Heartbeats only push deadlines later, so they touch no heap: the stale
    entry is found when it comes due and is pushed again at the right time (lazy rescheduling).
    Work per heartbeat is O(1); per deadline O(log n). Deadlines fire only in ``tick``, so the
    caller decides when time moves the state (the service pauses it while its broker link is
    down); the devices of one user that expire together are re-evaluated once (one publish,
    not one per device).

Persistence (``take_dirty``, ``load``)
    A user is dirty whenever anything in its record changes, except the idle clock moved by
    heartbeats: that is written when the device's next deadline pops (or at once when the user
    returns after a long idle), which is before the stored clock could give a different status
    than the live one. So a restart at any moment after a tick (load at the same ``now``)
    rebuilds the same statuses, versions and primaries. At load, devices last known connected
    get one heartbeat timeout of grace; transitions that happened during the downtime are real
    and published.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, MutableSet, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydantic import ValidationError

from hub.core.events import (
    Ack,
    ActivityEvent,
    Birth,
    DeviceOffline,
    DeviceRemoved,
    DeviceTimedOut,
    Effect,
    EmitEvent,
    Event,
    Heartbeat,
    PublishState,
    RecordActivity,
    RemoveDevice,
    RemoveUser,
    SetCustomStatus,
    SetDeviceStatus,
    SetStatus,
    Sleep,
    SyncRequest,
    UserRemoved,
)
from hub.core.models import (
    Activity,
    DeviceInfo,
    OnlineUser,
    StoredUser,
    SyncStatus,
    UserDoc,
    UserRecord,
    UserStatus,
    UserText,
)
from hub.core.sortedset import SortedIdSet
from hub.protocol import DeviceState, DeviceStatus, Status, UserState

log = logging.getLogger(__name__)

ONLINE: Final = "online"
AWAY: Final = "away"
DND: Final = "dnd"
OFFLINE: Final = "offline"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Timers and limits. Defaults: heartbeat 30 s, away after 5 min, offline after 1 h."""

    heartbeat_interval_ms: int = 30_000
    away_after_ms: int = 300_000
    offline_after_ms: int = 3_600_000
    #: Silence after which a connected device is offline (default 2.5 x heartbeat interval).
    heartbeat_timeout_ms: int | None = None
    #: How far ahead of the hub's clock an activity timestamp may be before it is clamped.
    max_clock_skew_ms: int = 60_000
    #: How far ahead another device's interaction must be to take over as primary
    #: (default: one heartbeat interval).
    primary_hysteresis_ms: int | None = None
    #: A user's devices beyond this many are refused (counted as ``too_many_devices``).
    max_devices_per_user: int = 64
    #: Longest custom status accepted.
    max_custom_status: int = 256
    #: How long a will (``reason: lost``) of the current session waits before it takes
    #: effect; a birth of a new session within it (a Wi-Fi/LTE handover, a takeover) voids it,
    #: so a reconnect never flaps the user. 0 applies wills at once.
    will_grace_ms: int = 1_000
    #: The longest heartbeat interval a device may announce in its birth (its timeout is 2.5 x
    #: the interval it announces, bounded by 2.5 x this).
    max_heartbeat_interval_ms: int = 30 * 60_000

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval_ms", "away_after_ms", "offline_after_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.offline_after_ms < self.away_after_ms:
            raise ValueError("offline_after_ms must be >= away_after_ms")
        if self.heartbeat_timeout_ms is not None and self.heartbeat_timeout_ms <= 0:
            raise ValueError("heartbeat_timeout_ms must be > 0")
        if self.will_grace_ms < 0:
            raise ValueError("will_grace_ms must be >= 0")
        if self.max_heartbeat_interval_ms <= 0:
            raise ValueError("max_heartbeat_interval_ms must be > 0")

    @property
    def timeout_ms(self) -> int:
        if self.heartbeat_timeout_ms is not None:
            return self.heartbeat_timeout_ms
        return self.heartbeat_interval_ms * 5 // 2

    @property
    def hysteresis_ms(self) -> int:
        if self.primary_hysteresis_ms is not None:
            return self.primary_hysteresis_ms
        return self.heartbeat_interval_ms


_NO_EFFECTS: Final[tuple[Effect, ...]] = ()
#: ``hold_until`` of a device while the broker link is down: held until the link returns
_FOREVER: Final = 1 << 62
#: versions reserved ahead of the published one (persisted with the user): a user would have
#: to change this many times within one flush for a crash to reuse a version (the per-device
#: rate limit allows a few dozen a second)
VERSION_RESERVE: Final = 1_000


#: digests of (user, version) pairs are sums of :func:`digest_term` modulo 2**64
DIGEST_MASK: Final = (1 << 64) - 1


def digest_term(user_id: str, version: int) -> int:
    """One user's share of an order-free digest of (user, version) pairs, which the hub
    leaves on the broker at a clean stop and compares with the store's at the next start.

    Two checksums of ``user\0version`` side by side: stable across processes (``hash`` is
    not), and one C call each, so a million users' digest costs a fraction of a second. It
    guards against accidents (a broker that lost or kept older state), not against forgery:
    any client the broker lets write ``P/hub/retained`` could set the user topics too.
    """
    key = b"%s\0%d" % (user_id.encode(), version)
    return (zlib.crc32(key) << 32) | zlib.adler32(key)


class EngineError(ValueError):
    """An API call the engine refuses (unknown status, too many devices, ...)."""


# --------------------------------------------------------------------------------------------
# State


class _Device:
    __slots__ = (
        "acked_version",
        "born_ts",
        "connected",
        "due",
        "ended",
        "hold_until",
        "id",
        "last_interaction",
        "last_seen",
        "name",
        "removed",
        "saved_li",
        "session",
        "sleep_until",
        "status",
        "timeout",
        "user",
        "virtual",
        "will_due",
    )

    def __init__(self, user: _User, device_id: str, name: str, virtual: bool) -> None:
        self.user = user
        self.id = device_id
        self.name = name
        self.virtual = virtual
        self.session: str | None = None
        self.connected = False
        #: the current session ended by a will or clean offline: its late messages are stale
        self.ended = False
        self.status: DeviceStatus = OFFLINE
        self.last_seen: int | None = None
        self.last_interaction: int | None = None
        self.acked_version = 0
        #: deadline of this device's live heap entry, or None when it has none
        self.due: int | None = None
        self.removed = False
        #: last_interaction as last handed to the store (see Engine.heartbeat)
        self.saved_li: int | None = None
        #: this device's own heartbeat timeout (from the interval its birth announced), or
        #: None for the hub's default
        self.timeout: int | None = None
        #: a will of the current session arrived; it takes effect at this time unless a birth
        #: of a new session comes first (the will grace)
        self.will_due: int | None = None
        #: an announced sleep lasts until this time: no will or timeout takes it down before
        #: ``sleep_until`` + its timeout
        self.sleep_until: int | None = None
        #: after a restart or a broker-link outage, the device's timers act only once it is
        #: heard from again or this time has passed
        self.hold_until: int | None = None
        #: the device clock's ``ts`` of the current session's birth: a late birth of an older
        #: session is stale
        self.born_ts: int | None = None


#: a device's status in a stored text that UserText.read took (a user's is followed by
#: ``"manual_status"``, a device's by ``"last_seen"``)
_STORED_STATUS: Final = re.compile(rb',"status":"(online|away|offline)","last_seen"')
_DEVICE_STATUS: Final[dict[bytes, DeviceStatus]] = {
    b"online": ONLINE, b"away": AWAY, b"offline": OFFLINE}

#: the channels of every user without any (never written: see _User.channels)
_NO_CHANNELS: Final[dict[str, int]] = {}


class _User:
    __slots__ = (
        "active_device",
        "channels",
        "cold",
        "custom_status",
        "devices",
        "id",
        "last_sync",
        "manual_status",
        "name",
        "published_key",
        "reserved",
        "status",
        "version",
    )

    def __init__(self, user_id: str, name: str | None = None) -> None:
        self.id = user_id
        self.name = name or user_id
        self.devices: dict[str, _Device] = {}
        self.manual_status: Status | None = None
        self.custom_status: str | None = None
        self.status: Status = OFFLINE
        self.active_device: str | None = None
        self.version = 0
        #: versions up to here may be published before the store hears of them
        self.reserved = 0
        self.last_sync: int | None = None
        #: channel id -> hub time of the last activity on it (for "who is on this channel")
        #: channel -> last activity there; the shared empty :data:`_NO_CHANNELS` until the
        #: first channel activity (most users never have one: 64 bytes a user saved)
        self.channels: dict[str, int] = _NO_CHANNELS
        #: hash of :meth:`Engine._key` as last published (a hash, not the tuple: ~80 bytes
        #: less per device; two different keys with one 64-bit hash are not a practical risk)
        self.published_key: int | None = None
        #: not built yet: its group (see _Cold); its text is in Engine._cold
        self.cold: _Cold | None = None


class _Cold:
    """Users loaded from their stored text (:class:`~hub.core.models.UserText`) whose devices
    are not built yet, all with the same first hold: every device of each is connected and
    held in its restart grace, or disconnected and offline with no timer at all, so nothing
    about them can change before ``seen + hold``. The
    group's one heap entry (``due``: that time) builds them then, a slice per tick, unless an
    event, a query or the service's background pass (:meth:`Engine.warm_some`) needed one
    first. ``removed`` and ``due`` are what a device's heap entry has, so the timer loop
    treats both alike. One group per hold and ``load`` call (the service loads 2,000 users a
    call), not an entry each: a million devices' restart spent a second and 75 MB on entries
    that were all due together.
    """

    __slots__ = ("due", "forever", "hold", "next", "removed", "seen", "users", "wall")

    def __init__(self, seen: int, hold: int, wall: int) -> None:
        #: the devices' last_seen, from which their holds count (the load's ``now``, or the
        #: time the broker link came back)
        self.seen = seen
        #: the shortest of each user's devices' timeouts: the first hold ends at seen + hold
        self.hold = hold
        #: held until the link is back (the hub lost its broker meanwhile)
        self.forever = False
        #: the wall clock's lead at the load: the stored (wall-clock) times are read as of
        #: then, as a plain load read them, whatever NTP did to the wall clock since
        self.wall = wall
        #: the users, in load order; those before ``next`` are built (or gone)
        self.users: list[_User] = []
        self.next = 0
        self.due: int | None = None
        self.removed = False


# --------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Owns all users and devices; feed it events with ``handle(event, now)`` and ``tick(now)``."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self._users: dict[str, _User] = {}
        #: (due, seq, device), or a user not built yet (see _Cold) at the end of its first hold
        self._heap: list[tuple[int, int, _Device | _Cold]] = []
        #: the broker link is down: no device times out for silence (see hold_timeouts)
        self._timeouts_held = False
        self._seq = 0
        self._out: list[Effect] = []
        self._dirty: set[str] = set()
        #: users whose status is not offline (a SortedIdSet once ``who`` pages asked for it)
        self._present: MutableSet[str] = set()
        #: every user's id in order, once ``/presence users`` pages asked for it (None before:
        #: a hub nobody asks pays nothing; see index_users)
        self._all: SortedIdSet | None = None
        #: why events were ignored or refused, e.g. ``stale_session``; the hub exports these
        self.counters: Counter[str] = Counter()
        c = self.config
        self._timeout = c.timeout_ms
        self._away = c.away_after_ms
        self._offline = c.offline_after_ms
        self._hysteresis = c.hysteresis_ms
        self._write_idle_after = max(0, c.away_after_ms - 2 * self._timeout)
        self._grace = c.will_grace_ms
        self._max_timeout = c.max_heartbeat_interval_ms * 5 // 2
        #: devices whose will waits out its grace (voided all at once if the link drops)
        self._pending_wills: set[_Device] = set()
        #: removed users -> the version above which one of the same id starts if it comes back
        self._tombstones: dict[str, int] = {}
        #: wall clock minus ``now``: timers run on the monotonic ``now``, labels (lastSeen,
        #: activity times, event ts) are wall-clock (see hub.core.clock)
        self._wall = 0
        self._late_logged_at: int | None = None
        self._late_unlogged = 0
        #: what :meth:`load` found, for the MQTT side's decision whether the broker still
        #: holds what the last run published: that run crashed (versions moved on) ...
        self.crashed_at_load = False
        #: ... and the users whose state the load itself changed (published at start anyway)
        self.changed_at_load: set[str] = set()
        #: how many users the store gave, and the digest of their (user, version) pairs as
        #: stored (:func:`digest_term`), before the load changed anything
        self.loaded_users = 0
        self.loaded_digest = 0
        #: users loaded from their text and not built yet: id -> stored text (see _Cold)
        self._cold: dict[str, bytes] = {}
        #: their groups (a group per first hold), in load order
        self._cold_groups: list[_Cold] = []
        self._cold_devices = 0

    def set_wall_offset(self, offset_ms: int) -> None:
        """Tell the engine the wall clock's lead over ``now`` (steps when NTP steps it)."""
        self._wall = offset_ms

    # ---------------------------------------------------------------- input

    def handle(self, event: Event, now: int) -> Sequence[Effect]:
        """Apply one event at hub time ``now`` and return the effects it caused.

        Deadlines never fire here, only in :meth:`tick`: the caller owns when time-based
        transitions happen (the service pauses them while it cannot hear its broker). An event
        the engine refuses raises :class:`EngineError` and changes nothing.
        """
        if type(event) is Heartbeat:
            return self.heartbeat(event, now)
        handler = _HANDLERS.get(type(event))
        if handler is None:  # pragma: no cover - the Event union is closed
            raise TypeError(f"not an engine event: {event!r}")
        handler(self, event, now)
        return self._drain()

    def heartbeat(self, ev: Heartbeat, now: int) -> Sequence[Effect]:
        return self.beat(ev.user, ev.device, ev.session, ev.idle_ms, now)

    def beat(self, user_id: str, device_id: str, session: str, idle: int | None,
             now: int) -> Sequence[Effect]:
        """A :class:`Heartbeat` given as its fields: the hot path, O(1), and no allocation
        unless something visible changes (the hub's ingest calls this with what it read off
        the wire, building no event object for the common case)."""
        user = self._users.get(user_id)
        d = user.devices.get(device_id) if user is not None else None
        if d is None and user is not None and user.cold is not None:
            # the first word from a user not built since the restart (never on the hot path
            # again: a built user has its devices)
            user = self._warm(user)
            d = user.devices.get(device_id) if user is not None else None
        if d is None or not d.connected or d.ended or d.session != session:
            self._heartbeat_slow(Heartbeat(user_id, device_id, session, idle), now)
            return self._drain()
        prev = d.last_seen
        d.last_seen = now
        if d.hold_until is not None:  # the first word after a restart or link outage
            self._heard(d, idle, now)
            return self._drain()
        if prev is not None and now - prev > (d.timeout or self._timeout) * 3 // 5:
            self._late_heartbeat(d, now - prev, now)
        if idle is not None:
            li = now - idle if idle > 0 else now
            old = d.last_interaction
            if old is None or li > old:
                d.last_interaction = li
                # A write per heartbeat would cost the store more than the hub does, so the
                # device's next deadline persists this (see _fire); only a user coming back
                # after a long idle is written at once, so a restart before that deadline
                # cannot turn them away before their next heartbeat repairs the clock.
                saved = d.saved_li
                if saved is None or now - saved >= self._write_idle_after:
                    self._dirty.add(d.user.id)
                if self._device_status(d, now) != d.status:
                    self._refresh_device(d, now)
                    self._refresh_user(d.user, now)
                    return self._drain()
                u = d.user
                if u.active_device != d.id and self._primary_may_move(u, d):
                    self._refresh_user(u, now)
                    return self._drain()
        return _NO_EFFECTS

    def _heard(self, d: _Device, idle_ms: int | None, now: int) -> None:
        """A held device spoke: its timers run again, from what it says now."""
        d.hold_until = None
        if idle_ms is not None:
            li = now - idle_ms if idle_ms > 0 else now
            if d.last_interaction is None or li > d.last_interaction:
                d.last_interaction = li
                self._dirty.add(d.user.id)
        self._refresh_device(d, now)
        self._refresh_user(d.user, now)

    def _late_heartbeat(self, d: _Device, gap: int, now: int) -> None:
        """A heartbeat came much later than the device's interval allows (1.5 intervals):
        one line a minute, with a count, so a misconfigured device is found before it flaps."""
        self.counters["late_heartbeat"] += 1
        last = self._late_logged_at
        if last is not None and now - last < 60_000:
            self._late_unlogged += 1
            return
        more = f" ({self._late_unlogged} more late heartbeats in the last minute)" \
            if self._late_unlogged else ""
        interval = (d.timeout or self._timeout) * 2 // 5
        log.warning("heartbeat of %s/%s came %d ms after the last one; its interval is %d ms "
                    "(it times out after %d ms): check the device's heartbeat interval or "
                    "network%s", d.user.id, d.id, gap, interval, d.timeout or self._timeout, more)
        self._late_logged_at = now
        self._late_unlogged = 0

    def tick(self, now: int, limit: int | None = None) -> Sequence[Effect]:
        """Fire every deadline that is due at ``now`` (at most ``limit`` of them).

        With a ``limit`` the caller gets the effects of a mass expiry in slices and can put
        each on the wire before computing the next (the hub does: the first users of a storm
        are published at once instead of after the whole pass); :meth:`next_deadline` tells
        whether more are due. A user whose devices fall in two slices may publish twice.

        A mass expiry allocates hundreds of thousands of short-lived objects: the caller
        holds the garbage collector off around it (:func:`hub.process.gc_paused`).
        """
        if not self._heap or self._heap[0][0] > now:
            return _NO_EFFECTS
        self._fire(now, limit)
        return self._drain()

    def _fire(self, now: int, limit: int | None = None) -> None:
        """Pop due heap entries; each user is re-evaluated once, after all its devices.

        One pass per user means devices that expire together (a broker outage drops every
        device of a user at once) publish one new state, not one per device in between.
        """
        heap = self._heap
        default_timeout = self._timeout
        out = self._out
        dirty = self._dirty
        changed: dict[str, _User] = {}
        timeouts = 0
        held = self._timeouts_held
        budget = -1 if limit is None else limit
        while heap and heap[0][0] <= now and budget:
            budget -= 1
            when, _, d = heapq.heappop(heap)
            if d.removed or d.due != when:
                continue  # superseded entry
            if isinstance(d, _Cold):
                # a first hold ends: build the group's users (each counts as an entry); their
                # devices' entries, due by now, are pushed and popped in this same pass
                d.due = None
                users = d.users
                built = 0
                while d.next < len(users) and (budget != 0 or not built):  # one at least
                    u = users[d.next]
                    d.next += 1
                    if u.cold is d:
                        self._warm(u)
                        built += 1
                        if budget > 0:  # (-1: no limit)
                            budget -= 1
                if d.next < len(users):  # the limit: the rest on the next slice
                    self._schedule_cold(d, when)
                else:
                    self._end_cold(d)
                continue
            d.due = None
            u = d.user
            seen = d.last_seen
            if d.hold_until is not None and d.hold_until <= now:
                d.hold_until = None  # a grace is over: the timers act from here on
            timeout = d.timeout or default_timeout
            if d.will_due is not None and d.will_due <= now:
                # the will's grace passed with no new session: the device is gone
                d.will_due = None
                self._pending_wills.discard(d)
                d.connected = False
                self.counters["will_applied"] += 1
                dirty.add(u.id)
            elif (d.connected and seen is not None and not held and now - seen >= timeout
                    and (d.sleep_until is None or now - d.sleep_until >= timeout)):
                d.connected = False
                d.sleep_until = None
                timeouts += 1
                out.append(DeviceTimedOut(u.id, d.id, d.session))
                dirty.add(u.id)
            elif d.last_interaction != d.saved_li:
                # heartbeats moved the idle clock without a write; persist it now, before
                # the stored value could give a different status than the live one
                dirty.add(u.id)
            if self._refresh_device(d, now):
                changed[u.id] = u
        if timeouts:
            # one line per tick, not per device: a broker outage times out thousands at once
            self.counters["device_timeout"] += timeouts
            log.info("%d device(s) timed out: no message within their heartbeat timeout "
                     "(%d ms unless the device announced its own interval)", timeouts,
                     default_timeout)
        for u in changed.values():
            self._refresh_user(u, now)

    def hold_timeouts(self) -> None:
        """The hub lost its broker: it hears no device now, so no connected device's timers
        may change its status (a silent device is not a gone one, and an idle clock that no
        heartbeat can move is not an idle user).

        Wills waiting out their grace are void: a broker that shuts down sends every client's
        will just before it drops the hub (measured: 0.5 ms for 20 clients), and those devices
        reconnect with new sessions. One that does not is timed out after the link is back.
        """
        if self._pending_wills:
            self.counters["will_voided_by_link_loss"] += len(self._pending_wills)
            for d in self._pending_wills:
                d.will_due = None
            self._pending_wills.clear()
        if self._timeouts_held:
            return
        self._timeouts_held = True
        for g in self._cold_groups:
            g.forever = True
        for u in self._users.values():
            for d in u.devices.values():
                if d.connected and not d.virtual:
                    d.hold_until = _FOREVER
                    # no deadline until the link is back (see _next_deadline): the entry in
                    # the heap is void, so a device heard before then is scheduled afresh,
                    # as one built while the link was down is (and as release_timeouts
                    # schedules the rest). Nothing is owed to the void entry: an idle clock
                    # that heartbeats moved without a write moved while the stored one was
                    # under write_idle_after old (see beat), which a restart tolerates.
                    d.due = None

    def release_timeouts(self, now: int) -> None:
        """The broker is back: every connected device gets one heartbeat timeout from ``now``
        to be heard again (reconnecting devices send a new birth well within it), and its
        status holds until then, instead of the false-offline (or false-away) storm that
        counting the outage as its silence would cause."""
        if not self._timeouts_held:
            return
        self._timeouts_held = False
        for g in self._cold_groups:
            g.seen = max(g.seen, now)
            g.forever = False
            self._schedule_cold(g, now)
        for u in self._users.values():
            for d in u.devices.values():
                if d.connected and not d.virtual:
                    d.last_seen = now if d.last_seen is None else max(d.last_seen, now)
                    if d.hold_until is not None:  # not heard from during the outage
                        d.hold_until = now + (d.timeout or self._timeout)
                    self._schedule(d, now)

    def check(self, event: Event) -> None:
        """Raise :class:`EngineError` if ``event`` would be refused, changing nothing.

        The caller can check every event of one message before applying any, so a message
        that is refused in part (a ``set`` with a status and too long a custom status) changes
        nothing at all.
        """
        if type(event) is SetCustomStatus and event.text is not None:
            length = len(event.text.strip())
            if length > self.config.max_custom_status:
                raise EngineError(
                    f"custom status is {length} characters; the limit is "
                    f"{self.config.max_custom_status}"
                )

    def next_deadline(self) -> int | None:
        """When :meth:`tick` next has work (may be early: superseded entries pop as no-ops)."""
        return self._heap[0][0] if self._heap else None

    # ---------------------------------------------------------------- handlers

    def _birth(self, ev: Birth, now: int) -> None:
        d = self._device_for(ev.user, ev.device, now, virtual=False)
        if d is None:
            return
        if (d.session != ev.session and d.connected and not d.ended and ev.ts is not None
                and d.born_ts is not None and ev.ts < d.born_ts):
            # a late birth of an older session (its retained copy, or a QoS 1 retry that
            # overtook nothing): the live session keeps the device, whose heartbeats would
            # otherwise be dropped as another session's until a false timeout
            self.counters["stale_session"] += 1
            log.debug("ignored birth of %s/%s: session %s was born before the current one",
                      ev.user, ev.device, ev.session)
            return
        if d.session == ev.session:
            # The same birth again: a retained copy redelivered (the hub re-subscribed) or a
            # QoS 1 duplicate. The broker still holds the session, so it proves liveness and
            # revives a timed-out device, but it is not a new interaction: the idle clock and
            # the primary stay. After the session's own will it is stale.
            if d.ended:
                self.counters["stale_session"] += 1
                return
            if ev.heartbeat_ms is not None:
                # the birth after a heartbeat that stood in for it: its interval counts
                d.timeout = min(ev.heartbeat_ms * 5 // 2, self._max_timeout)
                d.born_ts = ev.ts if ev.ts is not None else d.born_ts
                self._schedule(d, now)
            renamed = False
            if ev.name and ev.name[:128] != d.name:
                # the birth came after a heartbeat that stood in for it: take its name
                d.name = sys.intern(ev.name[:128])
                self._dirty.add(d.user.id)
                renamed = True
            # Being heard ends a hold (restart, link outage) whether or not the birth brings
            # a name: the name is a label and must not decide the device's status.
            if d.connected:
                d.last_seen = now
                if d.hold_until is not None:
                    self._heard(d, None, now)  # re-derives the user, the new name included
                elif renamed:
                    self._refresh_user(d.user, now)
            else:
                self._revive(d, now)
            return
        self._connect(d, ev.session, now, ev.name, ev.idle_ms, ev.heartbeat_ms, ev.ts)

    def _connect(self, d: _Device, session: str, now: int, name: str | None,
                 idle_ms: int | None = None, heartbeat_ms: int | None = None,
                 born_ts: int | None = None) -> None:
        """A new session of the device: connected from ``now``, with the interval and idle
        time its birth announced (a heartbeat standing in for a lost birth announces none)."""
        d.virtual = False
        d.session = session
        d.connected = True
        d.ended = False
        d.last_seen = now
        d.born_ts = born_ts
        d.hold_until = None
        d.sleep_until = None
        if d.will_due is not None:  # the old session's will is void: a reconnect, no flap
            d.will_due = None
            self._pending_wills.discard(d)
            self.counters["will_voided_by_reconnect"] += 1
        if heartbeat_ms is not None:
            d.timeout = min(heartbeat_ms * 5 // 2, self._max_timeout)
        elif born_ts is not None:
            d.timeout = None  # a birth that announces nothing: the hub's interval applies
        # reconnecting is not using the device: with idleMs the birth says when the user
        # last did something, without it the birth itself is the interaction
        li = now - idle_ms if idle_ms else now
        if d.last_interaction is None or li > d.last_interaction:
            d.last_interaction = li
        if name:
            d.name = sys.intern(name[:128])
        self._device_changed(d, now)

    def _revive(self, d: _Device, now: int) -> None:
        """The current session proved alive again after a timeout or an API status."""
        d.connected = True
        d.virtual = False  # an API-set status holds only until the device speaks again
        d.last_seen = now
        d.hold_until = None
        self.counters["device_revived"] += 1
        self._device_changed(d, now)

    def _device_offline(self, ev: DeviceOffline, now: int) -> None:
        user = self._get(ev.user)
        if user is None:
            # a user this hub does not know (storage=memory after a restart): the broker may
            # still hold an old retained "online" for them, so say what is true: offline
            d = self._device_for(ev.user, ev.device, now, virtual=False)
            if d is not None:
                d.session = ev.session
                d.ended = True
                self._refresh_user(d.user, now)
            return
        d = user.devices.get(ev.device)
        if d is None or d.session != ev.session or d.ended:
            self.counters["stale_session"] += 1
            log.debug("ignored offline of %s/%s: session %s is not current",
                      ev.user, ev.device, ev.session)
            return
        lost = ev.reason == "lost"
        if lost and d.sleep_until is not None and d.connected:
            # an announced sleep: the broker may still send the will of the sleeping session
            # (a device that dropped its link instead of disconnecting); it changes nothing
            self.counters["will_while_sleeping"] += 1
            d.ended = True
            return
        d.ended = True
        if lost and self._grace and d.connected:
            # the broker speaks for a silent device: wait out the grace, in which a birth of
            # a new session (the same device reconnecting) voids this will. Within a hold
            # (the hub restarted or its link came back) the device has until the hold ends:
            # a broker that restarts queues every client's will for the hub, and the devices
            # reconnect after the hub does
            due = now + self._grace
            if d.hold_until is not None and d.hold_until > due:
                due = d.hold_until
            d.will_due = due
            self._pending_wills.add(d)
            self._dirty.add(d.user.id)
            self._schedule(d, now)
            return
        d.connected = False
        d.sleep_until = None
        if d.will_due is not None:
            d.will_due = None
            self._pending_wills.discard(d)
        if not lost:
            # a clean stop is the device speaking; a will is the broker speaking for a
            # device that has been silent, so it does not count as seeing the device
            d.last_seen = now
        self._device_changed(d, now)

    def _sleep(self, ev: Sleep, now: int) -> None:
        d = self._known(ev.user, ev.device)
        if d is None or d.session != ev.session or d.ended or not d.connected:
            self.counters["stale_session"] += 1
            return
        if d.sleep_until is not None:
            return  # the same announcement redelivered (a retained copy): a new sleep needs a
            # new session, whose birth ended this one
        d.sleep_until = now + ev.sleep_ms
        d.last_seen = now
        d.hold_until = None
        self._device_changed(d, now)

    def _heartbeat_slow(self, ev: Heartbeat, now: int) -> None:
        d = self._known(ev.user, ev.device)
        if d is not None and d.session == ev.session:
            if d.ended:
                self.counters["stale_session"] += 1
                return
            # not connected, not ended: it timed out (or the API set its status); the same
            # session speaks again, so it is connected again
            d.will_due = None
            if ev.idle_ms is not None:
                li = now - ev.idle_ms if ev.idle_ms > 0 else now
                if d.last_interaction is None or li > d.last_interaction:
                    d.last_interaction = li
            self._revive(d, now)
            return
        if d is not None and d.connected:
            self.counters["stale_session"] += 1
            return
        # unknown device, or a disconnected one with a session we never saw born: the birth
        # was lost (or came before the hub did). The heartbeat proves the session is alive.
        self.counters["implicit_birth"] += 1
        d = self._device_for(ev.user, ev.device, now, virtual=False)
        if d is None:
            return
        self._connect(d, ev.session, now, None)

    def _activity(self, ev: ActivityEvent, now: int) -> None:
        device_id = ev.device
        virtual = device_id is None
        if device_id is None:
            device_id = ev.channel_id or "api"
            existing = self._get(ev.user)
            same = existing.devices.get(device_id) if existing is not None else None
            if same is not None and not same.virtual:
                # a real device carries the channel's name: API activity is not its doing
                device_id = ("api." + device_id)[:64]
        d = self._device_for(ev.user, device_id, now, virtual=virtual)
        if d is None:
            return
        u = d.user
        wall_now = now + self._wall
        ts = ev.timestamp if ev.timestamp is not None else wall_now
        if ts > wall_now + self.config.max_clock_skew_ms:
            self.counters["clock_skew_clamped"] += 1
            ts = wall_now
        self._out.append(
            RecordActivity(
                u.id,
                Activity(
                    type=ev.type,
                    channel_id=ev.channel_id,
                    timestamp=ts,
                    device_id=d.id,
                    received_at=wall_now,
                    data=ev.data,
                ),
            )
        )
        if (ev.timestamp is not None and d.last_interaction is not None
                and ts < d.last_interaction + self._wall - self.config.max_clock_skew_ms):
            # older than what the device last did (replayed from an outbox, say): history
            # only, it moves no status, idle clock or primary
            self.counters["activity_history"] += 1
            self._dirty.add(u.id)
            return
        if ev.channel_id is not None:
            if u.channels is _NO_CHANNELS:
                u.channels = {}
            u.channels[ev.channel_id] = now
            if len(u.channels) > 256:
                self._prune_channels(u, now)
        d.last_interaction = now
        if d.connected or d.virtual:
            d.last_seen = now
        d.hold_until = None
        self._dirty.add(u.id)
        self._refresh_device(d, now)
        if d.status != OFFLINE and (not d.virtual or not self._real_present(u)):
            u.active_device = d.id  # explicit activity moves the primary at once
        self._refresh_user(u, now)

    def _set_status(self, ev: SetStatus, now: int) -> None:
        if ev.status not in (ONLINE, AWAY, DND, OFFLINE):
            raise EngineError(f"unknown status {ev.status!r}: use online, away, dnd or offline")
        u = self._user_for(ev.user)
        u.manual_status = None if ev.status == ONLINE else ev.status
        self._dirty.add(u.id)
        d = u.devices.get(ev.device) if ev.device else None
        if d is not None and (d.connected or d.virtual):
            self._interact(d, now)
        elif (
            ev.device is None
            and ev.status != OFFLINE
            and all(x.status == OFFLINE for x in u.devices.values())
        ):
            # through the API with no device present: the user is evidently here, so the
            # API's virtual device carries them (idle timers then apply as usual). Only when
            # no device is present: an invisible user's devices are present already.
            api = self._device_for(u.id, "api", now, virtual=True)
            if api is not None:
                self._interact(api, now)
        self._refresh_user(u, now)

    def _interact(self, d: _Device, now: int) -> None:
        if d.last_interaction is None or now > d.last_interaction:
            d.last_interaction = now
        d.last_seen = now
        d.hold_until = None
        self._refresh_device(d, now)

    def _set_custom_status(self, ev: SetCustomStatus, now: int) -> None:
        self.check(ev)
        text = (ev.text.strip() or None) if ev.text is not None else None
        u = self._user_for(ev.user)
        u.custom_status = text
        self._dirty.add(u.id)
        self._refresh_user(u, now)

    def _set_device_status(self, ev: SetDeviceStatus, now: int) -> None:
        if ev.status not in (ONLINE, AWAY, OFFLINE):
            raise EngineError(f"unknown device status {ev.status!r}: use online, away or offline")
        d = self._device_for(ev.user, ev.device, now, virtual=True)
        if d is None:
            raise EngineError(
                f"user {ev.user!r} already has {self.config.max_devices_per_user} devices"
            )
        if not d.virtual:
            # a real device set through the API loses its connection claim: it stands as
            # the API says until its next heartbeat or birth
            d.connected = False
        d.virtual = True
        d.hold_until = None
        if ev.status == ONLINE:
            d.last_interaction = now
        elif ev.status == AWAY:
            d.last_interaction = now - self._away
        else:
            d.last_interaction = now - self._offline
        d.last_seen = now
        self._dirty.add(d.user.id)
        self._refresh_device(d, now)
        if ev.status == ONLINE:
            d.user.active_device = d.id
        self._refresh_user(d.user, now)

    def _ack(self, ev: Ack, now: int) -> None:
        d = self._known(ev.user, ev.device)
        if d is None:
            self.counters["ack_unknown_device"] += 1
            return
        if ev.version > d.user.version:
            self.counters["ack_future_version"] += 1
            return
        if ev.version > d.acked_version:
            d.acked_version = ev.version
            self._dirty.add(d.user.id)

    def _sync(self, ev: SyncRequest, now: int) -> None:
        u = self._user_for(ev.user)
        u.last_sync = now + self._wall
        self._dirty.add(u.id)
        self._refresh_user(u, now, force=True)

    def _remove_device(self, ev: RemoveDevice, now: int) -> None:
        user = self._get(ev.user)
        d = user.devices.pop(ev.device, None) if user else None
        if user is None or d is None:
            raise EngineError(f"user {ev.user!r} has no device {ev.device!r}")
        d.removed = True
        if d.will_due is not None:
            self._pending_wills.discard(d)
        if user.active_device == d.id:
            user.active_device = None
        self._dirty.add(user.id)
        if not d.virtual:
            # its retained birth would bring it back the next time the hub subscribes
            self._out.append(DeviceRemoved(user.id, d.id))
        self._refresh_user(user, now)

    def _remove_user(self, ev: RemoveUser, now: int) -> None:
        u = self._get(ev.user)
        if u is None:
            raise EngineError(f"unknown user {ev.user!r}")
        real = [d.id for d in u.devices.values() if not d.virtual]
        for d in u.devices.values():
            self._pending_wills.discard(d)
        self._tombstones[u.id] = max(u.version, u.reserved)
        self.forget_user(u.id)
        self._dirty.add(u.id)  # the tombstone goes to the store
        for device_id in real:  # their retained births would bring them back
            self._out.append(DeviceRemoved(u.id, device_id))
        self._out.append(UserRemoved(u.id))

    # ---------------------------------------------------------------- rules

    def _device_status(self, d: _Device, now: int) -> DeviceStatus:
        if d.hold_until is not None and now < d.hold_until and (d.connected or d.virtual):
            return d.status  # a restart or link outage: unchanged until heard or grace over
        if not (d.connected or d.virtual) or d.last_interaction is None:
            return OFFLINE
        idle = now - d.last_interaction
        if idle >= self._offline:
            return OFFLINE
        if idle >= self._away:
            return AWAY
        return ONLINE

    def _next_deadline(self, d: _Device) -> int | None:
        if d.will_due is not None:
            return d.will_due
        best: int | None = None
        real = d.connected and not d.virtual
        hold = d.hold_until
        if hold == _FOREVER:
            return None  # the link is down: release_timeouts schedules every device again
        if real and d.last_seen is not None and not self._timeouts_held:
            timeout = d.timeout or self._timeout
            best = d.last_seen + timeout
            if d.sleep_until is not None and d.sleep_until + timeout > best:
                best = d.sleep_until + timeout
        if hold is not None and (best is None or hold < best):
            best = hold
        if d.last_interaction is not None and (d.connected or d.virtual):
            if d.status == ONLINE:
                idle_due = d.last_interaction + self._away
            elif d.status == AWAY:
                idle_due = d.last_interaction + self._offline
            else:
                return best
            if hold is not None and idle_due < hold:
                idle_due = hold  # held: the idle clock is judged when the hold ends
            if best is None or idle_due < best:
                best = idle_due
        return best

    def _schedule(self, d: _Device, now: int) -> None:
        when = self._next_deadline(d)
        if when is None:
            return
        if d.due is None or when < d.due:
            when = max(when, now)
            d.due = when
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, d))

    def _refresh_device(self, d: _Device, now: int) -> bool:
        """Recompute the device's status; return True when it changed."""
        new = self._device_status(d, now)
        changed = new != d.status
        if changed:
            d.status = new
            self._dirty.add(d.user.id)
        self._schedule(d, now)
        return changed

    @staticmethod
    def _real_present(u: _User) -> bool:
        """Is a real (MQTT) device of the user present? Then no virtual one is primary."""
        return any(not x.virtual and x.status != OFFLINE for x in u.devices.values())

    def _primary_may_move(self, u: _User, d: _Device) -> bool:
        cur = u.devices.get(u.active_device) if u.active_device else None
        if cur is None or cur.status == OFFLINE or (cur.virtual and not d.virtual):
            return d.status != OFFLINE
        return (
            d.last_interaction is not None
            and cur.last_interaction is not None
            and d.last_interaction > cur.last_interaction + self._hysteresis
        )

    def _choose_primary(self, u: _User) -> str | None:
        """The present device with the most recent interaction; a real (MQTT) device over any
        virtual one (API activity names a channel, not the device in the user's hand)."""
        cur = u.devices.get(u.active_device) if u.active_device else None
        best: _Device | None = None
        for d in u.devices.values():
            if d.status == OFFLINE or d.last_interaction is None:
                continue
            if best is None or (best.virtual and not d.virtual) or (
                    best.virtual == d.virtual
                    and d.last_interaction > (best.last_interaction or 0)):
                best = d
        if best is None:
            return cur.id if cur is not None else None  # none present: the last one stays
        if cur is None or cur.status == OFFLINE or cur is best or (cur.virtual and not best.virtual):
            return best.id
        assert best.last_interaction is not None and cur.last_interaction is not None
        if best.last_interaction > cur.last_interaction + self._hysteresis:
            return best.id
        return cur.id

    @staticmethod
    def _user_status(u: _User) -> Status:
        any_online = False
        any_present = False
        for d in u.devices.values():
            if d.status == ONLINE:
                any_online = True
                break
            if d.status == AWAY:
                any_present = True
        if not (any_online or any_present):
            return OFFLINE
        if u.manual_status is not None:
            return u.manual_status
        return ONLINE if any_online else AWAY

    def _refresh_user(self, u: _User, now: int, force: bool = False) -> None:
        """Re-derive the user's status and primary; publish and emit what changed."""
        old = u.status
        new = self._user_status(u)
        u.active_device = self._choose_primary(u)
        if new != old:
            u.status = new
            if new == OFFLINE:
                self._present.discard(u.id)
            else:
                self._present.add(u.id)
        key = hash(self._key(u))
        if key != u.published_key:
            u.published_key = key
            u.version += 1
            if u.version > u.reserved - VERSION_RESERVE // 2:
                u.reserved = u.version + VERSION_RESERVE  # persisted with this change
            self._dirty.add(u.id)
            self._out.append(PublishState(u.id, self._snapshot(u)))
        elif force:
            self._out.append(PublishState(u.id, self._snapshot(u), forced=True))
        if new != old:
            ts = now + self._wall
            self._out.append(EmitEvent(u.id, "statusChange", old, new, ts))
            if old == OFFLINE:
                self._out.append(EmitEvent(u.id, "online", old, new, ts))
            elif new == OFFLINE:
                self._out.append(EmitEvent(u.id, "offline", old, new, ts))

    @staticmethod
    def _key(u: _User) -> tuple[Any, ...]:
        """Everything published except ``lastSeen``: the version moves when, and only when,
        this changes."""
        return (
            u.name,
            u.status,
            u.custom_status,
            u.active_device,
            tuple([(d.id, d.name, d.status, d.sleep_until is not None)
                   for d in u.devices.values()]),
        )

    # ---------------------------------------------------------------- helpers

    def _user_for(self, user_id: str) -> _User:
        u = self._get(user_id)
        if u is None:
            u = self._users[user_id] = _User(user_id)
            if self._all is not None:
                self._all.add(user_id)
            floor = self._tombstones.pop(user_id, None)
            if floor is not None:  # removed before: continue above what was published then
                u.version = u.reserved = floor
        return u

    def _known(self, user_id: str, device_id: str) -> _Device | None:
        """The device if the engine knows it (never creates one)."""
        u = self._get(user_id)
        return u.devices.get(device_id) if u is not None else None

    def _device_changed(self, d: _Device, now: int) -> None:
        """Something about ``d`` changed: persist its user, re-derive it and its user."""
        self._dirty.add(d.user.id)
        self._refresh_device(d, now)
        self._refresh_user(d.user, now)

    def _device_for(self, user_id: str, device_id: str, now: int, virtual: bool) -> _Device | None:
        u = self._user_for(user_id)
        d = u.devices.get(device_id)
        if d is None:
            if len(u.devices) >= self.config.max_devices_per_user:
                self.counters["too_many_devices"] += 1
                log.warning("refused device %s of user %s: it already has %d devices",
                            device_id, user_id, len(u.devices))
                return None
            # interned: device ids ("phone", "laptop") repeat across users, one copy serves all
            device_id = sys.intern(device_id)
            d = u.devices[device_id] = _Device(u, device_id, device_id, virtual)
            self._dirty.add(user_id)
        return d

    def _prune_channels(self, u: _User, now: int) -> None:
        cutoff = now - self._offline
        for ch in [c for c, t in u.channels.items() if t < cutoff]:
            del u.channels[ch]

    def _drain(self) -> Sequence[Effect]:
        if not self._out:
            return _NO_EFFECTS
        out = self._out
        self._out = []
        return out

    def _snapshot(self, u: _User) -> UserState:
        # plain objects (UserState): a storm or a republish builds one per user at once
        active = u.active_device
        last_seen: int | None = None
        wall = self._wall
        devices = []
        for d in u.devices.values():
            seen = d.last_seen
            if seen is not None:
                seen += wall
                if last_seen is None or seen > last_seen:
                    last_seen = seen
            sleep = d.sleep_until
            devices.append(DeviceState(d.id, d.name, d.status, seen, d.id == active,
                                       sleep is not None, None if sleep is None else sleep + wall))
        return UserState(u.id, u.name, u.status, u.custom_status, last_seen, active, u.version,
                         devices)

    # ---------------------------------------------------------------- queries

    def has_user(self, user_id: str) -> bool:
        return user_id in self._users

    def user_ids(self) -> list[str]:
        return list(self._users)

    def published_fields(self) -> Iterator[tuple[str, Status, str | None, str | None, int]]:
        """(user id, status, custom status, primary, version) of every user: what the retained
        topics hold once published, without building a state payload per user."""
        for u in self._users.values():
            yield u.id, u.status, u.custom_status, u.active_device, u.version

    def statuses(self, user_id: str) -> tuple[Status, list[DeviceStatus]] | None:
        """The user's status and its devices', for counting (``/metrics``): a user loaded
        cold is not built for it (its devices' statuses are the stored ones until it is), so
        the first scrape after a restart does not build a million devices on the loop."""
        u = self._users.get(user_id)
        if u is None:
            return None
        if u.cold is not None:
            return u.status, [_DEVICE_STATUS[s] for s in _STORED_STATUS.findall(
                self._cold[user_id])]
        return u.status, [d.status for d in u.devices.values()]

    def device_count(self) -> int:
        return sum(len(u.devices) for u in self._users.values()) + self._cold_devices

    def snapshot(self, user_id: str) -> UserState | None:
        """The user's state as published on ``P/users/{user}/state`` (None for unknown users)."""
        u = self._get(user_id)
        return self._snapshot(u) if u is not None else None

    def get_status(self, user_id: str) -> UserStatus:
        u = self._get(user_id)
        if u is None:
            return UserStatus(user_id=user_id, name=user_id, status=OFFLINE)
        last_seen = max((d.last_seen for d in u.devices.values() if d.last_seen is not None),
                        default=None)
        if last_seen is not None:
            last_seen += self._wall
        return UserStatus(
            user_id=u.id,
            name=u.name,
            status=u.status,
            custom_status=u.custom_status,
            last_seen=last_seen,
            active_device=u.active_device,
            version=u.version,
        )

    def get_devices(self, user_id: str) -> list[DeviceInfo]:
        u = self._get(user_id)
        if u is None:
            return []
        return [
            DeviceInfo(
                id=d.id,
                name=d.name,
                status=d.status,
                last_seen=None if d.last_seen is None else d.last_seen + self._wall,
                is_active=d.id == u.active_device,
                virtual=d.virtual,
            )
            for d in u.devices.values()
        ]

    def get_online_users(self, channel_id: str | None, now: int, limit: int | None = None,
                         after: str | None = None) -> list[OnlineUser]:
        """Users whose status is not offline; with a channel, only those active on it within
        ``offline_after_ms``. Sorted by user id; a page is the first ``limit`` ids above
        ``after`` (the last id of the page before), found in one pass without sorting all
        present users (100k present users must not hold the loop for one request)."""
        out = []
        cutoff = now - self._offline
        users = self._users

        def wanted(uid: str) -> bool:
            if after is not None and uid <= after:
                return False
            if channel_id is None:
                return True
            u = users[uid]
            if u.cold is not None and self._warm(u) is None:
                return False
            seen = u.channels.get(channel_id)
            return seen is not None and seen >= cutoff

        # with a channel, a user not built yet is built to read its channels, and one whose
        # text turns out unreadable is dropped: so not while the set itself is iterated
        present = self._present if channel_id is None else list(self._present)
        ids = (uid for uid in present if wanted(uid))
        page = sorted(ids) if limit is None else heapq.nsmallest(limit, ids)
        for uid in page:
            u = users[uid]
            out.append(
                OnlineUser(
                    user_id=u.id,
                    name=u.name,
                    status=u.status,
                    custom_status=u.custom_status,
                    active_device=u.active_device,
                )
            )
        return out

    def index_present(self) -> bool:
        """One bounded step (a few ms) of sorting the present users by id; True once
        :meth:`online_page` may run.

        Begun at the first page asked for, not at start: a hub nobody asks ``who`` never pays
        for the order (about 2 us per status change in or out of offline once it is kept), and
        a restart of 1M users does not build it. The caller spreads the steps over turns of
        its loop (100k present users: about 60 steps).
        """
        present = self._present
        if not isinstance(present, SortedIdSet):
            assert isinstance(present, set)
            present = self._present = SortedIdSet.over(present)
        return present.build_step()

    def index_users(self) -> bool:
        """One bounded step of sorting every user's id, as :meth:`index_present` does for
        the present ones; True once :meth:`user_page` may run. Begun at the first page asked
        for; its longest steps are the first two, which copy the ids (about 50 ms at 500k
        users on a slow day)."""
        if self._all is None:
            self._all = SortedIdSet.over(set(self._users))
        return self._all.build_step()

    def user_page(self, limit: int, after: str | None) -> list[str]:
        """Up to ``limit`` user ids above ``after``, in order (needs :meth:`index_users`):
        a binary search and a slice, where a pass over every user took 100 ms or more with
        the loop held at 500k users."""
        assert self._all is not None and self._all.built, "index_users() first"
        return list(itertools.islice(self._all.after(after), limit))

    def online_page(self, channel_id: str | None, now: int, limit: int, after: str | None,
                    scan: int = 5_000) -> tuple[list[OnlineUser], str | None]:
        """Up to ``limit`` present users above ``after`` by user id (those active on
        ``channel_id`` within ``offline_after_ms`` when given), looking at ``scan`` ids at most.

        The second item is where to go on from (the last id looked at) when the scan stopped
        before the page was full and more ids follow, else None: with a channel few users are
        on, a page can mean looking at every present user, which the caller then spreads
        over several turns of its loop. Needs the index (:meth:`index_present`)."""
        present = self._present
        assert isinstance(present, SortedIdSet) and present.built, "index_present() first"
        users = self._users
        cutoff = now - self._offline
        page: list[OnlineUser] = []
        looked = 0
        for uid in present.after(after):
            if looked >= scan:
                return page, after
            looked += 1
            after = uid
            u = users[uid]
            if channel_id is not None:
                if u.cold is not None and self._warm(u) is None:
                    return page, uid  # dropped from the set iterated here: go on afresh
                seen = u.channels.get(channel_id)
                if seen is None or seen < cutoff:
                    continue
            page.append(OnlineUser(user_id=u.id, name=u.name, status=u.status,
                                   custom_status=u.custom_status, active_device=u.active_device))
            if len(page) >= limit:
                break
        return page, None

    def get_sync_status(self, user_id: str) -> SyncStatus:
        """Devices that can ack (not virtual) and how many acked the current version."""
        u = self._get(user_id)
        if u is None:
            return SyncStatus(user_id=user_id, version=0, synced=0, total=0)
        real = [d for d in u.devices.values() if not d.virtual]
        synced = sum(1 for d in real if d.acked_version >= u.version)
        return SyncStatus(
            user_id=u.id, version=u.version, synced=synced, total=len(real), last_sync=u.last_sync
        )

    # ---------------------------------------------------------------- persistence

    def take_dirty(self, records: bool = True) -> list[UserRecord]:
        """Records of every user changed since the last call (see :meth:`take_dirty_docs`)."""
        return [doc.record() for doc in self.take_dirty_docs(records)]

    def take_dirty_docs(self, records: bool = True) -> list[StoredUser]:
        """Every user changed since the last call, as the store's next batch: plain
        :class:`UserDoc` (a removed user's tombstone as a record).

        ``records=False`` marks them saved without building records, for a store that keeps
        no users (``storage="memory"``): after a storm that was 20k records a flush for nothing.
        """
        if not self._dirty:
            return []
        users = [self._users[uid] for uid in self._dirty if uid in self._users]
        gone = [uid for uid in self._dirty if uid in self._tombstones]
        self._dirty = set()
        if records:
            out: list[StoredUser] = [self._doc(u) for u in users]
            out += [UserRecord.model_construct(id=uid, name=uid, version=self._tombstones[uid],
                                               version_reserved=self._tombstones[uid],
                                               removed=True)
                    for uid in gone]
            return out
        for u in users:
            for d in u.devices.values():
                d.saved_li = d.last_interaction
        return []

    def forget_user(self, user_id: str) -> None:
        u = self._users.pop(user_id, None)
        if u is not None:
            if u.cold is not None:
                self._drop_cold(u)
            for d in u.devices.values():
                d.removed = True
            self._present.discard(user_id)
            if self._all is not None:
                self._all.discard(user_id)
            self._dirty.discard(user_id)

    def _doc(self, u: _User) -> UserDoc:
        """The user as a store keeps it (the fields of ``UserRecord``, in its order), with
        no model built: see :class:`UserDoc`. Times are stored as wall-clock epoch ms (the
        monotonic ``now`` starts anew with every process)."""
        assert u.cold is None, "a user changes only once built"
        wall = self._wall
        devices = []
        for d in u.devices.values():
            d.saved_li = d.last_interaction
            devices.append({
                "id": d.id,
                "name": d.name,
                "virtual": d.virtual,
                "session": d.session,
                "connected": d.connected,
                "ended": d.ended,
                "status": d.status,
                "last_seen": None if d.last_seen is None else d.last_seen + wall,
                "last_interaction": (None if d.last_interaction is None
                                     else d.last_interaction + wall),
                "acked_version": d.acked_version,
                "timeout_ms": d.timeout,
                "sleep_until": None if d.sleep_until is None else d.sleep_until + wall,
                "born_ts": d.born_ts,
            })
        return UserDoc({
            "schema": 1,
            "id": u.id,
            "name": u.name,
            "status": u.status,
            "manual_status": u.manual_status,
            "custom_status": u.custom_status,
            "active_device": u.active_device,
            "version": u.version,
            "version_reserved": u.reserved,
            "last_seen": None,
            "last_sync": u.last_sync,
            "channels": {c: t + wall for c, t in u.channels.items()} if u.channels else {},
            "devices": devices,
            "removed": False,
        })

    def load(self, records: Iterable[UserRecord | UserText], now: int,
             crashed: bool = False) -> Sequence[Effect]:
        """Rebuild state from a store at start-up.

        A restart changes no status by itself: every loaded device keeps its stored status
        until it is heard from again or one heartbeat timeout of grace has passed (devices
        last known connected get their ``last_seen`` set to ``now``, so a device that is
        really gone times out then). A 10-minute outage would otherwise turn every active
        user away at load and online again at the first heartbeat: an event storm at fleet
        size. Transitions that the grace then finds are real and come out as effects. A user
        none of whose devices changed keeps its version and its primary (a record is one
        consistent snapshot of the user, so the primary rule applied to it picks the stored
        primary again). Millions of long-lived
        objects, none garbage: the caller holds the garbage collector off around it.

        A :class:`~hub.core.models.UserText` (a stored text with the fields a restart needs
        read off it) is loaded *cold*: the user is known, present or not, with its version,
        name, primary and custom status, but its devices are built from the text only when
        first needed (an event or query about the user, the end of its first hold, or
        :meth:`warm_some`), with the same ``now``; until then it behaves exactly as if built
        here. At a million devices this is the difference between a restart of 25 s and one
        of a few seconds (see ``UserText``). A text that turns out not to be a valid record
        when it is built is dropped then, as a bad record is skipped here.

        ``crashed``: the last run did not stop cleanly, so it may have published versions the
        store never saw; every user then starts at its reservation (published again with that
        version at start), and no version is ever published twice with different contents.
        """
        loaded: dict[str, _User] = {}
        bumped: list[str] = []
        digest = self.loaded_digest
        users = self._users
        cold = self._cold
        groups: dict[int, _Cold] = {}
        new_user = _User.__new__
        default_timeout = self._timeout
        count = 0
        for rec in records:
            if type(rec) is UserText:
                if not (crashed and rec.version_reserved > rec.version):
                    count += 1
                    digest += digest_term(rec.id, rec.version)
                    old = users.get(rec.id)
                    if old is not None:
                        self._drop_old(old)
                    # every slot set once (not __init__'s defaults first: a million users)
                    u = new_user(_User)
                    u.id = rec.id
                    u.name = rec.name
                    u.devices = {}
                    u.manual_status = None  # set when built (it may be dnd, not derived)
                    u.custom_status = rec.custom_status
                    u.status = rec.status
                    u.active_device = rec.active_device
                    u.version = rec.version
                    u.reserved = rec.version_reserved
                    u.last_sync = None
                    u.channels = _NO_CHANNELS
                    u.published_key = None
                    hold = rec.min_timeout
                    if hold is None or (rec.uses_default and default_timeout < hold):
                        hold = default_timeout
                    g = groups.get(hold)
                    if g is None:
                        g = groups[hold] = self._cold_group(now, hold)
                    u.cold = g
                    g.users.append(u)
                    cold[u.id] = rec.text
                    self._cold_devices += rec.devices
                    self._place(u, old is None)
                    self._dirty.discard(u.id)
                    continue
                try:  # its version moves at once: built now
                    rec = rec.record()
                except ValidationError as exc:
                    log.warning("skipping unreadable user %r: %s", rec.id,
                                exc.errors(include_url=False)[:3])
                    continue
            assert isinstance(rec, UserRecord)
            if rec.removed:  # a tombstone: only its version matters
                self._tombstones[rec.id] = max(rec.version, rec.version_reserved)
                continue
            count += 1
            digest += digest_term(rec.id, rec.version)
            old = users.get(rec.id)
            if old is not None:
                self._drop_old(old)
            u = _User(rec.id, rec.name)
            self._fill(u, rec, now, False, self._wall)
            if crashed and u.reserved > u.version:
                u.version = u.reserved
                u.reserved = u.version + VERSION_RESERVE
                bumped.append(u.id)
            self._place(u, old is None)
            loaded[u.id] = u
        self.loaded_digest = digest & DIGEST_MASK
        self.loaded_users += count
        self._dirty.difference_update(loaded)  # the store holds exactly what was just read
        self._dirty.update(bumped)  # ... except the versions a crash moved up
        for u in loaded.values():
            self._settle(u, now)
        effects = self._drain()
        self.crashed_at_load = self.crashed_at_load or crashed
        self.changed_at_load.update(e.user_id for e in effects if type(e) is PublishState)
        return effects

    def _place(self, u: _User, new: bool) -> None:
        """A loaded user takes its place: in the users, the present ones if it is, and the
        index of all ids (if kept) when it is ``new`` (not loaded over a live one)."""
        if u.status != OFFLINE:
            self._present.add(u.id)
        else:
            self._present.discard(u.id)
        self._users[u.id] = u
        if new and self._all is not None:
            self._all.add(u.id)

    def _fill(self, u: _User, rec: UserRecord, seen: int, forever: bool, wall: int) -> None:
        """Set a loaded user's fields and build its devices from its record: connected ones
        were last seen at ``seen`` and are held one timeout from it (until the link is back
        when ``forever``); stored wall-clock times become the engine's as of ``wall``."""
        intern = sys.intern
        new_device = _Device.__new__
        default_timeout = self._timeout
        u.manual_status = rec.manual_status
        u.custom_status = rec.custom_status
        u.status = rec.status
        u.active_device = rec.active_device
        u.version = rec.version
        u.reserved = rec.version_reserved
        u.last_sync = rec.last_sync
        u.channels = ({c: t - wall for c, t in rec.channels.items()} if rec.channels
                      else _NO_CHANNELS)
        devices = u.devices
        for dr in rec.devices:
            # every slot set once, here (not _Device.__init__'s defaults first: a restart
            # builds a million of these); ids and names interned, as _device_for does
            # (a store that parses with json.loads makes a new string for each)
            d = new_device(_Device)
            d.user = u
            d.id = device_id = intern(dr.id)
            d.name = intern(dr.name)
            d.virtual = virtual = dr.virtual
            d.connected = connected = dr.connected and not virtual
            d.session = dr.session
            d.ended = dr.ended
            d.status = dr.status
            last_seen = dr.last_seen
            d.last_seen = seen if connected else (None if last_seen is None else last_seen - wall)
            li = dr.last_interaction
            d.last_interaction = d.saved_li = None if li is None else li - wall
            d.acked_version = dr.acked_version
            d.timeout = timeout = dr.timeout_ms
            sleep = dr.sleep_until
            d.sleep_until = None if sleep is None else sleep - wall
            d.born_ts = dr.born_ts
            d.due = None
            d.removed = False
            d.will_due = None
            d.hold_until = (
                (_FOREVER if forever and connected else seen + (timeout or default_timeout))
                if connected or virtual else None)
            devices[device_id] = d
        # the published key of the stored state, so an unchanged user keeps its version
        u.published_key = hash(self._key(u))

    def _settle(self, u: _User, now: int) -> None:
        """A user just built from its record: start its devices' timers as of ``now`` (the
        load's, or when the link came back: held ones from their hold) and re-derive it
        where its devices or record say so."""
        changed = False
        for d in u.devices.values():
            if d.hold_until is not None:
                self._schedule(d, now)  # held: stands until heard or the grace ends
            else:
                changed = self._refresh_device(d, now) or changed
        # a user is derived from its devices: if none changed, the record (one consistent
        # snapshot written by this engine) already holds its status and primary, and
        # re-deriving them was half of a restart's engine time (1M devices)
        if changed or u.status != self._user_status(u) or (
                u.active_device is not None and u.active_device not in u.devices):
            self._refresh_user(u, now)

    def _drop_old(self, old: _User) -> None:
        """Loading over live state: the old user's heap entries die."""
        if old.cold is not None:
            self._drop_cold(old)
        for d in old.devices.values():
            d.removed = True

    # ---------------------------------------------------------------- users not built yet

    @property
    def cold_users(self) -> int:
        """Users loaded from their text whose devices are not built yet (see :meth:`load`)."""
        return len(self._cold)

    def warm_some(self, limit: int) -> Sequence[Effect]:
        """Build up to ``limit`` users loaded cold (the service calls this a slice per loop
        turn after a start, so the first heartbeats and queries after a restart seldom pay
        for it, and the work is done before anyone asks). Returns what building found."""
        built = 0
        groups = self._cold_groups
        while groups and built < limit:
            g = groups[0]
            users = g.users
            while g.next < len(users) and built < limit:
                u = users[g.next]
                g.next += 1
                if u.cold is g:
                    self._warm(u)
                    built += 1
            if g.next >= len(users):
                self._end_cold(g)
        return self._drain()

    def _get(self, user_id: str) -> _User | None:
        """The user, built if it was loaded cold; None if unknown (or unreadable)."""
        u = self._users.get(user_id)
        if u is not None and u.cold is not None:
            return self._warm(u)
        return u

    def _warm(self, u: _User) -> _User | None:
        """Build a user loaded cold from its text, as :meth:`load` would have built it.

        A text that is not a valid record after all (a hand edit the quick read could not
        see) drops the user, named in the log, as load skips such a record; one of the same
        id that comes back continues above the versions it had (a tombstone's floor).
        """
        g = u.cold
        assert g is not None
        text = self._drop_cold(u)
        try:
            rec = UserRecord.model_validate_json(text)
        except ValidationError as exc:
            log.warning("skipping unreadable user %r: %s", u.id,
                        exc.errors(include_url=False)[:3])
            self.forget_user(u.id)
            self._tombstones[u.id] = max(u.version, u.reserved)
            return None
        self._fill(u, rec, g.seen, g.forever, g.wall)
        self._settle(u, g.seen)
        return u

    def _drop_cold(self, u: _User) -> bytes:
        """The user is not cold any more (built, forgotten or loaded over): its text."""
        u.cold = None
        text = self._cold.pop(u.id)
        # the quick read counted exactly these (UserText.read: each device starts so)
        self._cold_devices -= text.count(b'{"id":"')
        return text

    def _cold_group(self, seen: int, hold: int) -> _Cold:
        """The group of cold users held from ``seen`` for ``hold``, with its heap entry."""
        g = _Cold(seen, hold, self._wall)
        self._cold_groups.append(g)
        self._schedule_cold(g, seen)
        return g

    def _end_cold(self, g: _Cold) -> None:
        """Every user of the group is built (or gone): its entry is void, it is forgotten."""
        g.removed = True
        g.users = []
        self._cold_groups.remove(g)

    def _schedule_cold(self, g: _Cold, now: int) -> None:
        """The group's heap entry at the end of its first hold (none while held forever)."""
        if g.forever:
            return
        when = max(g.seen + g.hold, now)
        if g.due is None or when < g.due:
            g.due = when
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, g))


_HANDLERS: Final[dict[type, Any]] = {
    Birth: Engine._birth,
    Sleep: Engine._sleep,
    DeviceOffline: Engine._device_offline,
    # Heartbeat: dispatched to Engine.heartbeat (the hot path) before this table
    ActivityEvent: Engine._activity,
    SetStatus: Engine._set_status,
    SetCustomStatus: Engine._set_custom_status,
    SetDeviceStatus: Engine._set_device_status,
    Ack: Engine._ack,
    SyncRequest: Engine._sync,
    RemoveDevice: Engine._remove_device,
    RemoveUser: Engine._remove_user,
}
