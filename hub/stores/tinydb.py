"""The TinyDB store: one JSON file on the edge box, replaced atomically once per batch.

Why it looks the way it does (measured here): a TinyDB file is one JSON document, rewritten
whole on every write, and at a million devices it is 345 MB. Used naively (TinyDB's own tables
of parsed documents), one write per user per flush would be seconds of I/O a second, the parsed
file alone took 1 GB of memory and its validated records 2 GB more, and a restart spent most of
its time parsing, validating and writing it back. So:

* The store keeps every document as its compact JSON *text* (``bytes``), not parsed: a flush
  joins the texts (the file is their concatenation), a changed user is one
  ``model_dump_json``, and only what the store must look into (a user's activity log when
  entries are added or read) is parsed, when it is needed.
* The file is written one document per line (still one JSON document that ``TinyDB(path)``
  reads, see :func:`_layout`), so a restart finds each document's text by splitting lines,
  without parsing the file, and validates users from their text in batches
  (:meth:`TinyDBStore.load_user_batches`): the caller loads a batch into the engine and drops
  its records before the next is made. A file in any other layout (written by an older version,
  or by hand) is parsed whole once, as before, and written in this layout with the next write.
* At start the hub does not even validate most users: a user whose devices are each connected,
  or disconnected and offline, comes as a :class:`~hub.core.models.UserText` (its text,
  checked by one regular expression, with the few fields a restart needs read off it), and
  the engine builds it from the text when it is first needed (see ``Engine.load``). The text
  is the store's own ``bytes``: the engine holds a reference, no copy.
* ``append_activity`` is called once per user per flush, so it only buffers: the entries go to
  the file with the next batch write, after ``activity_write_delay`` seconds at the latest, or at
  :meth:`TinyDBStore.close`. A service that appends first and saves users last gets one file
  write per flush period.
* The file is replaced atomically (temporary file in the same directory, fsync, ``os.replace``,
  fsync of the directory), so a crash at any moment leaves the old or the new complete
  database, never a torn or empty one.
* The clean-stop marker (:meth:`TinyDBStore.swap_clean_stop`) is a file of its own beside the
  database, ``FILE.clean``, replaced atomically the same way: the hub flips it at every start,
  and putting it in the database made that flip a rewrite of the whole file (13 s at 1M
  devices, most of a restart). An older file's marker, in the ``meta`` table, is read when
  there is no ``FILE.clean`` yet.
* A failed write (disk full, read-only file system) changes nothing already taken: the
  database stays in memory, still marked unwritten, and goes to the file with the next write
  that succeeds. Activity handed over again after a failed flush (the service keeps and
  resends its batch) is recognised by :class:`~hub.stores.base.ActivityIds` and kept once.
* Every access to the documents, and the blocking file write, runs on one dedicated worker
  thread. A single worker keeps batches in call order and the tables only ever touched by one
  thread, even when an awaiting caller is cancelled mid-write, which an ``asyncio.Lock`` around
  ``asyncio.to_thread`` would not guarantee.

File contents (a plain TinyDB database that ``TinyDB(path)`` can read): table ``users`` holds one
document per user keyed by the user id (``UserRecord.model_dump_json(by_alias=True)``), table
``activity`` one document ``{"entries": [...]}`` per user, oldest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pydantic_core
from pydantic import ValidationError

from hub.core.models import Activity, StoredUser, UserRecord, UserText
from hub.process import gc_paused
from hub.stores.base import (
    ActivityIds,
    ActivityLimits,
    StoreError,
    StoreErrorLog,
    os_reason,
    select_activity,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

USERS_TABLE = "users"
ACTIVITY_TABLE = "activity"
META_TABLE = "meta"
DEFAULT_ACTIVITY_WRITE_DELAY = 1.0
#: users validated per step of :meth:`TinyDBStore.load_user_batches`: a batch of records
#: (~4 KB each) is freed between long-lived engine objects, so a small one leaves small holes
LOAD_BATCH = 2_000

#: table -> doc id -> the document's compact JSON text
_Tables = dict[str, dict[str, bytes]]

_TABLE_LINE = re.compile(rb'\{?"([^"\\]*)":\{')
#: a key that is its own JSON (every id of ours): written without json.dumps
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-]+").fullmatch


class _Corrupt(Exception):
    """The file's text is not valid JSON; the message is ``json.loads``'s."""


def _layout(tables: _Tables) -> Iterator[bytes]:
    """The file as chunks: one JSON document, one table header or document per line.

    ::

        {"users":{
        "alice":{"schema":1,"id":"alice",...},
        "bob":{...}
        },
        "activity":{
        }}

    Compact JSON never holds a raw line break (one in a string is escaped), so each document
    is one line and :func:`_split_layout` finds them without parsing anything.
    """
    yield b"{"
    first = True
    for name, docs in tables.items():
        yield (b"" if first else b",\n") + _json(name) + b":{\n"
        first = False
        n = len(docs)
        for i, (doc_id, text) in enumerate(docs.items(), 1):
            key = b'"%s"' % doc_id.encode() if _PLAIN_KEY(doc_id) else _json(doc_id)
            yield b"%s:%s%s" % (key, text, b",\n" if i < n else b"\n")
        yield b"}"
    yield b"}\n"


def _split_layout(raw: bytes) -> _Tables | None:
    """The tables of a file written by :func:`_layout`, each document's text as it is there;
    None when the file is laid out any other way (the caller then parses it whole).

    Only the shape is checked here; whether a document's text is JSON is found when it is
    parsed (users: as they are loaded; see :meth:`TinyDBStore._validate`).
    """
    if not raw.startswith(b'{"') or not raw.endswith(b"}}\n"):
        return None
    tables: _Tables = {}
    docs: dict[str, bytes] | None = None
    find = raw.find
    pos, end = 0, len(raw)
    try:
        while pos < end:
            eol = find(b"\n", pos)
            if docs is None:  # a table header: '{"name":{' first, then '"name":{'
                m = _TABLE_LINE.fullmatch(raw, pos, eol)
                if m is None or (pos == 0) != (raw[pos] == 0x7B):
                    return None
                docs = tables.setdefault(m.group(1).decode(), {})
            elif raw[pos] == 0x7D:  # '}': the table ends; '},' another follows, '}}' the last
                line = raw[pos:eol]
                if line == b"}}" and eol == end - 1:
                    return tables
                if line != b"},":
                    return None
                docs = None
            else:  # '"ID":{...}' and a comma unless it is the last document
                colon = find(b'":', pos, eol)
                last = eol - 1 if raw[eol - 1] == 0x2C else eol
                if (raw[pos] != 0x22 or colon < 0 or raw[colon + 2] != 0x7B
                        or raw[last - 1] != 0x7D):
                    return None
                doc_id = raw[pos + 1:colon].decode()
                if '"' in doc_id or "\\" in doc_id:
                    return None
                docs[doc_id] = raw[colon + 2:last]
            pos = eol + 1
    except (UnicodeDecodeError, IndexError):
        return None
    return None


def _parse_json(raw: bytes) -> object:
    """``json.loads(raw)``, faster for what this store writes.

    pydantic's Rust parser (jiter) reads JSON in ~80% of ``json.loads``'s time. It is stricter
    in a few corners ``json.loads`` accepts (a byte-order mark, UTF-16 files, lone surrogate
    escapes), so anything it refuses goes to ``json.loads``: a text parses exactly when it did
    before, and a broken one fails with ``json.loads``'s error.
    """
    try:
        return pydantic_core.from_json(raw)
    except ValueError:
        return json.loads(raw)


def _json(value: object) -> bytes:
    """Compact JSON, UTF-8 as it is; a string with a lone surrogate (only ``json.loads`` of a
    hand-written escape makes one) is written escaped, as it came."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def _is_tinydb_shape(data: object) -> bool:
    """TinyDB itself fails on anything but ``{table: {doc_id: {...}}}``; check before it does."""
    return isinstance(data, dict) and all(
        isinstance(table, dict) and all(isinstance(doc, dict) for doc in table.values())
        for table in data.values()
    )


