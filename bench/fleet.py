"""The fleet simulator: many virtual devices multiplexed over a few MQTT connections.

Device ``i`` is ``u{i // 2}/d{i % 2}`` (two devices per user) with its own session id; its
heartbeat packet is encoded once. Each connection owns a contiguous share of the devices and
sends, on a fixed schedule, device ``m`` of its share at ``m * ramp / share + k * period`` for
round ``k = 0, 1, ...``: with ``ramp == period`` that is a steady stream of
``devices / period`` heartbeats a second; with a longer ramp the first round (which the hub
takes as implicit births) is spread out while earlier devices already keep their period.

How the benchmark sees the hub's backlog (the hub publishes nothing per heartbeat): every
``marker_every`` seconds, and once at the end, each connection also publishes a ``set`` with
``customStatus: "<tag>-<seq>"`` for its own marker user ``bench-mark-<j>``. MQTT keeps one
connection's messages in order to a subscriber, so when the hub publishes that custom status
(retained ``P/users/bench-mark-<j>/custom``), it has processed every heartbeat the connection
sent before the marker. The lag of a marker (seen minus sent) is the hub's backlog in seconds at
that moment; a backlog that does not grow is a rate the hub sustains. The bare paho baseline
echoes markers on ``bench/echo/...`` so the same observer measures both the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from bench import wire
from bench.infra import BenchError

_run_ids = itertools.count(1)


def device_of(i: int) -> tuple[str, str]:
    return f"u{i // 2}", f"d{i % 2}"


def user_count(devices: int) -> int:
    return (devices + 1) // 2


def heartbeat_batch(prefix: str, tag: str, start: int, stop: int) -> wire.PacketBatch:
    """Heartbeats of devices [start, stop), byte for byte in the layout the agent writes
    (``HeartbeatPayload.to_json``: session, seq, ts; no ``idleMs``, as from a device that
    cannot sense its user's idle time)."""
    ts = int(time.time() * 1000)

    def packets() -> object:
        for i in range(start, stop):
            user, dev = device_of(i)
            payload = f'{{"session":"{tag}s{i:07d}","seq":{i % 1000},"ts":{ts}}}'.encode()
            yield wire.publish_packet(f"{prefix}/devices/{user}/{dev}/heartbeat", payload)

    return wire.PacketBatch(packets())  # type: ignore[arg-type]


class MarkerFeed(Protocol):
    """Where markers come back: ``(arrival time.time(), topic, marker text)`` per message (an
    :class:`bench.infra.Observer` of the hub's or the echo's topics, or a subscriber's own output)."""

    @property
    def messages(self) -> list[tuple[float, str, bytes]]: ...


@dataclass
class Marker:
    conn: int
    seq: int
    sent: float  # time.time()


@dataclass
class Connection:
    index: int
    sock: socket.socket
    batch: wire.PacketBatch
    #: round -> packets of that round already sent (rounds from ``first_round`` on)
    sent_in_round: dict[int, int] = field(default_factory=dict)
    first_round: int = 0
    sent: int = 0
    blocked_s: float = 0.0


class Fleet:
    """``devices`` virtual devices over ``connections`` publisher connections to one broker."""

    def __init__(self, host: str, port: int, devices: int, *, connections: int = 2,
                 prefix: str = "presence", tag: str | None = None) -> None:
        self.host, self.port = host, port
        self.devices = devices
        self.prefix = prefix
        self.tag = tag or f"b{next(_run_ids)}"
        n = max(1, min(connections, devices))
        bounds = [devices * j // n for j in range(n + 1)]
        self.shares = list(itertools.pairwise(bounds))
        self.conns: list[Connection] = []
        self.markers: list[Marker] = []
        self._marker_seq = itertools.count(1)
        self._lock = threading.Lock()
        self.mean_packet = 0.0
        self.mean_payload = 0.0

    # ------------------------------------------------------------------ connections

    def connect(self) -> None:
        for j, (a, b) in enumerate(self.shares):
            batch = heartbeat_batch(self.prefix, self.tag, a, b)
            sock = wire.connect_blocking(self.host, self.port, f"bench-fleet-{self.tag}-{j}")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            self.conns.append(Connection(j, sock, batch))
        total = sum(len(c.batch) for c in self.conns)
        self.mean_packet = sum(len(c.batch.data) for c in self.conns) / max(1, total)
        sample = heartbeat_batch(self.prefix, self.tag, 0, 1)
        topic_len = len(f"{self.prefix}/devices/u0/d0/heartbeat")
        self.mean_payload = len(sample.data) - 2 - 2 - topic_len

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.sock.sendall(wire.DISCONNECT)
            c.sock.close()
        self.conns = []

    def __enter__(self) -> Fleet:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ markers

    def marker_topics(self) -> list[str]:
        """Where the hub's answer to each connection's marker shows up."""
        return [f"{self.prefix}/users/bench-mark-{j}/custom" for j in range(len(self.shares))]

    def echo_topics(self) -> list[str]:
        """Where the bare baseline subscriber echoes markers."""
        return [f"bench/echo/bench-mark-{j}" for j in range(len(self.shares))]

    def send_marker(self, c: Connection) -> Marker:
        seq = next(self._marker_seq)
        text = f"{self.tag}-{seq}"
        pkt = wire.publish_packet(f"{self.prefix}/devices/bench-mark-{c.index}/m/set",
                                  f'{{"customStatus":"{text}"}}'.encode())
        m = Marker(c.index, seq, time.time())
        c.sock.sendall(pkt)
        with self._lock:
            self.markers.append(m)
        return m

    def marker_lags(self, observer: MarkerFeed) -> list[tuple[float, float | None]]:
        """(sent, lag) of every marker, lag None when the observer has not seen it (yet)."""
        seen: dict[str, float] = {}
        for t, _topic, payload in observer.messages:
            text = payload.decode(errors="replace")
            if text.startswith(self.tag + "-") and text not in seen:
                seen[text] = t
        out: list[tuple[float, float | None]] = []
        for m in self.markers:
            arrived = seen.get(f"{self.tag}-{m.seq}")
            out.append((m.sent, None if arrived is None else arrived - m.sent))
        return out

    def wait_markers(self, observer: MarkerFeed, last: list[Marker], timeout: float) -> float:
        """Wait until the observer saw every marker in ``last``; return the last arrival time."""
        want = {f"{self.tag}-{m.seq}" for m in last}
        deadline = time.monotonic() + timeout
        while True:
            got = {}
            for t, _topic, payload in reversed(observer.messages):
                text = payload.decode(errors="replace")
                if text in want and text not in got:
                    got[text] = t
                    if len(got) == len(want):
                        return max(got.values())
            if time.monotonic() > deadline:
                raise BenchError(f"markers {sorted(want - set(got))} not seen within {timeout:.0f}s")
            time.sleep(0.02)

    # ------------------------------------------------------------------ sending

    def run(self, *, period: float, duration: float, ramp: float | None = None,
            marker_every: float | None = 0.5, stop: threading.Event | None = None,
            rounds: int | None = None) -> tuple[list[Marker], int, float]:
        """Send on the schedule for ``duration`` seconds (or ``rounds`` full rounds).

        Returns the final markers (one per connection), messages sent and elapsed seconds.
        One thread per connection; ``sendall`` of a slice releases the GIL while it blocks.
        """
        ramp = period if ramp is None else ramp
        finals: list[Marker] = []
        sent_before = sum(c.sent for c in self.conns)
        began = time.monotonic()

        def worker(c: Connection) -> None:
            n = len(c.batch)
            c.sent_in_round = {}
            c.first_round = 0
            next_marker = began + (marker_every or 1e18)
            while True:
                now = time.monotonic()
                t = now - began
                done = t >= duration or (stop is not None and stop.is_set())
                if rounds is not None:
                    t = min(t, (rounds - 1) * period + ramp)
                    done = done or c.first_round >= rounds
                last_round = int(t // period)
                for k in range(c.first_round, last_round + 1):
                    have = c.sent_in_round.get(k, 0)
                    due = min(n, int((t - k * period) * n / ramp) + 1)
                    if due > have:
                        b0 = time.monotonic()
                        c.sock.sendall(c.batch.slice(have, due))
                        c.blocked_s += time.monotonic() - b0
                        c.sent_in_round[k] = due
                        c.sent += due - have
                while c.sent_in_round.get(c.first_round, 0) >= n:
                    del c.sent_in_round[c.first_round]
                    c.first_round += 1
                if done:
                    break
                if now >= next_marker:
                    self.send_marker(c)
                    next_marker += marker_every or 1e18
                time.sleep(0.002)
            finals.append(self.send_marker(c))

        threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in self.conns]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.monotonic() - began
        return finals, sum(c.sent for c in self.conns) - sent_before, elapsed
