"""Agent settings from flags, ``PRESENCE_*`` environment variables and a TOML file.

Precedence is flags > environment > file > defaults, key by key, so a config file can hold the
broker and credentials while a service unit overrides just ``PRESENCE_DEVICE``. One table
(:data:`KEYS`) names every setting once; flags (``--heartbeat-interval``), environment
variables (``PRESENCE_HEARTBEAT_INTERVAL``) and TOML keys (``heartbeat_interval``) are derived
from it, so they cannot drift apart.

The file is ``--config PATH``, else ``$PRESENCE_CONFIG``, else
``$XDG_CONFIG_HOME/mqtt-presence/agent.toml`` (``~/.config/...``) when it exists. It holds the
keys at top level::

    broker = "mqtts://agent:secret@hub.lan:8883"
    ca_file = "ca.pem"            # relative paths are relative to this file
    user = "alice"
    device = "laptop"
    heartbeat_interval = "30s"
    idle_source = "auto"

Every error is a :class:`~device_agent.errors.ConfigError` that says which value (and from
where) was wrong, because a daemon that dies with a traceback on a typo is hostile.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from hub.protocol import (
    DEFAULT_PREFIX,
    BrokerURL,
    InvalidId,
    InvalidURL,
    format_duration_ms,
    parse_duration_ms,
    validate_id,
    validate_prefix,
)
from hub.protocol.payloads import MAX_ANNOUNCED_MS

from .errors import ConfigError

ENV_PREFIX: Final = "PRESENCE_"
APP_DIR: Final = "mqtt-presence"

Kind = Literal["str", "url", "duration", "bool", "int", "path"]


@dataclass(frozen=True, slots=True)
class Key:
    """One setting: its TOML name, value kind, and the help line shown by ``--help``."""

    name: str
    kind: Kind
    help: str
    metavar: str = ""
    #: False for secrets: a flag would show the value in ``ps`` output.
    has_flag: bool = True

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add_flag(self, group: Any) -> None:
        """Its command-line flag on an argparse parser or group (presence-agent and presence
        take the same flags for the same settings), with the environment variable in its
        help."""
        help_text = f"{self.help} [{self.env}]"
        if self.kind == "bool":
            group.add_argument(self.flag, dest=self.name, action="store_true", help=help_text)
        else:
            group.add_argument(self.flag, dest=self.name, metavar=self.metavar or "VALUE",
                               help=help_text)


KEYS: Final[tuple[Key, ...]] = (
    Key("broker", "url", "MQTT broker: HOST:PORT, mqtt://[user:pass@]host[:1883] or"
        " mqtts://host[:8883] (default localhost:1883)", "URL"),
    Key("broker_username", "str", "broker username (overrides the one in the URL)", "NAME"),
    Key("broker_password", "str", "broker password (overrides the one in the URL)",
        has_flag=False),
    Key("user", "str", "presence user id this device belongs to (default: your login name)",
        "ID"),
    Key("device", "str", "device id (default: this host's name, sanitized)", "ID"),
    Key("name", "str", "human device name shown by the hub (default: the host name)", "TEXT"),
    Key("prefix", "str", f"topic prefix (default {DEFAULT_PREFIX})", "PREFIX"),
    Key("heartbeat_interval", "duration", "time between heartbeats, e.g. 30s (default 30s)",
        "DURATION"),
    Key("idle_source", "str", "how to sense user idle time: auto, none, command:CMD, file:PATH"
        " (default auto)", "SPEC"),
    Key("outbox", "path", "outbox database for undelivered activity (default: under"
        " $XDG_STATE_HOME/mqtt-presence/USER/DEVICE/)", "PATH"),
    Key("state_file", "path", "local JSON file with the user's state for other programs"
        " ('' disables; default next to the outbox)", "PATH"),
    Key("ca_file", "path", "CA certificate file for mqtts:// (default: system CAs)", "PATH"),
    Key("cert_file", "path", "client certificate file for mqtts://", "PATH"),
    Key("key_file", "path", "client private key file for mqtts://", "PATH"),
    Key("tls_insecure", "bool", "do not verify the broker's certificate host name (testing only)"),
    Key("client_id", "str", "MQTT client id template; {user}, {device} and {session} are filled"
        " in (default presence-agent/{user}/{device}/{session}); without {session} the id is"
        " fixed and every reconnect takes over the previous connection", "TEMPLATE"),
    Key("keepalive", "duration", "MQTT keepalive (default 60s)", "DURATION"),
    Key("reconnect_min", "duration", "first reconnect delay (default 1s)", "DURATION"),
    Key("reconnect_max", "duration", "longest reconnect delay (default 60s)", "DURATION"),
    Key("max_reconnect_attempts", "int", "give up after this many failed connection attempts"
        " in a row (default 0 = never)", "N"),
    Key("timeout", "duration", "how long `presence` waits for the hub's reply (default 5s)",
        "DURATION"),
)
KEYS_BY_NAME: Final[dict[str, Key]] = {key.name: key for key in KEYS}

_DEFAULT_BROKER: Final = "mqtt://localhost:1883"

#: The client id of each connection. The session id makes every connection's id new, so a
#: reconnect never takes over the previous connection: a broker that takes over a client id
#: publishes the old connection's will just before the new birth, and the user would flap.
DEFAULT_CLIENT_ID: Final = "presence-agent/{user}/{device}/{session}"
_PLACEHOLDER_RE: Final = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDERS: Final = frozenset({"user", "device", "session"})


def expand_client_id(template: str, user: str, device: str) -> str:
    """Fill ``{user}`` and ``{device}`` in, keep ``{session}`` for each connection.

    Raises ``ValueError`` for an empty template or an unknown placeholder, so a typo such as
    ``{sesion}`` is not sent to the broker literally (as one fixed id for every connection).
    """
    if not template:
        raise ValueError("client_id must not be empty")
    unknown = sorted(set(_PLACEHOLDER_RE.findall(template)) - _PLACEHOLDERS)
    if unknown:
        raise ValueError(
            f"client_id {template!r} has unknown placeholder(s) "
            f"{', '.join('{' + u + '}' for u in unknown)}: use {{user}}, {{device}}, {{session}}"
        )
    return template.replace("{user}", user).replace("{device}", device)
# --------------------------------------------------------------------------------------------
# The settings


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent and the ``presence`` command need, validated and typed."""

    user: str
    device: str
    broker: BrokerURL = field(default_factory=lambda: BrokerURL.parse(_DEFAULT_BROKER))
    name: str = ""
    prefix: str = DEFAULT_PREFIX
    heartbeat_interval_ms: int = 30_000
    idle_source: str = "auto"
    outbox_path: Path = Path()
    #: ``None``: do not write a state file.
    state_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    #: The client id template with ``{user}`` and ``{device}`` filled in; ``{session}`` is
    #: filled per connection by :meth:`client_id_for` ("" means the default template).
    client_id: str = ""
    keepalive_s: int = 60
    reconnect_min_ms: int = 1_000
    reconnect_max_ms: int = 60_000
    max_reconnect_attempts: int = 0
    timeout_ms: int = 5_000
    #: The TOML file the settings came from, if any (shown by ``presence-agent config``).
    config_file: Path | None = None

    @classmethod
    def from_values(cls, **values: Any) -> AgentConfig:
        """Settings from keyword values only (no environment, no file): for library use.

        Keys are the TOML names (``heartbeat_interval="200ms"``, ``outbox=path``); anything
        not given gets its default, exactly as :func:`load_config` would.
        """
        layer = _Layer("arguments", {}, None)
        for name, value in values.items():
            if name not in KEYS_BY_NAME:
                raise ConfigError(f"unknown setting {name!r}; known: {', '.join(KEYS_BY_NAME)}")
            if value is not None:
                layer.values[name] = value
        return _build([layer], config_file=None, env=os.environ)

    def with_changes(self, **changes: Any) -> AgentConfig:
        return replace(self, **changes)

    def client_id_for(self, session: str) -> str:
        """The MQTT client id of the connection whose session id is ``session``."""
        template = self.client_id or expand_client_id(DEFAULT_CLIENT_ID, self.user, self.device)
        return template.replace("{session}", session)

    def account_mismatch(self) -> str | None:
        """Why the broker will refuse this device's presence, when its login is another
        device's account, else None.

        Device accounts are named ``USER/DEVICE`` and may publish only below their own
        device's topics (the last will included, checked at CONNECT), so a login of
        ``alice/phone`` with ``--device laptop`` is refused with a bare "Not authorized". The
        account name says which identity it allows: this says it in words.
        """
        username = self.broker.username
        if not username or username.count("/") != 1:
            return None
        user, device = username.split("/")
        try:
            validate_id(user, "user id")
            validate_id(device, "device id")
        except InvalidId:
            return None  # not one of our device accounts
        if (user, device) == (self.user, self.device):
            return None
        return (f"the account {username} may act only as user {user!r} device {device!r}"
                f" (--user {user} --device {device}), not as {self.user}/{self.device}")

    @property
    def fixed_client_id(self) -> bool:
        """True when every connection uses the same client id (the template has no
        ``{session}``): the user asked for it, for example because the broker's ACL names
        client ids; each reconnect is then a takeover of the previous connection."""
        return bool(self.client_id) and "{session}" not in self.client_id

    def describe(self) -> dict[str, str]:
        """Effective settings for people (``presence-agent config``); the password is hidden."""
        return {
            "config_file": str(self.config_file) if self.config_file else "(none)",
            "broker": str(self.broker),
            "user": self.user,
            "device": self.device,
            "name": self.name,
            "prefix": self.prefix,
            "heartbeat_interval_ms": str(self.heartbeat_interval_ms),
            "idle_source": self.idle_source,
            "outbox": str(self.outbox_path),
            "state_file": str(self.state_file) if self.state_file else "(disabled)",
            "ca_file": str(self.ca_file or "(system)"),
            "cert_file": str(self.cert_file or "(none)"),
            "key_file": str(self.key_file or "(none)"),
            "tls_insecure": str(self.tls_insecure).lower(),
            "client_id": self.client_id,
            "keepalive_s": str(self.keepalive_s),
            "reconnect_min_ms": str(self.reconnect_min_ms),
            "reconnect_max_ms": str(self.reconnect_max_ms),
            "max_reconnect_attempts": str(self.max_reconnect_attempts),
            "timeout_ms": str(self.timeout_ms),
        }


