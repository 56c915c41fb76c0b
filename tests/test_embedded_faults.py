"""Faults on the embedded broker, each reproduced as an operator met it (issue 11).

Real processes and sockets only: the hub runs as ``python -m hub.cli`` where it must be killed
or stopped by a signal, or in-process (``create_presence_service(broker="embedded")``) where the
test needs to look inside the broker; devices and subscribers are paho clients or raw sockets
speaking MQTT 3.1.1 by hand, so a test can do what a broken or hostile client does. Every wait
is on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import socket
import struct
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from hub.app.factory import attach_broker, create_presence_service
from hub.app.service import PresenceService
from hub.broker import BrokerError, EmbeddedBroker
from hub.broker import embedded as broker_embedded
from hub.broker.connection import Outbox
from hub.broker.embedded import AMQTT_VERSION
from hub.cli import main as cli_main
from hub.mqtt import EmbeddedTransport, MqttHub
from hub.protocol import ConnPayload
from hub.stores.tinydb import TinyDBStore
from tests.support.hub_process import HubProcess
from tests.support.mqtt_clients import MqttClient, SimDevice
from tests.support.procs import free_port
from tests.support.wait import async_wait_for, wait_for

# ---------------------------------------------------------------------------------------------
# MQTT 3.1.1 by hand: what a raw socket client sends and reads


def _string(value: bytes) -> bytes:
    return struct.pack("!H", len(value)) + value


def _remaining(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining(len(body)) + body


def connect_packet(client_id: bytes, *, keepalive: int = 60, level: int = 4, name: bytes = b"MQTT",
                   will: tuple[bytes, bytes] | None = None, properties: bytes | None = None) -> bytes:
    """A CONNECT with a clean session (and a QoS 1 retained will if given).

    ``properties`` (MQTT 5 only) goes after the keepalive, as a v5 client sends it.
    """
    flags = 0x02 | (0x04 | 0x08 | 0x20 if will else 0)
    body = _string(name) + bytes([level, flags]) + struct.pack("!H", keepalive)
    if properties is not None:
        body += _remaining(len(properties)) + properties
    body += _string(client_id)
    if will is not None:
        if properties is not None:
            body += b"\x00"  # will properties
        body += _string(will[0]) + _string(will[1])
    return _packet(0x10, body)


def publish_packet(topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 1,
                   retain: bool = False) -> bytes:
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return _packet(0x30 | (qos << 1) | int(retain), body)


def subscribe_packet(topic_filter: bytes, qos: int, packet_id: int = 1) -> bytes:
    return _packet(0x82, struct.pack("!H", packet_id) + _string(topic_filter) + bytes([qos]))


DISCONNECT = b"\xe0\x00"


def now_ms() -> int:
    return int(time.time() * 1000)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


# ---------------------------------------------------------------------------------------------
# A hub process on the embedded broker with a TinyDB file


@pytest.fixture
def hub_args(tmp_path: Path) -> tuple[list[str], int, Path]:
    port = free_port()
    db = tmp_path / "presence.json"
    args = ["--broker", "embedded", "--listen", f"127.0.0.1:{port}", "--storage", "tinydb",
            "--db", str(db)]
    return args, port, db


@pytest.fixture
def closing() -> Iterator[list[MqttClient | HubProcess]]:
    """Clients and hubs made by a test; whatever is left of them is closed at teardown."""
    made: list[MqttClient | HubProcess] = []
    yield made
    for thing in reversed(made):
        thing.close()


def _stored_activity(db: Path, user: str) -> list[int]:
    """What a restarted hub would read: the ``n`` of every activity of ``user`` in the file."""

    async def read() -> list[int]:
        store = TinyDBStore(db)
        await store.open()
        try:
            entries = await store.get_activity(user, limit=10_000)
        finally:
            await store.close()
        return sorted(int((e.data or {})["n"]) for e in entries)

    return asyncio.run(read())


# ---------------------------------------------------------------------------------------------
# Defect 2: nothing acknowledged is lost


def test_acknowledged_activity_survives_a_hub_sigkill(
    hub_args: tuple[list[str], int, Path], tmp_path: Path, closing: list[MqttClient | HubProcess]
) -> None:
    # The embedded broker used to PUBACK on receipt: 60 acknowledged activities, a SIGKILL
    # right after the last PUBACK, and none of them was in the file.
    args, port, db = hub_args
    hub = HubProcess(args, tmp_path)
    closing.append(hub)
    hub.start()
    device = SimDevice("127.0.0.1", port, "alice", "pc")
    closing.append(device)
    device.online()
    topic = device.topic("activity")
    start = int(time.time() * 1000)
    sent: list[mqtt.MQTTMessageInfo] = []
    for n in range(60):
        payload = json.dumps({"type": "message", "channelId": "telegram-1",
                              "timestamp": start + n, "data": {"n": n}}).encode()
        with device._io:
            sent.append(device.paho.publish(topic, payload, qos=1))
    wait_for(lambda: all(info.is_published() for info in sent), timeout=15,
             what="a PUBACK for each of the 60 activities")

    hub.kill()

    assert _stored_activity(db, "alice") == list(range(60))


# ---------------------------------------------------------------------------------------------
# The hub in this process, on its embedded broker, and raw MQTT clients on asyncio streams


@dataclass
class InProcessHub:
    service: PresenceService
    hub: MqttHub
    port: int

    @property
    def broker(self) -> EmbeddedBroker:
        transport = self.hub.transport
        assert isinstance(transport, EmbeddedTransport)
        return transport.broker


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[InProcessHub]:
    port = free_port()
    service = create_presence_service(storage="tinydb", db_path=str(tmp_path / "presence.json"))
    hub = attach_broker(service, "embedded", listen=f"127.0.0.1:{port}")
    async with service:
        yield InProcessHub(service, hub, port)


class RawClient:
    """An MQTT 3.1.1 client on asyncio streams that records every PUBLISH it reads and
    acknowledges QoS 1 ones: a healthy subscriber, or a device doing things by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received: list[tuple[str, bytes, int, bool]] = []
        self.acks: list[tuple[int, int]] = []  # (packet type, packet id) of SUBACK/PUBACK
        self.closed = False
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, port: int, client_id: bytes, **options: Any) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(connect_packet(client_id, **options))
        assert await reader.readexactly(4) == b"\x20\x02\x00\x00", "CONNACK accepted"
        return cls(reader, writer)

    async def _read(self) -> None:
        try:
            while True:
                first = (await self.reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await self.reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await self.reader.readexactly(length)
                kind = first >> 4
                if kind == 3:
                    qos = (first >> 1) & 3
                    size = struct.unpack("!H", body[:2])[0]
                    topic = body[2:2 + size].decode()
                    rest = body[2 + size:]
                    if qos:
                        self.writer.write(b"\x40\x02" + rest[:2])
                        rest = rest[2:]
                    self.received.append((topic, rest, qos, bool(first & 1)))
                else:
                    self.acks.append((kind, struct.unpack("!H", body[:2])[0]))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed = True

    async def subscribe(self, topic_filter: bytes, qos: int = 1, packet_id: int = 1) -> None:
        self.writer.write(subscribe_packet(topic_filter, qos, packet_id))
        await async_wait_for(lambda: (9, packet_id) in self.acks, what="SUBACK")

    def publish(self, topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 1,
                retain: bool = False) -> None:
        self.writer.write(publish_packet(topic, payload, qos, packet_id, retain))

    def got(self, topic: str) -> list[bytes]:
        return [payload for t, payload, _q, _r in self.received if t == topic]

    def got_prefix(self, prefix: str) -> list[bytes]:
        return [payload for t, payload, _q, _r in self.received if t.startswith(prefix)]

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._task


# ---------------------------------------------------------------------------------------------
# Defect 9: a clean DISCONNECT discards the will


async def test_a_clean_disconnect_never_sends_the_will(inproc: InProcessHub) -> None:
    # amqtt noted a DISCONNECT only in a future made once the connection had fully started: a
    # client quick enough (here: CONNECT, birth, clean offline and DISCONNECT in one write,
    # keepalive 0 so amqtt's reader never yields) had its will sent after its clean offline,
    # every time. MQTT: a DISCONNECT discards the will [MQTT-3.14.4-3].
    watcher = await RawClient.connect(inproc.port, b"watcher")
    await watcher.subscribe(b"presence/devices/#")
    rounds = 40
    for n in range(rounds):
        topic = f"presence/devices/u{n}/pc/conn".encode()
        will = ConnPayload(state="offline", session=f"s{n}", reason="lost").to_json()
        birth = ConnPayload(state="online", session=f"s{n}", name="pc", ts=now_ms()).to_json()
        bye = ConnPayload(state="offline", session=f"s{n}", reason="disconnect",
                          ts=now_ms()).to_json()
        reader, writer = await asyncio.open_connection("127.0.0.1", inproc.port)
        writer.write(connect_packet(f"agent-{n}".encode(), keepalive=0, will=(topic, will))
                     + publish_packet(topic, birth, qos=1, packet_id=1, retain=True)
                     + publish_packet(topic, bye, qos=1, packet_id=2, retain=True)
                     + DISCONNECT)
        # the broker closes the connection once it has handled the DISCONNECT
        while await asyncio.wait_for(reader.read(4096), 5):
            pass
        writer.close()

    await async_wait_for(lambda: inproc.broker.connected_clients() == ["watcher"],
                         what="every agent connection ended")
    await inproc.broker.publish("presence/devices/marker", b"after every will", qos=1)
    await async_wait_for(lambda: watcher.got("presence/devices/marker"), what="the marker")
    conn = [json.loads(p) for t, p, _q, _r in watcher.received if t.endswith("/conn")]
    assert [c["reason"] for c in conn if c["state"] == "offline"] == ["disconnect"] * rounds
    # and what a newcomer reads as each device's last word is its clean offline
    late = await RawClient.connect(inproc.port, b"late")
    await late.subscribe(b"presence/devices/+/pc/conn")
    await async_wait_for(lambda: len(late.received) == rounds, what="every retained conn")
    assert {json.loads(p)["reason"] for _t, p, _q, _r in late.received} == {"disconnect"}
    await watcher.close()
    await late.close()


# ---------------------------------------------------------------------------------------------
# Defect 11: a CONNECT the broker cannot serve is refused at once


MQTT5_WILL = {"will": (b"presence/devices/a/b/conn", b"lost")}


@pytest.mark.parametrize(
    ("name", "level", "properties", "login"),
    [
        (b"MQTT", 5, b"\x11\x00\x00\x00\x3c", False),  # v5, session expiry property, will
        (b"MQTT", 5, b"", True),  # v5 with a login
        (b"MQIsdp", 3, None, False),  # MQTT 3.1
        (b"MQTT", 6, None, False),  # a level nobody speaks yet
    ],
    ids=["v5-will", "v5-login", "v3.1", "level-6"],
)
async def test_a_connect_of_another_protocol_version_is_refused_at_once(
    inproc: InProcessHub, name: bytes, level: int, properties: bytes | None, login: bool
) -> None:
    # An MQTT 5 CONNECT was parsed as 3.1.1: its properties read as the client id's length, so
    # the broker waited for bytes that never came and the client got no CONNACK at all.
    packet = connect_packet(b"newer", level=level, name=name, properties=properties,
                            **({} if login else MQTT5_WILL))
    if login:  # username and password flags, then both strings after the client id
        body = bytearray(packet[2:])
        body[len(name) + 3] |= 0xC0
        packet = _packet(0x10, bytes(body) + _string(b"alice") + _string(b"secret"))
    reader, writer = await asyncio.open_connection("127.0.0.1", inproc.port)
    writer.write(packet)
    # a deadline well below the broker's 10 s CONNECT timeout, which closes without a word
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"\x20\x02\x00\x01"
    assert await asyncio.wait_for(reader.read(16), 5) == b""  # and the connection is closed
    writer.close()
    assert inproc.broker.connected_clients() == []


# ---------------------------------------------------------------------------------------------
# Defect 10: the hub's clean stop reaches subscribers


def test_clean_stop_tells_subscribers_the_hub_is_offline(
    hub_args: tuple[list[str], int, Path], tmp_path: Path, closing: list[MqttClient | HubProcess]
) -> None:
    # The hub published its retained 'offline' and closed the broker at once: amqtt dropped
    # what was still on its broadcast queue ("6 messages not broadcasted").
    args, port, _db = hub_args
    hub = HubProcess(args, tmp_path)
    closing.append(hub)
    hub.start()
    watchers = [MqttClient("127.0.0.1", port) for _ in range(3)]
    closing.extend(watchers)
    for watcher in watchers:
        watcher.connect()
        watcher.subscribe("presence/hub/status")
        wait_for(lambda w=watcher: w.last("presence/hub/status") == b"online", what="online")

    assert hub.stop() == 0

    for watcher in watchers:
        wait_for(lambda w=watcher: w.got("presence/hub/status")[-1:] == [b"offline"],
                 what="the hub's offline at every subscriber")
    assert "not broadcasted" not in hub.output()


# ---------------------------------------------------------------------------------------------
# Defect 16: amqtt pinned, and another version refused at start


def test_pyproject_pins_amqtt_to_the_version_the_broker_was_read_against() -> None:
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"] + [
        d for extra in pyproject["project"].get("optional-dependencies", {}).values() for d in extra
    ]
    assert f"amqtt=={AMQTT_VERSION}" in deps
    assert importlib.metadata.version("amqtt") == AMQTT_VERSION


