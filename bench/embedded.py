"""How many real devices the embedded (amqtt) broker holds under 50% of one core.

The hub runs as ``presence-hub --broker embedded`` (broker and hub in one process, so its
/proc CPU is the whole cost). Devices are real MQTT connections from this process, each doing
what the agent does: CONNECT with its retained QoS 1 will, SUBSCRIBE ``P/users/{user}/+`` and
``P/replies/{user}/{device}`` at QoS 1, a retained QoS 1 birth, then a QoS 0 heartbeat every
30 s at a random phase; QoS 1 messages from the broker are acked. Devices are added in steps;
after each step settles, the hub's CPU is measured over ``window_s`` and the search stops at
the first step above ``limit`` (or when connecting takes too long).

Why it is expected to be low: amqtt matches every published message against every topic
filter in turn (``Broker._run_broadcast`` loops over ``_subscriptions`` calling ``_matches``),
so a heartbeat costs O(devices x 2 filters) even though nobody subscribes to heartbeats, and a
connect or disconnect walks every filter as well.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import wire
from bench.infra import BenchError, CpuMeter, HubProcess, free_port, rss_bytes

PERIOD_S = 30.0


@dataclass
class EmbeddedParams:
    steps: tuple[int, ...] = (500, 1000, 2000, 3000, 4000, 6000, 8000, 10000, 12000)
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


async def _heartbeats(devices: list[_Device], stop: asyncio.Event) -> None:
    while not stop.is_set():
        now = time.monotonic()
        for d in devices:
            if d.next_hb <= now:
                d.next_hb += PERIOD_S
                hb = f'{{"session":"es{d.k}","seq":1,"ts":{int(time.time() * 1000)}}}'
                d.writer.write(wire.publish_packet(f"presence/devices/{d.user}/{d.dev}/heartbeat",
                                                   hb.encode()))
        await asyncio.sleep(0.05)


async def _scenario(p: EmbeddedParams, log: Callable[[str], None], hub_root: str | None,
                    out: dict[str, float]) -> None:
    port = free_port()
    hub = HubProcess(["--broker", "embedded", "--listen", f"127.0.0.1:{port}", "--storage", "memory"],
                     root=hub_root)
    await asyncio.to_thread(hub.start)
    devices: list[_Device] = []
    tasks: set[asyncio.Task[None]] = set()
    stop = asyncio.Event()
    beat = asyncio.create_task(_heartbeats(devices, stop))
    best = 0
    try:
        await asyncio.sleep(1.0)
        idle_rss = rss_bytes(hub.pid)
        for target in p.steps:
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
            took = time.monotonic() - began
            await asyncio.sleep(1.0)  # let the births' retained publishes go out
            meter = CpuMeter(hub.pid)
            meter.start()
            await asyncio.sleep(p.window_s)
            cpu = meter.stop()
            rss = rss_bytes(hub.pid)
            per_conn_ms = took / max(1, len(new)) * 1000
            out[f"embedded_cpu_at_{target}"] = cpu
            log(f"  embedded: {target:>6,} devices: cpu {cpu:6.1%}, RSS {rss / 2**20:.0f} MB "
                f"({(rss - idle_rss) / target / 1024:.1f} KiB/device), connecting took "
                f"{per_conn_ms:.1f} ms/device")
            out["embedded_kib_per_device"] = (rss - idle_rss) / target / 1024
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
