"""The in-memory store: activity only, for the in-process API and tests."""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Sequence

from hub.core.models import Activity, StoredUser, UserRecord
from hub.stores.base import ActivityLimits, select_activity


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

    async def save_users(self, users: Sequence[StoredUser]) -> None:
        if not self.keeps_users:
            return
        for stored in users:
            user = stored.record()
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

    async def swap_clean_stop(self, clean: bool) -> bool:
        was, self._clean = getattr(self, "_clean", True), clean
        return was
