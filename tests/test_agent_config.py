"""Agent settings (precedence, ids, URLs), idle sources and the on-disk outbox; no broker."""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path

import pytest

from device_agent import AgentConfig, BrokerURL, ConfigError, Outbox, load_config
from device_agent.config import default_device_id, sanitize_id
from device_agent.idle import CommandIdle, FileIdle, NoIdle, detect_desktop, make_idle_source

# --------------------------------------------------------------------------------------------
# Precedence: flags > env > file > defaults


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path) -> None:
    file = write_config(tmp_path / "agent.toml", """
broker = "mqtt://file-host"
user = "file-user"
device = "file-device"
name = "File name"
heartbeat_interval = "10s"
prefix = "home/presence"
""")
    env = {
        "PRESENCE_CONFIG": str(file),
        "PRESENCE_BROKER": "mqtts://env-host",
        "PRESENCE_USER": "env-user",
        "PRESENCE_HEARTBEAT_INTERVAL": "",  # empty counts as unset
    }
    config = load_config({"user": "flag-user", "device": None}, env)
    assert config.user == "flag-user"  # flag
    assert config.broker == BrokerURL("env-host", 8883, tls=True)  # env over file
    assert config.device == "file-device"  # file (the None flag means "not given")
    assert config.heartbeat_interval_ms == 10_000  # file, env was empty
    assert config.prefix == "home/presence"
    assert config.idle_source == "auto" and config.keepalive_s == 60  # defaults
    assert config.config_file == file
    assert config.client_id == "presence-agent/flag-user/file-device/{session}"
    assert config.client_id_for("abc") == "presence-agent/flag-user/file-device/abc"


def test_default_file_is_read_from_xdg_config_home_when_present(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    assert load_config({}, env).config_file is None  # absent default file is fine
    write_config(tmp_path / "mqtt-presence" / "agent.toml", 'user = "bob"\ndevice = "pi"\n')
    config = load_config({}, env)
    assert (config.user, config.device) == ("bob", "pi")
    assert config.outbox_path == tmp_path / "state" / "mqtt-presence" / "bob" / "pi" / \
        "outbox.sqlite3"
    assert config.state_file == tmp_path / "state" / "mqtt-presence" / "bob" / "pi" / "state.json"


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path: Path) -> None:
    file = write_config(tmp_path / "etc" / "agent.toml", """
broker = "mqtts://hub.lan"
ca_file = "ca.pem"
outbox = "data/outbox.db"
state_file = ""
""")
    config = load_config({"config": str(file), "user": "a", "device": "b"}, {})
    assert config.ca_file == tmp_path / "etc" / "ca.pem"
    assert config.outbox_path == tmp_path / "etc" / "data" / "outbox.db"
    assert config.state_file is None  # '' disables the state file


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"device": "lap/top"}, {}, "invalid device id 'lap/top'.*from --device"),
        ({}, {"PRESENCE_USER": "a+b"}, "invalid user id 'a\\+b'.*from PRESENCE_USER"),
        ({}, {"PRESENCE_DEVICE": "#"}, "invalid device id '#'"),
        ({"device": "x" * 65}, {}, "invalid device id"),
        ({"prefix": "presence/#"}, {}, "invalid prefix"),
        ({"heartbeat_interval": "often"}, {}, "invalid duration 'often'.*--heartbeat-interval"),
        ({"heartbeat_interval": "1ms"}, {}, "at least 10ms"),
        ({"heartbeat_interval": "8d"}, {}, "at most 7d.*--heartbeat-interval"),
        ({"client_id": "panel-{sesion}"}, {}, r"unknown placeholder\(s\) \{sesion\}.*--client-id"),
        ({"broker": "hub.lan:99999"}, {}, "invalid broker address 'hub.lan:99999'"),
        ({"broker": "ws://hub.lan"}, {}, "unsupported broker URL scheme 'ws'"),
        ({"broker": "mqtt://hub.lan/x"}, {}, "must not have a path"),
        ({"broker": "mqtt://hub.lan:99999"}, {}, "invalid broker address"),
        ({"ca_file": "ca.pem"}, {}, "need an mqtts:// broker"),
        ({"broker": "mqtts://h", "key_file": "k.pem"}, {}, "key_file is set but cert_file"),
        ({"idle_source": "xprintidle"}, {}, "invalid idle_source 'xprintidle'"),
        ({"tls_insecure": "maybe"}, {}, "must be true or false"),
        ({"max_reconnect_attempts": "-1"}, {}, "must be >= 0"),
    ],
)
def test_bad_values_are_config_errors_naming_their_source(
    flags: dict[str, str], env: dict[str, str], message: str
) -> None:
    base = {"user": "alice", "device": "laptop"}
    base = {k: v for k, v in base.items() if f"PRESENCE_{k.upper()}" not in env}
    with pytest.raises(ConfigError, match=message):
        load_config({**base, **flags}, env, use_file=False)


