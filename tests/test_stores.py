"""One behaviour for every store: the same tests run against memory, TinyDB and a real Redis.

The service only sees the :class:`hub.stores.Store` interface, so a store that passes here can
replace another without the engine noticing. Store-specific promises (TinyDB's file handling,
Redis's key layout and errors) follow the shared tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from tinydb import TinyDB

from hub.core.models import Activity, DeviceRecord, UserRecord
from hub.protocol import redact_url
from hub.stores import (
    ActivityLimits,
    MemoryStore,
    Store,
    StoreError,
    open_store,
)
from hub.stores.redis import RedisStore
from hub.stores.tinydb import TinyDBStore
from tests.support.procs import RedisProcess, free_port
from tests.support.wait import async_wait_for

LIMITS = ActivityLimits(max_entries=5, max_age_ms=10_000)
KINDS = ["memory", "tinydb", "redis"]


# --------------------------------------------------------------------------------------------
# Sample data


def device(device_id: str, **changes: Any) -> DeviceRecord:
    values: dict[str, Any] = {
        "id": device_id,
        "name": f"{device_id} of someone",
        "session": f"s-{device_id}",
        "connected": True,
        "status": "online",
        "last_seen": 1_700_000_000_000,
        "last_interaction": 1_699_999_999_000,
        "acked_version": 3,
    }
    values.update(changes)
    return DeviceRecord(**values)


def user(user_id: str, *devices: DeviceRecord, **changes: Any) -> UserRecord:
    values: dict[str, Any] = {
        "id": user_id,
        "name": f"Name of {user_id}",
        "status": "online",
        "manual_status": None,
        "custom_status": "In a meeting",
        "active_device": devices[0].id if devices else None,
        "version": 7,
        "last_seen": 1_700_000_000_000,
        "last_sync": None,
        "channels": {"telegram-123": 1_700_000_000_000, "slack-x": 5},
        "devices": list(devices),
    }
    values.update(changes)
    return UserRecord(**values)


def activity(n: int, *, received_at: int | None = None, channel: str = "telegram-123") -> Activity:
    return Activity(
        type="message",
        channel_id=channel,
        timestamp=1000 + n,
        device_id="phone",
        received_at=received_at if received_at is not None else 1000 + n,
        data={"n": n, "text": "grüß dich ✓"},
    )


def by_id(users: list[UserRecord]) -> dict[str, UserRecord]:
    return {u.id: u for u in users}


# --------------------------------------------------------------------------------------------
# The parametrized store


@dataclass
class Harness:
    """A store under test plus what a test needs to reach behind it.

    ``reopen`` closes the store and opens a new one on the same file or Redis namespace; the
    memory store's backing *is* the object, so it reopens the same one.
    """

    kind: str
    make: Callable[[], Store]
    store: Store
    tmp_path: Path
    redis_url: str = ""
    namespace: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    async def reopen(self) -> Store:
        await self.store.close()
        self.store = self.make()
        await self.store.open()
        return self.store

    async def add_unknown_fields(self, user_id: str, device_id: str) -> None:
        """Write fields a newer hub might add, straight into the backing storage."""
        if self.kind == "memory":
            # Nothing lies behind the memory store; unknown fields arrive through validation.
            raw = (await self.store.load_users())[0].model_dump(by_alias=True)
            raw["future"] = {"x": 1}
            raw["devices"][0]["future"] = [1, 2]
            await self.store.save_users([UserRecord.model_validate(raw)])
            return
        if self.kind == "tinydb":
            await self.store.close()
            path = self.tmp_path / "db" / "presence.json"
            data = json.loads(path.read_text())
            doc = data["users"][user_id]
            doc["future"] = {"x": 1}
            doc["devices"][0]["future"] = [1, 2]
            for entry in data["activity"][user_id]["entries"]:
                entry["future"] = "yes"
            data["future_table"] = {"1": {"what": "ever"}}
            path.write_text(json.dumps(data))
            self.store = self.make()
            await self.store.open()
            return
        client = aioredis.from_url(self.redis_url, decode_responses=True)
        try:
            ns = self.namespace
            await client.hset(f"{ns}:user:{user_id}", mapping={"future": "{not json"})
            await client.hset(f"{ns}:device:{user_id}:{device_id}", mapping={"future": "[1,2]"})
            extra = activity(99, received_at=1099).model_dump(mode="json")
            extra["future"] = "yes"
            await client.xadd(f"{ns}:activity:{user_id}", {"a": json.dumps(extra)}, id="1099-5")
        finally:
            await client.aclose()


@pytest.fixture(params=KINDS)
async def store_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    kind: str = request.param
    if kind == "memory":
        memory = MemoryStore(LIMITS)
        harness = Harness(kind, lambda: memory, memory, tmp_path)
    elif kind == "tinydb":
        path = tmp_path / "db" / "presence.json"

        def make_tinydb() -> Store:
            return TinyDBStore(path, LIMITS)

        harness = Harness(kind, make_tinydb, make_tinydb(), tmp_path)
    else:
        server: RedisProcess = request.getfixturevalue("redis_server")
        namespace = f"t{uuid.uuid4().hex[:12]}"

        def make_redis() -> Store:
            return RedisStore(server.url, LIMITS, namespace=namespace)

        harness = Harness(
            kind, make_redis, make_redis(), tmp_path, redis_url=server.url, namespace=namespace
        )
    await harness.store.open()
    try:
        yield harness
    finally:
        await harness.store.close()


@pytest.fixture
def store(store_harness: Harness) -> Store:
    return store_harness.store


# --------------------------------------------------------------------------------------------
# Shared behaviour


async def test_every_store_implements_the_protocol(store: Store) -> None:
    assert isinstance(store, Store)


async def test_users_with_devices_round_trip(store: Store) -> None:
    alice = user("alice", device("phone"), device("laptop", virtual=True, session=None))
    # Strings that look like JSON must come back as strings, not as numbers or None.
    bob = user("bob", name="123", custom_status="null", manual_status="dnd", last_sync=42)
    carol = user("carol.x_9-Z", device("telegram-123", virtual=True, connected=False))
    await store.save_users([alice, bob, carol])
    assert by_id(await store.load_users()) == {"alice": alice, "bob": bob, "carol.x_9-Z": carol}


async def test_device_order_is_kept(store: Store) -> None:
    alice = user("alice", device("zeta"), device("alpha"), device("mid"))
    await store.save_users([alice])
    [loaded] = await store.load_users()
    assert [d.id for d in loaded.devices] == ["zeta", "alpha", "mid"]


async def test_save_replaces_the_whole_record(store: Store) -> None:
    await store.save_users([user("alice", device("phone"), manual_status="dnd")])
    newer = user(
        "alice", device("phone", status="away", connected=False), name="Alice",
        custom_status=None, manual_status=None, version=8, channels={},
    )
    await store.save_users([newer])
    assert await store.load_users() == [newer]


async def test_last_record_of_a_user_in_one_batch_wins(store: Store) -> None:
    await store.save_users([user("alice", version=1), user("alice", version=2)])
    [loaded] = await store.load_users()
    assert loaded.version == 2


async def test_device_removed_from_record_is_gone_after_reload(store_harness: Harness) -> None:
    store = store_harness.store
    await store.save_users([user("alice", device("phone"), device("laptop"))])
    await store.save_users([user("alice", device("laptop"))])
    [loaded] = await store.load_users()
    assert [d.id for d in loaded.devices] == ["laptop"]
    store = await store_harness.reopen()
    [loaded] = await store.load_users()
    assert [d.id for d in loaded.devices] == ["laptop"]


async def test_delete_user_forgets_user_devices_and_activity(store: Store) -> None:
    await store.save_users([user("alice", device("phone")), user("bob")])
    await store.append_activity("alice", [activity(1)], now=1001)
    await store.delete_user("alice")
    await store.delete_user("nobody")  # unknown users are fine
    assert [u.id for u in await store.load_users()] == ["bob"]
    assert await store.get_activity("alice") == []
    # A user saved again after a delete starts without the old devices or activity.
    await store.save_users([user("alice")])
    [alice] = [u for u in await store.load_users() if u.id == "alice"]
    assert alice.devices == []
    assert await store.get_activity("alice") == []


async def test_empty_batches_and_unknown_users_are_harmless(store: Store) -> None:
    await store.save_users([])
    await store.append_activity("alice", [], now=1000)
    assert await store.load_users() == []
    assert await store.get_activity("nobody") == []
    assert await store.get_activity("nobody", limit=3, since=5) == []


async def test_overlapping_batches_apply_in_call_order(store: Store) -> None:
    await asyncio.gather(*(store.save_users([user("alice", version=v)]) for v in range(1, 11)))
    [alice] = await store.load_users()
    assert alice.version == 10
    await asyncio.gather(
        *(store.append_activity("alice", [activity(n)], now=1000 + n) for n in range(5))
    )
    assert [e.timestamp for e in await store.get_activity("alice")] == [1004, 1003, 1002, 1001, 1000]


async def test_activity_is_newest_first_with_limit_and_since(store: Store) -> None:
    await store.append_activity("alice", [activity(1), activity(2)], now=1002)
    await store.append_activity("alice", [activity(3)], now=1003)
    await store.append_activity("bob", [activity(9)], now=1009)
    assert await store.get_activity("alice") == [activity(3), activity(2), activity(1)]
    assert await store.get_activity("alice", limit=2) == [activity(3), activity(2)]
    assert await store.get_activity("alice", since=1002) == [activity(3), activity(2)]
    assert await store.get_activity("alice", limit=1, since=1002) == [activity(3)]
    assert await store.get_activity("alice", since=5000) == []
    assert await store.get_activity("alice", limit=0) == []
    assert await store.get_activity("bob") == [activity(9)]


async def test_activity_is_ordered_by_timestamp_not_arrival(store: Store) -> None:
    """Replayed from an outbox, older activity arrives after newer: the log (and ``since``,
    which filters by timestamp) go by the entries' own times."""
    await store.append_activity("alice", [activity(5, received_at=2000)], now=2000)
    await store.append_activity("alice", [activity(2, received_at=2001),
                                          activity(3, received_at=2001)], now=2001)
    assert await store.get_activity("alice") == [
        activity(5, received_at=2000), activity(3, received_at=2001), activity(2, received_at=2001)]
    assert await store.get_activity("alice", limit=2, since=1003) == [
        activity(5, received_at=2000), activity(3, received_at=2001)]


