"""The embedded amqtt broker adapter, driven by real paho clients over TCP on 127.0.0.1.

Besides the adapter's own promises, these tests pin what amqtt 0.12.1 gets wrong and how the
adapter corrects it (see the docstring of hub/broker/embedded.py), and the deviations we accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from hub.broker import BrokerError, DeliveryLimits, EmbeddedBroker
from hub.broker.connection import Message, Outbox
from tests.support.wait import async_wait_for


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    client_id: str | None


@dataclass
class Recorder:
    """What the hub side of the broker saw."""

    messages: list[Seen] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)

    def on_message(
        self, topic: str, payload: bytes, qos: int, retain: bool, client_id: str | None
    ) -> None:
        self.messages.append(Seen(topic, payload, qos, retain, client_id))

    def on_client_disconnected(self, client_id: str) -> None:
        self.gone.append(client_id)

    def on(self, topic: str) -> list[Seen]:
        return [m for m in self.messages if m.topic == topic]


class Client:
    """A paho client on a network thread of our own, recording what it receives.

    Our own thread runs ``loop(timeout=0.02)`` so it can be stopped within milliseconds
    (paho's ``loop_stop`` waits out a 1 s select) and a device can "go silent" on demand.
    """

    def __init__(self, port: int, client_id: str | None = None, **kwargs: Any) -> None:
        self.port = port
        self.client_id = client_id or f"c-{uuid.uuid4().hex[:8]}"
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, **kwargs
        )
        self.received: list[tuple[str, bytes, int, bool]] = []
        self.subacks: list[int] = []
        self.disconnected = False
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_disconnect = self._on_disconnect
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.received.append((msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, *_rest: object) -> None:
        self.subacks.append(mid)

    def _on_disconnect(self, *_args: object) -> None:
        self.disconnected = True

    def _run(self) -> None:
        while not self._stop.is_set() and not self.disconnected:
            self.paho.loop(timeout=0.02)

    def got(self, topic: str) -> list[tuple[str, bytes, int, bool]]:
        return [m for m in self.received if m[0] == topic]

    def start(self, keepalive: int = 60) -> None:
        """Send CONNECT and run the network thread, without waiting for the CONNACK."""
        self.paho.connect("127.0.0.1", self.port, keepalive=keepalive)
        self._thread = threading.Thread(target=self._run, name=self.client_id, daemon=True)
        self._thread.start()

    async def connect(self, keepalive: int = 60) -> Client:
        self.start(keepalive)
        await async_wait_for(self.paho.is_connected, what=f"{self.client_id} connected")
        return self

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        _rc, mid = self.paho.subscribe(topic, qos)
        await async_wait_for(lambda: mid in self.subacks, what=f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.paho.publish(topic, payload, qos=qos, retain=retain)

    def _stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            assert not self._thread.is_alive(), "paho network thread did not stop"

    def go_silent(self) -> socket.socket:
        """Stop the network thread: no more packets, no pings, but the socket stays open."""
        self._stop_thread()
        sock = self.paho.socket()
        assert isinstance(sock, socket.socket)
        return sock

    def kill(self, reset: bool = False) -> None:
        """The device dies: its socket closes without a DISCONNECT (FIN, or RST if ``reset``)."""
        sock = self.go_silent()
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    async def disconnect(self) -> None:
        """A clean DISCONNECT, as an agent that stops on purpose sends it."""
        self.paho.disconnect()
        await async_wait_for(lambda: self.disconnected, what=f"{self.client_id} disconnected")
        self._stop_thread()

    def close(self) -> None:
        """Teardown: stop the thread and release the socket, whatever state we are in."""
        self._stop_thread()
        sock = self.paho.socket()
        if isinstance(sock, socket.socket):
            sock.close()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def broker(recorder: Recorder) -> AsyncIterator[EmbeddedBroker]:
    embedded = EmbeddedBroker(
        "127.0.0.1",
        0,
        on_message=recorder.on_message,
        on_client_disconnected=recorder.on_client_disconnected,
    )
    await embedded.start()
    try:
        yield embedded
    finally:
        await embedded.stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Clients made by a test; whatever is left of them is closed at teardown."""
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def new_client(broker: EmbeddedBroker, clients: list[Client]) -> Any:
    def make(client_id: str | None = None, **kwargs: Any) -> Client:
        client = Client(broker.port, client_id, **kwargs)
        clients.append(client)
        return client

    return make


# ---------------------------------------------------------------------------------------------
# What the hub sees


async def test_client_publishes_reach_on_message_with_their_details(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    device = await new_client("phone-1").connect()
    device.publish("presence/devices/u/phone/heartbeat", b'{"seq":1}', qos=0)
    device.publish("presence/devices/u/phone/conn", b'{"state":"online"}', qos=1, retain=True)

    await async_wait_for(lambda: len(recorder.messages) == 2, what="both messages on the hub")
    assert recorder.messages == [
        Seen("presence/devices/u/phone/heartbeat", b'{"seq":1}', 0, False, "phone-1"),
        Seen("presence/devices/u/phone/conn", b'{"state":"online"}', 1, True, "phone-1"),
    ]
    assert all(type(m.payload) is bytes for m in recorder.messages)
    assert broker.connected_clients() == ["phone-1"]


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_killed_client_will_reaches_on_message(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any, reset: bool
) -> None:
    device = new_client("phone-2")
    device.paho.will_set("dev/phone-2/conn", b"lost", qos=1, retain=True)
    await device.connect()

    device.kill(reset=reset)

    await async_wait_for(lambda: recorder.on("dev/phone-2/conn"), what="the will on the hub")
    assert recorder.on("dev/phone-2/conn") == [Seen("dev/phone-2/conn", b"lost", 1, True, "phone-2")]
    await async_wait_for(lambda: recorder.gone == ["phone-2"], what="disconnect reported")
    assert broker.connected_clients() == []


async def test_clean_disconnect_sends_no_will(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    device = new_client("phone-3")
    device.paho.will_set("dev/phone-3/conn", b"lost", qos=1)
    await device.connect()
    await device.disconnect()

    await async_wait_for(lambda: recorder.gone == ["phone-3"], what="disconnect reported")
    assert recorder.messages == []


async def test_disconnect_client_releases_its_will(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    device = new_client("phone-4")
    device.paho.will_set("dev/phone-4/conn", b"lost", qos=1, retain=True)
    await device.connect()
    device.go_silent()  # a device the hub has timed out: alive socket, nothing sent

    assert await broker.disconnect_client("phone-4") is True

    # When it returns, the will has been handed over and the session is gone.
    assert recorder.on("dev/phone-4/conn") == [Seen("dev/phone-4/conn", b"lost", 1, True, "phone-4")]
    assert recorder.gone == ["phone-4"]
    assert broker.connected_clients() == []
    assert await broker.disconnect_client("phone-4") is False
    # The will was also published to subscribers and retained, as for any lost connection.
    late = await new_client().connect()
    await late.subscribe("dev/phone-4/conn")
    await async_wait_for(lambda: late.got("dev/phone-4/conn"), what="retained will")
    assert late.got("dev/phone-4/conn") == [("dev/phone-4/conn", b"lost", 1, True)]


async def test_disconnect_unknown_client_is_false(broker: EmbeddedBroker) -> None:
    assert await broker.disconnect_client("nobody") is False


async def test_handler_errors_are_counted_not_fatal(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    calls: list[str] = []

    def flaky(topic: str, payload: bytes, qos: int, retain: bool, client_id: str | None) -> None:
        calls.append(topic)
        if topic == "bad":
            raise RuntimeError("boom")

    broker.on_message = flaky
    device = await new_client().connect()
    device.publish("bad", b"1")
    device.publish("good", b"2")
    await async_wait_for(lambda: calls == ["bad", "good"], what="both messages handled")
    assert broker.handler_errors == 1
    assert device.paho.is_connected()


# ---------------------------------------------------------------------------------------------
# What the hub publishes


async def test_hub_publish_reaches_subscribers_and_is_not_echoed(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    watcher = await new_client().connect()
    await watcher.subscribe("presence/events/#")

    await broker.publish("presence/events/u", b'{"event":"online"}', qos=1)

    await async_wait_for(lambda: watcher.received, what="hub event at the subscriber")
    assert watcher.received == [("presence/events/u", b'{"event":"online"}', 1, False)]
    # A client message after it proves the hub's own publish was not fed back.
    watcher.publish("marker", b"")
    await async_wait_for(lambda: recorder.on("marker"), what="marker on the hub")
    assert [m.topic for m in recorder.messages] == ["marker"]


async def test_hub_retained_publish_reaches_late_subscriber_and_empty_clears_it(
    broker: EmbeddedBroker, new_client: Any
) -> None:
    await broker.publish("presence/users/u/custom", b"In a meeting", qos=1, retain=True)

    late = await new_client().connect()
    await late.subscribe("presence/users/u/custom")
    await async_wait_for(lambda: late.received, what="retained custom status")
    assert late.received == [("presence/users/u/custom", b"In a meeting", 1, True)]

    await broker.publish("presence/users/u/custom", b"", qos=1, retain=True)
    # Current subscribers see the clearing message itself ...
    await async_wait_for(lambda: len(late.received) == 2, what="the clearing message")
    assert late.received[1] == ("presence/users/u/custom", b"", 1, False)
    # ... and a later subscriber gets nothing: the marker publish arrives with nothing before.
    later = await new_client().connect()
    await later.subscribe("presence/users/u/custom")
    await later.subscribe("marker")
    await broker.publish("marker", b"m", qos=1)
    await async_wait_for(lambda: later.received, what="marker")
    assert later.received == [("marker", b"m", 1, False)]


async def test_publish_nowait_from_on_message_keeps_order(
    broker: EmbeddedBroker, new_client: Any
) -> None:
    # The hub reacts inside on_message (synchronous) and publishes without awaiting.
    def react(topic: str, payload: bytes, qos: int, retain: bool, client_id: str | None) -> None:
        for n in range(3):
            broker.publish_nowait("out/state", b"%d" % n, qos=1, retain=True)
        broker.publish_nowait("out/event", payload, qos=1)

    broker.on_message = react
    watcher = await new_client().connect()
    await watcher.subscribe("out/#")
    watcher.publish("in/x", b"ping")
    await async_wait_for(lambda: len(watcher.received) == 4, what="the hub's reaction")
    assert [m[1] for m in watcher.received] == [b"0", b"1", b"2", b"ping"]
    await broker.publish("out/after", b"awaited")  # an awaited publish comes after them
    await async_wait_for(lambda: len(watcher.received) == 5, what="awaited publish")
    late = await new_client().connect()
    await late.subscribe("out/state")
    await async_wait_for(lambda: late.received, what="retained state")
    assert late.received == [("out/state", b"2", 1, True)]
    with pytest.raises(ValueError, match="invalid topic"):
        broker.publish_nowait("out/+", b"x")


async def test_publish_rejects_wildcards_and_needs_a_running_broker() -> None:
    broker = EmbeddedBroker("127.0.0.1", 0)
    with pytest.raises(BrokerError, match="not running"):
        await broker.publish("a/b", b"x")
    await broker.start()
    try:
        for topic in ("a/+", "a/#", ""):
            with pytest.raises(ValueError, match="invalid topic"):
                await broker.publish(topic, b"x")
        with pytest.raises(ValueError, match="QoS"):
            await broker.publish("a/b", b"x", qos=3)
    finally:
        await broker.stop()


# ---------------------------------------------------------------------------------------------
# Lifecycle


async def test_port_in_use_gives_a_clear_broker_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = EmbeddedBroker("127.0.0.1", port)
        with pytest.raises(BrokerError, match=rf"cannot listen on 127\.0\.0\.1:{port}: .*in use"):
            await broker.start()
        assert not broker.running


async def test_port_zero_listens_on_a_free_port_and_reports_it() -> None:
    broker = EmbeddedBroker("127.0.0.1", 0)
    await broker.start()
    try:
        assert broker.port != 0
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        with socket.create_connection(("127.0.0.1", broker.port), timeout=1):
            pass
    finally:
        await broker.stop()


async def test_listens_only_on_the_configured_host(broker: EmbeddedBroker) -> None:
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    with socket.create_connection(("127.0.0.1", broker.port), timeout=1):
        pass
    # 127.0.0.2 is loopback too on Linux: it is refused only because we did not bind 0.0.0.0.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", broker.port), timeout=1).close()


async def test_stop_with_connected_clients_is_prompt_and_reports_nothing(
    recorder: Recorder, clients: list[Client]
) -> None:
    broker = EmbeddedBroker(
        "127.0.0.1", 0, on_message=recorder.on_message,
        on_client_disconnected=recorder.on_client_disconnected,
    )
    await broker.start()
    alive = Client(broker.port, "alive")
    alive.paho.will_set("dev/alive/conn", b"lost")
    clients.append(alive)
    await alive.connect()
    silent = Client(broker.port, "silent")
    clients.append(silent)
    await silent.connect()
    silent.go_silent()

    await asyncio.wait_for(broker.stop(), 3)

    assert recorder.messages == [] and recorder.gone == []
    assert broker.connected_clients() == []
    await async_wait_for(lambda: alive.disconnected, what="client told of the closed connection")
    # The same port can be used again at once, by the same object too.
    await broker.start()
    await broker.stop()
    again = EmbeddedBroker("127.0.0.1", broker.port)
    await again.start()
    await again.stop()


# ---------------------------------------------------------------------------------------------
# amqtt deviations the adapter corrects


async def test_silent_client_is_dropped_after_one_and_a_half_keepalives(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    # amqtt alone never enforces keepalive: the will of a silent client waits for TCP.
    device = new_client("phone-5")
    device.paho.will_set("dev/phone-5/conn", b"lost", qos=1)
    loop = asyncio.get_running_loop()
    started = loop.time()  # before CONNECT: the broker's silence clock starts after it
    await device.connect(keepalive=1)
    device.go_silent()

    await async_wait_for(lambda: recorder.on("dev/phone-5/conn"), timeout=5, what="will")
    assert 1.5 <= loop.time() - started < 4.0
    await async_wait_for(lambda: recorder.gone == ["phone-5"], what="disconnect reported")


async def test_pinging_client_is_not_dropped(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    device = await new_client("phone-6").connect(keepalive=2)
    # paho pings after 2 s of quiet, the broker would drop it after 3 s; at 3.5 s it is there.
    await asyncio.sleep(3.5)  # proving an absence: nothing to wait on
    assert device.paho.is_connected()
    assert broker.connected_clients() == ["phone-6"]
    assert recorder.gone == []


async def test_retained_messages_go_only_to_subscribers_once_at_their_qos(
    broker: EmbeddedBroker, new_client: Any
) -> None:
    # amqtt alone sends a connecting client every retained message matching anyone's
    # subscription, at QoS 0, then again when it subscribes.
    await broker.publish("presence/users/u/status", b"online", qos=1, retain=True)
    other = await new_client().connect()
    await other.subscribe("presence/users/+/status", qos=1)
    await async_wait_for(lambda: other.received, what="retained status for the subscriber")

    newcomer = await new_client().connect()
    await newcomer.subscribe("marker")
    await broker.publish("marker", b"m", qos=0)
    await async_wait_for(lambda: newcomer.received, what="marker")
    assert newcomer.received == [("marker", b"m", 0, False)]  # nothing unasked before it

    await newcomer.subscribe("presence/users/u/status", qos=1)
    await broker.publish("marker", b"m2", qos=0)
    await async_wait_for(lambda: len(newcomer.received) == 3, what="retained and marker")
    assert newcomer.got("presence/users/u/status") == [("presence/users/u/status", b"online", 1, True)]


async def test_reconnect_with_same_id_drops_the_old_connection_first(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    # amqtt alone keeps the old connection of a clean-session client open; its will (old
    # session) would come whenever TCP notices, possibly after the new birth.
    old = new_client("phone-7")
    old.paho.will_set("dev/phone-7/conn", b"lost-s1", qos=1, retain=True)
    await old.connect()
    old_sock = old.go_silent()

    new = new_client("phone-7")
    new.paho.will_set("dev/phone-7/conn", b"lost-s2", qos=1, retain=True)
    await new.connect()
    new.publish("dev/phone-7/conn", b"online-s2", qos=1, retain=True)

    await async_wait_for(lambda: len(recorder.on("dev/phone-7/conn")) == 2, what="will + birth")
    assert [m.payload for m in recorder.on("dev/phone-7/conn")] == [b"lost-s1", b"online-s2"]
    old_sock.settimeout(2)
    assert old_sock.recv(16) == b""  # the broker closed the old connection
    old_sock.close()
    assert broker.connected_clients() == ["phone-7"]
    assert recorder.gone == ["phone-7"]  # the old connection's end; the new one is up
    watcher = await new_client().connect()
    await watcher.subscribe("dev/phone-7/conn")
    await async_wait_for(lambda: watcher.received, what="retained birth")
    assert watcher.received == [("dev/phone-7/conn", b"online-s2", 1, True)]


async def test_persistent_session_take_over_sends_the_old_will_and_keeps_the_new_one(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    # amqtt alone sends the *new* connection's will for the old one and leaves the session
    # marked disconnected, so the new connection receives nothing.
    old = new_client("panel-1", clean_session=False)
    old.paho.will_set("dev/panel-1/conn", b"lost-s1", qos=1)
    await old.connect()
    await old.subscribe("cmd/panel-1")
    old.go_silent()

    new = new_client("panel-1", clean_session=False)
    new.paho.will_set("dev/panel-1/conn", b"lost-s2", qos=1)
    await new.connect()

    await async_wait_for(lambda: recorder.on("dev/panel-1/conn"), what="old will")
    assert [m.payload for m in recorder.on("dev/panel-1/conn")] == [b"lost-s1"]
    await broker.publish("cmd/panel-1", b"sync", qos=1)
    await async_wait_for(lambda: new.got("cmd/panel-1"), what="message on the kept subscription")
    assert new.got("cmd/panel-1") == [("cmd/panel-1", b"sync", 1, False)]
    # The new connection's will is still the one that counts.
    new.kill()
    await async_wait_for(lambda: len(recorder.on("dev/panel-1/conn")) == 2, what="new will")
    assert recorder.on("dev/panel-1/conn")[1].payload == b"lost-s2"


async def test_connection_without_connect_is_closed_after_connect_timeout() -> None:
    # amqtt alone waits forever for CONNECT, and never closes a socket whose first packet
    # is bad.
    broker = EmbeddedBroker("127.0.0.1", 0, connect_timeout=0.3)
    await broker.start()
    loop = asyncio.get_running_loop()
    try:
        with socket.create_connection(("127.0.0.1", broker.port)) as idle:
            idle.setblocking(False)
            started = loop.time()
            assert await asyncio.wait_for(loop.sock_recv(idle, 16), 3) == b""
            assert 0.25 <= loop.time() - started < 2.0
        with socket.create_connection(("127.0.0.1", broker.port)) as garbage:
            garbage.setblocking(False)
            await loop.sock_sendall(garbage, b"\xff\x00garbage")
            assert await asyncio.wait_for(loop.sock_recv(garbage, 16), 3) == b""
        # A connection still waiting for CONNECT does not hold up stop.
        pending = socket.create_connection(("127.0.0.1", broker.port))
    finally:
        await asyncio.wait_for(broker.stop(), 3)
    with pending:
        pending.setblocking(False)
        # Reset instead if it was still in the listening socket's backlog when that closed.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(loop.sock_recv(pending, 16), 3) == b""


async def test_publish_to_a_dollar_topic_is_acknowledged_and_dropped(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    # amqtt alone stops serving such a client but leaves its socket open and session connected;
    # MQTT reserves $ topics for the server without making the PUBLISH a protocol error.
    watcher = await new_client().connect()
    await watcher.subscribe("$SYS/#")
    device = await new_client("bad-1").connect()
    sent = device.paho.publish("$SYS/hack", b"x", qos=1)
    await async_wait_for(sent.is_published, what="PUBACK of the $ topic")
    device.publish("dev/bad-1/after", b"y", qos=1)

    await async_wait_for(lambda: recorder.on("dev/bad-1/after"), what="the next message")
    assert recorder.on("$SYS/hack") == [] and watcher.received == []
    assert broker.refused["dollar_topic"] == 1
    assert device.paho.is_connected()


async def test_publish_to_an_empty_topic_closes_the_connection_with_its_will(
    broker: EmbeddedBroker, recorder: Recorder
) -> None:
    # [MQTT-4.7.3-1]: a protocol error. amqtt alone stops serving such a client but leaves its
    # socket open and session connected. (paho refuses to send such a PUBLISH: a raw socket
    # does.)
    will = struct.pack("!H", 14) + b"dev/bad-2/conn" + struct.pack("!H", 4) + b"lost"
    body = b"\x00\x04MQTT\x04\x0e\x00\x3c" + struct.pack("!H", 5) + b"bad-2" + will
    topic = b""
    publish = bytes([0x32, 2 + len(topic) + 2 + 1]) + struct.pack("!H", len(topic)) + topic
    publish += b"\x00\x01x"
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", broker.port)) as sock:
        sock.setblocking(False)
        await loop.sock_sendall(sock, bytes([0x10, len(body)]) + body)
        assert await asyncio.wait_for(loop.sock_recv(sock, 4), 3) == b"\x20\x02\x00\x00"
        await loop.sock_sendall(sock, publish)
        assert await asyncio.wait_for(loop.sock_recv(sock, 16), 3) == b""  # closed, no PUBACK

    await async_wait_for(lambda: recorder.gone, what="disconnect reported")
    assert recorder.on("dev/bad-2/conn") == [Seen("dev/bad-2/conn", b"lost", 1, False, "bad-2")]
    assert [m.topic for m in recorder.messages] == ["dev/bad-2/conn"]
    assert broker.connected_clients() == []


async def test_refused_client_is_not_left_connected(
    recorder: Recorder, clients: list[Client]
) -> None:
    broker = EmbeddedBroker(
        "127.0.0.1", 0, allow_anonymous=False,
        on_message=recorder.on_message, on_client_disconnected=recorder.on_client_disconnected,
    )
    await broker.start()
    try:
        anonymous = Client(broker.port, "anon")
        clients.append(anonymous)
        anonymous.paho.will_set("dev/anon/conn", b"lost")
        refused: list[object] = []
        anonymous.paho.on_connect = lambda _c, _u, _f, rc, _p: refused.append(rc)
        anonymous.start()
        await async_wait_for(lambda: refused, what="CONNACK")
        assert str(refused[0]) == "Not authorized"
        named = Client(broker.port, "named")
        clients.append(named)
        named.paho.username_pw_set("bob")
        await named.connect()
        # amqtt alone would list "anon" as connected, forever.
        await async_wait_for(lambda: broker.connected_clients() == ["named"], what="only bob")
        assert recorder.messages == [] and recorder.gone == []
    finally:
        await broker.stop()


async def test_puback_waits_while_the_hub_holds_it(
    broker: EmbeddedBroker, new_client: Any
) -> None:
    # amqtt acknowledged a QoS 1 PUBLISH on receipt, before the hub had acted on it. The hub
    # holds a PUBACK by returning True; send_acks releases it (after its store flush).
    held_counts: list[int] = []

    def hold_keep(topic: str, payload: bytes, qos: int, retain: bool, client_id: str | None) -> bool:
        return topic.startswith("keep/")

    broker.on_message = hold_keep
    broker.on_ack_held = held_counts.append
    device = await new_client().connect()
    kept = [device.paho.publish(f"keep/{n}", b"x", qos=1) for n in range(3)]
    passed = device.paho.publish("pass/0", b"x", qos=1)

    await async_wait_for(passed.is_published, what="PUBACK of a message the hub does not hold")
    assert held_counts == [1, 2, 3]
    assert not any(info.is_published() for info in kept)
    broker.send_acks(broker.take_held_acks())
    await async_wait_for(lambda: all(info.is_published() for info in kept), what="held PUBACKs")
    assert broker.take_held_acks() == []


async def test_a_stopping_hub_takes_no_more_messages_and_acknowledges_none(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    # Taken after the hub's last flush, a message would be acted on but never acknowledged:
    # its client would send it again to the next hub, a duplicate.
    device = await new_client().connect()
    await device.subscribe("x/#")
    broker.stop_taking_messages()
    sent = device.paho.publish("x/1", b"late", qos=1)
    # its own copy comes back on the same socket after any PUBACK would have
    await async_wait_for(lambda: device.got("x/1"), what="the message back at its sender")
    assert not sent.is_published()
    assert recorder.messages == []


async def test_delivery_qos_is_the_lower_of_publish_and_subscription(
    broker: EmbeddedBroker, recorder: Recorder, new_client: Any
) -> None:
    # amqtt delivered at the subscription's QoS: a QoS 0 heartbeat reached a QoS 1 watcher as
    # QoS 1, a PUBACK round trip per heartbeat. MQTT says min(publish, subscription).
    watcher = await new_client().connect()
    await watcher.subscribe("hb/#", qos=1)
    low = await new_client().connect()
    await low.subscribe("hb/#", qos=0)
    device = await new_client().connect()
    device.publish("hb/x", b"1", qos=0)
    device.publish("hb/y", b"2", qos=1)
    await async_wait_for(lambda: len(watcher.received) == 2 and len(low.received) == 2,
                         what="both messages at both subscribers")
    assert watcher.received == [("hb/x", b"1", 0, False), ("hb/y", b"2", 1, False)]
    assert low.received == [("hb/x", b"1", 0, False), ("hb/y", b"2", 0, False)]
    assert [m.qos for m in recorder.messages] == [0, 1]  # the hub sees the publish QoS
    await broker.publish("hb/hub", b"3", qos=1)  # the hub's own messages follow the same rule
    await async_wait_for(lambda: len(low.received) == 3, what="the hub's message")
    assert low.received[2] == ("hb/hub", b"3", 0, False)


async def test_persistent_session_gets_what_was_published_while_it_was_away(
    broker: EmbeddedBroker, new_client: Any
) -> None:
    # amqtt forgot an anonymous client's persistent session the moment it disconnected, and
    # without accounts every client is anonymous: nothing was queued, and the session was not
    # present on return. MQTT queues QoS 1 and 2 for a persistent session [MQTT-3.1.2-5].
    sub = new_client("offline-sub", clean_session=False)
    await sub.connect()
    await sub.subscribe("queued/#", qos=1)
    await sub.disconnect()
    await async_wait_for(lambda: broker.connected_clients() == [], what="subscriber gone")

    await broker.publish("queued/q0", b"zero", qos=0)  # QoS 0 is not queued (nor by Mosquitto)
    await broker.publish("queued/q1", b"one", qos=1)

    again = new_client("offline-sub", clean_session=False)
    present: list[bool] = []
    again.paho.on_connect = lambda _c, _u, flags, _rc, _p: present.append(flags.session_present)
    await again.connect()
    await again.subscribe("marker")
    await broker.publish("marker", b"m", qos=1)
    await async_wait_for(lambda: again.got("marker"), what="marker")
    assert again.received == [("queued/q1", b"one", 1, False), ("marker", b"m", 1, False)]
    assert present == [True]


async def test_what_is_queued_for_a_session_away_is_bounded(
    recorder: Recorder, clients: list[Client]
) -> None:
    broker = EmbeddedBroker("127.0.0.1", 0, limits=DeliveryLimits(max_queued=3))
    await broker.start()
    try:
        sub = Client(broker.port, "away", clean_session=False)
        clients.append(sub)
        await sub.connect()
        await sub.subscribe("queued/#", qos=1)
        await sub.disconnect()
        await async_wait_for(lambda: broker.connected_clients() == [], what="subscriber gone")
        for n in range(5):
            await broker.publish("queued/x", b"%d" % n, qos=1)

        again = Client(broker.port, "away", clean_session=False)
        clients.append(again)
        await again.connect()
        await again.subscribe("marker")
        await broker.publish("marker", b"m", qos=1)
        await async_wait_for(lambda: again.got("marker"), what="marker")
        assert [m[1] for m in again.got("queued/x")] == [b"0", b"1", b"2"]
    finally:
        await broker.stop()


async def _read_packet(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[int, bytes]:
    """One MQTT packet: (first byte, body)."""

    async def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(data)), 3)
            assert chunk, "connection closed"
            data += chunk
        return data

    first = (await exactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await exactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return first, await exactly(length)


async def test_unacknowledged_messages_are_sent_again_when_a_persistent_session_returns(
    broker: EmbeddedBroker,
) -> None:
    # amqtt gave up on an outgoing QoS 1 message after 5 s without a PUBACK and never sent it
    # again; MQTT sends it again, DUP set, when the session reconnects [MQTT-4.4.0-1].
    loop = asyncio.get_running_loop()
    connect = b"\x10\x0f\x00\x04MQTT\x04\x00\x00\x3c" + struct.pack("!H", 3) + b"red"

    with socket.create_connection(("127.0.0.1", broker.port)) as first:
        first.setblocking(False)
        await loop.sock_sendall(first, connect)
        assert await _read_packet(loop, first) == (0x20, b"\x00\x00")
        await loop.sock_sendall(first, b"\x82\x08\x00\x01" + struct.pack("!H", 3) + b"r/#\x01")
        assert await _read_packet(loop, first) == (0x90, b"\x00\x01\x01")
        await broker.publish("r/x", b"payload", qos=1)
        kind, body = await _read_packet(loop, first)
        assert kind == 0x32 and body.endswith(b"payload")  # QoS 1, not acknowledged: we go
        packet_id = body[5:7]

    await async_wait_for(lambda: broker.connected_clients() == [], what="first connection gone")
    with socket.create_connection(("127.0.0.1", broker.port)) as second:
        second.setblocking(False)
        await loop.sock_sendall(second, connect)
        assert await _read_packet(loop, second) == (0x20, b"\x01\x00")  # session present
        assert await _read_packet(loop, second) == (0x3A, body)  # the same PUBLISH, DUP set
        await loop.sock_sendall(second, b"\x40\x02" + packet_id)
        await broker.publish("r/y", b"next", qos=0)
        assert await _read_packet(loop, second) == (0x30, struct.pack("!H", 3) + b"r/ynext")


async def test_qos2_delivery_completes_its_four_packet_exchange(
    broker: EmbeddedBroker, new_client: Any
) -> None:
    watcher = await new_client().connect()
    await watcher.subscribe("q2/#", qos=2)
    sender = await new_client().connect()
    for n in range(3):
        sender.publish(f"q2/{n}", b"exactly once", qos=2)
    await async_wait_for(lambda: len(watcher.received) == 3, what="three QoS 2 messages")
    assert {m[2] for m in watcher.received} == {2}
    amqtt_broker = broker._broker
    assert amqtt_broker is not None
    session = amqtt_broker.sessions[watcher.client_id][0]
    await async_wait_for(lambda: session.hub_outbox.settled, what="PUBCOMP for each")


def test_a_full_outbox_drops_qos0_first_and_its_window_bounds_what_is_in_flight() -> None:
    box = Outbox(DeliveryLimits(max_queued=3, max_inflight=2))

    def message(payload: bytes, qos: int) -> Message:
        return Message(b"t", payload, qos, False)

    for payload, qos in ((b"0", 0), (b"1", 1), (b"2", 0)):
        assert box.offer(message(payload, qos))
    assert box.offer(message(b"3", 1))  # full: the oldest QoS 0 ("0") makes room
    assert not box.offer(message(b"4", 0))  # full: a QoS 0 message is dropped itself
    assert box.offer(message(b"5", 1))  # "2" makes room
    assert not box.offer(message(b"6", 1))  # only QoS 1 left: the new one is dropped
    assert box.dropped == 4 and box.queued == 3

    first, second = box.take(), box.take()
    assert first is not None and second is not None
    assert (first.data, first.packet_id, second.data, second.packet_id) == (b"1", 1, b"3", 2)
    assert box.take() is None  # two in flight: the window is full
    assert box.acknowledged(1) and not box.acknowledged(1)
    third = box.take()
    assert third is not None and (third.data, third.packet_id) == (b"5", 3)
    assert [m.data for m in box.unacknowledged()] == [b"3", b"5"]
    assert box.acknowledged(2) and box.acknowledged(3) and box.settled


def test_a_released_qos2_message_is_sent_again_as_pubrel() -> None:
    box = Outbox(DeliveryLimits())
    sent = Message(b"a/b", b"x", 2, True)
    assert box.admit(sent)
    assert sent.encode() == b"\x35\x08\x00\x03a/b\x00\x01x"
    sent.sent = True
    assert sent.encode() == b"\x3d\x08\x00\x03a/b\x00\x01x"  # again: DUP set
    assert box.received(1) is sent
    assert sent.encode() == b"\x62\x02\x00\x01"  # PUBREL from now on
    assert box.acknowledged(1) and box.settled


# ---------------------------------------------------------------------------------------------
# The scale work of issue #6 (indexes, light sessions, session monitor): same behaviour


def _raw_connect(port: int, flags: int, client_id: bytes, level: int = 4, extra: bytes = b"") -> int:
    """Send a hand-made CONNECT; return the CONNACK return code."""
    body = b"\x00\x04MQTT" + bytes([level, flags]) + b"\x00\x3c"
    body += struct.pack("!H", len(client_id)) + client_id + extra
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        ack = b""
        while len(ack) < 4:
            chunk = sock.recv(4 - len(ack))
            if not chunk:
                break
            ack += chunk
    assert ack[:2] == b"\x20\x02", ack
    return ack[3]


async def test_connect_refusals_are_amqtts(broker: EmbeddedBroker) -> None:
    # The CONNECT is read by hub/broker_session.read_connect, not amqtt: same answers.
    assert await asyncio.to_thread(_raw_connect, broker.port, 0x02, b"lv3", level=3) == 1
    password_only = struct.pack("!H", 2) + b"pw"
    assert await asyncio.to_thread(_raw_connect, broker.port, 0x42, b"pw", extra=password_only) == 4
    assert await asyncio.to_thread(_raw_connect, broker.port, 0x00, b"") == 2  # persistent, no id
    assert await asyncio.to_thread(_raw_connect, broker.port, 0x02, b"fine") == 0


async def test_ended_clean_session_is_forgotten_and_its_filters_with_it(
    broker: EmbeddedBroker, new_client: Any
) -> None:
    amqtt_broker = broker._broker
    assert amqtt_broker is not None
    c = await new_client("short-lived").connect()
    await c.subscribe("only/mine/+")
    assert "only/mine/+" in amqtt_broker.subscriptions
    c.kill()
    await async_wait_for(lambda: "short-lived" not in amqtt_broker.sessions,
                         what="session dropped by the monitor")
    assert "only/mine/+" not in amqtt_broker.subscriptions
    assert amqtt_broker.subscriptions.matching("only/mine/x") == []


async def test_resumed_persistent_session_gets_retained_for_its_own_filters(
    broker: EmbeddedBroker, new_client: Any
) -> None:
    # On connect only the session's own filters are offered retained messages (amqtt walks
    # everyone's); a taken-over persistent session keeps its subscription and gets them again.
    await broker.publish("keep/a", b"A", qos=1, retain=True)
    await broker.publish("other/b", b"B", qos=1, retain=True)
    other = await new_client().connect()
    await other.subscribe("other/+")
    old = new_client("panel-9", clean_session=False)
    await old.connect()
    await old.subscribe("keep/+", qos=1)
    await async_wait_for(lambda: old.got("keep/a"), what="retained on subscribe")
    old.go_silent()

    new = new_client("panel-9", clean_session=False)
    await new.connect()
    await async_wait_for(lambda: new.got("keep/a"), what="retained on resume")
    assert new.received == [("keep/a", b"A", 1, True)]


async def test_hub_delivery_uses_the_index_and_reaches_every_matching_filter(
    broker: EmbeddedBroker, new_client: Any
) -> None:
    subs = {f: await new_client().connect() for f in ("u/x/+", "u/#", "#", "u/x/state", "u/y/+")}
    for f, c in subs.items():
        await c.subscribe(f)
    await broker.publish("u/x/state", b"s", qos=1)
    for f in ("u/x/+", "u/#", "#", "u/x/state"):
        await async_wait_for(lambda f=f: subs[f].received, what=f"delivery for {f}")
        assert subs[f].received == [("u/x/state", b"s", 1, False)]
    await broker.publish("u/y/m", b"m", qos=1)
    await async_wait_for(lambda: subs["u/y/+"].received, what="marker")
    assert subs["u/y/+"].received == [("u/y/m", b"m", 1, False)]  # nothing of u/x before it