def _is_json_error(exc: ValidationError) -> bool:
    return any(e["type"] == "json_invalid" for e in exc.errors(include_url=False))


def atomic_write(path: Path, payload: bytes | Iterable[bytes]) -> None:
    """Replace ``path`` by ``payload`` (bytes, or chunks of them written in turn, so a large
    database is never one more copy in memory) so that a crash leaves either the old or the
    new file.

    The data is fsynced before the rename, so the rename never publishes an empty file after
    a power loss; the directory is fsynced after it, so the rename itself is durable.
    """
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            with contextlib.suppress(FileNotFoundError):
                # Keep the permissions a user gave the existing file (mkstemp makes 0600).
                os.fchmod(handle.fileno(), stat.S_IMODE(os.stat(path).st_mode))
            if isinstance(payload, bytes):
                handle.write(payload)
            else:
                handle.writelines(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(dir_fd)


def _temp_files(path: Path) -> list[Path]:
    """Temporary files :func:`atomic_write` leaves behind when a process dies mid-write."""
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def _merge_log(
    existing: Sequence[Mapping[str, Any]],
    new: Sequence[Mapping[str, Any]],
    now: int,
    limits: ActivityLimits,
) -> list[Mapping[str, Any]]:
    """Oldest-first log after appending ``new``, cut to the count and age limits."""
    cutoff = now - limits.max_age_ms
    kept = [e for e in (*existing, *new) if _received_at(e) >= cutoff]
    if limits.max_entries <= 0:
        return []
    return kept[-limits.max_entries :]


def _entries(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A user's stored log; anything but a list of objects (a hand edit) counts as empty."""
    entries = doc.get("entries")
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, Mapping)]


