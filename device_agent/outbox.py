"""The on-disk outbox: QoS 1 messages wait here until the broker has acknowledged them.

Why SQLite (stdlib ``sqlite3``) and not a JSON-lines file: two processes write the outbox at
once (the running ``presence-agent`` daemon and a ``presence-agent activity`` call from a
script), and the daemon deletes delivered rows while others append. SQLite gives that
multi-process locking, crash safety (WAL with ``synchronous=FULL`` fsyncs every commit) and
compaction for free, where a JSON-lines file would need our own locking and rewrite protocol.

Rules that make delivery "in order, none lost":

* A row is appended (and fsynced) *before* anything is sent; ids only grow (``AUTOINCREMENT``
  never reuses an id), so id order is recording order, across processes.
* The agent publishes rows in id order and deletes a row only when its PUBACK arrived.
* After a disconnect every row still here is sent again on the next connection, in order.
  A row whose PUBACK was lost with the connection is therefore sent twice: QoS 1 is
  at-least-once, and the hub tolerates repeats.

The outbox remembers whose it is (``user/device``) and refuses to be shared by two identities,
because its rows carry no topic: the agent that delivers them decides where they go.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from .errors import ConfigError

#: How many of the device's last session ids the outbox remembers (see ``remember_session``).
RECENT_SESSIONS = 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    created INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    kind: str
    payload: bytes
    created_ms: int


class Outbox:
    """One SQLite file shared by every process that acts for one user and device.

    Thread-safe: one connection guarded by a lock (the agent touches it from its network
    thread and from whatever thread calls ``record_activity``).
    """

    def __init__(self, path: Path, owner: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.owner = owner
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(
                path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open outbox {path}: {exc}") from None
        try:
            self._setup()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ConfigError(f"outbox {path} is not usable: {exc}") from None
        self._data_version = self._pragma_int("data_version")

    def _setup(self) -> None:
        db = self._db
        db.execute("PRAGMA synchronous = FULL")
        if self._read_owner() == self.owner:
            return  # already set up: open without writing, other processes see no change
        # auto_vacuum must be chosen before the first table exists; harmless afterwards.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key = 'owner'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('owner', ?)", (self.owner,))
            elif row[0] != self.owner:
                raise ConfigError(
                    f"outbox {self.path} belongs to {row[0]}, not {self.owner}:"
                    " give each user/device its own outbox"
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _read_owner(self) -> str | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'owner'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet: a new file
            return None
        return None if row is None else str(row[0])

    def _pragma_int(self, name: str) -> int:
        row = self._db.execute(f"PRAGMA {name}").fetchone()
        return int(row[0])

    # -- writing ------------------------------------------------------------------------------
    def add(self, kind: str, payload: bytes, created_ms: int | None = None) -> int:
        """Append one message; when this returns, it is on disk (fsynced)."""
        created = created_ms if created_ms is not None else int(time.time() * 1000)
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO outbox (kind, payload, created) VALUES (?, ?, ?)",
                (kind, payload, created),
            )
            rowid = cursor.lastrowid
        assert rowid is not None
        return rowid

    def remove(self, ids: Iterable[int]) -> None:
        """Forget delivered rows; the file shrinks once it is empty again."""
        batch = [(i,) for i in ids]
        if not batch:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM outbox WHERE id = ?", batch)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            left = self._db.execute("SELECT EXISTS (SELECT 1 FROM outbox)").fetchone()[0]
            if not left:
                self._db.execute("PRAGMA incremental_vacuum").fetchall()

    # -- the device's recent sessions -------------------------------------------------------
    def remember_session(self, session: str, keep: int = RECENT_SESSIONS) -> None:
        """Note a session id this device's agent is about to use (the last ``keep`` stay).

        Why here: an agent restarted after a crash must know its predecessor's session. The
        broker may still hold the dead connection's retained birth until it notices the loss
        (up to 1.5 x keepalive), and that birth is not "another agent" but this device's own
        past. The outbox is the one file every agent of this user and device has.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT value FROM meta WHERE key = 'recent_sessions'").fetchone()
                recent = [s for s in (str(row[0]).split(",") if row else []) if s and s != session]
                recent = [*recent, session][-keep:]
                self._db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('recent_sessions', ?)",
                    (",".join(recent),),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def recent_sessions(self) -> list[str]:
        """The sessions :meth:`remember_session` noted, oldest first."""
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM meta WHERE key = 'recent_sessions'").fetchone()
        return [s for s in str(row[0]).split(",") if s] if row else []

    # -- reading ------------------------------------------------------------------------------
    def pending(self, after: int = 0, limit: int = 100) -> list[OutboxEntry]:
        """Rows with an id above ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, payload, created FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [OutboxEntry(int(r[0]), str(r[1]), bytes(r[2]), int(r[3])) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def changed_by_others(self) -> bool:
        """True once after another process (or connection) committed to the file.

        ``PRAGMA data_version`` is a cheap counter that only other connections' commits move
        (never our own), so the agent can poll it every fraction of a second to notice rows
        that ``presence-agent activity`` appended.
        """
        with self._lock:
            version = self._pragma_int("data_version")
            if version == self._data_version:
                return False
            self._data_version = version
            return True

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
