"""Restart with N devices in TinyDB, and the timeout storm when N devices fall silent at once.

The TinyDB file is written directly (``TinyDBStore.save_users`` of ``UserRecord``s: users
``u{k}`` with devices ``d0``/``d1``, all connected and online), which is what a hub that was
stopped with a busy fleet leaves behind.

Restart: the hub starts on a fresh Mosquitto, an observer subscribed to ``P/users/+/state``
from before. ``restart_ready_s`` is spawn to banner (store loaded, broker connected);
``restart_republished_s`` is spawn to the last user's retained state arriving.

Storm: on load the hub gives every connected device one heartbeat timeout of grace from the
same ``now``, so all N devices' deadlines fall on the same millisecond: the worst case of a
fleet falling silent at once. Nobody heartbeats. For each user, the deadline is read from the
retained state itself (``max(devices[].lastSeen) + timeout``: lastSeen is the hub's load time),
and the latency is the arrival of the user's retained ``offline`` on ``P/users/{u}/status``
minus that deadline: p50, p99, max. The heartbeat interval is chosen so that the deadline
comes after the start-up republish has finished (timeout >= 1.5 x the restart's republish
time), else the storm would queue behind the republish and measure that.

``restart_peak_rss_mb`` is the hub's peak resident memory (``VmHWM``) once everything is
republished: loading a large file costs memory as well as time.

Warm restart (``restart_warm_*``): the usual restart, the hub's alone. On the broker of the
restart above, the hub is stopped cleanly and started again on the file it left; the broker
kept its session and every retained topic, which the hub checks against the digest its last
run left on ``P/hub/retained`` and then republishes nothing. ``restart_warm_ready_s`` is spawn
to banner, ``restart_warm_consistent_s`` spawn to the hub's log saying that the broker holds
every user's state (or that it republished them all), ``restart_warm_republished`` 1 if it
republished after all (0 is the expected figure).

``python -m bench.storm --devices N --restart-only --repeat 2`` times the restart alone, which
is what tuning the load path needs (``--db FILE`` keeps the generated file between runs: a
1M-device file takes most of a minute to write).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import floor
from bench.fleet import user_count
from bench.floor import Message
from bench.infra import BenchError, HubProcess, Mosquitto, Observer, percentile, wait_until
from hub.protocol import event_json


@dataclass
class StormParams:
    devices: int = 20_000
    min_heartbeat_s: float = 2.0
    #: time the restart and skip the storm (the ``restart_*`` figures only)
    restart_only: bool = False


async def _write_db(path: Path, devices: int) -> None:
    from hub.core.models import DeviceRecord, UserRecord
    from hub.stores.tinydb import TinyDBStore

    now = int(time.time() * 1000) - 1000
    users = []
    for k in range(user_count(devices)):
        devs = [DeviceRecord(id=f"d{j}", name=f"d{j}", session=f"s{k}x{j}", connected=True,
                             status="online", last_seen=now, last_interaction=now)
                for j in range(2) if 2 * k + j < devices]
        users.append(UserRecord(id=f"u{k}", name=f"u{k}", status="online", active_device="d0",
                                version=1, devices=devs))
    store = TinyDBStore(path)
    await store.open()
    await store.save_users(users)
    await store.close()


def write_db(path: Path, devices: int) -> float:
    began = time.monotonic()
    asyncio.run(_write_db(path, devices))
    return time.monotonic() - began


def peak_rss_mb(pid: int) -> float:
    """A live process's peak resident set size (Linux ``VmHWM``); NaN where unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


STORM_FILTERS = ("presence/users/+/state", "presence/users/+/status")
KEPT_LINE = "nothing to republish"
REPUBLISHED_LINE = "republished the retained state of"


