"""MQTT test clients: a watcher of retained state and simulated devices, on real paho clients.

Each client runs its own network thread calling ``loop(timeout=0.02)`` so it can be stopped
within milliseconds, frozen (socket open, nothing sent: a hung device), or killed (socket
closed without DISCONNECT: a device whose power or network died).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hub.protocol import (
    ActivityPayload,
    ConnPayload,
    HeartbeatPayload,
    SetPayload,
    Topics,
    new_session_id,
)
from tests.support.wait import wait_for


class IoLock:
    """A re-entrant lock that the network thread hands over to threads waiting for it.

    Why: the network thread holds the lock for each ``loop()`` call (20 ms) and takes it again
    a few bytecodes after releasing it; a waiting thread, woken by the release, comes too late
    nearly every time. A device's heartbeat thread was starved that way for over its timeout
    once the other clients of a test had gone (fewer threads, so no switch in that window):
    the hub rightly timed the device out, and the test saw a false offline.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self._waiting = 0

    def __enter__(self) -> IoLock:
        with self._count:
            self._waiting += 1
        self._lock.acquire()
        with self._count:
            self._waiting -= 1
        return self

    def __exit__(self, *_exc: object) -> None:
        self._lock.release()

    def let_waiters_in(self) -> None:
        """Called by the network thread between two loops, without the lock: wait until every
        thread waiting for it has had it (a publish holds it for microseconds)."""
        deadline = time.monotonic() + 0.1
        while self._waiting and time.monotonic() < deadline:
            time.sleep(0.0005)


