"""One small interface for every store, and the in-memory store.

The engine owns live state; a store only keeps what survives a restart. The service hands it
*batches* (dirty users and new activity once per flush period, and at shutdown), never one
write per heartbeat: TinyDB rewrites its whole file on every write, and Redis round trips add
up, so the batch is the unit of I/O for every store.

Activity logs are bounded per user by count and by age, and read newest first.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from hub.models import Activity, UserRecord

DEFAULT_ACTIVITY_LIMIT = 1000
DEFAULT_ACTIVITY_MAX_AGE_MS = 7 * 24 * 3600 * 1000


class StoreError(Exception):
    """A store could not be opened or written; the message says which file or URL and why."""


@dataclass(frozen=True, slots=True)
class ActivityLimits:
    """Per-user bound of the activity log: at most ``max_entries`` and none older than ``max_age_ms``."""

    max_entries: int = DEFAULT_ACTIVITY_LIMIT
    max_age_ms: int = DEFAULT_ACTIVITY_MAX_AGE_MS


@runtime_checkable
class Store(Protocol):
    """What the service needs from persistence. All methods are batch-shaped and async.

    A store may set ``keeps_users = False`` (read with a default of True): the service then
    does not build user records for :meth:`save_users` at all (see :class:`MemoryStore`).
    """

    async def open(self) -> None:
        """Connect or open files; raise :class:`StoreError` with an actionable message."""

    async def close(self) -> None:
        """Make everything written so far durable and release resources."""

    async def flush(self) -> None:
        """Make everything written so far durable (a store may buffer activity until then)."""

    async def load_users(self) -> list[UserRecord]:
        """Every persisted user, with devices."""

    async def save_users(self, users: Sequence[UserRecord]) -> None:
        """Upsert whole user records (devices not listed in a record are removed)."""

    async def delete_user(self, user_id: str) -> None:
        """Forget a user, its devices and its activity."""

    async def append_activity(self, user_id: str, entries: Sequence[Activity], now: int) -> None:
        """Append in order; then drop what is over the count limit or older than the age limit."""

    async def get_activity(
        self, user_id: str, limit: int | None = None, since: int | None = None
    ) -> list[Activity]:
        """Newest first; ``since`` keeps entries whose ``timestamp`` >= since."""


class MemoryStore:
    """Keeps everything in process memory: the default for tests and embedded chat bots.

    ``keep_users=False`` keeps activity only: what :func:`open_store` builds for
    ``storage="memory"``. Such a store is made with its service and dies with it, so it is
    never read back, and a copy of every user beside the engine's own state was pure cost
    (~120 bytes a device, zlib'ed). A ``MemoryStore()`` handed to several services in turn
    (tests, a restart in one process) keeps users, so the next one loads them.
    """

    def __init__(self, limits: ActivityLimits | None = None, *, keep_users: bool = True) -> None:
        self.limits = limits or ActivityLimits()
        #: the service reads it to skip building records nobody keeps (Store protocol)
        self.keeps_users = keep_users
        # compact JSON, not model objects: a deep-copied record costs ~1.5 KB per device in
        # objects, its JSON a few hundred bytes (measured), and a copy is what isolation needs;
        # zlib (level 1, ~5 us a user per flush) halves that again: 449 -> 203 bytes a user
        self._users: dict[str, bytes] = {}
        self._activity: dict[str, deque[Activity]] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def load_users(self) -> list[UserRecord]:
        return [UserRecord.model_validate_json(zlib.decompress(raw)) for raw in self._users.values()]

    async def save_users(self, users: Sequence[UserRecord]) -> None:
        if not self.keeps_users:
            return
        for user in users:
            doc = user.model_dump_json(by_alias=True, exclude_defaults=True).encode()
            self._users[user.id] = zlib.compress(doc, 1)

    async def delete_user(self, user_id: str) -> None:
        self._users.pop(user_id, None)
        self._activity.pop(user_id, None)

    async def append_activity(self, user_id: str, entries: Sequence[Activity], now: int) -> None:
        log = self._activity.get(user_id)
        if log is None:
            log = self._activity[user_id] = deque(maxlen=self.limits.max_entries)
        log.extend(entries)
        cutoff = now - self.limits.max_age_ms
        while log and log[0].received_at < cutoff:
            log.popleft()

    async def get_activity(
        self, user_id: str, limit: int | None = None, since: int | None = None
    ) -> list[Activity]:
        return select_activity(reversed(self._activity.get(user_id, ())), limit, since)


def select_activity(
    newest_first: Iterable[Activity], limit: int | None, since: int | None
) -> list[Activity]:
    """Apply ``limit``/``since`` to an iterable of entries already ordered newest first.

    Shared by every store so the query means the same everywhere.
    """
    out: list[Activity] = []
    if limit is not None and limit <= 0:
        return out
    for entry in newest_first:
        if since is not None and entry.timestamp < since:
            continue
        out.append(entry)
        if limit is not None and len(out) >= limit:
            break
    return out


StoreKind = Literal["memory", "tinydb", "redis"]
STORE_KINDS: tuple[StoreKind, ...] = ("memory", "tinydb", "redis")


def open_store(
    kind: str,
    *,
    db_path: str | os.PathLike[str] | None = None,
    redis_url: str | None = None,
    limits: ActivityLimits | None = None,
    namespace: str = "presence",
) -> Store:
    """Build the store named by ``kind``; the caller still awaits ``store.open()``.

    The TinyDB and Redis modules are imported here, not at the top, so ``redis`` stays an
    optional extra and a memory-only user never imports either.
    """
    if kind == "memory":
        return MemoryStore(limits, keep_users=False)
    if kind == "tinydb":
        if db_path is None:
            raise StoreError("storage 'tinydb' needs a database file path (--db)")
        from hub.store_tinydb import TinyDBStore

        return TinyDBStore(db_path, limits)
    if kind == "redis":
        if not redis_url:
            raise StoreError("storage 'redis' needs a Redis URL (--redis-url)")
        try:
            from hub.store_redis import RedisStore
        except ImportError as exc:
            raise StoreError(
                f"storage 'redis' needs the redis package ({exc}): "
                "pip install 'mqtt-presence[redis]'"
            ) from exc
        return RedisStore(redis_url, limits, namespace=namespace)
    raise StoreError(f"unknown storage {kind!r}: choose one of {', '.join(STORE_KINDS)}")
