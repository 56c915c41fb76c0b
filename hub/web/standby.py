"""The HTTP side of a hub standing by (``--standby`` while another hub is active).

A standby has no presence state to show (it loads the store only when it takes over), but its
``/healthz`` must answer: a Docker or systemd health check that sees nothing on the port would
call a healthy standby dead and restart it. So while it stands by it serves ``/healthz`` (200,
``role: standby``, the active hub's name) and ``/metrics`` (its role), and answers every other
route with 503 naming the active hub. The full :class:`~hub.web.server.WebServer` takes the
port over at the takeover.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from hub.core.errors import PresenceError
from hub.web.access import HttpAddress, TokenCheck, allowed_address

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StandbyServer:
    """``/healthz`` and ``/metrics`` of a standby; ``active`` says who is active now."""

    def __init__(self, address: HttpAddress | str, *, name: str, active: Callable[[], str],
                 token: str | None = None) -> None:
        self.address = allowed_address(address, token)
        self.name = name
        self.active = active
        self._token = TokenCheck(token) if token is not None else None
        self._runner: web.AppRunner | None = None
        self._since = time.time()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=4096)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/{tail:.*}", self._elsewhere)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.address.host, self.address.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise PresenceError(f"cannot serve --http on {self.address.host}:"
                                f"{self.address.port}: {exc.strerror or exc}") from None
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if (self._token is not None and request.path != "/healthz"
                and not self._token.allows(request.headers, request.query)):
            return _json({"error": "this hub's HTTP side needs its token"}, 401)
        return await handler(request)

    async def _healthz(self, _request: web.Request) -> web.Response:
        return _json({"status": "standby", "role": "standby", "hub": self.name,
                      "active": self.active(), "since": int(self._since * 1000)})

    async def _metrics(self, _request: web.Request) -> web.Response:
        text = ("# HELP presence_hub_role What this hub is on its store: 1 for its role.\n"
                "# TYPE presence_hub_role gauge\n"
                'presence_hub_role{role="active"} 0.0\n'
                'presence_hub_role{role="standby"} 1.0\n')
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def _elsewhere(self, _request: web.Request) -> web.Response:
        return _json({"error": f"this hub ({self.name}) stands by; the active hub is "
                               f"{self.active()}"}, 503)


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})
