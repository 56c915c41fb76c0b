"""Hostile input at the hub: random topics and payloads into ``PresenceService.ingest``, and a
device flooding the embedded broker while others keep their status.

Properties, for any input: nothing raises out of ``ingest``; a message it rejects changes no
user's state; a message on ``P/devices/U/...`` changes no user but U (the topic, never the
payload, decides whose state a message touches).
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub import PresenceService, create_presence_service
from hub.auth import CredentialStore
from hub.core.clock import FakeClock
from hub.protocol import DEVICE_KINDS, MAX_PAYLOAD_BYTES, ConnPayload, HeartbeatPayload, Topics
from tests.support.mqtt_clients import MqttClient
from tests.support.wait import wait_for
from tests.test_security import HOST, Device, HubThread

T = Topics("presence")
USERS = ["alice", "bob", "carol"]
DEVICES = ["phone", "laptop"]

# ------------------------------------------------------------------------------------------
# Strategies

ids = st.sampled_from(USERS + DEVICES) | st.text(
    alphabet=st.characters(codec="utf-8"), min_size=0, max_size=70)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(
    max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from([
    "state", "session", "name", "reason", "ts", "seq", "idleMs", "type", "channelId",
    "timestamp", "data", "status", "customStatus", "version", "id", "command",
])
# objects with the protocol's field names and values of any type: the "wrong types" case
wrong_types = st.dictionaries(field_names, json_values, max_size=6)
valid_payloads = st.sampled_from([
    b'{"state":"online","session":"s1","name":"x"}',
    b'{"state":"offline","session":"s1","reason":"lost"}',
    b'{"session":"s1","seq":1}',
    b'{"session":"s2","seq":2,"idleMs":5000}',
    b'{"type":"message","channelId":"telegram-1"}',
    b'{"status":"dnd"}',
    b'{"customStatus":"In a meeting"}',
    b'{"customStatus":null}',
    b'{"version":1}',
])


def _nested(depth: int) -> bytes:
    return b'{"data":' * depth + b"1" + b"}" * depth


payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    wrong_types.map(lambda v: json.dumps(v).encode()),
    valid_payloads,
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),  # deeply nested
    st.integers(50, 20_000).map(_nested),
    st.just(b"{" + b'"a":1,' * 20_000 + b'"type":"x"}'),  # huge
    st.just(b"x" * (MAX_PAYLOAD_BYTES + 1)),
    st.just(b"\xff\xfe\x00{}"),
    st.just(b""),
)
topics = st.one_of(
    st.builds(lambda u, d, k: f"presence/devices/{u}/{d}/{k}", ids, ids,
              st.sampled_from([*DEVICE_KINDS, "state", "", "conn/x"])),
    st.builds(lambda u, d, k: f"presence/devices/{u}/{d}/{k}", st.sampled_from(USERS),
              st.sampled_from(DEVICES), st.sampled_from(DEVICE_KINDS)),
    st.sampled_from(["presence/users/alice/status", "presence/hub/status", "presence/#",
                     "presence/devices/+/+/+", "presence/devices/alice/phone",
                     "presence/devices/alice//conn", "presence/devices/alice/phone/conn/",
                     "other/devices/alice/phone/conn", "", "/", "$SYS/x"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=120),
)
messages = st.tuples(topics, payloads)


def new_service(**limits: Any) -> PresenceService:
    service = create_presence_service(storage="memory", clock=FakeClock(), **limits)
    # a known world to damage: two users with a connected device each
    service.ingest([
        (T.device("alice", "phone", "conn"), ConnPayload(state="online", session="s1").to_json()),
        (T.device("bob", "laptop", "conn"), ConnPayload(state="online", session="s1").to_json()),
    ])
    return service


def world(service: PresenceService) -> dict[str, Any]:
    engine = service.engine
    return {uid: (engine.snapshot(uid), engine.get_sync_status(uid))
            for uid in sorted(engine.user_ids())}


# ------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, min_size=1, max_size=12))
def test_ingest_survives_anything_and_rejected_input_changes_nothing(
    batch: list[tuple[str, bytes]],
) -> None:
    service = new_service()
    for topic, payload in batch:
        before = world(service)
        rejected = service.ingest([(topic, payload)])
        assert rejected in (0, 1)
        if rejected:
            assert world(service) == before, (topic, payload[:200])
    assert service.ingest(batch) <= len(batch)  # and all of it at once


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(USERS), st.sampled_from([*DEVICES, "new"]),
       st.sampled_from(DEVICE_KINDS), payloads | valid_payloads)
def test_a_message_touches_only_the_user_its_topic_names(
    user: str, device: str, kind: str, payload: bytes
) -> None:
    service = new_service()
    before = world(service)
    service.ingest([(T.device(user, device, kind), payload)])  # type: ignore[arg-type]
    after = world(service)
    for uid in set(before) | set(after):
        if uid != user:
            assert after.get(uid) == before.get(uid), uid


def test_known_nasty_payloads_are_dropped_by_reason() -> None:
    service = new_service()
    before = world(service)
    cases = {
        "too_large": b"{" + b" " * (MAX_PAYLOAD_BYTES + 10) + b"}",
        "bad_payload": _nested(100_000)[:MAX_PAYLOAD_BYTES - 1],
        "empty_payload": b"",
    }
    for reason, payload in cases.items():
        n = service.rejected[reason]
        assert service.ingest([(T.device("alice", "phone", "heartbeat"), payload)]) == 1
        assert service.rejected[reason] == n + 1, reason
    assert service.ingest([(T.device("alice", "phone", "heartbeat"), b"[" * 60_000)]) == 1
    assert service.ingest([("presence/devices/al ice/phone/set", b'{"status":"dnd"}')]) == 1
    assert service.ingest([("presence/devices/alice/phone/set", b'{"status":1}')]) == 1
    assert world(service) == before


def test_a_refused_set_changes_nothing_even_in_part() -> None:
    service = new_service(max_custom_status=10)
    before = world(service)
    payload = json.dumps({"status": "dnd", "customStatus": "x" * 50}).encode()
    assert service.ingest([(T.device("alice", "phone", "set"), payload)]) == 1
    assert world(service) == before


# ------------------------------------------------------------------------------------------
# Flood


def _mqtt_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


FLOOD_MESSAGES = 12_000


@pytest.fixture
def flood_accounts(tmp_path: Path) -> Path:
    path = tmp_path / "credentials.json"
    store = CredentialStore(path)
    for name in ("alice/phone", "carol/tablet", "bob/laptop"):
        store.put(name, "device", f"{name}-pw", iterations=1000)
    return path


@pytest.fixture
def made() -> Iterator[list[MqttClient]]:
    clients: list[MqttClient] = []
    yield clients
    for c in clients:
        c.close()


def test_a_flooding_device_is_throttled_alone(flood_accounts: Path,
                                              made: list[MqttClient]) -> None:
    """bob's laptop writes 12,000 PUBLISH packets as fast as TCP takes them (its own topics,
    QoS 0, no client library in the way), which keeps the hub busy for seconds, while alice and
    carol heartbeat every 100 ms: neither may time out, and bob's excess is
    dropped as rate_limited.

    amqtt reads a client's buffered packets without yielding to the event loop; the broker
    adapter yields after each message so the flood cannot starve the others. The timeout is
    2.5 s (heartbeat interval 1 s) because this test runs the hub, the flooder and both
    devices in one process, sharing one GIL on a shared 2-core box: with 1 s, 1 run in 3-8
    still saw a late heartbeat (not a starving hub: a starved test process).
    """
    hub = HubThread(flood_accounts, heartbeat_interval_ms=1000).start()
    offline: list[str] = []
    try:
        assert hub.service is not None
        service = hub.service
        hub.call(lambda: service.on("offline", lambda uid: offline.append(uid)))
        honest = []
        for user, dev in (("alice", "phone"), ("carol", "tablet")):
            d = Device(hub.port, user, dev, password=f"{user}/{dev}-pw")
            made.append(d)
            d.online()
            d.start_heartbeats(0.1)
            honest.append(d)
        wait_for(lambda: hub.status("alice") == "online" and hub.status("carol") == "online",
                 what="honest devices online")

        sock = socket.create_connection((HOST, hub.port), timeout=5)
        body = (_mqtt_string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)
                + _mqtt_string("flooder") + _mqtt_string("bob/laptop")
                + _mqtt_string("bob/laptop-pw"))
        sock.sendall(_packet(0x10, body))
        assert sock.recv(4) == b"\x20\x02\x00\x00", "CONNACK accepted"
        beat = HeartbeatPayload(session="flood", seq=1).to_json()
        junk = b'{"type":"x","data":' + b"[" * 50 + b"]" * 50 + b"}"
        chunk = b"".join(
            _packet(0x30, _mqtt_string(T.device("bob", "laptop", kind)) + payload)
            for kind, payload in [("heartbeat", beat), ("activity", junk), ("set", b"{]")] * 100
        )
        sent = 0
        started = time.monotonic()
        while sent < FLOOD_MESSAGES:  # as fast as TCP takes them
            sock.sendall(chunk)
            sent += 300
        sock.close()
        assert hub.broker is not None
        broker = hub.broker
        # everything bob wrote has been read once the broker has seen his socket close
        wait_for(lambda: "flooder" not in hub.call(broker.connected_clients), 30,
                 "the hub to work through the flood")
        busy = time.monotonic() - started
        honest[0].set(customStatus="after the flood")
        wait_for(lambda: hub.custom("alice") == "after the flood", what="alice heard after it")
        rate_limited = hub.call(lambda: service.rejected["rate_limited"])
        assert rate_limited > 0, f"{sent} messages sent, none rate limited"
        for d in honest:
            d.stop_heartbeats()
        assert [u for u in offline if u != "bob"] == [], f"false timeouts: {offline}"
        assert hub.status("alice") == "online" and hub.status("carol") == "online"
        print(f"flood: {sent} messages, {rate_limited} rate limited, handled in {busy:.1f} s "
              f"({sent / busy:.0f}/s) while two devices kept a 2.5 s heartbeat timeout")
    finally:
        hub.stop()