def _warm_restart(args: list[str], hub_root: str | None) -> dict[str, float]:
    """The hub started again on the broker its last run stopped cleanly on (see the module
    docstring); its info log says when the broker's state is known to be right."""
    with HubProcess(args, root=hub_root, log_level="info") as hub:
        def decided() -> bool:
            if not hub.alive():
                raise BenchError("hub died while restarting")
            return any(KEPT_LINE in line or REPUBLISHED_LINE in line for line in hub.lines)

        wait_until(decided, 1800, "the restarted hub to take or republish the state", 0.005)
        consistent = time.time()
        return {
            "warm_ready_s": hub.ready_at - hub.started_at,  # type: ignore[operator]
            "warm_consistent_s": consistent - hub.started_at,
            "warm_republished": float(not any(KEPT_LINE in line for line in hub.lines)),
            "warm_peak_rss_mb": peak_rss_mb(hub.pid),
        }


def _hub_run(db: Path, heartbeat_s: float, users: int, log: Callable[[str], None],
             hub_root: str | None, storm: bool, floors: bool = True) -> dict[str, float]:
    out: dict[str, float] = {}
    with Mosquitto() as mosq, \
            Observer("127.0.0.1", mosq.port, STORM_FILTERS) as obs:
        hb_ms = int(heartbeat_s * 1000)
        args = ["--broker", mosq.url, "--storage", "tinydb", "--db", str(db),
                "--heartbeat-interval", f"{hb_ms}ms"]
        if not storm:
            with HubProcess(args, root=hub_root) as hub:
                wait_until(lambda: _all_states(obs, users, hub), 1800,
                           "all retained state republished", 0.05)
                times = [t for topic, (t, _) in obs.snapshot().items() if topic.endswith("/state")]
                out["republished_s"] = max(times) - hub.started_at
                out["republish_s"] = max(times) - min(times)  # its first state to its last
                out["ready_s"] = hub.ready_at - hub.started_at  # type: ignore[operator]
                out["peak_rss_mb"] = peak_rss_mb(hub.pid)
                messages = list(obs.messages)
            # stopped cleanly: the broker keeps every retained topic and the hub's digest
            out.update(_warm_restart(args, hub_root))
            if floors:
                out["republish_floor_s"] = _republish_floor(messages, users)
            return out
        with HubProcess(args, root=hub_root) as hub:
            out["ready_s"] = hub.ready_at - hub.started_at  # type: ignore[operator]

            wait_until(lambda: _all_states(obs, users, hub), 1800,
                       "all retained state republished", 0.05)
            last = max(t for topic, (t, _) in obs.snapshot().items() if topic.endswith("/state"))
            out["republished_s"] = last - hub.started_at
            out["peak_rss_mb"] = peak_rss_mb(hub.pid)
            timeout_ms = hb_ms * 5 // 2

            def all_offline() -> bool:
                if not hub.alive():
                    raise BenchError("hub died during the storm")
                n = sum(1 for topic, (_, p) in obs.snapshot().items()
                        if topic.endswith("/status") and p == b"offline")
                return n >= users

            wait_until(all_offline, timeout_ms / 1000 + 1800, "every user offline", 0.05)
        messages = obs.messages
        deadline: dict[str, float] = {}
        offline_at: dict[str, float] = {}
        for t, topic, payload in messages:
            user = topic.split("/")[2]
            if topic.endswith("/state"):
                try:
                    state = json.loads(payload)
                except ValueError:
                    continue
                seen = [d["lastSeen"] for d in state.get("devices", ()) if d.get("lastSeen")]
                if seen:
                    deadline[user] = (max(seen) + timeout_ms) / 1000
            elif payload == b"offline" and user not in offline_at:
                offline_at[user] = t
        lat = [offline_at[u] - deadline[u] for u in offline_at if u in deadline]
        if not lat:
            raise BenchError("no offline status seen in the storm")
        out["storm_users"] = float(len(lat))
        out["storm_p50_s"] = percentile(lat, 50)
        out["storm_p99_s"] = percentile(lat, 99)
        out["storm_max_s"] = max(lat)
        out["storm_first_s"] = min(lat)
        out["storm_heartbeat_s"] = heartbeat_s
    out.update(_storm_floor(messages, users))
    return out


