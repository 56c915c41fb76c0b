"""``presence-agent``: the device daemon, and a way to record activity from scripts.

Usage::

    presence-agent [OPTIONS]                      # run the agent until SIGTERM / Ctrl-C
    presence-agent [OPTIONS] activity --type message --channel telegram-123 [--data JSON]
    presence-agent [OPTIONS] sleep --for 10m      # wake once: deliver, announce a sleep, exit
    presence-agent [OPTIONS] config               # print the effective settings

Settings come from flags, then ``PRESENCE_*`` environment variables, then the TOML file
(``--config``, ``$PRESENCE_CONFIG`` or ``$XDG_CONFIG_HOME/mqtt-presence/agent.toml``), then
defaults; see :mod:`device_agent.config` for every key.

Recording activity from the command line. ``presence-agent activity`` does not talk to the
broker at all: it appends the activity (stamped with the current time) to the device's
on-disk outbox, the same SQLite file the daemon delivers from, and exits. Whoever acts for that
user and device delivers it, in recording order, with QoS 1:

* a running daemon notices the new row within a quarter of a second (it polls SQLite's
  ``data_version``, which only moves when another process commits) and publishes it;
* if no daemon runs, or the broker is down, the row waits on disk and the next daemon start
  (or reconnect) delivers it. A row leaves the outbox only when the broker acknowledged it.

So a chat bot hook or a shell alias can call ``presence-agent activity`` and never block on,
or fail because of, the network. Both commands must resolve the same ``user``, ``device`` and
``outbox`` settings (they read the same config file and environment), and the outbox refuses
to be shared by two different user/device pairs.

A device that sleeps (a battery badge woken by a timer, a Raspberry Pi that powers down).
``presence-agent sleep --for 10m`` is one wake cycle: connect with a new session (birth),
deliver the outbox, ack the user state, announce ``{"state":"sleeping","sleepMs":600000}``,
disconnect cleanly (no last will) and exit. The hub keeps the device asleep, neither lost nor
timed out, until the sleep plus its heartbeat timeout have passed; the next run is its next
birth. It takes the device's lock like the daemon does, so it is for devices whose agent runs
only while they are awake.

Exit status: 0 on success (and after a clean stop on SIGTERM/SIGINT, which publishes ``conn``
offline with reason ``disconnect``), 1 when the agent gave up (for example the broker refused
the credentials), 2 for a usage or configuration error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any, NoReturn

from hub.protocol import format_duration_ms, parse_duration_ms
from hub.protocol.payloads import MAX_ANNOUNCED_MS

from .agent import PresenceAgent, queue_activity
from .config import KEYS, AgentConfig, load_config
from .errors import AgentError, ConfigError

PROG = "presence-agent"

#: Settings that only the ``presence`` command uses.
_COMMAND_ONLY = {"timeout"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def _common_options() -> _Parser:
    """Options accepted before and after the subcommand (defaults suppressed, so absent)."""
    common = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    group = common.add_argument_group("settings (also PRESENCE_* environment and config file)")
    group.add_argument("--config", metavar="PATH",
                       help="TOML config file (default $XDG_CONFIG_HOME/mqtt-presence/agent.toml)")
    for key in KEYS:
        if not key.has_flag or key.name in _COMMAND_ONLY:
            continue
        key.add_flag(group)
    common.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(
        prog=PROG,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run the mqtt-presence device agent: publish this device's presence (birth, last\n"
            "will, heartbeats with idle time) to the hub over MQTT, deliver recorded activity,\n"
            "and keep a local state file with the user's status. Stops cleanly (offline,\n"
            "reason 'disconnect') on SIGTERM or Ctrl-C."
        ),
        epilog=(
            "examples:\n"
            "  presence-agent --broker mqtt://hub.lan --user alice --device laptop\n"
            "  presence-agent activity --type message --channel telegram-123\n"
            "  presence-agent sleep --for 10m     # announce a sleep, then exit\n"
            "  PRESENCE_BROKER=mqtts://hub.lan presence-agent config\n\n"
            "'activity' only appends to the on-disk outbox: the running agent (or the next one\n"
            "to start) delivers it, so it works while the broker is down."
        ),
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="{run,activity,sleep,config}")
    sub.add_parser("run", parents=[common], help="run the agent (the default)",
                   description="Run the agent until SIGTERM or Ctrl-C.")
    act = sub.add_parser(
        "activity", parents=[common], help="record one activity for delivery",
        description="Append one activity to the outbox; the agent delivers it when it can.",
    )
    act.add_argument("--type", dest="activity_type", default="message", metavar="TYPE",
                     help="what the user did, e.g. message (default message)")
    act.add_argument("--channel", metavar="ID", help="channel id, e.g. telegram-123")
    act.add_argument("--data", metavar="JSON", help="extra JSON object to attach")
    act.add_argument("--timestamp", metavar="MS", type=int,
                     help="when it happened, ms since the epoch (default now)")
    nap = sub.add_parser(
        "sleep", parents=[common], help="wake once: deliver, announce a sleep, and exit",
        description="Connect (a new session and birth), deliver the outbox, announce a sleep"
                    " of --for on conn, disconnect cleanly and exit. The hub keeps the device"
                    " asleep until then (plus its heartbeat timeout); the next start is its"
                    " next birth.",
    )
    nap.add_argument("--for", dest="sleep_for", required=True, metavar="DURATION",
                     help="how long the device sleeps, e.g. 10m (at most 7d)")
    nap.add_argument("--wait", dest="sleep_wait", default="30s", metavar="DURATION",
                     help="how long to try to connect and deliver before giving up (default 30s)")
    sub.add_parser("config", parents=[common], help="print the effective settings",
                   description="Print the settings after flags, environment and file are merged.")
    return parser


def _settings(ns: argparse.Namespace) -> dict[str, Any]:
    names = {key.name for key in KEYS} | {"config"}
    return {k: v for k, v in vars(ns).items() if k in names}


def _setup_logging(ns: argparse.Namespace) -> None:
    level = logging.DEBUG if getattr(ns, "verbose", False) else logging.INFO
    if getattr(ns, "quiet", False):
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level > logging.DEBUG:
        logging.getLogger("paho").setLevel(logging.WARNING)


def run_daemon(config: AgentConfig) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("device_agent").info("received %s, stopping",
                                               signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = PresenceAgent(config)
    agent.start()
    try:
        while not stop.wait(0.2):
            if agent.wait(0):
                break
    finally:
        agent.close()
    if agent.error is not None:
        print(f"{PROG}: {agent.error}", file=sys.stderr)
        return 1
    return 0


def record_activity(config: AgentConfig, ns: argparse.Namespace) -> int:
    data: dict[str, Any] | None = None
    if ns.data is not None:
        try:
            data = json.loads(ns.data)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--data is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("--data must be a JSON object, e.g. '{\"text\": \"hi\"}'")
    try:
        _row, waiting = queue_activity(config, ns.activity_type, ns.channel, data, ns.timestamp)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    where = f" on {ns.channel}" if ns.channel else ""
    print(
        f"queued {ns.activity_type} activity{where} for {config.user}/{config.device}"
        f" ({waiting} waiting in {config.outbox_path}); the agent delivers it"
    )
    return 0


def _duration(flag: str, text: str, most: int) -> int:
    try:
        ms = parse_duration_ms(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    if not 0 < ms <= most:
        raise ConfigError(f"{flag} must be more than 0 and at most {format_duration_ms(most)}")
    return ms


def announce_sleep(config: AgentConfig, ns: argparse.Namespace) -> int:
    """One wake cycle of a sleeping device (see the module docstring)."""
    sleep_ms = _duration("--for", ns.sleep_for, MAX_ANNOUNCED_MS)
    wait_s = _duration("--wait", ns.sleep_wait, MAX_ANNOUNCED_MS) / 1000
    deadline = time.monotonic() + wait_s
    agent = PresenceAgent(config)
    agent.start()
    try:
        if not agent.wait_connected(wait_s):
            why = agent.error or f"not connected to {config.broker} within {ns.sleep_wait}"
            print(f"{PROG}: {why}; nothing announced", file=sys.stderr)
            return 1
        # Deliver what waits in the outbox first: the device is away for a while.
        while agent.pending_count and time.monotonic() < deadline:
            time.sleep(0.05)
        left = agent.pending_count
        acked = agent.sleep(sleep_ms, timeout=max(0.1, deadline - time.monotonic()))
    finally:
        agent.close()  # asleep: no offline, no reconnect
    if not acked:
        print(f"{PROG}: {config.broker} did not confirm the sleep announcement", file=sys.stderr)
        return 1
    waiting = f"; {left} message(s) still wait in the outbox" if left else ""
    print(f"{config.user}/{config.device} sleeps for {format_duration_ms(sleep_ms)}"
          f" (announced to {config.broker}){waiting}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    _setup_logging(ns)
    try:
        config = load_config(_settings(ns))
        if ns.subcommand == "activity":
            return record_activity(config, ns)
        if ns.subcommand == "sleep":
            return announce_sleep(config, ns)
        if ns.subcommand == "config":
            for name, value in config.describe().items():
                print(f"{name} = {value}")
            return 0
        return run_daemon(config)
    except AgentError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the daemon (e.g. during `sleep`): no traceback
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
