"""The hub's own MQTT client (hub.mqtt.client) against a real Mosquitto.

The other side of each exchange is an ordinary threaded paho client, so what is checked is
what a broker and a second client see, not what our client believes. The parser is also fed
the same bytes cut at every possible place (hypothesis), since a TCP read can end anywhere.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from hub.mqtt.client import (
    PUBACK,
    HubMqttClient,
    Received,
    Will,
    _Connection,
    encode_ack,
    encode_publish,
    jittered_backoff,
)
from tests.support.mqtt_clients import MqttClient
from tests.support.procs import MosquittoProcess, free_port
from tests.support.wait import async_wait_for


def fast_backoff(failures: int) -> float:
    """Short retries keep the reconnect tests quick (the hub's starts at 0.25-0.5 s)."""
    return 0.05


_live: list[HubMqttClient] = []


@pytest.fixture(autouse=True)
async def _stop_clients() -> AsyncIterator[None]:
    """A failed test still closes its clients' sockets while the loop is alive."""
    yield
    while _live:
        await _live.pop().stop(linger_s=0.5)


class Recorder:
    """A :class:`HubMqttClient` with its callbacks recorded."""

    def __init__(self, port: int, *, client_id: str = "ours", subscribe: str | None = None,
                 clean_session: bool = True, keepalive: int = 30, will: Will | None = None,
                 max_packet_bytes: int = 16 * 1024 * 1024, ca_file: str | None = None,
                 auto_ack: bool = True) -> None:
        import ssl

        context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.messages: list[Received] = []
        self.batches = 0
        self.connects: list[bool] = []
        self.disconnects: list[str] = []
        self.oversize: list[tuple[str, int]] = []
        self.auto_ack = auto_ack
        self.client = HubMqttClient(
            "127.0.0.1", port, client_id=client_id, clean_session=clean_session,
            keepalive=keepalive, will=will, ssl_context=context,
            subscriptions=[(subscribe, 1)] if subscribe else [],
            on_messages=self._on_messages, on_connect=self.connects.append,
            on_disconnect=self.disconnects.append,
            on_oversize=lambda t, size, _m, _q: self.oversize.append((t, size)),
            max_packet_bytes=max_packet_bytes, backoff=fast_backoff)
        _live.append(self.client)

    def _on_messages(self, batch: list[Received]) -> None:
        self.batches += 1
        self.messages.extend(batch)
        if self.auto_ack:
            for _t, _p, mid, qos in batch:
                if qos:
                    self.client.ack(mid, qos, self.client.generation)

    def payloads(self, topic: str) -> list[bytes]:
        return [m[1] for m in self.messages if m[0] == topic]

    async def up(self, connects: int = 1) -> None:
        await self.client.start()
        await async_wait_for(lambda: len(self.connects) >= connects and self.client.connected,
                             what="CONNACK of our client", timeout=10)

    async def subscribed(self, port: int, topic: str) -> None:
        """Wait until our subscription is live: a message published after it arrives."""
        probe = await asyncio.to_thread(Sender, port)
        try:
            await async_wait_for(lambda: _probe(probe, topic, self), what="the subscription",
                                 timeout=10)
        finally:
            await asyncio.to_thread(probe.close)
        self.messages.clear()


def _probe(probe: Sender, topic: str, rec: Recorder) -> bool:
    probe.paho.publish(topic, b"probe", qos=0)
    return any(m[1] == b"probe" for m in rec.messages)


class Sender:
    """A paho client on ``loop_start``: only its network thread writes, so order is kept."""

    def __init__(self, port: int) -> None:
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sender-{port}-{id(self)}")
        self.paho.max_queued_messages_set(0)
        self.paho.connect("127.0.0.1", port)
        self.paho.loop_start()

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


@pytest.fixture
async def other(mosquitto: MosquittoProcess) -> AsyncIterator[MqttClient]:
    client = await asyncio.to_thread(lambda: MqttClient(mosquitto.host, mosquitto.port).connect())
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


async def _gone(broker: MosquittoProcess, client_id: str) -> None:
    """Wait until the broker has read a client's last packets: a new connection with the same
    id that came first would take the session over and void the acks still unread."""
    await async_wait_for(lambda: f"Client {client_id} disconnected." in broker.log_text(),
                         what=f"Mosquitto logging the DISCONNECT of {client_id!r}")


def seq(n: int) -> list[bytes]:
    return [f"m{i:05d}".encode() for i in range(n)]


# ---------------------------------------------------------------------------- the parser


def _feed(chunks: list[bytes], max_packet: int = 1 << 20) -> tuple[list[Received], list[Any]]:
    """Run the parser of a client that is never started over ``chunks``."""
    got: list[Received] = []
    big: list[Any] = []

    async def run() -> None:
        c = HubMqttClient("127.0.0.1", 1, client_id="x", on_messages=got.extend,
                          on_oversize=lambda *a: big.append(a), max_packet_bytes=max_packet)
        conn = _Connection(c)
        for chunk in chunks:
            conn.data_received(chunk)
        assert not conn.lost.done(), conn.lost.result()

    asyncio.run(run())
    return got, big


STREAM = (
    encode_publish("a/b", b"x" * 200, 1, False, 7)  # two-byte remaining length
    + encode_publish("presence/devices/u/d/hb", b"{}", 0)
    + encode_ack(PUBACK, 3)
    + b"\xd0\x00"  # PINGRESP
    + encode_publish("big", b"B" * 5000, 1, True, 9)  # oversized at max_packet=1000
    + encode_publish("\u00e9t\u00e9", b"", 0)
    + encode_publish("after", b"z" * 20000, 0)  # three-byte remaining length, under the cap
)


def _cut(cuts: list[int]) -> list[bytes]:
    """:data:`STREAM` in pieces, as TCP reads might return it."""
    return [STREAM[a:b] for a, b in itertools.pairwise(sorted({0, *cuts, len(STREAM)}))]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_parser_does_not_care_where_reads_end(cuts: list[int]) -> None:
    got, big = _feed(_cut(cuts), max_packet=30_000)
    assert [(t, len(p), mid, q) for t, p, mid, q in got] == [
        ("a/b", 200, 7, 1), ("presence/devices/u/d/hb", 2, 0, 0), ("big", 5000, 9, 1),
        ("\u00e9t\u00e9", 0, 0, 0), ("after", 20000, 0, 0)]
    assert big == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_oversized_packet_is_skipped_not_buffered(cuts: list[int]) -> None:
    got, big = _feed(_cut(cuts), max_packet=1000)
    assert [t for t, *_ in got] == ["a/b", "presence/devices/u/d/hb", "\u00e9t\u00e9"]
    # "after" (20 kB) is over the cap too; "big" is reported with its payload size and qos
    assert [(a[0], a[1], a[3]) for a in big] == [("big", 5000, 1), ("after", 20000, 0)]


def test_malformed_stream_drops_the_link_not_the_hub() -> None:
    async def run(data: bytes) -> str:
        c = HubMqttClient("127.0.0.1", 1, client_id="x", on_messages=lambda b: None)
        conn = _Connection(c)
        conn.data_received(data)
        return conn.lost.result() if conn.lost.done() else ""

    assert "protocol error" in asyncio.run(run(b"\x30\x01\x00"))  # topic length cut short
    assert "protocol error" in asyncio.run(run(b"\xf0\x00"))  # reserved packet type
    assert "protocol error" in asyncio.run(run(b"\x40\x00"))  # PUBACK without a packet id
    assert "protocol error" in asyncio.run(run(b"\x30\xff\xff\xff\xff\x01"))  # 5-byte length


def test_backoff_grows_with_jitter_and_caps() -> None:
    delays = [jittered_backoff(n) for n in range(12)]
    assert 0.25 <= delays[0] <= 0.5
    assert 4.0 <= delays[4] <= 8.0
    assert all(15.0 <= d <= 30.0 for d in delays[7:])
    assert len({jittered_backoff(3) for _ in range(20)}) > 1  # jitter


# ---------------------------------------------------------------------------- against Mosquitto


async def test_receives_in_order_in_batches(mosquitto: MosquittoProcess, sender: Sender) -> None:
    r = Recorder(mosquitto.port, subscribe="t/#")
    await r.up()
    await r.subscribed(mosquitto.port, "t/probe")
    for i, payload in enumerate(seq(3000)):
        sender.paho.publish(f"t/q{i % 2}", payload, qos=i % 2)
    await async_wait_for(lambda: len(r.payloads("t/q0")) + len(r.payloads("t/q1")) >= 3000,
                         what="3000 messages", timeout=10)
    # order holds per QoS (the sender's in-flight window may hold QoS 1 back behind QoS 0)
    assert r.payloads("t/q0") == seq(3000)[0::2]
    assert r.payloads("t/q1") == seq(3000)[1::2]
    assert {m[3] for m in r.messages} == {0, 1}
    assert r.batches < 3000  # many messages per read


async def test_large_message_spans_many_reads(mosquitto: MosquittoProcess, sender: Sender) -> None:
    r = Recorder(mosquitto.port, subscribe="big/#")
    await r.up()
    await r.subscribed(mosquitto.port, "big/probe")
    big = bytes(range(256)) * 4096  # 1 MiB: many reads for one packet
    sender.paho.publish("big/x", big, qos=1)
    sender.paho.publish("big/x", b"after", qos=1)
    await async_wait_for(lambda: len(r.payloads("big/x")) >= 2, what="the big message and the next")
    assert r.payloads("big/x") == [big, b"after"]


async def test_oversized_message_is_reported_acked_and_skipped(
    mosquitto: MosquittoProcess, sender: Sender
) -> None:
    r = Recorder(mosquitto.port, client_id="capped", subscribe="cap/#", clean_session=False,
                 max_packet_bytes=10_000)
    await r.up()
    await r.subscribed(mosquitto.port, "cap/probe")
    sender.paho.publish("cap/x", b"y" * 500_000, qos=1)
    sender.paho.publish("cap/x", b"small", qos=1)
    await async_wait_for(lambda: r.payloads("cap/x") == [b"small"], what="the message after it")
    assert r.oversize == [("cap/x", 500_000)]
    # acked: the same session again gets nothing redelivered
    await r.client.stop()
    await _gone(mosquitto, "capped")
    again = Recorder(mosquitto.port, client_id="capped", clean_session=False)
    await again.up()
    sender.paho.publish("cap/x", b"marker", qos=1)
    await async_wait_for(lambda: again.payloads("cap/x") == [b"marker"], what="the marker")


async def test_publishes_qos0_and_qos1(mosquitto: MosquittoProcess, other: MqttClient) -> None:
    await asyncio.to_thread(other.subscribe, "p/#", 1)
    r = Recorder(mosquitto.port)
    await r.up()
    for p in seq(500):
        r.client.publish("p/q1", p, qos=1)
    for p in seq(500):
        r.client.publish("p/q0", p, qos=0)
    assert await r.client.wait_all_acked(10)
    assert r.client.pending() == 0
    await async_wait_for(lambda: len(other.got("p/q1")) >= 500 and len(other.got("p/q0")) >= 500,
                         what="both at the other side")
    assert other.got("p/q1") == seq(500) and other.got("p/q0") == seq(500)


async def test_more_than_the_inflight_window_waits_in_order(
    mosquitto: MosquittoProcess, other: MqttClient
) -> None:
    await asyncio.to_thread(other.subscribe, "w/#", 1)
    r = Recorder(mosquitto.port)
    r.client.max_inflight = 7
    await r.up()
    for p in seq(2000):
        r.client.publish("w/x", p, qos=1)
    assert len(r.client._inflight) == 7 and r.client.pending() == 2000
    assert await r.client.wait_all_acked(10)
    await async_wait_for(lambda: len(other.got("w/x")) >= 2000, what="2000 at the other side")
    assert other.got("w/x") == seq(2000)


async def test_more_messages_than_packet_ids(mosquitto: MosquittoProcess) -> None:
    """A republish of 20k users is 80k QoS 1 messages at once: more than 65535 packet ids."""
    r = Recorder(mosquitto.port)
    await r.up()
    for i in range(70_000):
        r.client.publish("ids/x", b"%d" % i, qos=1)
    assert await r.client.wait_all_acked(30)
    assert r.client.connected and r.disconnects == []


async def test_reconnects_and_sends_what_was_published_meanwhile(
    mosquitto: MosquittoProcess,
) -> None:
    r = Recorder(mosquitto.port, subscribe="r/#", clean_session=False, client_id="resumer")
    await r.up()
    await asyncio.to_thread(mosquitto.stop)
    await async_wait_for(lambda: r.disconnects, what="on_disconnect")
    assert not r.client.connected
    r.client.publish("r/while-down", b"kept", qos=1, retain=True)
    r.client.publish("r/q0", b"lost", qos=0)  # QoS 0 is not queued
    assert r.client.pending() == 1
    await asyncio.to_thread(mosquitto.start)
    await async_wait_for(lambda: len(r.connects) >= 2, what="on_connect again", timeout=15)
    assert await r.client.wait_all_acked(10)
    other = await asyncio.to_thread(lambda: MqttClient(mosquitto.host, mosquitto.port).connect())
    try:
        await asyncio.to_thread(other.subscribe, "r/while-down", 1)
        await async_wait_for(lambda: other.got("r/while-down") == [b"kept"],
                             what="the retained message published while the broker was down")
        other.publish("r/x", b"after restart", qos=1)
        await async_wait_for(lambda: r.payloads("r/x") == [b"after restart"],
                             what="the subscription renewed after the restart")
    finally:
        other.close()
    assert r.client.failures == 0  # reset by the new CONNACK


async def test_keeps_retrying_until_the_broker_comes_up(
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    broker = mosquitto_factory(start=False)
    r = Recorder(broker.port, subscribe="late/#")
    await r.client.start()
    await async_wait_for(lambda: r.client.failures >= 2, what="two failed attempts")
    assert not r.client.connected
    await asyncio.to_thread(broker.start)
    await async_wait_for(lambda: len(r.connects) == 1, what="on_connect once the broker is up",
                         timeout=10)
    assert r.client.failures == 0


async def test_stop_sends_disconnect_so_no_will(
    mosquitto: MosquittoProcess, other: MqttClient
) -> None:
    await asyncio.to_thread(other.subscribe, "will/#", 1)
    r = Recorder(mosquitto.port, client_id="leaver", will=Will("will/leaver", b"gone", 1, False))
    await r.up()
    r.client.publish("will/last", b"published just before stop", qos=1)
    await r.client.stop()
    await _gone(mosquitto, "leaver")
    other.publish("will/marker", b"m", qos=1)
    await async_wait_for(lambda: other.got("will/marker"), what="the marker")
    assert other.got("will/leaver") == [], "the will was published: no clean DISCONNECT"
    assert other.got("will/last") == [b"published just before stop"]


async def test_will_is_published_when_the_link_dies(
    mosquitto: MosquittoProcess, other: MqttClient
) -> None:
    await asyncio.to_thread(other.subscribe, "will/#", 1)
    r = Recorder(mosquitto.port, client_id="crasher", will=Will("will/crasher", b"gone", 1, False))
    await r.up()
    conn = r.client._conn
    assert conn is not None and conn.transport is not None
    conn.transport.abort()  # no DISCONNECT: as if the hub died
    await async_wait_for(lambda: other.got("will/crasher") == [b"gone"], what="the will")
    await r.client.stop()


async def test_manual_acks_and_redelivery(mosquitto: MosquittoProcess, sender: Sender) -> None:
    """Unacked QoS 1 messages come back to the same session; acked ones do not."""
    r = Recorder(mosquitto.port, client_id="acker", subscribe="q/#", clean_session=False,
                 auto_ack=False)
    await r.up()
    await r.subscribed(mosquitto.port, "q/probe")
    for p in seq(60):  # three times Mosquitto's in-flight window of 20
        sender.paho.publish("q/a", p, qos=1)
    acked = 0

    def ack_but_the_last() -> bool:
        nonlocal acked
        for _t, _p, mid, qos in r.messages[acked:]:
            if _p != b"m00059":
                r.client.ack(mid, qos, r.client.generation)
        acked = len(r.messages)
        return acked >= 60

    await async_wait_for(ack_but_the_last, what="60 messages, acked as they come", timeout=10)
    assert r.payloads("q/a") == seq(60)
    await r.client.stop()
    await _gone(mosquitto, "acker")
    again = Recorder(mosquitto.port, client_id="acker", clean_session=False)
    await again.up()
    assert again.connects == [True]  # session present
    await async_wait_for(lambda: again.payloads("q/a") == [b"m00059"],
                         what=f"only the unacked message redelivered: {again.messages}")


async def test_stale_acks_are_not_sent_on_a_new_connection(mosquitto: MosquittoProcess) -> None:
    r = Recorder(mosquitto.port, client_id="stale", clean_session=False)
    await r.up()
    gen = r.client.generation
    await asyncio.to_thread(mosquitto.restart)
    await async_wait_for(lambda: len(r.connects) >= 2, what="reconnected", timeout=15)
    conn = r.client._conn
    assert conn is not None and r.client.generation == gen + 1
    r.client.ack(5, 1, gen)
    assert conn.out == b""  # nothing queued for a message of the lost connection


async def test_keepalive_pings_and_dead_link(mosquitto: MosquittoProcess) -> None:
    r = Recorder(mosquitto.port, keepalive=1)
    await r.up()
    # Mosquitto drops a client silent for 1.5 x keepalive; our pings prevent it
    await async_wait_for(lambda: r.client.pongs >= 2, what="two PINGRESPs", timeout=6)
    assert r.disconnects == [] and len(r.connects) == 1
    pid = mosquitto.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the broker stops answering; TCP stays up
    try:
        await async_wait_for(lambda: r.disconnects, what="the dead link noticed", timeout=8)
        assert r.disconnects == ["no answer to PINGREQ"]
    finally:
        os.kill(pid, signal.SIGCONT)
    await async_wait_for(lambda: len(r.connects) >= 2, what="back once the broker answers",
                         timeout=15)


async def test_refused_login_is_retried_with_a_clear_reason(
    mosquitto_factory: Callable[..., MosquittoProcess], caplog: pytest.LogCaptureFixture,
) -> None:
    broker = mosquitto_factory("allow_anonymous false\n")
    r = Recorder(broker.port)
    await r.client.start()
    await async_wait_for(lambda: r.client.failures >= 2, what="two refused attempts")
    assert r.connects == [] and not r.client.connected
    assert "refused the hub: not authorized" in caplog.text


async def test_tls(mosquitto_factory: Callable[..., MosquittoProcess], tmp_path: Any) -> None:
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
        r = Recorder(tls_port, subscribe="s/#", ca_file=str(certs["ca"]))
        await r.up()
        await r.subscribed(broker.port, "s/probe")
        big = bytes(range(256)) * 2048
        for p in seq(2000):
            send.paho.publish("s/a", p, qos=0)
        send.paho.publish("s/big", big, qos=1)
        await async_wait_for(lambda: len(r.payloads("s/a")) >= 2000 and r.payloads("s/big"),
                             what="2001 messages over TLS", timeout=10)
        assert r.payloads("s/a") == seq(2000) and r.payloads("s/big") == [big]
        for p in seq(200):
            r.client.publish("back/x", p, qos=1)
        assert await r.client.wait_all_acked(10)
        await async_wait_for(lambda: len(other.got("back/x")) >= 200, what="the other side")
        assert other.got("back/x") == seq(200)
    finally:
        await asyncio.to_thread(send.close)
        other.close()
