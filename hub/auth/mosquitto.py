"""The same accounts and grants as Mosquitto's ``password_file`` and ``acl_file``.

Client ids are the one rule the files cannot carry. The embedded broker refuses a CONNECT whose
client id another account holds (CONNACK 2); Mosquitto 2.0 instead closes the holder's
connection and lets the newcomer in, whoever logs in, and neither its ``password_file`` nor its
``acl_file`` can tie a client id to a username (``%c`` in an ACL pattern matches topics, and
takes effect only after the takeover). Its one setting that does is
``use_username_as_clientid``, which makes the client id *be* the username: one connection per
account. That breaks what per-connection client ids are for (the ``presence`` command and
``presence-agent activity`` log in with the device's account beside its running agent; a
second hub must be refused, not take over), so :func:`mosquitto_conf` offers it as a choice
for the listener devices use and puts the hub on a loopback listener of its own, and the
README says what each choice costs.

Without it, the agents' client ids are still hard to take: they carry the connection's random
96-bit session id, and the ACL written here lets no other account read the ``conn`` topic
that names it. The hub's fixed client id (``presence-hub``) is not secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from hub.auth.accounts import Account
from hub.auth.grants import Grant, grant_for

# ------------------------------------------------------------------------------------------
# Mosquitto


def mosquitto_password_file(accounts: Mapping[str, Account]) -> str:
    """Mosquitto's ``password_file``: ``username:$7$...`` per line (our hashes as they are)."""
    lines = [f"{name}:{accounts[name].password_hash}" for name in sorted(accounts)]
    return "\n".join(lines) + ("\n" if lines else "")


def mosquitto_acl_file(accounts: Mapping[str, Account], prefix: str,
                       *, anonymous_read: bool = False) -> str:
    """Mosquitto's ``acl_file`` with the same grants the embedded broker applies.

    Explicit ``user``/``topic`` lines rather than ``pattern`` ones: ``%u`` would expand to
    ``USER/DEVICE``, which can name the device's own topics but not its user's.
    """

    def block(grant: Grant) -> list[str]:
        out = []
        for f in grant.publish:
            out.append(f"topic {'readwrite' if f in grant.read else 'write'} {f}")
        out.extend(f"topic read {f}" for f in grant.read if f not in grant.publish)
        return out

    lines = [
        "# Written by `presence-hub users export-mosquitto`; regenerate it after changing accounts",
        "# (and send Mosquitto a SIGHUP to reload). Every other topic is denied.",
        "# Client ids are beyond this file: see the README, 'Mosquitto and client ids'.",
        "",
    ]
    if anonymous_read:
        lines += ["# anonymous clients (with allow_anonymous true): read-only presence",
                  *block(grant_for(None, prefix)), ""]
    for name in sorted(accounts):
        account = accounts[name]
        lines += [f"# {account.role}", f"user {name}", *block(grant_for(account, prefix)), ""]
    return "\n".join(lines)



def mosquitto_conf(
    password_file: Path,
    acl_file: Path,
    *,
    allow_anonymous: bool = False,
    client_id_is_username: bool = False,
    listener: str = "1883",
    hub_listener: str = "1884 127.0.0.1",
) -> str:
    """The ``mosquitto.conf`` lines that use the exported files, as the export prints them.

    ``client_id_is_username`` closes client-id takeovers across accounts on Mosquitto, at the
    price of one connection per account on ``listener`` (see the module docstring): it sets
    ``use_username_as_clientid`` on the devices' listener and opens ``hub_listener`` (loopback
    by default) where the hub keeps a client id of its own. Mosquitto reads both listeners'
    logins from the same files (``per_listener_settings`` stays false), so loopback is what
    keeps device accounts off the hub's listener.
    """
    lines = [
        "# accounts and rules from `presence-hub users export-mosquitto`",
        f"allow_anonymous {'true' if allow_anonymous else 'false'}",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
    ]
    if client_id_is_username:
        lines += [
            "# devices and watchers: the client id is the username, so no account can take",
            "# over another's connection (one connection per account)",
            f"listener {listener}",
            "use_username_as_clientid true",
            "# the hub, on this machine only: its own client id and persistent session",
            f"listener {hub_listener}",
        ]
    return "\n".join(lines) + "\n"
