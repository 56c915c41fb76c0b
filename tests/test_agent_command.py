"""The ``presence`` command: argv -> chat text, replies printed, exit status and one-line errors.

The argv -> text tests need no broker. Everything else runs against a real ``presence-hub``
process on a real Mosquitto, shared by the module (each test has its own user ids), with the
device agent in the same process (``PresenceAgent``) where a device has to be present. The
command is called through ``main()`` for speed, and as the installed ``presence`` console
script where the point is what a shell sees (exit status, one line on stderr, no traceback).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent import PresenceAgent
from device_agent.command import chat_text, main, to_chat_command
from tests.support.hub_process import HubProcess
from tests.support.procs import MosquittoProcess, free_port
from tests.support.wait import wait_for
from tests.test_agent_helpers import (  # noqa: F401  (isolated_env is a fixture)
    DEVICE,
    agent_config,
    isolated_env,
)

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
        (["who", "--limit", "50", "--after", "bob"], "/presence who --limit 50 --after bob"),
        (["who", "tg-1", "--after", "bob"], "/presence who tg-1 --after bob"),
        (["users"], "/presence users"),
        (["users", "--limit", "2", "--after", "alice"], "/presence users --limit 2 --after alice"),
        # global options anywhere do not leak into the text
        (["--ca-file", "ca.pem", "users", "--tls-insecure"], "/presence users"),
        (["--broker-username", "alice/laptop", "who"], "/presence who"),
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
        (["users", "--after", "a/b"], "invalid user id"),
        (["who", "--limit", "0"], "--limit must be 1 or more"),
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


def test_help_describes_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """``presence --help`` promised "your status and devices" for a bare ``presence``, which
    prints one line; every command now says what it does, in the list and in its own help."""
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "your status, custom status and primary device" in top
    assert "your status and devices" not in top
    for flag in ("--ca-file", "--broker-username", "PRESENCE_BROKER_PASSWORD"):
        assert flag in top
    commands = ["who", "users", "activity", "online", "away", "dnd", "offline", "status",
                "devices", "sync"]
    for name in commands:
        assert re.search(rf"^    {name} +\S", top, re.M), name
        with pytest.raises(SystemExit):
            main([name, "--help"])
        own = capsys.readouterr().out
        description = own.split("\n\n")[1]
        assert len(description.split()) >= 8, (name, description)


# --------------------------------------------------------------------------------------------
# Against the real hub


@pytest.fixture(scope="module")
def hub_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """One Mosquitto and one ``presence-hub`` on it for the module; yields the broker.

    Long idle timers: the in-process agents have no idle source, so their idle time runs
    from their birth, and nothing here is about going away.
    """
    workdir = tmp_path_factory.mktemp("command-hub")
    # The README's broker settings for the hub (the default in-flight window of 20 works too
    # since the hub flushes early and acks requests at once; see test_integration_agents.py).
    broker = MosquittoProcess(workdir=workdir / "mosquitto", extra_conf="max_inflight_messages 100")
    broker.start()
    hub = HubProcess(["--broker", broker.url, "--storage", "memory",
                      "--heartbeat-interval", "1s", "--away-after", "30s",
                      "--offline-after", "60s"], workdir)
    hub.env = {k: v for k, v in hub.env.items() if not k.startswith("PRESENCE_")}
    try:
        hub.start()
        yield broker
    finally:
        hub.stop()
        hub.close()
        broker.cleanup()
    assert "Traceback" not in hub.output(), hub.output()


#: The hub answers at most 5 requests a second per device (bursts of 20), and these requests
#: come from the same device id as the running agent: every request waits this long after
#: the one before (a rate, not a wait for a condition), so a test never runs into the limit.
ASK_EVERY = 0.2


def _argv(url: str, *rest: str, user: str = "alice", device: str = DEVICE,
          timeout: str = "5s") -> list[str]:
    return ["--broker", url, "--user", user, "--device", device, "--timeout", timeout, *rest]


class Presence:
    """``presence --broker URL --user USER --device DEVICE ...`` through ``main()``."""

    def __init__(self, url: str, user: str, capsys: pytest.CaptureFixture[str],
                 device: str = DEVICE) -> None:
        self.url, self.user, self.device, self.capsys = url, user, device, capsys

    #: when the last request of any Presence was sent (monotonic), for the request rate
    last_ask = 0.0

    def __call__(self, *args: str) -> tuple[int, str, str]:
        """(exit status, stdout, stderr)."""
        pause = Presence.last_ask + ASK_EVERY - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        Presence.last_ask = time.monotonic()
        self.capsys.readouterr()
        code = main(_argv(self.url, *args, user=self.user, device=self.device))
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> Any:
        code, out, err = self("--json", *args)
        assert (code, err) == (0, ""), err
        return json.loads(out)


def _one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err


@pytest.mark.slow
def test_prints_the_hubs_text_and_exits_0(
    hub_broker: MosquittoProcess, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    presence = Presence(hub_broker.url, "cmd-text", capsys)
    assert presence("status", "In a meeting") == (
        0, 'custom status set to "In a meeting"\n', "")
    assert presence() == (0, 'cmd-text: offline "In a meeting"\n', "")
    # The short-lived client has its own id, never the agent's.
    assert f" as {DEVICE}-cli-" in hub_broker.log_text()


@pytest.mark.slow
def test_reply_not_ok_prints_its_text_and_exits_1(
    hub_broker: MosquittoProcess, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    presence = Presence(hub_broker.url, "cmd-notok", capsys)
    code, out, err = presence("devices", "remove", "no-such-device")
    assert (code, out) == (1, "")
    assert _one_line(err) and err.startswith("presence: ") and "no-such-device" in err, err
    code, out, err = presence("activity", "--limit", "5000")
    assert (code, out, err) == (1, "", "presence: --limit must be between 1 and 1000\n")


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
    hub_broker: MosquittoProcess, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    user = "cmd-keep"
    presence = Presence(hub_broker.url, user, capsys)
    with PresenceAgent(agent_config(isolated_env, hub_broker.url, user=user)) as agent:
        assert agent.wait_connected(5)
        session = agent.session
        wait_for(lambda: agent.state is not None, what="the hub's first state")
        code, out, _err = presence("devices")
        assert code == 0 and re.search(r"^\* laptop +Alice's laptop +online ", out, re.M), out
        code, out, _err = presence("sync")
        assert code == 0 and re.fullmatch(r"sync: [01]/1 devices have version \d+\n", out), out
        assert agent.connected and agent.session == session
        assert agent.stats["connections"] == 1


@pytest.mark.slow
def test_agent_and_presence_with_the_real_hub(
    hub_broker: MosquittoProcess, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    user = "cmd-agent"
    url = hub_broker.url
    presence = Presence(url, user, capsys)
    statuses: list[str] = []
    config = agent_config(isolated_env, url, user=user)
    with PresenceAgent(config, on_status=statuses.append) as agent:
        wait_for(lambda: statuses == ["online"], what="the hub's first state reaches the agent")
        agent.record_activity("message", channel_id="telegram-cmd-agent")

        assert presence("dnd") == (0, "status set to dnd\n", "")
        wait_for(lambda: statuses[-1:] == ["dnd"], what="dnd set through the hub reaches the agent")
        who = wait_for(lambda: presence.json("who", "telegram-cmd-agent")["users"],
                       what="the activity reached the hub", interval=ASK_EVERY)
        assert [u["userId"] for u in who] == [user]
        assert presence("sync")[0] == 0
        # other programs read the user's state from the file while the agent runs (after its
        # clean stop the hub may already say offline: its only device is gone)
        assert config.state_file is not None
        wait_for(lambda: json.loads(config.state_file.read_text())["status"] == "dnd",  # type: ignore[union-attr]
                 what="the state file says dnd")


@pytest.mark.slow
def test_every_subcommand_against_the_real_hub(
    hub_broker: MosquittoProcess, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    user = "cmd-all"
    chan = "tg-cmd-all"
    url = hub_broker.url
    presence = Presence(url, user, capsys)
    statuses: list[str] = []
    with PresenceAgent(agent_config(isolated_env, url, user=user),
                       on_status=statuses.append) as agent:
        wait_for(lambda: statuses == ["online"], what="the agent is online on the hub")

        # presence: your own status
        assert presence() == (0, f"{user}: online (primary: {DEVICE})\n", "")
        me = presence.json()
        assert (me["userId"], me["status"], me["customStatus"], me["activeDevice"]) == (
            user, "online", None, DEVICE)

        # activity --limit N --since 1h
        assert presence("activity") == (0, "no activity\n", "")
        assert presence.json("activity", "--since", "1h") == []
        agent.record_activity("message", channel_id=chan)
        wait_for(lambda: presence.json("activity"), what="the first activity reached the hub",
                 interval=ASK_EVERY)
        agent.record_activity("reaction", channel_id=chan, data={"emoji": "+1"})
        wait_for(lambda: len(presence.json("activity")) == 2, what="the second activity",
                 interval=ASK_EVERY)
        code, out, err = presence("activity", "--limit", "1", "--since", "1h")
        lines = out.splitlines()
        assert (code, err, len(lines)) == (0, "", 2), out
        assert lines[0].split() == ["WHEN", "TYPE", "CHANNEL", "DEVICE"]
        assert lines[1].split()[-3:] == ["reaction", chan, DEVICE]
        entries = presence.json("activity", "--limit", "5", "--since", "1h")
        assert [(e["type"], e["channelId"], e["deviceId"]) for e in entries] == [
            ("reaction", chan, DEVICE), ("message", chan, DEVICE)]
        assert entries[0]["data"] == {"emoji": "+1"}

        # who, who CHANNEL
        code, out, err = presence("who")
        assert code == 0 and err == "" and re.match(r"\d+ online:\n", out), out
        assert re.search(rf"^{user} +online +{DEVICE}\s*$", out, re.M), out
        assert user in [u["userId"] for u in presence.json("who")["users"]]
        code, out, err = presence("who", chan)
        assert (code, err) == (0, "") and out.startswith(f"1 online on {chan}:\n"), out
        assert [u["userId"] for u in presence.json("who", chan)["users"]] == [user]
        assert presence("who", "tg-nobody-here") == (0, "nobody is online on tg-nobody-here\n", "")
        assert presence.json("who", "tg-nobody-here") == {"users": [], "next": None}

        # online | away | dnd | offline
        assert presence("dnd") == (0, "status set to dnd\n", "")
        assert presence.json("away")["status"] == "away"
        assert presence("offline") == (
            0, "status set to offline (invisible: others see you offline)\n", "")
        assert user not in [u["userId"] for u in presence.json("who")["users"]]
        assert presence("online") == (0, "status set to online\n", "")
        wait_for(lambda: statuses[1:] == ["dnd", "away", "offline", "online"],
                 what="every status change reached the agent")

        # status "text", status --clear
        assert presence("status", "In a meeting") == (
            0, 'custom status set to "In a meeting"\n', "")
        assert presence() == (0, f'{user}: online "In a meeting" (primary: {DEVICE})\n', "")
        wait_for(lambda: agent.state is not None and agent.state.custom_status == "In a meeting",
                 what="the custom status reached the agent")
        assert presence.json("status", "Lunch")["customStatus"] == "Lunch"
        assert presence("status", "--clear") == (0, "custom status cleared\n", "")
        assert presence.json("status", "--clear")["customStatus"] is None

        # devices, devices remove ID: two more devices that come and go cleanly
        def phone(device: str, name: str) -> PresenceAgent:
            folder = isolated_env / device
            return PresenceAgent(agent_config(
                isolated_env, url, user=user, device=device, name=name,
                outbox=str(folder / "outbox.sqlite3"), state_file=str(folder / "state.json")))

        def device_statuses() -> dict[str, str]:
            return {d["id"]: d["status"] for d in presence.json("devices")}

        with phone("old-phone", "Old phone") as old, phone("tablet", "Tablet") as tablet:
            assert old.wait_connected(5) and tablet.wait_connected(5)
            wait_for(lambda: device_statuses() == {DEVICE: "online", "old-phone": "online",
                                                   "tablet": "online"},
                     what="three devices online", interval=ASK_EVERY)
        wait_for(lambda: device_statuses() == {DEVICE: "online", "old-phone": "offline",
                                               "tablet": "offline"},
                 what="the clean stops", interval=ASK_EVERY)
        code, out, err = presence("devices")
        lines = out.splitlines()
        assert (code, err, len(lines)) == (0, "", 4), out
        assert lines[0].split() == ["DEVICE", "NAME", "STATUS", "LAST", "SEEN"]
        assert re.match(rf"\* {DEVICE} +Alice's laptop +online ", lines[1]), out
        assert re.match(r"  old-phone +Old phone +offline ", lines[2]), out
        assert re.match(r"  tablet +Tablet +offline ", lines[3]), out
        listed = presence.json("devices")
        assert [(d["id"], d["name"], d["isActive"]) for d in listed] == [
            (DEVICE, "Alice's laptop", True), ("old-phone", "Old phone", False),
            ("tablet", "Tablet", False)]
        assert presence("devices", "remove", "old-phone") == (0, "device old-phone removed\n", "")
        assert presence.json("devices", "remove", "tablet") == {"removed": "tablet"}
        assert [d["id"] for d in presence.json("devices")] == [DEVICE]
        code, out, err = presence("devices", "remove", "old-phone")
        assert (code, out) == (1, "") and _one_line(err) and "old-phone" in err, err

        # sync: the one remaining device acks the current version
        def synced() -> Any:
            data = presence.json("sync")
            return data if data["synced"] == data["total"] == 1 else None

        version = wait_for(synced, what="the agent acked the current version",
                           interval=ASK_EVERY)["version"]
        assert presence("sync") == (0, f"sync: 1/1 devices have version {version}\n", "")
        assert agent.stats["connections"] == 1  # asking never disturbed the agent


@pytest.mark.slow
def test_users_lists_offline_users_too_a_page_at_a_time(
    hub_broker: MosquittoProcess, isolated_env: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``who`` leaves offline users out; ``presence users`` is how to find them (issue 15,
    item 11), paged like ``who`` so no request holds the hub."""
    first = Presence(hub_broker.url, "cmd-users-a", capsys)
    second = Presence(hub_broker.url, "cmd-users-b", capsys)
    # users with no device online: offline, with their custom status
    assert first("status", "On holiday")[0] == 0
    assert second("status", "Back soon")[0] == 0
    page = first.json("users", "--after", "cmd-users-", "--limit", "1")
    assert [(u["userId"], u["status"], u["customStatus"]) for u in page["users"]] == [
        ("cmd-users-a", "offline", "On holiday")]
    assert page["next"] == "cmd-users-a"
    code, out, err = first("users", "--after", "cmd-users-", "--limit", "1")
    lines = out.splitlines()
    assert (code, err, lines[0]) == (0, "", "1 user:"), out
    assert lines[1].split() == ["USER", "STATUS", "PRIMARY", "LAST", "SEEN", "CUSTOM"]
    assert lines[2].split()[:3] == ["cmd-users-a", "offline", "-"] and "On holiday" in lines[2]
    assert lines[3] == "more: /presence users --after cmd-users-a"
    page = first.json("users", "--after", "cmd-users-a", "--limit", "1")
    assert [u["userId"] for u in page["users"]] == ["cmd-users-b"]
    assert "cmd-users-a" not in [u["userId"] for u in first.json("who")["users"]]


