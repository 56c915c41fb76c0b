"""``presence``: the chat commands from a terminal, answered by the hub.

Every subcommand becomes the same text a chat bot would send (``presence who telegram-123``
-> ``/presence who telegram-123``), goes to the hub as a request, and the hub's reply is
printed: its ``text`` (a human table) by default, its ``data`` as JSON with ``--json``. The
command only turns argv into text and back; what the commands mean lives in the hub, once,
for the terminal and every chat bot alike.

Wire (see ``hub.protocol`` and topics.md): publish ``{"id", "command"}`` to
``P/devices/{user}/{device}/req`` and wait for ``{"id", "ok", "text", "data"}`` with the same
id on ``P/replies/{user}/{device}``. The MQTT client is short-lived and has its own client id
(``{device}-cli-{random}``), never the agent's, so asking the hub never disconnects the running
agent and never publishes a birth or a will: the device's presence is untouched.

Settings (broker, user, device, prefix, timeout, TLS files) come from flags, ``PRESENCE_*``
environment variables and the agent's config file, like ``presence-agent``.

Exit status: 0 when the hub answered ok; 1 when the broker or the hub cannot be reached (the
message says which, with the broker URL) or the hub answered ok=false (its text is printed);
2 for a usage error. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any, Final, NoReturn

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from hub.protocol import (
    STATUSES,
    InvalidId,
    ReplyPayload,
    RequestPayload,
    Topics,
    format_duration_ms,
    parse_duration_ms,
    validate_id,
)

from .config import AgentConfig, load_config
from .errors import AgentError, BrokerUnavailable, ConfigError, HubUnavailable
from .transport import connect_error_text, is_failure, make_client, reason_text

PROG: Final = "presence"
CHAT_PREFIX: Final = "/presence"

_SAFE_WORD: Final = re.compile(r"[\w@%+=:,./-]+", re.ASCII)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


# --------------------------------------------------------------------------------------------
# argv -> chat text


def quote_word(word: str) -> str:
    """Quote one argument so that ``shlex.split`` gives it back unchanged.

    Double quotes (``status "In a meeting"``) rather than shlex.quote's single quotes, because
    that is how people type commands in chat; inside double quotes only ``"`` and ``\\`` need
    a backslash for POSIX shlex.
    """
    if _SAFE_WORD.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def chat_text(words: Sequence[str]) -> str:
    return " ".join([CHAT_PREFIX, *(quote_word(w) for w in words)])


def _common_options() -> _Parser:
    common = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    group = common.add_argument_group("connection (default: the agent's config and PRESENCE_*)")
    group.add_argument("--broker", metavar="URL", help="MQTT broker URL [PRESENCE_BROKER]")
    group.add_argument("--user", metavar="ID", help="your user id [PRESENCE_USER]")
    group.add_argument("--device", metavar="ID", help="this device's id [PRESENCE_DEVICE]")
    group.add_argument("--prefix", metavar="PREFIX", help="topic prefix [PRESENCE_PREFIX]")
    group.add_argument("--timeout", metavar="DURATION",
                       help="how long to wait for the hub, e.g. 5s (default 5s) [PRESENCE_TIMEOUT]")
    group.add_argument("--config", metavar="PATH", help="agent config file [PRESENCE_CONFIG]")
    common.add_argument("--json", action="store_true",
                        help="print the reply's structured data as JSON instead of the text")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = _Parser(
        prog=PROG,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Ask the mqtt-presence hub about presence, or set your status. Each subcommand is\n"
            "sent to the hub as the chat command of the same name ('/presence who ...')."
        ),
        epilog=(
            "examples:\n"
            "  presence                       your status and devices\n"
            "  presence who telegram-123      who is online (on a channel)\n"
            "  presence activity --limit 5 --since 1h\n"
            "  presence dnd                   set your status\n"
            '  presence status "In a meeting" / presence status --clear\n'
            "  presence devices remove old-phone\n"
            "  presence --json who | jq ."
        ),
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    who = sub.add_parser("who", parents=[common], help="who is online, optionally on a channel")
    who.add_argument("channel", nargs="?", help="channel id, e.g. telegram-123")
    act = sub.add_parser("activity", parents=[common], help="your recent activity, newest first")
    act.add_argument("--limit", type=int, metavar="N", help="at most N entries")
    act.add_argument("--since", metavar="DURATION", help="only the last DURATION, e.g. 1h")
    for status in STATUSES:
        sub.add_parser(status, parents=[common], help=f"set your status to {status}")
    st = sub.add_parser("status", parents=[common], help="set or clear your custom status text")
    st.add_argument("text", nargs="*", help='the custom status, e.g. "In a meeting"')
    st.add_argument("--clear", action="store_true", help="remove the custom status")
    dev = sub.add_parser("devices", parents=[common], help="list your devices, or remove one")
    dev.add_argument("action", nargs="?", choices=["remove"], help="remove a device")
    dev.add_argument("device_id", nargs="?", metavar="ID", help="the device to remove")
    sub.add_parser("sync", parents=[common], help="republish your state and show who acked it")
    return parser


def command_words(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The chat command's words (after ``/presence``) for parsed arguments; checks input."""
    name = ns.subcommand
    if name is None:
        return []
    if name == "who":
        if ns.channel is None:
            return ["who"]
        _check_id(parser, ns.channel, "channel id")
        return ["who", ns.channel]
    if name == "activity":
        words = ["activity"]
        if ns.limit is not None:
            if ns.limit < 1:
                parser.error(f"--limit must be 1 or more, not {ns.limit}")
            words += ["--limit", str(ns.limit)]
        if ns.since is not None:
            try:
                parse_duration_ms(ns.since)
            except ValueError as exc:
                parser.error(f"--since: {exc}")
            words += ["--since", ns.since.strip()]
        return words
    if name in STATUSES:
        return [name]
    if name == "status":
        text = " ".join(ns.text).strip()
        if ns.clear and text:
            parser.error("give a status text or --clear, not both")
        if ns.clear:
            return ["status", "--clear"]
        if not text:
            parser.error('give a status text (presence status "In a meeting") or --clear')
        return ["status", text]
    if name == "devices":
        if ns.action is None:
            if ns.device_id is not None:
                parser.error("to remove a device: presence devices remove ID")
            return ["devices"]
        if ns.device_id is None:
            parser.error("which device? presence devices remove ID")
        _check_id(parser, ns.device_id, "device id")
        return ["devices", "remove", ns.device_id]
    if name == "sync":
        return ["sync"]
    parser.error(f"unknown command {name!r}")  # pragma: no cover - argparse rejects it first


