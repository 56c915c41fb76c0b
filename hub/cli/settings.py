"""Settings of ``presence-hub``: one table, three sources.

Settings come from, in order of precedence: command-line flags, ``PRESENCE_*`` environment
variables, a TOML file (``--config``), then defaults. Every setting has the same name in all
three: ``--away-after`` / ``PRESENCE_AWAY_AFTER`` / ``away_after = "5m"``.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hub.protocol import MAX_CUSTOM_STATUS, MAX_PAYLOAD_BYTES, InvalidId, parse_duration_ms, validate_prefix

ENV_PREFIX = "PRESENCE_"


class UsageError(Exception):
    """A setting the user got wrong: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    convert: Callable[[Any], Any] = str
    choices: tuple[str, ...] | None = None
    #: a flag without a value (``--allow-anonymous``); environment and file take true/false
    switch: bool = False


def _duration(value: Any) -> int:
    return parse_duration_ms(value)


def _duration_or_zero(value: Any) -> int:
    if str(value).strip() in ("0", "off"):
        return 0
    return _duration(value)


def _log_level(value: Any) -> str:
    level = str(value).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"invalid log level {value!r}: use debug, info, warning or error")
    return level


def _prefix(value: Any) -> str:
    return validate_prefix(str(value))


def _switch(value: Any) -> bool | None:
    """True, or None for "not asked" (the broker then decides from whether accounts exist)."""
    if isinstance(value, bool):
        return True if value else None
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return None
    raise ValueError(f"invalid value {value!r}: use true or false")


def _count(value: Any) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
        raise ValueError(f"invalid value {value!r}: use a whole number of at least 1")
    return int(value)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
               "mib": 1024**2}


def _size(value: Any) -> int:
    """Bytes: ``65536``, ``64KiB``, ``1MiB`` (k and M are binary, as for every MQTT broker)."""
    text = str(value).strip().lower()
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyz").strip()
    unit = text[len(digits):].strip() if digits else None
    if not digits.isdigit() or unit not in _SIZE_UNITS or int(digits) == 0:
        raise ValueError(f"invalid size {value!r}: use e.g. 65536, 64KiB or 1MiB")
    return int(digits) * _SIZE_UNITS[unit]


def _rate(value: Any) -> float | None:
    """Messages per second; ``0`` or ``off`` turns the limit off."""
    text = str(value).strip().lower()
    if text in ("off", "none", "0", "0.0"):
        return None
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"invalid rate {value!r}: use messages per second, e.g. 20, "
                         "or off") from None
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"invalid rate {value!r}: use a positive number, or off")
    return rate


def _path_or_none(value: Any) -> str | None:
    text = str(value).strip()
    return text or None


