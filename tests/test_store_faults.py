"""Store faults as an operator meets them: a full disk, a read-only file system, a stalled Redis.

Why these tests exist (issue 11, defect 5): every failed TinyDB write added another copy of the
activity waiting to be written (131-184 duplicates per 50 entries, still there after a
restart), and a Redis append that timed out was sent again although Redis had already run it.
The service keeps a failed flush's batch and hands the *same* entries over again at the next
flush; a store must take such a retry as what it is, not as new activity.

The faults are real where the machine allows it: a tiny tmpfs filled to the last byte and a
read-only bind mount (both need root with CAP_SYS_ADMIN, else those cases skip), a redis-server
frozen with SIGSTOP. The same faults are also simulated by making the file calls fail with the
errno the kernel gives, so the behaviour is checked on every machine.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from hub import create_presence_service
from hub.core.clock import FakeClock
from hub.core.models import Activity, UserRecord
from hub.stores import ActivityLimits, Store, StoreError
from hub.stores.base import ActivityIds, StoreErrorLog
from hub.stores.redis import RedisStore
from hub.stores.tinydb import TinyDBStore
from tests.support.procs import RedisProcess
from tests.support.wait import async_wait_for, wait_for

LIMITS = ActivityLimits(max_entries=1000, max_age_ms=7 * 24 * 3600 * 1000)
T0 = 1_700_000_000_000


def entry(n: int, *, received_at: int | None = None) -> Activity:
    return Activity(
        type="message",
        channel_id="telegram-123",
        timestamp=T0 + n,
        device_id="phone",
        received_at=T0 + n if received_at is None else received_at,
        data={"n": n},
    )


def numbers(entries: list[Activity]) -> list[int]:
    """The ``n`` of every entry, oldest first (the stores answer newest first)."""
    return [e.data["n"] if e.data else -1 for e in reversed(entries)]


# --------------------------------------------------------------------------------------------
# Faults of the file system


@dataclass
class FileFault:
    """Makes writes to ``folder`` fail (``on``) and work again (``off``), really or simulated."""

    name: str
    folder: Path
    on: Callable[[], None]
    off: Callable[[], None]
    #: what the store's error message must say
    says: str


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _try_mount(*args: str) -> None:
    try:
        _mount(*args)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot mount here ({exc}; {detail.decode(errors='replace').strip()})")


@contextlib.contextmanager
def _tmpfs_full(folder: Path) -> Iterator[FileFault]:
    """A 1 MiB tmpfs; ``on`` fills it to the last byte, so writes fail with ENOSPC for real."""
    folder.mkdir()
    _try_mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder))
    filler = folder / "filler"

    def fill() -> None:
        # Unbuffered: a short write just returns less, and only a write of nothing at all
        # raises, so the loop ends with every page of the file system in use.
        with filler.open("wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 65536)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise

    try:
        yield FileFault("tmpfs-full", folder, fill, lambda: filler.unlink(), "disk is full")
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


@contextlib.contextmanager
def _read_only_bind(folder: Path) -> Iterator[FileFault]:
    """The folder bound onto itself; ``on`` remounts the bind read-only (EROFS even for root)."""
    folder.mkdir()
    _try_mount("--bind", str(folder), str(folder))

    try:
        yield FileFault(
            "read-only-bind", folder,
            lambda: _mount("-o", "remount,bind,ro", str(folder)),
            lambda: _mount("-o", "remount,bind,rw", str(folder)),
            "read-only",
        )
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


@contextlib.contextmanager
def _patched(folder: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> Iterator[FileFault]:
    """The kernel's answer simulated: creating or replacing a file in the folder fails."""
    folder.mkdir()
    real_mkstemp, real_replace = tempfile.mkstemp, os.replace

    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        if code == errno.EROFS and Path(kwargs.get("dir") or ".").resolve() == folder.resolve():
            raise OSError(code, os.strerror(code))
        return real_mkstemp(*args, **kwargs)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if Path(dst).parent.resolve() == folder.resolve():
            raise OSError(code, os.strerror(code))
        real_replace(src, dst, **kwargs)

    def on() -> None:
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "replace", replace)

    def off() -> None:
        monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
        monkeypatch.setattr(os, "replace", real_replace)

    name = "patched-enospc" if code == errno.ENOSPC else "patched-erofs"
    says = "disk is full" if code == errno.ENOSPC else "read-only"
    try:
        yield FileFault(name, folder, on, off, says)
    finally:
        off()


