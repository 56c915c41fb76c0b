"""The access policy the embedded broker applies: CONNECT verdicts, per-message checks, counters."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from amqtt.contexts import Action

from hub.auth.accounts import Account, CredentialStore, verify_password
from hub.auth.grants import OPEN_GRANT, Grant, grant_for
from hub.protocol import validate_prefix

log = logging.getLogger(__name__)

#: MQTT CONNACK return codes (3.1.1) used for refusals.
CONNACK_IDENTIFIER_REJECTED: Final = 2
CONNACK_BAD_CREDENTIALS: Final = 4
CONNACK_NOT_AUTHORIZED: Final = 5

#: Keys of amqtt ``Session.attributes`` we own.
GRANT_KEY: Final = "hub.grant"
VERDICT_KEY: Final = "hub.verdict"


# ------------------------------------------------------------------------------------------
# The policy the broker applies


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to one CONNECT: a grant, or a refusal with its CONNACK code and reason."""

    grant: Grant | None
    reason: str = ""
    connack: int = 0
    username: str | None = None

    @property
    def ok(self) -> bool:
        return self.grant is not None


class _LogLimiter:
    """One log line per reason per second, with a count of what was left out."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}

    def warn(self, reason: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last[0] < 1.0:
            self._last[reason] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        if suppressed:
            message += f" ({suppressed} more of these in the last second)"
        log.warning(message, *args)
        self._last[reason] = (now, 0)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


class AccessPolicy:
    """Accounts + grants + counters for one broker. All of it runs on the broker's loop.

    ``allow_anonymous``: ``None`` (default) lets anonymous clients in only while there are no
    accounts; ``True`` also lets them in when accounts exist, with the read-only watcher grant;
    ``False`` refuses clients without a username (with no accounts, any username is accepted
    unchecked: the broker then only asks clients to name themselves).
    """

    def __init__(self, prefix: str = "presence", credentials: CredentialStore | None = None,
                 allow_anonymous: bool | None = None) -> None:
        self.prefix = validate_prefix(prefix)
        self.credentials = credentials
        self.allow_anonymous = allow_anonymous
        #: refusals by reason: bad_password, unknown_user, anonymous, forbidden_will,
        #: forbidden_publish, forbidden_subscribe, forbidden_receive, client_id_taken,
        #: hub_dropped, too_large
        self.refused: Counter[str] = Counter()
        self._logs = _LogLimiter()
        self._cache_key = secrets.token_bytes(32)
        #: username -> (hash it was checked against, keyed digest of the good password)
        self._verified: dict[str, tuple[str, bytes]] = {}
        self._verify_lock: asyncio.Lock | None = None
        self._grants: dict[str, Grant] = {}

    # state ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        if self.credentials is not None and self.credentials.refresh():
            self._grants.clear()
            self._verified.clear()

    @property
    def auth_required(self) -> bool:
        """True as soon as one account exists."""
        return self.credentials is not None and len(self.credentials) > 0

    def describe(self) -> str:
        """One line for the start-up log: is authentication on, and for whom."""
        if not self.auth_required:
            where = f" (no accounts in {self.credentials.path})" if self.credentials else ""
            if self.allow_anonymous is False:
                return f"authentication off{where}: clients must give a username, any is accepted"
            return f"authentication off{where}: every client may publish and read everything"
        assert self.credentials is not None
        roles = Counter(a.role for a in self.credentials.accounts.values())
        counts = ", ".join(f"{n} {r}{'s' if n != 1 else ''}" for r, n in sorted(roles.items()))
        anon = ("anonymous clients may read presence" if self.allow_anonymous
                else "anonymous clients refused")
        return f"authentication on ({counts} from {self.credentials.path}); {anon}"

    def note(self, reason: str, message: str, *args: object) -> None:
        """Count a refusal and log it (at most one line per reason per second)."""
        self.refused[reason] += 1
        self._logs.warn(reason, message, *args)

    # connect ----------------------------------------------------------------------------------
    def _grant(self, account: Account) -> Grant:
        grant = self._grants.get(account.username)
        if grant is None:
            grant = self._grants[account.username] = grant_for(account, self.prefix)
        return grant

    async def _password_ok(self, account: Account, password: str) -> bool:
        digest = hmac.new(self._cache_key, password.encode(), "sha256").digest()
        cached = self._verified.get(account.username)
        if cached is not None and cached[0] == account.password_hash:
            return hmac.compare_digest(cached[1], digest)
        if self._verify_lock is None:
            self._verify_lock = asyncio.Lock()
        # One PBKDF2 at a time, off the loop: a flood of bad logins costs one core at most
        # and cannot stall message handling.
        async with self._verify_lock:
            ok = await asyncio.to_thread(verify_password, password, account.password_hash)
        if ok:
            self._verified[account.username] = (account.password_hash, digest)
        return ok

    async def admit(self, username: str | None, password: str | bytes | None,
                    will_topic: str | None, *, client: str = "?") -> Verdict:
        """Decide on one CONNECT. Logs and counts every refusal; never logs a password."""
        self.refresh()
        if will_topic is not None and (
            not will_topic or "+" in will_topic or "#" in will_topic
            or will_topic.startswith("$") or "\x00" in will_topic
        ):
            # [MQTT-3.3.2-2]: a will is published, so its topic may hold no wildcard; amqtt
            # would otherwise broadcast it as if it were a topic name
            self.note("bad_will", "refused client %s: invalid will topic %r", client,
                      will_topic[:200])
            return Verdict(None, "bad_will", CONNACK_NOT_AUTHORIZED)
        if not self.auth_required:
            if self.allow_anonymous is False and not username:
                self.note("anonymous", "refused client %s: no username", client)
                return Verdict(None, "anonymous", CONNACK_NOT_AUTHORIZED)
            return Verdict(OPEN_GRANT, username=username)
        assert self.credentials is not None
        if username is None or username == "":
            if not self.allow_anonymous:
                self.note("anonymous", "refused client %s: no username (accounts are "
                          "configured; anonymous access is off)", client)
                return Verdict(None, "anonymous", CONNACK_NOT_AUTHORIZED)
            grant = grant_for(None, self.prefix)
        else:
            account = self.credentials.get(username)
            if account is None:
                self.note("unknown_user", "refused client %s: unknown user %r", client,
                          username[:80])
                return Verdict(None, "unknown_user", CONNACK_BAD_CREDENTIALS)
            if isinstance(password, bytes):
                password = password.decode("utf-8", "replace")
            if not password or not await self._password_ok(account, password):
                self.note("bad_password", "refused client %s: wrong password for %s", client,
                          username)
                return Verdict(None, "bad_password", CONNACK_BAD_CREDENTIALS)
            grant = self._grant(account)
        if will_topic is not None and not grant.may_publish(will_topic):
            self.note("forbidden_will", "refused client %s (%s): its will topic %r is not its "
                      "own; %s", client, grant.who, will_topic[:200], _allowed(grant))
            return Verdict(None, "forbidden_will", CONNACK_NOT_AUTHORIZED)
        return Verdict(grant, username=username or None)

    # per message ------------------------------------------------------------------------------
    def allowed(self, grant: Grant | None, topic: str, action: Action, client: str) -> bool:
        """The topic check for amqtt's three actions; denials are counted and logged."""
        if grant is None:  # a session we never admitted (e.g. made by another plugin)
            self.note("no_grant", "client %s has no grant: %s on %r refused", client, action,
                      topic[:200])
            return False
        if grant.everything:
            return True
        if action == Action.PUBLISH:
            if grant.may_publish(topic):
                return True
            self.note("forbidden_publish", "dropped a publish of client %s (%s) to %r: not its "
                      "topic; %s", client, grant.who, topic[:200], _allowed(grant))
        elif action == Action.RECEIVE:
            if grant.may_receive(topic):
                return True
            # expected while a session holds a wider subscription: count, log once a second
            self.note("forbidden_receive", "withheld %r from client %s (%s)", topic[:200],
                      client, grant.who)
        elif action == Action.SUBSCRIBE:
            if grant.may_subscribe(topic):
                return True
            self.note("forbidden_subscribe", "refused a subscription of client %s (%s) to %r",
                      client, grant.who, topic[:200])
        return False


def _allowed(grant: Grant) -> str:
    """What an account may publish to, for a refusal's log line: a device account used with
    the wrong ``--device`` gets a bare "not authorized", and this line is where an operator
    sees which identity the account allows."""
    if not grant.publish:
        return "it may publish nothing (a read-only account)"
    return f"it may publish only to {', '.join(grant.publish)}"


def listen_policy_error(hosts: Iterable[str], policy: AccessPolicy) -> str | None:
    """Why the broker must not listen on ``hosts``, or None if it may.

    Mosquitto 2.0's rule: with no accounts, the broker is reachable from this machine only,
    unless anonymous access was asked for in so many words.
    """
    if policy.auth_required or policy.allow_anonymous is True:
        return None
    for host in hosts:
        if not is_loopback(host):
            return (f"refusing to listen on {host}: no accounts are configured, so anyone who "
                    "can reach it could publish presence for any user; add accounts with "
                    "'presence-hub users add USER DEVICE', or pass --allow-anonymous to accept that")
    return None


