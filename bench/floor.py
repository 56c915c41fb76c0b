"""The broker's floor: how fast the broker itself carries what the hub has to publish.

A storm of 50k users going offline is 200k QoS 1 publishes (per user: ``state`` and ``status``,
both retained, and the ``statusChange`` and ``offline`` events), and 100k deliveries to the
observer that times them. Mosquitto handles those one by one, and on a shared 2-core machine
that alone takes seconds: measured here, about 17 us of Mosquitto's CPU per QoS 1 publish with
``set_tcp_nodelay true`` (a PUBACK is one TCP segment) and about 50 us per retained publish
that is also delivered to a QoS 1 subscriber. No publisher, however fast, gets a storm through
this broker sooner than that; so the hub's storm and republish figures are shown next to this
floor, measured in the same run on a broker of the same configuration.

The floor publisher is no client library: every packet is encoded beforehand into a file that
the kernel sends on a raw socket (``sendfile``: no Python per message while the clock runs);
a second thread counts the broker's PUBACKs by their bytes. The observer is the scenario's
own (:class:`bench.infra.Observer`, the same filters), so it costs the broker the same on both
sides.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from typing import BinaryIO

from bench import wire
from bench.infra import BenchError, Mosquitto, Observer, wait_until

#: (topic, payload, retained): QoS 1 as the hub publishes every one of them
Message = tuple[str, bytes, bool]

CHUNK = 5_000


class _Publisher:
    """One raw MQTT connection sending QoS 1 publishes as fast as the broker reads them."""

    def __init__(self, port: int) -> None:
        self.sock = wire.connect_blocking("127.0.0.1", port, f"bench-floor-{id(self)}")
        self._acked_bytes = 0
        self.sent = 0
        self._mid = 0
        self._reader = threading.Thread(target=self._read, daemon=True, name="floor-acks")
        self._reader.start()

    @property
    def acked(self) -> int:
        return self._acked_bytes // 4  # the broker sends this client nothing but PUBACKs

    def _read(self) -> None:
        try:
            while data := self.sock.recv(1 << 20):
                self._acked_bytes += len(data)
        except OSError:
            return

    def encode(self, messages: Iterable[Message], into: BinaryIO) -> None:
        """Write the packets of ``messages`` to a file, to be sent by :meth:`send`."""
        it = iter(messages)
        while True:
            chunk = bytearray()
            for _, (topic, payload, retain) in zip(range(CHUNK), it, strict=False):
                self._mid = self._mid % 65535 + 1
                self.sent += 1
                chunk += wire.publish_packet(topic, payload, 1, retain, self._mid)
            if not chunk:
                break
            into.write(chunk)
        into.flush()

    def send(self, packets: BinaryIO) -> None:
        """The file's packets, by the kernel (``sendfile``): no Python per message."""
        packets.seek(0)
        self.sock.sendfile(packets)

    def close(self) -> None:
        try:
            self.sock.sendall(wire.DISCONNECT)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(5)


def burst(setup: Sequence[Message], messages: Iterable[Message], filters: Sequence[str],
          watched: int, timeout: float = 1800) -> list[tuple[float, str, bytes]]:
    """Publish ``setup`` (messages the observer subscribes to) and wait until the broker
    acknowledged it and the observer has seen it; then publish ``messages`` from a thread,
    starting the clock, and return what the observer got of them as ``(seconds since the
    start, topic, payload)`` once it got ``watched`` messages.

    ``setup`` makes the broker's retained store what it was when the hub's burst began (a
    storm replaces retained messages; creating them costs the broker more)."""
    with Mosquitto() as mosq, Observer("127.0.0.1", mosq.port, filters, "bench-floor") as obs, \
            tempfile.TemporaryFile(prefix="bench-floor-") as setup_file, \
            tempfile.TemporaryFile(prefix="bench-floor-") as burst_file:
        pub = _Publisher(mosq.port)
        try:
            if setup:
                pub.encode(setup, setup_file)
                pub.send(setup_file)
                wait_until(lambda: pub.acked >= pub.sent and len(obs.messages) >= len(setup),
                           timeout, "the floor's setup acked and observed")
            pub.encode(messages, burst_file)  # before the clock starts
            start = len(obs.messages)
            began = time.time()
            failed: list[BaseException] = []

            def send() -> None:
                try:
                    pub.send(burst_file)
                except BaseException as exc:
                    failed.append(exc)

            sender = threading.Thread(target=send, daemon=True, name="floor-send")
            sender.start()

            def done() -> bool:
                if failed:
                    raise BenchError(f"the floor publisher failed: {failed[0]}")
                return len(obs.messages) - start >= watched

            wait_until(done, timeout, f"the floor's {watched:,} messages observed", 0.01)
            sender.join(timeout)
            return [(t - began, topic, payload) for t, topic, payload in obs.messages[start:]]
        finally:
            pub.close()