def _received_at(entry: Mapping[str, Any]) -> int:
    value = entry.get("received_at")
    return value if isinstance(value, int) else 0


class TinyDBStore:
    """Users and activity in one TinyDB JSON file; see the module docstring for the design."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        limits: ActivityLimits | None = None,
        *,
        activity_write_delay: float = DEFAULT_ACTIVITY_WRITE_DELAY,
    ) -> None:
        self.path = Path(path)
        self.limits = limits or ActivityLimits()
        self.activity_write_delay = activity_write_delay
        #: the database, every document as its JSON text; None while closed
        self._tables: _Tables | None = None
        self._dirty = False
        self._file_writes = 0
        self._executor: ThreadPoolExecutor | None = None
        # Activity appended but not yet merged into the table: user -> (entries, latest now).
        # Only the worker thread touches it.
        self._pending: dict[str, tuple[list[dict[str, Any]], int]] = {}
        self._timer: asyncio.Task[None] | None = None
        # Entries this store has taken, so one handed over again after a failed flush is
        # skipped rather than appended a second time.
        self._ids = ActivityIds()
        self._timer_errors = StoreErrorLog(log)
        self._lock_fd: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def file_writes(self) -> int:
        """How many times this store has replaced the file (for tests and metrics)."""
        return self._file_writes

    @property
    def marker_path(self) -> Path:
        """The clean-stop marker's own file, beside the database."""
        return self.path.with_name(self.path.name + ".clean")

    async def open(self) -> None:
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinydb-store")
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._open_sync)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor

    async def close(self) -> None:
        if self._executor is None:
            return
        timer, self._timer = self._timer, None
        if timer is not None:
            # Only a timer still sleeping is cancelled; one already writing holds no timer slot.
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
        try:
            await self._run(self._commit_sync)
        finally:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=True)
            self._tables = None
            self._unlock()

    def _open_sync(self) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the directory {path.parent} for the TinyDB file {path}: "
                f"{os_reason(exc)}"
            ) from exc
        if path.is_dir():
            raise StoreError(f"the TinyDB file {path} is a directory")
        if path.exists() and not os.access(path, os.W_OK):
            raise StoreError(f"cannot write the TinyDB file {path}: it is read-only")
        try:
            # A real probe: os.access says nothing about read-only mounts or full quotas.
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StoreError(f"cannot write the TinyDB file {path}: {os_reason(exc)}") from exc
        self._lock()
        try:
            tables = self._read_file()
        except BaseException:
            self._unlock()
            raise
        for stale in _temp_files(path) + _temp_files(self.marker_path):
            # Left by a process killed mid-write; the real file is complete without it.
            log.info("removing %s, left over by an interrupted write", stale)
            with contextlib.suppress(OSError):
                stale.unlink()
        self._tables = tables
        self._dirty = False

    def _lock(self) -> None:
        """Hold an exclusive lock on ``FILE.lock`` while open: a second hub on the same file
        would overwrite this one's writes with its own (each rewrites the whole file), so it
        is refused at start. The kernel drops the lock when the process dies, SIGKILL too,
        so a crash never leaves a stale lock behind."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            # held read-only: a file open for writing would keep its file system from being
            # remounted read-only (the fault tests do that to simulate a failing disk)
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the lock file {lock_path}: {os_reason(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise StoreError(
                f"another process (pid {holder}) uses the TinyDB file {self.path}: two hubs "
                "on one file would overwrite each other's state; stop that one, or give this "
                "one its own --db (two hubs that fail over need --storage redis --standby)"
            ) from None
        self._lock_fd = fd
        with contextlib.suppress(OSError):  # who holds it, for the refusal above
            lock_path.write_text(str(os.getpid()))

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock

    def _read_file(self) -> _Tables:
        path = self.path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreError(f"cannot read the TinyDB file {path}: {os_reason(exc)}") from exc
        tables = _split_layout(raw)
        if tables is not None:
            return tables
        if not raw.strip():
            return {}  # TinyDB's own convention: an empty file is an empty database
        try:
            return self._parse_whole(raw)
        except _Corrupt as exc:
            raise self._corrupt(f"not valid JSON: {exc}") from exc

    def _parse_whole(self, raw: bytes) -> _Tables:
        """The general path, for a file in any other layout: parse it all, keep each
        document's text (written in the store's own layout with the next write)."""
        try:
            with gc_paused():
                data = _parse_json(raw)
        except ValueError as exc:
            raise _Corrupt(str(exc)) from exc
        if not _is_tinydb_shape(data):
            raise self._corrupt("not a TinyDB database: expected an object of tables of objects")
        assert isinstance(data, dict)
        return {str(name): {str(doc_id): _json(doc) for doc_id, doc in table.items()}
                for name, table in data.items()}

    def _corrupt(self, why: str) -> StoreError:
        return StoreError(
            f"the TinyDB file {self.path} is corrupt ({why}); it was left untouched: restore "
            "it from a backup or move it away to start empty"
        )

    def _corrupt_document(self, table: str, doc_id: str) -> StoreError:
        """A document of a file in the store's layout is not JSON (a hand edit): the message
        ``json.loads`` gives for the whole file, as the general path would have refused it."""
        try:
            json.loads(self.path.read_bytes())
        except (ValueError, OSError) as exc:
            return self._corrupt(f"not valid JSON: {exc}")
        return self._corrupt(f"the document {doc_id!r} of table {table!r} is not valid JSON")

    # -- the Store interface ------------------------------------------------------------------

    async def load_users(self) -> list[UserRecord]:
        return [rec async for batch in self.load_user_batches()
                for rec in batch if isinstance(rec, UserRecord)]

    async def load_user_batches(
        self, size: int = LOAD_BATCH, texts: bool = False,
    ) -> AsyncIterator[list[UserRecord | UserText]]:
        """Every user document as a validated record, in file order, ``size`` at a time; bad
        ones are skipped and named in the log (they stay in the file).

        Why batches: the records of a million devices take 2 GB, the engine's own state a
        third of that; a caller that loads each batch and lets go of it before the next one
        never holds more than a batch of records (see :meth:`PresenceService._load`).

        ``texts``: a document whose restart fields :meth:`UserText.read` can read comes as
        that instead, unvalidated (the engine validates it when it builds the user; see
        ``Engine.load``): about half the time of validating a record (10 against 23 us a user
        at a million devices on a slow day), and the engine's part a fifth of what it was.
        """
        ids = await self._run(lambda: list(self._docs(USERS_TABLE)))
        for start in range(0, len(ids), size):
            batch = await self._run(
                functools.partial(self._validate, ids[start:start + size], texts))
            if batch:
                yield batch

    async def save_users(self, users: Sequence[StoredUser]) -> None:
        # Records are dumped on the worker thread, one short call each, so the event loop gets
        # the GIL between them; the engine hands over fresh records it no longer changes.
        batch = list(users)
        await self._run(lambda: self._save_users_sync(batch))

    async def delete_user(self, user_id: str) -> None:
        await self._run(lambda: self._delete_user_sync(user_id))

    async def append_activity(self, user_id: str, entries: Sequence[Activity], now: int) -> None:
        fresh = self._ids.fresh(entries)
        if not fresh:
            return
        docs = [(entry_id, e.model_dump(mode="json")) for entry_id, e in fresh]
        await self._run(lambda: self._append_sync(user_id, docs, now))
        self._schedule_commit()

    async def get_activity(
        self, user_id: str, limit: int | None = None, since: int | None = None
    ) -> list[Activity]:
        return await self._run(lambda: self._get_activity_sync(user_id, limit, since))

    async def flush(self) -> None:
        """Write buffered activity now (the service may call it; close does it anyway)."""
        await self._run(self._commit_sync)

    async def swap_clean_stop(self, clean: bool) -> bool:
        return await self._run(lambda: self._swap_clean_stop_sync(clean))

    def _swap_clean_stop_sync(self, clean: bool) -> bool:
        """``FILE.clean`` holds ``{"clean": BOOL}`` (see the module docstring for why it is
        not in the database); without it, an older version's ``meta`` document says."""
        marker = self.marker_path
        try:
            text: bytes | None = marker.read_bytes()
        except FileNotFoundError:
            text = self._docs(META_TABLE).get("hub")
        except OSError:
            text = b"{}"  # unreadable: assume the worst, which only moves versions ahead
        try:
            doc = _parse_json(text) if text is not None else {"clean": True}
        except ValueError:
            doc = {}
        was = isinstance(doc, dict) and bool(doc.get("clean", False))
        try:
            atomic_write(marker, _json({"clean": clean}))
        except OSError as exc:
            raise StoreError(
                f"cannot write the TinyDB store's marker {marker}: {os_reason(exc)}"
            ) from exc
        return was

    # -- worker-thread side -------------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise StoreError(f"the TinyDB store {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _docs(self, table: str) -> dict[str, bytes]:
        """The table's documents (created empty on first use)."""
        assert self._tables is not None
        docs = self._tables.get(table)
        if docs is None:
            docs = self._tables[table] = {}
        return docs

    def _get_doc(self, table: str, doc_id: str) -> dict[str, Any] | None:
        text = self._docs(table).get(doc_id)
        if text is None:
            return None
        try:
            doc = _parse_json(text)
        except ValueError:
            raise self._corrupt_document(table, doc_id) from None
        return doc if isinstance(doc, dict) else None

    def _validate(self, ids: Iterable[str], texts: bool = False) -> list[UserRecord | UserText]:
        """Records of these users, straight from their JSON text (no dicts in between); a
        document that is not a valid record is skipped and named, and stays in the file.
        With ``texts``, a :class:`UserText` where one can be read (see load_user_batches)."""
        docs = self._docs(USERS_TABLE)
        validate = UserRecord.model_validate_json
        read = UserText.read
        out: list[UserRecord | UserText] = []
        with gc_paused():
            for doc_id in ids:
                text = docs.get(doc_id)
                if text is None:  # deleted since the ids were taken
                    continue
                if texts:
                    quick = read(text)
                    if quick is not None:
                        out.append(quick)
                        continue
                try:
                    out.append(validate(text))
                except ValidationError as exc:
                    rec = self._validate_slowly(doc_id, text, exc)
                    if rec is not None:
                        out.append(rec)
        return out

    def _validate_slowly(self, doc_id: str, text: bytes,
                         exc: ValidationError) -> UserRecord | None:
        """A document pydantic's parser refused: parsed as ``json.loads`` would (a lone
        surrogate escape), else skipped with the reason in the log."""
        if _is_json_error(exc):
            try:
                doc = json.loads(text)
            except ValueError:
                raise self._corrupt_document(USERS_TABLE, doc_id) from None
            try:
                return UserRecord.model_validate(doc)
            except ValidationError as again:
                exc = again
        # Kept in the file (a newer version may understand it), skipped here.
        log.warning("skipping unreadable user %r in %s: %s", doc_id, self.path,
                    exc.errors(include_url=False)[:3])
        return None

    def _save_users_sync(self, batch: list[StoredUser]) -> None:
        users = self._docs(USERS_TABLE)
        for u in batch:
            users[u.id] = u.to_json()
        if batch:
            self._dirty = True
        self._commit_sync()

    def _delete_user_sync(self, user_id: str) -> None:
        for table in (USERS_TABLE, ACTIVITY_TABLE):
            if self._docs(table).pop(user_id, None) is not None:
                self._dirty = True
        self._pending.pop(user_id, None)
        self._commit_sync()

    def _append_sync(self, user_id: str, docs: list[tuple[str, dict[str, Any]]], now: int) -> None:
        """Buffer the entries not taken yet, and take them (here, so a cancelled caller whose
        job never ran leaves them untaken, and one whose job ran leaves them taken)."""
        ids = self._ids
        new = [(entry_id, doc) for entry_id, doc in docs if not ids.is_taken(entry_id)]
        if not new:
            return
        entries, last_now = self._pending.get(user_id, ([], now))
        entries.extend(doc for _, doc in new)
        ids.take(entry_id for entry_id, _ in new)
        if self.limits.max_entries > 0 and len(entries) > 2 * self.limits.max_entries:
            del entries[: -self.limits.max_entries]  # would be cut at the merge anyway
        self._pending[user_id] = (entries, max(now, last_now))

    def _apply_pending(self) -> None:
        """Merge buffered activity into the table: each user's log parsed, cut, encoded."""
        if not self._pending:
            return
        activity = self._docs(ACTIVITY_TABLE)
        pending, self._pending = self._pending, {}
        for user_id, (entries, now) in pending.items():
            doc = self._get_doc(ACTIVITY_TABLE, user_id)
            current = _entries(doc) if doc is not None else []
            log_entries = _merge_log(current, entries, now, self.limits)
            if log_entries:
                activity[user_id] = _json({"entries": log_entries})
            else:
                activity.pop(user_id, None)
        self._dirty = True

    def _commit_sync(self) -> None:
        """One file write for everything changed since the last one (nothing if unchanged)."""
        self._apply_pending()
        if not self._dirty:
            return
        assert self._tables is not None
        try:
            atomic_write(self.path, _layout(self._tables))
        except OSError as exc:
            raise StoreError(
                f"cannot write the TinyDB file {self.path}: {os_reason(exc)}"
            ) from exc
        self._dirty = False
        self._file_writes += 1

    def read(self) -> dict[str, dict[str, Any]]:
        """The whole database, parsed (for tests that compare it with the file)."""
        assert self._tables is not None
        return {name: {doc_id: _parse_json(text) for doc_id, text in docs.items()}
                for name, docs in self._tables.items()}

    def _get_activity_sync(
        self, user_id: str, limit: int | None, since: int | None
    ) -> list[Activity]:
        doc = self._get_doc(ACTIVITY_TABLE, user_id)
        entries: Sequence[Mapping[str, Any]] = _entries(doc) if doc is not None else []
        pending = self._pending.get(user_id)
        if pending is not None:
            entries = _merge_log(entries, pending[0], pending[1], self.limits)
        return select_activity(self._decode_newest_first(user_id, entries), limit, since)

    def _decode_newest_first(
        self, user_id: str, entries: Sequence[Mapping[str, Any]]
    ) -> Iterator[Activity]:
        for entry in reversed(entries):
            try:
                yield Activity.model_validate(entry)
            except ValidationError as exc:
                log.warning(
                    "skipping unreadable activity of %r in %s: %s", user_id, self.path,
                    exc.errors(include_url=False)[:3],
                )

    # -- the delayed write of buffered activity -----------------------------------------------

    def _schedule_commit(self) -> None:
        if self._timer is None and self._executor is not None:
            self._timer = asyncio.get_running_loop().create_task(self._delayed_commit())

    async def _delayed_commit(self) -> None:
        await asyncio.sleep(self.activity_write_delay)
        self._timer = None  # from here on close() waits for this write instead of cancelling
        try:
            await self._run(self._commit_sync)
        except StoreError as exc:
            # The data stays buffered in memory; the next batch or close() tries again. One
            # line per outage and minute, not one per delayed write.
            self._timer_errors.failed(exc)
        else:
            self._timer_errors.recovered()
