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
the kernel sends on a raw socket (``sendfile``: no Python per message while the clock runs),
with the hub's in-flight window; a second thread counts the broker's PUBACKs by their bytes.
The observer is the scenario's own (:class:`bench.infra.Observer`, the same filters), so it
costs the broker the same on both sides.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection
from typing import BinaryIO

from bench import wire
from bench.infra import BenchError, Mosquitto, Observer, wait_until
from hub.mqtt.client import MAX_INFLIGHT

#: (topic, payload, retained): QoS 1 as the hub publishes every one of them
Message = tuple[str, bytes, bool]

CHUNK = 1_000
#: messages in flight at most, as the hub's client (hub.mqtt.client.MAX_INFLIGHT)
WINDOW = MAX_INFLIGHT


class _Encoder:
    """QoS 1 PUBLISH packets into a file, with packet ids counted as one connection's."""

    def __init__(self) -> None:
        self.sent = 0
        self._mid = 0

    def encode(self, messages: Iterable[Message], into: BinaryIO) -> list[tuple[int, int]]:
        """Write the packets of ``messages``; return the file's chunks as (bytes, messages
        sent on the connection once the chunk is), for :meth:`_Publisher.send`."""
        it = iter(messages)
        chunks: list[tuple[int, int]] = []
        while True:
            chunk = bytearray()
            for _, (topic, payload, retain) in zip(range(CHUNK), it, strict=False):
                self._mid = self._mid % 65535 + 1
                self.sent += 1
                chunk += wire.publish_packet(topic, payload, 1, retain, self._mid)
            if not chunk:
                break
            into.write(chunk)
            chunks.append((len(chunk), self.sent))
        into.flush()
        return chunks


class _Publisher:
    """One raw MQTT connection sending QoS 1 publishes as fast as the broker reads them."""

    def __init__(self, port: int) -> None:
        self.sock = wire.connect_blocking("127.0.0.1", port, f"bench-floor-{os.getpid()}")
        self._acked_bytes = 0
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

    def send(self, packets: BinaryIO, chunks: list[tuple[int, int]]) -> None:
        """The file's packets, by the kernel (``sendfile``: no Python per message), a chunk
        at a time while at most :data:`WINDOW` messages are unacknowledged, as the hub's
        client keeps its in-flight window."""
        offset = 0
        for size, through in chunks:
            while through - self.acked > WINDOW:  # in flight once this chunk is sent
                time.sleep(0.0005)
            self.sock.sendfile(packets, offset, size)
            offset += size

    def close(self) -> None:
        try:
            self.sock.sendall(wire.DISCONNECT)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(5)


def _send_process(port: int, path: str, chunks: list[tuple[int, int]], ready: Connection,
                  go: Connection) -> None:
    """The burst's sender, in a process of its own (forked): in the observer's process its
    threads contended with the observer's for the GIL and delayed its time stamps."""
    pub = _Publisher(port)
    ready.send(True)
    go.recv()
    with open(path, "rb") as packets:
        pub.send(packets, chunks)
    deadline = time.monotonic() + 600
    while pub.acked < chunks[-1][1] and time.monotonic() < deadline:
        time.sleep(0.01)
    pub.close()


def burst(setup: Sequence[Message], messages: Iterable[Message], filters: Sequence[str],
          watched: int, timeout: float = 1800) -> list[tuple[float, str, bytes]]:
    """Publish ``setup`` (messages the observer subscribes to) and wait until the broker
    acknowledged it and the observer has seen it; then publish ``messages`` from a process
    of its own, starting the clock, and return what the observer got of them as ``(seconds
    since the start, topic, payload)`` once it got ``watched`` messages.

    ``setup`` makes the broker's retained store what it was when the hub's burst began (a
    storm replaces retained messages; creating them costs the broker more)."""
    with Mosquitto() as mosq, Observer("127.0.0.1", mosq.port, filters, "bench-floor") as obs, \
            tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        if setup:
            pub = _Publisher(mosq.port)
            try:
                with open(f"{tmp}/setup", "w+b") as setup_file:
                    pub.send(setup_file, _Encoder().encode(setup, setup_file))
                wait_until(lambda: pub.acked >= len(setup) and len(obs.messages) >= len(setup),
                           timeout, "the floor's setup acked and observed")
            finally:
                pub.close()
        path = f"{tmp}/burst"
        with open(path, "wb") as burst_file:  # before the clock starts
            chunks = _Encoder().encode(messages, burst_file)
        if not chunks:
            return []
        ctx = multiprocessing.get_context("fork")
        ready_r, ready_w = ctx.Pipe(duplex=False)
        go_r, go_w = ctx.Pipe(duplex=False)
        sender = ctx.Process(target=_send_process, args=(mosq.port, path, chunks, ready_w, go_r),
                             daemon=True, name="bench-floor-sender")
        sender.start()
        try:
            if not ready_r.poll(30):
                raise BenchError("the floor's sender did not connect")
            ready_r.recv()
            start = len(obs.messages)
            began = time.time()
            go_w.send(True)

            def done() -> bool:
                if sender.exitcode not in (None, 0):
                    raise BenchError(f"the floor's sender failed (exit {sender.exitcode})")
                return len(obs.messages) - start >= watched

            wait_until(done, timeout, f"the floor's {watched:,} messages observed", 0.01)
            return [(t - began, topic, payload) for t, topic, payload in obs.messages[start:]]
        finally:
            sender.join(60)
            if sender.is_alive():
                sender.kill()
