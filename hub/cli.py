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
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.durations import format_duration_ms, parse_duration_ms
from hub.protocol import InvalidId, validate_prefix

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


def _duration(value: Any) -> int:
    return parse_duration_ms(value)


def _log_level(value: Any) -> str:
    level = str(value).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"invalid log level {value!r}: use debug, info, warning or error")
    return level


def _prefix(value: Any) -> str:
    return validate_prefix(str(value))


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
    Setting("log_level", "info", "debug, info, warning or error", _log_level),
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
        "Watch presence with: mosquitto_sub -t 'presence/#' -v",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings")
    for s in SETTINGS:
        parser.add_argument(
            _flag(s.name), dest=s.name, default=None, choices=s.choices,
            help=f"{s.help} (default: {s.default})",
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
    return out


def _banner(settings: dict[str, Any], broker_desc: str, broker: str) -> str:
    host, _, port = settings["listen"].rpartition(":")
    if broker != "embedded":
        from hub.mqtt import BrokerURL

        url = BrokerURL.parse(broker)
        host, port = url.host, str(url.port)
    prefix = settings["prefix"]
    return (
        f"presence hub running: {broker_desc}; storage {settings['storage']}"
        f"{' ' + settings['db'] if settings['storage'] == 'tinydb' else ''}; heartbeat "
        f"{format_duration_ms(settings['heartbeat_interval'])}, away after "
        f"{format_duration_ms(settings['away_after'])}, offline after "
        f"{format_duration_ms(settings['offline_after'])}\n"
        f"  watch:        mosquitto_sub -h {host} -p {port} -t '{prefix}/#' -v\n"
        f"  join device:  presence-agent --broker mqtt://{host}:{port} --user alice --device laptop\n"
        f"  ask the hub:  presence --broker mqtt://{host}:{port} --user alice who\n"
        f"  stop:         Ctrl-C"
    )


async def run_hub(settings: dict[str, Any], ready: Callable[[str], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then stop cleanly."""
    from hub.mqtt import broker_answers, parse_listen
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
        from hub.mqtt import redact

        desc = f"external broker {redact(broker)}"
    log.info("broker: %s", desc)
    presence = create_presence_service(
        heartbeat_interval_ms=settings["heartbeat_interval"],
        away_after_ms=settings["away_after"],
        offline_after_ms=settings["offline_after"],
        storage=settings["storage"],
        db_path=settings["db"],
        redis_url=settings["redis_url"],
        prefix=settings["prefix"],
        broker=broker,
        listen=settings["listen"],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with presence:
        banner = _banner(settings, desc, broker)
        print(banner, flush=True)
        if ready is not None:
            ready(banner)
        await stop.wait()
        log.info("stopping: publishing hub offline and flushing state")
    log.info("stopped cleanly")


def main(argv: Sequence[str] | None = None) -> int:
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
        from hub.broker import BrokerError
        from hub.service import PresenceError
        from hub.store import StoreError

        if isinstance(exc, BrokerError | PresenceError | StoreError | OSError):
            print(f"presence-hub: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
