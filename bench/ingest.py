"""``ingest_ratio_c``: the heartbeat rate the hub sustains over what ``mosquitto_sub`` gets.

The ceiling is the broker itself: how fast a subscriber written in C (``mosquitto_sub`` from
Debian's mosquitto-clients) is fed by the same Mosquitto, from the same fleet. A bare paho
subscriber is measured too (``ingest_ratio``, the figure of the earlier issues: the hub no longer
uses paho, so it says only how far past a Python client the hub is).

All three targets run as their own process against the same Mosquitto, fed by the same fleet
(same devices, same encoded packets, same connections), one after the other in the same run,
and are measured by the same method:

1. warm-up: one round over all devices (the hub takes it as implicit births), until the marker
   comes back, so the measured part is the steady heartbeat path, not births;
2. search: offer a rate for ``sustain_s`` with a marker every 0.5 s per connection; it is
   sustained when the final marker's lag and every lag in the second half are <= ``max_lag_s``
   (a backlog that grows shows up as growing lag; the threshold allows at most
   max_lag_s / sustain_s of deficit, 1.7% at 30 s). Rates double from ``start_rate`` while
   sustained, then ``bisect`` halvings between the last pass and the first failure. Flooding
   instead (offer far more, time the drain) was tried and rejected: the flood costs Mosquitto
   most of a core to parse, so it measured the broker under overload, not the subscriber.
   Also reported: ``drain``, messages / time until the final marker came back in the first
   failed step (what the target processes while it has a backlog).

How each target shows that it has read a marker: the hub publishes it as a retained custom
status; the paho subscriber echoes it on ``bench/echo/...``; ``mosquitto_sub`` prints it (its
``-T`` filter leaves heartbeats unprinted, so it prints only markers, flushed one by one, and
the benchmark reads its stdout through a pipe). ``mosquitto_sub`` and paho subscribe at QoS 1
as the hub does; every message then arrives at the QoS it was published with (heartbeats at
QoS 0, as the protocol says), to all three alike.

``ingest_ratio_c`` = sustained(hub) / sustained(mosquitto_sub); ``ingest_ratio`` =
sustained(hub) / sustained(bare paho). The CPU shares of the target process and of Mosquitto
over the best sustained step are reported too: a target far from a full core while Mosquitto
is near one was fed as fast as the broker could, so its figure is the broker's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from bench import wire
from bench.fleet import Fleet, MarkerFeed
from bench.infra import BenchError, CpuMeter, HubProcess, Mosquitto, Observer, wait_until


@dataclass
class IngestParams:
    devices: int = 6_000
    connections: int = 2
    sustain_s: float = 5.0
    max_lag_s: float = 0.5
    start_rate: float = 5_000.0
    #: where the bare paho subscriber's search starts (it tops out far lower than the others)
    bare_start_rate: float | None = None
    max_rate: float = 200_000.0
    growth: float = 2.0
    bisect: int = 3


class _BareSub(AbstractContextManager["_BareSub"]):
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> _BareSub:
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.baresub", "--port", str(self.port)],
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "READY" not in line:
            raise BenchError(f"bare subscriber did not start: {line!r}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


class _CSub(AbstractContextManager["_CSub"]):
    """``mosquitto_sub`` on every device topic at QoS 1, printing only the markers.

    ``messages`` holds ``(arrival, topic, marker text)`` as an :class:`Observer` does, so the
    fleet times it exactly as it times the others.
    """

    def __init__(self, port: int, prefix: str = "presence") -> None:
        binary = shutil.which("mosquitto_sub")
        if binary is None:
            raise BenchError("mosquitto_sub not installed: apt-get install mosquitto-clients")
        self.argv = [binary, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-k", "600",
                     "-i", f"bench-csub-{port}", "-t", f"{prefix}/devices/+/+/+",
                     "-T", f"{prefix}/devices/+/+/heartbeat", "-v"]
        self.port, self.prefix = port, prefix
        self.proc: subprocess.Popen[str] | None = None
        self.messages: list[tuple[float, str, bytes]] = []
        self._reader: threading.Thread | None = None

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.time()
            topic, _, payload = line.rstrip("\n").partition(" ")
            text = payload.split('"customStatus":"', 1)[-1].split('"', 1)[0]
            self.messages.append((now, topic, text.encode()))

    def __enter__(self) -> _CSub:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True, name="bench-csub")
        self._reader.start()
        # it says nothing once subscribed: a probe marker that comes back says it is
        probe = wire.connect_blocking("127.0.0.1", self.port, f"bench-csub-probe-{self.port}")
        try:
            packet = wire.publish_packet(f"{self.prefix}/devices/bench-probe/p/set",
                                         b'{"customStatus":"probe"}')

            def heard() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    err = self.proc.stderr.read() if self.proc.stderr else ""
                    raise BenchError(f"mosquitto_sub exited: {err[-500:]}")
                probe.sendall(packet)
                return any(text == b"probe" for _, _, text in self.messages)

            wait_until(heard, 10, "mosquitto_sub to subscribe", 0.05)
        finally:
            probe.sendall(wire.DISCONNECT)
            probe.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
        if self._reader is not None:
            self._reader.join(10)


def _measure(fleet: Fleet, observer: MarkerFeed, pid: int, p: IngestParams,
             log: Callable[[str], None], name: str, broker_pid: int,
             start_rate: float | None = None) -> dict[str, float]:
    # 1. warm-up: one round at a moderate pace, then wait for the hub to catch up
    warm_rate = 5_000.0
    finals, _, _ = fleet.run(period=fleet.devices / warm_rate, duration=1e9, rounds=1,
                             marker_every=None)
    fleet.wait_markers(observer, finals, timeout=300)
    # 2. search
    passed, failed = 0.0, 0.0
    cpu = lag_final = drain = broker_cpu = float("nan")
    rate = start_rate or p.start_rate
    tries = bisections = 0
    while True:
        tries += 1
        fleet.markers.clear()
        meter, broker = CpuMeter(pid), CpuMeter(broker_pid)
        meter.start()
        broker.start()
        began = time.time()
        finals, sent, elapsed = fleet.run(period=fleet.devices / rate, duration=p.sustain_s)
        seen = fleet.wait_markers(observer, finals, timeout=300)
        share, broker_share = meter.stop(), broker.stop()
        lags = fleet.marker_lags(observer)
        half = [lag for t, lag in lags if lag is not None and t >= lags[0][0] + p.sustain_s / 2]
        final = max(lag for _, lag in lags[-len(finals):] if lag is not None)
        worst = max([*half, final])
        offered = sent / elapsed
        ok = worst <= p.max_lag_s
        log(f"  {name}: offered {offered:>9,.0f}/s for {p.sustain_s:.0f}s: worst lag {worst:6.3f}s "
            f"-> {'sustained' if ok else 'backlog grows'} (cpu {share:.0%}, "
            f"Mosquitto {broker_share:.0%})")
        if ok:
            if offered > passed:
                passed, cpu, lag_final, broker_cpu = offered, share, final, broker_share
        else:
            if not failed:
                drain = sent / (seen - began)
            failed = offered if not failed else min(failed, offered)
        if not failed:
            if rate * p.growth > p.max_rate:
                break
            rate *= p.growth
        else:
            bisections += 1
            if bisections > p.bisect or tries > 20:
                break
            rate = (passed + failed) / 2 if passed else failed / 2
    return {"sustained": passed, "first_failed": failed, "drain": drain, "cpu": cpu,
            "broker_cpu": broker_cpu,
            "final_lag_s": lag_final}


def run(mosq: Mosquitto, p: IngestParams, log: Callable[[str], None],
        hub_root: str | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    with Fleet("127.0.0.1", mosq.port, p.devices, connections=p.connections) as fleet:
        out["ingest_payload_bytes"] = fleet.mean_payload
        with Observer("127.0.0.1", mosq.port, fleet.echo_topics()) as obs, _BareSub(mosq.port) as bare:
            r = _measure(fleet, obs, bare.pid, p, log, "bare paho", mosq.pid, p.bare_start_rate)
        for k, v in r.items():
            out[f"ingest_bare_{k}"] = v
        with _CSub(mosq.port) as csub:
            r = _measure(fleet, csub, csub.pid, p, log, "mosquitto_sub", mosq.pid)
        for k, v in r.items():
            out[f"ingest_c_{k}"] = v
    # a fresh fleet (new sessions): the hub sees new devices
    with Fleet("127.0.0.1", mosq.port, p.devices, connections=p.connections) as fleet, \
            Observer("127.0.0.1", mosq.port, fleet.marker_topics()) as obs, \
            HubProcess(["--broker", mosq.url, "--storage", "memory"], root=hub_root) as hub:
        r = _measure(fleet, obs, hub.pid, p, log, "hub", mosq.pid)
        if not hub.alive():
            raise BenchError("hub died during the ingest run")
        for k, v in r.items():
            out[f"ingest_hub_{k}"] = v
    out["ingest_devices"] = float(p.devices)
    out["ingest_sustain_s"] = p.sustain_s
    got = out["ingest_hub_sustained"]
    base = out["ingest_bare_sustained"]
    out["ingest_ratio"] = got / base if base else float("nan")
    ceiling = out["ingest_c_sustained"]
    out["ingest_ratio_c"] = got / ceiling if ceiling else float("nan")
    return out
