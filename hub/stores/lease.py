"""The active hub's lease in Redis: which of several hubs sharing one store may act.

Several hubs may share one Redis store (``--storage redis``) and one broker, one active and the
others standing by. Redis decides which one is active, with three keys under the store's
namespace ``ns``:

* ``{ns}:hub:lease``: JSON ``{"token","name","mode","since","instance"}`` of the active hub,
  with a TTL the active hub renews (:meth:`RedisLease.renew`). When the hub dies, the key
  expires and a standby takes it (:meth:`RedisLease.try_acquire`).
* ``{ns}:hub:epoch``: a counter, incremented on every acquisition; the lease's ``token``.
* ``{ns}:hub:fence``: ``"{token}:{instance}"`` of the hub that acquired last. Every write of
  the store checks it (see :class:`~hub.stores.redis.RedisStore`'s ``fence``), so a hub that was
  paused (SIGSTOP, a long GC, a VM migration) and wakes up after another took over cannot
  overwrite the new active hub's state, whatever its own clock says. The instance (random per
  acquisition) keeps the fence unique even if Redis lost the counter (a restart without
  persistence would start the tokens over).

Why not a consensus protocol of our own: people who outgrow one hub already run Redis (with
Sentinel or a managed service for its own failover); a lease with a fencing token is the
well-known way to get one writer out of it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from hub.protocol.urls import redact_url
from hub.stores.base import StoreError

log = logging.getLogger(__name__)

#: ``standby``: started with --standby (steps down when its lease lapses, takes over when it
#: is free); ``single``: the only hub (keeps working through a Redis outage, refuses a second)
LeaseMode = Literal["standby", "single"]

_ACQUIRE = """
-- KEYS: lease, epoch, fence. ARGV: instance, name, mode, ttl ms, since (wall ms), the lease
-- value to replace ('' for none: only a free lease is taken), host, pid.
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[6] then
  return {0, held, redis.call('PTTL', KEYS[1])}
end
local token = redis.call('INCR', KEYS[2])
local value = cjson.encode({token = token, name = ARGV[2], mode = ARGV[3],
                            since = tonumber(ARGV[5]), instance = ARGV[1], host = ARGV[7],
                            pid = tonumber(ARGV[8])})
redis.call('SET', KEYS[1], value, 'PX', ARGV[4])
redis.call('SET', KEYS[3], token .. ':' .. ARGV[1])
return {1, value, tonumber(ARGV[4])}
"""

_RENEW = """
-- KEYS: lease, fence. ARGV: our fence, our lease value, ttl ms.
-- 1: renewed; 2: it had expired, nobody took it, taken back; 0: another hub holds it.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
local held = redis.call('GET', KEYS[1])
if not held then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 2
end
if held ~= ARGV[2] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

