"""The first hour of a new user, where it went wrong (issue 15, items 7, 9, 10 and 11).

Each test is something a new user did by the book and was let down by: a hub that ran on
with a wrong broker password, a start-up banner whose commands did not work for the
configuration in use (anonymous commands on a broker with accounts, a watcher subscribed
beyond what it may read, scripts without the ``.venv/bin/`` a fresh clone needs), a device
account used for another device answered with a bare "Not authorized", a removed device that
came back named by its id, ``presence`` without ``--ca-file``.

Real parts throughout: a Mosquitto with the exported password and ACL files and a
``presence-hub`` process logged in to it (one of each for the module), the hub's embedded
broker with accounts, and the installed console scripts where what a shell sees matters.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pytest

from device_agent import AgentConfig, PresenceAgent
from device_agent.command import ask_hub
from device_agent.command import main as presence_main
from hub.cli.run import _banner, script_prefix
from hub.cli.settings import build_parser, resolve
from hub.cli.users import users_main
from tests.support.hub_process import HubProcess
from tests.support.mqtt_clients import MqttClient
from tests.support.procs import MosquittoProcess, find_binary, free_port
from tests.support.wait import wait_for

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
PASSWORDS = {
    "presence-hub": "hub-secret",
    "alice/laptop": "laptop-secret",
    "alice/phone": "phone-secret",
    "ha": "watcher-secret",
}
ROLES = {"presence-hub": "add-hub", "ha": "add-watcher"}


def _env() -> dict[str, str]:
    """The test's environment without the developer's PRESENCE_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}


def _make_accounts(folder: Path) -> Path:
    """The accounts of this module, made with the command a user runs."""
    creds = folder / "credentials.json"
    env = {"PRESENCE_CREDENTIALS": str(creds)}
    for name, secret in PASSWORDS.items():
        action = ROLES.get(name, "add")
        argv = [action, *([] if action == "add-hub" else name.split("/")), "--password", secret]
        if action == "add-hub":
            argv.insert(1, name)
        assert users_main(argv, env=env, out=StringIO()) == 0, argv
    return creds


@dataclass
class World:
    """A Mosquitto with the exported files, and a hub logged in to it."""

    broker: MosquittoProcess
    hub: HubProcess
    credentials: Path
    tmp: Path

    def url(self, username: str | None = None) -> str:
        if username is None:
            return f"mqtt://{HOST}:{self.broker.port}"
        login = username.replace("/", "%2F")
        return f"mqtt://{login}:{PASSWORDS[username]}@{HOST}:{self.broker.port}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("first-hour")
    creds = _make_accounts(tmp)
    pw, acl = tmp / "presence.pw", tmp / "presence.acl"
    assert users_main(["export-mosquitto", "--password-file", str(pw), "--acl-file", str(acl)],
                      env={"PRESENCE_CREDENTIALS": str(creds)}, out=StringIO()) == 0
    broker = MosquittoProcess(
        workdir=tmp / "mosquitto",
        extra_conf=f"allow_anonymous false\npassword_file {pw}\nacl_file {acl}\n")
    broker.start()
    (tmp / "hub").mkdir()
    hub = HubProcess(["--broker", f"mqtt://presence-hub:{PASSWORDS['presence-hub']}"
                      f"@{HOST}:{broker.port}", "--storage", "memory",
                      "--credentials", str(creds), "--heartbeat-interval", "1s",
                      "--away-after", "1m", "--offline-after", "2m"], tmp / "hub",
                     env=_env())
    hub.env = {k: v for k, v in hub.env.items() if not k.startswith("PRESENCE_")}
    try:
        hub.start()
        yield World(broker, hub, creds, tmp)
    finally:
        hub.stop()
        hub.close()
        broker.cleanup()
    assert "Traceback" not in hub.output(), hub.output()


# ---------------------------------------------------------------------------- item 9


REFUSALS = {
    "presence-hub:wrong-password@": "refused the hub's login as 'presence-hub': not authorized."
                                    " Check the username and password in --broker",
    "": "refused the hub, which gave no login: not authorized. Give one in the URL, --broker"
        " 'mqtt://presence-hub:PASSWORD@",
}


def test_a_refused_login_stops_the_hub_at_start_with_one_line(world: World) -> None:
    """The hub retried a wrong password forever, after printing "presence hub running"; the
    agent gave up at once. A refused login is a configuration error: exit 1, one line. (The
    two hubs run at once: each is a process start.)"""
    hubs = {
        login: subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "--broker",
             f"mqtt://{login}{HOST}:{world.broker.port}", "--storage", "memory",
             "--log-level", "warning"],
            cwd=world.tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        for login in REFUSALS
    }
    for login, says in REFUSALS.items():
        out, err = hubs[login].communicate(timeout=60)
        assert hubs[login].returncode == 1, out + err
        assert out == "" and "Traceback" not in err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("presence-hub: the MQTT broker mqtt://")
        assert says in lines[0] and "wrong-password" not in lines[0], lines[0]
        assert "export-mosquitto" in lines[0]


