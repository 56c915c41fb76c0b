"""The dashboard in a real headless Chromium: it shows a user go online, dnd with a custom
status, and offline, each as it happens, with no reload of the page; and it works with the
token given either way a browser can (``?token=``, or a login with the token as password).

The hub runs in the test's loop (embedded broker and HTTP side on free loopback ports, with a
token, so the page's ``?token=`` path is what is tested); the device is a raw MQTT client on
the embedded broker; the browser is Debian's ``chromium``, driven over its DevTools protocol
(:class:`tools.screenshot.Chromium`). Without chromium the test is skipped (failed with CI=true).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from hub.app.factory import attach_broker, create_presence_service
from hub.app.service import PresenceService
from hub.web.link import MqttLink
from hub.web.server import WebServer
from tests.support.mqtt_clients import SimDevice
from tests.support.procs import find_binary, free_port
from tools.screenshot import Chromium

TOKEN = "dashboard-test-token"


@dataclass
class Hub:
    service: PresenceService
    mqtt_port: int
    url: str


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    service = create_presence_service(storage="memory")
    mqtt_port = free_port()
    mqtt = attach_broker(service, "embedded", listen=f"127.0.0.1:{mqtt_port}")
    web = WebServer(service, "127.0.0.1:0", token=TOKEN, link=MqttLink(mqtt))
    service.attach(web)
    async with service:
        yield Hub(service, mqtt_port, web.url)


def user_row(user: str) -> str:
    return f"document.querySelector('li.user[data-user={json.dumps(user)}]')"


async def test_the_page_shows_a_user_go_online_dnd_and_offline_live(hub: Hub) -> None:
    chromium = find_binary("chromium", "apt-get install chromium")
    row = user_row("zoe")
    async with Chromium(binary=chromium) as browser:
        await browser.open(f"{hub.url}?token={TOKEN}")
        await browser.wait_for("document.body.dataset.stream === 'live'", 10,
                               "the event stream to be live")
        # a mark that a reload would wipe out
        await browser.evaluate("window.presenceTestMark = 'same page'")

        device = SimDevice("127.0.0.1", hub.mqtt_port, "zoe", "laptop", name="Zoe's laptop")
        try:
            await asyncio.to_thread(device.online)
            await browser.wait_for(f"{row}?.dataset.status === 'online'", 5, "zoe online")
            assert await browser.evaluate(
                f"{row}.querySelector('li.device .dname').textContent") == "Zoe's laptop"
            assert await browser.evaluate(f"{row}.querySelector('.primary').textContent") == (
                "laptop")

            await asyncio.to_thread(device.set, status="dnd", custom_status="In a meeting")
            await browser.wait_for(
                f"{row}?.dataset.status === 'dnd' && "
                f"{row}.querySelector('.custom').textContent === 'In a meeting'", 5,
                "zoe dnd with her custom status")

            await asyncio.to_thread(device.clean_offline)
            await browser.wait_for(f"{row}?.dataset.status === 'offline'", 5, "zoe offline")
        finally:
            await asyncio.to_thread(device.close)

        events = await browser.evaluate("document.getElementById('events').innerText")
        assert "offline → online" in events and "online → dnd" in events, events
        assert "dnd → offline" in events, events
        assert await browser.evaluate("window.presenceTestMark") == "same page"  # no reload
        assert not [line for line in browser.console if line.startswith("uncaught")], (
            browser.console)


async def test_a_browser_login_with_the_token_as_password_opens_the_page(hub: Hub) -> None:
    """The page asks the browser to log in (basic auth); the login then serves the page's own
    requests too (its event stream), as a person answering the prompt would see."""
    await hub.service.set_device_status("amy", "phone", "online")
    chromium = find_binary("chromium", "apt-get install chromium")
    async with Chromium(binary=chromium) as browser:
        await browser.answer_logins("amy", TOKEN)
        await browser.open(hub.url)
        await browser.wait_for(
            f"document.body.dataset.stream === 'live' && {user_row('amy')}?.dataset.status "
            "=== 'online'", 10, "the page live with amy online after the login")
