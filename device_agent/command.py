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

from .config import KEYS_BY_NAME, AgentConfig, load_config
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


#: the agent's settings that the command takes as flags too (the rest come from the agent's
#: config file and PRESENCE_* only: a heartbeat interval means nothing to one request)
_CONNECTION_KEYS: Final = ("broker", "broker_username", "user", "device", "prefix", "timeout",
                           "ca_file", "cert_file", "key_file", "tls_insecure")


def _common_options() -> _Parser:
    """Options accepted before and after the subcommand, with the agent's names and help."""
    common = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    group = common.add_argument_group(
        "connection (default: the agent's config file and PRESENCE_*)")
    for name in _CONNECTION_KEYS:
        KEYS_BY_NAME[name].add_flag(group)
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
            "Ask the mqtt-presence hub about presence, or set your status. Each command is\n"
            "sent to the hub as the chat command of the same name ('/presence who ...') from\n"
            "this user and device, and the hub's answer is printed. With no command: your\n"
            "status, custom status and primary device, on one line."
        ),
        epilog=(
            "examples:\n"
            "  presence                       your status, custom status and primary device\n"
            "  presence who telegram-123      who is online (on a channel)\n"
            "  presence users                 every known user, offline ones too (a page)\n"
            "  presence activity --limit 5 --since 1h\n"
            "  presence dnd                   set your status\n"
            '  presence status "In a meeting" / presence status --clear\n'
            "  presence devices remove old-phone\n"
            "  presence --json who | jq .\n\n"
            "On a broker with accounts, log in as the device's account (USER/DEVICE); the\n"
            "password comes from PRESENCE_BROKER_PASSWORD, the config file or the URL, never\n"
            "from a flag (other users could read it in the process list):\n"
            "  PRESENCE_BROKER_USERNAME=alice/laptop PRESENCE_BROKER_PASSWORD=... \\\n"
            "    presence --broker hub.lan:1883 --user alice --device laptop who\n\n"
            "'presence COMMAND --help' describes each command."
        ),
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=summary,
                              description=f"{summary[0].upper()}{summary[1:]}. {description}")

    who = command("who", "who is online, optionally on a channel",
                  "Users whose status is online, away or dnd (offline users and invisible ones"
                  " are left out), sorted by user id, a page at a time; with a channel, only"
                  " those active on it recently.")
    who.add_argument("channel", nargs="?", help="channel id, e.g. telegram-123")
    _paging(who, "who")
    users = command("users", "every user the hub knows, offline ones too",
                    "Each user's status, custom status and primary device, sorted by user id,"
                    " a page at a time. (Accounts are another list: presence-hub users list.)")
    _paging(users, "users")
    act = command("activity", "your recent activity, newest first",
                  "What the hub recorded for your user: type, channel, device, and when.")
    act.add_argument("--limit", type=int, metavar="N", help="at most N entries (default 10)")
    act.add_argument("--since", metavar="DURATION", help="only the last DURATION, e.g. 1h")
    for status in STATUSES:
        note = (" Others see you offline while your devices stay connected (invisible)."
                if status == "offline" else
                " 'online' clears a status you set: it then follows your devices again."
                if status == "online" else
                " It holds until you set another one.")
        command(status, f"set your status to {status}", note.strip())
    st = command("status", "set or clear your custom status text",
                 "The text every device of yours and every watcher sees beside your status.")
    st.add_argument("text", nargs="*", help='the custom status, e.g. "In a meeting"')
    st.add_argument("--clear", action="store_true", help="remove the custom status")
    dev = command("devices", "list your devices, or remove one",
                  "Each device with its name, status and when it was last seen; * marks the"
                  " primary one. 'remove ID' forgets a device (a running agent of it comes"
                  " back with its next birth).")
    dev.add_argument("action", nargs="?", choices=["remove"], help="remove a device")
    dev.add_argument("device_id", nargs="?", metavar="ID", help="the device to remove")
    command("sync", "republish your state and show who acked it",
            "The hub republishes your retained state and asks every device of yours to ack"
            " it; the answer is how many of them have the current version.")
    forget = command("forget", "make the hub forget you: devices, state and activity",
                     "Your retained topics are cleared and your activity deleted. Stop your"
                     " agents first: a device that heartbeats afterwards makes you a new user"
                     " (your version continues above the old one's).")
    forget.add_argument("--yes", action="store_true", required=True,
                        help="yes, forget me (required: there is no undo)")
    return parser


def _paging(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--limit", type=int, metavar="N",
                        help="at most N users in this page (default 200, at most 1000)")
    parser.add_argument("--after", metavar="USER",
                        help=f"the page after this user id (the hub names it: 'more: ... {name}"
                        " --after USER')")


def _page_words(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> list[str]:
    words = []
    if ns.limit is not None:
        if ns.limit < 1:
            parser.error(f"--limit must be 1 or more, not {ns.limit}")
        words += ["--limit", str(ns.limit)]
    if ns.after is not None:
        _check_id(parser, ns.after, "user id")
        words += ["--after", ns.after]
    return words


def command_words(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The chat command's words (after ``/presence``) for parsed arguments; checks input."""
    name = ns.subcommand
    if name is None:
        return []
    if name == "who":
        words = ["who"]
        if ns.channel is not None:
            _check_id(parser, ns.channel, "channel id")
            words.append(ns.channel)
        return words + _page_words(parser, ns)
    if name == "users":
        return ["users", *_page_words(parser, ns)]
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
    if name == "forget":
        return ["forget", "--yes"]
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
    client.on_subscribe = lambda _c, _u, mid, rcs, _p: events.put(("suback", (mid, rcs)))

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
            suback = wait("suback")
            if suback is None:
                raise BrokerUnavailable(
                    f"the broker at {broker} did not confirm the subscription within {timeout:g}s"
                )
            mid, codes = suback
            if mid != sub_mid:
                continue
            if any(is_failure(code) for code in codes):
                # the embedded broker refuses a filter outside the login's grant; without
                # the replies nothing could arrive, so say so instead of timing out
                raise BrokerUnavailable(
                    f"the broker at {broker} does not let this login read {reply_topic}"
                    f" (logged in as {broker.username or 'nobody'})"
                )
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
        name: getattr(ns, name) for name in (*_CONNECTION_KEYS, "config") if hasattr(ns, name)
    }
    try:
        config = load_config(settings)
        reply = ask_hub(config, command, config.timeout_ms / 1000)
    except HubUnavailable as exc:  # includes BrokerUnavailable
        # a device account used for another device fails in one of several ways (refused,
        # closed, denied, never answered) depending on the broker: the cause is the same
        mismatch = config.account_mismatch()
        print(f"{PROG}: {exc}" + (f"; {mismatch}" if mismatch else ""), file=sys.stderr)
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