def test_a_broker_not_up_yet_is_waited_for_not_fatal(tmp_path: Path) -> None:
    """Only a refusal is fatal: a broker that cannot be reached yet (a network error) is
    what retries are for, and the hub starts once it comes up."""
    port = free_port()
    hub = HubProcess(["--broker", f"{HOST}:{port}", "--storage", "memory"], tmp_path,
                     env=_env())
    hub.env = {k: v for k, v in hub.env.items() if not k.startswith("PRESENCE_")}
    started = threading.Thread(target=hub.start, kwargs={"timeout": 30}, daemon=True)
    broker = MosquittoProcess(port=port, workdir=tmp_path / "mosquitto")
    try:
        started.start()
        wait_for(lambda: "broker: external broker" in hub.output(), timeout=15,
                 what="the hub trying the broker")
        broker.start()
        started.join(30)
        assert "presence hub running" in hub.output(), hub.output()
        assert hub.proc is not None and hub.proc.poll() is None
        assert "refused" not in hub.output()
    finally:
        hub.close()
        broker.cleanup()


# ---------------------------------------------------------------------------- item 10


def _settings(*argv: str) -> dict[str, Any]:
    return resolve(build_parser().parse_args(list(argv)), {})


def _lines(banner: str) -> dict[str, str]:
    """The banner's labelled lines (``watch``, ``join device``, ...), continuations joined."""
    out: dict[str, str] = {}
    label = ""
    for line in banner.splitlines()[1:]:
        head, sep, rest = line.strip().partition(":  ")
        if sep and line.startswith("  ") and not line.startswith("   "):
            label, out[head] = head, rest.strip()
        elif label:
            out[label] += "\n" + line.strip()
    return out


def test_the_banner_without_accounts_shows_anonymous_commands_with_the_venv_prefix() -> None:
    lines = _lines(_banner(_settings(), "embedded broker on 127.0.0.1:1883", "embedded",
                           "authentication off: every client may publish and read everything",
                           scripts=".venv/bin/"))
    assert lines["watch"] == "mosquitto_sub -h 127.0.0.1 -p 1883 -t 'presence/#' -v"
    assert lines["join device"] == (".venv/bin/presence-agent --broker mqtt://127.0.0.1:1883"
                                    " --user alice --device laptop")
    assert lines["ask the hub"] == (".venv/bin/presence --broker mqtt://127.0.0.1:1883"
                                    " --user alice --device laptop who")


@pytest.mark.parametrize(("argv", "broker", "access", "users_where", "export"), [
    # the embedded broker with accounts
    ((), "embedded", "authentication on (1 device from presence-data/credentials.json)", "",
     False),
    # an external broker the hub logs in to, accounts in another --db folder
    (("--db", "/srv/presence/presence.json"), "mqtt://presence-hub:pw@hub.lan:1884", None,
     " --db /srv/presence/presence.json", True),
    # an external broker, accounts here in a file of their own, no login of the hub's
    (("--credentials", "/etc/presence/accounts.json", "--prefix", "home/presence"),
     "mqtt://hub.lan:1884",
     "enforced by the external broker, not the hub (2 account(s) here apply only once exported",
     " --credentials /etc/presence/accounts.json", True),
])
def test_the_banner_with_accounts_shows_logins_and_what_a_watcher_may_read(
    argv: tuple[str, ...], broker: str, access: str | None, users_where: str, export: bool
) -> None:
    settings = _settings(*argv)
    prefix = settings["prefix"]
    banner = _banner(settings, "the broker", broker, access, scripts="")
    lines = _lines(banner)
    host, port = ("127.0.0.1", "1883") if broker == "embedded" else ("hub.lan", "1884")
    # a watcher may read P/users/#, not P/#: 'All subscription requests were denied'
    assert lines["watch"].startswith(
        f"mosquitto_sub -h {host} -p {port} -u WATCHER -P PASSWORD -t '{prefix}/users/#' -v\n")
    assert f"presence-hub users add-watcher WATCHER{users_where}:" in lines["watch"]
    login = "PRESENCE_BROKER_USERNAME=alice/laptop PRESENCE_BROKER_PASSWORD=PASSWORD"
    device = f"--broker mqtt://{host}:{port} --user alice --device laptop"
    assert lines["join device"].startswith(f"presence-hub users add alice laptop{users_where} ")
    assert ("export-mosquitto and reload Mosquitto" in lines["join device"]) == export
    assert lines["join device"].endswith(f"\n{login} presence-agent {device}")
    assert lines["ask the hub"] == f"{login} presence {device} who"
    assert "pw" not in banner.replace("PASSWORD", "")


