"""``presence-hub``: run the presence hub on an edge box.

Settings come from, in order of precedence: command-line flags, ``PRESENCE_*`` environment
variables, a TOML file (``--config``), then defaults. Every setting has the same name in all
three: ``--away-after`` / ``PRESENCE_AWAY_AFTER`` / ``away_after = "5m"``.

With no flags it uses an MQTT broker already listening on 127.0.0.1:1883, or starts the
embedded one there, and keeps state in a TinyDB file; on SIGINT/SIGTERM it stops cleanly
(``offline`` on ``P/hub/status``, state flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.durations import format_duration_ms, parse_duration_ms
from hub.protocol import MAX_CUSTOM_STATUS, MAX_PAYLOAD_BYTES, InvalidId, validate_prefix

log = logging.getLogger("presence-hub")

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
            "start the embedded one), or a URL: mqtt://user:pass@host:1883, mqtts://host:8883"),
    Setting("listen", "127.0.0.1:1883", "HOST:PORT of the embedded broker (and where auto looks)"),
    Setting("storage", "tinydb", "where state survives restarts",
            choices=("memory", "tinydb", "redis")),
    Setting("db", "presence-data/presence.json", "TinyDB file (with --storage tinydb)"),
    Setting("redis_url", "redis://127.0.0.1:6379/0", "Redis URL (with --storage redis)"),
    Setting("heartbeat_interval", "30s", "devices' heartbeat interval; timeout is 2.5x this",
            _duration),
    Setting("away_after", "5m", "idle time after which a device is away", _duration),
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
    Setting("stats_interval", "60s", "how often to log counts of dropped and refused input "
            "(when there are new ones); 0: only at stop", _duration),
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
        "Accounts: presence-hub users --help",
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
    if out["credentials"] is None:
        from hub.auth import default_credentials_path

        out["credentials"] = str(default_credentials_path(out["db"]))
    return out


def _banner(settings: dict[str, Any], broker_desc: str, broker: str,
            access: str | None = None, tls_url: str | None = None) -> str:
    host, _, port = settings["listen"].rpartition(":")
    if broker != "embedded":
        from hub.urls import BrokerURL

        parsed = BrokerURL.parse(broker)
        host, port = parsed.host, str(parsed.port)
    if host.strip("[]") in ("0.0.0.0", "::", ""):  # listening everywhere: name this machine
        import socket

        host = socket.gethostname()
    prefix = settings["prefix"]
    lines = [
        f"presence hub running: {broker_desc}; storage {settings['storage']}"
        f"{' ' + settings['db'] if settings['storage'] == 'tinydb' else ''}; heartbeat "
        f"{format_duration_ms(settings['heartbeat_interval'])}, away after "
        f"{format_duration_ms(settings['away_after'])}, offline after "
        f"{format_duration_ms(settings['offline_after'])}",
    ]
    if access is not None:
        lines.append(f"  access:       {access}")
    if tls_url is not None:
        lines.append(f"  TLS:          {tls_url}")
    url = f"mqtt://{host}:{port}"
    if access is not None and access.startswith("authentication on"):
        login = "PRESENCE_BROKER_USERNAME=alice/laptop PRESENCE_BROKER_PASSWORD=..."
        lines += [
            f"  watch:        mosquitto_sub -h {host} -p {port} -u WATCHER -P PASSWORD "
            f"-t '{prefix}/users/#' -v   (presence-hub users add-watcher WATCHER)",
            "  join device:  presence-hub users add alice laptop   (prints the password), then",
            f"                {login} presence-agent --broker {url} --user alice --device laptop",
            f"  ask the hub:  {login} presence --broker {url} --user alice who",
        ]
    else:
        lines += [
            f"  watch:        mosquitto_sub -h {host} -p {port} -t '{prefix}/#' -v",
            f"  join device:  presence-agent --broker {url} --user alice --device laptop",
            f"  ask the hub:  presence --broker {url} --user alice who",
        ]
    lines.append("  stop:         Ctrl-C")
    return "\n".join(lines)


def _counter_line(parts: dict[str, dict[str, int]]) -> str:
    return " | ".join(
        f"{group}: " + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        for group, counts in parts.items() if counts
    )


class CounterReport:
    """Logs what was dropped or refused, by reason: every ``interval`` if there is something
    new, and once more in total at stop. Each drop is also logged where it happens, but those
    lines are limited to one per reason per second; this line has the full counts."""

    def __init__(self, presence: Any, hub: Any) -> None:
        self.presence = presence
        self.hub = hub
        self._last: dict[str, dict[str, int]] = {}

    def totals(self) -> dict[str, dict[str, int]]:
        out = {
            "dropped": dict(self.presence.rejected),
            "engine": dict(self.presence.engine.counters),
        }
        broker = getattr(getattr(self.hub, "transport", None), "broker", None)
        refused = getattr(broker, "refused", None)
        if refused is not None:
            out["broker refused"] = dict(refused)
        return out

    def since_last(self) -> dict[str, dict[str, int]]:
        now = self.totals()
        delta = {
            group: {k: v - self._last.get(group, {}).get(k, 0) for k, v in counts.items()
                    if v - self._last.get(group, {}).get(k, 0)}
            for group, counts in now.items()
        }
        self._last = now
        return delta

    async def run(self, interval_ms: int) -> None:
        while True:
            await asyncio.sleep(interval_ms / 1000)
            line = _counter_line(self.since_last())
            if line:
                log.info("in the last %s: %s", format_duration_ms(interval_ms), line)

    def final(self) -> None:
        line = _counter_line(self.totals())
        if line:
            log.info("since start: %s", line)


async def run_hub(settings: dict[str, Any], ready: Callable[[str], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then stop cleanly."""
    from hub.mqtt import attach_mqtt, broker_answers, parse_listen
    from hub.service import create_presence_service

    broker = settings["broker"]
    host, port = parse_listen(settings["listen"])
    if broker == "auto":
        if broker_answers(host, port):
            broker = f"mqtt://{host}:{port}"
            desc = f"using the broker already listening on {host}:{port}"
        else:
            broker = "embedded"
            desc = f"embedded broker on {host}:{port}"
    elif broker == "embedded":
        desc = f"embedded broker on {host}:{port}"
    else:
        from hub.urls import redact_url as redact

        desc = f"external broker {redact(broker)}"
    log.info("broker: %s", desc)
    if broker != "embedded" and (settings["tls_cert"] or settings["allow_anonymous"]):
        log.warning("--tls-* and --allow-anonymous apply to the embedded broker only; the "
                    "external broker has its own (see 'presence-hub users export-mosquitto')")
    store = None
    if broker == "embedded":
        # Refuse an open broker on a public address before anything is opened or started.
        from hub.auth import AccessPolicy, CredentialStore, listen_policy_error
        from hub.broker import BrokerError

        store = CredentialStore(settings["credentials"])
        policy = AccessPolicy(settings["prefix"], store, settings["allow_anonymous"])
        hosts = [host]
        if settings["tls_listen"]:
            hosts.append(parse_listen(settings["tls_listen"])[0])
        refusal = listen_policy_error(hosts, policy)
        if refusal is not None:
            raise BrokerError(refusal)
    presence = create_presence_service(
        heartbeat_interval_ms=settings["heartbeat_interval"],
        away_after_ms=settings["away_after"],
        offline_after_ms=settings["offline_after"],
        storage=settings["storage"],
        db_path=settings["db"],
        redis_url=settings["redis_url"],
        prefix=settings["prefix"],
        flush_interval_ms=settings["flush_interval"],
        max_payload_bytes=settings["max_payload_bytes"],
        device_rate=settings["device_rate"],
        device_burst=settings["device_burst"],
        max_devices_per_user=settings["max_devices_per_user"],
        activity_limit=settings["activity_limit"],
        activity_max_age_ms=settings["activity_max_age"],
        max_custom_status=settings["max_custom_status"],
    )
    if broker == "embedded":
        hub = attach_mqtt(
            presence, "embedded", listen=settings["listen"],
            credentials=store, allow_anonymous=settings["allow_anonymous"],
            tls_listen=settings["tls_listen"], tls_cert=settings["tls_cert"],
            tls_key=settings["tls_key"],
        )
    else:
        hub = attach_mqtt(presence, broker, listen=settings["listen"],
                          ca_file=settings["ca_file"])
    report = CounterReport(presence, hub)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with presence:
        _tune_gc()
        embedded = getattr(hub.transport, "broker", None)
        access = embedded.policy.describe() if embedded is not None else None
        tls_url = embedded.tls_url if embedded is not None else None
        banner = _banner(settings, desc, broker, access, tls_url)
        print(banner, flush=True)
        if ready is not None:
            ready(banner)
        reporter = (asyncio.create_task(report.run(settings["stats_interval"]))
                    if settings["stats_interval"] > 0 else None)
        try:
            await stop.wait()
        finally:
            if reporter is not None:
                reporter.cancel()
        log.info("stopping: publishing hub offline and flushing state")
    report.final()
    log.info("stopped cleanly")


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the presence state.

    The hub holds a few objects per device for as long as it runs; with the default
    thresholds every full collection walks all of them (millions at 100k devices), which
    profiled as ~9% of a timeout storm. ``gc.freeze()`` moves what start-up loaded (the
    store's state, imports) out of the collector's sight, and a larger first threshold makes
    young collections rarer under a steady stream of short-lived messages. The price: a
    device or user loaded at start and removed later stays in memory until the next restart
    (its objects reference each other, and frozen cycles are not collected).
    """
    gc.freeze()  # no collect first: it took 7 s at 1M devices, for garbage start-up hardly has
    gc.set_threshold(50_000, 20, 100)


# ------------------------------------------------------------------------------------------
# presence-hub users


def build_users_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("where (also PRESENCE_* environment and --config file)")
    where.add_argument("--config", metavar="FILE", help="TOML file with settings")
    where.add_argument("--db", default=None, help="the hub's TinyDB file; the accounts file "
                       "is credentials.json in its folder (default: presence-data/presence.json)")
    where.add_argument("--credentials", default=None, metavar="FILE",
                       help="the accounts file itself, if elsewhere")
    where.add_argument("--prefix", default=None, help="topic prefix (for export-mosquitto)")

    password = argparse.ArgumentParser(add_help=False)
    pw = password.add_mutually_exclusive_group()
    pw.add_argument("--password", help="the password (visible to other local users in the "
                    "process list: prefer piping it on stdin)")
    pw.add_argument("--generate", action="store_true",
                    help="generate a random password and print it (the default on a terminal)")

    parser = argparse.ArgumentParser(
        prog="presence-hub users",
        description="Accounts of the embedded broker (and, exported, of Mosquitto). As soon as "
        "one account exists, every client must log in: devices as USER/DEVICE, each allowed "
        "to publish only below PREFIX/devices/USER/DEVICE/ and to read its own user's topics.",
        epilog="The password comes from --password, else from stdin when it is not a terminal "
        "(one line), else it is generated and printed once. The running hub picks up changes "
        "at the next connection; a removed account keeps a connection it already has until "
        "it reconnects (restart the hub to cut it off at once).",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser("add", parents=[common, password],
                         help="add a device account USER/DEVICE, or give it a new password")
    add.add_argument("user")
    add.add_argument("device")
    hub_parser = sub.add_parser(
        "add-hub", parents=[common, password],
        help="add the hub's own account, for an external broker (reads and writes PREFIX/#)")
    hub_parser.add_argument("name", nargs="?", default=None,
                            help="account name (default: presence-hub)")
    watcher = sub.add_parser(
        "add-watcher", parents=[common, password],
        help="add a read-only account (Home Assistant, dashboards): PREFIX/users/#, "
        "PREFIX/events/#, PREFIX/hub/status")
    watcher.add_argument("name")
    remove = sub.add_parser("remove", parents=[common],
                            help="remove a device account (USER DEVICE) or another one (NAME)")
    remove.add_argument("names", nargs="+", metavar="USER DEVICE | NAME")
    sub.add_parser("list", parents=[common], help="list accounts (never passwords or hashes)")
    export = sub.add_parser(
        "export-mosquitto", parents=[common],
        help="write Mosquitto's password_file and acl_file with the same accounts and rules")
    export.add_argument("--password-file", required=True, metavar="FILE")
    export.add_argument("--acl-file", required=True, metavar="FILE")
    export.add_argument("--allow-anonymous", action="store_const", const="true", default=None,
                        help="let anonymous clients read presence (use with Mosquitto's "
                        "allow_anonymous true)")
    return parser


def _users_settings(ns: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """The usual settings resolution (flags > environment > file), for the few that matter."""
    args = argparse.Namespace(**{s.name: None for s in SETTINGS})
    args.config = ns.config
    for name in ("db", "credentials", "prefix", "allow_anonymous"):
        if getattr(ns, name, None) is not None:
            setattr(args, name, getattr(ns, name))
    return resolve(args, env)


def _read_password(ns: argparse.Namespace, stdin: Any) -> tuple[str, bool]:
    """(password, generated)."""
    from hub.auth import generate_password

    if ns.password is not None:
        if not ns.password:
            raise UsageError("empty password")
        return ns.password, False
    if ns.generate or stdin is None or stdin.isatty():
        return generate_password(), True
    line = stdin.readline()
    password = line.rstrip("\r\n")
    if not password:
        raise UsageError("no password on stdin (pipe one line, or use --generate)")
    return password, False


def users_main(argv: Sequence[str], *, stdin: Any = None, env: Mapping[str, str] | None = None,
               out: Any = None) -> int:
    """``presence-hub users ACTION``; returns the exit status."""
    from urllib.parse import quote

    from hub.auth import (
        DEFAULT_HUB_ACCOUNT,
        CredentialsError,
        CredentialStore,
        device_username,
        mosquitto_acl_file,
        mosquitto_password_file,
        write_private_file,
    )

    stdin = sys.stdin if stdin is None else stdin
    out = sys.stdout if out is None else out
    ns = build_users_parser().parse_args(argv)

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    try:
        settings = _users_settings(ns, os.environ if env is None else env)
        store = CredentialStore(settings["credentials"])
        path = store.path
        if ns.action in ("add", "add-hub", "add-watcher"):
            if ns.action == "add":
                username, role = device_username(ns.user, ns.device), "device"
            else:
                from hub.protocol import validate_id

                name = ns.name or DEFAULT_HUB_ACCOUNT
                username = validate_id(name, "account name")
                role = "hub" if ns.action == "add-hub" else "watcher"
            password, generated = _read_password(ns, stdin)
            new = store.put(username, role, password)  # type: ignore[arg-type]
            say(f"{'added' if new else 'new password for'} {role} account {username} in {path}")
            shown = password if generated else "PASSWORD"
            if generated:
                say(f"  password: {password}    (shown only now)")
            if role == "device":
                say("  on the device (agent.toml, or PRESENCE_BROKER_USERNAME/_PASSWORD):")
                say(f'    broker_username = "{username}"')
                say(f'    broker_password = "{shown}"')
                say(f"  or in a URL: mqtt://{quote(username, safe='')}:{quote(shown, safe='')}"
                    "@HUB:1883")
            elif role == "hub":
                say(f"  hub on Mosquitto: presence-hub --broker 'mqtt://{quote(username, safe='')}"
                    f":{quote(shown, safe='')}@HOST:1883' (then export-mosquitto)")
            return 0
        if ns.action == "remove":
            if len(ns.names) > 2:
                raise UsageError("remove takes USER DEVICE, or one account NAME")
            username = device_username(*ns.names) if len(ns.names) == 2 else ns.names[0]
            gone = store.remove(username)
            say(f"removed {gone.role} account {username} from {path}")
            return 0
        if ns.action == "list":
            accounts = store.accounts
            if not accounts:
                say(f"no accounts in {path}: the embedded broker lets anyone in "
                    "(and listens on localhost only)")
                return 0
            width = max(len(name) for name in accounts)
            for name in sorted(accounts):
                account = accounts[name]
                created = time.strftime("%Y-%m-%d %H:%M", time.localtime(account.created / 1000))
                say(f"{name:<{width}}  {account.role:<7}  added {created}")
            return 0
        # export-mosquitto
        accounts = store.accounts
        write_private_file(Path(ns.password_file), mosquitto_password_file(accounts))
        write_private_file(
            Path(ns.acl_file),
            mosquitto_acl_file(accounts, settings["prefix"],
                               anonymous_read=bool(settings["allow_anonymous"])),
            mode=0o644,
        )
        say(f"wrote {len(accounts)} accounts to {ns.password_file} (mode 600) and their rules "
            f"to {ns.acl_file}; in mosquitto.conf:")
        say("  allow_anonymous " + ("true" if settings["allow_anonymous"] else "false"))
        say(f"  password_file {Path(ns.password_file).resolve()}")
        say(f"  acl_file {Path(ns.acl_file).resolve()}")
        say("The files must be readable by the user Mosquitto runs as (chown mosquitto); "
            "reload with SIGHUP after exporting again.")
        return 0
    except (UsageError, CredentialsError, InvalidId, OSError) as exc:
        print(f"presence-hub users: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError | InvalidId) else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["users"]:
        return users_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = resolve(args, os.environ)
    except UsageError as exc:
        print(f"presence-hub: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings["log_level"],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings["log_level"] != "DEBUG":
        # amqtt and its state machine library log every connection at INFO: keep ours readable
        for noisy in ("transitions", "amqtt"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if settings["storage"] == "tinydb":
        Path(settings["db"]).parent.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(run_hub(settings))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for what the user can fix, never a traceback
        from hub.auth import CredentialsError
        from hub.broker import BrokerError
        from hub.service import PresenceError
        from hub.store import StoreError

        if isinstance(exc, BrokerError | PresenceError | StoreError | CredentialsError | OSError):
            print(f"presence-hub: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
