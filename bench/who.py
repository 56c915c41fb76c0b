"""``who`` at N present users: each page's time, and the event loop's longest stall meanwhile.

The hub runs in this process (``create_presence_service`` on the benchmark's Mosquitto, memory
storage): N users made present through the service's own API (a device set online each, no
100k MQTT clients needed), then ``/presence who --limit P --after ...`` asked in a loop through
the same command handler the MQTT requests reach, walking the pages in order while a churn task
takes some users offline and brings others back (so the pages are asked of a hub whose present
set changes, as a live one's does). Measured:

* ``who_page_p99_ms`` (and p50, max): one page, command parsed, users found, text and data
  built; the goal is 50 ms at 100k present users;
* ``who_loop_stall_max_ms``: the longest the event loop went without running a ticker timer
  that asks to run every millisecond (its delay past the millisecond); the goal is
  20 ms. On a shared machine a gap also holds the time the OS gave the core to another
  process, so ``who_loop_busy_max_ms`` is the most CPU time the loop's thread spent between
  two ticks: the loop held by its own work, whatever the rest of the machine did;
* ``who_first_page_ms``: the first page, which also builds the index of present users (in
  bounded steps, the loop running in between: hub.core.sortedset);
* ``who_gc_max_ms``: the longest garbage collection while the pages were asked (a stall of
  the interpreter, not of ``who``: the hub freezes what it loaded at start, as here, but users
  that came later are the collector's to walk);
* ``who_scan_page_ms``: the baseline, measured in the same run: a page found the way it was
  before the index, in one pass over every present user (the engine's ``get_online_users``
  with a limit; median of a few pages, the loop held for each);
* ``who_e2e_ms``: one page over MQTT from a client's ``req`` to its ``reply`` (median of a few),
  on the same hub once its publishing of the users' state is done.

The hub process is tuned as ``presence-hub`` tunes itself at start (hub.process.tune_gc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import wire
from bench.infra import BenchError, Mosquitto, percentile
from hub.app.commands import run_command
from hub.app.factory import create_presence_service
from hub.app.service import PresenceService
from hub.process import tune_gc


@dataclass
class WhoParams:
    users: int = 100_000
    page: int = 200
    #: pages asked in a loop (the walk starts over at the end); 0: one walk over every page
    pages: int = 0
    #: users taken offline (and as many brought back) a second while the pages are asked
    churn_per_s: float = 500.0
    e2e_pages: int = 5


#: seconds without a reply before a request is sent again (see _e2e)
RESEND_S = 2.0


def _uid(i: int) -> str:
    return f"user-{i:07d}"


class _Ticker:
    """The loop's longest stall: a timer that asks to run every millisecond.

    A plain ``call_later`` callback, not a task that sleeps: a task's wake-up is one more
    callback, run one loop iteration after its timer, so a task-based ticker saw the work of
    two or three iterations as one stall (a page of about 5 ms each: 15-30 ms measured where
    no iteration held the loop over 6.4 ms). A timer callback runs in the first iteration
    after it is due, so its lateness is what one iteration held the loop.
    """

    PERIOD = 0.001

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_cpu = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._last = 0.0
        self._last_cpu = 0.0

    def _tick(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        late = now - self._last - self.PERIOD
        if late > self.worst:
            self.worst = late
        if cpu - self._last_cpu > self.worst_cpu:
            self.worst_cpu = cpu - self._last_cpu
        self._last, self._last_cpu = now, cpu
        self._handle = asyncio.get_running_loop().call_later(self.PERIOD, self._tick)

    def start(self) -> None:
        self._last, self._last_cpu = time.perf_counter(), time.thread_time()
        self._handle = asyncio.get_running_loop().call_later(self.PERIOD, self._tick)

    async def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def _populate(presence: PresenceService, users: int, log: Callable[[str], None]) -> float:
    began = time.perf_counter()
    for i in range(users):
        await presence.set_device_status(_uid(i), "d0", "online")
        if i % 2000 == 1999:
            await asyncio.sleep(0)  # the clock task and the MQTT side run in between
    took = time.perf_counter() - began
    log(f"  {users:,} users present through the service in {took:.1f}s")
    return took


async def _churn(presence: PresenceService, users: int, per_s: float, stop: asyncio.Event) -> int:
    """Take random users offline and bring earlier ones back, ``per_s`` each a second."""
    rnd = random.Random(16)
    away: list[str] = []
    changes = 0
    step = 0.01
    per_step = max(1, round(per_s * step))
    while not stop.is_set():
        for _ in range(per_step):
            uid = _uid(rnd.randrange(users))
            await presence.set_device_status(uid, "d0", "offline")
            away.append(uid)
            changes += 1
            if len(away) > 200:
                await presence.set_device_status(away.pop(0), "d0", "online")
                changes += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), step)
    return changes


async def _pages(presence: PresenceService, p: WhoParams) -> tuple[list[float], int]:
    """Ask pages in a loop, walking them in order; the time of each and the users listed."""
    times: list[float] = []
    listed = 0
    after: str | None = None
    while True:
        cmd = f"/presence who --limit {p.page}" + (f" --after {after}" if after else "")
        t0 = time.perf_counter()
        res = await run_command(presence, "bench-who", cmd)
        times.append(time.perf_counter() - t0)
        if not res.ok or not isinstance(res.data, dict):
            raise BenchError(f"who failed: {res.text[:200]}")
        listed += len(res.data["users"])
        after = res.data["next"]
        if (after is None and not p.pages) or (p.pages and len(times) >= p.pages):
            break
        await asyncio.sleep(0)  # as requests arriving one by one would let the loop run
    return times, listed


def _e2e(port: int, command: str, tries: int, want: int | None = None) -> list[float]:
    """``req`` -> ``reply`` of ``command`` over MQTT, ``tries`` times (blocking); with ``want``,
    the reply must list users, ``want`` at most.

    A request the hub did not answer within ``RESEND_S`` is sent again under a new id (the time
    still counts from the first): the hub hears commands on a second connection of its own,
    which may subscribe a moment after its first, and a request sent before then is lost."""
    sock = wire.connect_blocking("127.0.0.1", port, "bench-who-client")
    split = wire.Splitter()
    out: list[float] = []
    mid = 0
    try:
        sock.sendall(wire.subscribe_packet([("presence/replies/bench-who/cli", 1)]))
        while not any(h & 0xF0 == wire.SUBACK for h, _ in split.feed(sock.recv(65536))):
            pass
        for n in range(tries):
            t0 = time.perf_counter()
            sent: set[bytes] = set()
            got = False
            while not got:
                if time.perf_counter() - t0 > 120:
                    raise BenchError(f"{command} over MQTT: no reply within 120 s")
                mid += 1
                rid = f"r-who-{n}-{mid}"
                req = json.dumps({"id": rid, "command": command}).encode()
                sent.add(rid.encode())
                sock.sendall(wire.publish_packet("presence/devices/bench-who/cli/req", req, 1,
                                                 mid=mid))
                resend_at = time.perf_counter() + RESEND_S
                while not got and time.perf_counter() < resend_at:
                    sock.settimeout(max(0.01, resend_at - time.perf_counter()))
                    try:
                        data = sock.recv(262144)
                    except TimeoutError:
                        break
                    if not data:
                        raise BenchError("broker closed the who client's connection")
                    for head, body in split.feed(data):
                        if head & 0xF0 != wire.PUBLISH:
                            continue
                        _topic, payload, qos, pmid = wire.publish_fields(head, body)
                        if qos:
                            sock.sendall(wire.puback_packet(pmid))
                        reply = json.loads(payload)
                        if got or str(reply.get("id")).encode() not in sent:
                            continue
                        if not reply.get("ok") or (
                                want is not None
                                and not 0 < len(reply["data"]["users"]) <= want):
                            raise BenchError(f"{command} over MQTT: {reply.get('text', '')[:200]}")
                        out.append(time.perf_counter() - t0)
                        got = True
            if n + 1 < tries:
                time.sleep(0.25)  # under the request rate limit of one device
    except OSError as exc:
        raise BenchError(f"{command} over MQTT: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            sock.sendall(wire.DISCONNECT)
        sock.close()
    return out


class _GcWatch:
    """The longest garbage collection while it is on."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._began = 0.0

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.worst = max(self.worst, time.perf_counter() - self._began)

    def __enter__(self) -> _GcWatch:
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._cb)


