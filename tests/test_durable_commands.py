"""A command's "ok" survives a SIGKILL: the hub answers only after the change is persisted.

The hub runs as a real process with a long flush interval (30 s), so without the rule the
change would sit in memory for the whole window in which the hub is killed. Both brokers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent import AgentConfig
from device_agent.command import ask_hub
from hub.protocol import ReplyPayload
from tests.support.hub_process import HubProcess
from tests.support.procs import MosquittoProcess, free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.slow


def ask(url: str, command: str) -> ReplyPayload:
    config = AgentConfig.from_values(broker=url, user="alice", device="cli", state_file="",
                                     outbox=os.devnull)
    return ask_hub(config, command, 8.0)


@pytest.fixture(params=["embedded", "mosquitto"])
def hub_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[HubProcess, str]]:
    common = ["--storage", "tinydb", "--db", str(tmp_path / "presence.json"),
              "--flush-interval", "30s"]
    if request.param == "embedded":
        port = free_port()
        args = ["--broker", "embedded", "--listen", f"127.0.0.1:{port}", *common]
    else:
        mosq: MosquittoProcess = request.getfixturevalue("mosquitto")
        port = mosq.port
        args = ["--broker", f"mqtt://127.0.0.1:{port}", *common]
    hub = HubProcess(args, tmp_path).start()
    try:
        yield hub, f"mqtt://127.0.0.1:{port}"
    finally:
        hub.close()


def test_an_answered_command_survives_a_sigkill(hub_url: tuple[HubProcess, str]) -> None:
    hub, url = hub_url
    first = ask(url, '/presence status "In a meeting"')
    assert first.ok, first.text
    hub.kill()  # at once: no flush period has passed, no clean stop
    hub.start()
    me = wait_for(lambda: ask(url, "/presence"), timeout=15, what="the restarted hub to answer")
    assert me.data["customStatus"] == "In a meeting"
    # and the next change publishes a version above the one already answered
    second = ask(url, "/presence dnd")
    assert second.ok and second.data["version"] > first.data["version"]