FILE_FAULTS = ["patched-enospc", "patched-erofs", "tmpfs-full", "read-only-bind"]


@pytest.fixture(params=FILE_FAULTS)
def file_fault(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FileFault]:
    folder = tmp_path / "data"
    kind: str = request.param
    if kind == "tmpfs-full":
        ctx: contextlib.AbstractContextManager[FileFault] = _tmpfs_full(folder)
    elif kind == "read-only-bind":
        ctx = _read_only_bind(folder)
    else:
        code = errno.ENOSPC if kind == "patched-enospc" else errno.EROFS
        ctx = _patched(folder, monkeypatch, code)
    with ctx as fault:
        yield fault


# --------------------------------------------------------------------------------------------
# The service's retry, as it is: a failed flush hands the same entries over again


async def flush_like_the_service(
    store: Store, pending: dict[str, list[Activity]], users: list[UserRecord], now: int
) -> StoreError | None:
    """One flush as :meth:`PresenceService.flush` does it; the error if it failed.

    On failure the caller keeps ``pending`` and sends it again, with whatever came since.
    """
    try:
        for user_id, entries in pending.items():
            await store.append_activity(user_id, entries, now)
        if users:
            await store.save_users(users)
        await store.flush()
    except StoreError as exc:
        return exc
    return None


async def read_back(make: Callable[[], Store], user_id: str) -> list[Activity]:
    """The user's log as a restarted hub finds it."""
    store = make()
    await store.open()
    try:
        return await store.get_activity(user_id)
    finally:
        await store.close()


# --------------------------------------------------------------------------------------------
# TinyDB


async def test_tinydb_failed_writes_never_duplicate_activity(file_fault: FileFault) -> None:
    """50 entries in five rounds; rounds 1-4 fail three flushes each; exactly 50 on disk."""
    path = file_fault.folder / "presence.json"

    def make() -> Store:
        return TinyDBStore(path, LIMITS, activity_write_delay=3600)

    store = make()
    await store.open()
    pending: dict[str, list[Activity]] = {}
    alice = UserRecord(id="alice", name="Alice")
    sent = 0
    errors: list[StoreError] = []
    try:
        for round_no in range(5):
            pending.setdefault("alice", []).extend(entry(sent + i) for i in range(10))
            sent += 10
            if round_no == 4:
                file_fault.off()
                assert await flush_like_the_service(store, pending, [alice], T0 + sent) is None
                pending.clear()
                break
            if round_no == 0:
                file_fault.on()
            for _ in range(3):
                error = await flush_like_the_service(store, pending, [alice], T0 + sent)
                assert error is not None
                errors.append(error)
        assert len(errors) == 12
        # One line an operator can act on: which file, and why in plain words.
        assert {str(e) for e in errors} == {str(errors[0])}
        assert str(path) in str(errors[0]) and file_fault.says in str(errors[0])
        assert numbers(await store.get_activity("alice")) == list(range(50))
    finally:
        await store.close()
    assert numbers(await read_back(make, "alice")) == list(range(50))


async def test_tinydb_service_retries_after_a_failed_write_keep_each_entry_once(
    file_fault: FileFault,
) -> None:
    """The same through the real service: its failed flushes, then one that works."""
    path = file_fault.folder / "presence.json"
    clock = FakeClock(T0)
    store = TinyDBStore(path, LIMITS, activity_write_delay=3600)
    presence = create_presence_service(storage=store, clock=clock, device_rate=None)
    async with presence:
        for round_no in range(5):
            for i in range(10):
                clock.advance(1)
                n = round_no * 10 + i
                await presence.record_activity(
                    "alice", {"type": "message", "channel_id": "telegram-123",
                              "timestamp": T0 + n, "data": {"n": n}}, device_id="phone",
                )
            if round_no == 0:
                file_fault.on()
            if round_no == 4:
                file_fault.off()
                await presence.flush()
                break
            for _ in range(3):
                with pytest.raises(StoreError, match=file_fault.says):
                    await presence.flush()
        assert numbers(await presence.get_activity("alice")) == list(range(50))

    def make() -> Store:
        return TinyDBStore(path, LIMITS)

    assert numbers(await read_back(make, "alice")) == list(range(50))


