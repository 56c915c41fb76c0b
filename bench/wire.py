"""Just enough MQTT 3.1.1 to load a broker from Python without the client library's cost.

Why not paho for the load side: a paho publisher spends ~15-20 us of Python per message, so on
a 2-core box the load generator would eat the CPU the hub and the broker need, and the figures
would measure the generator. Here every packet of a round is encoded once into one buffer and
the publisher sends slices of it (``sendall`` of a memoryview: no Python per message at all).

Only what the benchmark needs: CONNECT (with will), SUBSCRIBE, PUBLISH QoS 0/1, PUBACK,
PINGREQ, DISCONNECT (encoded by the hub's own client, :mod:`hub.mqtt.client`), and an
incremental packet splitter for the receiving side.
"""

from __future__ import annotations

import socket
import struct
from array import array
from collections.abc import Iterable, Iterator

from hub.mqtt.client import Will, encode_ack, encode_connect, encode_publish, encode_subscribe

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBSCRIBE = 0x82
SUBACK = 0x90
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def connect_packet(
    client_id: str,
    keepalive: int = 60,
    clean: bool = True,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    w = Will(*will) if will is not None else None
    return encode_connect(client_id, keepalive=keepalive, clean_session=clean, will=w)


def publish_packet(
    topic: str, payload: bytes, qos: int = 0, retain: bool = False, mid: int = 1
) -> bytes:
    return encode_publish(topic, payload, qos, retain, mid if qos else 0)


def subscribe_packet(filters: Iterable[tuple[str, int]], mid: int = 1) -> bytes:
    return encode_subscribe(mid, list(filters))


def puback_packet(mid: int) -> bytes:
    return encode_ack(PUBACK >> 4, mid)


class Splitter:
    """Cuts a byte stream into MQTT packets: ``feed(data)`` yields ``(type_byte, body)``."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            mult, length, i = 1, 0, pos + 1
            while True:
                if i >= n:
                    self._compact(pos)
                    return
                b = buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if n - i < length:
                break
            yield buf[pos], bytes(buf[i:i + length])
            pos = i + length
        self._compact(pos)

    def _compact(self, pos: int) -> None:
        if pos:
            del self._buf[:pos]


def publish_fields(head: int, body: bytes) -> tuple[str, bytes, int, int]:
    """(topic, payload, qos, mid) of a PUBLISH body."""
    (tlen,) = struct.unpack_from("!H", body)
    topic = body[2:2 + tlen].decode()
    qos = (head >> 1) & 3
    pos = 2 + tlen
    mid = 0
    if qos:
        (mid,) = struct.unpack_from("!H", body, pos)
        pos += 2
    return topic, body[pos:], qos, mid


class PacketBatch:
    """Many encoded packets in one buffer, so a run of them is sent as one slice."""

    def __init__(self, packets: Iterable[bytes]) -> None:
        offsets = array("q", [0])
        chunks = []
        total = 0
        for p in packets:
            chunks.append(p)
            total += len(p)
            offsets.append(total)
        self.data = memoryview(b"".join(chunks))
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def slice(self, start: int, stop: int) -> memoryview:
        return self.data[self.offsets[start]:self.offsets[stop]]

    @property
    def mean_size(self) -> float:
        return len(self.data) / max(1, len(self))


def connect_blocking(
    host: str, port: int, client_id: str, *, keepalive: int = 600,
    will: tuple[str, bytes, int, bool] | None = None, timeout: float = 10.0,
) -> socket.socket:
    """A TCP connection past CONNACK (blocking socket; the caller owns it)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id, keepalive, True, will))
    got = b""
    while len(got) < 4:
        chunk = sock.recv(4 - len(got))
        if not chunk:
            raise ConnectionError(f"broker closed the connection of {client_id} before CONNACK")
        got += chunk
    if got[0] != CONNACK or got[3] != 0:
        raise ConnectionError(f"broker refused {client_id}: CONNACK {got.hex()}")
    sock.settimeout(None)
    return sock


def kill(sock: socket.socket) -> None:
    """Close without DISCONNECT, with a RST: what a device that loses power looks like."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
