"""How fast the sans-I/O engine is, without any MQTT or store around it.

``python -m bench.engine [--devices N] [--profile]`` prints:

* heartbeat events per second through ``Engine.handle`` over N devices (users with 1-3
  devices, one heartbeat per device per interval; a fifth carry ``idleMs``; almost none changes
  anything visible): "hot" over the first two intervals, where no deadline is due, is the
  handler alone; "sustained" over six intervals with a tick every 100 ms of hub time adds the
  heap work of lazy rescheduling (every device's timeout entry pops and is pushed again);
* the time one ``tick`` takes to expire N devices whose heartbeat timeouts fall at the same
  millisecond, and how many effects it produced.

Time is the engine's own fake clock, so the figures are pure CPU cost of the rules. ``run`` is
what ``make bench`` calls; it returns the figures as a dict of floats.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import random
import time
from collections import Counter

import hub.core as eng

T0 = 1_700_000_000_000
HOT_ROUNDS = 2  # heartbeat timeouts (2.5 intervals after birth) are not yet due
SUSTAINED_ROUNDS = 6  # 3 minutes of hub time: every timeout entry pops, nobody turns away
TICK_EVERY_MS = 100


def _population(devices: int, seed: int = 7) -> list[tuple[str, str]]:
    """(user, device) pairs: users own 1-3 devices, ``devices`` devices in all."""
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    user = 0
    while len(pairs) < devices:
        for k in range(min(rng.randint(1, 3), devices - len(pairs))):
            pairs.append((f"user-{user}", f"dev-{k}"))
        user += 1
    return pairs


def _born(pairs: list[tuple[str, str]], now: int) -> eng.Engine:
    engine = eng.Engine(eng.EngineConfig())
    for i, (user, device) in enumerate(pairs):
        engine.handle(eng.Birth(user, device, f"s{i}", device), now)
    engine.take_dirty()
    return engine


def _heartbeat_rounds(
    pairs: list[tuple[str, str]], interval: int, n_rounds: int, seed: int = 11
) -> list[list[eng.Heartbeat]]:
    """Rounds of one heartbeat per device; a fifth carry a small ``idleMs``."""
    rng = random.Random(seed)
    rounds = []
    for _ in range(n_rounds):
        hbs = []
        for i, (user, device) in enumerate(pairs):
            idle = rng.randrange(0, interval) if rng.random() < 0.2 else None
            hbs.append(eng.Heartbeat(user, device, f"s{i}", idle))
        rounds.append(hbs)
    return rounds


def _drive(engine: eng.Engine, rounds: list[list[eng.Heartbeat]], start: int, interval: int,
           ticks: bool) -> tuple[float, int, int]:
    """Feed every round, each spread over one heartbeat interval of hub time."""
    n_events = sum(len(r) for r in rounds)
    effects = 0
    handle = engine.handle
    tick = engine.tick
    gc.collect()
    began = time.perf_counter()
    for r, hbs in enumerate(rounds):
        base = start + r * interval
        step = interval / len(hbs)
        next_tick = base + TICK_EVERY_MS
        for j, hb in enumerate(hbs):
            now = base + int(j * step)
            if ticks and now >= next_tick:
                effects += len(tick(now))
                next_tick = now + TICK_EVERY_MS
            effects += len(handle(hb, now))
    elapsed = time.perf_counter() - began
    return elapsed, n_events, effects


def run(devices: int = 100_000) -> dict[str, float]:
    """Measure the heartbeat path and a mass expiry over ``devices`` devices."""
    pairs = _population(devices)
    config = eng.EngineConfig()
    interval = config.heartbeat_interval_ms
    rounds = _heartbeat_rounds(pairs, interval, SUSTAINED_ROUNDS)

    engine = _born(pairs, T0)
    hb_s, n, hb_effects = _drive(engine, rounds[:HOT_ROUNDS], T0 + 1, interval, ticks=False)

    engine = _born(pairs, T0)
    hbt_s, n_t, hbt_effects = _drive(engine, rounds, T0 + 1, interval, ticks=True)
    del engine

    # mass expiry: every device born at the same millisecond, then silence
    engine = _born(pairs, T0)
    gc.collect()
    began = time.perf_counter()
    effects = engine.tick(T0 + config.timeout_ms)
    expire_s = time.perf_counter() - began
    kinds = Counter(type(e).__name__ for e in effects)
    return {
        "devices": float(devices),
        "users": float(len({u for u, _ in pairs})),
        "heartbeats_per_s": n / hb_s,
        "heartbeat_us": hb_s / n * 1e6,
        "heartbeat_effects": float(hb_effects),
        "heartbeats_sustained_per_s": n_t / hbt_s,
        "heartbeat_sustained_effects": float(hbt_effects),
        "expire_s": expire_s,
        "expire_effects": float(len(effects)),
        "expire_timed_out": float(kinds["DeviceTimedOut"]),
        "expire_publishes": float(kinds["PublishState"]),
        "expire_events": float(kinds["EmitEvent"]),
    }


def profile(devices: int) -> None:
    """cProfile of the heartbeat path with ticks, top functions by own time."""
    pairs = _population(devices)
    interval = eng.EngineConfig().heartbeat_interval_ms
    rounds = _heartbeat_rounds(pairs, interval, SUSTAINED_ROUNDS)
    engine = _born(pairs, T0)
    prof = cProfile.Profile()
    prof.enable()
    _drive(engine, rounds, T0 + 1, interval, ticks=True)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=100_000, help="devices (default 100000)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of heartbeats")
    args = parser.parse_args(argv)
    r = run(args.devices)
    print(f"engine, {int(r['devices'])} devices of {int(r['users'])} users")
    print(f"  heartbeats, hot       {r['heartbeats_per_s']:>12,.0f} /s  "
          f"({r['heartbeat_us']:.2f} us each, {int(r['heartbeat_effects'])} effects)")
    print(f"  heartbeats, sustained {r['heartbeats_sustained_per_s']:>12,.0f} /s  "
          f"(with ticks; {int(r['heartbeat_sustained_effects'])} effects)")
    print(f"  expire all in 1 tick  {r['expire_s'] * 1000:>12,.1f} ms  "
          f"({int(r['expire_effects'])} effects: {int(r['expire_timed_out'])} timed out, "
          f"{int(r['expire_publishes'])} publishes, {int(r['expire_events'])} events)")
    if args.profile:
        profile(args.devices)


if __name__ == "__main__":
    main()
