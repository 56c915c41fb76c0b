"""Issue #4 end to end: real ``presence-agent`` processes, a real ``presence-hub``, real brokers.

Nothing here is simulated: every device is a ``presence-agent`` daemon started as its own
process (so SIGKILL means what it means on a phone whose battery died), the hub is a
``presence-hub`` process, and questions go through the ``presence`` command or its
``ask_hub`` function. What the world sees is read the way any MQTT client would read it.

Timers. Agents beat every 200 ms. The shared embedded hub uses a 1 s heartbeat interval
(2.5 s timeout) so that a device going offline within 2 s of a SIGKILL can only be its last
will, never the timeout. The Mosquitto hubs use 300 ms (750 ms timeout), which makes the
broker-restart grace short and any flap visible quickly. Away/offline idle timers are long
(30 s / 60 s) on purpose: agents here have no idle source, so their idle time runs from their
birth, and short idle timers would take users away in the middle of a test for a reason
that is not under test.

One embedded hub serves the module (each test has its own user ids); the broker-restart and
outage tests get their own Mosquitto and hub because they take the broker down.

The last section pins the hub bugs these tests ran into (both fixed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent import AgentConfig, AgentError, queue_activity
from device_agent.command import ask_hub
from hub.protocol import ConnPayload, ReplyPayload, RequestPayload, new_session_id
from tests.support.hub_process import HubProcess
from tests.support.mqtt_clients import MqttClient, SimDevice, Watcher
from tests.support.procs import MosquittoProcess, free_port
from tests.support.wait import wait_for
from tests.test_agent_helpers import Watcher as HistoryWatcher
from tests.test_agent_helpers import retained

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
AGENT_HEARTBEAT = "200ms"
LONG_IDLE = ["--away-after", "30s", "--offline-after", "60s"]
#: Between polls that ask the hub: the hub rate-limits each device (20 messages/s).
ASK_EVERY = 0.1
#: How long the broker stays down in the restart test: twice the hub's 750 ms timeout.
OUTAGE_S = 1.5


def _console(name: str, module: str) -> list[str]:
    """The installed console script next to this Python, else ``python -m module``."""
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


AGENT_CMD = _console("presence-agent", "device_agent.cli")
PRESENCE_CMD = _console("presence", "device_agent.command")


def clean_env(home: Path) -> dict[str, str]:
    """The environment without the developer's PRESENCE_* settings or config files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    env.update(XDG_CONFIG_HOME=str(home / "xdg-config"), XDG_STATE_HOME=str(home / "xdg-state"),
               PYTHONUNBUFFERED="1")
    return env


def start_hub(broker_args: list[str], workdir: Path, heartbeat: str) -> HubProcess:
    args = [*broker_args, "--storage", "tinydb", "--db", str(workdir / "presence.json"),
            "--heartbeat-interval", heartbeat, *LONG_IDLE]
    hub = HubProcess(args, workdir)
    hub.env = {k: v for k, v in hub.env.items() if not k.startswith("PRESENCE_")}
    return hub.start()


# --------------------------------------------------------------------------------------------
# Agent processes