def _scripts(folder: Path) -> Path:
    bin_dir = folder / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "presence-agent"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_scripts_carry_the_venv_prefix_unless_the_shell_finds_them(tmp_path: Path) -> None:
    bin_dir = _scripts(tmp_path / "checkout")
    python = str(bin_dir / "python")
    # a fresh clone: run from the checkout, venv not activated
    assert script_prefix(python, cwd=tmp_path / "checkout", path="/usr/bin:/bin") == ".venv/bin/"
    # below the checkout's folder: relative still; from anywhere else: the full path
    assert script_prefix(python, cwd=tmp_path, path="/usr/bin") == "checkout/.venv/bin/"
    assert script_prefix(python, cwd=tmp_path / "other", path="/usr/bin") == f"{bin_dir}/"
    # the venv activated (its bin first on PATH): the bare names work
    assert script_prefix(python, cwd=tmp_path / "checkout", path=f"{bin_dir}:/usr/bin") == ""
    # not an installation's scripts (python -m from a source tree): nothing to add
    assert script_prefix("/usr/bin/python3", cwd=tmp_path, path="/usr/bin") == ""


def test_the_banner_commands_work_as_shown_on_mosquitto_with_accounts(world: World) -> None:
    """Run what the hub's banner says (the passwords filled in): the agent-side command logs
    in and changes alice's status, and the watcher's subscription sees it."""
    lines = _lines(world.hub.output().split("presence hub running", 1)[1])
    ask = shlex.split(lines["ask the hub"].replace(" who", " dnd"))
    env = _env() | {"XDG_STATE_HOME": str(world.tmp / "state"),
                    "XDG_CONFIG_HOME": str(world.tmp / "config")}
    while "=" in ask[0]:
        name, _, value = ask.pop(0).partition("=")
        env[name] = PASSWORDS["alice/laptop"] if value == "PASSWORD" else value
    assert Path(ask[0]).is_absolute(), "run from elsewhere: the banner names the scripts' path"
    done = subprocess.run(ask, env=env, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, "status set to dnd\n", "")

    watch = shlex.split(lines["watch"].splitlines()[0])
    topic_filter = watch[watch.index("-t") + 1]
    watcher = MqttClient(HOST, world.broker.port)
    watcher.paho.username_pw_set("ha", PASSWORDS["ha"])
    try:
        watcher.connect()
        watcher.subscribe(topic_filter)
        wait_for(lambda: watcher.retained_view.get("presence/users/alice/status") == b"dnd",
                 what="the watcher reads alice's status with the banner's filter")
    finally:
        watcher.close()


# ---------------------------------------------------------------------------- item 11


