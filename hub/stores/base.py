"""One small interface for every store, and what every store shares.

The engine owns live state; a store only keeps what survives a restart. The service hands it
*batches* (dirty users and new activity once per flush period, and at shutdown), never one
write per heartbeat: TinyDB rewrites its whole file on every write, and Redis round trips add
up, so the batch is the unit of I/O for every store.

Activity logs are bounded per user by count and by age, and read newest first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from hub.core.models import Activity, UserRecord

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
