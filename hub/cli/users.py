"""``presence-hub users``: accounts for the embedded broker, and their export to Mosquitto."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hub.cli.settings import SETTINGS, UsageError, resolve
from hub.protocol import InvalidId

#: where ``add``, ``add-hub`` and ``add-watcher`` take the password from, for --help
PASSWORD_SOURCES = (
    "The password comes from --password, else from stdin when it is not a terminal (one "
    "line: echo \"$PW\" | presence-hub users add ...), else it is generated and printed "
    "once. From a script whose stdin is not a terminal, pipe a password or pass --generate.")


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
                    help="generate a random password and print it once: the default on a "
                    "terminal; from a script (stdin not a terminal) say it, or pipe a password")

    parser = argparse.ArgumentParser(
        prog="presence-hub users",
        description="Accounts of the embedded broker (and, exported, of Mosquitto). As soon as "
        "one account exists, every client must log in: devices as USER/DEVICE, each allowed "
        "to publish only below PREFIX/devices/USER/DEVICE/ and to read its own user's topics.",
        epilog=PASSWORD_SOURCES + " The running hub picks up changes at the next connection; "
        "a removed account keeps a connection it already has until it reconnects (restart "
        "the hub to cut it off at once). Removing an account leaves the user's presence "
        "state; 'presence devices remove ID' forgets a device there.",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser("add", parents=[common, password],
                         help="add a device account USER/DEVICE, or give it a new password",
                         description="Add the account USER/DEVICE, which may publish only "
                         "below PREFIX/devices/USER/DEVICE/ and read USER's topics. "
                         + PASSWORD_SOURCES)
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
        raise UsageError(
            "no password on stdin: stdin is not a terminal (a script, a pipe, /dev/null), so "
            "the password is read from it, one line; pipe one (echo \"$PW\" | presence-hub "
            "users ...), or pass --generate to have one generated and printed")
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
    from hub.auth.mosquitto import mosquitto_conf

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
        for line in mosquitto_conf(
            Path(ns.password_file).resolve(), Path(ns.acl_file).resolve(),
            allow_anonymous=bool(settings["allow_anonymous"]),
        ).splitlines():
            say(f"  {line}")
        say("The files must be readable by the user Mosquitto runs as (chown mosquitto); "
            "reload with SIGHUP after exporting again.")
        say("Client ids: Mosquitto lets any account take a client id in use and closes its "
            "holder's connection (the hub's too); the files cannot stop it. To stop it, at "
            "one connection per account: use_username_as_clientid true on the devices' "
            "listener and a loopback listener for the hub (README: 'Mosquitto and client ids').")
        return 0
    except (UsageError, CredentialsError, InvalidId, OSError) as exc:
        print(f"presence-hub users: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError | InvalidId) else 1


