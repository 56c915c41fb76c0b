"""AsyncioPahoLoop against a real Mosquitto: paho driven from the event loop, no paho thread.

The other side of each exchange is an ordinary threaded paho client (tests.support), so what
is checked is what a broker and a second client see, not what the driver believes.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from hub.paho_loop import AsyncioPahoLoop, _BufferedSocket, jittered_backoff
from tests.support.mqtt_clients import MqttClient
from tests.support.procs import MosquittoProcess, free_port
from tests.support.wait import async_wait_for


def fast_backoff(failures: int) -> float:
    """Short retries keep the reconnect tests quick (the real one starts at 0.25-0.5 s)."""
    return 0.05


_live: list[AsyncioPahoLoop] = []


@pytest.fixture(autouse=True)
async def _stop_drivers() -> AsyncIterator[None]:
    """A failed test still closes its clients' sockets while the loop is alive."""
    yield
    while _live:
        await _live.pop().stop()


class Driven:
    """A paho client on an :class:`AsyncioPahoLoop`, recording what reaches its callbacks."""

    def __init__(
        self,
        port: int,
        *,
        client_id: str = "driven",
        subscribe: str | None = None,
        manual_ack: bool = False,
        clean_session: bool = True,
        will: str | None = None,
        keepalive: int = 30,
        backoff: Callable[[int], float] = fast_backoff,
        ca_file: str | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
            protocol=paho.MQTTv311, manual_ack=manual_ack,
        )
        self.client.max_queued_messages_set(0)
        if ca_file is not None:
            self.client.tls_set(ca_certs=ca_file)
        if will is not None:
            self.client.will_set(will, b"gone", qos=1, retain=False)
        self.subscribe = subscribe
        self.messages: list[tuple[str, bytes, int, int]] = []  # topic, payload, qos, mid
        self.connects = 0
        self.disconnects = 0
        self.subacks = 0
        self.acked: list[int] = []
        self.threads: set[int] = set()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.driver = AsyncioPahoLoop(
            self.client, self.loop, host="127.0.0.1", port=port, keepalive=keepalive,
            backoff=backoff,
        )
        _live.append(self.driver)

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        self.threads.add(threading.get_ident())
        self.connects += 1
        if self.subscribe is not None:
            client.subscribe(self.subscribe, qos=1)

    def _on_disconnect(self, *_: Any) -> None:
        self.threads.add(threading.get_ident())
        self.disconnects += 1

    def _on_subscribe(self, *_: Any) -> None:
        self.subacks += 1

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, *_: Any) -> None:
        self.acked.append(mid)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self.threads.add(threading.get_ident())
        self.messages.append((msg.topic, bytes(msg.payload), msg.qos, msg.mid))

    def payloads(self, topic: str) -> list[bytes]:
        return [m[1] for m in self.messages if m[0] == topic]

    async def ready(self, subacks: int = 1) -> None:
        await async_wait_for(lambda: self.subacks >= subacks, what="SUBACK of the driven client")


class Sender:
    """A paho client on ``loop_start``: only its network thread writes, so order is kept.

    (tests.support's MqttClient loops on a thread of its own without telling paho, so a
    ``publish`` from another thread writes to the socket concurrently with that thread and
    can reorder packets: seen here as a QoS 0 overtaking a 1 MiB QoS 1.)
    """

    def __init__(self, port: int) -> None:
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sender-{port}")
        self.paho.max_queued_messages_set(0)
        self.paho.connect("127.0.0.1", port)
        self.paho.loop_start()

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
async def other(mosquitto: MosquittoProcess) -> AsyncIterator[MqttClient]:
    """An ordinary threaded paho client on the same broker (it receives; it sends markers)."""
    client = MqttClient(mosquitto.host, mosquitto.port).connect()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def sender(mosquitto: MosquittoProcess) -> AsyncIterator[Sender]:
    client = await asyncio.to_thread(Sender, mosquitto.port)
    try:
        yield client
    finally:
        await asyncio.to_thread(client.close)