async def _run(mosq: Mosquitto, p: WhoParams, log: Callable[[str], None]) -> dict[str, float]:
    out: dict[str, float] = {"who_users": float(p.users), "who_page_size": float(p.page)}
    presence = create_presence_service(broker=mosq.url, storage="memory", device_rate=None)
    async with presence:
        tune_gc()
        out["who_populate_s"] = await _populate(presence, p.users, log)
        # every user's state is published first: a command behind it says when that is done
        drained = await asyncio.to_thread(_e2e, mosq.port, "/presence", 1)
        log(f"  the hub published their state {drained[0]:.1f}s later")
        ticker = _Ticker()
        stop = asyncio.Event()
        churn = asyncio.get_running_loop().create_task(
            _churn(presence, p.users, p.churn_per_s, stop))
        ticker.start()
        began = time.perf_counter()
        try:
            with _GcWatch() as gcw:
                times, listed = await _pages(presence, p)
        finally:
            took = time.perf_counter() - began
            stop.set()
            changes = await churn
            await ticker.stop()
        e2e = await asyncio.to_thread(_e2e, mosq.port, f"/presence who --limit {p.page}",
                                      p.e2e_pages, p.page)
        scans = []
        for k in range(5):  # the baseline: one pass over every present user per page
            t0 = time.perf_counter()
            presence.engine.get_online_users(None, presence.clock.now(), p.page + 1,
                                             _uid(k * p.users // 5))
            scans.append(time.perf_counter() - t0)
    ms = [t * 1000 for t in times]
    out.update({
        "who_pages": float(len(ms)),
        "who_listed": float(listed),
        "who_first_page_ms": ms[0],
        "who_page_p50_ms": percentile(ms[1:] or ms, 50),
        "who_page_p99_ms": percentile(ms[1:] or ms, 99),
        "who_page_max_ms": max(ms[1:] or ms),
        "who_loop_stall_max_ms": ticker.worst * 1000,
        "who_loop_busy_max_ms": ticker.worst_cpu * 1000,
        "who_gc_max_ms": gcw.worst * 1000,
        "who_churn_per_s": changes / took if took else 0.0,
        "who_scan_page_ms": statistics.median(scans) * 1000,
        "who_e2e_ms": statistics.median(e2e) * 1000,
        "who_e2e_max_ms": max(e2e) * 1000,
    })
    log(f"  {len(ms)} pages of {p.page} ({listed:,} users listed) in {took:.1f}s with "
        f"{out['who_churn_per_s']:.0f} presence changes/s: first page (builds the index) "
        f"{ms[0]:.1f} ms, then p50 {out['who_page_p50_ms']:.1f} ms, p99 "
        f"{out['who_page_p99_ms']:.1f} ms, max {out['who_page_max_ms']:.1f} ms; loop stall max "
        f"{out['who_loop_stall_max_ms']:.1f} ms, held by its own work at most "
        f"{out['who_loop_busy_max_ms']:.1f} ms; longest gc {out['who_gc_max_ms']:.1f} ms")
    log(f"  a page over MQTT (req -> reply): {', '.join(f'{t * 1000:.1f}' for t in e2e)} ms; "
        f"a page by one pass over all present users (before the index): "
        f"{out['who_scan_page_ms']:.1f} ms")
    return out


def run(mosq: Mosquitto, p: WhoParams, log: Callable[[str], None]) -> dict[str, float]:
    return asyncio.run(_run(mosq, p, log))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.who", description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=WhoParams.users)
    ap.add_argument("--page", type=int, default=WhoParams.page)
    ap.add_argument("--pages", type=int, default=WhoParams.pages)
    ap.add_argument("--churn", type=float, default=WhoParams.churn_per_s,
                    help="users taken offline (and as many brought back) a second")
    ap.add_argument("--e2e-pages", type=int, default=WhoParams.e2e_pages)
    args = ap.parse_args(argv)
    with Mosquitto() as mosq:
        r = run(mosq, WhoParams(users=args.users, page=args.page, pages=args.pages,
                                churn_per_s=args.churn, e2e_pages=args.e2e_pages),
                lambda line: print(line, flush=True))
    print("BENCH " + json.dumps(r, sort_keys=True))
    return 0


def run_process(p: WhoParams, log: Callable[[str], None],
                hub_root: str | None = None) -> dict[str, float]:
    """:func:`run` in a process of its own, as ``python -m bench`` runs it: the hub measured
    here lives in the benchmark's process, and what earlier scenarios left in that process
    (threads, a heap grown by a million devices) made its loop stall twice as long."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # this benchmark's bench.who, with the hub of ``hub_root`` when given (imported first, so
    # the package comes from there whatever else is on the path)
    boot = ("import runpy, sys; sys.path[:0] = [p for p in sys.argv[1:3] if p]; import hub; "
            "sys.path.insert(0, sys.argv[2]); del sys.argv[1:3]; "
            "runpy.run_module('bench.who', run_name='__main__', alter_sys=True)")
    argv = [sys.executable, "-c", boot, hub_root or "", here, "--users", str(p.users),
            "--page", str(p.page), "--pages", str(p.pages), "--churn", str(p.churn_per_s),
            "--e2e-pages", str(p.e2e_pages)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    result: dict[str, float] | None = None
    tail: list[str] = []
    for line in proc.stdout:
        if line.startswith("BENCH "):
            result = json.loads(line[len("BENCH "):])
        else:
            log(line.rstrip("\n"))
            tail = [*tail[-20:], line]
    if proc.wait() != 0 or result is None:
        raise BenchError(f"bench.who exited with {proc.returncode}: {''.join(tail)[-1500:]}")
    return result


if __name__ == "__main__":
    sys.exit(main())
