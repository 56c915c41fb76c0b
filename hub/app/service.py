"""The presence service: the seed's presence API in Python, around the sans-I/O engine.

One asyncio task drives the engine's clock (it sleeps until the next deadline or flush), one
store keeps what survives a restart (written in batches, never per heartbeat), and optional
*sinks* put effects on the wire (the MQTT side of the hub registers one). With no broker the
service works fully in-process, which is how chat bots embed it.

Everything here runs on one event loop thread; transports hand messages over in batches
(:meth:`PresenceService.ingest`), so the engine needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hub.app.ratelimit import RateLimiter
from hub.core.clock import Clock, SystemClock
from hub.core.engine import Engine, EngineConfig, EngineError
from hub.core.errors import PresenceError
from hub.core.events import (
    ActivityEvent,
    DeviceRemoved,
    DeviceTimedOut,
    Effect,
    EmitEvent,
    Event,
    PublishState,
    RecordActivity,
    RemoveDevice,
    RemoveUser,
    SetCustomStatus,
    SetDeviceStatus,
    SetStatus,
    Sink,
    SyncRequest,
    UserRemoved,
    events_from_message,
)
from hub.core.models import (
    Activity,
    DeviceInfo,
    OnlineUser,
    StoredUser,
    SyncStatus,
    UserRecord,
    UserStatus,
    UserText,
)
from hub.process import gc_paused
from hub.protocol import (
    ID_FIELD_PATTERN,
    MAX_PAYLOAD_BYTES,
    BadRequest,
    DeviceMessage,
    DeviceTopic,
    Rejection,
    Topics,
    UserStatePayload,
    decode_payload,
    read_heartbeat,
    request_id,
    validate_id,
)
from hub.stores import MemoryStore, Store, StoreError, StoreErrorLog, StoreFenced

log = logging.getLogger(__name__)

#: deadlines fired per clock step: a storm of timeouts goes out in slices of this many devices
#: (about 10 ms of engine work each), so its first users are published at once and heartbeats
#: of the devices still alive are read in between
TICK_SLICE = 1000
#: how long a flush may wait for a mass expiry to finish: a store write (a thread serializing
#: every changed user) competes with the slices for the interpreter
STORM_FLUSH_DELAY_MS = 2000
#: how far the wall clock must move against the timer clock before labels follow it
WALL_STEP_MS = 1000
#: the shortest real-time sleep of the clock task between steps (see PresenceService._run)
CLOCK_STEP_MS = 10

EventName = Literal["statusChange", "online", "offline"]
EVENT_NAMES: tuple[str, ...] = ("statusChange", "online", "offline")


class ActivityIn(BaseModel):
    """What ``record_activity`` accepts (a dict with these keys works too; camelCase as well)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    type: str = Field(min_length=1, max_length=64)
    channel_id: str | None = Field(default=None, alias="channelId", pattern=ID_FIELD_PATTERN)
    timestamp: int | None = None
    device_id: str | None = Field(default=None, alias="deviceId", pattern=ID_FIELD_PATTERN)
    data: dict[str, Any] | None = None


@runtime_checkable
class BatchLoading(Protocol):
    """A store that can hand its users over in batches (TinyDB; see :meth:`PresenceService._load`)."""

    def load_user_batches(self, size: int = ..., texts: bool = False,
                          ) -> AsyncIterator[list[UserRecord | UserText]]: ...


class Leadership(Protocol):
    """Whether this hub may act, when several hubs share one store (``--standby``; see
    :mod:`hub.app.leadership`). Without one the service always may."""

    def valid(self) -> bool:
        """Cheap and local (a clock compare): True while the hub's lease is surely its own."""

    async def confirm(self) -> bool:
        """Ask the lease's keeper now: True if still ours, False if another hub took it over;
        raises :class:`~hub.stores.StoreError` when it cannot tell (Redis out of reach)."""


#: messages held while the lease is being confirmed (after a pause of the process); beyond it
#: they are dropped with a counted reason
HELD_MAX = 100_000
#: a load of this many users or more is frozen (``gc.freeze``) as it ends: see :meth:`_load`
FREEZE_AFTER_LOAD = 10_000
#: users loaded cold that the background pass builds per turn of the loop (25-40 us each:
#: turns of about 10 ms, 12-17 ms the longest measured at 1M on a slow day; see
#: :meth:`PresenceService._warm_cold`)
WARM_SLICE = 250


