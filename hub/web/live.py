"""The dashboard's live feed: a sink of the service's effects, fanned out to browsers.

The service hands every effect to its sinks on the loop thread (the MQTT side is one); this
one keeps what the dashboard and /metrics need and nothing per user:

* a changed user's state goes to each open event stream as that user's state payload (the
  one on ``P/users/{user}/state``), never the whole list;
* the last :data:`RECENT_EVENTS` events (status changes, timeouts, removals) for a page that
  opens now;
* status changes counted by new status, and the store's flush durations in histogram buckets,
  for /metrics to read when scraped.

A browser that is slow or stuck must never hold up the hub. Nothing here waits: each stream
has its own pending set, written by its own task. Pending states are coalesced per user (a
user that changed five times is sent once, as it is now) and events are kept to the last few,
so a stream that keeps up costs nothing and one that does not is bounded: past
:data:`PENDING_USERS` users waiting, it is dropped (its browser reconnects and starts afresh).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from hub.core.events import DeviceRemoved, DeviceTimedOut, EmitEvent, UserRemoved
from hub.protocol import UserState

#: events a page sees when it opens (and the most a stream keeps pending)
RECENT_EVENTS = 50
#: users with a state waiting for one stream beyond which that stream is dropped
PENDING_USERS = 10_000
#: why every stream ends when the hub stops
STOPPING = "the hub is stopping"
#: upper bounds of the flush-duration buckets (seconds): a memory flush takes microseconds,
#: a TinyDB rewrite of a big file seconds
FLUSH_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class RecentEvent:
    """One line of the dashboard's event list."""

    ts: int
    kind: str  # statusChange, timeout, removed
    user_id: str
    device_id: str | None = None
    old: str | None = None
    new: str | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"ts": self.ts, "kind": self.kind, "userId": self.user_id}
        if self.device_id is not None:
            out["deviceId"] = self.device_id
        if self.old is not None:
            out["old"] = self.old
            out["new"] = self.new
        return out


def sse(event: str, data: bytes) -> bytes:
    """One server-sent event. ``data`` is JSON on one line (no newline may end it early)."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


class Stream:
    """What one browser's event stream has yet to be sent, and a wake-up for its writer."""

    def __init__(self, pending_users: int = PENDING_USERS) -> None:
        self._states: dict[str, UserState] = {}
        #: users removed from the hub since the last write (sent before any newer state)
        self._gone: set[str] = set()
        self._events: deque[RecentEvent] = deque(maxlen=RECENT_EVENTS)
        self._health: bytes | None = None
        self._limit = pending_users
        self.wake = asyncio.Event()
        #: why the stream ends (set once): its writer stops at the next wake-up
        self.ended: str | None = None
        #: called when the stream is dropped (the server aborts the connection, so a writer
        #: stuck on a full socket returns at once)
        self.on_drop: Callable[[], None] | None = None

    def state(self, state: UserState) -> None:
        if self.ended is not None:
            return
        self._states[state.user_id] = state  # the newest state of a user replaces the older
        if len(self._states) > self._limit:
            self.end(f"fell behind by more than {self._limit} users", drop=True)
            return
        self.wake.set()

    def gone(self, user_id: str) -> None:
        """The user was removed: the page drops it (a state queued before is not sent)."""
        if self.ended is None:
            self._states.pop(user_id, None)
            self._gone.add(user_id)
            self.wake.set()

    def event(self, event: RecentEvent) -> None:
        if self.ended is None:
            self._events.append(event)  # the oldest falls off: the page shows the last few
            self.wake.set()

    def health(self, frame: bytes) -> None:
        if self.ended is None:
            self._health = frame
            self.wake.set()

    def end(self, why: str, drop: bool = False) -> None:
        """No more to send; ``drop`` also cuts the connection (its writer may be stuck)."""
        if self.ended is not None:
            return
        self.ended = why
        self._states.clear()
        self._gone.clear()
        self._events.clear()
        self._health = None
        self.wake.set()
        if drop and self.on_drop is not None:
            self.on_drop()

    def take(self) -> bytes:
        """Everything pending as one write (serialized now: a state replaced while it waited
        was never serialized)."""
        parts = [sse("gone", json.dumps({"userId": uid}).encode()) for uid in self._gone]
        parts += [sse("user", s.to_json()) for s in self._states.values()]
        parts += [sse("event", json.dumps(e.to_dict()).encode()) for e in self._events]
        if self._health is not None:
            parts.append(self._health)
        self._gone.clear()
        self._states.clear()
        self._events.clear()
        self._health = None
        self.wake.clear()
        return b"".join(parts)


class FlushTimes:
    """Store flush durations in fixed buckets: one bisect per flush, read when scraped."""

    def __init__(self, bounds: tuple[float, ...] = FLUSH_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class LiveFeed:
    """The dashboard's sink: register it with ``service.add_sink``; every method runs on the
    loop thread and returns at once."""

    def __init__(self, wall: Callable[[], int]) -> None:
        self._wall = wall
        self.streams: set[Stream] = set()
        self.recent: deque[RecentEvent] = deque(maxlen=RECENT_EVENTS)
        #: user status changes by new status
        self.status_changes: Counter[str] = Counter()
        self.flush_times = FlushTimes()
        self._flush_began: float | None = None

    def open(self, stream: Stream) -> None:
        self.streams.add(stream)

    def close(self, stream: Stream) -> None:
        self.streams.discard(stream)

    def end_all(self, why: str) -> None:
        """End every stream and cut its connection: a browser stuck on a full socket must
        not hold up the hub's stop."""
        for stream in list(self.streams):
            stream.end(why, drop=True)

    def health(self, frame: bytes) -> None:
        for stream in self.streams:
            stream.health(frame)

    def _recent(self, event: RecentEvent) -> None:
        self.recent.append(event)
        for stream in self.streams:
            stream.event(event)

    # ------------------------------------------------------------------ Sink

    def publish_state(self, state: UserState, forced: bool) -> None:
        # forced: republished unchanged (a sync); browsers already have it
        if forced or not self.streams:
            return
        for stream in self.streams:
            stream.state(state)

    def publish_event(self, event: EmitEvent) -> None:
        if event.event != "statusChange":  # online/offline repeat what statusChange says
            return
        self.status_changes[event.new] += 1
        self._recent(RecentEvent(event.ts, "statusChange", event.user_id, None, event.old,
                                 event.new))

    def device_timed_out(self, effect: DeviceTimedOut) -> None:
        self._recent(RecentEvent(self._wall(), "timeout", effect.user_id, effect.device_id))

    def device_removed(self, effect: DeviceRemoved) -> None:
        self._recent(RecentEvent(self._wall(), "removed", effect.user_id, effect.device_id))

    def user_removed(self, effect: UserRemoved) -> None:
        for stream in self.streams:
            stream.gone(effect.user_id)
        self._recent(RecentEvent(self._wall(), "removed", effect.user_id))

    def before_flush(self) -> None:
        self._flush_began = time.perf_counter()

    def after_flush(self) -> None:
        # a failed flush never reaches here: the next one starts the clock again
        if self._flush_began is not None:
            self.flush_times.observe(time.perf_counter() - self._flush_began)
            self._flush_began = None