def _user_states(messages: list[tuple[float, str, bytes]]) -> dict[str, list[bytes]]:
    """Every state payload the observer got, per user, in order."""
    states: dict[str, list[bytes]] = {}
    for _, topic, payload in messages:
        if topic.endswith("/state"):
            states.setdefault(topic.split("/")[2], []).append(payload)
    return states


def _storm_floor(messages: list[tuple[float, str, bytes]], users: int) -> dict[str, float]:
    """The broker's floor for the storm (:mod:`bench.floor`): on a fresh broker holding every
    user's online state, the messages a user going offline takes (its offline ``state``
    exactly as the hub published it, ``status``, the ``statusChange`` and ``offline``
    events), for every user at once; per user, its ``status`` arriving at the observer."""
    setup: list[Message] = []
    storm_burst: list[Message] = []
    for user, payloads in _user_states(messages).items():
        base = f"presence/users/{user}/"
        setup += [(base + "state", payloads[0], True), (base + "status", b"online", True)]
        ts = int(time.time() * 1000)
        storm_burst += [
            (base + "state", payloads[-1], True), (base + "status", b"offline", True),
            (f"presence/events/{user}", event_json("statusChange", user, "online", "offline", ts),
             False),
            (f"presence/events/{user}", event_json("offline", user, "online", "offline", ts),
             False)]
    got = floor.burst(setup, storm_burst, STORM_FILTERS, 2 * users)
    lat = [t for t, topic, _ in got if topic.endswith("/status")]
    return {"storm_floor_p50_s": percentile(lat, 50), "storm_floor_p99_s": percentile(lat, 99),
            "storm_floor_max_s": max(lat)}


def _republish_floor(messages: list[tuple[float, str, bytes]], users: int) -> float:
    """The broker's floor for the republish: on a fresh broker, every user's four retained
    topics as the hub's republish sends them (its ``state`` payload exactly as observed);
    seconds until the last ``state`` arrived."""
    def republish() -> Iterator[Message]:
        for user, payloads in _user_states(messages).items():
            base = f"presence/users/{user}/"
            state = json.loads(payloads[-1])
            yield base + "state", payloads[-1], True
            yield base + "status", state["status"].encode(), True
            yield base + "custom", (state["customStatus"] or "").encode(), True
            yield base + "primary", (state["activeDevice"] or "").encode(), True

    got = floor.burst([], republish(), STORM_FILTERS, 2 * users)
    return max(t for t, topic, _ in got if topic.endswith("/state"))


def _all_states(obs: Observer, users: int, hub: HubProcess) -> bool:
    if not hub.alive():
        raise BenchError("hub died while republishing")
    n = sum(1 for t in obs.snapshot() if t.startswith("presence/users/") and t.endswith("/state"))
    return n >= users


