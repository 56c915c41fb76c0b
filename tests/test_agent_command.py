"""The ``presence`` command: argv -> chat text, replies printed, exit status and one-line errors.

Tests that need an answering hub mostly use the ``fake_hub`` fixture: it was the stand-in
while the hub's command handler was being written, and it still pins the command's own
behaviour (exact text printed, ok=false handling) independent of the hub's wording. They can
be switched to ``real_hub``; ``test_agent_and_presence_with_the_real_hub`` already runs the
agent and the command against a real ``presence-hub`` process.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent import PresenceAgent
from device_agent.command import chat_text, main, to_chat_command
from tests.support.procs import MosquittoProcess, free_port
from tests.support.wait import wait_for
from tests.test_agent_helpers import (  # noqa: F401  (isolated_env is a fixture)
    DEVICE,
    USER,
    FakeHub,
    agent_config,
    isolated_env,
)


@pytest.fixture
def fake_hub(mosquitto: MosquittoProcess) -> Iterator[FakeHub]:
    """Stand-in for the hub's command handler (see the module docstring)."""
    hub = FakeHub(mosquitto.host, mosquitto.port)
    yield hub
    hub.close()


# --------------------------------------------------------------------------------------------
# argv -> chat text (no broker)


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        ([], "/presence"),
        (["who"], "/presence who"),
        (["who", "telegram-123"], "/presence who telegram-123"),
        (["activity"], "/presence activity"),
        (["activity", "--limit", "5", "--since", "1h"], "/presence activity --limit 5 --since 1h"),
        (["activity", "--since", "30m"], "/presence activity --since 30m"),
        (["online"], "/presence online"),
        (["away"], "/presence away"),
        (["dnd"], "/presence dnd"),
        (["offline"], "/presence offline"),
        (["status", "In a meeting"], '/presence status "In a meeting"'),
        (["status", "In", "a", "meeting"], '/presence status "In a meeting"'),
        (["status", "lunch"], "/presence status lunch"),
        (["status", 'say "hi"'], r'/presence status "say \"hi\""'),
        (["status", "--clear"], "/presence status --clear"),
        (["devices"], "/presence devices"),
        (["devices", "remove", "old-phone"], "/presence devices remove old-phone"),
        (["sync"], "/presence sync"),
        # global options anywhere do not leak into the text
        (["--json", "who", "--timeout", "1s", "tg-1"], "/presence who tg-1"),
        (["--broker", "mqtt://h:1", "sync", "--user", "bob"], "/presence sync"),
    ],
)
def test_argv_becomes_the_chat_command(argv: list[str], text: str) -> None:
    assert to_chat_command(argv) == text


@given(st.text(min_size=1, max_size=40).filter(lambda s: s.strip() == s and s))
def test_status_text_survives_shell_style_splitting(text: str) -> None:
    words = shlex.split(chat_text(["status", text]))
    assert words == ["/presence", "status", text]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status"], "give a status text"),
        (["status", "x", "--clear"], "not both"),
        (["who", "tele/gram"], "invalid channel id"),
        (["who", "a+b"], "invalid channel id"),
        (["activity", "--since", "5x"], "invalid duration '5x'"),
        (["activity", "--limit", "0"], "--limit must be 1 or more"),
        (["devices", "remove"], "which device?"),
        (["devices", "remove", "a#b"], "invalid device id"),
        (["bogus"], "invalid choice"),
    ],
)
def test_wrong_input_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("presence: error:"), err
    assert message in err


# --------------------------------------------------------------------------------------------
# Against a broker


def _argv(url: str, *rest: str, timeout: str = "5s") -> list[str]:
    return ["--broker", url, "--user", USER, "--device", DEVICE, "--timeout", timeout, *rest]


