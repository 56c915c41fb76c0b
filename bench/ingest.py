"""``ingest_ratio``: the heartbeat rate the hub sustains over what a bare paho subscriber gets.

Both targets run as their own process against the same Mosquitto, fed by the same fleet
(same devices, same encoded packets, same connections), and are measured by the same method:

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

``ingest_ratio`` = sustained(hub) / sustained(bare). The CPU share of the target process over
the sustained run is reported too.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from bench.fleet import Fleet
from bench.infra import BenchError, CpuMeter, HubProcess, Mosquitto, Observer


@dataclass
class IngestParams:
    devices: int = 6_000
    connections: int = 2
    sustain_s: float = 5.0
    max_lag_s: float = 0.5
    start_rate: float = 5_000.0
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


def _measure(fleet: Fleet, observer: Observer, pid: int, p: IngestParams,
             log: Callable[[str], None], name: str) -> dict[str, float]:
    # 1. warm-up: one round at a moderate pace, then wait for the hub to catch up
    warm_rate = 5_000.0
    finals, _, _ = fleet.run(period=fleet.devices / warm_rate, duration=1e9, rounds=1,
                             marker_every=None)
    fleet.wait_markers(observer, finals, timeout=300)
    # 2. search
    passed, failed = 0.0, 0.0
    cpu = lag_final = drain = float("nan")
    rate = p.start_rate
    tries = bisections = 0
    while True:
        tries += 1
        fleet.markers.clear()
        meter = CpuMeter(pid)
        meter.start()
        began = time.time()
        finals, sent, elapsed = fleet.run(period=fleet.devices / rate, duration=p.sustain_s)
        seen = fleet.wait_markers(observer, finals, timeout=300)
        share = meter.stop()
        lags = fleet.marker_lags(observer)
        half = [lag for t, lag in lags if lag is not None and t >= lags[0][0] + p.sustain_s / 2]
        final = max(lag for _, lag in lags[-len(finals):] if lag is not None)
        worst = max([*half, final])
        offered = sent / elapsed
        ok = worst <= p.max_lag_s
        log(f"  {name}: offered {offered:>9,.0f}/s for {p.sustain_s:.0f}s: worst lag {worst:6.3f}s "
            f"-> {'sustained' if ok else 'backlog grows'} (cpu {share:.0%})")
        if ok:
            if offered > passed:
                passed, cpu, lag_final = offered, share, final
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
            "final_lag_s": lag_final}


def run(mosq: Mosquitto, p: IngestParams, log: Callable[[str], None],
        hub_root: str | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    with Fleet("127.0.0.1", mosq.port, p.devices, connections=p.connections) as fleet:
        out["ingest_payload_bytes"] = fleet.mean_payload
        with Observer("127.0.0.1", mosq.port, fleet.echo_topics()) as obs, _BareSub(mosq.port) as bare:
            r = _measure(fleet, obs, bare.pid, p, log, "bare paho")
        for k, v in r.items():
            out[f"ingest_bare_{k}"] = v
    # a fresh fleet (new sessions): the hub sees new devices
    with Fleet("127.0.0.1", mosq.port, p.devices, connections=p.connections) as fleet, \
            Observer("127.0.0.1", mosq.port, fleet.marker_topics()) as obs, \
            HubProcess(["--broker", mosq.url, "--storage", "memory"], root=hub_root) as hub:
        r = _measure(fleet, obs, hub.pid, p, log, "hub")
        if not hub.alive():
            raise BenchError("hub died during the ingest run")
        for k, v in r.items():
            out[f"ingest_hub_{k}"] = v
    out["ingest_devices"] = float(p.devices)
    out["ingest_sustain_s"] = p.sustain_s
    base = out["ingest_bare_sustained"]
    out["ingest_ratio"] = out["ingest_hub_sustained"] / base if base else float("nan")
    return out