def run(p: StormParams, log: Callable[[str], None], hub_root: str | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-tinydb-") as tmp:
        db = Path(tmp) / "presence.json"
        gen = write_db(db, p.devices)
        log(f"  TinyDB with {p.devices:,} devices ({user_count(p.devices):,} users, "
            f"{db.stat().st_size / 2**20:.0f} MB) written in {gen:.1f}s")
        return run_on(db, p, log, hub_root)


def run_on(db: Path, p: StormParams, log: Callable[[str], None],
           hub_root: str | None = None) -> dict[str, float]:
    """The restart (and unless ``p.restart_only`` the storm) on an already written file."""
    out: dict[str, float] = {"restart_devices": float(p.devices)}
    users = user_count(p.devices)
    out["restart_db_mb"] = db.stat().st_size / 2**20
    pristine = db.read_bytes()
    r = _hub_run(db, 3600.0, users, log, hub_root, storm=False)
    out["restart_ready_s"] = r["ready_s"]
    out["restart_republished_s"] = r["republished_s"]
    out["restart_peak_rss_mb"] = r["peak_rss_mb"]
    log(f"  restart: ready after {r['ready_s']:.2f}s, all retained state after "
        f"{r['republished_s']:.2f}s, hub peak RSS {r['peak_rss_mb']:.0f} MB")
    if "republish_floor_s" in r:
        # the hub's republish (its first state to its last) against the broker's floor
        out["restart_republish_s"] = r["republish_s"]
        out["restart_republish_floor_s"] = r["republish_floor_s"]
        out["restart_republish_ratio"] = r["republish_s"] / r["republish_floor_s"]
        log(f"  republish: the hub's first state to its last {r['republish_s']:.2f}s, the "
            f"broker's floor {r['republish_floor_s']:.2f}s (x{out['restart_republish_ratio']:.2f})")
    for k in ("ready_s", "consistent_s", "republished", "peak_rss_mb"):
        out[f"restart_warm_{k}"] = r[f"warm_{k}"]
    log(f"  warm restart (the broker kept everything): ready after {r['warm_ready_s']:.2f}s, "
        f"consistent after {r['warm_consistent_s']:.2f}s "
        f"({'REPUBLISHED' if r['warm_republished'] else 'nothing republished'}), "
        f"hub peak RSS {r['warm_peak_rss_mb']:.0f} MB")
    if p.restart_only:
        return out
    # storm: the deadline must come after the start-up republish
    timeout_s = max(2.5 * p.min_heartbeat_s, 1.5 * r["republished_s"] + 1.0)
    heartbeat_s = round(timeout_s / 2.5, 1)
    db.write_bytes(pristine)
    s = _hub_run(db, heartbeat_s, users, log, hub_root, storm=True)
    out["storm_devices"] = float(p.devices)
    for k in ("storm_users", "storm_p50_s", "storm_p99_s", "storm_max_s", "storm_first_s",
              "storm_heartbeat_s", "storm_floor_p50_s", "storm_floor_p99_s", "storm_floor_max_s"):
        out[k] = s[k]
    out["storm_floor_ratio"] = s["storm_p99_s"] / s["storm_floor_p99_s"]
    log(f"  storm of {p.devices:,} devices ({int(s['storm_users']):,} users, heartbeat "
        f"{heartbeat_s:g}s): offline p50 {s['storm_p50_s']:.2f}s, p99 {s['storm_p99_s']:.2f}s, "
        f"max {s['storm_max_s']:.2f}s past the deadline")
    log(f"  the broker's floor for the same messages: p50 {s['storm_floor_p50_s']:.2f}s, p99 "
        f"{s['storm_floor_p99_s']:.2f}s, max {s['storm_floor_max_s']:.2f}s "
        f"(hub p99 x{out['storm_floor_ratio']:.2f} of it)")
    return out


def main(argv: list[str] | None = None) -> None:
    """Time restarts alone, repeatedly, against one generated (or kept) TinyDB file."""
    ap = argparse.ArgumentParser(prog="python -m bench.storm", description=main.__doc__)
    ap.add_argument("--devices", type=int, default=StormParams.devices)
    ap.add_argument("--restart-only", action="store_true", help="skip the storm")
    ap.add_argument("--repeat", type=int, default=1, help="restarts on the same file")
    ap.add_argument("--db", type=Path, help="reuse this file if it exists, else write it there")
    ap.add_argument("--hub-root", help="run the hub from this checkout (to measure a patch)")
    args = ap.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    params = StormParams(devices=args.devices, restart_only=args.restart_only)
    for i in range(args.repeat):
        if args.db is None:
            figures = run(params, log, args.hub_root)
        else:
            if not args.db.exists():
                took = write_db(args.db, args.devices)
                log(f"  wrote {args.db} ({args.devices:,} devices) in {took:.1f}s")
            with tempfile.TemporaryDirectory(prefix="bench-tinydb-") as tmp:
                copy = Path(tmp) / "presence.json"  # the hub may rewrite its file
                shutil.copyfile(args.db, copy)
                figures = run_on(copy, params, log, args.hub_root)
        print(json.dumps({"run": i + 1, **figures}), flush=True)


if __name__ == "__main__":
    main()