@pytest.mark.slow
def test_prints_the_hubs_text_and_exits_0(
    mosquitto: MosquittoProcess, fake_hub: FakeHub, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(_argv(mosquitto.url, "status", "In a meeting")) == 0
    assert capsys.readouterr().out == 'hub got: /presence status "In a meeting"\n'
    assert fake_hub.requests == [(USER, DEVICE, '/presence status "In a meeting"')]
    # The short-lived client has its own id, never the agent's.
    assert f" as {DEVICE}-cli-" in mosquitto.log_text()


@pytest.mark.slow
def test_json_prints_the_replys_data(
    mosquitto: MosquittoProcess, fake_hub: FakeHub, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(_argv(mosquitto.url, "--json", "who", "telegram-123")) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"command": "/presence who telegram-123", "user": USER,
                               "device": DEVICE}


@pytest.mark.slow
def test_reply_not_ok_prints_its_text_and_exits_1(
    mosquitto: MosquittoProcess, fake_hub: FakeHub, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(_argv(mosquitto.url, "who", "fail")) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "presence: no such thing: try /presence help\n"


@pytest.mark.slow
def test_no_hub_answering_is_exit_1_with_one_line(
    mosquitto: MosquittoProcess, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    assert main(_argv(mosquitto.url, "who", timeout="300ms")) == 1
    assert time.monotonic() - started < 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("presence: no reply from the hub within 300ms")
    assert mosquitto.url in err


def test_broker_refusing_the_connection_is_exit_1_naming_the_url(
    isolated_env: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    assert main(_argv(url, "sync", timeout="1s")) == 1
    err = capsys.readouterr().err
    assert err == f"presence: cannot connect to the broker at {url}: connection refused" \
        " (is the broker running and listening on that port?)\n"


def test_settings_come_from_the_agent_config_file(
    isolated_env: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
) -> None:
    port = free_port()
    config_dir = isolated_env / "xdg-config" / "mqtt-presence"
    config_dir.mkdir(parents=True)
    (config_dir / "agent.toml").write_text(
        f'broker = "mqtt://127.0.0.1:{port}"\nuser = "bob"\ndevice = "phone"\ntimeout = "1s"\n'
    )
    assert main(["who"]) == 1
    assert f"mqtt://127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.slow
def test_asking_the_hub_leaves_the_running_agent_connected(
    mosquitto: MosquittoProcess, fake_hub: FakeHub, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    with PresenceAgent(agent_config(isolated_env, mosquitto.url)) as agent:
        assert agent.wait_connected(5)
        session = agent.session
        assert main(_argv(mosquitto.url, "devices")) == 0
        assert main(_argv(mosquitto.url, "sync")) == 0
        assert agent.connected and agent.session == session
        assert agent.stats["connections"] == 1
    assert capsys.readouterr().out == "hub got: /presence devices\nhub got: /presence sync\n"


# --------------------------------------------------------------------------------------------
# Against the real hub


@pytest.fixture
def real_hub(mosquitto: MosquittoProcess, isolated_env: Path) -> Iterator[object]:  # noqa: F811
    from tests.support.hub_process import HubProcess

    # isolated_env has already removed PRESENCE_* from the environment the hub inherits.
    hub = HubProcess(["--broker", mosquitto.url, "--storage", "memory",
                      "--heartbeat-interval", "200ms"], isolated_env)
    hub.start()
    yield hub
    hub.stop()
    hub.close()


@pytest.mark.slow
def test_agent_and_presence_with_the_real_hub(
    mosquitto: MosquittoProcess, real_hub: object, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    statuses: list[str] = []
    config = agent_config(isolated_env, mosquitto.url)
    with PresenceAgent(config, on_status=statuses.append) as agent:
        wait_for(lambda: statuses == ["online"], what="the hub's first state reaches the agent")
        agent.record_activity("message", channel_id="telegram-123")

        assert main(_argv(mosquitto.url, "dnd")) == 0
        wait_for(lambda: statuses[-1:] == ["dnd"], what="dnd set through the hub reaches the agent")
        assert main(_argv(mosquitto.url, "--json", "who", "telegram-123")) == 0
        who = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert [u.get("user_id", u.get("userId")) for u in who] == [USER]

        assert main(_argv(mosquitto.url, "sync")) == 0
        assert main(_argv(mosquitto.url, "devices", "remove", "no-such-device")) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no-such-device" in err
    assert config.state_file is not None
    assert json.loads(config.state_file.read_text())["status"] == "dnd"