def test_the_hub_refuses_to_start_on_another_amqtt_version(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The broker overrides amqtt's private methods as 0.12.1 has them; on another version they
    # may silently not be called, or be called with other arguments.
    monkeypatch.setattr(broker_embedded, "installed_amqtt_version", lambda: "0.13.0")
    code = cli_main(["--broker", "embedded", "--listen", f"127.0.0.1:{free_port()}",
                     "--storage", "memory"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0
    assert "amqtt 0.13.0 is installed" in err and f"amqtt=={AMQTT_VERSION}" in err


async def test_the_broker_refuses_another_amqtt_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_embedded, "installed_amqtt_version", lambda: None)
    broker = EmbeddedBroker("127.0.0.1", 0)
    with pytest.raises(BrokerError, match="amqtt is not installed"):
        await broker.start()
    assert not broker.running


# ---------------------------------------------------------------------------------------------
# Defect 8: subscribers that do not read


def _stuck_subscriber(port: int, client_id: bytes) -> socket.socket:
    """Connect, subscribe to everything at QoS 1, and from then on never read a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small, before connecting
    sock.connect(("127.0.0.1", port))
    sock.settimeout(5)
    sock.sendall(connect_packet(client_id))
    assert read_exactly(sock, 4) == b"\x20\x02\x00\x00"
    sock.sendall(subscribe_packet(b"presence/#", 1))
    assert read_exactly(sock, 5) == b"\x90\x03\x00\x01\x01"
    return sock


def _socket_buffers_bytes() -> int:
    """How much the kernel may buffer between the broker and a client that does not read."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2]) + 256 * 1024
    except (OSError, ValueError, IndexError):
        return 8 * 1024 * 1024


async def test_subscribers_that_never_read_cost_a_bounded_queue_and_one_log_line(
    inproc: InProcessHub, caplog: pytest.LogCaptureFixture
) -> None:
    # Three subscribers to presence/# that never read: amqtt made a task per message for each,
    # waiting on a socket that never drained, then 5 s for a PUBACK; the hub grew from 80 to
    # 260 MB, logged tracebacks, and 1,000 healthy devices timed out.
    caplog.set_level(logging.WARNING)
    stuck = [await asyncio.to_thread(_stuck_subscriber, inproc.port, f"stuck-{n}".encode())
             for n in range(3)]
    healthy = await RawClient.connect(inproc.port, b"healthy")
    await healthy.subscribe(b"presence/#")
    device = await RawClient.connect(inproc.port, b"device")
    tasks_before = len(asyncio.all_tasks())

    payload = b"x" * 2048
    limit = inproc.broker.limits.max_queued
    count = limit + _socket_buffers_bytes() // len(payload) * 2
    for n in range(count):
        # as the hub publishes its state: straight into the broker, nothing waits
        inproc.broker.publish_nowait(f"presence/flood/{n % 50}", payload, qos=1)
        if n % 500 == 0:
            # a healthy device is served meanwhile: its activity is acknowledged
            device.publish(b"presence/devices/bob/phone/activity",
                           b'{"type":"message","channelId":"c1"}', qos=1, packet_id=n % 60000 + 1)
            await asyncio.sleep(0)

    await async_wait_for(lambda: len(healthy.got_prefix("presence/flood/")) == count,
                         timeout=30, what="every message at the healthy subscriber")
    await async_wait_for(lambda: len(device.acks) == (count - 1) // 500 + 1, timeout=10,
                         what="every activity of the healthy device acknowledged")
    # A task per stuck connection that waits for its socket, not one per message.
    await async_wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before + len(stuck),
                         what=f"at most {len(stuck)} tasks more than before the flood")
    queued = [outbox.queued for outbox in _outboxes(inproc.broker, "stuck-")]
    assert queued == [limit] * len(stuck)
    # One line per stuck client, and nothing worse logged.
    for n in range(len(stuck)):
        assert sum(f"stuck-{n} " in r.getMessage() for r in caplog.records) == 1
    assert inproc.broker.slow_clients == len(stuck)
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.WARNING] == []
    for sock in stuck:
        sock.close()
    await healthy.close()
    await device.close()


