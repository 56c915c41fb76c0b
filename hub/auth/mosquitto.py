"""The same accounts and grants as Mosquitto's ``password_file`` and ``acl_file``."""

from __future__ import annotations

from collections.abc import Mapping

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
        "",
    ]
    if anonymous_read:
        lines += ["# anonymous clients (with allow_anonymous true): read-only presence",
                  *block(grant_for(None, prefix)), ""]
    for name in sorted(accounts):
        account = accounts[name]
        lines += [f"# {account.role}", f"user {name}", *block(grant_for(account, prefix)), ""]
    return "\n".join(lines)