def test_presence_with_another_devices_account_names_the_identity_it_allows(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mosquitto closes the connection of a client that publishes outside its ACL; the
    command used to say only that. Now it says what the account allows."""
    argv = ["--broker", world.url("alice/phone"), "--user", "alice", "--device", "laptop",
            "--timeout", "3s", "who"]
    assert presence_main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "the account alice/phone may act only as user 'alice' device 'phone'" in err
    assert "(--user alice --device phone), not as alice/laptop" in err
    assert PASSWORDS["alice/phone"] not in err


def test_a_device_removed_while_running_comes_back_with_its_name(
    world: World, tmp_path: Path
) -> None:
    config = AgentConfig.from_values(
        broker=world.url("alice/laptop"), user="alice", device="laptop", name="Work laptop",
        idle_source="none", heartbeat_interval="200ms", outbox=str(tmp_path / "outbox.db"),
        state_file=str(tmp_path / "state.json"), reconnect_min="50ms", reconnect_max="200ms")
    phone = AgentConfig.from_values(broker=world.url("alice/phone"), user="alice",
                                    device="phone", outbox=str(tmp_path / "phone.db"))

    def devices() -> dict[str, str]:
        reply = ask_hub(phone, "/presence devices", 5)
        assert reply.ok, reply.text
        return {d["id"]: d["name"] for d in reply.data}

    with PresenceAgent(config) as agent:
        assert agent.wait_connected(10)
        wait_for(lambda: devices().get("laptop") == "Work laptop", what="laptop known by name")
        reply = ask_hub(phone, "/presence devices remove laptop", 5)
        assert reply.ok, reply.text
        # back at once, as born: a heartbeat alone would name it "laptop"
        wait_for(lambda: devices().get("laptop") == "Work laptop", interval=0.2,
                 what="the removed laptop back with its name")
        assert agent.connected and agent.stats["connections"] == 1


def test_an_agent_with_another_devices_account_gives_up_naming_the_identity(
    tmp_path: Path
) -> None:
    """On the embedded broker the will (on the wrong device's topic) is refused at CONNECT
    with "Not authorized"; the agent and the broker's log now say which identity the
    account allows."""
    creds = _make_accounts(tmp_path)
    port = free_port()
    hub = HubProcess(["--broker", "embedded", "--listen", f"{HOST}:{port}", "--storage",
                      "memory", "--credentials", str(creds)], tmp_path, env=_env())
    hub.env = {k: v for k, v in hub.env.items() if not k.startswith("PRESENCE_")}
    try:
        hub.start()
        config = AgentConfig.from_values(
            broker=f"mqtt://{HOST}:{port}", broker_username="alice/phone",
            broker_password=PASSWORDS["alice/phone"], user="alice", device="laptop",
            idle_source="none", outbox=str(tmp_path / "outbox.db"),
            state_file=str(tmp_path / "state.json"))
        with PresenceAgent(config) as agent:
            assert agent.wait(10), "the agent gave up"
            assert str(agent.error) == (
                f"the broker at mqtt://alice/phone:***@{HOST}:{port} refused the connection:"
                " Not authorized; the account alice/phone may act only as user 'alice' device"
                " 'phone' (--user alice --device phone), not as alice/laptop")
        wait_for(lambda: "its will topic 'presence/devices/alice/laptop/conn' is not its own;"
                 " it may publish only to presence/devices/alice/phone/+" in hub.output(),
                 what="the broker's log line")

        # A clean stop with an agent connected: amqtt logged "1 messages not broadcasted"
        # (twice) for the will of the connection the stop closed.
        right = config.with_changes(broker=config.broker.with_login(
            "alice/laptop", PASSWORDS["alice/laptop"]))
        with PresenceAgent(right) as agent:
            assert agent.wait_connected(10)
            wait_for(lambda: agent.state is not None, what="the agent has the hub's state")
            assert hub.stop() == 0
        out = hub.output()
        assert "not broadcasted" not in out and "Traceback" not in out, out
        assert "stopped cleanly" in out
    finally:
        hub.close()


def test_the_counts_logged_at_stop_say_what_they_count() -> None:
    """"since start: engine: stale_session=1" said nothing to a user; every counter the
    engine keeps has its meaning beside it."""
    from hub.cli.run import ENGINE_COUNTERS, _counter_line
    from hub.core import engine

    source = Path(engine.__file__).read_text()
    kept = set(re.findall(r'counters\["([a-z_]+)"\]', source))
    assert kept and kept <= set(ENGINE_COUNTERS), kept - set(ENGINE_COUNTERS)
    line = _counter_line({"dropped": {"bad_payload": 2}, "engine": {"stale_session": 1}})
    assert line == ("dropped: bad_payload=2 | engine: stale_session=1 (messages of a device's"
                    " earlier connection, ignored: normal after a reconnect)")


# ---------------------------------------------------------------------------- item 7


def test_presence_takes_ca_file_like_the_agent_and_the_hub(
    mosquitto_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """``presence --ca-file`` (it had only PRESENCE_CA_FILE): with the private CA the TLS
    handshake passes and the command waits for a hub; without it, the certificate is
    refused."""
    find_binary("openssl", "apt-get install openssl")
    from tests.test_agent import make_certs

    for name in [k for k in os.environ if k.startswith("PRESENCE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    certs = make_certs(tmp_path / "certs")
    tls_port = free_port()
    broker = mosquitto_factory(f"listener {tls_port} {HOST}\ncertfile {certs['cert']}\n"
                               f"keyfile {certs['key']}\n")
    wait_for(lambda: f"port {tls_port}" in broker.log_text(), what="TLS listener open")
    url = f"mqtts://{HOST}:{tls_port}"
    common = ["--broker", url, "--user", "alice", "--device", "laptop", "--timeout", "300ms"]
    assert presence_main([*common, "--ca-file", str(certs["ca"]), "who"]) == 1
    assert capsys.readouterr().err.startswith("presence: no reply from the hub within 300ms")
    assert presence_main([*common, "who"]) == 1
    assert "TLS certificate not accepted" in capsys.readouterr().err


def test_users_add_from_a_script_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``presence-hub users add`` with a stdin that is not a terminal reads the password
    from it; from a script with nothing on stdin it said only "no password on stdin"."""
    env = {"PRESENCE_CREDENTIALS": str(tmp_path / "credentials.json")}
    assert users_main(["add", "bob", "desk"], stdin=StringIO(""), env=env) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "stdin is not a terminal" in err
    assert "echo \"$PW\" | presence-hub users" in err and "--generate" in err
    assert users_main(["add", "bob", "desk", "--generate"], stdin=StringIO(""), env=env) == 0
    assert "password: " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        users_main(["add", "--help"], env=env)
    shown = " ".join(capsys.readouterr().out.split())
    assert "--generate" in shown and "From a script whose stdin is not a terminal" in shown
