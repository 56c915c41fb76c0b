"""The process fixtures themselves: start, kill, restart, and persistence across a restart."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest

from tests.support.procs import MosquittoProcess, RedisProcess, find_binary, free_port
from tests.support.wait import wait_for


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _client(port: int, client_id: str = "") -> mqtt.Client:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}"
    )
    client.connect("127.0.0.1", port, keepalive=10)
    return client


def _read_retained(port: int, topic: str) -> bytes | None:
    """Subscribe with a fresh client and return the retained payload, or None if there is none.

    "None" is decided without a sleep: after the SUBACK we publish a marker to a private topic
    on the same connection; the broker delivers retained messages before that marker.
    """
    got: dict[str, bytes] = {}
    done = threading.Event()
    marker = f"marker/{uuid.uuid4().hex}"

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == marker:
            done.set()
        elif msg.retain:
            got[msg.topic] = msg.payload

    def on_subscribe(c: mqtt.Client, *_args: object) -> None:
        c.publish(marker, b"x", qos=1)  # our only SUBSCRIBE has been acknowledged

    client = _client(port)
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.loop_start()
    try:
        client.subscribe([(topic, 1), (marker, 1)])
        assert done.wait(5), "no marker back from the broker"
    finally:
        client.disconnect()
        client.loop_stop()
    return got.get(topic)


def test_mosquitto_fixture_accepts_connections(mosquitto: MosquittoProcess) -> None:
    assert mosquitto.running
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert mosquitto.port != 1883
    assert _accepts(mosquitto.port)


def test_kill_then_restart_on_same_port(mosquitto: MosquittoProcess) -> None:
    port = mosquitto.port
    mosquitto.kill()
    assert not mosquitto.running
    wait_for(lambda: not _accepts(port), what="killed mosquitto to stop listening")
    mosquitto.restart()
    assert mosquitto.port == port
    assert _accepts(port)


def test_retained_message_survives_restart(mosquitto: MosquittoProcess) -> None:
    client = _client(mosquitto.port)
    client.loop_start()
    try:
        info = client.publish("procs/retained", b"kept", qos=1, retain=True)
        info.wait_for_publish(5)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
    mosquitto.restart()
    assert _read_retained(mosquitto.port, "procs/retained") == b"kept"
    assert _read_retained(mosquitto.port, "procs/absent") is None


def test_queued_message_for_persistent_session_survives_restart(
    mosquitto: MosquittoProcess,
) -> None:
    sub = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="procs-persistent", clean_session=False
    )
    sub.connect("127.0.0.1", mosquitto.port)
    sub.loop_start()
    sub.subscribe("procs/queued", qos=1)
    wait_for(lambda: sub.is_connected(), what="subscriber connected")
    # Make sure the subscription is in place before we go away: a round trip on it.
    received: list[bytes] = []
    sub.on_message = lambda _c, _u, m: received.append(m.payload)
    pub = _client(mosquitto.port)
    pub.loop_start()
    pub.publish("procs/queued", b"first", qos=1).wait_for_publish(5)
    wait_for(lambda: received == [b"first"], what="first message to the persistent session")
    sub.disconnect()
    sub.loop_stop()
    pub.publish("procs/queued", b"while-away", qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()

    mosquitto.restart()

    received.clear()
    again = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="procs-persistent", clean_session=False
    )
    again.on_message = lambda _c, _u, m: received.append(m.payload)
    again.connect("127.0.0.1", mosquitto.port)
    again.loop_start()
    try:
        wait_for(lambda: received == [b"while-away"], what="queued message after restart")
    finally:
        again.disconnect()
        again.loop_stop()


def test_extra_conf_is_applied(mosquitto_factory: Callable[..., MosquittoProcess]) -> None:
    proc = mosquitto_factory("allow_anonymous false")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    codes: list[object] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: codes.append(rc)
    client.connect("127.0.0.1", proc.port)
    try:
        wait_for(lambda: client.loop(timeout=0.05) is not None and codes, what="CONNACK")
        assert codes[0].is_failure  # type: ignore[attr-defined]
    finally:
        client.disconnect()
        sock = client.socket()
        if sock is not None:
            sock.close()


def test_start_on_a_taken_port_fails_with_the_reason() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = MosquittoProcess(port=port)
        try:
            with pytest.raises(RuntimeError, match="port in use"):
                proc.start()
        finally:
            proc.cleanup()


def test_redis_process_start_kill_restart(redis_server: RedisProcess) -> None:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping()
    finally:
        client.close()
    own = RedisProcess(port=free_port())
    try:
        own.start()
        assert _accepts(own.port)
        own.kill()
        assert not own.running
        own.restart()
        assert _accepts(own.port)
    finally:
        own.cleanup()


def test_missing_binary_skips_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-broker not installed: apt-get"):
        find_binary("no-such-broker", "apt-get install no-such-broker")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-broker not installed"):
        find_binary("no-such-broker", "apt-get install no-such-broker")


def test_sigterm_stop_publishes_wills_and_keeps_retained_ones(mosquitto: MosquittoProcess) -> None:
    # A fact of Mosquitto 2.0 that restart tests must expect: a clean broker stop is, for
    # every client still connected, a lost connection.
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="procs-will")
    device.will_set("procs/will", b"lost", qos=1, retain=True)
    device.connect("127.0.0.1", mosquitto.port)
    try:
        wait_for(lambda: device.loop(timeout=0.02) is not None and device.is_connected(),
                 what="device connected")
        mosquitto.restart()  # the device's socket is still open while Mosquitto stops
    finally:
        sock = device.socket()
        if sock is not None:
            sock.close()
    assert _read_retained(mosquitto.port, "procs/will") == b"lost"