async def test_activity_keeps_at_most_the_count_limit(store: Store) -> None:
    for n in range(8):
        await store.append_activity("alice", [activity(n)], now=1000 + n)
    assert await store.get_activity("alice") == [activity(n) for n in range(7, 2, -1)]
    # One batch larger than the limit keeps its newest entries.
    await store.append_activity("bob", [activity(n) for n in range(12)], now=1011)
    assert await store.get_activity("bob") == [activity(n) for n in range(11, 6, -1)]


async def test_activity_older_than_the_age_limit_is_dropped(store: Store) -> None:
    old = activity(1, received_at=1_000)
    mid = activity(2, received_at=5_000)
    await store.append_activity("alice", [old, mid], now=5_000)
    assert await store.get_activity("alice") == [mid, old]
    new = activity(3, received_at=11_500)
    # now - max_age = 1_500: the entry received at 1_000 is too old, the one at 5_000 is not.
    await store.append_activity("alice", [new], now=11_500)
    assert await store.get_activity("alice") == [new, mid]


async def test_reopen_keeps_users_and_activity(store_harness: Harness) -> None:
    store = store_harness.store
    users = [user(f"u{i}", device("phone"), device(f"d{i}")) for i in range(20)]
    await store.save_users(users)
    await store.append_activity("u1", [activity(1), activity(2)], now=1002)
    await store.append_activity("u2", [activity(3)], now=1003)
    store = await store_harness.reopen()
    assert by_id(await store.load_users()) == by_id(users)
    assert await store.get_activity("u1") == [activity(2), activity(1)]
    assert await store.get_activity("u2") == [activity(3)]