def _outboxes(broker: EmbeddedBroker, prefix: str) -> list[Outbox]:
    amqtt_broker = broker._broker
    assert amqtt_broker is not None
    return [session.hub_outbox for client_id, (session, _h) in sorted(amqtt_broker.sessions.items())
            if client_id.startswith(prefix)]


async def test_a_subscriber_that_keeps_up_gets_every_message_of_a_republish(
    inproc: InProcessHub,
) -> None:
    # The other side of a bounded queue: the hub publishes its whole state far faster than any
    # client reads, so without waiting for those behind, a healthy paho subscriber lost half
    # of a 20,000-message republish. The hub's publishing waits for it instead.
    users = 2000
    for n in range(users):
        await inproc.service.record_activity(f"user{n}", {"type": "message", "channelId": "c1"})
    await inproc.service.flush()
    await inproc.broker.drained(0)
    watcher = MqttClient("127.0.0.1", inproc.port)
    try:
        await asyncio.to_thread(watcher.connect)
        await asyncio.to_thread(watcher.subscribe, "presence/users/#")
        # state, status and primary are retained (an empty custom status is not)
        await async_wait_for(lambda: len({m[0] for m in watcher.received if m[3]}) == 3 * users,
                             timeout=30, what="the retained state of every user")
        mark = len(watcher.received)

        inproc.hub.republish_all()

        await async_wait_for(lambda: len({m[0] for m in watcher.received[mark:]}) == 4 * users,
                             timeout=60, what="every message of the republish")
        assert inproc.broker.slow_clients == 0
    finally:
        await asyncio.to_thread(watcher.close)