def _check_id(parser: argparse.ArgumentParser, value: str, what: str) -> None:
    try:
        validate_id(value, what)
    except InvalidId as exc:
        parser.error(str(exc))


def to_chat_command(argv: Sequence[str]) -> str:
    """``["who", "telegram-123"]`` -> ``"/presence who telegram-123"`` (global flags ignored)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    return chat_text(command_words(ns, parser))


# --------------------------------------------------------------------------------------------
# One request, one reply


def ask_hub(config: AgentConfig, command: str, timeout: float) -> ReplyPayload:
    """Send ``command`` to the hub over a short-lived connection and return its reply.

    Raises :class:`BrokerUnavailable` when the broker cannot be reached or refuses us, and
    :class:`HubUnavailable` when the broker is fine but no reply came within ``timeout``.
    """
    topics = Topics(config.prefix)
    request_topic = topics.device(config.user, config.device, "req")
    reply_topic = topics.reply(config.user, config.device)
    request_id = secrets.token_hex(8)
    try:
        body = RequestPayload(id=request_id, command=command).to_json()
    except ValidationError as exc:
        raise ConfigError(f"command not accepted: {exc.errors()[0].get('msg', exc)}") from None

    broker = config.broker
    deadline = time.monotonic() + timeout
    events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    client = make_client(config, f"{config.device}-cli-{secrets.token_hex(4)}")
    client.connect_timeout = max(0.1, timeout)
    client.on_connect = lambda _c, _u, _f, rc, _p: events.put(("connack", rc))
    client.on_disconnect = lambda _c, _u, _f, rc, _p: events.put(("disconnect", rc))
    client.on_subscribe = lambda _c, _u, mid, _rcs, _p: events.put(("suback", mid))

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != reply_topic:
            return
        try:
            reply = ReplyPayload.model_validate_json(message.payload)
        except ValidationError:
            return  # someone else's garbage on our reply topic; keep waiting for ours
        if reply.id == request_id:
            events.put(("reply", reply))

    client.on_message = on_message

    def wait(kind: str) -> Any:
        while True:
            remaining = deadline - time.monotonic()
            try:
                event, value = events.get(timeout=max(0.0, remaining))
            except queue.Empty:
                return None
            if event == "disconnect":
                raise BrokerUnavailable(
                    f"the broker at {broker} closed the connection: {reason_text(value)}"
                )
            if event == "connack" and is_failure(value):
                raise BrokerUnavailable(
                    f"the broker at {broker} refused the connection: {reason_text(value)}"
                )
            if event == kind:
                return value

    try:
        client.connect(broker.host, broker.port, keepalive=max(5, round(timeout) + 5))
    except OSError as exc:
        raise BrokerUnavailable(
            f"cannot connect to the broker at {broker}: {connect_error_text(exc)}"
        ) from None
    client.loop_start()
    try:
        if wait("connack") is None:
            raise BrokerUnavailable(
                f"the broker at {broker} did not answer within {timeout:g}s"
            )
        result, sub_mid = client.subscribe(reply_topic, qos=1)
        while result == mqtt.MQTT_ERR_SUCCESS:
            mid = wait("suback")
            if mid is None:
                raise BrokerUnavailable(
                    f"the broker at {broker} did not confirm the subscription within {timeout:g}s"
                )
            if mid == sub_mid:
                break
        client.publish(request_topic, body, qos=1)
        reply = wait("reply")
        if reply is None:
            raise HubUnavailable(
                f"no reply from the hub within {format_duration_ms(timeout * 1000)}"
                f" (broker {broker} is up, prefix {config.prefix!r}):"
                " is presence-hub running and connected to it?"
            )
        assert isinstance(reply, ReplyPayload)
        return reply
    finally:
        client.disconnect()
        client.loop_stop()


# --------------------------------------------------------------------------------------------
# main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    command = chat_text(command_words(ns, parser))
    settings = {
        name: getattr(ns, name)
        for name in ("broker", "user", "device", "prefix", "timeout", "config")
        if hasattr(ns, name)
    }
    try:
        config = load_config(settings)
        reply = ask_hub(config, command, config.timeout_ms / 1000)
    except HubUnavailable as exc:  # includes BrokerUnavailable
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except AgentError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if not reply.ok:
        print(f"{PROG}: {reply.text}" if reply.text else f"{PROG}: the hub refused {command!r}",
              file=sys.stderr)
        return 1
    if getattr(ns, "json", False):
        print(json.dumps(reply.data, ensure_ascii=False))
    elif reply.text:
        print(reply.text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
