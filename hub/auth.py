"""Who may use the hub's MQTT broker, and for what: accounts, topic grants, amqtt plugins.

Why this module: presence is personal data and its topics decide state. Without it anyone who
reaches the broker can set another user's status (publish ``P/devices/alice/...``), read who is
home, or forge the hub's own retained topics. The rules here are written once and used three
ways: by the embedded broker (as amqtt plugins), by the hub as a second check on every message
handed to it, and as the ``password_file``/``acl_file`` a Mosquitto broker reads.

**Accounts** live in ``credentials.json`` beside the store (mode 0600, replaced atomically).
Passwords are kept only as Mosquitto's ``$7$`` hash (PBKDF2-HMAC-SHA512), so exporting to
Mosquitto is copying strings. Three roles:

* ``device``: username ``USER/DEVICE`` (a slash never appears in an id, so the name is
  unambiguous). Publishes only ``P/devices/USER/DEVICE/+`` (its will included, checked at
  CONNECT); reads only ``P/users/USER/+``, ``P/events/USER``, ``P/replies/USER/DEVICE`` and
  ``P/hub/status``. ``who`` and the other commands go through req/reply, so that is all.
* ``hub``: the hub's own account on an external broker; reads and writes all of ``P/#``.
* ``watcher``: read-only dashboards (Home Assistant, Node-RED): ``P/users/#``,
  ``P/events/#`` and ``P/hub/status``. Anonymous clients get this grant when anonymous
  access is allowed while accounts exist.

With no account at all the broker is open (everyone may do everything), which is why it then
listens on loopback only unless told otherwise (:func:`listen_policy_error`).

**Grants** are lists of topic filters. Subscribing needs the *whole* filter to lie within one
readable filter (``a/#`` is not within ``a/+``: amqtt's own ACL plugin got that wrong), and
every message is checked again when it is delivered, retained ones included, so a session
that somehow holds a wider subscription still receives only what its grant allows.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from hub.protocol import is_valid_id, validate_id, validate_prefix

log = logging.getLogger(__name__)

Role = Literal["device", "hub", "watcher"]
ROLES: Final[tuple[str, ...]] = ("device", "hub", "watcher")
DEFAULT_HUB_ACCOUNT: Final = "presence-hub"
CREDENTIALS_FILE: Final = "credentials.json"

#: PBKDF2 rounds for new hashes. Measured on the 2-core dev box: 101 (mosquitto_passwd's own
#: default) 0.3 ms, 10k 13 ms, 60k 77 ms, 100k 127 ms; a Raspberry Pi is ~5x slower. 60k keeps
#: a connect well under a second on a Pi while making a leaked file slow to attack; it is
#: checked once per connection (and cached for reconnects), never per message.
PBKDF2_ITERATIONS: Final = 60_000
_SALT_BYTES: Final = 12
_HASH_PREFIX: Final = "$7$"

#: MQTT CONNACK return codes (3.1.1) used for refusals.
CONNACK_IDENTIFIER_REJECTED: Final = 2
CONNACK_BAD_CREDENTIALS: Final = 4
CONNACK_NOT_AUTHORIZED: Final = 5

#: Keys of amqtt ``Session.attributes`` we own.
GRANT_KEY: Final = "hub.grant"
VERDICT_KEY: Final = "hub.verdict"


class CredentialsError(Exception):
    """The credentials file cannot be used (unreadable, malformed) or a change was refused."""


# ------------------------------------------------------------------------------------------
# Passwords


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS,
                  salt: bytes | None = None) -> str:
    """Mosquitto's ``$7$ITERATIONS$SALT$HASH`` (PBKDF2-HMAC-SHA512, standard base64)."""
    if not password:
        raise CredentialsError("empty password")
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return (f"{_HASH_PREFIX}{iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def _split_hash(encoded: str) -> tuple[int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        raise ValueError("not a $7$ (PBKDF2-SHA512) hash")
    iterations = int(parts[2])
    if not 1 <= iterations <= 10_000_000:
        raise ValueError("iteration count out of range")
    return iterations, base64.b64decode(parts[3], validate=True), base64.b64decode(
        parts[4], validate=True)


def check_hash(encoded: str) -> str:
    """``encoded`` if it is a usable ``$7$`` hash, else :class:`ValueError`."""
    try:
        _split_hash(encoded)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"bad password hash: {exc}") from None
    return encoded


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against a ``$7$`` hash; False for a broken hash."""
    try:
        iterations, salt, expected = _split_hash(encoded)
    except (ValueError, binascii.Error):
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)


def generate_password() -> str:
    """A random password for a new account: 144 bits, URL-safe (fits a broker URL as is)."""
    return secrets.token_urlsafe(18)


# ------------------------------------------------------------------------------------------
# Accounts and the credentials file


def device_username(user: str, device: str) -> str:
    """The MQTT username of one device: ``USER/DEVICE``."""
    return f"{validate_id(user, 'user id')}/{validate_id(device, 'device id')}"


@dataclass(frozen=True, slots=True)
class Account:
    """One login. Never holds a password, only its hash (left out of ``repr``)."""

    username: str
    role: Role
    password_hash: str = field(repr=False)
    created: int = 0  # ms since the epoch

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}: use one of {', '.join(ROLES)}")
        parts = self.username.split("/")
        if self.role == "device":
            if len(parts) != 2 or not all(is_valid_id(p) for p in parts):
                raise ValueError(f"device account {self.username[:80]!r} is not USER/DEVICE")
        elif not is_valid_id(self.username):
            raise ValueError(f"{self.role} account name {self.username[:80]!r} is not an id "
                             "(1-64 characters from A-Z a-z 0-9 _ . -)")
        check_hash(self.password_hash)

    @property
    def user(self) -> str | None:
        return self.username.split("/")[0] if self.role == "device" else None

    @property
    def device(self) -> str | None:
        return self.username.split("/")[1] if self.role == "device" else None

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "hash": self.password_hash, "created": self.created}


def default_credentials_path(db_path: str | os.PathLike[str]) -> Path:
    """``credentials.json`` in the folder of the store file (``--db``)."""
    return Path(db_path).parent / CREDENTIALS_FILE


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize read-modify-write of the file between ``presence-hub users`` processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_private_file(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename) with ``mode``.

    The temporary file is created with ``mode`` from the start, so the secret is never
    readable by others, not even for a moment; a crash leaves the old file or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it further
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CredentialStore:
    """The accounts in one JSON file; re-read when the file changes (checked at each CONNECT).

    File format (version 1)::

        {"version": 1, "accounts": {"alice/phone": {"role": "device", "hash": "$7$...",
                                                    "created": 1732900000000}, ...}}

    A file that exists but cannot be read or parsed is an error, never "no accounts": a
    broken file must not silently turn authentication off.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._accounts: dict[str, Account] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.load()

    # reading ----------------------------------------------------------------------------------
    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> dict[str, Account]:
        """(Re)read the file now; raise :class:`CredentialsError` if it is unusable."""
        stamp = self._stat()
        self._accounts = self._read() if stamp is not None else {}
        self._stamp = stamp
        return dict(self._accounts)

    def _read(self) -> dict[str, Account]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CredentialsError(f"cannot read credentials file {self.path}: {exc}") from None
        if not isinstance(raw, dict) or raw.get("version") != 1 or not isinstance(
                raw.get("accounts"), dict):
            raise CredentialsError(f"credentials file {self.path} is not a version 1 "
                                   "credentials file")
        accounts: dict[str, Account] = {}
        for username, entry in raw["accounts"].items():
            try:
                if not isinstance(entry, dict):
                    raise ValueError("entry is not an object")
                created = entry.get("created", 0)
                role = entry.get("role")
                if role not in ROLES:
                    raise ValueError(f"unknown role {role!r}")
                accounts[username] = Account(
                    username=username, role=role, password_hash=str(entry.get("hash")),
                    created=created if isinstance(created, int) else 0,
                )
            except (ValueError, TypeError) as exc:
                raise CredentialsError(
                    f"credentials file {self.path}: account {username[:80]!r}: {exc}") from None
        mode = self.path.stat().st_mode & 0o077
        if mode:
            log.warning("credentials file %s is readable by other users (mode %o): "
                        "chmod 600 it", self.path, self.path.stat().st_mode & 0o777)
        return accounts

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; True if it was re-read.

        A change that cannot be read keeps the accounts we have (logged): the running broker
        neither opens up nor locks everyone out because of a half-edited file.
        """
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        try:
            self._accounts = self._read() if stamp is not None else {}
        except CredentialsError as exc:
            log.error("%s; keeping the %d accounts loaded before", exc, len(self._accounts))
        self._stamp = stamp
        log.info("credentials reloaded from %s: %d accounts", self.path, len(self._accounts))
        return True

    @property
    def accounts(self) -> Mapping[str, Account]:
        return self._accounts

    def get(self, username: str) -> Account | None:
        return self._accounts.get(username)

    def __len__(self) -> int:
        return len(self._accounts)

    # changing ---------------------------------------------------------------------------------
    def _save(self, accounts: Mapping[str, Account]) -> None:
        body = {"version": 1, "accounts": {
            name: accounts[name].to_json() for name in sorted(accounts)}}
        write_private_file(self.path, json.dumps(body, indent=2) + "\n")
        self._accounts = dict(accounts)
        self._stamp = self._stat()

    def put(self, username: str, role: Role, password: str, *,
            iterations: int = PBKDF2_ITERATIONS) -> bool:
        """Add an account, or set a new password on an existing one of the same role.

        Returns True if the account is new. The password is hashed here and forgotten.
        """
        with _locked(self.path):
            accounts = self._read()
            old = accounts.get(username)
            if old is not None and old.role != role:
                raise CredentialsError(
                    f"{username} is already a {old.role} account; remove it first")
            try:
                account = Account(username, role, hash_password(password, iterations=iterations),
                                  old.created if old else int(time.time() * 1000))
            except ValueError as exc:
                raise CredentialsError(str(exc)) from None
            accounts[username] = account
            self._save(accounts)
            return old is None

    def remove(self, username: str) -> Account:
        with _locked(self.path):
            accounts = self._read()
            gone = accounts.pop(username, None)
            if gone is None:
                raise CredentialsError(f"no account {username!r} in {self.path}")
            self._save(accounts)
            return gone


# ------------------------------------------------------------------------------------------
# Topic filters


def _levels(text: str) -> tuple[str, ...]:
    return tuple(text.split("/"))


def _matches(topic: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Does the topic (levels) match the filter (levels)? MQTT 3.1.1 section 4.7."""
    if topic and topic[0][:1] == "$" and pattern and pattern[0] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    n = len(topic)
    for i, level in enumerate(pattern):
        if level == "#":
            return True  # "a/#" matches "a" too
        if i >= n or (level != "+" and level != topic[i]):
            return False
    return n == len(pattern)


