"""``python -m bench``: end-to-end figures of the hub (issue #6), each with its baseline.

Everything runs on 127.0.0.1 against processes this benchmark starts and stops itself: its own
Mosquitto (configured to drop nothing), ``presence-hub`` as a real process (CPU and RSS from
/proc), ``mosquitto_sub`` and a bare paho subscriber as the ingest baselines. Scenarios:

* ``engine``   the sans-I/O engine alone (bench.engine), the ceiling for everything else;
* ``ingest``   ``ingest_ratio_c``: heartbeats/s the hub sustains over ``mosquitto_sub``'s on
               the same broker (the ceiling), and ``ingest_ratio``: over a bare paho subscriber's;
* ``steady``   N devices on 30 s heartbeats: hub CPU share and RSS per device; will latency
               of real device connections killed under that load;
* ``storm``    restart with N devices in TinyDB (ready, all retained state republished), then
               all of them fall silent at once: offline published how long past the deadline;
* ``embedded`` the most agent-like devices the embedded amqtt broker holds under 50% CPU;
* ``who``      ``/presence who`` pages at 100k present users: each page's time and the event
               loop's longest stall while pages are asked in a loop (bench.who).

``--quick`` (what ``make bench`` runs) shrinks every scenario to fit about 3 minutes and says
so in the table; the full run (``make bench-full``) uses the sizes of the issue's targets
(ingest at 30 s a rate, steady state at 100k and 1M devices, the storm at 100k and the restart
at 1M devices) and takes about half an hour. The last line of output is ``BENCH {json}`` with
every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import embedded, ingest, steady, storm, who
from bench.infra import Mosquitto

SCENARIOS = ("engine", "ingest", "steady", "storm", "embedded", "who")

#: target name -> (figure key, comparison, bound, unit, shown as)
TARGETS: tuple[tuple[str, str, str, float, str], ...] = (
    ("ingest_ratio_c >= 0.8 (hub / mosquitto_sub)", "ingest_ratio_c", ">=", 0.8, ""),
    ("ingest_ratio >= 0.8 (hub / bare paho)", "ingest_ratio", ">=", 0.8, ""),
    ("steady CPU < 60% of a core", "steady_cpu", "<", 0.6, ""),
    ("RSS per device <= 1 KiB", "steady_rss_per_device_b", "<=", 1024, " B"),
    ("storm p99 <= 1 s past deadline", "storm_p99_s", "<=", 1.0, " s"),
    ("storm p99 <= 1.25 x the broker's floor", "storm_floor_ratio", "<=", 1.25, ""),
    ("will latency past the grace p99 <= 50 ms", "will_p99_ms", "<=", 50.0, " ms"),
    ("restart ready <= 10 s", "restart_ready_s", "<=", 10.0, " s"),
    ("restart ready+republished <= 10 s", "restart_republished_s", "<=", 10.0, " s"),
    ("republish <= 1.25 x the broker's floor", "restart_republish_ratio", "<=", 1.25, ""),
    ("warm restart ready+consistent <= 10 s", "restart_warm_consistent_s", "<=", 10.0, " s"),
    ("restart peak RSS <= 1.5 GB", "restart_peak_rss_mb", "<=", 1536, " MB"),
    ("embedded: <= 10 KiB per device at 10k", "embedded_kib_at_10000", "<=", 10.0, " KiB"),
    ("embedded >= 20k devices (quick: 10k)", "embedded_max_devices", ">=", 20_000, ""),
    ("who page p99 <= 50 ms at 100k present", "who_page_p99_ms", "<=", 50.0, " ms"),
    ("who: loop never stalls > 20 ms", "who_loop_stall_max_ms", "<=", 20.0, " ms"),
    ("who: ... held by its own work <= 20 ms", "who_loop_busy_max_ms", "<=", 20.0, " ms"),
)


#: targets whose quick run is at a smaller size (figure key -> the quick bound)
QUICK_BOUNDS: dict[str, float] = {"embedded_max_devices": 10_000}


class _Partial(Exception):
    """A scenario of several runs (sizes) in which some failed: the figures of the others."""

    def __init__(self, figures: dict[str, float], why: str) -> None:
        super().__init__(why)
        self.figures = figures


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--quick", action="store_true", help="small sizes, about 3 minutes in all")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (for the test suite)")
    p.add_argument("--only", default=",".join(SCENARIOS),
                   help=f"comma-separated scenarios to run (default: all of {','.join(SCENARIOS)})")
    p.add_argument("--ingest-devices", type=int, help="devices in the ingest fleet")
    p.add_argument("--sustain", type=float, help="seconds a rate must hold in the ingest search")
    p.add_argument("--steady-devices", help="comma-separated N for the steady scenario")
    p.add_argument("--steady-window", type=float, help="seconds of the steady CPU window")
    p.add_argument("--storm-devices", type=int, help="devices in the TinyDB restart and storm")
    p.add_argument("--embedded-steps", help="comma-separated device counts for the embedded search")
    p.add_argument("--kills", type=int, help="will-latency kills")
    p.add_argument("--who-users", type=int, help="present users in the who scenario")
    p.add_argument("--hub-root", help="run the hub from this checkout (to measure a patch)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    return p


def _config(args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:
        cfg: dict[str, Any] = dict(
            ingest=ingest.IngestParams(devices=200, sustain_s=1.0, start_rate=2000, bisect=0,
                                       max_rate=4000),
            steady=[steady.SteadyParams(devices=400, ramp_s=1.0, window_s=1.0, kills=3)],
            storm=storm.StormParams(devices=200, min_heartbeat_s=0.4),
            embedded=embedded.EmbeddedParams(steps=(20, 40), window_s=1.0),
            who=who.WhoParams(users=2_000, pages=20, e2e_pages=2),
            engine=2_000, mode="smoke")
    elif args.quick:
        cfg = dict(
            ingest=ingest.IngestParams(devices=6_000, sustain_s=3.0, bisect=1,
                                       start_rate=40_000, bare_start_rate=20_000),
            steady=[steady.SteadyParams(devices=100_000, ramp_s=30.0, window_s=6.0, kills=20)],
            storm=storm.StormParams(devices=10_000),
            embedded=embedded.EmbeddedParams(steps=(4000, 10000), window_s=6.0),
            who=who.WhoParams(users=100_000),
            engine=20_000, mode="quick")
    else:
        cfg = dict(
            ingest=ingest.IngestParams(devices=20_000, sustain_s=30.0, bisect=3,
                                       start_rate=40_000, bare_start_rate=20_000),
            steady=[steady.SteadyParams(devices=n, ramp_s=max(30.0, n / 5_000), window_s=30.0)
                    for n in (100_000, 1_000_000)],
            storm=storm.StormParams(devices=100_000),
            restart=storm.StormParams(devices=1_000_000, restart_only=True),
            embedded=embedded.EmbeddedParams(window_s=30.0),
            who=who.WhoParams(users=100_000),
            engine=1_000_000, mode="full")
    if args.ingest_devices:
        cfg["ingest"].devices = args.ingest_devices
    if args.sustain:
        cfg["ingest"].sustain_s = args.sustain
    if args.steady_devices:
        base = cfg["steady"][0]
        cfg["steady"] = [steady.SteadyParams(devices=int(n), ramp_s=max(base.ramp_s, int(n) / 5_000),
                                             window_s=base.window_s, kills=base.kills)
                         for n in args.steady_devices.split(",")]
    for s in cfg["steady"]:
        if args.steady_window:
            s.window_s = args.steady_window
        if args.kills is not None:
            s.kills = args.kills
    if args.storm_devices:
        cfg["storm"].devices = args.storm_devices
    if args.who_users:
        cfg["who"].users = args.who_users
    if args.embedded_steps:
        cfg["embedded"].steps = tuple(int(n) for n in args.embedded_steps.split(","))
    return cfg


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _loadavg() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenario(s) {', '.join(sorted(unknown))}: use {', '.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    cfg = _config(args)
    figures: dict[str, float] = {"cpus": float(os.cpu_count() or 0)}
    root = args.hub_root

    def log(line: str) -> None:
        print(line, flush=True)

    log(f"bench ({cfg['mode']}): {', '.join(only)}"
        + (f"; hub from {root}" if root else "") + f"; load average {_loadavg():.2f}")
    began = time.monotonic()
    steps: list[tuple[str, Callable[[], dict[str, float]]]] = []
    if "engine" in only:
        from bench import engine as engine_bench

        def run_engine() -> dict[str, float]:
            r = engine_bench.run(cfg["engine"])
            return {f"engine_{k}": v for k, v in r.items()}

        steps.append(("engine", run_engine))
    if "ingest" in only:
        def run_ingest() -> dict[str, float]:
            with Mosquitto() as mosq:
                return ingest.run(mosq, cfg["ingest"], log, root)

        steps.append(("ingest", run_ingest))
    if "steady" in only:
        def run_steady() -> dict[str, float]:
            out: dict[str, float] = {}
            errors = []
            for i, sp in enumerate(cfg["steady"]):
                try:
                    with Mosquitto() as mosq:
                        r = steady.run(mosq, sp, log, root)
                except Exception as exc:  # the other sizes' figures still count
                    errors.append(f"{sp.devices:,} devices: {type(exc).__name__}: {exc}")
                    continue
                suffix = "" if i == 0 else f"_{sp.devices}"
                out.update({k + suffix: v for k, v in r.items()})
            if errors:
                raise _Partial(out, "; ".join(errors))
            return out

        steps.append(("steady", run_steady))
    if "storm" in only:
        def run_storm() -> dict[str, float]:
            out = storm.run(cfg["storm"], log, root)
            if "restart" not in cfg:
                return out
            # full run: the restart target is at 1M devices, the storm's at 100k
            sfx = f"_{cfg['storm'].devices}"
            out = {(k + sfx if k.startswith("restart_") else k): v for k, v in out.items()}
            try:
                out.update(storm.run(cfg["restart"], log, root))
            except Exception as exc:  # the storm's figures still count
                raise _Partial(out, f"restart of {cfg['restart'].devices:,} devices: "
                                    f"{type(exc).__name__}: {exc}") from exc
            return out

        steps.append(("storm", run_storm))
    if "embedded" in only:
        steps.append(("embedded", lambda: embedded.run(cfg["embedded"], log, root)))
    if "who" in only:
        steps.append(("who", lambda: who.run_process(cfg["who"], log, root)))
    failed = []
    for name, fn in steps:
        t0 = time.monotonic()
        log(f"[{name}]")
        try:
            figures.update(fn())
        except _Partial as exc:  # a part failed: the rest of its figures count
            figures.update(exc.figures)
            failed.append(name)
            log(f"  {name} FAILED in part: {exc}")
        except Exception as exc:  # one failed scenario must not hide the others' figures
            failed.append(name)
            log(f"  {name} FAILED: {type(exc).__name__}: {exc}")
        figures[f"{name}_seconds"] = time.monotonic() - t0
        figures[f"{name}_loadavg"] = _loadavg()
    figures["total_seconds"] = time.monotonic() - began
    _table(figures, cfg, log)
    figures = {k: (None if isinstance(v, float) and math.isnan(v) else v)  # type: ignore[misc]
               for k, v in figures.items()}
    line = json.dumps({"mode": cfg["mode"], "failed": failed, **figures}, sort_keys=True)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    print("BENCH " + line, flush=True)
    return 1 if failed else 0


def _table(f: dict[str, float], cfg: dict[str, Any], log: Callable[[str], None]) -> None:
    mode = cfg["mode"]
    log("")
    log(f"{'figure':<44} {'value':>12}  baseline / note")
    log("-" * 96)

    def row(label: str, key: str, note: str = "") -> None:
        if key in f:
            log(f"{label:<44} {_fmt(f[key]):>12}  {note}")

    row("engine heartbeats/s (no I/O)", "engine_heartbeats_sustained_per_s",
        f"{_fmt(f.get('engine_devices', 0))} devices; the ceiling")
    row("ingest: hub sustained heartbeats/s", "ingest_hub_sustained",
        f"cpu {_fmt(f.get('ingest_hub_cpu', math.nan))} of a core, Mosquitto "
        f"{_fmt(f.get('ingest_hub_broker_cpu', math.nan))}"
        + ("" if f.get("ingest_hub_first_failed") else " (never fell behind: a lower bound)"))
    row("ingest: mosquitto_sub sustained msgs/s", "ingest_c_sustained",
        f"the ceiling, same broker/payloads; cpu {_fmt(f.get('ingest_c_cpu', math.nan))}, "
        f"Mosquitto {_fmt(f.get('ingest_c_broker_cpu', math.nan))}"
        + ("" if f.get("ingest_c_first_failed") else " (never fell behind: a lower bound)"))
    row("ingest: bare paho sustained msgs/s", "ingest_bare_sustained",
        f"second baseline, same broker/payloads; cpu {_fmt(f.get('ingest_bare_cpu', math.nan))}")
    row("ingest_ratio_c (hub / mosquitto_sub)", "ingest_ratio_c", "")
    row("ingest_ratio (hub / bare paho)", "ingest_ratio",
        f"{_fmt(f.get('ingest_devices', 0))} devices, {_fmt(f.get('ingest_sustain_s', 0))} s "
        f"per rate{' (quick: 30 s in full runs)' if mode != 'full' else ''}")
    for key in sorted(k for k in f if k.startswith("steady_devices")):
        sfx = key[len("steady_devices"):]
        n = f[key]
        row(f"steady {int(n):,} dev: hub CPU (share of 1 core)", "steady_cpu" + sfx,
            f"offered {_fmt(n / 30)} hb/s; max marker lag "
            f"{_fmt(f.get('steady_lag_max_s' + sfx, math.nan))} s")
        row(f"steady {int(n):,} dev: RSS per device (B)", "steady_rss_per_device_b" + sfx,
            f"idle hub {_fmt(f.get('steady_idle_rss_mb' + sfx, math.nan))} MB, "
            f"now {_fmt(f.get('steady_rss_mb' + sfx, math.nan))} MB")
        row(f"steady {int(n):,} dev: all up after (s)", "steady_births_s" + sfx,
            "implicit births through the hub")
        row("will past grace p50 (ms)", "will_p50_ms" + sfx,
            f"socket RST -> retained offline state; the will alone reached a subscriber in "
            f"{_fmt(f.get('will_broker_p50_ms' + sfx, math.nan))} ms")
        row("will past grace p99 (ms)", "will_p99_ms" + sfx,
            f"max {_fmt(f.get('will_max_ms' + sfx, math.nan))} ms past the 1 s will grace")
    for key in sorted(k for k in f if k.startswith("restart_ready_s_")):
        sfx = key[len("restart_ready_s"):]
        row(f"restart{sfx.replace('_', ' ')} devices: ready (s)", key,
            f"republished {_fmt(f.get('restart_republished_s' + sfx, math.nan))} s")
    row("restart: ready (s)", "restart_ready_s",
        f"{_fmt(f.get('restart_devices', 0))} devices in TinyDB "
        f"({_fmt(f.get('restart_db_mb', math.nan))} MB)")
    row("restart: all retained republished (s)", "restart_republished_s",
        "spawn to the last state on a fresh broker")
    row("restart: republish, first state to last (s)", "restart_republish_s",
        f"the broker's floor {_fmt(f.get('restart_republish_floor_s', math.nan))} s: the same "
        f"messages from a file (x{_fmt(f.get('restart_republish_ratio', math.nan))})")
    row("restart: warm, ready and consistent (s)", "restart_warm_consistent_s",
        "the broker kept everything (clean stop, digest matches)"
        + (": REPUBLISHED" if f.get("restart_warm_republished") else ": nothing republished"))
    row("restart: hub peak RSS (MB)", "restart_peak_rss_mb", "")
    row("storm: offline p50 past deadline (s)", "storm_p50_s",
        f"{_fmt(f.get('storm_devices', 0))} devices at once, heartbeat "
        f"{_fmt(f.get('storm_heartbeat_s', math.nan))} s")
    row("storm: offline p99 past deadline (s)", "storm_p99_s",
        f"max {_fmt(f.get('storm_max_s', math.nan))} s")
    row("storm: the broker's floor p99 (s)", "storm_floor_p99_s",
        "the storm's messages from a file, same broker config and observer; the hub x"
        f"{_fmt(f.get('storm_floor_ratio', math.nan))}")
    row("embedded: max devices under 50% CPU", "embedded_max_devices",
        f"{_fmt(f.get('embedded_kib_per_device', math.nan))} KiB/device there"
        + (f"; the open-file limit caps the search at {_fmt(f['embedded_device_cap'])}"
           if "embedded_device_cap" in f else ""))
    row("embedded: KiB per device at 10k", "embedded_kib_at_10000", "")
    users = _fmt(f.get("who_users", math.nan))
    row("who: page p99 (ms)", "who_page_p99_ms",
        f"{users} present, pages of {_fmt(f.get('who_page_size', math.nan))}; p50 "
        f"{_fmt(f.get('who_page_p50_ms', math.nan))}; baseline: one pass over all "
        f"{_fmt(f.get('who_scan_page_ms', math.nan))} ms")
    row("who: first page, builds the index (ms)", "who_first_page_ms", "once per hub run")
    row("who: loop's longest stall (ms)", "who_loop_stall_max_ms",
        f"load average {_fmt(f.get('who_loadavg', math.nan))}; longest gc "
        f"{_fmt(f.get('who_gc_max_ms', math.nan))} ms; "
        f"{_fmt(f.get('who_churn_per_s', math.nan))} presence changes/s meanwhile")
    row("who: loop held by its own work (ms)", "who_loop_busy_max_ms",
        "CPU of the loop's thread between two ticks (the stall less the OS's share)")
    row("who: a page over MQTT, req -> reply (ms)", "who_e2e_ms",
        f"max {_fmt(f.get('who_e2e_max_ms', math.nan))} ms")
    log("-" * 96)
    for label, key, op, bound, unit in TARGETS:
        if key not in f or (isinstance(f[key], float) and math.isnan(f[key])):
            continue
        v = f[key]
        if mode != "full":
            bound = QUICK_BOUNDS.get(key, bound)
        ok = {"<": v < bound, "<=": v <= bound, ">=": v >= bound}[op]
        log(f"target {label:<40} {_fmt(v)}{unit:<4} {'MET' if ok else 'NOT MET'}"
            + ("" if mode == "full" else f" ({mode} sizes)"))
    log(f"total {f.get('total_seconds', 0):.0f} s")


if __name__ == "__main__":
    sys.exit(main())