# --------------------------------------------------------------------------------------------
# Defaults that depend on the machine


def sanitize_id(text: str, fallback: str = "device") -> str:
    """Turn a host or login name into a valid id: other characters become ``-``, max 64."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:64].strip("-.")
    return cleaned or fallback


def default_device_id() -> str:
    """The short host name (``laptop`` of ``laptop.lan``), sanitized to the id alphabet."""
    host = socket.gethostname()
    return sanitize_id(host.split(".", 1)[0] or host)


def default_user_id() -> str:
    try:
        login = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        login = ""
    return sanitize_id(login, fallback="user")


def default_config_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / APP_DIR / "agent.toml"


def default_state_dir(env: Mapping[str, str], user: str, device: str) -> Path:
    """Per user and device, so two agents on one machine never share an outbox."""
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / APP_DIR / user / device


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(slots=True)
class _Layer:
    """Raw values of one source, with the source's name for error messages."""

    source: str
    values: dict[str, Any]
    base_dir: Path | None  # relative paths in a file are relative to the file


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    use_file: bool = True,
) -> AgentConfig:
    """Merge flags > ``PRESENCE_*`` environment > TOML file > defaults into an AgentConfig.

    ``flags`` maps key names (and ``config``) to values; ``None`` values mean "not given",
    so an argparse namespace can be passed as ``vars(ns)`` directly.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env

    config_file: Path | None = None
    layers: list[_Layer] = []
    if use_file:
        explicit = flags.pop("config", None) or env.get(ENV_PREFIX + "CONFIG") or None
        path = Path(explicit).expanduser() if explicit else default_config_path(env)
        if explicit or path.exists():
            layers.append(_read_file(path))
            config_file = path
    else:
        flags.pop("config", None)

    env_values = {
        key.name: env[key.env] for key in KEYS if env.get(key.env, "") != ""
    }
    layers.append(_Layer("environment", env_values, None))
    unknown = set(flags) - set(KEYS_BY_NAME)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    layers.append(_Layer("command line", dict(flags), None))
    return _build(layers, config_file=config_file, env=env)


def _read_file(path: Path) -> _Layer:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(KEYS_BY_NAME))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {path};"
            f" known keys: {', '.join(KEYS_BY_NAME)}"
        )
    return _Layer(f"config file {path}", data, path.parent)


def _build(
    layers: list[_Layer], *, config_file: Path | None, env: Mapping[str, str]
) -> AgentConfig:
    """Take each key from the last layer that has it, convert and validate it."""
    chosen: dict[str, tuple[Any, _Layer]] = {}
    for layer in layers:
        for name, value in layer.values.items():
            chosen[name] = (value, layer)

    def get(name: str) -> tuple[Any, str, Path | None] | None:
        if name not in chosen:
            return None
        value, layer = chosen[name]
        return value, layer.source, layer.base_dir

    conv = _Converter(get)
    user = conv.ident("user") or default_user_id()
    device = conv.ident("device") or default_device_id()
    broker = conv.url("broker") or BrokerURL.parse(_DEFAULT_BROKER)
    username = conv.text("broker_username")
    password = conv.text("broker_password")
    broker = broker.with_login(username, password)
    prefix = conv.text("prefix") or DEFAULT_PREFIX
    try:
        validate_prefix(prefix)
    except InvalidId as exc:
        raise ConfigError(f"{exc} ({conv.where('prefix')})") from None

    heartbeat = conv.duration("heartbeat_interval", 30_000)
    if heartbeat < 10:
        raise ConfigError(f"heartbeat_interval must be at least 10ms ({conv.where('heartbeat_interval')})")
    if heartbeat > MAX_ANNOUNCED_MS:  # the birth announces it; the hub accepts up to a week
        raise ConfigError(
            f"heartbeat_interval must be at most {format_duration_ms(MAX_ANNOUNCED_MS)}"
            f" ({conv.where('heartbeat_interval')})"
        )
    keepalive_ms = conv.duration("keepalive", 60_000)
    if keepalive_ms < 1_000:
        raise ConfigError(f"keepalive must be at least 1s ({conv.where('keepalive')})")
    reconnect_min = max(1, conv.duration("reconnect_min", 1_000))
    reconnect_max = max(reconnect_min, conv.duration("reconnect_max", 60_000))
    attempts = conv.integer("max_reconnect_attempts", 0)
    if attempts < 0:
        raise ConfigError(f"max_reconnect_attempts must be >= 0 ({conv.where('max_reconnect_attempts')})")
    timeout = conv.duration("timeout", 5_000)
    if timeout <= 0:
        raise ConfigError(f"timeout must be more than 0 ({conv.where('timeout')})")

    idle_source = conv.text("idle_source") or "auto"
    _check_idle_spec(idle_source, conv.where("idle_source"))

    state_dir = default_state_dir(env, user, device)
    outbox = conv.path("outbox") or state_dir / "outbox.sqlite3"
    state_raw = get("state_file")
    state_file: Path | None
    if state_raw is not None and str(state_raw[0]).strip() == "":
        state_file = None
    else:
        state_file = conv.path("state_file") or state_dir / "state.json"

    ca_file, cert_file, key_file = conv.path("ca_file"), conv.path("cert_file"), conv.path("key_file")
    tls_insecure = conv.boolean("tls_insecure", False)
    if not broker.tls and (ca_file or cert_file or key_file or tls_insecure):
        raise ConfigError(
            f"TLS options (ca_file, cert_file, key_file, tls_insecure) need an mqtts:// broker"
            f" URL, but the broker is {broker}"
        )
    if key_file and not cert_file:
        raise ConfigError("key_file is set but cert_file is not: give both for a client certificate")

    try:
        client_id = expand_client_id(conv.text("client_id") or DEFAULT_CLIENT_ID, user, device)
    except ValueError as exc:
        raise ConfigError(f"{exc} ({conv.where('client_id')})") from None
    host_name = socket.gethostname()
    name = conv.text("name") or host_name or device
    if len(name) > 128:
        raise ConfigError(f"device name is longer than 128 characters ({conv.where('name')})")

    return AgentConfig(
        user=user,
        device=device,
        broker=broker,
        name=name,
        prefix=prefix,
        heartbeat_interval_ms=heartbeat,
        idle_source=idle_source,
        outbox_path=outbox,
        state_file=state_file,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        tls_insecure=tls_insecure,
        client_id=client_id,
        keepalive_s=max(1, round(keepalive_ms / 1000)),
        reconnect_min_ms=reconnect_min,
        reconnect_max_ms=reconnect_max,
        max_reconnect_attempts=attempts,
        timeout_ms=timeout,
        config_file=config_file,
    )


def _check_idle_spec(spec: str, where: str) -> None:
    head, sep, rest = spec.partition(":")
    if spec in ("auto", "none"):
        return
    if sep and head in ("command", "file") and rest.strip():
        return
    raise ConfigError(
        f"invalid idle_source {spec!r} ({where}): use auto, none, command:CMD or file:PATH"
    )


class _Converter:
    """Typed access to the merged raw values; errors name the value's source."""

    def __init__(self, get: Any) -> None:
        self._get = get

    def where(self, name: str) -> str:
        found = self._get(name)
        if found is None:
            return "default"
        key = KEYS_BY_NAME[name]
        source: str = found[1]
        if source == "environment":
            return f"from {key.env}"
        if source == "command line":
            return f"from {key.flag}" if key.has_flag else "from the command line"
        if source == "arguments":
            return f"from {name}="
        return f"from {name} in {source}"

    def _raw(self, name: str) -> Any:
        found = self._get(name)
        return None if found is None else found[0]

    def text(self, name: str) -> str | None:
        value = self._raw(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be text, not {type(value).__name__} ({self.where(name)})")
        return value

    def ident(self, name: str) -> str | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            return validate_id(value, f"{name} id")
        except InvalidId as exc:
            raise ConfigError(f"{exc} ({self.where(name)})") from None

    def url(self, name: str) -> BrokerURL | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            return BrokerURL.parse(value)
        except InvalidURL as exc:
            raise ConfigError(f"{exc} ({self.where(name)})") from None

    def duration(self, name: str, default: int) -> int:
        value = self._raw(name)
        if value is None:
            return default
        try:
            return parse_duration_ms(value)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc} ({self.where(name)})") from None

    def integer(self, name: str, default: int) -> int:
        value = self._raw(name)
        if value is None:
            return default
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a whole number ({self.where(name)})")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(
                f"{name} must be a whole number, not {value!r} ({self.where(name)})"
            ) from None

    def boolean(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, not {value!r} ({self.where(name)})")

    def path(self, name: str) -> Path | None:
        found = self._get(name)
        if found is None:
            return None
        value, _source, base_dir = found
        if not isinstance(value, str | os.PathLike):
            raise ConfigError(f"{name} must be a path ({self.where(name)})")
        path = Path(value).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return path
