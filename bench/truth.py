"""``python -m bench.truth``: does the hub tell the truth while a real network misbehaves?

A small, realistic fleet runs for a while against a real Mosquitto and a real hub process, and
every fault this project has been bitten by happens on purpose while a watcher counts status
changes on ``P/events/#``:

* phones hand over between Wi-Fi and LTE (the old socket dies with a reset, a new connection
  with a new session and client id births at once);
* legacy devices reconnect under their old client id (a takeover: the broker closes the old
  connection and sends its will);
* long-interval devices announce a heartbeat ten times the hub's; sleeping devices announce a
  sleep, disconnect cleanly and wake with a new session; laptops report their user's idle time;
* the hub is SIGKILLed and restarted; Mosquitto (with persistence, as README recommends) is
  restarted under everyone;
* a few victim devices die for good: their users going offline are the only true changes, and
  their will-to-offline latency is measured.

Printed: the false status changes (goal 0) and the will-to-offline latency past the will
grace (goal p99 <= 50 ms), then ``BENCH {json}``. It starts and stops everything itself and
sends traffic to 127.0.0.1 only. ``make truth`` runs it (about two minutes).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.infra import HubProcess, Mosquitto, percentile
from hub.protocol import ConnPayload, HeartbeatPayload, new_session_id

HB_MS = 2_000  # the hub's heartbeat interval: timeout 5 s
GRACE_MS = 1_000  # the hub's will grace (its default)
PREFIX = "presence"


def _retire(c: mqtt.Client) -> None:
    """Stop a client's network thread without waiting here: joining it takes up to a second,
    and the scheduler's thread must keep every other device's heartbeats on time."""
    threading.Thread(target=c.loop_stop, daemon=True).start()


@dataclass(eq=False)
class Device:
    """One device as an agent would run it: a session and a client id of its own per connection
    (``legacy`` devices reuse one client id), a will per session, a birth that announces."""

    kind: str
    user: str
    device: str
    port: int
    heartbeat_ms: int = HB_MS
    idle_ms: int | None = None
    client: mqtt.Client | None = None
    session: str = ""
    alive: bool = True  # False once a victim died for good
    asleep: bool = False
    wanted: bool = True  # False while intentionally disconnected (asleep, dead)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: called (on paho's thread) when the connection is lost unasked
    on_lost: Callable[[], None] = lambda: None

    def topic(self, kind: str) -> str:
        return f"{PREFIX}/devices/{self.user}/{self.device}/{kind}"

    def connect(self) -> bool:
        self.session = new_session_id()
        cid = (f"legacy-{self.user}-{self.device}" if self.kind == "legacy"
               else f"presence-agent/{self.user}/{self.device}/{self.session}")
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True)
        c.will_set(self.topic("conn"), ConnPayload(state="offline", session=self.session,
                                                   reason="lost").to_json(), 1, True)
        c.on_disconnect = self._on_disconnect
        try:
            c.connect("127.0.0.1", self.port, keepalive=10)
        except OSError:
            return False
        c.loop_start()
        birth = ConnPayload(state="online", session=self.session, name=self.device,
                            ts=int(time.time() * 1000), heartbeat_ms=self.heartbeat_ms,
                            idle_ms=self.idle_ms)
        c.publish(self.topic("conn"), birth.to_json(), 1, True)
        with self.lock:
            self.client = c
        return True

    def _on_disconnect(self, c: mqtt.Client, *_a: Any) -> None:
        if self.wanted and self.alive and c is self.client:
            self.client = None
            _retire(c)  # no paho auto-reconnect under the old client id and session
            self.on_lost()  # an agent reconnects with a new session: the scheduler does it

    def heartbeat(self) -> None:
        c = self.client
        if c is not None and c.is_connected():
            hb = HeartbeatPayload(session=self.session, seq=0, ts=int(time.time() * 1000),
                                  idle_ms=self.idle_ms)
            c.publish(self.topic("heartbeat"), hb.to_json(), 0)

    def drop(self) -> float:
        """The socket dies without a DISCONNECT (a reset): the broker sends the will. Returns
        when it died (before paho's thread is joined, which takes up to a second)."""
        c, self.client = self.client, None
        died = time.time()
        if c is None:
            return died
        sock = c.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            died = time.time()
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        _retire(c)
        return died

    def freeze(self) -> mqtt.Client | None:
        """Stop talking, socket left open (a takeover follows)."""
        c, self.client = self.client, None
        if c is not None:
            _retire(c)
        return c

    def sleep(self, ms: int) -> None:
        c = self.client
        if c is None:
            return
        self.wanted = False
        msg = ConnPayload(state="sleeping", session=self.session, sleep_ms=ms,
                          ts=int(time.time() * 1000))
        c.publish(self.topic("conn"), msg.to_json(), 1, True).wait_for_publish(5)
        c.disconnect()
        c.loop_stop()
        self.client = None


class Scheduler:
    """One thread runs every device action at its time (a heap of deadlines)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._lock = threading.Lock()

    def at(self, when: float, action: Callable[[], None]) -> None:
        with self._lock:
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, action))

    def run_until(self, end: float) -> None:
        while time.time() < end:
            with self._lock:
                item = heapq.heappop(self._heap) if self._heap and self._heap[0][0] <= time.time() else None
            if item is None:
                time.sleep(0.005)
                continue
            try:
                item[2]()
            except Exception as exc:  # a device's trouble must not stop the fleet
                print(f"  (action failed: {exc})", file=sys.stderr)


class Watcher:
    """Every status change on ``P/events/#`` and every ``status`` with its arrival time."""

    def __init__(self, port: int) -> None:
        self.changes: list[tuple[float, str, str, str]] = []
        self.statuses: list[tuple[float, str, str]] = []
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="truth-watcher", clean_session=False)
        c.on_message = self._on_message
        c.on_connect = lambda c, *_: c.subscribe([(f"{PREFIX}/events/#", 1),
                                                  (f"{PREFIX}/users/+/status", 1)])
        c.connect("127.0.0.1", port, keepalive=10)
        c.loop_start()
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        parts = msg.topic.split("/")
        if parts[1] == "events":
            ev = json.loads(msg.payload)
            if ev.get("event") == "statusChange":
                self.changes.append((now, ev["userId"], ev["old"], ev["new"]))
        elif parts[1] == "users":
            self.statuses.append((now, parts[2], msg.payload.decode()))

    def offline_after(self, user: str, t: float) -> float | None:
        """When ``user``'s retained status first said offline after ``t``."""
        return next((at for at, u, s in self.statuses if u == user and s == "offline"
                     and at >= t), None)


