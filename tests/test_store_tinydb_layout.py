"""The TinyDB store's own file layout: one document per line, documents kept as text.

A restart finds each user's text by splitting lines instead of parsing the file, and validates
users in batches; the clean-stop marker is a file of its own. None of that may change what a
file means: files of the older single-line layout (and any other JSON) still load, the file
stays one JSON document that TinyDB reads, and a line that is not JSON is refused as corrupt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinydb import TinyDB

from hub.core.models import DeviceRecord, UserRecord
from hub.stores import ActivityLimits, StoreError
from hub.stores.tinydb import TinyDBStore

LIMITS = ActivityLimits(max_entries=5, max_age_ms=10_000)


def users(n: int) -> list[UserRecord]:
    return [UserRecord(id=f"u{k}", name=f"User {k} ✓", version=k,
                       devices=[DeviceRecord(id="phone", name="Phone", session=f"s{k}")])
            for k in range(n)]


async def write(path: Path, records: list[UserRecord]) -> None:
    store = TinyDBStore(path, LIMITS)
    await store.open()
    await store.save_users(records)
    await store.close()


async def test_the_file_is_one_document_per_line_and_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "db.json"
    await write(path, users(3))
    lines = path.read_bytes().split(b"\n")
    assert lines[0] == b'{"users":{'
    assert [line[:5] for line in lines[1:4]] == [b'"u0":', b'"u1":', b'"u2":']
    assert json.loads(path.read_bytes())["users"]["u1"]["name"] == "User 1 ✓"
    db = TinyDB(path, access_mode="r")
    try:
        assert len(db.table("users")) == 3
    finally:
        db.close()


async def test_users_load_in_batches_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "db.json"
    records = users(7)
    await write(path, records)
    store = TinyDBStore(path, LIMITS)
    await store.open()
    try:
        batches = [batch async for batch in store.load_user_batches(size=3)]
    finally:
        await store.close()
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [u for b in batches for u in b] == records


async def test_a_file_of_the_older_layout_loads_and_is_rewritten_in_lines(tmp_path: Path) -> None:
    """What the store wrote before (compact JSON on one line, the marker in ``meta``)."""
    path = tmp_path / "db.json"
    records = users(2)
    path.write_text(json.dumps({
        "users": {u.id: u.model_dump(mode="json", by_alias=True) for u in records},
        "meta": {"hub": {"clean": False}},
    }, separators=(",", ":")))
    store = TinyDBStore(path, LIMITS)
    await store.open()
    try:
        assert await store.load_users() == records
        assert await store.swap_clean_stop(False) is False  # the old marker said: crashed
        await store.save_users([UserRecord(id="carol", name="carol")])
    finally:
        await store.close()
    assert path.read_bytes().startswith(b'{"users":{\n"u0":')
    assert json.loads(path.read_bytes())["users"]["carol"]["id"] == "carol"


async def test_the_clean_stop_marker_is_a_file_of_its_own(tmp_path: Path) -> None:
    """Flipping it at every start must not rewrite the whole database."""
    path = tmp_path / "db.json"
    await write(path, users(2))
    before = path.read_bytes()
    store = TinyDBStore(path, LIMITS)
    await store.open()
    try:
        assert await store.swap_clean_stop(False) is True
        assert store.file_writes == 0
        assert json.loads(store.marker_path.read_bytes()) == {"clean": False}
    finally:
        await store.close()
    assert path.read_bytes() == before
    again = TinyDBStore(path, LIMITS)
    await again.open()
    try:
        assert await again.swap_clean_stop(True) is False  # no clean stop since
    finally:
        await again.close()


async def test_a_line_that_is_not_json_is_refused_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "db.json"
    await write(path, users(3))
    broken = path.read_bytes().replace(b'"u1":{"schema":1,', b'"u1":{"schema":1,,')
    path.write_bytes(broken)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(broken)
    store = TinyDBStore(path, LIMITS)
    await store.open()
    try:
        with pytest.raises(StoreError, match="corrupt") as err:
            await store.load_users()
    finally:
        await store.close()
    assert str(expected.value) in str(err.value)
    assert path.read_bytes() == broken


async def test_a_hand_edited_file_in_another_layout_still_loads(tmp_path: Path) -> None:
    """Indented JSON (as ``TinyDB(path, indent=2)`` writes it) takes the general path."""
    path = tmp_path / "db.json"
    records = users(2)
    path.write_text(json.dumps(
        {"users": {u.id: u.model_dump(mode="json", by_alias=True) for u in records}}, indent=2))
    store = TinyDBStore(path, LIMITS)
    await store.open()
    try:
        assert await store.load_users() == records
    finally:
        await store.close()