class MqttClient:
    """A paho client on a network thread of our own, recording what it receives."""

    def __init__(
        self, host: str, port: int, client_id: str | None = None, **kwargs: Any
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id or f"t-{uuid.uuid4().hex[:8]}"
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, **kwargs)
        self.received: list[tuple[str, bytes, int, bool]] = []
        self.retained_view: dict[str, bytes] = {}
        self.subacks: list[int] = []
        self.disconnected = False
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_disconnect = self._on_disconnect
        self._lock = threading.Lock()
        #: paho writes to the socket from whichever thread publishes when it runs no loop
        #: thread of its own: one lock around our loop and every publish keeps packets whole
        #: and in order
        self._io = IoLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: reconnect on our own network thread when the broker drops us
        self.auto_reconnect = False
        self.reconnects = 0

    # callbacks (network thread)
    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        with self._lock:
            self.received.append((msg.topic, payload, msg.qos, bool(msg.retain)))
            self.retained_view[msg.topic] = payload

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, *_rest: object) -> None:
        self.subacks.append(mid)

    def _on_disconnect(self, *_args: object) -> None:
        self.disconnected = True

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.disconnected:
                if not self.auto_reconnect:
                    return
                with self._io:
                    self._reconnect()
                continue
            with self._io:
                self.paho.loop(timeout=0.02)
            self._io.let_waiters_in()

    def _reconnect(self) -> None:
        """Reconnect as an agent would; subclasses refresh their will first."""
        try:
            self.paho.reconnect()
        except OSError:
            time.sleep(0.05)  # the broker is still down: a device's retry interval, not a wait
            return
        self.disconnected = False
        self.reconnects += 1

    # control
    def connect(self, keepalive: int = 60) -> MqttClient:
        self.disconnected = False
        self._stop.clear()
        self.paho.connect(self.host, self.port, keepalive=keepalive)
        self._thread = threading.Thread(target=self._run, name=self.client_id, daemon=True)
        self._thread.start()
        wait_for(self.paho.is_connected, what=f"{self.client_id} connected")
        return self

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._io:
            _rc, mid = self.paho.subscribe(topic, qos)
        wait_for(lambda: mid in self.subacks, what=f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        with self._io:
            info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            wait_for(info.is_published, what=f"PUBACK for {topic}")

    def last(self, topic: str) -> bytes | None:
        with self._lock:
            return self.retained_view.get(topic)

    def got(self, topic: str) -> list[bytes]:
        with self._lock:
            return [m[1] for m in self.received if m[0] == topic]

    def _stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
            assert not self._thread.is_alive(), "paho network thread did not stop"
        self._thread = None

    def freeze(self) -> None:
        """Stop the network thread: no packets, no pings, but the socket stays open."""
        self._stop_thread()

    def thaw(self) -> None:
        """Resume the network thread after :meth:`freeze`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.client_id, daemon=True)
        self._thread.start()

    def kill(self, reset: bool = False) -> None:
        """The socket closes without a DISCONNECT (FIN, or RST if ``reset``)."""
        self._stop_thread()
        sock = self.paho.socket()
        if isinstance(sock, socket.socket):
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    def disconnect(self) -> None:
        self.paho.disconnect()
        wait_for(lambda: self.disconnected, what=f"{self.client_id} disconnected")
        self._stop_thread()

    def close(self) -> None:
        """Teardown whatever the state."""
        self._stop_thread()
        sock = self.paho.socket()
        if isinstance(sock, socket.socket):
            sock.close()


class Watcher(MqttClient):
    """Subscribes to everything under the prefix and answers "what does the world see"."""

    def __init__(self, host: str, port: int, prefix: str = "presence") -> None:
        super().__init__(host, port)
        self.topics = Topics(prefix)

    def start(self) -> Watcher:
        self.connect()
        self.subscribe(f"{self.topics.prefix}/#")
        return self

    def status(self, user: str) -> str | None:
        raw = self.last(self.topics.user(user, "status"))
        return None if raw is None else raw.decode()

    def state(self, user: str) -> dict[str, Any] | None:
        raw = self.last(self.topics.user(user, "state"))
        return None if not raw else dict(json.loads(raw))

    def device_status(self, user: str, device: str) -> str | None:
        state = self.state(user)
        if state is None:
            return None
        for d in state["devices"]:
            if d["id"] == device:
                return str(d["status"])
        return None

    def wait_status(self, user: str, status: str, timeout: float = 5.0) -> None:
        wait_for(lambda: self.status(user) == status, timeout,
                 f"{user} status {status!r} (now {self.status(user)!r})")

    def wait_device(self, user: str, device: str, status: str, timeout: float = 5.0) -> None:
        wait_for(lambda: self.device_status(user, device) == status, timeout,
                 f"{user}/{device} {status!r} (now {self.device_status(user, device)!r})")

    def wait_text(self, user: str, kind: str, value: str, timeout: float = 5.0) -> None:
        topic = self.topics.user(user, kind)  # type: ignore[arg-type]
        wait_for(lambda: self.last(topic) == value.encode(), timeout,
                 f"{topic} == {value!r} (now {self.last(topic)!r})")

    def statuses_seen(self, user: str) -> list[str]:
        return [p.decode() for p in self.got(self.topics.user(user, "status"))]


class SimDevice(MqttClient):
    """A device speaking the protocol by hand: birth and will per session, heartbeats on demand
    or on a background thread."""

    def __init__(self, host: str, port: int, user: str, device: str,
                 prefix: str = "presence", name: str | None = None,
                 client_id: str | None = None) -> None:
        super().__init__(host, port, client_id=client_id or f"sim-{user}-{device}")
        self.topics = Topics(prefix)
        self.user = user
        self.device = device
        self.name = name or device
        self.session = ""
        self.seq = 0
        self._beating = threading.Event()
        self._beat_thread: threading.Thread | None = None

    def topic(self, kind: str) -> str:
        return self.topics.device(self.user, self.device, kind)  # type: ignore[arg-type]

    def online(self, session: str | None = None, **birth: Any) -> SimDevice:
        """Connect with a fresh session and its will, then publish the birth (with ``birth``'s
        optional fields: ``heartbeat_ms``, ``idle_ms``)."""
        self.session = session or new_session_id()
        will = ConnPayload(state="offline", session=self.session, reason="lost").to_json()
        self.paho.will_set(self.topic("conn"), will, qos=1, retain=True)
        self.connect()
        birth = ConnPayload(state="online", session=self.session, name=self.name,
                            ts=int(time.time() * 1000), **birth)
        self.publish(self.topic("conn"), birth.to_json(), qos=1, retain=True)
        return self

    def _reconnect(self) -> None:
        """A new session and a matching will for every connection, then the birth."""
        previous = self.session
        self.session = new_session_id()
        will = ConnPayload(state="offline", session=self.session, reason="lost").to_json()
        self.paho.will_set(self.topic("conn"), will, qos=1, retain=True)
        super()._reconnect()
        if self.disconnected:
            self.session = previous
            return
        birth = ConnPayload(state="online", session=self.session, name=self.name,
                            ts=int(time.time() * 1000))
        self.paho.publish(self.topic("conn"), birth.to_json(), qos=1, retain=True)

    def heartbeat(self, idle_ms: int | None = None) -> None:
        self.seq += 1
        hb = HeartbeatPayload(session=self.session, seq=self.seq, ts=int(time.time() * 1000),
                              idle_ms=idle_ms)
        with self._io:
            self.paho.publish(self.topic("heartbeat"), hb.to_json(), qos=0)

    def activity(self, channel: str | None = None, type_: str = "message") -> None:
        act = ActivityPayload(type=type_, channel_id=channel, timestamp=int(time.time() * 1000))
        self.publish(self.topic("activity"), act.to_json(), qos=1)

    def set(self, **fields: Any) -> None:
        self.publish(self.topic("set"), SetPayload(**fields).model_dump_json(
            by_alias=True, exclude_unset=True).encode(), qos=1)

    def clean_offline(self) -> None:
        self.stop_heartbeats()
        bye = ConnPayload(state="offline", session=self.session, reason="disconnect",
                          ts=int(time.time() * 1000))
        self.publish(self.topic("conn"), bye.to_json(), qos=1, retain=True)
        self.disconnect()

    def start_heartbeats(self, interval: float, idle_ms: int | None = None) -> None:
        self._beating.set()

        def beat() -> None:
            while self._beating.is_set():
                if self.paho.is_connected():
                    self.heartbeat(idle_ms)
                time.sleep(interval)

        self._beat_thread = threading.Thread(target=beat, daemon=True)
        self._beat_thread.start()

    def stop_heartbeats(self) -> None:
        self._beating.clear()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)
            self._beat_thread = None

    def close(self) -> None:
        self.stop_heartbeats()
        super().close()
