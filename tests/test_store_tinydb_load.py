"""The TinyDB store's fast start-up path loads exactly what the plain path loaded.

``TinyDBStore`` parses its file with pydantic's JSON parser (falling back to ``json.loads``),
validates user documents straight from the storage's table and holds the garbage collector off
meanwhile. None of that may change what a file means: these tests write real files and compare
the loaded records with what the records were, and with what ``json.loads`` plus per-document
validation (the previous path) makes of the same file.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.core.models import DeviceRecord, UserRecord
from hub.stores import ActivityLimits, StoreError
from hub.stores.tinydb import TinyDBStore

LIMITS = ActivityLimits(max_entries=5, max_age_ms=10_000)


def varied_users() -> list[UserRecord]:
    """Records that exercise every field: defaults, None, unicode, big ints, virtual devices."""
    return [
        UserRecord(id="plain", name="plain"),
        UserRecord(
            id="alice", name="Alice Ünïcødé ✓", status="dnd", manual_status="dnd",
            custom_status="In a \"meeting\"\n", active_device="phone", version=2**40,
            last_seen=1_700_000_000_123, last_sync=1_700_000_000_000,
            channels={"telegram-123": 1_700_000_000_000, "ü": 0},
            devices=[
                DeviceRecord(id="phone", name="Phone 📱", session="s1", connected=True,
                             status="online", last_seen=1, last_interaction=2, acked_version=9),
                DeviceRecord(id="bot", name="bot", virtual=True, ended=True, status="away"),
            ],
        ),
        UserRecord(id="bob", name="", status="away", devices=[DeviceRecord(id="d", name="d")]),
    ]


def reference_load(path: Path) -> list[UserRecord]:
    """What the store loaded before the fast path: ``json.loads`` and one validate per user."""
    data = json.loads(path.read_bytes())
    out = []
    for doc in data.get("users", {}).values():
        try:
            out.append(UserRecord.model_validate(dict(doc)))
        except ValueError:
            continue
    return out


async def load(path: Path) -> list[UserRecord]:
    store = TinyDBStore(path, LIMITS)
    await store.open()
    try:
        return await store.load_users()
    finally:
        await store.close()


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """Whatever a test does to the collector, the next test starts with it as it was."""
    enabled = gc.isenabled()
    yield
    if enabled:
        gc.enable()
    else:
        gc.disable()


async def test_a_file_written_by_the_store_loads_the_same_records(tmp_path: Path) -> None:
    path = tmp_path / "presence.json"
    users = varied_users()
    store = TinyDBStore(path, LIMITS)
    await store.open()
    await store.save_users(users)
    await store.close()
    loaded = await load(path)
    assert loaded == users
    assert [u.model_fields_set for u in loaded] == [u.model_fields_set for u in reference_load(path)]
    assert loaded == reference_load(path)


async def test_loading_does_not_change_the_stored_documents(tmp_path: Path) -> None:
    path = tmp_path / "presence.json"
    store = TinyDBStore(path, LIMITS)
    await store.open()
    await store.save_users(varied_users())
    await store.close()
    before = json.loads(path.read_bytes())
    again = TinyDBStore(path, LIMITS)
    await again.open()
    try:
        loaded = await again.load_users()
        loaded[1].devices.clear()  # a caller changing its records must not reach the file
        loaded[1].channels["new"] = 1
        await again.save_users([UserRecord(id="carol", name="carol")])
    finally:
        await again.close()
    after = json.loads(path.read_bytes())
    assert after["users"].pop("carol")["id"] == "carol"
    assert after == before


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda text: b"\xef\xbb\xbf" + text.encode(), id="utf-8 byte-order mark"),
        pytest.param(lambda text: text.encode("utf-16"), id="utf-16"),
        pytest.param(lambda text: text.replace('"note"', '"\\ud800"').encode(),
                     id="lone surrogate escape"),
    ],
)
async def test_files_only_json_loads_accepts_still_load(tmp_path: Path, encode: Any) -> None:
    """pydantic's parser refuses these; ``json.loads`` did not, so neither may the store."""
    path = tmp_path / "presence.json"
    doc = UserRecord(id="alice", name="Alice", custom_status="x").model_dump(
        mode="json", by_alias=True
    )
    doc["note"] = "an unknown field"  # ignored by the model, kept in the file
    path.write_bytes(encode(json.dumps({"users": {"alice": doc}}, ensure_ascii=False)))
    loaded = await load(path)
    assert [u.id for u in loaded] == ["alice"]
    assert loaded == reference_load(path)


async def test_broken_json_is_refused_with_json_loads_message(tmp_path: Path) -> None:
    path = tmp_path / "presence.json"
    content = b'{"users": {"alice": {"id": "alice", "name": "A"}, "bob": {'
    path.write_bytes(content)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(content)
    with pytest.raises(StoreError, match="corrupt") as err:
        await TinyDBStore(path, LIMITS).open()
    assert str(expected.value) in str(err.value)
    assert str(path) in str(err.value)
    assert path.read_bytes() == content


async def test_wrong_schema_documents_are_skipped_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "presence.json"
    good = UserRecord(id="alice", name="Alice").model_dump(mode="json", by_alias=True)
    newer = {**good, "id": "zed", "schema": 2}
    path.write_text(json.dumps({"users": {
        "alice": good, "bob": {"id": "bob", "version": "x"}, "zed": newer,
    }}))
    with caplog.at_level(logging.WARNING, logger="hub.stores.tinydb"):
        loaded = await load(path)
    assert [u.id for u in loaded] == ["alice"]
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable user" in r.message]
    assert len(skipped) == 2
    assert "'bob'" in skipped[0] and "'zed'" in skipped[1]
    assert json.loads(path.read_bytes())["users"]["zed"] == newer  # kept for a newer version


async def test_the_collector_is_left_as_it_was(tmp_path: Path, gc_restored: None) -> None:
    path = tmp_path / "presence.json"
    store = TinyDBStore(path, LIMITS)
    await store.open()
    await store.save_users(varied_users())
    await store.close()
    gc.enable()
    assert len(await load(path)) == 3
    assert gc.isenabled()
    gc.disable()  # a caller that holds the collector off keeps it off
    assert len(await load(path)) == 3
    assert not gc.isenabled()