_RELEASE = """
-- KEYS: lease. ARGV: our lease value. Only our own lease is deleted.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """Who holds the lease, as read from Redis."""

    token: int
    name: str
    mode: str
    #: wall-clock ms when it was acquired
    since: int
    #: ms until it expires unless renewed
    expires_in_ms: int
    instance: str = ""
    host: str = ""
    pid: int = 0
    raw: str = ""

    @classmethod
    def parse(cls, raw: str, pttl: int) -> LeaseHolder:
        try:
            data: dict[str, Any] = json.loads(raw)
            return cls(token=int(data["token"]), name=str(data["name"]),
                       mode=str(data["mode"]), since=int(data["since"]),
                       expires_in_ms=max(0, int(pttl)), instance=str(data.get("instance", "")),
                       host=str(data.get("host", "")), pid=int(data.get("pid", 0)), raw=raw)
        except (ValueError, KeyError, TypeError):
            return cls(token=0, name=f"unreadable lease {raw[:40]!r}", mode="unknown", since=0,
                       expires_in_ms=max(0, int(pttl)))

    def describe(self) -> str:
        return (f"{self.name} (token {self.token}, {self.mode}, lease expires in "
                f"{self.expires_in_ms / 1000:.1f} s unless renewed)")


def lease_keys(namespace: str) -> tuple[str, str, str]:
    """The lease, epoch and fence keys of a store namespace."""
    return f"{namespace}:hub:lease", f"{namespace}:hub:epoch", f"{namespace}:hub:fence"


class RedisLease:
    """One hub's side of the lease: acquire, renew, release, and read who holds it.

    Every call has a deadline (``timeout``) and raises :class:`~hub.stores.StoreError` on a
    Redis failure, one line naming the server, like the store.
    """

    def __init__(self, url: str, namespace: str, *, name: str, mode: LeaseMode,
                 ttl_ms: int, timeout: float = 2.0, host: str | None = None) -> None:
        if ttl_ms < 100:
            raise ValueError(f"a lease of {ttl_ms} ms is too short (at least 100 ms)")
        self.url = url
        self.namespace = namespace
        self.name = name
        self.mode: LeaseMode = mode
        self.ttl_ms = ttl_ms
        self.timeout = timeout
        #: this machine's name, to recognise the lease of a dead previous run of it
        self.host = host if host is not None else socket.gethostname()
        self.lease_key, self.epoch_key, self.fence_key = lease_keys(namespace)
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        #: after an acquisition: our token, fence value and lease value
        self.token: int | None = None
        self.fence: str | None = None
        self._value: str | None = None

    async def open(self) -> None:
        if self._client is not None:
            return
        client = aioredis.from_url(self.url, decode_responses=True,
                                   socket_connect_timeout=self.timeout,
                                   socket_timeout=self.timeout, retry=Retry(NoBackoff(), 1))
        self._client = client
        for name, text in (("acquire", _ACQUIRE), ("renew", _RENEW), ("release", _RELEASE)):
            self._scripts[name] = client.register_script(text)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _call(self, what: str, script: str, keys: list[str], args: list[Any]) -> Any:
        if self._client is None:
            await self.open()
        try:
            return await self._scripts[script](keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis at {redact_url(self.url)}: {what} the hub lease failed: "
                             f"{exc or type(exc).__name__}") from exc

    async def try_acquire(self) -> LeaseHolder | None:
        """Take the lease if nobody holds it: None then (``token``/``fence`` are ours), else
        the hub that holds it.

        A lease held by a dead process of this host (a hub restarted after a crash, by
        systemd or Docker) is taken at once rather than after its TTL: the previous run
        cannot act any more, and a restart that waited would leave the hub deaf meanwhile.
        """
        holder = await self._acquire("")
        if holder is not None and self._dead_here(holder):
            log.info("taking over the lease of this host's previous run, which is gone: %s",
                     holder.describe())
            holder = await self._acquire(holder.raw)
        return holder

    def _dead_here(self, holder: LeaseHolder) -> bool:
        """The holder is a process of this host that no longer runs (or this very process,
        as in a container restarted under the same pid: it has not acquired yet)."""
        if holder.host != self.host or holder.pid <= 0:
            return False
        if holder.pid == os.getpid():
            return True
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, another user's
            return False
        return False

    async def _acquire(self, replacing: str) -> LeaseHolder | None:
        instance = secrets.token_hex(8)
        got, raw, pttl = await self._call(
            "acquiring", "acquire", [self.lease_key, self.epoch_key, self.fence_key],
            [instance, self.name, self.mode, self.ttl_ms, int(time.time() * 1000), replacing,
             self.host, os.getpid()])
        holder = LeaseHolder.parse(raw, int(pttl))
        if not got:
            return holder
        self.token = holder.token
        self.fence = f"{holder.token}:{instance}"
        self._value = raw
        return None

    async def renew(self) -> bool:
        """Extend our lease by ``ttl_ms``; False if another hub took it over since we got it.

        A lease that expired while nobody took it (this hub was paused, Redis was out of reach)
        is taken back: no other hub acted in between, so this hub's state is still the truth.
        """
        if self.fence is None or self._value is None:
            return False
        result = await self._call("renewing", "renew", [self.lease_key, self.fence_key],
                                  [self.fence, self._value, self.ttl_ms])
        return bool(int(result))

    async def release(self) -> None:
        """Give the lease up at a clean stop, so a standby takes over at once."""
        if self._value is None:
            return
        await self._call("releasing", "release", [self.lease_key], [self._value])
        self.token = self.fence = self._value = None

    async def holder(self) -> LeaseHolder | None:
        """Who holds the lease now (None: nobody)."""
        if self._client is None:
            await self.open()
        assert self._client is not None
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.get(self.lease_key)
                pipe.pttl(self.lease_key)
                raw, pttl = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis at {redact_url(self.url)}: reading the hub lease failed: "
                             f"{exc or type(exc).__name__}") from exc
        return None if raw is None else LeaseHolder.parse(raw, int(pttl))
