"""The examples keep working: they are what people copy first."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from device_agent.config import load_config
from hub import create_presence_service
from tests.support.procs import MosquittoProcess
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
        assert out.returncode == 0 and "--broker" in out.stdout


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
