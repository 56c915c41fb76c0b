"""Several hubs on one Redis store: taking the lease, standing by, ``presence-hub status``.

Every hub with ``--storage redis`` takes the lease of :mod:`hub.stores.lease` before it loads
anything, so two hubs never write one store at once:

* without ``--standby`` it is the only hub: a lease held by another live hub refuses the start
  with one line;
* with ``--standby`` it takes the lease when it is free and otherwise stands by, warm (its
  Redis and broker connections open and checked), until the active hub's lease lapses.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from hub.app.leadership import LeaseKeeper, wait_for_lease
from hub.core.errors import PresenceError
from hub.protocol import BrokerURL, Topics, format_duration_ms
from hub.stores import StoreError
from hub.stores.lease import LeaseHolder, RedisLease

log = logging.getLogger("presence-hub")


class LeaseHeld(PresenceError):
    """Another hub holds the lease and this one may not stand by (one line for the CLI)."""


def hub_name(settings: dict[str, Any]) -> str:
    return str(settings.get("hub_name") or socket.gethostname())


#: the machine a hub says it runs on in its lease (default: the host name); a lease left by a
#: dead process of the same machine is taken at once. Tests and ``make failover`` run two hubs
#: on one machine as two machines with it.
LEASE_HOST_ENV = "PRESENCE_LEASE_HOST"


def make_lease(settings: dict[str, Any]) -> RedisLease:
    return RedisLease(settings["redis_url"], settings["prefix"], name=hub_name(settings),
                      mode="standby" if settings["standby"] else "single",
                      ttl_ms=settings["lease_ttl"], host=os.environ.get(LEASE_HOST_ENV) or None)


def _refusal(holder: LeaseHolder, settings: dict[str, Any]) -> str:
    if settings["standby"]:
        return (f"the active hub {holder.describe()} was started without --standby: it does "
                "not step down when it loses Redis, so a standby could make two active hubs; "
                "restart it with --standby first")
    return (f"another hub is active on this Redis store: {holder.describe()}. Stop it first, "
            "or start this one with --standby to take over when it stops "
            "(it must run with --standby too)")


class StandbyWatch:
    """The standby's own broker connection (its own client id, a clean session): it checks
    the broker and the login at start, rather than at the takeover, and logs the active hub's
    ``P/hub/status`` while standing by."""

    def __init__(self, broker: str, settings: dict[str, Any]) -> None:
        from hub.mqtt.client import HubMqttClient

        self.url = BrokerURL.parse(broker)
        context: ssl.SSLContext | None = None
        if self.url.tls:
            context = ssl.create_default_context(cafile=settings.get("ca_file") or None)
        self.ssl = context
        self.topic = Topics(settings["prefix"]).hub_status
        self.client_id = f"presence-hub-standby-{hub_name(settings)}-{os.getpid()}"
        self.client = HubMqttClient(
            self.url.host, self.url.port, client_id=self.client_id, clean_session=True,
            keepalive=30, username=self.url.username, password=self.url.password,
            ssl_context=context, subscriptions=[(self.topic, 1)], on_messages=self._heard)
        self._last: bytes | None = None

    async def check(self) -> None:
        """One look at ``P/hub/status``: a refused login is a configuration error now."""
        from hub.mqtt.client import BrokerRefused, read_retained

        try:
            await read_retained(self.url.host, self.url.port, self.topic,
                                client_id=self.client_id + "-check", username=self.url.username,
                                password=self.url.password, ssl_context=self.ssl, timeout=5.0)
        except BrokerRefused as exc:
            raise LeaseHeld(f"the MQTT broker {self.url} refused this standby hub: {exc}"
                            ) from None
        except (OSError, TimeoutError) as exc:
            log.warning("standby: cannot reach the MQTT broker %s yet (%s); it keeps trying",
                        self.url, exc or type(exc).__name__)

    def _heard(self, received: list[Any]) -> None:
        for _topic, payload, _mid, _qos in received:
            if payload != self._last:
                self._last = payload
                log.info("standby: the active hub's %s is %r", self.topic,
                         payload.decode(errors="replace"))

    async def start(self) -> None:
        await self.client.start()

    async def stop(self) -> None:
        await self.client.stop(linger_s=0.5)


async def take_lease(lease: RedisLease, settings: dict[str, Any], broker: str,
                     stop: asyncio.Event) -> LeaseKeeper | None:
    """The lease for this hub: at once, or (``--standby``) once the active hub's lapses.
    None when ``stop`` was set while standing by. Raises :class:`LeaseHeld`."""
    sent = time.monotonic()
    holder = await lease.try_acquire()
    if holder is not None:
        if not settings["standby"] or holder.mode != "standby":
            raise LeaseHeld(_refusal(holder, settings))
        watch = StandbyWatch(broker, settings)
        await watch.check()
        active = [holder]
        http = await _standby_http(settings, lease.name, lambda: active[0].describe())
        print(f"presence hub standing by: {lease.name}; the active hub is {holder.describe()}",
              flush=True)
        await watch.start()
        try:
            got = await wait_for_lease(lease, stop, on_holder=lambda h: active.__setitem__(0, h))
        finally:
            await watch.stop()
            if http is not None:
                await http.stop()  # the active hub's full HTTP side takes the port over
        if got is None:
            return None
        sent = got
        log.info("standby: took the lease over (token %s): this hub is active now", lease.token)
    keeper = LeaseKeeper(lease)
    keeper.acquired(sent)
    return keeper


async def _standby_http(settings: dict[str, Any], name: str, active: Callable[[], str]
                        ) -> Any:
    """``/healthz`` (and ``/metrics``) while standing by, when ``--http`` is set."""
    if settings.get("http") is None:
        return None
    from hub.web.standby import StandbyServer

    server = StandbyServer(settings["http"], name=name, active=active,
                           token=settings.get("http_token"))
    await server.start()
    return server


def lease_line(lease: RedisLease) -> str:
    return (f"  role:         active, {lease.mode} (lease token {lease.token} in Redis, "
            f"{format_duration_ms(lease.ttl_ms)})")


async def _status(settings: dict[str, Any]) -> int:
    lease = make_lease(settings)
    try:
        holder = await lease.holder()
    finally:
        await lease.close()
    if holder is None:
        print(f"no hub is active on the Redis store {settings['redis_url']} (prefix "
              f"{settings['prefix']!r})")
        return 3
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.since / 1000))
    print(f"active hub: {holder.name} (token {holder.token}, {holder.mode}, active since "
          f"{since}, lease expires in {holder.expires_in_ms / 1000:.1f} s unless renewed)")
    return 0


def status_main(argv: Sequence[str]) -> int:
    """``presence-hub status``: which hub holds the lease on a Redis store."""
    parser = argparse.ArgumentParser(
        prog="presence-hub status",
        description="Say which hub is active on a shared Redis store (hubs started with "
        "--storage redis hold a lease there). Exit status 0 when one is, 3 when none is.")
    parser.add_argument("--redis-url", default=os.environ.get("PRESENCE_REDIS_URL",
                                                             "redis://127.0.0.1:6379/0"),
                        help="the hubs' Redis (default: PRESENCE_REDIS_URL or "
                        "redis://127.0.0.1:6379/0)")
    parser.add_argument("--prefix", default=os.environ.get("PRESENCE_PREFIX", "presence"),
                        help="the hubs' topic prefix, which names their keys (default: presence)")
    args = parser.parse_args(argv)
    settings = {"redis_url": args.redis_url, "prefix": args.prefix, "hub_name": "status",
                "standby": False, "lease_ttl": 1000}
    try:
        return asyncio.run(_status(settings))
    except StoreError as exc:
        print(f"presence-hub status: {exc}", file=sys.stderr)
        return 1