def test_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({"config": str(tmp_path / "nope.toml")}, {})
    bad = write_config(tmp_path / "bad.toml", "broker = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config({"config": str(bad)}, {})
    typo = write_config(tmp_path / "typo.toml", 'heartbeat = "5s"\n')
    with pytest.raises(ConfigError, match=r"unknown key.*'heartbeat'.*heartbeat_interval"):
        load_config({"config": str(typo)}, {})
    wrong_type = write_config(tmp_path / "type.toml", "user = 5\n")
    with pytest.raises(ConfigError, match=r"user must be text.*user in config file"):
        load_config({"config": str(wrong_type)}, {})


def test_toml_native_types_are_accepted(tmp_path: Path) -> None:
    file = write_config(tmp_path / "a.toml", """
broker = "mqtts://h"
heartbeat_interval = 15
tls_insecure = true
max_reconnect_attempts = 4
""")
    config = load_config({"config": str(file), "user": "a", "device": "b"}, {})
    assert config.heartbeat_interval_ms == 15_000 and config.tls_insecure
    assert config.max_reconnect_attempts == 4


def test_broker_url_parsing_and_redaction() -> None:
    url = BrokerURL.parse("mqtt://agent:s%40cret@hub.lan")
    assert (url.host, url.port, url.tls, url.username, url.password) == (
        "hub.lan", 1883, False, "agent", "s@cret")
    assert str(url) == "mqtt://agent:***@hub.lan:1883"
    assert "s@cret" not in repr(url)
    assert BrokerURL.parse("mqtts://hub.lan").port == 8883
    assert BrokerURL.parse("mqtt://[::1]:1999") == BrokerURL("::1", 1999)
    assert str(BrokerURL.parse("mqtt://[::1]:1999")) == "mqtt://[::1]:1999"


def test_credentials_can_come_from_separate_settings() -> None:
    config = load_config(
        {"user": "a", "device": "b", "broker": "mqtt://u:p@h"},
        {"PRESENCE_BROKER_PASSWORD": "from-env"},
        use_file=False,
    )
    assert (config.broker.username, config.broker.password) == ("u", "from-env")


def test_from_values_for_library_use(tmp_path: Path) -> None:
    config = AgentConfig.from_values(user="alice", device="laptop", heartbeat_interval="200ms",
                                     outbox=tmp_path / "o.db")
    assert config.heartbeat_interval_ms == 200 and config.outbox_path == tmp_path / "o.db"
    with pytest.raises(ConfigError, match="unknown setting 'heartbeat'"):
        AgentConfig.from_values(user="a", heartbeat="1s")


def test_client_id_is_a_template_filled_per_connection() -> None:
    """A client id of its own per connection (the session is in it): a reconnect is never a
    takeover. A fixed id is the user's explicit choice (a broker ACL may demand it)."""
    default = AgentConfig.from_values(user="alice", device="laptop")
    assert default.client_id == "presence-agent/alice/laptop/{session}"
    assert default.client_id_for("s1") != default.client_id_for("s2")
    assert default.client_id_for("s1") == "presence-agent/alice/laptop/s1"
    assert not default.fixed_client_id
    custom = AgentConfig.from_values(user="alice", device="laptop", client_id="{user}-{session}")
    assert custom.client_id_for("s1") == "alice-s1" and not custom.fixed_client_id
    fixed = AgentConfig.from_values(user="alice", device="laptop", client_id="panel-{device}")
    assert fixed.client_id_for("s1") == "panel-laptop" and fixed.fixed_client_id
    # Constructed directly (no client id given): the default template.
    direct = AgentConfig(user="bob", device="pi")
    assert direct.client_id_for("s1") == "presence-agent/bob/pi/s1" and not direct.fixed_client_id


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("laptop", "laptop"),
        ("My Laptop", "My-Laptop"),
        ("kitchen/panel#2", "kitchen-panel-2"),
        ("-dots.", "dots"),
        ("ümlaut", "mlaut"),
        ("", "device"),
        ("x" * 100, "x" * 64),
    ],
)
def test_sanitize_id(raw: str, clean: str) -> None:
    assert sanitize_id(raw) == clean


