"""The examples keep working: they are what people copy first."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from types import ModuleType

import pytest

from device_agent.config import load_config
from hub import create_presence_service
from hub.auth import CredentialStore
from hub.cli.users import users_main
from tests.support.mqtt_clients import MqttClient
from tests.support.procs import MosquittoProcess
from tests.support.wait import wait_for
from tests.test_agent_helpers import Watcher

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_chat_bot_records_activity_and_answers_presence_commands() -> None:
    bot = _load("chat_bot")
    async with create_presence_service(storage="memory") as presence:
        assert await bot.on_chat_message(presence, "telegram-123", "alice", "hello") is None
        reply = await bot.on_chat_message(presence, "telegram-123", "bob", "/presence who telegram-123")
        assert reply is not None and "alice" in reply and "bob" in reply
        assert await bot.on_chat_message(presence, "telegram-123", "alice", "/presence dnd") == \
            "status set to dnd"
        assert (await presence.get_status("alice")).status == "dnd"


def test_raspberry_pi_agent_config_is_valid() -> None:
    config = load_config({"config": str(EXAMPLES / "raspberry-pi" / "agent.toml")}, env={})
    assert (config.user, config.device, config.heartbeat_interval_ms) == ("alice", "kitchen-panel", 30_000)


def test_scripts_explain_themselves() -> None:
    for script in ("mute_on_dnd.py", "simulated_fleet.py", "sleepy_device.py",
                   "long_interval_device.py"):
        out = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        for option in ("--broker", "--username", "--password", "PRESENCE_BROKER_PASSWORD",
                       "--ca-file"):
            assert option in out.stdout, (script, option)


def _example_env(tmp_path: Path) -> dict[str, str]:
    """No PRESENCE_* from the developer's shell; the agent's outbox under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    return env


@pytest.mark.slow
def test_sleepy_device_sleeps_and_wakes_with_new_sessions(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    watcher = Watcher(mosquitto.host, mosquitto.port)
    try:
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / "sleepy_device.py"),
             "--broker", f"{mosquitto.host}:{mosquitto.port}", "--device", "badge",
             "--awake", "100ms", "--sleep", "300ms", "--heartbeat-interval", "100ms",
             "--cycles", "2"],
            env=_example_env(tmp_path), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout.count("asleep for 300ms") == 2
        conn = watcher.of("conn")
        # Up to the second sleep: what follows is the exit (on a stalled machine the 300 ms
        # may already be over when the example closes its agent, and it wakes once more).
        sleep_at = [i for i, c in enumerate(conn) if c["state"] == "sleeping"]
        assert len(sleep_at) == 2, conn
        conn = conn[: sleep_at[1] + 1]
        births = [c for c in conn if c["state"] == "online"]
        sleeps = [c for c in conn if c["state"] == "sleeping"]
        assert [s["sleepMs"] for s in sleeps] == [300, 300]
        assert len({b["session"] for b in births}) == 2, "a new session after each wake"
        assert all(b["heartbeatMs"] == 100 for b in births)
        assert [s["session"] for s in sleeps] == [b["session"] for b in births]
        assert not [c for c in conn if c["state"] == "offline"], "no will, no offline"
    finally:
        watcher.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "heartbeat_ms"),
    [
        ("sleepy_device.py", ["--awake", "1h", "--heartbeat-interval", "100ms"], 100),
        ("long_interval_device.py", ["--heartbeat-interval", "10m"], 600_000),
    ],
)
def test_device_examples_announce_their_interval_and_stop_on_ctrl_c(
    script: str, args: list[str], heartbeat_ms: int, mosquitto: MosquittoProcess,
    tmp_path: Path,
) -> None:
    watcher = Watcher(mosquitto.host, mosquitto.port)
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), "--broker", mosquitto.url, *args],
        env=_example_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        birth = watcher.wait(watcher.births, f"birth of {script}")[0]
        assert birth["heartbeatMs"] == heartbeat_ms
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "stopping" in out
        watcher.wait(lambda: watcher.offlines("disconnect"), "a clean offline")
        assert not watcher.offlines("lost")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        watcher.close()