class AgentProc:
    """One ``presence-agent`` daemon with its own outbox, state file and log."""

    def __init__(self, root: Path, broker: str, user: str, device: str) -> None:
        self.broker = broker
        self.user = user
        self.device = device
        self.dir = root / f"agent-{user}-{device}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.outbox = self.dir / "outbox.sqlite3"
        self.state_file = self.dir / "state.json"
        self.log = self.dir / "agent.log"
        self.env = clean_env(self.dir)
        self.proc: subprocess.Popen[bytes] | None = None

    def settings(self) -> list[str]:
        return ["--broker", self.broker, "--user", self.user, "--device", self.device,
                "--outbox", str(self.outbox), "--state-file", str(self.state_file)]

    def start(self) -> AgentProc:
        args = [*AGENT_CMD, *self.settings(), "--name", f"{self.device} of {self.user}",
                "--heartbeat-interval", AGENT_HEARTBEAT, "--idle-source", "none",
                "--reconnect-min", "50ms", "--reconnect-max", "300ms"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        return self

    def state(self) -> dict[str, Any]:
        """What another program on this device reads: the agent's state file ({} before)."""
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data

    @property
    def session(self) -> str | None:
        agent = self.state().get("agent", {})
        return agent.get("session") if agent.get("connected") else None

    def wait_connected(self, timeout: float = 10.0) -> str:
        session = wait_for(lambda: self.session, timeout,
                           f"{self.user}/{self.device} connected; log:\n{self.log_text()}")
        return str(session)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def record_activity(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``presence-agent activity ARGS`` for this device (appends to its outbox)."""
        return subprocess.run([*AGENT_CMD, *self.settings(), "activity", *args], env=self.env,
                              capture_output=True, text=True, timeout=30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[[str, str, str], AgentProc]]:
    """Start agent processes; every one still running is stopped at teardown."""
    made: list[AgentProc] = []

    def start(broker: str, user: str, device: str) -> AgentProc:
        agent = AgentProc(tmp_path, broker, user, device).start()
        made.append(agent)
        return agent

    yield start
    for agent in made:
        agent.close()
        assert "Traceback" not in agent.log_text(), agent.log_text()


# --------------------------------------------------------------------------------------------
# Asking the hub


def presence(url: str, user: str, device: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``presence`` command line; it never prints a traceback."""
    done = subprocess.run(
        [*PRESENCE_CMD, "--broker", url, "--user", user, "--device", device, *args],
        env=clean_env(Path(tempfile.gettempdir()) / "presence-it-no-home"),
        capture_output=True, text=True, timeout=30,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def ask(url: str, user: str, device: str, command: str, timeout: float = 2.0) -> ReplyPayload:
    """What ``presence`` does, in-process: cheap enough to poll a condition with."""
    config = AgentConfig.from_values(broker=url, user=user, device=device, state_file="",
                                     outbox=os.devnull)
    return ask_hub(config, command, timeout)


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------
# The shared embedded hub


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Watcher]]:
    """One hub with its embedded broker for the module: (broker URL, watcher of presence/#)."""
    workdir = tmp_path_factory.mktemp("embedded-hub")
    port = free_port()
    hub = start_hub(["--broker", "embedded", "--listen", f"{HOST}:{port}"], workdir, "1s")
    watcher = Watcher(HOST, port)
    try:
        watcher.start()
        yield f"mqtt://{HOST}:{port}", watcher
    finally:
        watcher.close()
        hub.stop()
        hub.close()
        assert "Traceback" not in hub.output(), hub.output()


@pytest.fixture
def mosquitto_hub(mosquitto: MosquittoProcess, tmp_path: Path) -> Iterator[HubProcess]:
    hub = start_hub(["--broker", mosquitto.url], tmp_path, "300ms")
    try:
        yield hub
    finally:
        hub.stop()
        hub.close()
        assert "Traceback" not in hub.output(), hub.output()


def conn_payloads(watcher: Watcher, user: str, device: str) -> list[dict[str, Any]]:
    return [json.loads(p) for p in watcher.got(f"presence/devices/{user}/{device}/conn") if p]


# --------------------------------------------------------------------------------------------
# 1. SIGKILL: the will takes the device offline, the user stays online on the other device


def test_sigkill_of_an_agent_takes_its_device_offline_by_its_will(
    embedded: tuple[str, Watcher], agents: Callable[[str, str, str], AgentProc],
) -> None:
    url, watcher = embedded
    user = "it-kill"
    laptop = agents(url, user, "laptop")
    phone = agents(url, user, "phone")
    session = laptop.wait_connected()
    phone.wait_connected()
    watcher.wait_device(user, "laptop", "online")
    watcher.wait_device(user, "phone", "online")
    watcher.wait_status(user, "online")

    laptop.kill()
    killed = time.monotonic()
    # The hub's heartbeat timeout is 2.5 s: offline sooner than that is the will's doing.
    watcher.wait_device(user, "laptop", "offline", timeout=2.0)
    assert time.monotonic() - killed < 2.5
    assert conn_payloads(watcher, user, "laptop")[-1] == {
        "state": "offline", "session": session, "reason": "lost"}

    state = watcher.state(user)
    assert state is not None and state["status"] == "online"
    assert {d["id"]: d["status"] for d in state["devices"]} == {"laptop": "offline",
                                                                "phone": "online"}
    watcher.wait_text(user, "primary", "phone")
    assert "offline" not in watcher.statuses_seen(user)
    wait_for(lambda: phone.state().get("devices") == state["devices"],
             what="the phone's state file shows the laptop offline too")


# --------------------------------------------------------------------------------------------
# 2. Broker restart: a new session, and the user does not flap


def test_broker_restart_agent_reconnects_with_a_new_session_and_the_user_does_not_flap(
    mosquitto: MosquittoProcess, mosquitto_hub: HubProcess,
    agents: Callable[[str, str, str], AgentProc],
) -> None:
    user = "it-restart"
    conn_topic = f"presence/devices/{user}/laptop/conn"
    status_topic = f"presence/users/{user}/status"
    watcher = HistoryWatcher(mosquitto.host, mosquitto.port, persistent=True)

    def payloads(topic: str) -> list[bytes]:
        return [m.payload for m in watcher.snapshot() if m.topic == topic]

    try:
        laptop = agents(mosquitto.url, user, "laptop")
        first = laptop.wait_connected()
        watcher.wait(lambda: payloads(status_topic)[-1:] == [b"online"], "user online")
        hub_online_before = payloads("presence/hub/status").count(b"online")

        mosquitto.stop()
        stopped = time.monotonic()
        wait_for(lambda: laptop.session is None, what="the agent noticed the broker is gone")
        wait_for(lambda: "broker link down" in mosquitto_hub.output(),
                 what="the hub noticed the broker is gone")
        # The outage itself, not a wait for anything: a broker restart that takes longer than
        # the hub's heartbeat timeout (750 ms), which is what a real restart or upgrade does
        # and what a hub that kept its device timers running would punish.
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
        mosquitto.restart()

        second = wait_for(lambda: laptop.session not in (None, first) and laptop.session,
                          10, "the agent reconnected with a new session")
        watcher.wait(lambda: payloads("presence/hub/status").count(b"online")
                     > hub_online_before, "the hub reconnected", timeout=15)
        hub_back = now_ms()
        # A fresh subscriber sees the new session's birth, retained (once the broker has it:
        # the agent knows its session at CONNACK, a moment before its birth is stored; under
        # load a subscriber could still find the old session's will there)
        def retained_birth() -> dict[str, Any]:
            birth: dict[str, Any] = json.loads(
                retained(mosquitto.host, mosquitto.port, conn_topic) or b"{}")
            return birth

        wait_for(lambda: retained_birth().get("session") == second, 10,
                 "the new session's birth retained")
        assert retained_birth()["state"] == "online"

        # Past the hub's grace (one heartbeat timeout after its link came back) the device is
        # online on the hub's own clock: the live last_seen of `/presence devices`.
        def online_after_grace() -> bool:
            devices = ask(mosquitto.url, user, "cli", "/presence devices").data
            return any(d["id"] == "laptop" and d["status"] == "online"
                       and d["lastSeen"] >= hub_back + 1_000 for d in devices)

        wait_for(online_after_grace, 10, "the device online on the hub past the grace",
                 interval=ASK_EVERY)
        statuses = [p.decode() for p in payloads(status_topic)]
        events = [json.loads(p) for p in payloads(f"presence/events/{user}")]
        assert "offline" not in statuses, (statuses, mosquitto_hub.output())
        assert not [e for e in events if e["event"] == "offline" or e.get("new") == "offline"], \
            events
    finally:
        watcher.close()


# --------------------------------------------------------------------------------------------
# 3. Activity recorded during a broker outage reaches the hub afterwards


def test_activity_recorded_while_the_broker_is_down_reaches_the_hub(
    mosquitto: MosquittoProcess, mosquitto_hub: HubProcess,
    agents: Callable[[str, str, str], AgentProc],
) -> None:
    user = "it-outage"
    laptop = agents(mosquitto.url, user, "laptop")
    laptop.wait_connected()
    wait_for(lambda: ask(mosquitto.url, user, "cli", "/presence").data["status"] == "online",
             what="the hub sees the agent", interval=ASK_EVERY)

    mosquitto.stop()
    wait_for(lambda: laptop.state().get("agent", {}).get("connected") is False,
             what="the agent noticed the broker is gone")
    done = laptop.record_activity("--type", "message", "--channel", "telegram-1")
    assert done.returncode == 0, done.stderr
    assert "queued message activity on telegram-1" in done.stdout
    # The library's way, into the same outbox (same user and device).
    config = AgentConfig.from_values(broker=mosquitto.url, user=user, device="laptop",
                                     outbox=str(laptop.outbox), state_file="")
    queue_activity(config, "reaction", "telegram-1", {"emoji": "+1"})
    recorded_before = now_ms()
    mosquitto.restart()

    def listed() -> list[dict[str, Any]]:
        try:
            reply = ask(mosquitto.url, user, "cli", "/presence activity --since 1h")
        except AgentError:  # the broker or the hub is not back yet
            return []
        return list(reply.data) if reply.data and len(reply.data) >= 2 else []

    wait_for(listed, 15, "both activities listed by the hub", interval=ASK_EVERY)
    shown = presence(mosquitto.url, user, "cli", "--json", "activity", "--limit", "5")
    assert shown.returncode == 0, shown.stderr
    entries = json.loads(shown.stdout)
    assert [(e["type"], e["channelId"], e["deviceId"]) for e in entries] == [
        ("reaction", "telegram-1", "laptop"), ("message", "telegram-1", "laptop")]
    assert all(e["timestamp"] <= recorded_before for e in entries), "recorded, not delivered, time"
    assert entries[0]["data"] == {"emoji": "+1"}
    assert laptop.session is not None


# --------------------------------------------------------------------------------------------
# 4. Two agents of one user share the custom status and both ack it


def test_custom_status_from_one_agent_reaches_the_other_and_sync_is_complete(
    embedded: tuple[str, Watcher], agents: Callable[[str, str, str], AgentProc],
) -> None:
    url, watcher = embedded
    user = "it-pair"
    laptop = agents(url, user, "laptop")
    phone = agents(url, user, "phone")
    laptop.wait_connected()
    phone.wait_connected()
    watcher.wait_device(user, "laptop", "online")
    watcher.wait_device(user, "phone", "online")

    done = presence(url, user, "laptop", "status", "In a meeting")
    assert (done.returncode, done.stdout, done.stderr) == (
        0, 'custom status set to "In a meeting"\n', "")

    wait_for(lambda: phone.state().get("customStatus") == "In a meeting",
             what="the phone's state file has the custom status")
    wait_for(lambda: laptop.state().get("customStatus") == "In a meeting",
             what="the laptop's state file has the custom status")
    version = phone.state()["version"]
    assert laptop.state()["version"] == version

    def acked(device: str) -> bool:
        acks = watcher.got(f"presence/devices/{user}/{device}/ack")
        return any(json.loads(a)["version"] >= version for a in acks)

    wait_for(lambda: acked("laptop") and acked("phone"), what="both agents acked the version")
    wait_for(lambda: ask(url, user, "laptop", "/presence sync").data["synced"] == 2,
             what="the hub counted both acks", interval=ASK_EVERY)
    done = presence(url, user, "phone", "--json", "sync")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert (data["synced"], data["total"], data["version"]) == (2, 2, version)
    done = presence(url, user, "phone", "sync")
    assert done.stdout == f"sync: 2/2 devices have version {version}\n"


# --------------------------------------------------------------------------------------------
# Bugs found on the way (fixed; these pin them)


def test_a_birth_that_arrives_after_its_first_heartbeat_still_names_the_device(
    embedded: tuple[str, Watcher],
) -> None:
    """A QoS 0 heartbeat can overtake its QoS 1 birth on the way to the hub (Mosquitto holds
    QoS 1 back while the hub's in-flight window is full, and sends QoS 0 at once; seen in
    this suite). The heartbeat then counts as the birth, which is right; but when the real
    birth arrives, its name must still be taken."""
    url, watcher = embedded
    user = "it-late-birth"
    port = int(url.rsplit(":", 1)[1])
    device = SimDevice(HOST, port, user, "phone", name="Ann's phone")
    try:
        device.session = new_session_id()
        device.connect()
        device.heartbeat()
        watcher.wait_device(user, "phone", "online")
        birth = ConnPayload(state="online", session=device.session, name="Ann's phone",
                            ts=now_ms())
        device.publish(device.topic("conn"), birth.to_json(), qos=1, retain=True)
        device.set(customStatus="after the birth")  # in order behind the birth: a fence
        watcher.wait_text(user, "custom", "after the birth")
        state = watcher.state(user)
        assert state is not None
        assert [d["name"] for d in state["devices"]] == ["Ann's phone"]
    finally:
        device.close()


def test_bursts_of_qos1_messages_do_not_wait_for_the_flush_period(
    mosquitto: MosquittoProcess, tmp_path: Path,
) -> None:
    """Mosquitto sends at most 20 unacked QoS 1 messages (its default in-flight window), and
    the hub acks only what it has persisted. With a flush period of an hour, only the hub's
    early flush (at 10 unacked) gets 60 custom statuses through (without it this fails: checked
    by disabling it), and requests, which need no persistence, are acked at once."""
    hub = start_hub(["--broker", mosquitto.url, "--flush-interval", "1h"], tmp_path, "300ms")
    client = MqttClient(mosquitto.host, mosquitto.port).connect()
    try:
        client.subscribe("presence/replies/#")
        client.subscribe("presence/users/+/custom")
        count = 60
        for n in range(count):
            client.paho.publish(f"presence/devices/it-set-{n}/cli/set",
                                b'{"customStatus":"burst"}', qos=1)
        wait_for(lambda: sum(m[0].endswith("/custom") and m[1] == b"burst"
                             for m in client.received) >= count, 10, "every custom status set")
        for n in range(count):
            body = RequestPayload(id=f"burst-{n}", command="/presence").to_json()
            client.paho.publish(f"presence/devices/it-burst-{n}/cli/req", body, qos=1)
        wait_for(lambda: sum(m[0].startswith("presence/replies/") for m in client.received)
                 >= count, 10, "every request answered")
    finally:
        client.close()
        hub.stop()
        hub.close()
