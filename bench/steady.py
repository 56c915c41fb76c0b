"""Steady state at N devices on 30 s heartbeats, and will latency under that load.

The hub (``--storage memory``) starts on the benchmark's Mosquitto; its idle RSS is read once
it is ready. The fleet then brings N devices up: each device's first heartbeat (the hub takes
it as an implicit birth) is spread over ``ramp_s`` while every device already up keeps its
30 s period. Once the last device is up and the hub has caught up (a marker came back), the
offered load is exactly N/30 heartbeats a second, and over ``window_s``:

* ``cpu``: the hub's utime+stime over the window, as a share of one core;
* ``rss_per_device``: (VmRSS at the end - VmRSS of the idle hub) / N;
* the marker lag at the end (the hub is keeping up when it stays small).

Will latency, still under that load: ``kills`` real devices (one TCP connection each, with the
agent's retained QoS 1 will) are born, then one at a time the socket is closed with a RST (no
DISCONNECT) and the time until the hub's retained ``P/users/{u}/state`` shows the device
offline is taken. It includes the broker noticing the dead socket, sending the will, the hub's
deliberate 25 ms hold of offline ``conn`` messages (ExternalTransport._hold) and the publish back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import wire
from bench.fleet import Fleet
from bench.infra import (
    BenchError,
    CpuMeter,
    HubProcess,
    Mosquitto,
    Observer,
    percentile,
    rss_bytes,
    wait_until,
)

PERIOD_S = 30.0


@dataclass
class SteadyParams:
    devices: int = 100_000
    #: the first heartbeats (births) are spread over this many seconds
    ramp_s: float = 60.0
    window_s: float = 10.0
    kills: int = 50
    connections: int = 2


def _device_status(payload: bytes, device: str) -> str | None:
    try:
        state = json.loads(payload)
    except ValueError:
        return None
    for d in state.get("devices", ()):
        if d.get("id") == device:
            return str(d.get("status"))
    return None


#: the hub's will grace in this scenario (its default): a will waits this long for the device
#: to come back before it takes effect, so the latency reported is what passes beyond it
WILL_GRACE_S = 1.0


def _will_latency(mosq: Mosquitto, obs: Observer, n: int,
                  tag: str) -> tuple[list[float], list[float]]:
    """(kill to retained offline state past the will grace, kill to the will reaching a plain
    subscriber) per kill."""
    users = [f"bench-will-{tag}-{k}" for k in range(n)]
    obs.subscribe([f"presence/users/{u}/state" for u in users]
                  + [f"presence/devices/{u}/dev/conn" for u in users])
    socks = []
    for k, user in enumerate(users):
        session = f"{tag}w{k}"
        base = f"presence/devices/{user}/dev"
        will = (f"{base}/conn",
                f'{{"state":"offline","session":"{session}","reason":"lost"}}'.encode(), 1, True)
        sock = wire.connect_blocking("127.0.0.1", mosq.port, f"bench-will-{tag}-{k}", will=will,
                                     keepalive=600)
        birth = f'{{"state":"online","session":"{session}","name":"dev","ts":{int(time.time() * 1000)}}}'
        sock.sendall(wire.publish_packet(f"{base}/conn", birth.encode(), qos=1, retain=True, mid=1))
        socks.append(sock)

    def status(user: str) -> str | None:
        got = obs.latest.get(f"presence/users/{user}/state")
        return _device_status(got[1], "dev") if got else None

    wait_until(lambda: all(status(u) == "online" for u in users), 120, "will devices online")
    lat, broker = [], []
    for user, sock in zip(users, socks, strict=True):
        topic = f"presence/users/{user}/state"
        conn = f"presence/devices/{user}/dev/conn"
        t0 = time.time()
        wire.kill(sock)
        wait_until(lambda u=user: status(u) == "offline", 30,  # type: ignore[misc]
                   f"{user} offline after its socket died", 0.0005)
        lat.append(obs.latest[topic][0] - t0 - WILL_GRACE_S)
        got = obs.latest.get(conn)
        if got is not None and b'"offline"' in got[1]:
            broker.append(got[0] - t0)
    return lat, broker


def run(mosq: Mosquitto, p: SteadyParams, log: Callable[[str], None],
        hub_root: str | None = None) -> dict[str, float]:
    out: dict[str, float] = {"steady_devices": float(p.devices), "steady_window_s": p.window_s}
    with Fleet("127.0.0.1", mosq.port, p.devices, connections=p.connections) as fleet, \
            Observer("127.0.0.1", mosq.port, fleet.marker_topics()) as obs, \
            HubProcess(["--broker", mosq.url, "--storage", "memory", "--will-grace",
                        f"{WILL_GRACE_S:g}s"], root=hub_root) as hub:
        time.sleep(1.0)
        idle = rss_bytes(hub.pid)
        out["steady_idle_rss_mb"] = idle / 2**20
        ramp = p.ramp_s
        began = time.time()
        # bring everyone up, then keep heartbeating in the background for the whole scenario
        stop = threading.Event()
        result: dict[str, object] = {}

        def send() -> None:
            try:
                result["r"] = fleet.run(period=PERIOD_S, ramp=ramp, duration=1e9, marker_every=1.0,
                                        stop=stop)
            except BaseException as exc:  # surfaced below
                result["e"] = exc

        th = threading.Thread(target=send, daemon=True)
        th.start()
        try:
            time.sleep(ramp)
            # the hub caught up when a marker sent after the ramp came back with a small lag
            def caught_up() -> bool:
                if not hub.alive():
                    raise BenchError("hub died during the steady run")
                lags = [lag for t, lag in fleet.marker_lags(obs) if t > began + ramp]
                return bool(lags) and lags[-1] is not None and lags[-1] < 1.0

            try:
                up_s = wait_until(caught_up, max(60.0, ramp), "the hub to catch up", 0.2)
                out["steady_caught_up"] = 1.0
            except BenchError:
                up_s = time.time() - began - ramp
                out["steady_caught_up"] = 0.0
                log("  the hub did NOT catch up with the births; measuring anyway")
            out["steady_births_s"] = time.time() - began
            log(f"  {p.devices:,} devices up after {out['steady_births_s']:.0f}s "
                f"(ramp {ramp:.0f}s + {up_s:.0f}s catching up)")
            meter = CpuMeter(hub.pid)
            meter.start()
            w0 = time.time()
            time.sleep(p.window_s)
            out["steady_cpu"] = meter.stop()
            rss = rss_bytes(hub.pid)
            out["steady_rss_mb"] = rss / 2**20
            out["steady_rss_per_device_b"] = (rss - idle) / p.devices
            lags = [lag for t, lag in fleet.marker_lags(obs) if t >= w0 and lag is not None]
            out["steady_lag_max_s"] = max(lags) if lags else float("nan")
            out["steady_rate"] = p.devices / PERIOD_S
            log(f"  steady: cpu {out['steady_cpu']:.1%} of a core, RSS {rss / 2**20:.0f} MB "
                f"({out['steady_rss_per_device_b']:.0f} B/device), max marker lag "
                f"{out['steady_lag_max_s']:.3f}s")
            if p.kills:
                lat, broker = _will_latency(mosq, obs, p.kills, fleet.tag)
                out["will_broker_p50_ms"] = percentile(broker, 50) * 1000
                out["will_p50_ms"] = percentile(lat, 50) * 1000
                out["will_p99_ms"] = percentile(lat, 99) * 1000
                out["will_max_ms"] = max(lat) * 1000
                out["will_kills"] = float(len(lat))
                log(f"  will latency past the {WILL_GRACE_S:g} s grace over {len(lat)} kills: "
                    f"p50 {out['will_p50_ms']:.1f} ms, "
                    f"p99 {out['will_p99_ms']:.1f} ms (the will itself reached a plain subscriber after "
                    f"{out['will_broker_p50_ms']:.1f} ms, p50)")
        finally:
            stop.set()
            th.join(30)
        if "e" in result:
            raise BenchError(f"fleet failed: {result['e']}")
    return out