# --------------------------------------------------------------------------------------------
# issue 15, item 8: README's in-process snippet is a file that runs; logins; Ctrl-C


README = EXAMPLES.parent / "README.md"


def test_the_in_process_example_runs_and_is_what_readme_shows() -> None:
    """README's snippet had ``async with`` outside a function: a SyntaxError as a script. It
    is examples/in_process.py now, shown in README from ``import asyncio`` on."""
    body = (EXAMPLES / "in_process.py").read_text().split('"""', 2)[2].lstrip("\n")
    blocks = README.read_text().split("```python\n")
    assert any(block.split("```", 1)[0] == body for block in blocks[1:]), \
        "README no longer shows examples/in_process.py as it is"
    done = subprocess.run([sys.executable, str(EXAMPLES / "in_process.py")],
                          capture_output=True, text=True, timeout=60, cwd=EXAMPLES.parent)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["user-1 offline -> online", "user-1 online Trading BTC", "1 online:"]
    assert lines[4].split() == ["user-1", "online", "telegram-123", "Trading", "BTC"]


LOGINS = {"ha": ("watcher", "ha-secret"), "alice/meter": ("device", "meter-secret"),
          "presence-hub": ("hub", "hub-secret")}


@pytest.fixture(scope="module")
def accounts_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """A Mosquitto that lets no one in without an account (the exported files)."""
    folder = tmp_path_factory.mktemp("example-accounts")
    store = CredentialStore(folder / "credentials.json")
    for name, (role, secret) in LOGINS.items():
        store.put(name, role, secret)  # type: ignore[arg-type]
    pw, acl = folder / "presence.pw", folder / "presence.acl"
    assert users_main(["export-mosquitto", "--password-file", str(pw), "--acl-file", str(acl)],
                      env={"PRESENCE_CREDENTIALS": str(store.path)}, out=StringIO()) == 0
    broker = MosquittoProcess(
        workdir=folder / "mosquitto",
        extra_conf=f"allow_anonymous false\npassword_file {pw}\nacl_file {acl}\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.cleanup()


def _hub_login(broker: MosquittoProcess) -> MqttClient:
    client = MqttClient(broker.host, broker.port)
    client.paho.username_pw_set("presence-hub", LOGINS["presence-hub"][1])
    return client.connect()


@pytest.mark.slow
def test_mute_on_dnd_logs_in_from_the_environment_and_stops_quietly_on_ctrl_c(
    accounts_broker: MosquittoProcess, tmp_path: Path
) -> None:
    """With accounts, a watcher's login from PRESENCE_BROKER_USERNAME/_PASSWORD (as the agent
    takes it); Ctrl-C used to end in a KeyboardInterrupt traceback."""
    hub = _hub_login(accounts_broker)
    env = _example_env(tmp_path) | {"PRESENCE_BROKER_USERNAME": "ha",
                                    "PRESENCE_BROKER_PASSWORD": LOGINS["ha"][1]}
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "mute_on_dnd.py"), "--broker",
         f"{accounts_broker.host}:{accounts_broker.port}", "--user", "alice"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hub.publish("presence/users/alice/status", b"dnd", retain=True)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "notifications muted\n"  # blocks until it is said
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out, err) == (0, "stopping\n", "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        hub.close()


@pytest.mark.slow
def test_a_device_example_logs_in_with_the_devices_account(
    accounts_broker: MosquittoProcess, tmp_path: Path
) -> None:
    watcher = _hub_login(accounts_broker)
    watcher.subscribe("presence/devices/alice/meter/conn")
    env = _example_env(tmp_path) | {"PRESENCE_BROKER_PASSWORD": LOGINS["alice/meter"][1]}
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "long_interval_device.py"), "--broker",
         f"{accounts_broker.host}:{accounts_broker.port}", "--username", "alice/meter",
         "--user", "alice", "--device", "meter"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: b'"online"' in (watcher.last("presence/devices/alice/meter/conn") or b""),
                 timeout=15, what="the meter's birth, logged in")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "Traceback" not in err and "stopping" in out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        watcher.close()