# --------------------------------------------------------------------------------------------
# The installed command, as a shell runs it


def _console_presence() -> list[str]:
    script = Path(sys.executable).with_name("presence")
    return [str(script)] if script.exists() else [sys.executable, "-m", "device_agent.command"]


def _shell(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``presence ARGS`` (the environment is the test's: isolated_env already set it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    return subprocess.run([*_console_presence(), *args], env=env, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.slow
def test_the_installed_command_exit_status_and_one_line_errors(
    hub_broker: MosquittoProcess, mosquitto: MosquittoProcess,
    isolated_env: Path,  # noqa: F811
) -> None:
    url = hub_broker.url
    common = ["--broker", url, "--user", "cmd-shell", "--device", DEVICE]
    done = _shell(*common, "status", "On call")
    assert (done.returncode, done.stdout, done.stderr) == (
        0, 'custom status set to "On call"\n', "")
    done = _shell(*common, "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["customStatus"] == "On call"
    # HOST:PORT as for mosquitto_sub, like the examples take it (issue 15, item 7)
    done = _shell("--broker", f"{hub_broker.host}:{hub_broker.port}", *common[2:], "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["customStatus"] == "On call"

    for args, status, message in [
        (["who", "a/b"], 2, "invalid channel id 'a/b'"),          # refused before sending
        (["status"], 2, "give a status text"),
        (["--bogus"], 2, "unrecognized arguments: --bogus"),
        (["activity", "--limit", "5000"], 1, "--limit must be between 1 and 1000"),  # the hub
        (["devices", "remove", "ghost"], 1, "ghost"),
    ]:
        done = _shell(*common, *args)
        assert done.returncode == status, (args, done)
        assert done.stdout == "" and _one_line(done.stderr), (args, done.stderr)
        assert done.stderr.startswith("presence: ") and message in done.stderr, done.stderr

    # no hub on this broker; then no broker at all
    done = _shell("--broker", mosquitto.url, "--user", "cmd-shell",
                  "--timeout", "300ms", "who")
    assert (done.returncode, done.stdout) == (1, "") and _one_line(done.stderr), done.stderr
    assert done.stderr.startswith("presence: no reply from the hub within 300ms")
    nothing = f"mqtt://127.0.0.1:{free_port()}"
    done = _shell("--broker", nothing, "--user", "cmd-shell", "who")
    assert (done.returncode, done.stdout) == (1, "") and _one_line(done.stderr), done.stderr
    assert done.stderr.startswith(f"presence: cannot connect to the broker at {nothing}")
