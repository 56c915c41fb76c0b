"""Helpers for the device agent tests (no tests here): a raw MQTT watcher, a TCP proxy that
can cut connections, a stand-in for the hub's command handler, and agent settings for tests.

Why a TCP proxy: a last will is published when the broker sees a connection end without
DISCONNECT. Cutting the agent's connection in the proxy does exactly that, any number of
times, while the watcher stays connected to the broker directly and sees every will.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import AgentConfig
from tests.support.wait import wait_for

USER = "alice"
DEVICE = "laptop"
PREFIX = "presence"


@dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    retain: bool

    @property
    def kind(self) -> str:
        return self.topic.rsplit("/", 1)[-1]

    def json(self) -> Any:
        return json.loads(self.payload)


class Watcher:
    """A raw paho subscriber that records everything on ``topic`` (``presence/#``).

    ``persistent=True`` keeps a broker-side session (clean_session off, QoS 1), so messages
    published while the watcher is reconnecting after a broker restart are queued for it.
    """

    def __init__(
        self, host: str, port: int, topic: str = f"{PREFIX}/#", *, persistent: bool = False
    ) -> None:
        self.messages: list[Msg] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"watcher-{secrets.token_hex(4)}",
            clean_session=not persistent,
        )
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)  # type: ignore[arg-type]

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                c.subscribe(topic, qos=1)

        def on_subscribe(*_args: Any) -> None:
            self._subscribed.set()

        def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
            with self._lock:
                self.messages.append(Msg(message.topic, bytes(message.payload), message.retain))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(5):
            raise AssertionError(f"watcher could not subscribe on {host}:{port}")

    def snapshot(self) -> list[Msg]:
        with self._lock:
            return list(self.messages)

    def of(self, kind: str) -> list[Any]:
        """Parsed JSON payloads of one device topic kind (conn, heartbeat, activity, ...)."""
        return [
            m.json() for m in self.snapshot() if m.topic.startswith(f"{PREFIX}/devices/")
            and m.kind == kind and m.payload
        ]

    def births(self) -> list[dict[str, Any]]:
        return _unique_by_session([c for c in self.of("conn") if c["state"] == "online"])

    def offlines(self, reason: str | None = None) -> list[dict[str, Any]]:
        found = [c for c in self.of("conn") if c["state"] == "offline"]
        if reason is not None:
            found = [c for c in found if c.get("reason") == reason]
        return _unique_by_session(found)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
        return wait_for(condition, timeout=timeout, what=f"{what}; saw {self._summary()}")

    def _summary(self) -> str:
        msgs = self.snapshot()
        tail = [f"{m.topic} {m.payload[:120]!r}" for m in msgs[-8:]]
        return f"{len(msgs)} messages, last: {tail}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _unique_by_session(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A retained birth can arrive twice (live and again on resubscribe): keep the first."""
    seen: set[str] = set()
    out = []
    for item in items:
        if item["session"] not in seen:
            seen.add(item["session"])
            out.append(item)
    return out


def retained(host: str, port: int, topic: str, timeout: float = 5.0) -> bytes | None:
    """The retained payload on ``topic`` as a fresh subscriber sees it (None: nothing)."""
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peek-{secrets.token_hex(4)}")
    client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(topic, qos=1)

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.retain:
            got.append(bytes(message.payload))
        done.set()

    # The broker sends a subscription's retained message right after the SUBACK, so the
    # PUBACK of a publish made after the SUBACK proves "nothing retained" without a sleep.
    client.on_message = on_message
    client.on_subscribe = lambda c, *_a: c.publish(f"peek/{secrets.token_hex(4)}", b"", qos=1)
    client.on_publish = lambda *_a: done.set()
    client.connect(host, port)
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else None


class TcpProxy:
    """Relays 127.0.0.1:port to the broker; :meth:`cut` drops every relayed connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.05)
        self.port: int = self._server.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._running = True
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while self._running:
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                conn.close()  # broker down: the agent sees a refused/closed connection
                continue
            upstream.settimeout(None)
            conn.settimeout(None)
            with self._lock:
                self._pairs.append((conn, upstream))
                self.accepted += 1
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """End every relayed connection abruptly (no DISCONNECT reaches the broker)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._running = False
        self._server.close()
        self.cut()
        self._thread.join(2)


def agent_config(tmp_path: Path, broker: str, **overrides: Any) -> AgentConfig:
    """Fast timers, no desktop idle probing, files in ``tmp_path``."""
    values: dict[str, Any] = {
        "broker": broker,
        "user": USER,
        "device": DEVICE,
        "name": "Alice's laptop",
        "heartbeat_interval": "200ms",
        "idle_source": "none",
        "outbox": str(tmp_path / "agent" / "outbox.sqlite3"),
        "state_file": str(tmp_path / "agent" / "state.json"),
        "reconnect_min": "50ms",
        "reconnect_max": "300ms",
    }
    values.update(overrides)
    return AgentConfig.from_values(**values)


def agent_env(tmp_path: Path, broker: str, **extra: str) -> dict[str, str]:
    """Environment for agent subprocesses: only our PRESENCE_* settings, private XDG dirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    env.update(
        XDG_CONFIG_HOME=str(tmp_path / "xdg-config"),
        XDG_STATE_HOME=str(tmp_path / "xdg-state"),
        PRESENCE_BROKER=broker,
        PRESENCE_USER=USER,
        PRESENCE_DEVICE=DEVICE,
        PRESENCE_HEARTBEAT_INTERVAL="200ms",
        PRESENCE_IDLE_SOURCE="none",
        PRESENCE_RECONNECT_MIN="50ms",
        PRESENCE_RECONNECT_MAX="300ms",
        PRESENCE_OUTBOX=str(tmp_path / "agent" / "outbox.sqlite3"),
        PRESENCE_STATE_FILE=str(tmp_path / "agent" / "state.json"),
    )
    env.update(extra)
    return env


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No PRESENCE_* from the developer's shell and no real config file."""
    for name in list(os.environ):
        if name.startswith("PRESENCE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    return tmp_path
