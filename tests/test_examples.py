"""The examples keep working: they are what people copy first."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from device_agent.config import load_config
from hub import create_presence_service

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
    for script in ("mute_on_dnd.py", "simulated_fleet.py"):
        out = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "--broker" in out.stdout