async def test_the_clean_stop_marker_is_swapped_and_kept(store_harness: Harness) -> None:
    """What the next start needs to know: did the last run stop cleanly? A store that never
    held a marker says yes (a first start published nothing)."""
    store = store_harness.store
    assert await store.swap_clean_stop(False) is True
    assert await store.swap_clean_stop(False) is False
    store = await store_harness.reopen()
    assert await store.swap_clean_stop(True) is False
    store = await store_harness.reopen()
    assert await store.swap_clean_stop(False) is True


async def test_unknown_fields_are_ignored(store_harness: Harness) -> None:
    alice = user("alice", device("phone"))
    await store_harness.store.save_users([alice])
    await store_harness.store.append_activity("alice", [activity(1)], now=1001)
    await store_harness.add_unknown_fields("alice", "phone")
    assert await store_harness.store.load_users() == [alice]
    entries = await store_harness.store.get_activity("alice")
    assert entries[-1] == activity(1)
    assert all(not hasattr(e, "future") for e in entries)


# --------------------------------------------------------------------------------------------
# The factory


async def test_open_store_builds_each_kind(tmp_path: Path) -> None:
    memory = open_store("memory", limits=LIMITS)
    assert isinstance(memory, MemoryStore) and not memory.keeps_users  # dies with its service
    tiny = open_store("tinydb", db_path=tmp_path / "x.json")
    assert isinstance(tiny, TinyDBStore)
    red = open_store("redis", redis_url="redis://127.0.0.1:1/0", namespace="ns")
    assert isinstance(red, RedisStore)
    assert red.namespace == "ns"
    with pytest.raises(StoreError, match="unknown storage 'sqlite'"):
        open_store("sqlite")
    with pytest.raises(StoreError, match="file path"):
        open_store("tinydb")
    with pytest.raises(StoreError, match="Redis URL"):
        open_store("redis")


