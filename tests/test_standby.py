"""A standby hub (issue 13): two real hub processes on a real Mosquitto and a real redis-server.

The active hub holds a lease in Redis; the standby takes over when it lapses. What must hold:
SIGKILL of the active hub: the standby answers commands within a few seconds, no user flaps
offline, custom status, manual status and activity are kept (activity published while no hub
was active too); the old hub restarted stands by. SIGSTOP of the active hub past its lease,
then SIGCONT: it writes nothing (fencing) and stands by. Both hubs killed, one restarted:
nothing lost. Lease TTL 1 s to keep the runs short; ``make failover`` measures the times.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent import AgentConfig
from device_agent.command import HubUnavailable, ask_hub
from hub.core.models import UserRecord
from hub.protocol import ReplyPayload
from hub.stores import StoreError, StoreFenced
from hub.stores.lease import RedisLease
from hub.stores.redis import RedisStore
from hub.stores.tinydb import TinyDBStore
from tests.support.hub_process import STANDBY_LINE, HubProcess
from tests.support.mqtt_clients import SimDevice, Watcher
from tests.support.procs import MosquittoProcess, RedisProcess, free_port
from tests.support.wait import wait_for
from tests.test_agent_helpers import TcpProxy

pytestmark = pytest.mark.slow


def hub_args(mosq: MosquittoProcess, redis: RedisProcess | str, name: str) -> list[str]:
    redis_url = redis if isinstance(redis, str) else redis.url
    return ["--broker", mosq.url, "--storage", "redis", "--redis-url", redis_url, "--standby",
            "--lease-ttl", "1s", "--hub-name", name, "--heartbeat-interval", "1s",
            "--will-grace", "500ms", "--flush-interval", "200ms", "--stats-interval", "0"]


def ask(mosq: MosquittoProcess, user: str, command: str, timeout: float = 8.0) -> ReplyPayload:
    config = AgentConfig.from_values(broker=mosq.url, user=user, device="cli", state_file="",
                                     outbox=os.devnull)
    return ask_hub(config, command, timeout)


def first_answer(mosq: MosquittoProcess, user: str, command: str, within: float) -> float:
    """Ask until the hub answers; the monotonic time of the answer."""
    deadline = time.monotonic() + within
    while True:
        try:
            reply = ask(mosq, user, command, timeout=1.0)
            assert reply.ok, reply.text
            return time.monotonic()
        except HubUnavailable:
            if time.monotonic() > deadline:
                raise


def device(mosq: MosquittoProcess, user: str, dev: str) -> SimDevice:
    d = SimDevice(mosq.host, mosq.port, user, dev).online(heartbeat_ms=1000)
    d.start_heartbeats(0.3)
    return d


def stored(redis: RedisProcess, user: str) -> UserRecord:
    async def load() -> UserRecord:
        store = RedisStore(redis.url, namespace="presence")
        await store.open()
        try:
            return next(u for u in await store.load_users() if u.id == user)
        finally:
            await store.close()

    return asyncio.run(load())


def hub_status(redis: RedisProcess) -> str:
    out = subprocess.run([sys.executable, "-m", "hub.cli", "status", "--redis-url", redis.url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode in (0, 3), out.stderr
    return out.stdout


def healthz(hub: HubProcess) -> dict[str, Any]:
    port = hub.args[hub.args.index("--http") + 1].rpartition(":")[2]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
        body: dict[str, Any] = json.load(answer)
        return body


@pytest.fixture
def hubs(tmp_path: Path, mosquitto: MosquittoProcess,
         own_redis: RedisProcess) -> Iterator[tuple[HubProcess, HubProcess]]:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    # two machines, as far as the lease knows: a takeover waits for the lease to lapse
    a = HubProcess(hub_args(mosquitto, own_redis, "hub-a"), tmp_path / "a",
                   env={"PRESENCE_LEASE_HOST": "box-a"})
    b = HubProcess([*hub_args(mosquitto, own_redis, "hub-b"), "--http",
                    f"127.0.0.1:{free_port()}"], tmp_path / "b",
                   env={"PRESENCE_LEASE_HOST": "box-b"})
    try:
        a.start()
        b.start(ready_line=STANDBY_LINE)
        yield a, b
    finally:
        for h in (a, b):
            if h.proc is not None and h.proc.poll() is None:
                h.resume()
            h.close()


def test_sigkill_of_the_active_hub_the_standby_takes_over_and_nothing_is_lost(
        hubs: tuple[HubProcess, HubProcess], mosquitto: MosquittoProcess,
        own_redis: RedisProcess, tmp_path: Path) -> None:
    a, b = hubs
    watcher = Watcher(mosquitto.host, mosquitto.port).start()
    alice, bob = device(mosquitto, "alice", "laptop"), device(mosquitto, "bob", "phone")
    try:
        watcher.wait_status("alice", "online")
        watcher.wait_status("bob", "online")
        assert ask(mosquitto, "alice", '/presence status "In a meeting"').ok
        assert ask(mosquitto, "bob", "/presence dnd").ok
        for _ in range(3):
            alice.activity(channel="c1")
        wait_for(lambda: len(ask(mosquitto, "alice", "/presence activity").data or []) >= 3, 10,
                 "the activity recorded")
        # a hub that is not --standby is refused while the lease is held, in one line
        single = subprocess.run(
            [sys.executable, "-m", "hub.cli", *[x for x in hub_args(mosquitto, own_redis, "c")
                                                if x != "--standby"]],
            capture_output=True, text=True, timeout=30)
        assert single.returncode == 1
        last = single.stderr.strip().splitlines()[-1]
        assert "another hub is active on this Redis store: hub-a" in last
        assert "Traceback" not in single.stderr
        assert "hub-a" in hub_status(own_redis)

        # a standby's health check answers (a container runtime must not restart it)
        health = healthz(b)
        assert (health["role"], health["active"].split(" ")[0]) == ("standby", "hub-a")

        seen = {u: len(watcher.statuses_seen(u)) for u in ("alice", "bob")}
        a.kill()
        killed = time.monotonic()
        for _ in range(2):  # while no hub is active: the broker keeps it for the hub's session
            alice.activity(channel="c2")
        answered = first_answer(mosquitto, "bob", "/presence who", within=15)
        assert answered - killed < 10
        assert answered - killed > 0.3  # on another box: after the lease lapsed (1 s TTL)
        b.wait_line("presence hub running")
        assert "took the lease over" in b.output()
        assert healthz(b)["role"] == "active"

        assert ask(mosquitto, "alice", "/presence").data["customStatus"] == "In a meeting"
        watcher.wait_status("bob", "dnd")
        activity = ask(mosquitto, "alice", "/presence activity").data
        assert sorted(e.get("channelId") for e in activity) == ["c1"] * 3 + ["c2"] * 2
        for user in ("alice", "bob"):
            assert "offline" not in watcher.statuses_seen(user)[seen[user]:], user
        assert watcher.status("alice") == "online"

        a.start(ready_line=STANDBY_LINE)  # the old active hub comes back as a standby
        assert "hub-b" in hub_status(own_redis)
    finally:
        for d in (alice, bob):
            d.close()
        watcher.close()


def test_a_paused_active_hub_writes_nothing_once_its_lease_is_taken_over(
        hubs: tuple[HubProcess, HubProcess], mosquitto: MosquittoProcess,
        own_redis: RedisProcess) -> None:
    a, b = hubs
    watcher = Watcher(mosquitto.host, mosquitto.port).start()
    alice = device(mosquitto, "alice", "laptop")
    try:
        watcher.wait_status("alice", "online")
        assert ask(mosquitto, "alice", '/presence status "Before"').ok
        seen = len(watcher.statuses_seen("alice"))
        a.pause()
        paused = time.monotonic()
        b.wait_line("presence hub running")
        assert ask(mosquitto, "alice", '/presence status "After"').ok
        # long enough that every timer of the paused hub is due when it wakes: alice's
        # device (1 s heartbeats, timed out after 2.5 s) was silent to it all that time
        wait_for(lambda: time.monotonic() - paused > 3.5, 10, "the pause")
        mark = len(a.lines)
        a.resume()
        a.wait_line(STANDBY_LINE, after=mark)
        assert "no longer the active one" in "\n".join(a.lines[mark:])
        assert "hub-b" in hub_status(own_redis)
        record = stored(own_redis, "alice")
        assert record.custom_status == "After"
        assert ask(mosquitto, "alice", "/presence").data["customStatus"] == "After"
        assert "offline" not in watcher.statuses_seen("alice")[seen:]
        assert watcher.status("alice") == "online"
    finally:
        alice.close()
        watcher.close()


def test_both_hubs_killed_and_one_restarted_loses_nothing(
        hubs: tuple[HubProcess, HubProcess], mosquitto: MosquittoProcess,
        own_redis: RedisProcess) -> None:
    a, b = hubs
    watcher = Watcher(mosquitto.host, mosquitto.port).start()
    alice = device(mosquitto, "alice", "laptop")
    try:
        watcher.wait_status("alice", "online")
        assert ask(mosquitto, "alice", '/presence status "Lunch"').ok
        assert ask(mosquitto, "alice", "/presence away").ok
        alice.activity(channel="c1")
        wait_for(lambda: len(ask(mosquitto, "alice", "/presence activity").data or []) >= 1, 10,
                 "the activity recorded")
        seen = len(watcher.statuses_seen("alice"))
        a.kill()
        b.kill()
        for _ in range(3):  # nobody active: queued by the broker for the hub's session
            alice.activity(channel="c2")
        b.env["PRESENCE_LEASE_HOST"] = "box-a"  # b restarted on a's box
        b.start()  # a dead hub of its box held the lease: taken at once, not after the TTL
        wait_for(lambda: len(ask(mosquitto, "alice", "/presence activity").data or []) >= 4,
                 15, "the activity of the downtime applied")
        state = ask(mosquitto, "alice", "/presence").data
        assert state["customStatus"] == "Lunch"
        assert state["status"] == "away"
        assert "offline" not in watcher.statuses_seen("alice")[seen:]
    finally:
        alice.close()
        watcher.close()


def test_an_active_hub_cut_off_from_redis_stops_acting_and_the_standby_takes_over(
        tmp_path: Path, mosquitto: MosquittoProcess, own_redis: RedisProcess) -> None:
    """A partition: the active hub loses Redis (its connections cut, new ones refused), the
    standby does not. The active hub's lease lapses; it stops acting (and does not take the
    hub's session back from the new active hub); once it reaches Redis again it learns it lost
    the lease and stands by."""
    proxy = TcpProxy(own_redis.host, own_redis.port)
    a = HubProcess(hub_args(mosquitto, f"redis://127.0.0.1:{proxy.port}/0", "hub-a"), tmp_path,
                   env={"PRESENCE_LEASE_HOST": "box-a"})
    (tmp_path / "b").mkdir()
    b = HubProcess(hub_args(mosquitto, own_redis, "hub-b"), tmp_path / "b",
                   env={"PRESENCE_LEASE_HOST": "box-b"})
    watcher = Watcher(mosquitto.host, mosquitto.port).start()
    alice: SimDevice | None = None
    try:
        a.start()
        b.start(ready_line=STANDBY_LINE)
        alice = device(mosquitto, "alice", "laptop")
        watcher.wait_status("alice", "online")
        seen = len(watcher.statuses_seen("alice"))
        reachable = proxy.target
        proxy.target = ("127.0.0.1", free_port())  # nothing listens there: refused
        proxy.cut()
        b.wait_line("presence hub running")
        assert ask(mosquitto, "alice", '/presence status "Cut off"').ok
        watcher.wait_text("alice", "custom", "Cut off")
        mark = len(a.lines)
        proxy.target = reachable
        a.wait_line(STANDBY_LINE, after=mark)
        assert ask(mosquitto, "alice", "/presence").data["customStatus"] == "Cut off"
        assert stored(own_redis, "alice").custom_status == "Cut off"
        assert "offline" not in watcher.statuses_seen("alice")[seen:]
        assert "hub-b" in hub_status(own_redis)
    finally:
        if alice is not None:
            alice.close()
        watcher.close()
        for h in (a, b):
            h.close()
        proxy.close()


# ------------------------------------------------------------------------------------------
# The lease and the fence on their own (fast)


async def test_the_lease_goes_to_one_hub_and_the_fence_stops_the_other(
        own_redis: RedisProcess) -> None:
    first = RedisLease(own_redis.url, "fence", name="one", mode="standby", ttl_ms=60_000)
    second = RedisLease(own_redis.url, "fence", name="two", mode="standby", ttl_ms=60_000,
                        host="another-box")
    store = RedisStore(own_redis.url, namespace="fence")
    try:
        assert await first.try_acquire() is None
        held = await second.try_acquire()
        assert held is not None and held.name == "one" and held.token == first.token
        assert await first.renew()
        store.fence = first.fence
        await store.open()
        await store.save_users([UserRecord(id="alice", name="Alice")])
        # the first hub's lease is gone (it expired) and the second one took it
        await first._client.delete(first.lease_key)  # type: ignore[union-attr]
        assert await second.try_acquire() is None
        assert second.token is not None and first.token is not None
        assert second.token > first.token
        assert not await first.renew()
        with pytest.raises(StoreFenced):
            await store.save_users([UserRecord(id="alice", name="Stale")])
        with pytest.raises(StoreFenced):
            await store.swap_clean_stop(True)
        from hub.core.models import Activity

        with pytest.raises(StoreFenced):
            await store.append_activity("alice", [Activity(type="t", timestamp=1,
                                                           received_at=1)], 2)
        store.fence = second.fence
        assert (await store.load_users())[0].name == "Alice"  # the stale write never landed
        await second.release()
        assert await first.holder() is None
    finally:
        await store.close()
        for lease in (first, second):
            await lease.close()


async def test_a_lease_of_a_dead_process_of_this_host_is_taken_at_once(
        own_redis: RedisProcess) -> None:
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()
    lease = RedisLease(own_redis.url, "dead", name="x", mode="single", ttl_ms=60_000)
    try:
        # what a hub with that pid left behind when it was killed
        await lease.open()
        assert lease._client is not None
        await lease._client.set(lease.lease_key, (
            '{"token": 7, "name": "x", "mode": "single", "since": 0, "instance": "i", '
            f'"host": "{os.uname().nodename}", "pid": {gone.pid}}}'), px=60_000)
        await lease._client.set(lease.epoch_key, 7)
        assert await lease.try_acquire() is None
        assert lease.token == 8
    finally:
        await lease.close()


async def test_two_processes_on_one_tinydb_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "presence.json"
    first = TinyDBStore(path)
    await first.open()
    try:
        with pytest.raises(StoreError, match=f"another process .pid {os.getpid()}. uses"):
            await TinyDBStore(path).open()
    finally:
        await first.close()
    again = TinyDBStore(path)  # closed: free again
    await again.open()
    await again.close()


@pytest.mark.slow
def test_a_second_hub_on_one_tinydb_file_is_refused_in_one_line(tmp_path: Path) -> None:
    db = str(tmp_path / "presence.json")
    first = HubProcess(["--broker", "embedded", "--listen", f"127.0.0.1:{free_port()}",
                        "--db", db], tmp_path)
    try:
        first.start()
        second = subprocess.run(
            [sys.executable, "-m", "hub.cli", "--broker", "embedded", "--listen",
             f"127.0.0.1:{free_port()}", "--db", db], capture_output=True, text=True,
            timeout=60, cwd=tmp_path)
        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert f"another process (pid {first.proc.pid}) uses the TinyDB file" in last  # type: ignore[union-attr]
    finally:
        first.close()