SETTINGS: tuple[Setting, ...] = (
    Setting("broker", "auto",
            "embedded (amqtt in this process), auto (use a broker already on --listen, else "
            "start the embedded one), or an external broker: HOST:PORT or a URL, "
            "mqtt://user:pass@host:1883, mqtts://host:8883"),
    Setting("listen", "127.0.0.1:1883", "HOST:PORT of the embedded broker (and where auto looks)"),
    Setting("storage", "tinydb", "where state survives restarts",
            choices=("memory", "tinydb", "redis")),
    Setting("db", "presence-data/presence.json", "TinyDB file (with --storage tinydb)"),
    Setting("redis_url", "redis://127.0.0.1:6379/0", "Redis URL (with --storage redis)"),
    Setting("heartbeat_interval", "30s", "devices' heartbeat interval; timeout is 2.5x this",
            _duration),
    Setting("away_after", "5m", "idle time after which a device is away", _duration),
    Setting("will_grace", "1s", "how long a device's last will waits for the device to reconnect "
            "(a Wi-Fi/LTE handover) before it takes the device offline; 0: at once",
            _duration_or_zero),
    Setting("max_heartbeat_interval", "30m", "longest heartbeat interval a device may announce "
            "in its birth (its timeout is 2.5x its own interval, up to 2.5x this)", _duration),
    Setting("offline_after", "1h", "idle time after which a device is offline", _duration),
    Setting("prefix", "presence", "topic prefix", _prefix),
    Setting("flush_interval", "1s", "how often changed state is written to the store (QoS 1 "
            "messages from an external broker are acked after the write)", _duration),
    Setting("log_level", "info", "debug, info, warning or error", _log_level),
    # security (embedded broker)
    Setting("credentials", "", "accounts file (default: credentials.json beside --db; manage "
            "it with 'presence-hub users'); once it holds an account, clients must log in and "
            "each device may touch only its own topics", _path_or_none),
    Setting("allow_anonymous", False, "let clients in without a login: with no accounts, also "
            "when listening beyond localhost; with accounts, read-only", _switch, switch=True),
    Setting("tls_listen", "", "HOST:PORT of a TLS listener (mqtts://); default HOST:8883 when "
            "--tls-cert and --tls-key are given", _path_or_none),
    Setting("tls_cert", "", "PEM certificate (chain) of the TLS listener", _path_or_none),
    Setting("tls_key", "", "PEM private key of the TLS listener", _path_or_none),
    Setting("ca_file", "", "CA certificate(s) to verify an mqtts:// --broker (default: the "
            "system's)", _path_or_none),
    # limits
    Setting("max_payload_bytes", f"{MAX_PAYLOAD_BYTES // 1024}KiB",
            "largest payload the hub accepts; a packet 64KiB beyond it closes the sender's "
            "connection", _size),
    Setting("device_rate", "20", "messages per second one device may send, sustained "
            "(off: no limit); excess is dropped", _rate),
    Setting("device_burst", "100", "messages one device may send in a burst", _count),
    Setting("max_devices_per_user", "64", "devices one user may have", _count),
    Setting("activity_limit", "1000", "activity entries kept per user", _count),
    Setting("activity_max_age", "7d", "how long activity entries are kept", _duration),
    Setting("max_custom_status", str(MAX_CUSTOM_STATUS), "longest custom status (characters)",
            _count),
    # several hubs (failover)
    Setting("standby", False, "share the Redis store (--storage redis) and an external broker "
            "with other hubs started with --standby: one is active (it holds a lease in Redis), "
            "the others take over when its lease lapses (see 'presence-hub status')",
            _switch, switch=True),
    Setting("lease_ttl", "5s", "how long the active hub's lease in Redis lasts unless renewed: "
            "a standby takes over about this long after the active hub dies", _duration),
    Setting("hub_name", "", "this hub's name in the lease and logs (default: the host name)",
            _path_or_none),
    # Home Assistant
    Setting("homeassistant", False, "describe every user to Home Assistant through its MQTT "
            "discovery: a device per user with status, custom status, primary device and last "
            "seen sensors (README, 'Home Assistant')", _switch, switch=True),
    Setting("homeassistant_prefix", "homeassistant", "Home Assistant's discovery prefix (the "
            "setting of its MQTT integration), with --homeassistant", _prefix),
    Setting("stats_interval", "60s", "how often to log counts of dropped and refused input "
            "(when there are new ones); 0: only at stop", _duration),
    # the HTTP side
    Setting("http", "", "HOST:PORT of the live dashboard, /api/users, /healthz and /metrics "
            "(e.g. 127.0.0.1:8080; off when empty); beyond loopback only with --http-token",
            _path_or_none),
    Setting("http_token", "", "token the HTTP side asks for (Authorization: Bearer TOKEN, or "
            "basic auth with the token as password; /healthz stays open); better given as "
            "PRESENCE_HTTP_TOKEN than on the command line, where ps shows it", _path_or_none),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="presence-hub",
        description="Presence hub over MQTT: derives each user's status (online/away/dnd/offline) "
        "from device agents' births, wills, heartbeats and activity, and publishes it as "
        "retained topics under PREFIX/users/.",
        epilog="Every option can also be set as an environment variable (PRESENCE_AWAY_AFTER=5m) "
        "or in the --config TOML file (away_after = \"5m\"); flags win over the environment, "
        "which wins over the file. Durations: 500ms, 30s, 5m, 1h, or plain seconds. "
        "Watch presence with: mosquitto_sub -t 'presence/#' -v. "
        "Accounts: presence-hub users --help. Which of several hubs is active: presence-hub "
        "status --help",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings")
    for s in SETTINGS:
        default = f" (default: {s.default})" if s.default not in ("", False) else ""
        if s.switch:
            parser.add_argument(_flag(s.name), dest=s.name, default=None, action="store_const",
                                const="true", help=s.help)
            continue
        parser.add_argument(
            _flag(s.name), dest=s.name, default=None, choices=s.choices,
            help=f"{s.help}{default}",
        )
    return parser


def resolve(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """Merge flags, environment, config file and defaults into converted settings."""
    config_path = args.config or env.get(ENV_PREFIX + "CONFIG")
    file_values: dict[str, Any] = {}
    if config_path:
        try:
            with open(config_path, "rb") as fh:
                file_values = tomllib.load(fh)
        except FileNotFoundError:
            raise UsageError(f"config file {config_path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"cannot read config file {config_path}: {exc}") from None
        known = {s.name for s in SETTINGS}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise UsageError(f"{config_path}: unknown setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
    out: dict[str, Any] = {}
    for s in SETTINGS:
        raw: Any
        where: str
        if getattr(args, s.name) is not None:
            raw, where = getattr(args, s.name), _flag(s.name)
        elif ENV_PREFIX + s.name.upper() in env:
            raw, where = env[ENV_PREFIX + s.name.upper()], ENV_PREFIX + s.name.upper()
        elif s.name in file_values:
            raw, where = file_values[s.name], f"{s.name} in {config_path}"
        else:
            raw, where = s.default, "default"
        if s.choices and raw not in s.choices:
            raise UsageError(f"{where}: invalid value {raw!r}: use one of {', '.join(s.choices)}")
        try:
            out[s.name] = s.convert(raw)
        except (ValueError, InvalidId) as exc:
            raise UsageError(f"{where}: {exc}") from None
    if out["offline_after"] < out["away_after"]:
        raise UsageError("offline_after must not be shorter than away_after")
    if bool(out["tls_cert"]) != bool(out["tls_key"]) or (out["tls_listen"] and not out["tls_cert"]):
        raise UsageError("a TLS listener needs both --tls-cert and --tls-key")
    if out["standby"] and out["storage"] != "redis":
        raise UsageError("--standby needs the shared store: --storage redis (and an external "
                         "--broker that every hub reaches)")
    if out["standby"] and out["broker"] == "embedded":
        raise UsageError("--standby needs an external --broker that every hub reaches, not the "
                         "embedded one")
    if out["http"] is not None:
        from hub.web import HttpAddressError, http_access_error, parse_http_address

        try:
            refused = http_access_error(parse_http_address(out["http"]), out["http_token"])
        except HttpAddressError as exc:
            raise UsageError(str(exc)) from None
        if refused is not None:
            raise UsageError(refused)
    # a switch on the command line; the MQTT side takes the discovery prefix, None for off
    out["homeassistant"] = out["homeassistant_prefix"] if out["homeassistant"] else None
    if out["credentials"] is None:
        from hub.auth import default_credentials_path

        out["credentials"] = str(default_credentials_path(out["db"]))
    return out


