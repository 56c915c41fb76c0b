"""``presence-agent`` as a real process: signals, wills, the activity subcommand, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent import cli
from tests.support.procs import MosquittoProcess
from tests.support.wait import wait_for
from tests.test_agent_helpers import DEVICE, USER, Watcher, agent_env

pytestmark = pytest.mark.slow

AGENT = [sys.executable, "-m", "device_agent.cli"]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Agent processes started by a test; any still running are killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def start_agent(env: dict[str, str], procs: list[subprocess.Popen[bytes]],
                log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen([*AGENT], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    procs.append(proc)
    return proc


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], env=env, capture_output=True, text=True, timeout=30)


def test_sigkill_publishes_the_will_of_its_session(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path,
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    proc = start_agent(agent_env(tmp_path, mosquitto.url), spawn, tmp_path / "agent.log")
    birth = watcher.wait(watcher.births, "birth of the agent process")[0]
    proc.kill()
    proc.wait(5)
    will = watcher.wait(lambda: watcher.offlines("lost"), "will after SIGKILL")[0]
    assert will == {"state": "offline", "session": birth["session"], "reason": "lost"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_cleanly_with_reason_disconnect(
    sig: signal.Signals, mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path,
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    log = tmp_path / "agent.log"
    proc = start_agent(agent_env(tmp_path, mosquitto.url), spawn, log)
    birth = watcher.wait(watcher.births, "birth of the agent process")[0]
    proc.send_signal(sig)
    assert proc.wait(10) == 0, log.read_text()
    offline = watcher.wait(lambda: watcher.offlines("disconnect"), "clean offline")[0]
    assert offline["session"] == birth["session"]
    assert not watcher.offlines("lost")
    text = log.read_text()
    assert "Traceback" not in text
    assert f"connected to {mosquitto.url}" in text and "offline (reason disconnect)" in text


def test_activity_from_the_cli_is_delivered_by_the_next_agent_and_the_running_one(
    mosquitto: MosquittoProcess, watcher: Watcher, tmp_path: Path,
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    env = agent_env(tmp_path, mosquitto.url)
    for n in range(2):  # no agent runs: these wait in the outbox
        done = run_cli("activity", "--type", "message", "--channel", "telegram-123",
                       "--data", json.dumps({"n": n}), env=env)
        assert done.returncode == 0, done.stderr
        assert "queued message activity on telegram-123" in done.stdout
    assert not watcher.of("activity")

    start_agent(env, spawn, tmp_path / "agent.log")
    watcher.wait(lambda: [a["data"]["n"] for a in watcher.of("activity")] == [0, 1],
                 "queued activity delivered on start, in order")
    kinds = [m.kind for m in watcher.snapshot()]
    assert kinds.index("conn") < kinds.index("activity"), "birth comes first"

    done = run_cli("activity", "--type", "reaction", "--data", '{"n": 2}', env=env)
    assert done.returncode == 0, done.stderr
    watcher.wait(lambda: len(watcher.of("activity")) == 3, "activity while the agent runs")
    last = watcher.of("activity")[-1]
    assert last["type"] == "reaction" and "channelId" not in last


@pytest.mark.parametrize(
    ("extra_env", "args", "message"),
    [
        ({"PRESENCE_DEVICE": "lap/top"}, [], "invalid device id 'lap/top'"),
        ({"PRESENCE_USER": "al#ce"}, [], "invalid user id 'al#ce'"),
        ({}, ["--heartbeat-interval", "soon"], "invalid duration 'soon'"),
        ({"PRESENCE_BROKER": "http://x"}, [], "unsupported broker URL scheme"),
        ({}, ["activity", "--data", "[1]"], "--data must be a JSON object"),
        ({}, ["activity", "--channel", "a+b"], "invalid activity"),
        ({}, ["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_user_errors_are_one_line_exit_2(
    extra_env: dict[str, str], args: list[str], message: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in agent_env(tmp_path, "mqtt://127.0.0.1:1", **extra_env).items():
        monkeypatch.setenv(name, value)
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse errors exit from inside
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("presence-agent: error:"), err
    assert message in err


def test_a_config_error_in_the_real_process_has_no_traceback(tmp_path: Path) -> None:
    env = agent_env(tmp_path, "mqtt://127.0.0.1:1", PRESENCE_DEVICE="lap/top")
    done = run_cli(env=env)
    assert done.returncode == 2
    assert done.stderr == (
        "presence-agent: error: invalid device id 'lap/top': use 1-64 characters from"
        " A-Z a-z 0-9 _ . - (from PRESENCE_DEVICE)\n"
    )


def test_help_explains_the_daemon_and_the_activity_subcommand(tmp_path: Path) -> None:
    done = run_cli("--help", env=agent_env(tmp_path, "mqtt://127.0.0.1:1"))
    assert done.returncode == 0
    for needle in ("SIGTERM", "activity", "outbox", "PRESENCE_BROKER", "--heartbeat-interval"):
        assert needle in done.stdout


def test_config_shows_flags_over_env_over_file(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        'broker = "mqtt://file-host:1883"\nname = "From file"\nprefix = "home/presence"\n'
        'heartbeat_interval = "10s"\n'
    )
    env = agent_env(tmp_path, "mqtt://env-host:1884", PRESENCE_CONFIG=str(config_file),
                    PRESENCE_NAME="From env")
    del env["PRESENCE_HEARTBEAT_INTERVAL"]
    done = run_cli("config", "--name", "From flag", env=env)
    assert done.returncode == 0, done.stderr
    settings = dict(line.split(" = ", 1) for line in done.stdout.splitlines())
    assert settings["name"] == "From flag"
    assert settings["broker"] == "mqtt://env-host:1884"
    assert settings["prefix"] == "home/presence"
    assert settings["heartbeat_interval_ms"] == "10000"
    assert settings["user"] == USER and settings["device"] == DEVICE
    assert settings["config_file"] == str(config_file)


def test_agent_that_cannot_log_in_gives_up_with_exit_1(
    mosquitto_factory: object, tmp_path: Path
) -> None:
    broker = mosquitto_factory("allow_anonymous false\n")  # type: ignore[operator]
    env = agent_env(tmp_path, broker.url)
    done = subprocess.run([*AGENT], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"presence-agent: the broker at {broker.url} refused the connection:" \
        " Not authorized"
    wait_for(lambda: "giving up" in done.stderr, timeout=1, what="give-up log line")