def test_default_device_id_is_the_short_sanitized_host_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "Alice's MacBook.local")
    assert default_device_id() == "Alice-s-MacBook"


# --------------------------------------------------------------------------------------------
# Idle sources


def test_file_idle_is_time_since_mtime(tmp_path: Path) -> None:
    marker = tmp_path / "touched"
    marker.write_text("")
    mtime = marker.stat().st_mtime
    source = FileIdle(marker, clock=lambda: mtime + 42.5)
    assert source.idle_ms() == 42_500
    assert FileIdle(marker, clock=lambda: mtime - 5).idle_ms() == 0  # clock skew: never < 0


def test_missing_file_or_failing_command_means_unknown_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="device_agent.idle")
    missing = FileIdle(tmp_path / "absent")
    assert [missing.idle_ms() for _ in range(3)] == [None, None, None]
    failing = CommandIdle(["false"])
    assert [failing.idle_ms() for _ in range(3)] == [None, None, None]
    assert len(caplog.records) == 2, "one line per failing source, not per heartbeat"


def test_command_idle_parses_the_first_number() -> None:
    assert CommandIdle(["echo", "1234"]).idle_ms() == 1234
    assert CommandIdle([sys.executable, "-c", "print('idle: 12.6 ms')"]).idle_ms() == 13
    assert CommandIdle(["echo", "none"]).idle_ms() is None
    assert CommandIdle(["/nonexistent/idle-tool"]).idle_ms() is None


def test_idle_source_specs(tmp_path: Path) -> None:
    assert isinstance(make_idle_source("none"), NoIdle)
    command = make_idle_source("command:echo '5'")
    assert isinstance(command, CommandIdle) and command.argv == ["echo", "5"]
    file = make_idle_source(f"file:{tmp_path}/x")
    assert isinstance(file, FileIdle) and file.path == tmp_path / "x"
    with pytest.raises(ConfigError):
        make_idle_source("command:")
    with pytest.raises(ConfigError):
        make_idle_source("command:'unclosed")


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS uses ioreg")
def test_desktop_idle_falls_back_to_none_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="device_agent.idle")
    assert isinstance(detect_desktop({}), NoIdle)
    assert [r.getMessage() for r in caplog.records] == [
        "idle source: none (no desktop session (no DISPLAY)); heartbeats prove liveness only"
    ]


# --------------------------------------------------------------------------------------------
# Outbox


def test_outbox_keeps_order_across_processes_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    agent_side = Outbox(path, "alice/laptop")
    cli_side = Outbox(path, "alice/laptop")  # another process, as far as SQLite is concerned
    assert not agent_side.changed_by_others()
    first = agent_side.add("activity", b"1")
    cli_side.add("activity", b"2")
    assert agent_side.changed_by_others() and not agent_side.changed_by_others()
    agent_side.add("set", b"3")
    assert not agent_side.changed_by_others(), "own writes are not someone else's"
    assert [e.payload for e in agent_side.pending()] == [b"1", b"2", b"3"]
    assert [e.payload for e in agent_side.pending(after=first, limit=1)] == [b"2"]
    cli_side.close()
    agent_side.close()

    with Outbox(path, "alice/laptop") as reopened:
        entries = reopened.pending()
        assert [e.kind for e in entries] == ["activity", "activity", "set"]
        reopened.remove(e.id for e in entries)
        assert reopened.count() == 0
        # Ids never go back, so "newer" stays "later" after the outbox emptied.
        assert reopened.add("activity", b"4") > entries[-1].id


def test_outbox_belongs_to_one_user_and_device(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    Outbox(path, "alice/laptop").close()
    with pytest.raises(ConfigError, match="belongs to alice/laptop, not bob/laptop"):
        Outbox(path, "bob/laptop")


def test_outbox_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_text("this is not sqlite " * 100)
    with pytest.raises(ConfigError, match="not usable"):
        Outbox(path, "alice/laptop")
    assert sqlite3.sqlite_version  # the stdlib module is all it needs
