"""How many real devices the embedded (amqtt) broker holds under 50% of one core.

The hub runs as ``presence-hub --broker embedded`` (broker and hub in one process, so its
/proc CPU is the whole cost). Devices are real MQTT connections from this process, each doing
what the agent does: CONNECT with its retained QoS 1 will, SUBSCRIBE ``P/users/{user}/+`` and
``P/replies/{user}/{device}`` at QoS 1, a retained QoS 1 birth, then a QoS 0 heartbeat every
30 s at a random phase; QoS 1 messages from the broker are acked. Devices are added in steps;
after each step settles, the hub's CPU is measured over ``window_s`` and the search stops at
the first step above ``limit`` (or when connecting takes too long).

"Settles" means the hub's answers to the births (its state publishes to both devices of each
user) have stopped arriving; the wait is reported, and the CPU window starts after it.

Every device is a socket in this process and one in the hub's, so both raise their soft
open-file limit to the hard one first (the hub does at start); a step beyond what the limit
leaves is cut down to it and the output says so (the search hit a 20,000 limit at 19k).

What used to make it low (amqtt 0.12.1, issue #6): every published message was matched
against every topic filter in turn and every SUBSCRIBE against every retained topic, so a
heartbeat cost O(devices); hub/broker/embedded.py now indexes both (hub/broker/index.py).
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import wire
from bench.infra import BenchError, CpuMeter, HubProcess, free_port, rss_bytes
from hub.process import raise_open_file_limit

PERIOD_S = 30.0
#: Files each process keeps besides the devices' sockets (listeners, logs, pipes, the store).
FILES_SPARE = 100


@dataclass
class EmbeddedParams:
    # up to issue 16's target (20k under 50% of a core); a search past it is --embedded-steps
    steps: tuple[int, ...] = (1000, 5000, 10000, 15000, 20000)
    window_s: float = 8.0
    limit: float = 0.5
    max_connect_s: float = 60.0
    parallel: int = 32


@dataclass
class _Device:
    k: int
    user: str
    dev: str
    writer: asyncio.StreamWriter
    next_hb: float
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    born: asyncio.Event = field(default_factory=asyncio.Event)
    received: int = 0


async def _reader(d: _Device, reader: asyncio.StreamReader) -> None:
    split = wire.Splitter()
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for head, body in split.feed(data):
                kind = head & 0xF0
                if kind == wire.PUBLISH:
                    d.received += 1
                    _t, _p, qos, mid = wire.publish_fields(head, body)
                    if qos:
                        d.writer.write(wire.puback_packet(mid))
                elif kind == wire.SUBACK:
                    d.subscribed.set()
                elif kind == wire.PUBACK:
                    d.born.set()
    except (ConnectionError, OSError):
        return


async def _connect(k: int, port: int, tasks: set[asyncio.Task[None]]) -> _Device:
    user, dev = f"e{k // 2}", f"d{k % 2}"
    session = f"es{k}"
    base = f"presence/devices/{user}/{dev}"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    will = (f"{base}/conn", f'{{"state":"offline","session":"{session}","reason":"lost"}}'.encode(),
            1, True)
    writer.write(wire.connect_packet(f"bench-emb-{k}", keepalive=60, will=will))
    ack = await reader.readexactly(4)
    if ack[0] != wire.CONNACK or ack[3] != 0:
        raise BenchError(f"embedded broker refused device {k}: {ack.hex()}")
    d = _Device(k, user, dev, writer, time.monotonic() + random.uniform(0, PERIOD_S))
    task = asyncio.create_task(_reader(d, reader))
    tasks.add(task)
    writer.write(wire.subscribe_packet([(f"presence/users/{user}/+", 1),
                                        (f"presence/replies/{user}/{dev}", 1)], mid=1))
    birth = f'{{"state":"online","session":"{session}","name":"{dev}","ts":{int(time.time() * 1000)}}}'
    writer.write(wire.publish_packet(f"{base}/conn", birth.encode(), qos=1, retain=True, mid=2))
    await asyncio.wait_for(d.subscribed.wait(), 60)
    await asyncio.wait_for(d.born.wait(), 60)
    return d


async def _heartbeats(due: list[tuple[float, int, _Device]], stop: asyncio.Event) -> None:
    """Send each device's heartbeat when due; ``due`` is a heap of (next time, k, device).

    A heap, so a tick costs what is due: scanning every device 20 times a second cost this
    process ~10% of a core at 10k devices, on the same 2 cores the hub is measured on.
    """
    while not stop.is_set():
        now = time.monotonic()
        while due and due[0][0] <= now:
            _t, k, d = heapq.heappop(due)
            d.next_hb += PERIOD_S
            heapq.heappush(due, (d.next_hb, k, d))
            hb = f'{{"session":"es{d.k}","seq":1,"ts":{int(time.time() * 1000)}}}'
            d.writer.write(wire.publish_packet(f"presence/devices/{d.user}/{d.dev}/heartbeat",
                                               hb.encode()))
        await asyncio.sleep(0.05)


async def _settle(devices: list[_Device], quiet_s: float, limit_s: float) -> float:
    """Wait until the hub's answers to the births stop arriving; return how long that took.

    Each birth makes the hub publish the user's state to both of its devices. Measuring CPU
    while that backlog drains (a fixed 1 s pause did) counts connect work as steady load.
    Devices receive nothing else, so quiet for ``quiet_s`` means drained.
    """
    began = time.monotonic()
    last = -1
    while time.monotonic() - began < limit_s:
        seen = sum(d.received for d in devices)
        if seen == last:
            break
        last = seen
        await asyncio.sleep(quiet_s)
    return time.monotonic() - began


def _fit_steps(steps: tuple[int, ...], log: Callable[[str], None],
               out: dict[str, float]) -> tuple[int, ...]:
    """``steps``, the last ones cut down to what the open-file limit (raised first) allows."""
    limits = raise_open_file_limit()
    if limits is None:
        return steps
    most = limits[1] - FILES_SPARE
    if max(steps) <= most:
        return steps
    log(f"  embedded: the open-file limit is {limits[1]:,} (the hard limit; only an "
        f"administrator can raise it): at most {most:,} devices")
    out["embedded_device_cap"] = float(most)
    return tuple(dict.fromkeys(min(n, most) for n in steps))


async def _scenario(p: EmbeddedParams, log: Callable[[str], None], hub_root: str | None,
                    out: dict[str, float]) -> None:
    steps = _fit_steps(p.steps, log, out)
    port = free_port()
    hub = HubProcess(["--broker", "embedded", "--listen", f"127.0.0.1:{port}", "--storage", "memory"],
                     root=hub_root)
    await asyncio.to_thread(hub.start)
    devices: list[_Device] = []
    due: list[tuple[float, int, _Device]] = []
    tasks: set[asyncio.Task[None]] = set()
    stop = asyncio.Event()
    beat = asyncio.create_task(_heartbeats(due, stop))
    best = 0
    try:
        await asyncio.sleep(1.0)
        idle_rss = rss_bytes(hub.pid)
        for target in steps:
            began = time.monotonic()
            sem = asyncio.Semaphore(p.parallel)

            async def one(k: int, sem: asyncio.Semaphore = sem) -> _Device:
                async with sem:
                    return await _connect(k, port, tasks)

            try:
                new = await asyncio.wait_for(
                    asyncio.gather(*(one(k) for k in range(len(devices), target))),
                    p.max_connect_s)
            except TimeoutError:
                log(f"  embedded: connecting up to {target:,} devices took over "
                    f"{p.max_connect_s:.0f}s; stopping")
                out["embedded_connect_limited"] = 1.0
                break
            devices.extend(new)
            for d in new:
                heapq.heappush(due, (d.next_hb, d.k, d))
            took = time.monotonic() - began
            settled = await _settle(devices, 1.0, p.max_connect_s)
            meter = CpuMeter(hub.pid)
            meter.start()
            await asyncio.sleep(p.window_s)
            cpu = meter.stop()
            rss = rss_bytes(hub.pid)
            per_conn_ms = took / max(1, len(new)) * 1000
            out[f"embedded_cpu_at_{target}"] = cpu
            log(f"  embedded: {target:>6,} devices: cpu {cpu:6.1%}, RSS {rss / 2**20:.0f} MB "
                f"({(rss - idle_rss) / target / 1024:.1f} KiB/device), connecting took "
                f"{per_conn_ms:.1f} ms/device, hub output settled in {settled:.0f}s")
            out["embedded_kib_per_device"] = (rss - idle_rss) / target / 1024
            out[f"embedded_kib_at_{target}"] = out["embedded_kib_per_device"]
            out["embedded_connect_ms_last_step"] = per_conn_ms
            if not hub.alive():
                raise BenchError("embedded hub died")
            if cpu > p.limit:
                out["embedded_cpu_over_limit_at"] = float(target)
                break
            best = target
    finally:
        stop.set()
        await beat
        for d in devices:
            d.writer.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(hub.stop)
    out["embedded_max_devices"] = float(best)


def run(p: EmbeddedParams, log: Callable[[str], None], hub_root: str | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    asyncio.run(_scenario(p, log, hub_root, out))
    return out
