"""One small interface for every store, and what every store shares.

The engine owns live state; a store only keeps what survives a restart. The service hands it
*batches* (dirty users and new activity once per flush period, and at shutdown), never one
write per heartbeat: TinyDB rewrites its whole file on every write, and Redis round trips add
up, so the batch is the unit of I/O for every store.

Activity logs are bounded per user by count and by age, and read newest first.
"""

from __future__ import annotations

import errno
import itertools
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from hub.core.models import Activity, StoredUser, UserRecord

DEFAULT_ACTIVITY_LIMIT = 1000
DEFAULT_ACTIVITY_MAX_AGE_MS = 7 * 24 * 3600 * 1000


class StoreError(Exception):
    """A store could not be opened or written; the message says which file or URL and why.

    The message is one line meant for the operator's log as it is (no traceback needed): it
    names the file or URL and the cause in plain words, e.g. "the disk is full".
    """


class StoreFenced(StoreError):
    """A write was refused because another hub took the lease over since this one got it.

    Not an outage to retry: this hub is no longer the active one, and every write it would
    make could overwrite the new active hub's state. The service steps down when it sees it.
    """


#: Plain words for the errors an operator can act on; the system's own text follows them.
_OS_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error (a failing disk?)",
}


def os_reason(exc: OSError) -> str:
    """``the disk is full (No space left on device)``: the cause first, then the system's text.

    Both parts, because the plain words say what to do and the system's text is what people
    search for; when there are no plain words for an errno, the system's text alone.
    """
    text = exc.strerror or str(exc)
    plain = _OS_REASONS.get(exc.errno or 0)
    if plain is None or plain.lower() == text.lower():
        return text
    return f"{plain} ({text})"


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

    async def swap_clean_stop(self, clean: bool) -> bool:
        """Durably record whether the hub stopped cleanly (``clean``) and return what was
        recorded before (True for a store that never held a marker).

        The service calls it with False once it has loaded (from then on a crash may leave
        published user versions the store has not seen) and with True after its final flush;
        after a crash the engine starts every user above the versions it may have published
        (see ``UserRecord.version_reserved``).
        """

    async def flush(self) -> None:
        """Make everything written so far durable (a store may buffer activity until then)."""

    async def load_users(self) -> list[UserRecord]:
        """Every persisted user, with devices."""

    async def save_users(self, users: Sequence[StoredUser]) -> None:
        """Upsert whole user records (devices not listed in a record are removed): each a
        ``UserRecord`` or the engine's ``UserDoc`` (``to_json()`` and ``record()`` on both)."""

    async def delete_user(self, user_id: str) -> None:
        """Forget a user, its devices and its activity."""

    async def append_activity(self, user_id: str, entries: Sequence[Activity], now: int) -> None:
        """Append in order; then drop what is over the count limit or older than the age limit."""

    async def get_activity(
        self, user_id: str, limit: int | None = None, since: int | None = None
    ) -> list[Activity]:
        """Newest first; ``since`` keeps entries whose ``timestamp`` >= since."""


def _by_time(entry: Activity) -> int:
    return entry.timestamp


def select_activity(
    entries: Iterable[Activity], limit: int | None, since: int | None
) -> list[Activity]:
    """Apply ``limit``/``since`` to a user's log, newest first by timestamp.

    Shared by every store so the query means the same everywhere. ``since`` filters by the
    entries' timestamps, so the order is by timestamp too (activity replayed from an outbox
    arrives late with its own, older time); entries with the same timestamp keep the order
    they are given in (stores give theirs newest arrival first). A log is bounded (1,000
    entries by default), so sorting it per query is cheap.
    """
    out: list[Activity] = []
    if limit is not None and limit <= 0:
        return out
    for entry in sorted(entries, key=_by_time, reverse=True):
        if since is not None and entry.timestamp < since:
            continue
        out.append(entry)
        if limit is not None and len(out) >= limit:
            break
    return out