# --------------------------------------------------------------------------------------------
# TinyDB only


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of an atomic write still lying around in ``folder``."""
    return list(folder.glob(".presence.json.*"))


def _count_replaces(monkeypatch: pytest.MonkeyPatch, target: Path) -> list[str]:
    """Record every os.replace onto ``target``: each one is one write of the database file."""
    calls: list[str] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if Path(dst) == target:
            calls.append(str(src))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


async def test_tinydb_one_batch_is_one_file_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "presence.json"
    replaces = _count_replaces(monkeypatch, path)
    store = TinyDBStore(path, LIMITS, activity_write_delay=3600)
    await store.open()
    try:
        await store.save_users([user(f"u{i}", device("phone")) for i in range(500)])
        assert (store.file_writes, len(replaces)) == (1, 1)
        # Activity of many users, then the users' batch: still one write for the whole flush.
        for i in range(50):
            await store.append_activity(f"u{i}", [activity(i)], now=1000 + i)
        await store.save_users([user(f"u{i}", version=9) for i in range(50)])
        assert (store.file_writes, len(replaces)) == (2, 2)
        # Nothing changed: nothing written.
        await store.save_users([])
        assert store.file_writes == 2
    finally:
        await store.close()
    assert store.file_writes == 2  # close had nothing left to write
    assert not leftovers(tmp_path)


async def test_tinydb_file_always_matches_the_database_in_memory(tmp_path: Path) -> None:
    """Flushes reuse the JSON of unchanged documents; the file must still be the whole truth."""
    path = tmp_path / "presence.json"
    store = TinyDBStore(path, LIMITS, activity_write_delay=3600)
    await store.open()

    def on_disk() -> Any:
        return json.loads(path.read_bytes())

    def in_memory() -> Any:
        return json.loads(json.dumps(store.read()))

    try:
        await store.save_users([user(f"u{i}", device("phone")) for i in range(20)])
        assert on_disk() == in_memory()
        await store.save_users([user("u3", device("tablet"), name="Üñí ✓"), user("new")])
        assert on_disk() == in_memory()
        await store.append_activity("u3", [activity(1)], now=1001)
        await store.append_activity("u4", [activity(2)], now=1002)
        await store.delete_user("u5")
        assert on_disk() == in_memory()
        assert on_disk()["users"]["u3"]["devices"][0]["id"] == "tablet"
        assert "u5" not in on_disk()["users"]
        await store.append_activity("u3", [activity(3)], now=1003)
        await store.flush()
        assert on_disk() == in_memory()
        assert len(on_disk()["activity"]["u3"]["entries"]) == 2
    finally:
        await store.close()


async def test_tinydb_buffered_activity_is_written_after_the_delay(tmp_path: Path) -> None:
    path = tmp_path / "presence.json"
    store = TinyDBStore(path, LIMITS, activity_write_delay=0.05)
    await store.open()
    try:
        for n in range(10):
            await store.append_activity("alice", [activity(n)], now=1000 + n)
        await async_wait_for(lambda: store.file_writes >= 1, what="the delayed activity write")
        stored = json.loads(path.read_text())["activity"]["alice"]["entries"]
        assert [e["timestamp"] for e in stored] == [1005, 1006, 1007, 1008, 1009]
    finally:
        await store.close()


async def test_tinydb_close_writes_buffered_activity(tmp_path: Path) -> None:
    path = tmp_path / "presence.json"
    store = TinyDBStore(path, LIMITS, activity_write_delay=3600)
    await store.open()
    await store.append_activity("alice", [activity(1)], now=1001)
    assert store.file_writes == 0
    await store.close()
    assert store.file_writes == 1
    again = TinyDBStore(path, LIMITS)
    await again.open()
    try:
        assert await again.get_activity("alice") == [activity(1)]
    finally:
        await again.close()


async def test_tinydb_file_is_a_plain_tinydb_database(tmp_path: Path) -> None:
    path = tmp_path / "presence.json"
    store = TinyDBStore(path, LIMITS)
    await store.open()
    await store.save_users([user("alice", device("phone"))])
    await store.append_activity("alice", [activity(1)], now=1001)
    await store.close()
    db = TinyDB(path, access_mode="r")
    try:
        doc = db.table("users").get(doc_id="alice")  # type: ignore[call-overload]
        assert doc is not None
        assert doc["schema"] == 1 and doc["devices"][0]["id"] == "phone"
        assert len(db.table("activity")) == 1
    finally:
        db.close()


async def test_tinydb_corrupt_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "presence.json"
    contents = (
        b'{"users": {"alice": {"id": "ali',  # cut off mid-write by a non-atomic writer
        b"[1, 2, 3]",
        b'{"users": {"alice": "not a document"}}',
        b"\xff\xfe garbage",
    )
    for content in contents:
        path.write_bytes(content)
        store = TinyDBStore(path, LIMITS)
        with pytest.raises(StoreError, match="corrupt") as err:
            await store.open()
        assert str(path) in str(err.value)
        assert path.read_bytes() == content


async def test_tinydb_empty_file_is_an_empty_database(tmp_path: Path) -> None:
    path = tmp_path / "presence.json"
    path.touch()
    store = TinyDBStore(path, LIMITS)
    await store.open()
    try:
        assert await store.load_users() == []
    finally:
        await store.close()


async def test_tinydb_unwritable_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    path = blocker / "sub" / "presence.json"
    with pytest.raises(StoreError) as err:
        await TinyDBStore(path, LIMITS).open()
    message = str(err.value)
    assert str(path) in message
    assert "Not a directory" in message
    with pytest.raises(StoreError, match="is a directory"):
        await TinyDBStore(tmp_path, LIMITS).open()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
async def test_tinydb_read_only_directory_is_a_store_error(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="Permission denied"):
            await TinyDBStore(folder / "presence.json", LIMITS).open()
    finally:
        folder.chmod(0o755)


async def test_tinydb_creates_parent_directories_and_keeps_file_mode(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "presence.json"
    store = TinyDBStore(path, LIMITS)
    await store.open()
    await store.save_users([user("alice")])
    path.chmod(0o640)
    await store.save_users([user("alice", version=8)])
    await store.close()
    assert path.stat().st_mode & 0o777 == 0o640


async def test_tinydb_leftover_temporary_files_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "presence.json"
    leftover = tmp_path / ".presence.json.abc123.tmp"
    leftover.write_text('{"users": {"half')
    store = TinyDBStore(path, LIMITS)
    await store.open()
    await store.close()
    assert not leftover.exists()


async def test_tinydb_write_error_is_a_store_error_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "presence.json"
    store = TinyDBStore(path, LIMITS)
    await store.open()
    real_replace = os.replace

    def disk_full(src: Any, dst: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(StoreError, match="No space left on device") as err:
        await store.save_users([user("alice")])
    assert str(path) in str(err.value)
    assert not leftovers(tmp_path)  # the temporary file was removed
    monkeypatch.setattr(os, "replace", real_replace)
    await store.close()  # the batch is still buffered and written now
    again = TinyDBStore(path, LIMITS)
    await again.open()
    try:
        assert [u.id for u in await again.load_users()] == ["alice"]
    finally:
        await again.close()


async def test_tinydb_unreadable_record_is_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "presence.json"
    good = user("alice").model_dump(mode="json", by_alias=True)
    path.write_text(json.dumps({"users": {"alice": good, "bob": {"id": "bob", "version": "x"}}}))
    store = TinyDBStore(path, LIMITS)
    await store.open()
    try:
        assert [u.id for u in await store.load_users()] == ["alice"]
    finally:
        await store.close()


async def test_tinydb_store_not_open_says_so(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not open"):
        await TinyDBStore(tmp_path / "x.json").load_users()


# --------------------------------------------------------------------------------------------
# Redis only


async def test_redis_unreachable_is_a_store_error() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    store = RedisStore(url, LIMITS, connect_timeout=2)
    with pytest.raises(StoreError, match=f"cannot reach Redis at {url}"):
        await store.open()


def test_redis_password_is_not_shown() -> None:
    assert redact_url("redis://:hunter2@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("redis://me:hunter2@host/0") == "redis://me:***@host/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


async def test_redis_key_layout(redis_server: RedisProcess) -> None:
    ns = f"t{uuid.uuid4().hex[:12]}"
    store = RedisStore(redis_server.url, LIMITS, namespace=ns)
    await store.open()
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        await store.save_users([user("alice", device("phone"), device("laptop"))])
        await store.append_activity("alice", [activity(1)], now=1001)
        assert await client.smembers(f"{ns}:users") == {"alice"}
        assert await client.smembers(f"{ns}:devices:alice") == {"phone", "laptop"}
        fields = await client.hgetall(f"{ns}:user:alice")
        assert fields["name"] == "Name of alice"  # strings as they are
        assert json.loads(fields["version"]) == 7  # the rest JSON
        assert json.loads(fields["channels"]) == {"telegram-123": 1_700_000_000_000, "slack-x": 5}
        assert "last_sync" not in fields  # None is absent
        assert (await client.hgetall(f"{ns}:device:alice:phone"))["session"] == "s-phone"
        rows: list[Any] = await client.xrange(f"{ns}:activity:alice") or []
        [(entry_id, entry)] = rows
        assert entry_id == "1001-0"  # the id is received_at, so XTRIM MINID cuts by age
        assert set(entry) == {"a", "i"}  # the entry, and its id that makes a retry harmless
        assert json.loads(entry["a"])["data"] == {"n": 1, "text": "grüß dich ✓"}

        await store.save_users([user("alice", device("laptop"))])
        assert not await client.exists(f"{ns}:device:alice:phone")
        assert await client.smembers(f"{ns}:devices:alice") == {"laptop"}

        await store.delete_user("alice")
        assert await client.keys(f"{ns}:*") == []
    finally:
        await client.aclose()
        await store.close()


async def test_redis_large_batches_go_in_several_transactions(
    redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hub.stores.redis._CHUNK_USERS", 7)
    store = RedisStore(redis_server.url, LIMITS, namespace=f"t{uuid.uuid4().hex[:12]}")
    await store.open()
    try:
        users = [user(f"u{i:02d}", device("phone"), device(f"d{i}")) for i in range(30)]
        await store.save_users(users)
        assert by_id(await store.load_users()) == by_id(users)
        smaller = [user(f"u{i:02d}", device(f"d{i}")) for i in range(30)]
        await store.save_users(smaller)
        assert by_id(await store.load_users()) == by_id(smaller)
    finally:
        await store.close()


async def test_redis_a_hand_edited_field_costs_only_its_user(redis_server: RedisProcess) -> None:
    """The load parses a chunk of users with one json.loads; a stored value that is not JSON
    (an operator's hand edit) makes that chunk read field by field, and only the user whose
    field is wrong is skipped (with a warning), not its chunk."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    store = RedisStore(redis_server.url, LIMITS, namespace=namespace)
    await store.open()
    try:
        users = [user(f"u{i}", device("phone")) for i in range(5)]
        await store.save_users(users)
        await store.client.hset(f"{namespace}:user:u2", "version", "three")
        await store.client.hset(f"{namespace}:device:u3:phone", "last_seen", "{broken")
        loaded = by_id(await store.load_users())
        assert set(loaded) == {"u0", "u1", "u4"}
        assert loaded == {u.id: u for u in users if u.id in loaded}
    finally:
        await store.close()


async def test_redis_activity_ids_stay_ordered_when_the_clock_goes_back(
    redis_server: RedisProcess,
) -> None:
    store = RedisStore(redis_server.url, LIMITS, namespace=f"t{uuid.uuid4().hex[:12]}")
    await store.open()
    try:
        late = activity(1, received_at=5_000)
        early = activity(2, received_at=4_000)  # the hub's clock stepped back
        await store.append_activity("alice", [late], now=5_000)
        await store.append_activity("alice", [early, activity(3, received_at=4_000)], now=5_000)
        assert [e.timestamp for e in await store.get_activity("alice")] == [1003, 1002, 1001]
    finally:
        await store.close()


async def test_redis_activity_pages_through_long_logs(redis_server: RedisProcess) -> None:
    limits = ActivityLimits(max_entries=1000, max_age_ms=10**12)
    store = RedisStore(redis_server.url, limits, namespace=f"t{uuid.uuid4().hex[:12]}")
    await store.open()
    try:
        await store.append_activity("alice", [activity(n) for n in range(700)], now=2000)
        everything = await store.get_activity("alice")
        assert [e.timestamp for e in everything] == [1000 + n for n in range(699, -1, -1)]
        assert len(await store.get_activity("alice", limit=450)) == 450
        # `since` filters on the device timestamp across pages.
        recent = await store.get_activity("alice", since=1000 + 250)
        assert [e.timestamp for e in recent][-1] == 1250 and len(recent) == 450
    finally:
        await store.close()


async def test_redis_server_restart_is_a_store_error_then_recovers(tmp_path: Path) -> None:
    server = RedisProcess(workdir=tmp_path / "redis")
    server.start()
    store = RedisStore(server.url, LIMITS, namespace="t")
    try:
        await store.open()
        await store.save_users([user("alice")])
        server.kill()
        with pytest.raises(StoreError, match="save users failed"):
            await store.save_users([user("bob")])
        server.restart()  # same port
        await store.save_users([user("bob")])  # the client reconnects by itself
        assert [u.id for u in await store.load_users()] == ["bob"]  # no persistence configured
    finally:
        await store.close()
        server.cleanup()
