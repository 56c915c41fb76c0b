"""The hub's HTTP side: /api/users, /healthz, /metrics, the event stream and the token.

Most tests share one ``presence-hub`` process per module (embedded broker, memory store) that
serves ``--http`` beyond loopback, so the token is required everywhere but /healthz; devices
are raw MQTT clients on its broker. Each test uses users of its own and compares metrics
before and after, so the order of the tests does not matter. /healthz with a broker link that
goes down, and a browser that falls behind, are tested in-process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import hub.web as hub_web
from hub.app.factory import attach_broker, create_presence_service
from hub.cli import main as hub_main
from hub.core.events import EmitEvent
from hub.protocol import UserStatePayload
from hub.web.access import TokenCheck, http_access_error, parse_http_address
from hub.web.link import MqttLink
from hub.web.live import RECENT_EVENTS, LiveFeed, Stream
from hub.web.server import WebServer
from tests.support.hub_process import HubProcess
from tests.support.mqtt_clients import SimDevice, Watcher
from tests.support.procs import MosquittoProcess, find_binary, free_port
from tests.support.wait import async_wait_for, wait_for

TOKEN = "s3cret-token-for-tests"
HOST = "127.0.0.1"


@dataclass
class WebHub:
    proc: HubProcess
    mqtt_port: int
    http_port: int

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def device(self, user: str, device: str, name: str | None = None) -> SimDevice:
        return SimDevice(HOST, self.mqtt_port, user, device, name=name)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebHub]:
    workdir = tmp_path_factory.mktemp("web-hub")
    mqtt_port, http_port = free_port(), free_port()
    proc = HubProcess(
        ["--broker", "embedded", "--listen", f"{HOST}:{mqtt_port}", "--storage", "memory",
         "--http", f"0.0.0.0:{http_port}", "--stats-interval", "0"],
        workdir, env={"PRESENCE_HTTP_TOKEN": TOKEN})  # the token as the README advises
    proc.start()
    try:
        yield WebHub(proc, mqtt_port, http_port)
    finally:
        proc.stop()


@contextlib.contextmanager
def online(*devices: SimDevice) -> Iterator[None]:
    """The devices online for the block, offline cleanly after it: the hub has applied a clean
    offline when its PUBACK arrives, so the next test starts from settled counts (a closed
    socket's will would land a second later, in the middle of the next test)."""
    try:
        for device in devices:
            device.online()
        yield
    finally:
        for device in devices:
            if device.paho.is_connected():
                device.clean_offline()
            device.close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(password: str, user: str = "anyone") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def api(hub: WebHub, path: str) -> Any:
    status, _headers, body = get(hub.base + path, bearer())
    assert status == 200, (path, status, body)
    return json.loads(body)


def scrape(base: str, headers: dict[str, str] | None = None) -> str:
    status, headers_out, body = get(base + "/metrics", headers if headers is not None else bearer())
    assert status == 200, body
    assert headers_out["Content-Type"].startswith("text/plain"), headers_out["Content-Type"]
    return body.decode()


def scrape_until(base: str, good: Callable[[str], bool], what: str) -> str:
    """Scrape until the text satisfies ``good`` (counts are read at scrape time)."""
    def attempt() -> str | None:
        text = scrape(base)
        return text if good(text) else None

    found: str = wait_for(attempt, 5, what)
    return found


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


# ------------------------------------------------------------------------------ start and access


def test_the_banner_names_the_dashboard(hub: WebHub) -> None:
    out = hub.proc.output()
    assert f":{hub.http_port}/" in out and "dashboard:" in out, out
    assert "token" in out.split("dashboard:")[1].splitlines()[0]
    assert TOKEN not in out  # the token itself is never printed


@pytest.mark.parametrize("argv, said", [
    (["--http", "0.0.0.0:8080"], "refusing to serve --http on 0.0.0.0"),
    (["--http", "192.0.2.7:8080"], "--http-token"),
    (["--http", "hub.lan:8080"], "--http-token"),
    (["--http", "0.0.0.0:8080", "--http-token", " "], "--http-token"),  # blank: none
    (["--http", "8080"], "invalid --http address"),
    (["--http", "127.0.0.1:99999"], "invalid --http address"),
])
def test_the_hub_refuses_to_start_with_an_open_or_bad_http_address(
        argv: list[str], said: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRESENCE_HTTP_TOKEN", raising=False)
    assert hub_main(["--storage", "memory", *argv]) == 2
    err = capsys.readouterr().err
    assert said in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_the_readme_quotes_the_refusal_as_the_hub_says_it(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRESENCE_HTTP_TOKEN", raising=False)
    assert hub_main(["--http", "0.0.0.0:8080"]) == 2
    said = capsys.readouterr().err.strip()
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"$ presence-hub --http 0.0.0.0:8080\n{said}\n" in readme, said


def test_loopback_needs_no_token_and_every_other_address_does() -> None:
    for host in ("127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"):
        assert http_access_error(parse_http_address(f"{host}:8080"), None) is None, host
    for host in ("0.0.0.0", "::", "10.0.0.2", "hub.lan"):
        assert http_access_error(parse_http_address(f"{host}:8080"), None) is not None, host
        assert http_access_error(parse_http_address(f"{host}:8080"), "t0ken") is None, host


def test_the_token_check_takes_bearer_basic_and_query_and_nothing_else() -> None:
    check = TokenCheck(TOKEN)
    assert check.allows(bearer(), {})
    assert check.allows({"Authorization": f"bearer  {TOKEN} "}, {})
    assert check.allows(basic(TOKEN), {})
    assert check.allows({}, {"token": TOKEN})
    for headers in (bearer("wrong"), basic("wrong"), basic(TOKEN, user="") | {"x": "y"},
                    {"Authorization": "Basic !!!not-base64"}, {"Authorization": TOKEN},
                    {"Authorization": "Digest " + TOKEN}, {}):
        expected = headers == basic(TOKEN, user="") | {"x": "y"}  # any user name will do
        assert check.allows(headers, {}) is expected, headers
    assert not check.allows({}, {"token": TOKEN[:-1]})


def test_beyond_loopback_every_route_but_healthz_needs_the_token(hub: WebHub) -> None:
    for path in ("/", "/api/users", "/metrics", "/api/events"):
        status, headers, _body = get(hub.base + path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Basic" if path == "/" else "Bearer"), path
        assert get(hub.base + path, bearer("not-the-token"))[0] == 401, path
    assert get(hub.base + "/api/users", bearer())[0] == 200
    assert get(hub.base + "/api/users", basic(TOKEN))[0] == 200
    assert get(hub.base + f"/api/users?token={TOKEN}")[0] == 200
    status, headers, page = get(hub.base + "/", basic(TOKEN))
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"static/app.js" in page and b"http" not in page.split(b"<body")[1]  # no CDN
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    # open: the health check, and the page's code (no data in it)
    status, _headers, body = get(hub.base + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert get(hub.base + "/static/app.js")[0] == 200
    assert get(hub.base + "/static/style.css")[0] == 200


# ------------------------------------------------------------------------------ what it serves


def test_healthz_says_the_hub_runs_with_its_role_and_broker(hub: WebHub) -> None:
    status, _headers, body = get(hub.base + "/healthz")
    health = json.loads(body)
    assert status == 200
    assert health["status"] == "ok" and health["role"] == "active"
    assert health["broker"] == {"kind": "embedded", "up": True}
    assert health["uptimeS"] >= 0


def test_api_users_are_the_state_payloads_in_pages(hub: WebHub) -> None:
    watcher = Watcher(HOST, hub.mqtt_port).start()
    devices = [hub.device("ann", "laptop", "Ann's laptop"), hub.device("ann", "phone"),
               hub.device("ben", "phone"), hub.device("cy", "pi")]
    with contextlib.closing(watcher), online(*devices):
        devices[2].set(status="dnd", custom_status="On a call")
        watcher.wait_status("ben", "dnd")
        for user in ("ann", "ben", "cy"):
            wait_for(lambda u=user: watcher.state(u) is not None and len(
                watcher.state(u)["devices"]) == (2 if u == "ann" else 1), what=f"{user}'s state")

        def by_id() -> dict[str, Any]:
            return {u["userId"]: u for u in api(hub, "/api/users?limit=5000")["users"]}

        wait_for(lambda: all(by_id()[u] == watcher.state(u) for u in ("ann", "ben", "cy")),
                 what="/api/users to hold what P/users/{user}/state holds")
        ben = by_id()["ben"]
        assert ben["status"] == "dnd" and ben["customStatus"] == "On a call"
        assert by_id()["ann"]["devices"][0]["name"] == "Ann's laptop"

        everyone = sorted(by_id())
        pages, after = [], ""
        while True:
            page = api(hub, f"/api/users?limit=2{'&after=' + after if after else ''}")
            pages.append([u["userId"] for u in page["users"]])
            if page["next"] is None:
                break
            after = page["next"]
            assert after == pages[-1][-1]
        assert [uid for p in pages for uid in p] == everyone
        assert all(len(p) == 2 for p in pages[:-1]) and 1 <= len(pages[-1]) <= 2
        for bad in ("0", "-1", "5001", "lots"):
            status, _h, body = get(hub.base + f"/api/users?limit={bad}", bearer())
            assert status == 400 and "limit" in json.loads(body)["error"], bad


def test_metrics_follow_a_small_fleet(hub: WebHub) -> None:
    before = scrape(hub.base)

    def delta(text: str, name: str, **labels: str) -> float:
        return value(text, name, **labels) - value(before, name, **labels)

    mia_laptop, mia_phone = hub.device("mia", "laptop"), hub.device("mia", "phone")
    noah = hub.device("noah", "phone")
    with online(mia_laptop, mia_phone, noah):
        now = scrape_until(hub.base, lambda t: delta(t, "presence_users", status="online") == 2
                           and delta(t, "presence_devices", status="online") == 3,
                           "2 more users and 3 more devices online")
        assert delta(now, "presence_messages_total", kind="conn") >= 3
        assert value(now, "presence_broker_clients") >= 3  # others may still be leaving
        assert delta(now, "presence_status_changes_total", status="online") == 2
        assert value(now, "presence_broker_link_up") == 1
        assert value(now, "presence_hub_role", role="active") == 1
        assert value(now, "presence_store_flush_seconds_count") >= 1

        noah.set(status="dnd", custom_status="Heads down")
        mia_phone.publish(mia_phone.topic("heartbeat"), b"not json", qos=0)
        now = scrape_until(hub.base, lambda t: delta(t, "presence_users", status="dnd") == 1
                           and delta(t, "presence_dropped_total", reason="bad_payload") == 1,
                           "noah dnd and one bad payload counted")
        assert delta(now, "presence_users", status="online") == 1
        assert delta(now, "presence_messages_total", kind="set") == 1
        assert delta(now, "presence_status_changes_total", status="dnd") == 1

        mia_laptop.clean_offline()
        mia_phone.clean_offline()
        now = scrape_until(hub.base, lambda t: delta(t, "presence_users", status="offline") == 1
                           and delta(t, "presence_devices", status="offline") == 2,
                           "mia and her devices offline")
        assert delta(now, "presence_users", status="online") == 0
        assert delta(now, "presence_devices", status="online") == 1
        assert delta(now, "presence_status_changes_total", status="offline") == 1


def test_promtool_accepts_the_metrics(hub: WebHub) -> None:
    promtool = find_binary("promtool", "apt-get install prometheus (it brings promtool)")
    device = hub.device("pia", "laptop")
    with online(device):
        device.publish(device.topic("activity"), b"{}", qos=1)  # a drop reason, to have labels
        text = scrape_until(hub.base, lambda t: value(t, "presence_devices", status="online")
                            >= 1, "a device online")
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("presence_users", "presence_devices", "presence_messages_total",
                 "presence_dropped_total", "presence_status_changes_total",
                 "presence_store_flush_seconds", "presence_broker_link_up",
                 "presence_broker_clients", "presence_engine_events_total"):
        assert f"# TYPE {name.removesuffix('_total')}" in text or f"# TYPE {name} " in text, name


def read_events(resp: http.client.HTTPResponse) -> Iterator[tuple[str, Any]]:
    """Server-sent events as (event, parsed data); blocks, up to the socket timeout, for each."""
    event, data = "message", ""
    while True:
        line = resp.readline().decode()
        assert line, "the event stream ended"
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield event, json.loads(data)
            event, data = "message", ""
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def test_the_event_stream_delivers_a_status_change(hub: WebHub) -> None:
    conn = http.client.HTTPConnection(HOST, hub.http_port, timeout=8)
    conn.request("GET", f"/api/events?token={TOKEN}")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    events = read_events(resp)
    kind, hello = next(events)
    assert kind == "hello" and hello["health"]["status"] == "ok"
    assert next(e for e, _d in events if e == "ready")
    device = hub.device("lea", "phone")
    with contextlib.closing(conn), online(device):
        assert next(d for e, d in events if e == "user" and d["userId"] == "lea")["status"] == (
            "online")
        device.set(status="dnd", custom_status="Focus")
        state = next(d for e, d in events if e == "user" and d["userId"] == "lea"
                     and d["status"] == "dnd")
        assert state["customStatus"] == "Focus" and state["devices"][0]["id"] == "phone"
        UserStatePayload.model_validate(state)  # the payload of P/users/lea/state
        change = next(d for e, d in events if e == "event" and d["userId"] == "lea"
                      and d.get("new") == "dnd")
        assert change["kind"] == "statusChange" and change["old"] == "online"


# ------------------------------------------------------------------------------ in-process


async def test_healthz_is_503_while_the_broker_link_is_down(
        mosquitto: MosquittoProcess) -> None:
    service = create_presence_service(storage="memory")
    mqtt = attach_broker(service, mosquitto.url)
    web = WebServer(service, f"{HOST}:0", link=MqttLink(mqtt))
    service.attach(web)
    async with service, aiohttp.ClientSession() as session:
        base = f"http://{HOST}:{web.port}"

        async def health() -> tuple[int, Any]:
            async with session.get(base + "/healthz") as resp:
                return resp.status, await resp.json()

        async def link_up() -> float:
            async with session.get(base + "/metrics") as resp:
                return value(await resp.text(), "presence_broker_link_up")

        _status, body = await async_wait_for(
            lambda: _when(health(), lambda r: r[0] == 200), 5, "the link up")
        assert body["broker"] == {"kind": "external", "up": True}
        await asyncio.to_thread(mosquitto.stop)
        _status, body = await async_wait_for(
            lambda: _when(health(), lambda r: r[0] == 503), 5, "/healthz to say 503")
        assert body["status"] == "unavailable" and body["broker"]["up"] is False
        assert await link_up() == 0
        await asyncio.to_thread(mosquitto.restart)  # same port, same persistence
        await async_wait_for(lambda: _when(health(), lambda r: r[0] == 200), 10,
                             "the hub back on its broker")
        assert await link_up() == 1


async def _when(result: Any, good: Any) -> Any:
    value_ = await result
    return value_ if good(value_) else None


async def test_a_browser_that_falls_behind_is_dropped_and_the_hub_goes_on() -> None:
    service = create_presence_service(storage="memory")
    web = WebServer(service, f"{HOST}:0", pending_users=5)
    service.attach(web)
    async with service:
        reader, writer = await asyncio.open_connection(HOST, web.port)
        writer.write(b"GET /api/events HTTP/1.1\r\nHost: hub\r\n\r\n")
        await writer.drain()
        await async_wait_for(lambda: len(web.feed.streams) == 1, 5, "the stream open")
        # twenty users change at once, the browser reads nothing meanwhile
        for i in range(20):
            await service.set_device_status(f"user-{i}", "phone", "online")
        await async_wait_for(lambda: not web.feed.streams, 5, "the stream dropped")
        # its connection is cut (EOF or reset; a timeout here fails the test)
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(5):
                while await reader.read(65536):
                    pass
        writer.close()
        # the hub went on: state, the API and a new stream all work
        assert (await service.get_status("user-19")).status == "online"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{HOST}:{web.port}/api/users?limit=100") as resp:
                assert len((await resp.json())["users"]) == 20
            async with session.get(f"http://{HOST}:{web.port}/api/events") as resp:
                assert resp.status == 200
                assert await resp.content.readline() == b"retry: 2000\n"


async def test_a_browser_that_stops_reading_is_dropped_once_a_write_times_out() -> None:
    service = create_presence_service(storage="memory")
    web = WebServer(service, f"{HOST}:0", write_timeout=0.3)
    service.attach(web)
    async with service:
        for i in range(4000):  # about 1 MB of state: more than the socket buffers hold
            await service.set_device_status(f"user-{i:04}", "phone", "online")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, web.port))
        _reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /api/events HTTP/1.1\r\nHost: hub\r\n\r\n")
        await writer.drain()
        await async_wait_for(lambda: len(web.feed.streams) == 1, 5, "the stream open")
        async with aiohttp.ClientSession() as session:
            # the hub answers while that write hangs, and drops the browser after it times out
            async with session.get(f"http://{HOST}:{web.port}/healthz") as resp:
                assert resp.status == 200
            await async_wait_for(lambda: not web.feed.streams, 5, "the stuck browser dropped")
        writer.close()


async def test_dashboards_beyond_the_limit_are_turned_away() -> None:
    service = create_presence_service(storage="memory")
    web = WebServer(service, f"{HOST}:0", max_streams=1)
    service.attach(web)
    async with service, aiohttp.ClientSession() as session:
        url = f"http://{HOST}:{web.port}/api/events"
        async with session.get(url) as first:
            assert first.status == 200
            await async_wait_for(lambda: len(web.feed.streams) == 1, 5, "the first stream")
            async with session.get(url) as second:
                assert second.status == 503
                assert "dashboards are open" in (await second.json())["error"]


def state(user: str, version: int) -> UserStatePayload:
    return UserStatePayload.model_validate({"user_id": user, "name": user, "status": "online",
                                            "version": version, "devices": []})


def test_a_stream_sends_each_changed_user_once_as_it_is_now() -> None:
    async def run() -> None:
        stream = Stream(pending_users=10)
        for version in (1, 2, 3):
            stream.state(state("amy", version))
        stream.state(state("bo", 1))
        blob = stream.take().decode()
        assert blob.count("event: user") == 2 and '"version":3' in blob
        assert stream.take() == b""

    asyncio.run(run())


def test_a_stream_past_its_limit_is_ended_and_its_connection_dropped() -> None:
    async def run() -> None:
        dropped: list[bool] = []
        stream = Stream(pending_users=3)
        stream.on_drop = lambda: dropped.append(True)
        for i in range(4):
            stream.state(state(f"u{i}", 1))
        assert stream.ended is not None and dropped == [True]
        stream.state(state("late", 1))  # ignored from now on: nothing grows
        assert stream.take() == b""

    asyncio.run(run())


def test_the_feed_keeps_recent_events_and_counts_changes_without_any_browser() -> None:
    feed = LiveFeed(lambda: 1_000)
    for i in range(RECENT_EVENTS + 10):
        feed.publish_event(EmitEvent(f"u{i}", "statusChange", "offline", "online", i))
        feed.publish_event(EmitEvent(f"u{i}", "online", "offline", "online", i))
    feed.publish_state(state("u0", 9), forced=False)  # no stream open: nothing kept
    assert len(feed.recent) == RECENT_EVENTS and feed.recent[-1].user_id == f"u{RECENT_EVENTS + 9}"
    assert feed.status_changes == {"online": RECENT_EVENTS + 10}
    feed.before_flush()
    feed.after_flush()
    assert feed.flush_times.count == 1 and feed.flush_times.cumulative()[-1] == ("+Inf", 1)


def test_the_web_package_ships_its_page() -> None:
    static = Path(hub_web.__file__ or "").parent / "static"
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "style.css"}
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"web/static/*"' in pyproject
