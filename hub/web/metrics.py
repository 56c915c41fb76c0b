"""``/metrics``: the hub's own counters in Prometheus text, read when scraped.

Nothing here runs on the hot path. The service, the engine, the broker and the live feed
already count what they do (``received``, ``rejected``, ``engine.counters``, the broker's
refusals, the feed's status changes and flush times); :class:`HubCollector` reads them at
scrape time, so a heartbeat costs no metric update and no lock.

Users and devices by status are the one figure that is not a running count: they are counted
over the engine's public views (:class:`StatusCounts`), about 10 us a user, in slices that
give the loop back between them, and a count is reused until it is ten times as old as it
took to make. A hub of 100 users counts on every scrape; one of a million (about 10 s of
work) at most every 100 s, so counting never takes more than a tenth of the hub's time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import get_args

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from hub.app.service import PresenceService
from hub.core.engine import Engine
from hub.protocol import DeviceKind, DeviceStatus, Status
from hub.web.link import BrokerLink
from hub.web.live import LiveFeed

USER_STATUSES: tuple[str, ...] = get_args(Status)
DEVICE_STATUSES: tuple[str, ...] = get_args(DeviceStatus)
MESSAGE_KINDS: tuple[str, ...] = get_args(DeviceKind)
#: users counted per loop turn (about 10 ms of work)
COUNT_SLICE = 1000
#: a count is reused until it is this many times as old as it took to make
COUNT_REUSE = 10.0


@dataclass(frozen=True, slots=True)
class Counts:
    users: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USER_STATUSES, 0))
    devices: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DEVICE_STATUSES, 0))
    #: when it was finished (time.monotonic) and how long the counting itself took
    at: float = 0.0
    cost: float = 0.0

    @property
    def user_total(self) -> int:
        return sum(self.users.values())

    @property
    def device_total(self) -> int:
        return sum(self.devices.values())


class StatusCounts:
    """Users and devices by status, counted in slices and reused while fresh (see above)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.latest = Counts()
        self._counting: asyncio.Future[Counts] | None = None
        self._counted = False

    def fresh(self) -> bool:
        return self._counted and (
            time.monotonic() - self.latest.at <= COUNT_REUSE * self.latest.cost)

    async def get(self) -> Counts:
        """A count at most :data:`COUNT_REUSE` times its cost old; callers that ask while one
        is being made share it."""
        if self.fresh():
            return self.latest
        if self._counting is None or self._counting.done():
            self._counting = asyncio.ensure_future(self._count())
        return await asyncio.shield(self._counting)

    async def _count(self) -> Counts:
        engine = self.engine
        users = dict.fromkeys(USER_STATUSES, 0)
        devices = dict.fromkeys(DEVICE_STATUSES, 0)
        ids = engine.user_ids()
        cost = 0.0
        for start in range(0, len(ids), COUNT_SLICE):
            began = time.perf_counter()
            for uid in ids[start:start + COUNT_SLICE]:
                counted = engine.statuses(uid)
                if counted is None:  # removed while we gave the loop back
                    continue
                status, device_statuses = counted
                users[status] = users.get(status, 0) + 1
                for device_status in device_statuses:
                    devices[device_status] = devices.get(device_status, 0) + 1
            cost += time.perf_counter() - began
            await asyncio.sleep(0)
        self.latest = Counts(users, devices, time.monotonic(), cost)
        self._counted = True
        return self.latest


class HubCollector(Collector):
    """Reads the hub's counters into metric families at scrape time."""

    def __init__(self, service: PresenceService, feed: LiveFeed, link: BrokerLink,
                 counts: StatusCounts) -> None:
        self.service = service
        self.feed = feed
        self.link = link
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self.counts.latest
        users = GaugeMetricFamily("presence_users", "Users by status (offline users too), "
                                  "as last counted", labels=["status"])
        for status, n in counts.users.items():
            users.add_metric([status], n)
        yield users
        devices = GaugeMetricFamily("presence_devices", "Devices by status, as last counted",
                                    labels=["status"])
        for status, n in counts.devices.items():
            devices.add_metric([status], n)
        yield devices

        received = self.service.received
        messages = CounterMetricFamily(
            "presence_messages", "Device messages received by kind (valid topics, before rate "
            "limits and payload checks)", labels=["kind"])
        for kind in sorted({*MESSAGE_KINDS, *received}):
            messages.add_metric([kind], received.get(kind, 0))
        yield messages
        dropped = CounterMetricFamily("presence_dropped", "Messages the hub dropped, by reason",
                                      labels=["reason"])
        for reason, n in sorted(self.service.rejected.items()):
            dropped.add_metric([reason], n)
        yield dropped
        engine = CounterMetricFamily(
            "presence_engine_events", "What the presence engine noted or ignored, by kind "
            "(stale_session, will_applied, device_timeout, ...)", labels=["event"])
        for event, n in sorted(self.service.engine.counters.items()):
            engine.add_metric([event], n)
        yield engine
        changes = CounterMetricFamily("presence_status_changes",
                                      "User status changes, by new status", labels=["status"])
        made = self.feed.status_changes
        for status in USER_STATUSES:
            changes.add_metric([status], made.get(status, 0))
        yield changes

        times = self.feed.flush_times
        yield HistogramMetricFamily(
            "presence_store_flush_seconds", "How long writing changed state to the store took",
            buckets=times.cumulative(), sum_value=times.total)

        yield GaugeMetricFamily("presence_broker_link_up", "1 while the hub hears its broker "
                                "(the embedded one runs, or both links to an external one are "
                                "up)", value=1 if self.link.up() else 0)
        clients = self.link.clients()
        if clients is not None:
            yield GaugeMetricFamily("presence_broker_clients",
                                    "Clients connected to the embedded broker", value=clients)
        refusals = self.link.refused()
        if refusals is not None:
            refused = CounterMetricFamily(
                "presence_broker_refused", "Connections and packets the embedded broker "
                "refused, by reason", labels=["reason"])
            for reason, n in sorted(refusals.items()):
                refused.add_metric([reason], n)
            yield refused
        role = GaugeMetricFamily("presence_hub_role", "1 for this hub's role on its broker "
                                 "and prefix", labels=["role"])
        role.add_metric([self.service.role], 1)
        yield role
        yield GaugeMetricFamily("presence_dashboard_streams",
                                "Browsers with the live dashboard open",
                                value=len(self.feed.streams))