def topic_matches(topic: str, topic_filter: str) -> bool:
    return _matches(_levels(topic), _levels(topic_filter))


def _within(inner: tuple[str, ...], outer: tuple[str, ...]) -> bool:
    """Is every topic matched by filter ``inner`` also matched by filter ``outer``?"""
    if inner and inner[0][:1] == "$" and outer and outer[0] in ("+", "#"):
        return False
    n = len(inner)
    for i, level in enumerate(outer):
        if level == "#":
            return True
        if i >= n:
            return False
        mine = inner[i]
        if mine == "#":
            return False  # inner reaches any depth; outer stops here
        if level == "+":
            continue  # a literal or '+' level in inner both fit
        if mine != level:  # includes mine == "+" under a literal level
            return False
    return n == len(outer)


def filter_within(inner: str, outer: str) -> bool:
    """``cmd/dev1/+`` is within ``cmd/dev1/#``; ``cmd/dev1/#`` is *not* within ``cmd/dev1/+``."""
    return _within(_levels(inner), _levels(outer))


def _compile(topic_filter: str) -> Callable[[str], bool]:
    """A matcher for one filter. The shapes grants use (exact, ``X/+``, ``X/#``) become a
    string comparison or two, ~10x cheaper than splitting topics (measured), and this runs for
    every publish and every delivery."""
    head, _, last = topic_filter.rpartition("/")
    if head and "+" not in head and "#" not in head and not head.startswith("$"):
        if last == "+":
            prefix = head + "/"
            cut = len(prefix)
            return lambda t: t.startswith(prefix) and "/" not in t[cut:]
        if last == "#":
            prefix = head + "/"
            return lambda t: t == head or t.startswith(prefix)
        if "+" not in last and "#" not in last:
            return topic_filter.__eq__
    levels = _levels(topic_filter)
    return lambda t: _matches(_levels(t), levels)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one connection may do: filters it may publish to and read from.

    ``everything`` is the open broker (no accounts configured). Matchers are compiled once
    here, so a check costs a few string comparisons.
    """

    who: str
    publish: tuple[str, ...] = ()
    read: tuple[str, ...] = ()
    everything: bool = False
    _pub: tuple[Callable[[str], bool], ...] = field(default=(), repr=False, compare=False)
    _read: tuple[Callable[[str], bool], ...] = field(default=(), repr=False, compare=False)
    _read_levels: tuple[tuple[str, ...], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pub", tuple(_compile(f) for f in self.publish))
        object.__setattr__(self, "_read", tuple(_compile(f) for f in self.read))
        object.__setattr__(self, "_read_levels", tuple(_levels(f) for f in self.read))

    def may_publish(self, topic: str) -> bool:
        if self.everything:
            return True
        for match in self._pub:  # noqa: SIM110 - a loop, not any(): on every message
            if match(topic):
                return True
        return False

    def may_receive(self, topic: str) -> bool:
        if self.everything:
            return True
        for match in self._read:  # noqa: SIM110 - a loop, not any(): on every message
            if match(topic):
                return True
        return False

    def may_subscribe(self, topic_filter: str) -> bool:
        if self.everything:
            return True
        levels = _levels(topic_filter)
        return any(_within(levels, f) for f in self._read_levels)


OPEN_GRANT: Final = Grant("anyone (no accounts configured)", everything=True)


def grant_for(account: Account | None, prefix: str) -> Grant:
    """The grant of an account; ``None`` is an anonymous client while accounts exist."""
    p = validate_prefix(prefix)
    watch = (f"{p}/users/#", f"{p}/events/#", f"{p}/hub/status")
    if account is None:
        return Grant("anonymous", read=watch)
    if account.role == "hub":
        return Grant(f"hub {account.username}", publish=(f"{p}/#",), read=(f"{p}/#",))
    if account.role == "watcher":
        return Grant(f"watcher {account.username}", read=watch)
    user, device = account.user, account.device
    return Grant(
        f"device {account.username}",
        publish=(f"{p}/devices/{user}/{device}/+",),
        read=(f"{p}/users/{user}/+", f"{p}/events/{user}", f"{p}/replies/{user}/{device}",
              f"{p}/hub/status"),
    )


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
                      "own", client, grant.who, will_topic[:200])
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
                      "topic", client, grant.who, topic[:200])
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


# ------------------------------------------------------------------------------------------
# amqtt plugins


class HubAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt authentication through an :class:`AccessPolicy` (config: ``{"policy": policy}``).

    Besides the yes/no amqtt asks for, it leaves the :class:`Verdict` in the session's
    attributes: the broker uses it for the CONNACK code and the grant for topic checks.
    """

    @dataclass
    class Config:
        policy: Any = None

    async def authenticate(self, *, session: Any) -> bool:
        policy: AccessPolicy = self.config.policy
        will = session.will_topic if session.will_flag else None
        verdict = await policy.admit(
            session.username, session.password, will,
            client=f"{session.client_id} from {session.remote_address}",
        )
        session.attributes[VERDICT_KEY] = verdict
        if verdict.grant is not None:
            session.attributes[GRANT_KEY] = verdict.grant
        return verdict.ok


class HubTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """amqtt topic checks (publish, subscribe, receive) from the session's :class:`Grant`.

    :meth:`check` is synchronous so the broker can call it without a task per message (amqtt's
    plugin manager wraps every call in a task: ~20 us each, measured, on every delivery).
    """

    @dataclass
    class Config:
        policy: Any = None

    def check(self, session: Any, topic: str | None, action: Action) -> bool:
        policy: AccessPolicy = self.config.policy
        if session is None:
            return True  # the broker's own messages (the hub's)
        if not topic:
            return False
        return policy.allowed(session.attributes.get(GRANT_KEY), topic, action,
                              str(session.client_id))

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        if action is None:
            return False
        return self.check(session, topic, action)


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


__all__ = [
    "DEFAULT_HUB_ACCOUNT",
    "OPEN_GRANT",
    "PBKDF2_ITERATIONS",
    "AccessPolicy",
    "Account",
    "CredentialStore",
    "CredentialsError",
    "Grant",
    "HubAuthPlugin",
    "HubTopicPlugin",
    "Role",
    "Verdict",
    "check_hash",
    "default_credentials_path",
    "device_username",
    "filter_within",
    "generate_password",
    "grant_for",
    "hash_password",
    "is_loopback",
    "listen_policy_error",
    "mosquitto_acl_file",
    "mosquitto_password_file",
    "topic_matches",
    "verify_password",
    "write_private_file",
]