async def test_tinydb_identical_entries_are_still_two_entries(tmp_path: Path) -> None:
    """Retries are recognised by the entry, not by its content: two equal messages in one
    millisecond are two entries, also when they come in separate flushes."""
    path = tmp_path / "presence.json"
    store = TinyDBStore(path, LIMITS, activity_write_delay=3600)
    await store.open()
    try:
        await store.append_activity("alice", [entry(1), entry(1)], T0 + 1)
        await store.flush()
        await store.append_activity("alice", [entry(1)], T0 + 1)
        await store.flush()
    finally:
        await store.close()
    assert numbers(await read_back(lambda: TinyDBStore(path, LIMITS), "alice")) == [1, 1, 1]


# --------------------------------------------------------------------------------------------
# Redis frozen with SIGSTOP: a call times out, and runs when the server goes on


@contextlib.contextmanager
def frozen(server: RedisProcess) -> Iterator[None]:
    """SIGSTOP: the kernel still accepts connections and buffers commands; nothing answers."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def every_sent_command_has_run(server: RedisProcess) -> None:
    """Wait until the server has run what the timed-out calls left in its sockets.

    A call that timed out closed its connection, with the command still unread in the server's
    socket. Redis reads a closed connection's last commands, runs them, and only then frees
    it. So once the server counts no connection but the one asking, nothing sent before is
    left; the asking connection is new each time, because accepting it makes the server
    accept (and count) every connection queued before it.
    """

    def only_me() -> bool:
        with redis.Redis(host=server.host, port=server.port) as client:
            info = client.info("clients")
        return int(info["connected_clients"]) == 1

    wait_for(only_me, timeout=10, what="the frozen commands to run")


async def test_redis_timed_out_appends_are_stored_once(own_redis: RedisProcess) -> None:
    ns = f"t{uuid.uuid4().hex[:12]}"

    def make() -> Store:
        return RedisStore(own_redis.url, LIMITS, namespace=ns, timeout=0.5)

    store = make()
    await store.open()
    first = [entry(n) for n in range(10)]
    second = [entry(n) for n in range(10, 20)]
    errors: list[StoreError] = []
    try:
        assert await flush_like_the_service(store, {"alice": first}, [], T0 + 10) is None
        with frozen(own_redis):
            for _ in range(3):
                error = await flush_like_the_service(store, {"alice": second}, [], T0 + 20)
                assert error is not None
                errors.append(error)
        assert await flush_like_the_service(store, {"alice": second}, [], T0 + 20) is None
    finally:
        await store.close()
    assert all("no answer within 0.5 s" in str(e) and own_redis.url in str(e) for e in errors)
    every_sent_command_has_run(own_redis)
    assert numbers(await read_back(make, "alice")) == list(range(20))


async def test_redis_service_retries_after_a_stall_keep_each_entry_once(
    own_redis: RedisProcess,
) -> None:
    ns = f"t{uuid.uuid4().hex[:12]}"
    clock = FakeClock(T0)

    def make() -> Store:
        return RedisStore(own_redis.url, LIMITS, namespace=ns, timeout=0.5)

    presence = create_presence_service(storage=make(), clock=clock, device_rate=None)

    async def record(n: int) -> None:
        clock.advance(1)
        await presence.record_activity(
            "alice", {"type": "message", "channel_id": "telegram-123", "timestamp": T0 + n,
                      "data": {"n": n}}, device_id="phone",
        )

    async with presence:
        for n in range(10):
            await record(n)
        await presence.flush()
        with frozen(own_redis):
            for n in range(10, 20):
                await record(n)
            for _ in range(2):
                with pytest.raises(StoreError, match="no answer within"):
                    await presence.flush()
        await presence.flush()
    every_sent_command_has_run(own_redis)
    assert numbers(await read_back(make, "alice")) == list(range(20))


async def test_redis_identical_entries_are_still_two_entries(redis_server: RedisProcess) -> None:
    ns = f"t{uuid.uuid4().hex[:12]}"

    def make() -> Store:
        return RedisStore(redis_server.url, LIMITS, namespace=ns)

    store = make()
    await store.open()
    try:
        await store.append_activity("alice", [entry(1), entry(1)], T0 + 1)
        await store.append_activity("alice", [entry(1)], T0 + 1)
    finally:
        await store.close()
    assert numbers(await read_back(make, "alice")) == [1, 1, 1]


# --------------------------------------------------------------------------------------------
# The pieces: ids bound to entries, one log line per outage and interval


def test_activity_ids_follow_the_entry_object_and_are_forgotten_with_it() -> None:
    ids = ActivityIds()
    a, twin = entry(1), entry(1)
    assert a == twin  # equal content ...
    assert ids.id_of(a) == ids.id_of(a) != ids.id_of(twin)  # ... yet two entries
    ids.take([ids.id_of(a)])
    assert [e is twin for _, e in ids.fresh([a, twin])] == [True]  # `==` could not tell
    taken_id = ids.id_of(a)
    del a
    gc.collect()
    assert len(ids) == 1  # nothing kept for an entry nobody holds any more
    assert not ids.is_taken(taken_id)
    other = ActivityIds()
    assert other.id_of(twin) != ids.id_of(twin)  # another process or restart: other ids


def test_store_error_log_writes_one_line_per_outage_and_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    logger = logging.getLogger("test.store_errors")
    errors = StoreErrorLog(logger, interval=60, clock=lambda: now[0])
    full = StoreError("cannot write the TinyDB file /x: the disk is full (No space left on device)")
    with caplog.at_level(logging.INFO, logger=logger.name):
        for _ in range(59):  # one failed flush a second for a minute
            errors.failed(full)
            now[0] += 1
        assert [r.getMessage() for r in caplog.records] == [f"{full}; retrying"]
        now[0] = 60
        errors.failed(full)
        assert caplog.records[-1].getMessage() == (
            f"{full} (failed 58 more times since the last report); retrying"
        )
        other = StoreError("cannot write the TinyDB file /x: the file system is read-only")
        errors.failed(other)  # a new reason is news at once
        errors.recovered()
        errors.recovered()  # once only
    assert [r.levelname for r in caplog.records] == ["ERROR", "ERROR", "ERROR", "WARNING"]
    assert caplog.records[-1].getMessage() == "store writes work again after 61 failed attempts"
    assert not errors.failing
    assert all(r.exc_info is None for r in caplog.records)  # lines, not tracebacks


async def test_tinydb_delayed_write_failures_are_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's own delayed activity write logs a full disk once, not once per attempt."""
    path = tmp_path / "presence.json"
    attempts: list[str] = []
    real_replace = os.replace

    def disk_full(src: Any, dst: Any, **kwargs: Any) -> None:
        attempts.append(str(dst))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = TinyDBStore(path, LIMITS, activity_write_delay=0.01)
    await store.open()

    def attempted(count: int) -> Callable[[], bool]:
        return lambda: len(attempts) >= count

    kept = [entry(n) for n in range(6)]
    try:
        with caplog.at_level(logging.INFO, logger="hub.stores.tinydb"):
            monkeypatch.setattr(os, "replace", disk_full)
            for n in range(5):
                await store.append_activity("alice", [kept[n]], T0 + n)
                await async_wait_for(attempted(n + 1), what="a delayed write")
            monkeypatch.setattr(os, "replace", real_replace)
            await store.append_activity("alice", [kept[5]], T0 + 5)
            await async_wait_for(lambda: store.file_writes == 1, what="the write that works")
    finally:
        await store.close()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("ERROR", f"cannot write the TinyDB file {path}: the disk is full "
                  "(No space left on device); retrying"),
        ("WARNING", "store writes work again after 5 failed attempts"),
    ]
    assert numbers(await read_back(lambda: TinyDBStore(path, LIMITS), "alice")) == list(range(6))