class Resource(Protocol):
    """Something the service owns and runs for its lifetime (the MQTT side of the hub)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    engine: EngineConfig
    prefix: str = "presence"
    #: how often dirty state and new activity are written to the store
    flush_interval_ms: int = 1000
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    #: per-device message rate (sustained messages/s and burst); None turns the limit off
    device_rate: float | None = 20.0
    device_burst: int = 100
    #: per-device rate of requests (chat commands), apart from the device's message budget:
    #: a device asking ``who`` in a loop must not starve its own heartbeats, nor the loop
    request_rate: float = 5.0
    request_burst: int = 20


Callback = Callable[..., Any]


class PresenceService:
    """Presence for users and their devices. Use as ``async with presence:``."""

    def __init__(
        self,
        config: ServiceConfig,
        store: Store | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.engine = Engine(config.engine)
        self.store: Store = store if store is not None else MemoryStore()
        self.clock: Clock = clock or SystemClock()
        self.topics = Topics(config.prefix)
        #: rejected input by reason (``bad_payload``, ``unknown_topic``, ...)
        self.rejected: Counter[str] = Counter()
        #: device messages by kind (``conn``, ``heartbeat``, ...), counted once the topic is
        #: valid, rate-limited or not: what devices send, for /metrics to read when scraped
        self.received: Counter[str] = Counter()
        #: what this hub is on its broker and prefix, for /healthz and /metrics: ``active``
        #: (the only role until a standby hub exists; that one sets it)
        self.role = "active"
        self._last_reject_log: dict[str, tuple[int, int]] = {}
        self._limiter = (
            RateLimiter(config.device_rate, config.device_burst)
            if config.device_rate is not None else None
        )
        self._request_limiter = RateLimiter(config.request_rate, config.request_burst)
        #: events of what the engine found at load, sent to the sinks once they are attached
        self._startup_events: list[EmitEvent] = []
        self._sinks: list[Sink] = []
        self._callbacks: dict[str, list[tuple[Callback, int]]] = {n: [] for n in EVENT_NAMES}
        self._pending_activity: dict[str, list[Activity]] = {}
        self._unsaved: dict[str, StoredUser] = {}  # a failed flush's batch, retried next time
        #: users removed since the last flush: the store deletes them (activity included)
        self._deleted: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._wake_at: int | None = None
        self._started = False
        self._loaded = False
        self._flush_lock = asyncio.Lock()
        self._request_handler: Callable[[DeviceMessage | BadRequest], Awaitable[None]] | None = None
        self._resources: list[Resource] = []  # owned, started after load, stopped first
        self._link_down = False
        self._flush_requested = False
        self._wall_offset = 0
        self._flushing: asyncio.Future[None] | None = None
        self._flush_again = False
        self._store_errors = StoreErrorLog(log)
        #: callers of durable() waiting for the next flush that starts after their call
        self._durable_waiters: list[asyncio.Future[None]] = []
        self._leadership: Leadership | None = None
        #: another hub took the lease over: this one neither writes, publishes nor ticks
        #: any more; :attr:`stepped_down` is set for whoever runs the hub
        self.fenced = False
        self.stepped_down = asyncio.Event()
        self._held: list[list[tuple[str, bytes]]] = []
        self._held_count = 0
        self._confirming: asyncio.Task[bool] | None = None
        self._warming: asyncio.Task[None] | None = None
        #: users the load left cold, and when it ended (for the background pass's log line)
        self._cold_loaded = (0, 0.0)
        self._frozen = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> PresenceService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the store, load state, start the clock task (and any attached transport)."""
        if self._started:
            return
        await self.store.open()
        await self._load()
        self._wake = asyncio.Event()
        self._runner = asyncio.create_task(self._run(), name="presence-clock")
        self._started = True
        started: list[Resource] = []
        try:
            for resource in self._resources:
                await resource.start()
                started.append(resource)
        except BaseException:
            # undo what was started (an in-process user keeps its loop): no clock task left
            # running, the store closed, state flushed
            self._resources, kept = started, self._resources
            try:
                await self.stop()
            finally:
                self._resources = kept
            raise
        if self.engine.cold_users:
            # after the transport is up: its connection and subscriptions (the hub's
            # readiness) do not wait behind slices of this pass (10k devices: 0.2-0.5 s)
            self._warming = asyncio.create_task(self._warm_cold(), name="presence-load")
        startup, self._startup_events = self._startup_events, []
        for eff in startup:  # status changes found at load reach P/events too
            for sink in self._sinks:
                sink.publish_event(eff)

    async def stop(self) -> None:
        """Stop the transport, fire what is due, flush everything, close the store."""
        if not self._started:
            return
        self._started = False
        if self._warming is not None:  # users not built yet stay as the store has them
            self._warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warming
            self._warming = None
        for resource in reversed(self._resources):
            try:
                await resource.stop()
            except Exception:  # a failing transport must not lose the final flush
                log.exception("error while stopping %r", resource)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._confirming is not None:
            self._confirming.cancel()
        if self.fenced:
            # another hub is active: its state is the truth now, nothing of ours may land
            await self.store.close()
            return
        await self.flush()
        await self.store.swap_clean_stop(True)  # everything published is in the store now
        await self.store.close()

    async def _load(self) -> None:
        """Load the store into the engine, batch by batch where the store can (TinyDB).

        A million devices' records take 2 GB, and the engine's state a third of that: loaded
        a batch at a time, the records of one batch are let go of before the next is made, so
        the peak is the engine plus one batch. Every batch loads at the same ``now``, so the
        devices' restart grace ends together, as it did with one load.
        """
        if self._loaded:
            return
        # from here on a crash may leave published versions the store has not seen: the
        # marker says so to the next start, before anything is published
        crashed = not await self.store.swap_clean_stop(False)
        now: int | None = None
        users = 0
        effects: list[Effect] = []
        with gc_paused():
            async for batch in self._user_batches():
                if now is None:  # once the first batch is read: a small store's grace starts
                    now = self._now()  # after its whole load, as when it was one batch
                effects.extend(self.engine.load(batch, now, crashed))
                users += len(batch)
            if users >= FREEZE_AFTER_LOAD:
                # out of the collector's sight before it is back on: its first young
                # collection would walk every object just loaded (2 s at 1M devices)
                gc.freeze()
                self._frozen = True
        self._loaded = True
        if crashed and users:
            log.warning("the last run did not stop cleanly: user versions continue above what "
                        "it may have published")
        cold = self.engine.cold_users
        self._cold_loaded = (cold, time.monotonic())
        if users:
            log.info("loaded %d users from the store%s", users,
                     f" ({cold} to be built from their stored text in the background)"
                     if cold else "")
        self._apply(effects)
        self._startup_events.extend(e for e in effects if type(e) is EmitEvent)

    async def _warm_cold(self) -> None:
        """Build the users the load left cold (see ``Engine.load``), a slice per loop turn,
        so that heartbeats, requests and the republish run in between and the first
        messages after a restart seldom meet a user not built yet.

        Each slice runs with the collector held off and, after a large load, is frozen
        (``gc.freeze``) as the load was: a million devices' objects built with the collector
        on would make it walk them again and again as they accumulate."""
        engine = self.engine
        total, began = self._cold_loaded
        while engine.cold_users:
            try:
                with gc_paused():
                    effects = engine.warm_some(WARM_SLICE)
                    if self._frozen:
                        gc.freeze()
                if effects:
                    self._apply(effects)
            except Exception:  # the rest are still built when first needed
                log.exception("building the users loaded from their stored text failed")
                return
            await asyncio.sleep(0)
        log.info("built the %d users loaded from their stored text, %.2f s after the load",
                 total, time.monotonic() - began)

    async def _user_batches(self) -> AsyncIterator[Sequence[UserRecord | UserText]]:
        store = self.store
        if isinstance(store, BatchLoading):
            async for batch in store.load_user_batches(texts=True):
                yield batch
        else:
            yield await store.load_users()

    # ------------------------------------------------------------------ several hubs

    def set_leadership(self, leadership: Leadership) -> None:
        """Act only while ``leadership`` says this hub holds the lease (set before start)."""
        self._leadership = leadership

    def _leading(self) -> bool:
        return self._leadership is None or (not self.fenced and self._leadership.valid())

    async def confirm_leading(self) -> bool:
        """True while this hub may act; when its lease is in doubt, once Redis has said."""
        if self._leadership is None:
            return True
        if self.fenced:
            return False
        if self._leading():
            return True
        return await self._confirm_lease()

    def step_down(self, why: str) -> None:
        """Another hub is active: stop acting at once (no tick, no ingest, no write, no
        publish) and tell whoever runs the hub, which stops this service without its final
        flush and ``offline``."""
        if self.fenced:
            return
        self.fenced = True
        self._held.clear()
        log.warning("this hub is no longer the active one: %s", why)
        self.stepped_down.set()

    def _hold(self, batch: list[tuple[str, bytes]]) -> None:
        """Keep a batch that came while the lease is unconfirmed (the process was paused
        longer than the lease's margin): applied once the lease is confirmed ours, dropped if
        another hub took over (it gets them from the broker: durable kinds are not acked)."""
        if self.fenced:
            return
        if self._held_count + len(batch) > HELD_MAX:
            self.rejected["lease_unconfirmed"] += len(batch)
        else:
            self._held.append(batch)
            self._held_count += len(batch)
        self._confirm_lease()

    def _confirm_lease(self) -> asyncio.Task[bool]:
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.ensure_future(self._confirm())
        return self._confirming

    async def _confirm(self) -> bool:
        """Ask the lease's keeper until it can tell; replay what was held if it is ours."""
        assert self._leadership is not None
        log.warning("the hub's lease is not confirmed (the process was paused, or Redis did "
                    "not answer its renewals): holding timers and input until Redis confirms it")
        while True:
            try:
                ours = await self._leadership.confirm()
                break
            except StoreError as exc:
                self._store_errors.failed(exc)
                await asyncio.sleep(0.2)
        if not ours:
            self.step_down("another hub took the lease over while this one was paused")
            return False
        held, self._held, self._held_count = self._held, [], 0
        log.info("the hub's lease is confirmed: applying %d held batches",
                 len(held))
        for batch in held:
            self.ingest(batch)
        self._poke()
        return True

    def attach(self, resource: Resource) -> None:
        """Own a resource (the MQTT side): started after the store is loaded, stopped before
        the final flush."""
        self._resources.append(resource)

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def set_request_handler(
            self, handler: Callable[[DeviceMessage | BadRequest], Awaitable[None]]) -> None:
        """Who answers ``req`` messages (the hub's command handler, wired by the MQTT side)."""
        self._request_handler = handler

    # ------------------------------------------------------------------ broker link

    def link_down(self) -> None:
        """The hub lost its broker: it hears no device now, so no device may time out."""
        if not self._link_down:
            log.warning("broker link down: device timeouts held until it is back")
        self._link_down = True
        self.engine.hold_timeouts()

    def link_up(self) -> None:
        """The broker is back: devices get one heartbeat timeout to be heard again."""
        if self._link_down:
            self._link_down = False
            self.engine.release_timeouts(self._now())
            log.info("broker link up: devices have %d ms to be heard again",
                     self.config.engine.timeout_ms)
            self._poke()

    # ------------------------------------------------------------------ the clock task

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        interval = self.config.flush_interval_ms
        next_flush = self.clock.now() + interval
        while True:
            now = self.clock.now()
            due = self.engine.next_deadline()
            wake_at = next_flush if due is None else min(due, next_flush)
            self._wake_at = wake_at
            delay = max(0.0, (wake_at - now) / 1000)
            if delay > 0 and not self._flush_requested:
                # at most one clock step per CLOCK_STEP_MS: with a million devices a deadline
                # is due every few microseconds, and a wake-up per deadline was the clock's
                # main cost; a deadline is then up to CLOCK_STEP_MS late (timeouts are seconds)
                delay = max(delay, CLOCK_STEP_MS / 1000)
                self._wake.clear()
                # a timer and the event, not asyncio.wait_for (a task per wake-up in 3.11)
                timer = loop.call_later(delay, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
            if not self._leading():
                # a pause longer than the lease's margin (or a takeover): no timer fires
                # before Redis confirms this hub is still the active one
                if self.fenced or not await self._confirm_lease():
                    return
                continue
            now = self._now()
            try:
                with gc_paused():
                    effects = self.engine.tick(now, TICK_SLICE)
                self._apply(effects)
                due = self.engine.next_deadline()
                storm = due is not None and due <= now
                if storm:
                    # a mass expiry: let this slice's publishes out, then do the next one
                    await asyncio.sleep(0)
                if (now >= next_flush or self._flush_requested) and (
                        not storm or now >= next_flush + STORM_FLUSH_DELAY_MS):
                    self._flush_requested = False
                    next_flush = now + interval
                    if self._limiter is not None:
                        self._limiter.sweep(now)
                    self._request_limiter.sweep(now)
                    self._flush_in_background()
            except asyncio.CancelledError:
                raise
            except Exception:
                # the clock must keep running: a store outage is retried on the next flush
                log.exception("presence clock step failed; retrying")
                await asyncio.sleep(min(1.0, interval / 1000))

    def _flush_in_background(self) -> None:
        """Start a flush unless one is running. The clock task never waits on the store: a
        stalled Redis or a full disk must not stop timers (a dead device still goes offline)
        nor ingest; only the acknowledgements and answers that wait for durability wait."""
        if self._flushing is not None and not self._flushing.done():
            self._flush_again = True
            return
        self._flushing = asyncio.ensure_future(self.flush())
        self._flushing.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Future[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._store_errors.recovered()
        elif isinstance(exc, StoreFenced):
            self.step_down(str(exc))
        elif isinstance(exc, StoreError):
            self._store_errors.failed(exc)  # one line per outage and minute, no traceback
        else:
            log.error("writing to the store failed; retrying", exc_info=exc)
        if self._flush_again:  # asked for while this one ran: what came since goes now
            self._flush_again = False
            self.request_flush()

    def _now(self) -> int:
        """The timer clock's ``now`` for the engine, telling it how far the wall clock leads
        (one subtraction: the engine labels times with wall-clock ms, and a step of the wall
        clock moves only the labels, never a timer)."""
        now = self.clock.now()
        offset = self.clock.wall() - now
        if abs(offset - self._wall_offset) > WALL_STEP_MS:
            # a step (or a slew that added up): labels follow it; the jitter of reading two
            # clocks (a millisecond either way) must not change a label, or an unchanged
            # state would read differently from one call to the next
            self._wall_offset = offset
            self.engine.set_wall_offset(offset)
        return now

    def _poke(self) -> None:
        """Wake the clock task if the engine now has an earlier deadline than it sleeps for."""
        if self._wake is None:
            return
        due = self.engine.next_deadline()
        if due is not None and (self._wake_at is None or due < self._wake_at):
            self._wake_at = due
            self._wake.set()

    def request_flush(self) -> None:
        """Flush as soon as the clock task runs (a transport waits on it to ack messages)."""
        self._flush_requested = True
        if self._wake is not None:
            self._wake.set()

    async def tick(self) -> None:
        """Fire every deadline due at the clock's ``now`` (for fake clocks and simulations)."""
        with gc_paused():
            effects = self.engine.tick(self._now())
        self._apply(effects)

    async def durable(self, within: float | None = None) -> bool:
        """Return True once everything applied before this call is in the store.

        A chat command answers only after its change is persisted (a SIGKILL right after an
        ``ok`` must not lose it). The caller rides on the clock task's next flush (asked for
        at once), so many commands share one store write. False when ``within`` seconds pass
        first (the store is failing): the change stays applied and is written when the store
        is back.
        """
        if not self._started or self._runner is None:
            await self.flush()
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._durable_waiters.append(waiter)
        self.request_flush()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), within)
            return True
        except TimeoutError:
            return False

    async def flush(self) -> None:
        """Write dirty users and new activity to the store, then tell sinks it is durable."""
        async with self._flush_lock:
            waiters, self._durable_waiters = self._durable_waiters, []
            try:
                await self._flush_locked()
            except BaseException:
                self._durable_waiters[:0] = waiters  # durable with the next flush that works
                raise
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        for sink in list(self._sinks):
            try:
                sink.after_flush()
            except Exception:
                log.exception("sink after_flush failed")

    async def _flush_locked(self) -> None:
        """One flush under the lock: the batch is kept for the next one if it fails."""
        for sink in list(self._sinks):
            sink.before_flush()
        batch = self._unsaved
        for rec in self.engine.take_dirty_docs(getattr(self.store, "keeps_users", True)):
            batch[rec.id] = rec  # a newer record of the same user wins
        self._unsaved = {}
        records = list(batch.values())
        pending, self._pending_activity = self._pending_activity, {}
        deleted, self._deleted = self._deleted, set()
        try:
            for user_id in deleted:  # before the batch: it may hold the user's tombstone
                await self.store.delete_user(user_id)
            # activity first, users last: a store that buffers activity (TinyDB) writes it
            # with the users' batch, so a flush period costs one file write
            now = self.clock.wall()  # activity ages are wall-clock labels
            for user_id, entries in pending.items():
                await self.store.append_activity(user_id, entries, now)
            if records:
                await self.store.save_users(records)
            await self.store.flush()
        except BaseException:
            # keep the batch for the next flush rather than lose it
            for rec in records:
                self._unsaved.setdefault(rec.id, rec)
            self._deleted |= deleted  # deleting again is harmless
            for user_id, entries in pending.items():
                self._pending_activity.setdefault(user_id, [])[:0] = entries
            raise

    # ------------------------------------------------------------------ effects

    def _apply(self, effects: Sequence[Effect]) -> None:
        for eff in effects:
            if type(eff) is PublishState:
                for sink in self._sinks:
                    sink.publish_state(eff.state, eff.forced)
            elif type(eff) is EmitEvent:
                for sink in self._sinks:
                    sink.publish_event(eff)
                self._emit(eff)
            elif type(eff) is RecordActivity:
                self._pending_activity.setdefault(eff.user_id, []).append(eff.activity)
            elif type(eff) is DeviceTimedOut:
                for sink in self._sinks:
                    sink.device_timed_out(eff)
            elif type(eff) is DeviceRemoved:
                for sink in self._sinks:
                    sink.device_removed(eff)
            elif type(eff) is UserRemoved:
                for sink in self._sinks:
                    sink.user_removed(eff)
                # its activity goes with it: none still to write, the stored log deleted at
                # the next flush (before its tombstone is saved)
                self._pending_activity.pop(eff.user_id, None)
                self._unsaved.pop(eff.user_id, None)
                self._deleted.add(eff.user_id)

    def _emit(self, eff: EmitEvent) -> None:
        for callback, arity in self._callbacks[eff.event]:
            args = (eff.user_id, eff.old, eff.new)[:arity]
            try:
                result = callback(*args)
            except Exception:
                log.exception("%s callback %r failed", eff.event, callback)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._callback_done)

    def _callback_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event callback failed", exc_info=task.exception())

    def _event(self, event: Event) -> None:
        try:
            effects = self.engine.handle(event, self._now())
        except EngineError as exc:
            raise PresenceError(str(exc)) from None
        self._apply(effects)
        self._poke()

    # ------------------------------------------------------------------ ingest (transports)

    def ingest(self, messages: Iterable[tuple[str, bytes]]) -> int:
        """Apply a batch of raw MQTT messages; return how many were rejected.

        Bad topics and payloads are dropped with a counted, logged reason and change nothing.
        The topic is checked first (cheap), then the device's rate limit, and only then is the
        payload parsed, so a flooding device costs little and cannot starve the others.
        """
        if self._leadership is not None and not self._leading():
            self._hold(messages if isinstance(messages, list) else list(messages))
            return 0
        rejected = 0
        now = self._now()
        engine = self.engine
        split = self.topics.split_device_topic
        limit = self.config.max_payload_bytes
        limiter = self._limiter
        received = self.received
        for topic, payload in messages:
            where = split(topic)
            if type(where) is Rejection:
                rejected += 1
                self._reject(where, now)
                continue
            user, device, kind = where  # type: ignore[misc]
            received[kind] += 1
            if kind == "req":
                if not self._request_limiter.allow(user, device, now):
                    rejected += 1
                    self._reject(Rejection("requests_limited", f"{user}/{device} "
                                 f"sends more than {self._request_limiter.rate:g} requests/s"),
                                 now)
                    continue
            elif limiter is not None and not limiter.allow(user, device, now):
                rejected += 1
                self._reject(Rejection("rate_limited", f"{user}/{device} sends "
                             f"more than {limiter.rate:g} messages/s"), now)
                continue
            if kind == "heartbeat" and len(payload) <= limit:
                # most of the traffic, in the agent's own layout: no model, no event object
                beat = read_heartbeat(payload)
                if beat is not None:
                    effects = engine.beat(user, device, beat[0], beat[1], now)
                    if effects:
                        self._apply(effects)
                    continue
            msg = decode_payload(DeviceTopic(user, device, kind), payload, limit)
            if type(msg) is Rejection:
                rejected += 1
                self._reject(msg, now)
                if kind == "req":  # answer what can be answered: no caller left waiting
                    rid = request_id(payload)
                    if rid is not None:
                        self._request(BadRequest(user, device, rid, msg.detail))
                continue
            assert isinstance(msg, DeviceMessage)
            if msg.kind == "req":
                self._request(msg)
                continue
            events = events_from_message(msg)
            try:
                for event in events:  # all or nothing: a message refused in part changes nothing
                    engine.check(event)
                for event in events:
                    effects = engine.handle(event, now)
                    if effects:
                        self._apply(effects)
            except EngineError as exc:
                rejected += 1
                self._reject(Rejection("refused", f"{msg.user}/{msg.device}: {exc}"), now)
        self._poke()
        return rejected

    def reject(self, reason: str, detail: str) -> None:
        """Count and log a message a transport dropped before it reached :meth:`ingest`
        (a packet too big to buffer, say)."""
        self._reject(Rejection(reason, detail), self.clock.now())

    def _reject(self, why: Rejection, now: int) -> None:
        """Count every drop; log at most one line per reason per second (a flood of junk must
        not become a flood of log lines)."""
        self.rejected[why.reason] += 1
        last = self._last_reject_log.get(why.reason)
        if last is not None and now - last[0] < 1000:
            self._last_reject_log[why.reason] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        more = f" ({suppressed} more dropped for this reason in the last second)" if suppressed else ""
        log.warning("dropped message: %s%s", why, more)
        self._last_reject_log[why.reason] = (now, 0)

    def _request(self, msg: DeviceMessage | BadRequest) -> None:
        if self._request_handler is None:
            self._reject(Rejection("no_handler", "request received but no command handler"),
                         self.clock.now())
            return
        task = asyncio.ensure_future(self._request_handler(msg))
        self._tasks.add(task)
        task.add_done_callback(self._callback_done)

    # ------------------------------------------------------------------ the presence API

    def on(self, event: EventName, callback: Callback) -> Callable[[], None]:
        """Call ``callback(user_id, old, new)`` on ``statusChange``, ``online`` or ``offline``.

        A callback that takes fewer positional arguments gets the first ones (so
        ``lambda user_id: ...`` works). Async callbacks are scheduled; a failing callback is
        logged and never breaks the engine. Returns a function that unsubscribes.
        """
        if event not in self._callbacks:
            raise PresenceError(f"unknown event {event!r}: use one of {', '.join(EVENT_NAMES)}")
        arity = _positional_arity(callback)
        entry = (callback, arity)
        self._callbacks[event].append(entry)

        def off() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks[event].remove(entry)

        return off

    async def get_status(self, user_id: str) -> UserStatus:
        return self.engine.get_status(_uid(user_id))

    async def get_statuses(self, user_ids: Iterable[str]) -> dict[str, UserStatus]:
        return {uid: self.engine.get_status(_uid(uid)) for uid in user_ids}

    async def set_status(self, user_id: str, status: str) -> UserStatus:
        if status not in ("online", "away", "dnd", "offline"):
            raise PresenceError(f"unknown status {status!r}: use online, away, dnd or offline")
        self._event(SetStatus(_uid(user_id), status))  # type: ignore[arg-type]
        return self.engine.get_status(user_id)

    async def set_custom_status(self, user_id: str, text: str | None) -> UserStatus:
        if text is not None and not isinstance(text, str):
            raise PresenceError("custom status must be text or None")
        self._event(SetCustomStatus(_uid(user_id), text))
        return self.engine.get_status(user_id)

    async def clear_custom_status(self, user_id: str) -> UserStatus:
        return await self.set_custom_status(user_id, None)

    async def record_activity(
        self, user_id: str, activity: Mapping[str, Any] | ActivityIn, device_id: str | None = None
    ) -> None:
        """Record what the user did. Without a device, the activity belongs to a virtual device
        named after its channel (or ``api``)."""
        try:
            act = (
                activity
                if isinstance(activity, ActivityIn)
                else ActivityIn.model_validate(dict(activity))
            )
        except ValidationError as exc:
            raise PresenceError(f"invalid activity: {_first_error(exc)}") from None
        device = device_id or act.device_id
        if device is not None:
            validate_or_raise(device, "device id")
        self._event(
            ActivityEvent(
                _uid(user_id), act.type, device, act.channel_id, act.timestamp, act.data
            )
        )

    async def get_activity(
        self, user_id: str, limit: int | None = None, since: int | None = None
    ) -> list[Activity]:
        """Newest first. Pending entries are flushed first so a read sees every write."""
        uid = _uid(user_id)
        if uid in self._pending_activity:
            await self.flush()
        return await self.store.get_activity(uid, limit=limit, since=since)

    async def get_devices(self, user_id: str) -> list[DeviceInfo]:
        return self.engine.get_devices(_uid(user_id))

    async def set_device_status(self, user_id: str, device_id: str, status: str) -> DeviceInfo:
        if status not in ("online", "away", "offline"):
            raise PresenceError(f"unknown device status {status!r}: use online, away or offline")
        uid = _uid(user_id)
        did = validate_or_raise(device_id, "device id")
        self._event(SetDeviceStatus(uid, did, status))  # type: ignore[arg-type]
        return next(d for d in self.engine.get_devices(uid) if d.id == did)

    async def remove_device(self, user_id: str, device_id: str) -> None:
        self._event(RemoveDevice(_uid(user_id), validate_or_raise(device_id, "device id")))

    async def remove_user(self, user_id: str) -> None:
        """Forget a user: its devices, state, retained topics and activity. Its agents should
        be stopped first, or their next heartbeat makes it a new user again (whose version
        continues above the old one's: a version never goes back)."""
        self._event(RemoveUser(_uid(user_id)))

    async def get_online_users(self, channel_id: str | None = None, *, limit: int | None = None,
                               after: str | None = None) -> list[OnlineUser]:
        """Users whose status is not offline, by user id; with ``limit``, one page: the first
        ``limit`` users after the user id ``after`` (the last one of the page before)."""
        if channel_id is not None:
            validate_or_raise(channel_id, "channel id")
        if limit is not None and limit < 1:
            raise PresenceError("limit must be at least 1")
        if limit is None:
            return self.engine.get_online_users(channel_id, self.clock.now())
        return await self._online_page(channel_id, limit, after)

    async def _online_page(self, channel_id: str | None, limit: int,
                           after: str | None) -> list[OnlineUser]:
        """One page from the engine's sorted index of present users, with the loop let run
        between slices of work: building the index the first time (100k users: about 50
        steps of a few ms) and, with a channel few users are on, scanning for the page."""
        engine = self.engine
        await _in_steps(engine.index_present)
        page, cursor = engine.online_page(channel_id, self.clock.now(), limit, after)
        while cursor is not None and len(page) < limit:
            await asyncio.sleep(0)
            if not engine.index_present():  # the engine was reloaded meanwhile
                continue
            more, cursor = engine.online_page(channel_id, self.clock.now(), limit - len(page),
                                              cursor)
            page += more
        return page

    async def user_ids_page(self, limit: int, after: str | None = None) -> list[str]:
        """Up to ``limit`` ids of every user the hub knows (offline ones too) above ``after``,
        in order: ``/presence users``. The first call builds the engine's index of ids in
        steps between which the loop runs, as :meth:`get_online_users` does."""
        await _in_steps(self.engine.index_users)
        return self.engine.user_page(limit, after)

    async def sync(self, user_id: str) -> SyncStatus:
        """Republish the user's state and ask every device to ack it."""
        self._event(SyncRequest(_uid(user_id)))
        return self.engine.get_sync_status(user_id)

    async def get_sync_status(self, user_id: str) -> SyncStatus:
        return self.engine.get_sync_status(_uid(user_id))

    async def get_state(self, user_id: str) -> UserStatePayload | None:
        """The user's state exactly as published on ``P/users/{user}/state``."""
        state = self.engine.snapshot(_uid(user_id))
        return None if state is None else state.model()

    def stats(self) -> dict[str, Any]:
        """Counters for logs and ``/presence`` diagnostics."""
        return {
            "users": len(self.engine.user_ids()),
            "devices": self.engine.device_count(),
            "rejected": dict(self.rejected),
            "engine": dict(self.engine.counters),
        }


async def _in_steps(step: Callable[[], bool]) -> None:
    """Call ``step`` once per loop turn until it returns True: bounded work (building an
    index) that must not hold the loop in one go."""
    while True:  # ASYNC110: the yield between steps is the point
        if step():
            return
        await asyncio.sleep(0)


def validate_or_raise(value: str, what: str) -> str:
    try:
        return validate_id(value, what)
    except ValueError as exc:
        raise PresenceError(str(exc)) from None


def _uid(user_id: str) -> str:
    return validate_or_raise(user_id, "user id")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "activity"
    return f"{loc}: {err.get('msg', 'invalid')}"


def _positional_arity(callback: Callback) -> int:
    try:
        sig = inspect.signature(callback)
    except (TypeError, ValueError):
        return 3
    n = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return 3
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return min(n, 3)
