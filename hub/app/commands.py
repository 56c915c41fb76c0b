"""The ``/presence`` chat commands, handled once for every front end.

Chat bots call :func:`handle_command` with the user and the text they received; the hub's
MQTT side calls :func:`run_command` for requests from the ``presence`` command line (which
wants structured ``data`` for ``--json`` as well as the text). Both go through the same parser
and the same service calls, so a command means the same everywhere.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hub.app.service import PresenceService
from hub.core.errors import PresenceError
from hub.protocol import format_duration_ms, parse_duration_ms

HELP = """\
/presence                      your status, custom status and primary device
/presence who [channel] [--limit N] [--after USER]
                               who is online (optionally: active on a channel), a page at a time
/presence users [--limit N] [--after USER]
                               every user the hub knows, offline ones too, a page at a time
/presence activity [--limit N] [--since 1h]   your recent activity, newest first
/presence online|away|dnd|offline             set your status (offline = invisible)
/presence status "In a meeting"               set your custom status
/presence status --clear                      clear it
/presence devices              your devices
/presence devices remove ID    forget a device
/presence sync                 republish your state and show which devices have it
/presence forget --yes         forget you: devices, state and activity (stop your agents first)"""

STATUS_WORDS = ("online", "away", "dnd", "offline")
#: commands that change state, answered only after the change is persisted
CHANGING_VERBS = frozenset({*STATUS_WORDS, "status", "devices", "sync", "forget"})
#: how long a command waits for its change to reach the store before it says it could not
#: (the ``presence`` command waits 5 s for any reply)
DURABLE_WAIT_S = 3.0


@dataclass(frozen=True, slots=True)
class CommandResult:
    """``text`` for people, ``data`` (JSON-friendly) for scripts; ``ok`` False on user error."""

    ok: bool
    text: str
    data: Any = field(default=None)


class CommandError(Exception):
    """A command the user got wrong; the message is the one line they see."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # never exit the process from a chat command
        raise CommandError(message)


def _activity_parser() -> _Parser:
    p = _Parser(prog="/presence activity", add_help=False)
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--since", default=None)
    return p


def _status_parser() -> _Parser:
    p = _Parser(prog="/presence status", add_help=False)
    p.add_argument("--clear", action="store_true")
    p.add_argument("text", nargs="*")
    return p


async def handle_command(presence: PresenceService, user_id: str, text: str) -> str:
    """Run one chat command for ``user_id`` and return the reply text."""
    return (await run_command(presence, user_id, text)).text