def run(duration: float, seed: int, log: Callable[[str], None],
        log_level: str = "warning") -> dict[str, float]:
    rng = random.Random(seed)
    t_warm = 12.0  # everyone online and settled before counting starts
    with Mosquitto(persistence=True) as mosq:
        db = Path(mosq.dir) / "presence.json"
        args = ["--broker", mosq.url, "--storage", "tinydb", "--db", str(db),
                "--heartbeat-interval", f"{HB_MS}ms", "--away-after", "10m",
                "--offline-after", "1h", "--will-grace", f"{GRACE_MS}ms"]
        hub = HubProcess(args, log_level=log_level).start()
        watcher = Watcher(mosq.port)
        sched = Scheduler()

        def aside(fault: Callable[[], None]) -> Callable[[], None]:
            """Faults block for seconds (a process starting): off the scheduler's thread, or
            every device would go silent with it and the bench would measure itself."""
            return lambda: threading.Thread(target=fault, daemon=True).start()

        fleet: list[Device] = []
        for i in range(8):
            fleet.append(Device("phone", f"p{i}", "phone", mosq.port, idle_ms=1_000))
        for i in range(4):
            fleet.append(Device("legacy", f"g{i}", "pi", mosq.port))
        for i in range(4):
            fleet.append(Device("long", f"l{i}", "sensor", mosq.port, heartbeat_ms=10 * HB_MS))
        for i in range(4):
            fleet.append(Device("sleepy", f"s{i}", "badge", mosq.port))
        for i in range(6):
            fleet.append(Device("laptop", f"w{i}", "laptop", mosq.port, idle_ms=3_000))
        victims = [Device("victim", f"v{i}", "phone", mosq.port) for i in range(6)]
        fleet += victims
        start = time.time()

        def keep_alive(d: Device) -> None:
            """Heartbeats on the device's own interval, while it lives."""
            if d.alive:
                d.heartbeat()
                sched.at(time.time() + d.heartbeat_ms / 1000, lambda: keep_alive(d))

        def reconnect(d: Device) -> None:
            """A lost connection is redone with a new session after 0.3-1.5 s (an agent's
            prompt reconnect), again until the broker takes it."""
            if d.alive and d.wanted and d.client is None and not d.connect():
                sched.at(time.time() + rng.uniform(0.3, 1.5), lambda: reconnect(d))

        for d in fleet:
            d.on_lost = lambda d=d: sched.at(time.time() + rng.uniform(0.3, 1.5),  # type: ignore[misc]
                                             lambda: reconnect(d))
            d.connect()
            sched.at(start + rng.uniform(0.1, 1.0), lambda d=d: keep_alive(d))

        def handover(d: Device) -> None:
            d.drop()
            d.connect()
            sched.at(time.time() + rng.uniform(6, 14), lambda: handover(d))

        def takeover(d: Device) -> None:
            old = d.freeze()
            d.connect()  # the same client id: the broker closes the old connection
            if old is not None:
                sched.at(time.time() + 2, lambda: old.socket() and old.socket().close())  # type: ignore[union-attr]
            sched.at(time.time() + rng.uniform(10, 20), lambda: takeover(d))

        def sleep_cycle(d: Device) -> None:
            ms = rng.choice([4_000, 8_000, 12_000])
            d.sleep(ms)

            def wake() -> None:
                d.wanted = True
                d.connect()
                sched.at(time.time() + rng.uniform(5, 10), aside(lambda: sleep_cycle(d)))

            sched.at(time.time() + ms / 1000, wake)

        for d in fleet:
            first = start + t_warm + rng.uniform(0, 5)
            if d.kind == "phone":
                sched.at(first, lambda d=d: handover(d))
            elif d.kind == "legacy":
                sched.at(first, lambda d=d: takeover(d))
            elif d.kind == "sleepy":
                sched.at(first, aside(lambda d=d: sleep_cycle(d)))

        killed_at: dict[str, float] = {}

        def kill(d: Device) -> None:
            d.alive = False
            d.wanted = False
            killed_at[d.user] = d.drop()

        for k, d in enumerate(victims):
            when = duration * (0.3 if k < 3 else 0.85)
            sched.at(start + when + k * 0.7, lambda d=d: kill(d))

        faults: list[str] = []

        def restart_hub() -> None:
            assert hub.proc is not None
            hub.proc.kill()
            hub.proc.wait(10)
            hub.ready_at = None
            hub.start()
            faults.append(f"hub SIGKILL+restart at {time.time() - start:.0f} s")

        def restart_broker() -> None:
            mosq.restart()
            faults.append(f"mosquitto restart at {time.time() - start:.0f} s")

        sched.at(start + duration * 0.45, aside(restart_hub))
        sched.at(start + duration * 0.65, aside(restart_broker))
        counted_from = start + t_warm
        sched.run_until(start + duration)
        # settle: every grace and timeout that was running has run out
        settle = start + duration + (GRACE_MS + 2.5 * 10 * HB_MS) / 1000 + 2
        sched.run_until(settle)
        counted_until = time.time()
        for d in fleet:
            d.wanted = False
            d.alive = False
            if d.client is not None:
                d.client.loop_stop()
        watcher.client.loop_stop()
        hub.stop()
        (Path(mosq.dir).parent / "truth-hub.log").write_text("".join(hub.lines))

    victim_users = {v.user for v in victims}
    counted = [c for c in watcher.changes if counted_from <= c[0] <= counted_until]
    false = [c for c in counted if not (
        c[1] in victim_users and (c[2], c[3]) in (("online", "offline"), ("away", "offline")))]
    true = [c for c in counted if c not in false]
    latencies = []
    for u, t in killed_at.items():
        seen = watcher.offline_after(u, t)
        if seen is not None:
            latencies.append((seen - t) * 1000 - GRACE_MS)
    for f in faults:
        log(f"  fault: {f}")
    for c in false:
        log(f"  false change: {c[1]} {c[2]} -> {c[3]} at {c[0] - start:.1f} s")
    return {
        "truth_devices": float(len(fleet)),
        "truth_duration_s": duration,
        "truth_false_changes": float(len(false)),
        "truth_true_changes": float(len(true)),
        "truth_will_to_offline_p50_ms": percentile(latencies, 50) if latencies else -1.0,
        "truth_will_to_offline_p99_ms": percentile(latencies, 99) if latencies else -1.0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.truth", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=90.0, help="seconds of faults (default 90)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--log-level", default="warning", help="the hub's (its log: <tmp>/truth-hub.log)")
    args = p.parse_args(argv)
    figures = run(args.duration, args.seed, print, args.log_level)
    print(f"false status changes: {figures['truth_false_changes']:.0f} (goal 0); true ones "
          f"(victims going offline): {figures['truth_true_changes']:.0f}")
    print(f"will -> offline past the {GRACE_MS} ms grace: p50 "
          f"{figures['truth_will_to_offline_p50_ms']:.1f} ms, p99 "
          f"{figures['truth_will_to_offline_p99_ms']:.1f} ms (goal p99 <= 50 ms)")
    print("BENCH " + json.dumps(figures))
    return 0 if figures["truth_false_changes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
