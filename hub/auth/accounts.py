"""Accounts: three roles, passwords kept as Mosquitto's ``$7$`` hash, one credentials file.

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
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from hub.protocol import is_valid_id, validate_id

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


