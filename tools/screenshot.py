"""Screenshot of the live dashboard, made by headless Chromium: ``docs/dashboard.png``.

    .venv/bin/python tools/screenshot.py [--out docs/dashboard.png] [--width 1280]

Starts a hub in this process (embedded broker and HTTP side on free loopback ports, memory
store), connects a small made-up fleet to it over MQTT as agents would (births with device
names and idle times, ``set`` messages, a sleep, a clean stop), opens the dashboard in
Debian's ``chromium`` and saves what it shows once every user is on the page.

:class:`Chromium` is the browser driver the dashboard's test uses too: Chromium's own
DevTools protocol over a websocket (aiohttp's client), so nothing beyond the hub's stack and
the ``chromium`` package is needed (no chromedriver, no Selenium, no browser download).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
#: names Debian and others give the browser
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    """The browser did not start, or answered a command with an error."""


def free_port() -> int:
    """A loopback port that was free a moment ago (the embedded broker needs a number)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_chromium() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


class Chromium:
    """A headless Chromium with one page, driven over the DevTools protocol.

    ``async with Chromium() as browser: await browser.open(url); await browser.evaluate(js)``.
    The browser runs in a temporary profile and is killed at exit.
    """

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 900,
                 start_timeout: float = 20.0) -> None:
        found = binary or find_chromium()
        if found is None:
            raise BrowserError("chromium not found: apt-get install chromium")
        self.binary = found
        self.width = width
        self.height = height
        self.start_timeout = start_timeout
        # its helper processes may still write there for a moment after they are killed
        self._profile = tempfile.TemporaryDirectory(prefix="presence-chromium-",
                                                    ignore_cleanup_errors=True)
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._handlers: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: what the page logged to its console, and its uncaught errors (for test failures)
        self.console: list[str] = []

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def log(self) -> str:
        path = Path(self._profile.name) / "chromium.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def start(self) -> None:
        profile = Path(self._profile.name)
        args = [
            self.binary, "--headless", "--disable-gpu", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-sync",
            "--disable-background-networking", "--disable-component-update",
            "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
            f"--window-size={self.width},{self.height}", f"--user-data-dir={profile}",
            "--remote-debugging-port=0", "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to sandbox as root
        with (profile / "chromium.log").open("wb") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        # Chromium writes the port it picked here once it listens (no port race)
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while not (active.exists() and len(active.read_text().splitlines()) >= 2):
            if self._proc.returncode is not None or time.monotonic() > deadline:
                raise BrowserError(f"chromium did not start; its log:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)
        port = int(active.read_text().splitlines()[0])
        self._session = aiohttp.ClientSession()
        page = None
        while page is None:
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next((t for t in targets if t.get("type") == "page"), None)
            if page is None:
                if time.monotonic() > deadline:
                    raise BrowserError("chromium opened no page")
                await asyncio.sleep(0.05)
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")  # console lines and uncaught errors come as events

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None and self._proc.returncode is None:
            # the browser and its helpers (renderer, GPU, zygote): its own process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            await self._proc.wait()
        self._profile.cleanup()

    # ------------------------------------------------------------------ the protocol

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                waiter = self._replies.pop(data["id"], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(data)
                continue
            method = data.get("method", "")
            if method == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", "")))
                                             for a in args))
            elif method == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.console.append("uncaught: " + str(
                    details.get("exception", {}).get("description", details.get("text"))))
            for waiter in self._events.pop(method, []):
                if not waiter.done():
                    waiter.set_result(data.get("params", {}))
            for handler in self._handlers.get(method, []):
                handler(data.get("params", {}))
        for waiter in self._replies.values():  # the browser went away
            if not waiter.done():
                waiter.set_exception(BrowserError("chromium closed the DevTools connection"))

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   within: float = 10.0) -> dict[str, Any]:
        assert self._ws is not None, "start() first"
        ident = next(self._ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ident] = waiter
        await self._ws.send_str(json.dumps({"id": ident, "method": method,
                                            "params": params or {}}))
        async with asyncio.timeout(within):
            reply = await waiter
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def on(self, method: str, handler: Callable[[dict[str, Any]], None]) -> None:
        """Call ``handler(params)`` on every event ``method`` (on the reader: no waiting)."""
        self._handlers.setdefault(method, []).append(handler)

    def _later(self, method: str, params: dict[str, Any]) -> None:
        task = asyncio.ensure_future(self.send(method, params))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def answer_logins(self, username: str, password: str) -> None:
        """Answer every HTTP login prompt (basic auth) as a person at the browser would."""
        self.on("Fetch.requestPaused", lambda p: self._later(
            "Fetch.continueRequest", {"requestId": p["requestId"]}))
        self.on("Fetch.authRequired", lambda p: self._later("Fetch.continueWithAuth", {
            "requestId": p["requestId"], "authChallengeResponse": {
                "response": "ProvideCredentials", "username": username, "password": password}}))
        await self.send("Fetch.enable", {"handleAuthRequests": True,
                                         "patterns": [{"urlPattern": "*"}]})

    def next_event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._events.setdefault(method, []).append(waiter)
        return waiter

    # ------------------------------------------------------------------ what callers use

    async def open(self, url: str, within: float = 10.0) -> None:
        """Navigate and wait for the page's load event."""
        loaded = self.next_event("Page.loadEventFired")
        reply = await self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise BrowserError(f"cannot open {url}: {reply['errorText']}")
        async with asyncio.timeout(within):
            await loaded

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-like values only)."""
        reply = await self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression}: {reply['exceptionDetails'].get('text')}")
        return reply.get("result", {}).get("value")

    async def wait_for(self, expression: str, within: float = 5.0, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; fail with what the page shows."""
        deadline = time.monotonic() + within
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                body = await self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(
                    f"timed out after {within:.1f}s waiting for {what or expression}; the page "
                    f"shows:\n{str(body)[:2000]}\nconsole: {self.console[-10:]}")
            await asyncio.sleep(0.05)

    async def screenshot(self, full_page: bool = True) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = await self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": self.width,
                              "height": max(self.height // 2, int(size["height"])), "scale": 1}
            params["captureBeyondViewport"] = True
        reply = await self.send("Page.captureScreenshot", params)
        return base64.b64decode(reply["data"])


# ---------------------------------------------------------------------- the demo hub


#: the demo fleet: (user, device, device name, idle time in its birth)
FLEET = (
    ("alice", "laptop", "Work laptop", 0),
    ("alice", "phone", "Pixel 8", 7 * 60_000),
    ("bob", "desktop", "Desk PC", 0),
    ("bob", "phone", "iPhone", 40 * 60_000),
    ("carol", "tablet", "Kitchen tablet", 12 * 60_000),
    ("dave", "laptop", "ThinkPad", 0),
    ("erin", "badge", "E-ink badge", 0),
    ("frank", "pi", "Hallway panel", 0),
)


class DemoDevice:
    """A device on the wire, as an agent would be: its own MQTT connection, a will, a birth."""

    def __init__(self, port: int, prefix: str, user: str, device: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.base = f"{prefix}/devices/{user}/{device}/"
        self.session = f"demo-{user}-{device}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"presence-agent/{user}/{device}/{self.session}")
        self.client.will_set(self.base + "conn", json.dumps(
            {"state": "offline", "session": self.session, "reason": "lost"}), qos=1, retain=True)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, kind: str, body: dict[str, Any], retain: bool = False) -> None:
        body = {"session": self.session, **body} if kind == "conn" else body
        self.client.publish(self.base + kind, json.dumps(body), qos=1,
                            retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def demo_fleet(port: int, prefix: str) -> list[DemoDevice]:
    """A handful of users in every state, each device on its own connection."""
    now = int(time.time() * 1000)
    devices = {(user, device): DemoDevice(port, prefix, user, device)
               for user, device, _name, _idle in FLEET}
    for user, device, name, idle in FLEET:
        devices[user, device].send("conn", {"state": "online", "name": name, "ts": now,
                                            "idleMs": idle}, retain=True)
    devices["alice", "laptop"].send("set", {"customStatus": "Reviewing the release"})
    devices["bob", "desktop"].send("set", {"status": "dnd",
                                           "customStatus": "In a meeting until 3 pm"})
    devices["frank", "pi"].send("set", {"status": "away", "customStatus": "Back after lunch"})
    devices["erin", "badge"].send("conn", {"state": "sleeping", "sleepMs": 20 * 60_000,
                                           "ts": now}, retain=True)
    devices["dave", "laptop"].send("conn", {"state": "offline", "reason": "disconnect",
                                            "ts": now}, retain=True)
    for gone in (devices.pop(("erin", "badge")), devices.pop(("dave", "laptop"))):
        gone.close()  # a sleeping or stopped device leaves cleanly
    return list(devices.values())


async def make_screenshot(width: int, height: int) -> bytes:
    sys.path.insert(0, str(ROOT))
    from hub.app.factory import attach_broker, create_presence_service
    from hub.web.link import MqttLink
    from hub.web.server import WebServer

    service = create_presence_service(storage="memory", away_after_ms=5 * 60_000,
                                      offline_after_ms=3_600_000)
    port = free_port()
    hub = attach_broker(service, "embedded", listen=f"127.0.0.1:{port}")
    web = WebServer(service, "127.0.0.1:0", link=MqttLink(hub))
    service.attach(web)
    async with service:
        devices = await asyncio.to_thread(demo_fleet, port, service.topics.prefix)
        try:
            async with Chromium(width=width, height=height) as browser:
                await browser.open(web.url)
                await browser.wait_for(
                    "document.body.dataset.stream === 'live' && "
                    "document.querySelectorAll('li.user').length === 6 && "
                    "document.querySelector('li.user[data-user=frank]')"
                    "?.dataset.status === 'away'", 10, "the demo users")
                await browser.evaluate("document.querySelectorAll('.changed').forEach("
                                       "n => n.classList.remove('changed'))")
                png: bytes = await browser.screenshot()
        finally:
            for device in devices:
                await asyncio.to_thread(device.close)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args(argv)
    try:
        png = asyncio.run(make_screenshot(args.width, args.height))
    except BrowserError as exc:
        print(f"screenshot: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    print(f"wrote {args.out} ({len(png)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