async def run_command(presence: PresenceService, user_id: str, text: str) -> CommandResult:
    """Run one chat command; user errors come back as ``ok=False`` with one clear line."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        return CommandResult(False, f"cannot read that command: {exc}")
    if words and words[0] in ("/presence", "presence"):
        words = words[1:]
    try:
        result = await _dispatch(presence, user_id, words)
    except (CommandError, PresenceError) as exc:
        return CommandResult(False, str(exc))
    # answer only once the change is persisted: an "ok" must survive a SIGKILL
    if result.ok and words and words[0].lower() in CHANGING_VERBS and not await presence.durable(
            within=DURABLE_WAIT_S):
        return CommandResult(False, "applied, but not saved yet: the hub cannot write to its "
                             "store; it will be saved once the store is back", result.data)
    return result


async def _dispatch(presence: PresenceService, user_id: str, words: list[str]) -> CommandResult:
    if not words:
        return await _me(presence, user_id)
    verb, args = words[0].lower(), words[1:]
    if verb in ("help", "-h", "--help"):
        return CommandResult(True, HELP, {"help": HELP})
    if verb == "who":
        return await _who(presence, args)
    if verb == "users":
        return await _users(presence, args)
    if verb == "activity":
        return await _activity(presence, user_id, args)
    if verb in STATUS_WORDS:
        if args:
            raise CommandError(f"usage: /presence {verb}")
        state = await presence.set_status(user_id, verb)
        note = " (invisible: others see you offline)" if verb == "offline" else ""
        return CommandResult(
            True, f"status set to {verb}{note}", state.model_dump(mode="json", by_alias=True)
        )
    if verb == "status":
        return await _custom(presence, user_id, args)
    if verb == "devices":
        return await _devices(presence, user_id, args)
    if verb == "sync":
        if args:
            raise CommandError("usage: /presence sync")
        sync = await presence.sync(user_id)
        return CommandResult(
            True,
            f"sync: {sync.synced}/{sync.total} devices have version {sync.version}",
            sync.model_dump(mode="json", by_alias=True),
        )
    if verb == "forget":
        if args != ["--yes"]:
            raise CommandError("usage: /presence forget --yes (forgets your devices, state and "
                               "activity; stop your agents first, or their next heartbeat "
                               "makes you a new user)")
        await presence.remove_user(user_id)
        return CommandResult(True, f"forgot {user_id}: devices, state and activity",
                             {"userId": user_id, "removed": True})
    raise CommandError(f"unknown command {verb!r}; try /presence help")


async def _me(presence: PresenceService, user_id: str) -> CommandResult:
    s = await presence.get_status(user_id)
    parts = [f"{s.user_id}: {s.status}"]
    if s.custom_status:
        parts.append(f'"{s.custom_status}"')
    if s.active_device:
        parts.append(f"(primary: {s.active_device})")
    return CommandResult(True, " ".join(parts), s.model_dump(mode="json", by_alias=True))


#: users in one ``who`` page by default, and at most: one request must not hold the loop nor
#: send megabytes (100k present users were 13.5 MB in one reply)
WHO_PAGE = 200
WHO_PAGE_MAX = 1000


def _page_parser(prog: str) -> _Parser:
    p = _Parser(prog=prog, add_help=False)
    p.add_argument("--limit", type=int, default=WHO_PAGE)
    p.add_argument("--after", default=None)
    return p


def _who_parser() -> _Parser:
    p = _page_parser("/presence who")
    p.add_argument("channel", nargs="?")
    return p


async def _who(presence: PresenceService, args: list[str]) -> CommandResult:
    opts = _who_parser().parse_args(args)
    if not 1 <= opts.limit <= WHO_PAGE_MAX:
        raise CommandError(f"--limit must be 1-{WHO_PAGE_MAX}")
    channel = opts.channel
    # one more than the page tells whether another page follows
    users = await presence.get_online_users(channel_id=channel, limit=opts.limit + 1,
                                            after=opts.after)
    more = len(users) > opts.limit
    users = users[:opts.limit]
    nxt = users[-1].user_id if more else None
    where = f" on {channel}" if channel else ""
    data = {"users": [u.model_dump(mode="json", by_alias=True) for u in users], "next": nxt}
    if not users:
        return CommandResult(True, f"nobody is online{where}", data)
    rows = [
        (u.user_id, u.status, u.active_device or "-", u.custom_status or "") for u in users
    ]
    header = f"{len(users)} online{where}" + (" (first page)" if more and opts.after is None
                                               else "") + ":"
    text = header + "\n" + _table(("USER", "STATUS", "PRIMARY", "CUSTOM"), rows)
    if more:
        text += f"\nmore: /presence who {channel + ' ' if channel else ''}--after {nxt}"
    return CommandResult(True, text, data)


async def _users(presence: PresenceService, args: list[str]) -> CommandResult:
    """Every user the hub knows, offline ones included, by user id, a page at a time (as
    ``who``: one request must not hold the loop nor send megabytes). Offline users are who
    ``who`` leaves out; this is how to find them, and their last primary device."""
    opts = _page_parser("/presence users").parse_args(args)
    if not 1 <= opts.limit <= WHO_PAGE_MAX:
        raise CommandError(f"--limit must be 1-{WHO_PAGE_MAX}")
    after = opts.after
    # one more than the page tells whether another page follows
    page = await presence.user_ids_page(opts.limit + 1, after)
    more = len(page) > opts.limit
    page = page[:opts.limit]
    statuses = await presence.get_statuses(page)
    users = [statuses[uid] for uid in page]
    nxt = page[-1] if more else None
    data = {"users": [u.model_dump(mode="json", by_alias=True) for u in users], "next": nxt}
    if not users:
        return CommandResult(True, "no users" + (f" after {after}" if after else ""), data)
    now = presence.clock.wall()
    rows = [
        (u.user_id, u.status, u.active_device or "-",
         "-" if u.last_seen is None else _ago(now, u.last_seen), u.custom_status or "")
        for u in users
    ]
    header = (f"{len(users)} user{'s' if len(users) != 1 else ''}"
              + (" (first page)" if more and after is None else "") + ":")
    text = header + "\n" + _table(("USER", "STATUS", "PRIMARY", "LAST SEEN", "CUSTOM"), rows)
    if more:
        text += f"\nmore: /presence users --after {nxt}"
    return CommandResult(True, text, data)


async def _activity(presence: PresenceService, user_id: str, args: list[str]) -> CommandResult:
    opts = _activity_parser().parse_args(args)
    if opts.limit < 1 or opts.limit > 1000:
        raise CommandError("--limit must be between 1 and 1000")
    since = None
    if opts.since is not None:
        try:
            since = presence.clock.wall() - parse_duration_ms(opts.since)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    entries = await presence.get_activity(user_id, limit=opts.limit, since=since)
    data = [a.model_dump(mode="json", by_alias=True) for a in entries]
    if not entries:
        return CommandResult(True, "no activity", data)
    now = presence.clock.wall()
    rows = [
        (
            _ago(now, a.timestamp),
            a.type,
            a.channel_id or "-",
            a.device_id or "-",
        )
        for a in entries
    ]
    return CommandResult(True, _table(("WHEN", "TYPE", "CHANNEL", "DEVICE"), rows), data)


async def _custom(presence: PresenceService, user_id: str, args: list[str]) -> CommandResult:
    opts = _status_parser().parse_args(args)
    if opts.clear:
        if opts.text:
            raise CommandError("use either a text or --clear, not both")
        state = await presence.clear_custom_status(user_id)
        return CommandResult(True, "custom status cleared", state.model_dump(mode="json", by_alias=True))
    text = " ".join(opts.text).strip()
    if not text:
        raise CommandError('usage: /presence status "In a meeting"  or  /presence status --clear')
    state = await presence.set_custom_status(user_id, text)
    return CommandResult(True, f'custom status set to "{state.custom_status}"',
                         state.model_dump(mode="json", by_alias=True))


async def _devices(presence: PresenceService, user_id: str, args: list[str]) -> CommandResult:
    if args:
        if args[0] != "remove" or len(args) != 2:
            raise CommandError("usage: /presence devices [remove ID]")
        await presence.remove_device(user_id, args[1])
        return CommandResult(True, f"device {args[1]} removed", {"removed": args[1]})
    devices = await presence.get_devices(user_id)
    data = [d.model_dump(mode="json", by_alias=True) for d in devices]
    if not devices:
        return CommandResult(True, "no devices", data)
    now = presence.clock.wall()
    rows = [
        (
            ("* " if d.is_active else "  ") + d.id,
            d.name,
            d.status,
            "-" if d.last_seen is None else _ago(now, d.last_seen),
        )
        for d in devices
    ]
    return CommandResult(True, _table(("  DEVICE", "NAME", "STATUS", "LAST SEEN"), rows), data)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _ago(now: int, then: int) -> str:
    ms = now - then
    return "just now" if ms < 1000 else f"{format_duration_ms(ms)} ago"