def seq(n: int) -> list[bytes]:
    return [f"m{i:05d}".encode() for i in range(n)]


async def test_receives_in_order_on_the_loop_thread(
    mosquitto: MosquittoProcess, sender: Sender
) -> None:
    d = Driven(mosquitto.port, subscribe="t/#")
    await d.driver.start()
    await d.ready()
    assert d.driver.connected
    assert isinstance(d.client.socket(), _BufferedSocket)
    for i, payload in enumerate(seq(3000)):
        sender.paho.publish(f"t/q{i % 2}", payload, qos=i % 2)
    await async_wait_for(lambda: len(d.messages) >= 3000, what="3000 messages", timeout=10)
    # order holds per QoS (the sender's in-flight window may hold QoS 1 back behind QoS 0)
    assert d.payloads("t/q0") == seq(3000)[0::2]
    assert d.payloads("t/q1") == seq(3000)[1::2]
    assert {m[2] for m in d.messages} == {0, 1}
    assert d.threads == {threading.get_ident()}  # paho's callbacks run on the loop thread
    assert not [t for t in threading.enumerate() if t.name.endswith("-driven")]  # no loop_start
    await d.driver.stop()


async def test_large_message_spans_many_reads(
    mosquitto: MosquittoProcess, sender: Sender
) -> None:
    d = Driven(mosquitto.port, subscribe="big")
    await d.driver.start()
    await d.ready()
    big = bytes(range(256)) * 4096  # 1 MiB: many 64 KiB reads for one packet
    sender.paho.publish("big", big, qos=1)
    sender.paho.publish("big", b"after", qos=1)
    await async_wait_for(lambda: len(d.messages) >= 2, what="the big message and the next")
    assert d.payloads("big") == [big, b"after"]
    await d.driver.stop()


async def test_publishes_qos0_and_qos1_from_the_loop(
    mosquitto: MosquittoProcess, other: MqttClient
) -> None:
    await asyncio.to_thread(other.subscribe, "p/#", 1)
    d = Driven(mosquitto.port)
    await d.driver.start()
    await async_wait_for(lambda: d.driver.connected, what="CONNACK")
    infos = [d.client.publish("p/q1", p, qos=1) for p in seq(500)]  # 25 windows of 20
    for p in seq(500):
        d.client.publish("p/q0", p, qos=0)
    await async_wait_for(lambda: all(i.is_published() for i in infos), what="500 PUBACKs",
                         timeout=10)
    await async_wait_for(lambda: len(other.got("p/q0")) >= 500, what="QoS 0 at the other side")
    await async_wait_for(lambda: len(other.got("p/q1")) >= 500, what="QoS 1 at the other side")
    assert other.got("p/q1") == seq(500)
    assert other.got("p/q0") == seq(500)
    await d.driver.stop()


async def test_reconnects_after_broker_restart(mosquitto: MosquittoProcess) -> None:
    d = Driven(mosquitto.port, subscribe="r/#")
    await d.driver.start()
    await d.ready()
    assert d.connects == 1
    await asyncio.to_thread(mosquitto.restart)
    await async_wait_for(lambda: d.disconnects >= 1, what="on_disconnect after the restart")
    await async_wait_for(lambda: d.connects >= 2, what="on_connect again", timeout=10)
    await d.ready(subacks=2)  # on_connect subscribed again
    other = await asyncio.to_thread(lambda: MqttClient(mosquitto.host, mosquitto.port).connect())
    try:
        other.paho.publish("r/x", b"after restart", qos=1)
        await async_wait_for(lambda: d.payloads("r/x") == [b"after restart"],
                             what="a message after the restart")
    finally:
        other.close()
    assert d.driver.failures == 0  # reset by the new CONNACK
    await d.driver.stop()


