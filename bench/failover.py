"""Failover of a standby hub, measured: ``make failover`` (about a minute with the defaults).

Two ``presence-hub --standby`` processes share a private Mosquitto and a private redis-server;
a small fleet of devices heartbeats and records activity. Each run SIGKILLs the active hub and
measures, on this machine's monotonic clock:

* ``kill_to_expiry``: from the SIGKILL until the lease key is gone from Redis (polled every
  5 ms): the lease's TTL minus the age of its last renewal (the hubs run as two machines, as
  far as the lease knows; ``--one-box``: one machine, where a standby takes the lease of a dead
  hub at once);
* ``expiry_to_answer``: from then until the first ``/presence who`` is answered by the new
  active hub (asked in a loop with 0.5 s deadlines), which includes the standby's poll, the
  load from Redis, the broker connection and the session's backlog;
* what was lost: activity published during the failover and not in the new hub's log, and
  status changes to ``offline`` of users whose devices never stopped (both goals: 0).

The killed hub is started again as a standby, so the pair alternates. Prints one line per run
and a ``BENCH {json}`` line with p50/max over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import redis
from paho.mqtt.enums import CallbackAPIVersion

from bench.infra import BenchError, Mosquitto, free_port, percentile, wait_until
from device_agent import AgentConfig
from device_agent.command import HubUnavailable, ask_hub
from hub.protocol import ActivityPayload, ConnPayload, HeartbeatPayload, Topics

READY = "presence hub running"
STANDBY = "presence hub standing by"


class Hub:
    def __init__(self, name: str, args: list[str], workdir: Path, two_boxes: bool) -> None:
        self.two_boxes = two_boxes
        self.name = name
        self.args = args
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def start(self, ready: str) -> None:
        self.lines = []
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.two_boxes:  # else one machine: a standby takes a dead hub's lease at once
            env["PRESENCE_LEASE_HOST"] = f"box-{self.name}"
        self.proc = subprocess.Popen([sys.executable, "-m", "hub.cli", *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=self.workdir, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        wait_until(lambda: any(ready in line for line in self.lines) or self._dead(), 30,
                   f"{self.name} to print {ready!r}")
        if self._dead():
            raise BenchError(f"{self.name} exited:\n" + "".join(self.lines[-20:]))

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def active(self) -> bool:
        return any(READY in line for line in self.lines)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class Fleet:
    """Devices heartbeating every second from one thread, and a watcher of user statuses."""

    def __init__(self, port: int, users: int) -> None:
        self.topics = Topics("presence")
        self.port = port
        self.users = [f"u{i}" for i in range(users)]
        self.clients: list[tuple[str, mqtt.Client, str]] = []
        self.offline: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.activity_sent = 0
        self.watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="failover-watch")
        self.watcher.on_message = self._heard
        self.watcher.connect("127.0.0.1", port)
        self.watcher.subscribe(f"{self.topics.prefix}/users/+/status", qos=1)
        self.watcher.loop_start()
        for user in self.users:
            session = f"s-{user}"
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{user}")
            c.will_set(self.topics.device(user, "pc", "conn"),
                       ConnPayload(state="offline", session=session).to_json(), 1, True)
            c.connect("127.0.0.1", port, keepalive=30)
            c.loop_start()
            c.publish(self.topics.device(user, "pc", "conn"),
                      ConnPayload(state="online", session=session, heartbeat_ms=1000,
                                  ts=int(time.time() * 1000)).to_json(), 1, True)
            self.clients.append((user, c, session))
        self._beater = threading.Thread(target=self._beat, daemon=True)
        self._beater.start()

    def _heard(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload == b"offline" and not msg.retain:
            self.offline.append((time.monotonic(), msg.topic))

    def _beat(self) -> None:
        seq = 0
        while not self._stop.wait(0.5):
            seq += 1
            for user, c, session in self.clients:
                c.publish(self.topics.device(user, "pc", "heartbeat"),
                          HeartbeatPayload(session=session, seq=seq,
                                           ts=int(time.time() * 1000)).to_json(), 0)

    def activity(self, n: int) -> None:
        user, c, _ = self.clients[0]
        for _ in range(n):
            self.activity_sent += 1
            c.publish(self.topics.device(user, "pc", "activity"),
                      ActivityPayload(type="message", channel_id="failover",
                                      data={"n": self.activity_sent}).to_json(), 1)

    def close(self) -> None:
        self._stop.set()
        self._beater.join(5)
        for _, c, _ in self.clients:
            c.loop_stop()
            c.disconnect()
        self.watcher.loop_stop()
        self.watcher.disconnect()


def ask(port: int, command: str, timeout: float) -> Any:
    config = AgentConfig.from_values(broker=f"mqtt://127.0.0.1:{port}", user="u0",
                                     device="bench", state_file="", outbox=os.devnull)
    return ask_hub(config, command, timeout)


def run(runs: int, lease_ttl: str, users: int, log: Any, two_boxes: bool = True
        ) -> dict[str, Any]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        raise BenchError("redis-server not installed: apt-get install redis-server")
    rport = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    rproc = subprocess.Popen([binary, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(port=rport)
    wait_until(lambda: _pings(r), 10, "redis-server")
    results: list[dict[str, float]] = []
    with Mosquitto(persistence=False) as mosq:
        common = ["--broker", mosq.url, "--storage", "redis", "--redis-url",
                  f"redis://127.0.0.1:{rport}/0", "--standby", "--lease-ttl", lease_ttl,
                  "--heartbeat-interval", "1s", "--stats-interval", "0", "--log-level",
                  "warning"]
        hubs = [Hub(n, [*common, "--hub-name", n], tmp, two_boxes) for n in ("hub-a", "hub-b")]
        hubs[0].start(READY)
        hubs[1].start(STANDBY)
        fleet = Fleet(mosq.port, users)
        try:
            wait_until(lambda: _answers(mosq.port), 20, "the first answer")
            for i in range(runs):
                active = next(h for h in hubs if h.active())
                standby = next(h for h in hubs if h is not active)
                fleet.activity(5)
                wait_until(lambda: _activity(mosq.port) >= fleet.activity_sent, 20,
                           "activity before the kill")
                flaps_before = len(fleet.offline)
                active.kill()
                killed = time.monotonic()
                fleet.activity(5)  # during the failover: the broker queues it for the hub
                expired = killed
                while r.exists("presence:hub:lease") and \
                        json.loads(r.get("presence:hub:lease") or b"{}").get("name") == active.name:
                    time.sleep(0.005)
                    expired = time.monotonic()
                answered = _first_answer(mosq.port)
                wait_until(lambda: _activity(mosq.port) >= fleet.activity_sent, 20,
                           "activity of the failover")
                lost = fleet.activity_sent - _activity(mosq.port)
                flaps = len(fleet.offline) - flaps_before
                row = {"kill_to_expiry_s": expired - killed,
                       "expiry_to_answer_s": answered - expired,
                       "kill_to_answer_s": answered - killed, "lost": lost, "flaps": flaps}
                results.append(row)
                log(f"run {i + 1}: {standby.name} took over; "
                    + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()))
                active.start(STANDBY)
        finally:
            fleet.close()
            for h in hubs:
                h.stop()
    rproc.terminate()
    rproc.wait(10)
    shutil.rmtree(tmp, ignore_errors=True)

    def stat(key: str) -> dict[str, float]:
        values = [row[key] for row in results]
        return {"p50": round(percentile(values, 50), 3), "max": round(max(values), 3)}

    return {"bench": "failover", "runs": runs, "lease_ttl": lease_ttl, "users": users,
            "boxes": 2 if two_boxes else 1,
            "kill_to_expiry_s": stat("kill_to_expiry_s"),
            "expiry_to_answer_s": stat("expiry_to_answer_s"),
            "kill_to_answer_s": stat("kill_to_answer_s"),
            "lost_activity": sum(int(row["lost"]) for row in results),
            "offline_flaps": sum(int(row["flaps"]) for row in results)}


def _pings(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.RedisError:
        return False


def _answers(port: int) -> bool:
    try:
        return bool(ask(port, "/presence who", 0.5).ok)
    except HubUnavailable:
        return False


def _first_answer(port: int) -> float:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _answers(port):
            return time.monotonic()
    raise BenchError("no hub answered within 60 s of the failover")


def _activity(port: int) -> int:
    try:
        reply = ask(port, "/presence activity --limit 1000", 2.0)
    except HubUnavailable:
        return -1
    return sum(1 for e in reply.data or [] if e.get("channelId") == "failover")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--lease-ttl", default="5s", help="the hubs' --lease-ttl (default 5s)")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--one-box", action="store_true",
                        help="the hubs know they share a machine: a standby takes a dead hub's "
                        "lease at once (default: two machines, the takeover waits for the TTL)")
    args = parser.parse_args(argv)
    result = run(args.runs, args.lease_ttl, args.users, lambda line: print(line, flush=True),
                 two_boxes=not args.one_box)
    print("BENCH " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
