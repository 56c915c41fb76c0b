"""``UserText.read``: a stored user's restart fields read off its JSON text, without validating.

Why: a restart reads a million devices' users from TinyDB, and :class:`UserText` takes the
fields a restart needs straight off each user's text (one regular expression and a few
searches) instead of validating it into a :class:`UserRecord`. That is only right if every
field it returns is exactly the record's, and if it declines (None, so the caller validates
as before) every text it cannot read exactly. So:

1. Hypothesis draws records of every kind (ids, names, custom status, sessions and channel keys
   of plain id characters or of arbitrary text with quotes, backslashes, control characters,
   unicode, emoji and JSON-looking fragments; devices connected or not, real or virtual, of any
   status; stored statuses that do or do not follow the devices; primaries that are or are not
   devices; removed or not), and, two times in three, a record of the hub's own kind with one
   thing wrong (removed, a device disconnected or virtual, a status or manual status or device
   status changed, a primary that may be no device, an escaped string, a number of 19 digits,
   an empty id, or nothing), which is where a mistake in ``read`` would show. For each it reads
   ``rec.to_json()``: whenever ``read`` returns a ``UserText``, every field equals the
   record's and the record is one ``read`` may take (not removed, a device at least, every
   device connected and real, nothing escaped in the text, the stored status the one the
   devices give, the primary one of the devices); whenever the record is such a one, ``read``
   does not return None (the restart's fast path; about a quarter of these examples take it,
   see ``--hypothesis-show-statistics``). A second property draws only records of the hub's
   kind, and every one of them must take the fast path.

   Besides the conditions above, ``read`` also needs what the hub's records always are: ids not
   empty, and every integer within 18 digits (``acked_version`` not negative). The properties
   draw outside that too, and expect the fast path only within it.

2. Texts that are valid JSON but not exactly what ``UserRecord.to_json`` writes of such a record
   (another key order, spaces, unknown or missing fields, another schema, a device virtual or
   disconnected, a status the devices do not give, a primary that is no device, a removed user,
   an escaped string, a 19-digit number, a device field of the wrong type) all give None.

3. The users the restart benchmark writes (``bench/storm.py``) take the fast path, both as
   records built here and as read from the TinyDB file it writes.
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hub.core.models import DeviceRecord, UserRecord, UserText
from hub.protocol import STATUSES

DEVICE_STATUSES = ("online", "away", "offline")
#: integers the text layout reads (``-?[0-9]{1,18}``)
INT_LIMIT = 10**18

# --------------------------------------------------------------------------------------------
# Strategies
#
# A draw costs Hypothesis a fraction of a millisecond and a record takes dozens, so strings and
# integers come mostly from pools of the values that matter to the layout (a character JSON
# escapes or not, a fragment of the layout, 18 digits or 19), with generated ones besides.

_ID_CHARS = string.ascii_letters + string.digits + "_.-"
#: an id as the hub makes them (``[A-Za-z0-9_.-]``)
PLAIN = st.one_of(
    st.sampled_from(["d0", "d1", "u1", "a", "Z", "A.b-c_9", "0", "-", ".", "x" * 64]),
    st.text(alphabet=_ID_CHARS, min_size=1, max_size=6),
)
#: strings JSON writes as they are (no quote, backslash or control character below 0x20),
#: some of them like pieces of the layout
UNESCAPED = st.one_of(
    st.sampled_from(["", " ", "Ann", "Zoë 😀", "{}:,[]", "status", "online", "null", "true",
                     "id", "timeout_ms", "\x7f\x85\u2028\u2029", "ß✓", "x" * 100, "d0"]),
    st.text(alphabet="aZ0_ -.é😀{}[]:,ß✓中\x7f\x85\xa0\u2028/", max_size=5),
)
#: strings with a character JSON escapes, some with pieces of the layout that would fool a
#: search if they were not escaped
ESCAPED = st.sampled_from(['"', "\\", "a\nb", "\t", "\x00", "\x1f", 'say "hi"', "C:\\dir",
                           '"status":"online"', '{"id":"d0",', ',"timeout_ms":5,',
                           '","removed":false}', "\\u0041", 'd0"', "\b\f\r"])
#: any text
TEXT = st.one_of(PLAIN, UNESCAPED, ESCAPED, st.text(max_size=5))

#: integers the layout reads (``-?[0-9]{1,18}``), and beyond
_IN_RANGE = [0, 1, -1, 42, 1_700_000_000_000, -(10**6), INT_LIMIT - 1, -(INT_LIMIT - 1)]
_OUT_OF_RANGE = [INT_LIMIT, -INT_LIMIT, 2**63, -(2**63), 10**25]
OPT_INT = st.sampled_from([None, *_IN_RANGE])
ANY_OPT_INT = st.sampled_from([None, *_IN_RANGE, *_OUT_OF_RANGE])


def int_quads(pool: list[int | None]) -> st.SearchStrategy[tuple[int | None, ...]]:
    """Four values of ``pool`` in one draw (a device's four optional integers)."""
    n = len(pool)
    return st.integers(0, n**4 - 1).map(lambda k: tuple(pool[k // n**j % n] for j in range(4)))


QUAD = int_quads([None, *_IN_RANGE])
ANY_QUAD = int_quads([None, *_IN_RANGE, *_OUT_OF_RANGE])
ANY_INT = st.sampled_from([*_IN_RANGE, *_OUT_OF_RANGE])
ACKED = st.sampled_from([0, 1, 7, 2**40, INT_LIMIT - 1])
ANY_ACKED = st.sampled_from([0, 1, 7, 2**40, INT_LIMIT - 1, INT_LIMIT, -1])
TIMEOUT = st.none() | st.integers(1, 10**6)
STATUS = st.sampled_from(STATUSES)
OPT_STATUS = st.none() | STATUS
DEVICE_STATUS = st.sampled_from(DEVICE_STATUSES)
VERSION = st.integers(0, 2**40)
EIGHT = st.integers(0, 7)
FOUR = st.integers(0, 3)
BOOL = st.booleans()


@dataclass(frozen=True)
class Kind:
    """The strategies for the fields of one kind of record (built once: Hypothesis validates
    a strategy on its first draw, and a record takes dozens)."""

    #: the hub's kind, which the fast path must take (see the module docstring)
    consistent: bool
    id: st.SearchStrategy[str]
    text: st.SearchStrategy[str]
    opt_text: st.SearchStrategy[str | None]
    opt_int: st.SearchStrategy[int | None]
    quad: st.SearchStrategy[tuple[int | None, ...]]
    acked: st.SearchStrategy[int]
    channels: st.SearchStrategy[dict[str, int]]


ANY = Kind(False, TEXT, TEXT, st.none() | TEXT, ANY_OPT_INT, ANY_QUAD, ANY_ACKED,
           st.dictionaries(TEXT, st.integers(-1000, 1000) | ANY_INT, max_size=3))
CONSISTENT = Kind(True, PLAIN, UNESCAPED, st.none() | UNESCAPED, OPT_INT, QUAD, ACKED,
                  st.dictionaries(UNESCAPED, st.integers(-1000, 1000) | st.sampled_from(_IN_RANGE),
                                  max_size=3))


def derived_status(devices: list[DeviceRecord], manual: str | None) -> str:
    """The user's status by the engine's rule, from its devices and manual status."""
    statuses = {d.status for d in devices}
    if not statuses & {"online", "away"}:
        return "offline"
    if manual is not None:
        return manual
    return "online" if "online" in statuses else "away"


@st.composite
def device_records(draw: st.DrawFn, kind: Kind) -> DeviceRecord:
    flags = draw(EIGHT)  # virtual, connected, ended
    if kind.consistent:
        flags = flags & 0b100 | 0b010
    last_seen, last_interaction, sleep_until, born_ts = draw(kind.quad)
    return DeviceRecord(
        id=draw(kind.id),
        name=draw(kind.text),
        virtual=bool(flags & 0b001),
        session=draw(kind.opt_text),
        connected=bool(flags & 0b010),
        ended=bool(flags & 0b100),
        status=draw(DEVICE_STATUS),
        last_seen=last_seen,
        last_interaction=last_interaction,
        acked_version=draw(kind.acked),
        timeout_ms=draw(TIMEOUT),
        sleep_until=sleep_until,
        born_ts=born_ts,
    )


DEVICES = {False: st.lists(device_records(ANY), max_size=4),
           True: st.lists(device_records(CONSISTENT), min_size=1, max_size=4)}


@st.composite
def user_records(draw: st.DrawFn, kind: Kind = ANY) -> UserRecord:
    """A record of the ``kind`` (any, or one the fast path must take)."""
    devices = draw(DEVICES[kind.consistent])
    manual = draw(OPT_STATUS)
    status = (derived_status(devices, manual) if kind.consistent or draw(BOOL)
              else draw(STATUS))
    # the primary: none, one of the devices, or (of any kind) any text
    active: str | None = None
    choice = draw(EIGHT)
    if devices and choice < 4:
        active = devices[choice].id if choice < len(devices) else devices[0].id
    elif not kind.consistent and choice == 7:
        active = draw(TEXT)
    return UserRecord(
        id=draw(kind.id),
        name=draw(kind.text),
        status=status,
        manual_status=manual,
        custom_status=draw(kind.opt_text),
        active_device=active,
        version=draw(VERSION),
        version_reserved=draw(VERSION),
        last_seen=draw(kind.opt_int),
        last_sync=draw(kind.opt_int),
        channels=draw(kind.channels),
        devices=devices,
        removed=not kind.consistent and draw(BOOL),
    )


#: (an escaped string twice: it may land on an id, which read declines either way)
FAULT = st.sampled_from(["none", "removed", "disconnected", "virtual", "status", "manual",
                         "device status", "devices offline", "primary", "escaped", "escaped",
                         "no devices", "out of range", "empty id"])
ESCAPED_FIELD = st.sampled_from(["id", "name", "custom_status", "channel", "device id",
                                 "device name", "session"])
OUT_OF_RANGE = st.sampled_from(_OUT_OF_RANGE)
INT_FIELD = st.sampled_from(["last_seen", "last_sync", "channel", "device last_seen",
                             "device last_interaction", "device acked_version",
                             "device sleep_until", "device born_ts"])


@st.composite
def near_records(draw: st.DrawFn) -> UserRecord:
    """A consistent record with (at most) one thing wrong: the edge of what read takes."""
    rec: UserRecord = draw(user_records(CONSISTENT))
    fault = draw(FAULT)
    i = draw(FOUR) % len(rec.devices)

    def user(**update: Any) -> UserRecord:
        return rec.model_copy(update=update)

    def device(**update: Any) -> UserRecord:
        devices = list(rec.devices)
        devices[i] = devices[i].model_copy(update=update)
        return user(devices=devices)

    if fault == "removed":
        return user(removed=True)
    if fault == "disconnected":  # disconnected, yet not offline
        return device(connected=False, status=draw(st.sampled_from(["online", "away"])))
    if fault == "virtual":
        return device(virtual=True)
    if fault == "status":
        return user(status=draw(STATUS))
    if fault == "manual":
        return user(manual_status=draw(OPT_STATUS))
    if fault == "device status":
        return device(status=draw(DEVICE_STATUS))
    if fault == "devices offline":  # the stored status kept: offline only if it was
        return user(devices=[d.model_copy(update={"status": "offline"}) for d in rec.devices])
    if fault == "primary":
        return user(active_device=draw(TEXT))
    if fault == "escaped":
        where = draw(ESCAPED_FIELD)
        escaped = draw(ESCAPED)
        if where == "channel":
            return user(channels={**rec.channels, escaped: 1})
        if where.startswith("device "):
            return device(**{where.removeprefix("device "): escaped})
        return user(**{where: escaped})
    if fault == "no devices":
        return user(devices=[], status="offline", active_device=None)
    if fault == "out of range":
        number = draw(OUT_OF_RANGE)
        where = draw(INT_FIELD)
        if where == "channel":
            return user(channels={**rec.channels, "c": number})
        if where.startswith("device "):
            return device(**{where.removeprefix("device "): abs(number)})
        return user(**{where: number})
    if fault == "empty id":
        return device(id="") if draw(BOOL) else user(id="")
    return rec


# --------------------------------------------------------------------------------------------
# What read must give


def fast_conditions(rec: UserRecord, text: bytes) -> bool:
    """The record is one ``read`` may take (and, in the hub's domain, must)."""
    return (
        not rec.removed
        and len(rec.devices) > 0
        and all(not d.virtual and (d.connected or d.status == "offline") for d in rec.devices)
        and b"\\" not in text  # nothing escaped in any string
        and rec.status == derived_status(rec.devices, rec.manual_status)
        and (rec.active_device is None or rec.active_device in {d.id for d in rec.devices})
    )


def in_domain(rec: UserRecord) -> bool:
    """What every record the hub writes is: ids not empty, integers within 18 digits."""
    ints: list[int | None] = [rec.version, rec.version_reserved, rec.last_seen, rec.last_sync,
                              *rec.channels.values()]
    for d in rec.devices:
        ints += [d.last_seen, d.last_interaction, d.acked_version, d.timeout_ms, d.sleep_until,
                 d.born_ts]
    return (rec.id != "" and all(d.id != "" for d in rec.devices)
            and all(d.acked_version >= 0 for d in rec.devices)
            and all(v is None or abs(v) < INT_LIMIT for v in ints))


def assert_fields(u: UserText, rec: UserRecord, text: bytes) -> None:
    assert u.text is text
    assert u.id == rec.id
    assert u.name == rec.name
    assert u.status == rec.status
    assert u.custom_status == rec.custom_status
    assert u.active_device == rec.active_device
    assert u.version == rec.version
    assert u.version_reserved == rec.version_reserved
    assert u.devices == len(rec.devices)
    timeouts = [d.timeout_ms for d in rec.devices if d.timeout_ms is not None]
    assert u.min_timeout == (min(timeouts) if timeouts else None)
    assert u.uses_default == any(d.timeout_ms is None for d in rec.devices)
    assert u.record() == rec


# --------------------------------------------------------------------------------------------
# 1. Properties


@given(st.one_of(user_records(), near_records(), near_records()))
@settings(max_examples=300, deadline=None)
def test_read_takes_exactly_the_records_it_can_read_and_reads_them_right(rec: UserRecord) -> None:
    text = rec.to_json()
    u = UserText.read(text)
    fast = fast_conditions(rec, text)
    event("fast path" if u is not None else "None")
    if u is not None:
        assert fast, "read took a text it must decline"
        assert in_domain(rec)
        assert_fields(u, rec, text)
    elif fast and in_domain(rec):
        pytest.fail(f"read declined a text it must take: {text!r}")


@given(user_records(CONSISTENT))
@settings(max_examples=300, deadline=None)
def test_a_consistent_record_takes_the_fast_path(rec: UserRecord) -> None:
    text = rec.to_json()
    assert fast_conditions(rec, text) and in_domain(rec)  # the strategy's own promise
    u = UserText.read(text)
    assert u is not None, f"read declined a text it must take: {text!r}"
    assert_fields(u, rec, text)


# --------------------------------------------------------------------------------------------
# 2. Examples: texts read declines

BASE = UserRecord(
    id="u1", name="Ann ✓", status="online", custom_status="at lunch", active_device="d0",
    version=7, version_reserved=9, last_seen=1_700_000_000_000, last_sync=None,
    channels={"general": 3, "random": -1},
    devices=[
        DeviceRecord(id="d0", name="Phone", session="s0", connected=True, status="online",
                     last_seen=1_700_000_000_000, acked_version=7, timeout_ms=5000, born_ts=123),
        DeviceRecord(id="d1", name="Laptop", connected=True, ended=True, status="away",
                     timeout_ms=None),
    ],
)


def base_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(BASE.to_json())
    return doc


def compact(doc: Any) -> bytes:
    """JSON in the layout ``to_json`` writes (compact, unicode as it is)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def edited(change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = base_doc()
    change(doc)
    return compact(doc)


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return change


def _id_first(doc: dict[str, Any]) -> None:
    reordered = {"id": doc.pop("id"), **doc}
    doc.clear()
    doc.update(reordered)


def _device_keys_reversed(doc: dict[str, Any]) -> None:
    doc["devices"][1] = dict(reversed(doc["devices"][1].items()))


def _all_devices_offline(doc: dict[str, Any]) -> None:
    for d in doc["devices"]:
        d["status"] = "offline"


def test_the_base_record_takes_the_fast_path_and_its_edits_start_from_its_text() -> None:
    text = BASE.to_json()
    assert compact(base_doc()) == text  # every edit below changes only what it says
    u = UserText.read(text)
    assert u is not None
    assert_fields(u, BASE, text)
    assert (u.min_timeout, u.uses_default, u.devices) == (5000, True, 2)


#: texts of BASE in another layout: the same record, but not read
OTHER_LAYOUTS: dict[str, Callable[[], bytes]] = {
    "keys reordered": lambda: edited(_id_first),
    "a device's keys reordered": lambda: edited(_device_keys_reversed),
    "spaces after colons and commas": lambda: json.dumps(base_doc(), ensure_ascii=False).encode(),
    "spaces after colons only": lambda: json.dumps(base_doc(), separators=(",", ": "),
                                                   ensure_ascii=False).encode(),
    "pretty printed": lambda: json.dumps(base_doc(), indent=1, ensure_ascii=False).encode(),
    "an unknown field": lambda: edited(_set(("extra",), 1)),
    "an unknown field in a device": lambda: edited(_set(("devices", 0, "extra"), "x")),
    "non-ascii written escaped": lambda: json.dumps(base_doc(), separators=(",", ":")).encode(),
    "a string escaped needlessly": lambda: BASE.to_json().replace(b'"Phone"', b'"Ph\\u006fne"'),
    "a trailing newline": lambda: BASE.to_json() + b"\n",
}

#: other records (valid or not) in the exact layout, none of which read may take
DECLINED: dict[str, Callable[[], bytes]] = {
    "a device missing a field": lambda: edited(_delete(("devices", 1, "born_ts"))),
    "a user missing a field": lambda: edited(_delete(("last_sync",))),
    "no schema": lambda: edited(_delete(("schema",))),
    "schema 2": lambda: edited(_set(("schema",), 2)),
    "a virtual device": lambda: edited(_set(("devices", 1, "virtual"), True)),
    "a disconnected device still online": lambda: edited(_set(("devices", 0, "connected"),
                                                             False)),
    "status away while a device is online": lambda: edited(_set(("status",), "away")),
    "status dnd without a manual status": lambda: edited(_set(("status",), "dnd")),
    "status offline while a device is online": lambda: edited(_set(("status",), "offline")),
    "a manual status the status does not follow": lambda: edited(_set(("manual_status",), "dnd")),
    "status online with every device offline": lambda: edited(_all_devices_offline),
    "a primary that is no device": lambda: edited(_set(("active_device",), "d9")),
    "a primary that is a prefix of a device": lambda: edited(_set(("active_device",), "d")),
    "an empty primary": lambda: edited(_set(("active_device",), "")),
    "removed": lambda: edited(_set(("removed",), True)),
    "no devices": lambda: edited(_set(("devices",), [])),
    "a name with an escaped quote": lambda: edited(_set(("name",), 'A"nn')),
    "a name with a backslash": lambda: edited(_set(("name",), "A\\nn")),
    "a custom status with a newline": lambda: edited(_set(("custom_status",), "a\nb")),
    "a device session with a tab": lambda: edited(_set(("devices", 0, "session"), "s\t0")),
    "a channel key with a quote": lambda: edited(_set(("channels",), {'g"': 1})),
    "a version of 19 digits": lambda: edited(_set(("version",), 10**18)),
    "a version of 20 digits": lambda: edited(_set(("version",), 10**19 + 5)),
    "a reserved version of 19 digits": lambda: edited(_set(("version_reserved",), 10**18)),
    "a negative version": lambda: edited(_set(("version",), -1)),
    "a float version": lambda: edited(_set(("version",), 7.0)),
    "a string version": lambda: edited(_set(("version",), "7")),
    "a device last_seen of 19 digits": lambda: edited(_set(("devices", 0, "last_seen"), 10**18)),
    "a channel value of 19 digits": lambda: edited(_set(("channels", "general"), -(10**18))),
    'acked_version "x"': lambda: edited(_set(("devices", 0, "acked_version"), "x")),
    "acked_version negative": lambda: edited(_set(("devices", 0, "acked_version"), -1)),
    "timeout_ms a string": lambda: edited(_set(("devices", 0, "timeout_ms"), "5000")),
    "timeout_ms 0": lambda: edited(_set(("devices", 0, "timeout_ms"), 0)),
    "session a number": lambda: edited(_set(("devices", 0, "session"), 5)),
    "ended a string": lambda: edited(_set(("devices", 0, "ended"), "yes")),
    "born_ts a float": lambda: edited(_set(("devices", 0, "born_ts"), 1.5)),
    "a device status dnd": lambda: edited(_set(("devices", 0, "status"), "dnd")),
    "an empty device id": lambda: edited(_set(("devices", 1, "id"), "")),
    "an empty user id": lambda: edited(_set(("id",), "")),
    "a user id that is a number": lambda: edited(_set(("id",), 1)),
    "a name that is null": lambda: edited(_set(("name",), None)),
    "a device that is not an object": lambda: edited(_set(("devices", 1), "d1")),
    "channels a list": lambda: edited(_set(("channels",), [])),
    "a user that is a list": lambda: compact([base_doc()]),
}


@pytest.mark.parametrize("make", OTHER_LAYOUTS.values(), ids=OTHER_LAYOUTS.keys())
def test_the_same_record_in_another_layout_is_declined(make: Callable[[], bytes]) -> None:
    text = make()
    assert text != BASE.to_json()
    assert UserRecord.model_validate_json(text) == BASE  # the caller validates it as before
    assert UserText.read(text) is None


@pytest.mark.parametrize("make", DECLINED.values(), ids=DECLINED.keys())
def test_a_text_read_cannot_take_is_declined(make: Callable[[], bytes]) -> None:
    text = make()
    assert text != BASE.to_json()
    json.loads(text)  # valid JSON: only read's own rules decline it
    assert UserText.read(text) is None


@pytest.mark.parametrize("old, new", [
    (b'"name":"Ann \xe2\x9c\x93"', b'"name":"Ann \xff"'),  # not UTF-8 at all
    (b'"name":"Ann \xe2\x9c\x93"', b'"name":"Ann \xe2\x9c"'),  # a character cut short
    (b'"session":"s0"', b'"session":"s\xc3"'),
    (b'"id":"u1"', b'"id":"u\xed\xa0\x80"'),  # a surrogate, which UTF-8 does not encode
], ids=["name 0xff", "name cut", "session cut", "id surrogate"])
def test_a_text_that_is_not_utf8_is_declined(old: bytes, new: bytes) -> None:
    text = BASE.to_json()
    assert text.count(old) == 1
    assert UserText.read(text.replace(old, new)) is None  # validating it says what is wrong


def test_a_plain_unicode_name_and_extreme_values_are_read_exactly() -> None:
    rec = BASE.model_copy(update={
        "name": "Zoë 😀 {}:,[] status", "custom_status": "", "active_device": None,
        "version": INT_LIMIT - 1, "version_reserved": 0, "last_seen": -(INT_LIMIT - 1),
        "status": "dnd", "manual_status": "dnd", "channels": {},
        "devices": [BASE.devices[0].model_copy(update={"timeout_ms": 10**6}),
                    BASE.devices[1].model_copy(update={"timeout_ms": 1})],
    })
    text = rec.to_json()
    u = UserText.read(text)
    assert u is not None
    assert_fields(u, rec, text)
    assert (u.min_timeout, u.uses_default) == (1, False)


# --------------------------------------------------------------------------------------------
# 3. The benchmark's users


def bench_users(devices: int, now: int = 1_700_000_000_000) -> list[UserRecord]:
    """What ``bench.storm._write_db`` writes: users ``u{k}`` with devices d0/d1 connected and
    online (the last user has d0 alone when ``devices`` is odd)."""
    users = []
    for k in range((devices + 1) // 2):
        devs = [DeviceRecord(id=f"d{j}", name=f"d{j}", session=f"s{k}x{j}", connected=True,
                             status="online", last_seen=now, last_interaction=now)
                for j in range(2) if 2 * k + j < devices]
        users.append(UserRecord(id=f"u{k}", name=f"u{k}", status="online", active_device="d0",
                                version=1, devices=devs))
    return users


def test_the_benchmark_users_take_the_fast_path() -> None:
    users = bench_users(7)
    assert [len(u.devices) for u in users] == [2, 2, 2, 1]
    for rec in users:
        text = rec.to_json()
        u = UserText.read(text)
        assert u is not None, text
        assert_fields(u, rec, text)
        assert (u.min_timeout, u.uses_default, u.status) == (None, True, "online")


def test_the_benchmark_file_loads_as_texts(tmp_path: Path) -> None:
    from bench.storm import write_db
    from hub.stores.tinydb import TinyDBStore

    path = tmp_path / "db.json"
    write_db(path, 7)

    async def load() -> list[UserRecord | UserText]:
        store = TinyDBStore(path)
        await store.open()
        try:
            return [u async for batch in store.load_user_batches(texts=True) for u in batch]
        finally:
            await store.close()

    loaded = asyncio.run(load())
    assert [type(u) for u in loaded] == [UserText] * 4
    for u in loaded:
        assert isinstance(u, UserText)
        rec = u.record()
        assert_fields(u, rec, u.text)
        assert (u.id, u.name, u.status, u.active_device, u.version) == (
            rec.id, rec.id, "online", "d0", 1)
    assert [u.record().model_copy(update={"devices": []}) for u in loaded] == [
        r.model_copy(update={"devices": []}) for r in bench_users(7)]