async def test_keeps_retrying_until_the_broker_comes_up(
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    broker = mosquitto_factory(start=False)
    d = Driven(broker.port, subscribe="late/#")
    await d.driver.start()  # refused: returns, retries in the background
    assert not d.driver.connected
    await async_wait_for(lambda: d.driver.failures >= 2, what="two failed attempts")
    await asyncio.to_thread(broker.start)
    await async_wait_for(lambda: d.connects == 1, what="on_connect once the broker is up",
                         timeout=10)
    await d.ready()
    assert d.driver.failures == 0
    await d.driver.stop()


async def test_stop_sends_disconnect_and_unregisters(
    mosquitto: MosquittoProcess, other: MqttClient
) -> None:
    await asyncio.to_thread(other.subscribe, "will/#", 1)
    d = Driven(mosquitto.port, client_id="leaver", will="will/leaver")
    await d.driver.start()
    await async_wait_for(lambda: d.driver.connected, what="CONNACK")
    sock = d.client.socket()
    assert sock is not None
    fd = sock.fileno()
    d.client.publish("will/last", b"queued just before stop", qos=1)
    await d.driver.stop()
    assert not d.driver.registered
    loop = asyncio.get_running_loop()
    assert not loop.remove_reader(fd), "reader still registered after stop()"
    assert not loop.remove_writer(fd), "writer still registered after stop()"
    await async_wait_for(lambda: "Client leaver disconnected." in mosquitto.log_text(),
                         what="Mosquitto logging a clean DISCONNECT of 'leaver'")
    # anything Mosquitto published for 'leaver' is before this marker on the other's socket
    other.paho.publish("will/marker", b"m", qos=1)
    await async_wait_for(lambda: other.got("will/marker"), what="the marker")
    assert other.got("will/leaver") == [], "the will was published: no clean DISCONNECT"
    assert other.got("will/last") == [b"queued just before stop"]
    assert d.disconnects == 1
    await asyncio.sleep(0)  # a reconnect would be scheduled at once; there must be none
    assert d.driver._retry is None and d.driver._connecting is None


async def test_manual_acks_from_the_loop(
    mosquitto: MosquittoProcess, sender: Sender
) -> None:
    d = Driven(mosquitto.port, client_id="acker", subscribe="q/#", manual_ack=True,
               clean_session=False)
    await d.driver.start()
    await d.ready()
    for p in seq(60):  # three times Mosquitto's in-flight window of 20
        sender.paho.publish("q/a", p, qos=1)
    # without acks the broker stops at 20 in flight; ack each batch from a loop callback
    acked = 0

    def ack_all() -> bool:
        nonlocal acked
        for _t, _p, _q, mid in d.messages[acked:]:
            d.client.ack(mid, 1)
        acked = len(d.messages)
        return acked >= 60

    await async_wait_for(ack_all, what="60 messages, acked as they come", timeout=10)
    assert d.payloads("q/a") == seq(60)
    await d.driver.stop()
    # the same persistent session again: nothing may be redelivered (all were acked)
    again = Driven(mosquitto.port, client_id="acker", subscribe="q/#", manual_ack=True,
                   clean_session=False)
    await again.driver.start()
    await again.ready()
    sender.paho.publish("q/marker", b"end", qos=1)
    await async_wait_for(lambda: again.payloads("q/marker"), what="the marker")
    assert again.payloads("q/a") == []
    await again.driver.stop()


async def test_unacked_messages_are_redelivered(
    mosquitto: MosquittoProcess, sender: Sender
) -> None:
    """The converse: manual acks really are manual (what the hub's SIGKILL safety relies on)."""
    d = Driven(mosquitto.port, client_id="forgetful", subscribe="u/#", manual_ack=True,
               clean_session=False)
    await d.driver.start()
    await d.ready()
    sender.paho.publish("u/a", b"one", qos=1)
    await async_wait_for(lambda: d.payloads("u/a") == [b"one"], what="the message")
    await d.driver.stop()
    again = Driven(mosquitto.port, client_id="forgetful", manual_ack=True, clean_session=False)
    await again.driver.start()
    await async_wait_for(lambda: again.payloads("u/a") == [b"one"], what="redelivery")
    await again.driver.stop()


async def test_keepalive_pings_keep_the_link(mosquitto: MosquittoProcess) -> None:
    d = Driven(mosquitto.port, keepalive=1)
    pongs: list[str] = []
    d.client.on_log = lambda _c, _u, _level, text: (
        pongs.append(text) if text.startswith("Received PINGRESP") else None
    )
    await d.driver.start()
    await async_wait_for(lambda: d.driver.connected, what="CONNACK")
    # Mosquitto drops a client silent for 1.5 x keepalive; loop_misc's PINGREQs prevent it
    await async_wait_for(lambda: len(pongs) >= 2, what="two PINGRESPs", timeout=5)
    assert d.disconnects == 0 and d.connects == 1
    await d.driver.stop()


async def test_tls(mosquitto_factory: Callable[..., MosquittoProcess], tmp_path: Any) -> None:
    """Through TLS the wrapper reads SSL records (and SSL's own "want read") the same way."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    from tests.test_agent import make_certs

    certs = await asyncio.to_thread(make_certs, tmp_path / "certs")
    tls_port = free_port()
    broker = await asyncio.to_thread(
        mosquitto_factory,
        f"listener {tls_port} 127.0.0.1\ncertfile {certs['cert']}\nkeyfile {certs['key']}\n",
    )
    await async_wait_for(lambda: f"port {tls_port}" in broker.log_text(), what="TLS listener")
    other = await asyncio.to_thread(lambda: MqttClient(broker.host, broker.port).connect())
    send = await asyncio.to_thread(Sender, broker.port)
    try:
        await asyncio.to_thread(other.subscribe, "back/#", 1)
        d = Driven(tls_port, subscribe="s/#", ca_file=str(certs["ca"]))
        await d.driver.start()
        await d.ready()
        big = bytes(range(256)) * 2048
        for p in seq(2000):
            send.paho.publish("s/a", p, qos=0)
        send.paho.publish("s/big", big, qos=1)
        await async_wait_for(lambda: len(d.messages) >= 2001, what="2001 messages over TLS",
                             timeout=10)
        assert d.payloads("s/a") == seq(2000) and d.payloads("s/big") == [big]
        infos = [d.client.publish("back/x", p, qos=1) for p in seq(200)]
        await async_wait_for(lambda: all(i.is_published() for i in infos), what="PUBACKs")
        await async_wait_for(lambda: len(other.got("back/x")) >= 200, what="the other side")
        assert other.got("back/x") == seq(200)
        await d.driver.stop()
        assert not d.driver.registered
    finally:
        await asyncio.to_thread(send.close)
        other.close()


def test_buffered_socket_serves_small_reads_from_one_recv() -> None:
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        wrapped = _BufferedSocket(b)
        a.sendall(b"\x30\x05hello\x30\x03abc")
        assert wrapped.recv(1) == b"\x30"
        assert wrapped.buffered == 11
        assert [wrapped.recv(1), wrapped.recv(5), wrapped.recv(1)] == [b"\x05", b"hello", b"\x30"]
        assert wrapped.recv(10) == b"\x03abc"  # only what is buffered; no second recv
        with pytest.raises(BlockingIOError):
            wrapped.recv(1)
        assert wrapped.send(b"x" * 10) == 10 and wrapped.out == b"x" * 10
        assert wrapped.flush() is False and a.recv(100) == b"x" * 10
        a.close()
        assert wrapped.recv(1) == b""  # EOF reaches paho as EOF
    finally:
        a.close()
        b.close()


def test_backoff_grows_with_jitter_and_caps() -> None:
    delays = [jittered_backoff(n) for n in range(12)]
    assert 0.25 <= delays[0] <= 0.5
    assert 4.0 <= delays[4] <= 8.0
    assert all(15.0 <= d <= 30.0 for d in delays[7:])
    assert len({jittered_backoff(3) for _ in range(20)}) > 1  # jitter