class _EntryRef(weakref.ref[Activity]):
    """A weak reference to an entry that also knows the entry's registry key and id."""

    __slots__ = ("entry_id", "key")
    key: int
    entry_id: str


class ActivityIds:
    """One id per activity entry handed to a store, the same id every time it is handed again.

    Why: when a flush fails, the service keeps the batch and hands the *very same* entries
    over at the next flush; a store that took them the first time (TinyDB buffers them before
    its file write fails; Redis may have run an append whose answer timed out) must not keep
    them twice. :class:`~hub.core.models.Activity` carries no id, and its fields cannot make
    one: two identical messages of one device in one millisecond are two entries. So the id
    belongs to the entry *object*, as long as it lives: only a live object can be handed over
    again, and once the caller lets go of it the registry forgets it too (weak references),
    so it holds no more than the caller's own pending batch.

    An id is *taken* once the store certainly keeps the entry; taken entries handed over
    again are skipped by :meth:`fresh`. An entry whose write may or may not have happened (a
    timed-out Redis call) stays untaken, and the store itself skips ids it already holds.

    Ids are unique across processes and restarts: a random 64-bit prefix per registry and a
    counter. Thread-safe where it must be: :meth:`id_of` and :meth:`fresh` are called on the
    event loop, :meth:`take` and :meth:`is_taken` may run on a store's worker thread, and the
    weak-reference callback on whichever thread drops an entry; each touches one dict or set
    operation at a time, which the GIL makes atomic.
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()
        self._refs: dict[int, _EntryRef] = {}
        self._taken: set[str] = set()

    def __len__(self) -> int:
        """How many live entries have an id (tests check that nothing is kept for long)."""
        return len(self._refs)

    def id_of(self, entry: Activity) -> str:
        key = id(entry)
        ref = self._refs.get(key)
        if ref is not None and ref() is entry:
            return ref.entry_id
        ref = _EntryRef(entry, self._forget)
        ref.key = key
        ref.entry_id = f"{self._prefix}-{next(self._counter):x}"
        self._refs[key] = ref
        return ref.entry_id

    def fresh(self, entries: Iterable[Activity]) -> list[tuple[str, Activity]]:
        """``(id, entry)`` for every entry not taken yet, in order."""
        out = []
        for entry in entries:
            entry_id = self.id_of(entry)
            if entry_id not in self._taken:
                out.append((entry_id, entry))
        return out

    def take(self, entry_ids: Iterable[str]) -> None:
        self._taken.update(entry_ids)

    def is_taken(self, entry_id: str) -> bool:
        return entry_id in self._taken

    def _forget(self, ref: weakref.ref[Activity]) -> None:
        assert isinstance(ref, _EntryRef)
        if self._refs.get(ref.key) is ref:
            self._refs.pop(ref.key, None)
        self._taken.discard(ref.entry_id)


class StoreErrorLog:
    """Logs a failing store once per ``interval`` seconds, and once when it works again.

    Why: the service retries a failed flush every second; a line (or a traceback) per retry
    buries everything else in the log during an outage of a few minutes. The first failure is
    logged at once, a changed reason at once, the same reason again only after ``interval``
    with the count of failures in between; the first success after failures says so.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._message: str | None = None
        self._logged_at = 0.0
        self._since_logged = 0
        self._failures = 0

    @property
    def failing(self) -> bool:
        return self._failures > 0

    def failed(self, exc: BaseException) -> None:
        message = str(exc) or type(exc).__name__
        now = self.clock()
        self._failures += 1
        if message != self._message or now - self._logged_at >= self.interval:
            repeated = (
                f" (failed {self._since_logged} more times since the last report)"
                if message == self._message and self._since_logged else ""
            )
            self.logger.error("%s%s; retrying", message, repeated)
            self._message, self._logged_at, self._since_logged = message, now, 0
        else:
            self._since_logged += 1

    def recovered(self) -> None:
        if self._failures:
            self.logger.warning("store writes work again after %d failed attempts",
                                self._failures)
        self._message, self._since_logged, self._failures = None, 0, 0
