"""The hub's HTTP side (``--http``): the live dashboard, /api/users, /healthz and /metrics.

Served by aiohttp on the hub's own event loop, as one more resource of the service (started
after the store is loaded and the MQTT side is up, stopped first), so it reads the engine
directly: no copies, no locks, no second process.

Routes:

* ``/`` the dashboard: a static page shipped in the package (no build step, no CDN: the box
  may be offline) that opens ``/api/events`` and renders what arrives;
* ``/api/events`` server-sent events: ``hello`` (hub health and the recent events), the users
  in pages (``users``), ``ready``, then ``user`` (one user's state payload, as on
  ``P/users/{user}/state``) whenever a user changes, ``event`` for each status change,
  timeout or removal, and ``health`` every few seconds;
* ``/api/users`` the state payloads, sorted by user id, paged with ``?limit=&after=``;
* ``/healthz`` 200 while the hub runs and hears its broker, else 503 (always open);
* ``/metrics`` Prometheus text (:mod:`hub.web.metrics`).

With ``--http-token`` every route but /healthz and the page's two static files (code, no
data) needs the token (:mod:`hub.web.access`); the page passes on a ``?token=`` it was opened
with to its event stream, and a browser that logged in with basic auth sends it by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

from hub.app.service import PresenceService
from hub.core.errors import PresenceError
from hub.web.access import HttpAddress, TokenCheck, allowed_address
from hub.web.link import BrokerLink, NoBroker
from hub.web.live import PENDING_USERS, STOPPING, LiveFeed, Stream, sse
from hub.web.metrics import Counts, HubCollector, StatusCounts

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
#: the page's files, read once at start: (content type, bytes)
PAGE_FILES = {"/": ("index.html", "text/html"), "/static/app.js": ("app.js", "text/javascript"),
              "/static/style.css": ("style.css", "text/css")}
#: open without the token: the health check, and code that holds no data
PUBLIC = frozenset({"/healthz", "/static/app.js", "/static/style.css"})
#: how often open dashboards get the hub's health (also keeps idle proxies from closing them)
HEALTH_INTERVAL_S = 5.0
#: a write to a browser that takes longer than this drops it (a stuck tab, a dead link)
WRITE_TIMEOUT_S = 10.0
#: open dashboards at most: each costs a task and a pending set
MAX_STREAMS = 64
#: the kernel's send buffer of an event stream (it doubles it): with autotuning a browser
#: that stopped reading could hold megabytes of the hub's memory in its socket
STREAM_SNDBUF = 256 * 1024
#: users per ``users`` event when a dashboard opens
SNAPSHOT_PAGE = 500
API_PAGE = 500
API_PAGE_MAX = 5000
#: what the browser waits before it reconnects a lost stream (ms)
RETRY_MS = 2000

#: every response: no other origin's scripts, nothing framed, the token never in a Referer
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebServer:
    """The HTTP side of one service; a resource for ``service.attach`` (start and stop)."""

    def __init__(self, service: PresenceService, address: HttpAddress | str, *,
                 token: str | None = None, link: BrokerLink | None = None,
                 pending_users: int = PENDING_USERS, max_streams: int = MAX_STREAMS,
                 write_timeout: float = WRITE_TIMEOUT_S) -> None:
        self.service = service
        self.address = address = allowed_address(address, token)
        self.port = address.port
        self.link: BrokerLink = link if link is not None else NoBroker()
        self._token = TokenCheck(token) if token is not None else None
        #: users with a change waiting for one browser beyond which it is dropped
        self.pending_users = pending_users
        self.max_streams = max_streams
        #: seconds a write to one browser may take before that browser is dropped
        self.write_timeout = write_timeout
        self.feed = LiveFeed(service.clock.wall)
        self.counts = StatusCounts(service.engine)
        self.registry = CollectorRegistry()
        self.registry.register(HubCollector(service, self.feed, self.link, self.counts))
        process_collector.ProcessCollector(registry=self.registry)
        platform_collector.PlatformCollector(registry=self.registry)
        gc_collector.GCCollector(registry=self.registry)
        self._files: dict[str, tuple[bytes, str]] = {}
        self._runner: web.AppRunner | None = None
        self._beat: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self._started_wall = 0

    @property
    def url(self) -> str:
        """The dashboard's address (with the port the kernel picked for port 0)."""
        return HttpAddress(self.address.host, self.port).url

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._files = {
            route: ((STATIC / name).read_bytes(), ctype)
            for route, (name, ctype) in PAGE_FILES.items()
        }
        app = web.Application(middlewares=[self._guard], client_max_size=4096)
        app.on_response_prepare.append(self._add_headers)
        for route in PAGE_FILES:
            app.router.add_get(route, self._file)
        app.router.add_get("/api/events", self._events, allow_head=False)
        app.router.add_get("/api/users", self._users)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.address.host, self.address.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise PresenceError(f"cannot serve --http on {self.address.host}:"
                                f"{self.address.port}: {exc.strerror or exc}") from None
        self._runner = runner
        addresses = runner.addresses
        if addresses:
            self.port = int(addresses[0][1])
        self._started_at = time.monotonic()
        self._started_wall = self.service.clock.wall()
        self.service.add_sink(self.feed)
        self._beat = asyncio.create_task(self._heartbeat(), name="presence-web-health")
        log.info("dashboard on %s%s", self.url,
                 " (token required)" if self._token is not None else "")

    async def stop(self) -> None:
        self.service.remove_sink(self.feed)
        self.feed.end_all(STOPPING)
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ plumbing

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is not None and request.path not in PUBLIC and not self._token.allows(
                request.headers, request.query):
            # the page itself asks a browser to log in (any user name, the token as password)
            challenge = ('Basic realm="presence hub", charset="UTF-8"' if request.path == "/"
                         else 'Bearer realm="presence hub"')
            return _json({"error": "this hub's HTTP side needs its token: Authorization: "
                                   "Bearer TOKEN, basic auth with the token as password, or "
                                   "?token=TOKEN"}, 401, {"WWW-Authenticate": challenge})
        return await handler(request)

    @staticmethod
    async def _add_headers(_request: web.Request, response: web.StreamResponse) -> None:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers.setdefault("Cache-Control", "no-store")

    def _health(self, counts: Counts | None = None) -> dict[str, Any]:
        up = self.link.up()
        out: dict[str, Any] = {
            "status": "ok" if up else "unavailable",
            "role": self.service.role,
            "broker": {"kind": self.link.kind, "up": up},
            "startedAt": self._started_wall,
            "uptimeS": round(time.monotonic() - self._started_at, 1),
        }
        if counts is not None:  # the dashboard's fuller view
            out["broker"]["clients"] = self.link.clients()
            out["users"] = counts.users
            out["devices"] = counts.devices
            out["dropped"] = sum(self.service.rejected.values())
            out["dashboards"] = len(self.feed.streams)
        return out

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            if not self.feed.streams:
                continue
            try:
                counts = await self.counts.get()
                self.feed.health(sse("health", json.dumps(self._health(counts)).encode()))
            except Exception:  # the next beat tries again; the hub never notices
                log.exception("building the dashboard's health failed")

    # ------------------------------------------------------------------ routes

    async def _file(self, request: web.Request) -> web.Response:
        body, ctype = self._files[request.path]
        return web.Response(body=body, content_type=ctype, charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def _healthz(self, _request: web.Request) -> web.Response:
        health = self._health()
        return _json(health, 200 if health["status"] == "ok" else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        await self.counts.get()  # users and devices by status, counted if stale
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _users(self, request: web.Request) -> web.Response:
        """One page of state payloads, by user id: ``limit`` users after the id ``after``;
        ``next`` is the ``after`` of the next page (null on the last)."""
        try:
            limit = int(request.query.get("limit", API_PAGE))
        except ValueError:
            limit = 0
        if not 1 <= limit <= API_PAGE_MAX:
            return _json({"error": f"limit must be a whole number from 1 to {API_PAGE_MAX}"},
                         400)
        after = request.query.get("after")
        engine = self.service.engine
        ids = engine.user_ids()
        wanted = ids if after is None else (uid for uid in ids if uid > after)
        page = heapq.nsmallest(limit + 1, wanted)  # no sort of every user for one page
        more = len(page) > limit
        page = page[:limit]
        states = [s.to_json() for s in map(engine.snapshot, page) if s is not None]
        body = (b'{"users":[' + b",".join(states) + b'],"next":'
                + json.dumps(page[-1] if more else None).encode() + b"}")
        return web.Response(body=body, content_type="application/json")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """The dashboard's live stream (see the module docstring for its events)."""
        if len(self.feed.streams) >= self.max_streams:
            return _json({"error": f"{self.max_streams} dashboards are open already"}, 503)
        stream = Stream(self.pending_users)
        # counted and fed from here on (no await since the check): changes made while the
        # users are sent queue up for it, so nothing falls between the list and the changes
        self.feed.open(stream)
        transport = request.transport
        if transport is not None:
            stream.on_drop = transport.abort
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
        send = functools.partial(_send, within=self.write_timeout)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        try:
            await response.prepare(request)
            counts = await self.counts.get()
            hello = {"health": self._health(counts),
                     "events": [e.to_dict() for e in self.feed.recent],
                     "prefix": self.service.topics.prefix}
            await send(response, b"retry: %d\n\n" % RETRY_MS
                       + sse("hello", json.dumps(hello).encode()))
            await self._send_users(response, stream, send)
            await send(response, sse("ready", b"{}"))
            while stream.ended is None:
                await stream.wake.wait()
                if stream.ended is not None:
                    break
                blob = stream.take()
                if blob:
                    await send(response, blob)
        except (ConnectionError, TimeoutError):
            pass  # gone, or not reading
        finally:
            self.feed.close(stream)
            stream.end("closed")
            if transport is not None:
                # however it ended, the connection goes (the browser reconnects): finishing
                # the response properly would wait on a stuck browser's full socket
                transport.abort()
        return response

    async def _send_users(self, response: web.StreamResponse, stream: Stream,
                          send: Callable[[web.StreamResponse, bytes], Awaitable[None]]) -> None:
        """Every user, a page per event; the page keeps a state only if it is not older than
        one it has (a change queued meanwhile may be sent after a newer snapshot)."""
        engine = self.service.engine
        ids = engine.user_ids()
        for start in range(0, len(ids), SNAPSHOT_PAGE):
            if stream.ended is not None:
                return
            states = [s.to_json() for s in map(engine.snapshot, ids[start:start + SNAPSHOT_PAGE])
                      if s is not None]
            await send(response, sse("users", b"[" + b",".join(states) + b"]"))


async def _send(response: web.StreamResponse, blob: bytes, within: float) -> None:
    async with asyncio.timeout(within):
        await response.write(blob)


def _json(body: dict[str, Any], status: int = 200,
          headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json",
                        headers=headers)
