"""The Redis store: state shared by several processes, written in transactions of whole users.

Key layout (``ns`` is the namespace, ``presence`` by default), chosen so that other tools can
read it with plain commands (``HGETALL``, ``SMEMBERS``, ``XREVRANGE``):

* ``{ns}:users``: set of user ids.
* ``{ns}:user:{user}``: hash of the user's record fields. Fields whose type is a string are
  stored as is, every other field JSON-encoded; a ``None`` field is absent. Its ``devices``
  field is the JSON list of device ids, which keeps the record's device order.
* ``{ns}:devices:{user}``: set of the user's device ids, so a save can delete the hashes of
  devices that left the record.
* ``{ns}:device:{user}:{device}``: hash of one device record, encoded like the user hash.
* ``{ns}:activity:{user}``: stream of the user's activity, one JSON entry in field ``a`` and
  the entry's id (:class:`~hub.stores.base.ActivityIds`) in field ``i``. The stream id's
  millisecond part is the entry's ``received_at`` (raised to the previous id when the hub's
  clock went backwards), so ``XTRIM MINID`` cuts by age; ``MAXLEN`` cuts by count.

Why transactions: a batch is written in ``MULTI``/``EXEC`` transactions (one per 500 users, see
``_CHUNK_USERS``), so a hub that dies mid-flush never leaves a user with half its fields or an
orphan device; a batch of more than 500 users may land partly, each user whole. The set of
devices to delete is read under ``WATCH``, so a concurrent writer makes the transaction retry
rather than leak keys.
A load reads users in chunks through one Lua script call a chunk that returns the chunk as the
records' own JSON, parsed with one ``json.loads`` (redis-py parses a reply in Python: with a
pipeline of HGETALLs, 100k users took 33 s to load, with the script about 7 s).
Appends run one small Lua script per user, because a stream id derived from ``received_at``
must be compared with the stream's last id atomically.

Why appends carry ids: a call that times out may still have run (Redis was only slow, or
stopped and then resumed), and the service hands a failed flush's entries over again. The
script skips every entry whose id the stream already holds, so an append is idempotent. Every
call has a deadline (``timeout``): a stalled Redis is a :class:`StoreError` after it, never a
flush that hangs. redis-py retries a call once, on a fresh connection (enough after a
server restart left dead connections in the pool); its default of ten retries made one stall
eleven waits of ``timeout`` before the flush heard of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import types
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hub.core.models import Activity, DeviceRecord, StoredUser, UserRecord
from hub.protocol.urls import redact_url
from hub.stores.base import ActivityIds, ActivityLimits, StoreError, StoreFenced, select_activity
from hub.stores.lease import lease_keys

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_NAMESPACE = "presence"
#: Seconds a Redis call may take. Long enough for the largest batch (a transaction of
#: ``_CHUNK_USERS`` users answers in well under a second), short enough that a stalled server
#: is reported while the operator is still looking.
DEFAULT_TIMEOUT = 10.0
_WATCH_ATTEMPTS = 10
_PAGE = 200
#: Users per transaction. One MULTI/EXEC reply is parsed as a whole by redis-py, in Python,
#: and that cost grows faster than linearly (measured here: 10k HGETALLs in one transaction
#: 4.9 s, 30k hit the read timeout; in transactions of 500, 10k take 3.6 s).
_CHUNK_USERS = 500
_ENTRY_FIELD = "a"

_APPEND_SCRIPT = """
-- KEYS[1]: activity stream; KEYS[2]: the hub lease's fence key; ARGV[1]: max entries;
-- ARGV[2]: oldest ms to keep (0: no age cut); ARGV[3]: our fence ('' when there is no lease);
-- ARGV[4..]: triples of received_at (ms), the entry's id and its JSON, oldest first.
-- Returns -1, writing nothing, when another hub took the lease over (see hub/stores/lease.py).
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[3] then
  return -1
end
local key = KEYS[1]
local cutoff = tonumber(ARGV[2])
local last_ms, last_seq = 0, 0
local held = {}
if redis.call('EXISTS', key) == 1 then
  -- A copy stored by an earlier call has a stream id at or above its received_at: the ids
  -- of the entries from the oldest of this batch on are all that can repeat.
  local oldest = nil
  for i = 4, #ARGV, 3 do
    local ms = tonumber(ARGV[i])
    if oldest == nil or ms < oldest then oldest = ms end
  end
  for _, row in ipairs(redis.call('XRANGE', key, string.format('%.0f', oldest), '+')) do
    local fields = row[2]
    for j = 1, #fields, 2 do
      if fields[j] == 'i' then held[fields[j + 1]] = true end
    end
  end
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local id = info[i + 1]
      local dash = string.find(id, '-', 1, true)
      last_ms = tonumber(string.sub(id, 1, dash - 1))
      last_seq = tonumber(string.sub(id, dash + 1))
    end
  end
end
for i = 4, #ARGV, 3 do
  local ms = tonumber(ARGV[i])
  local entry_id = ARGV[i + 1]
  -- Too old already (a raised stream id would keep it past the age cut), or stored before.
  if ms >= cutoff and not held[entry_id] then
    local seq = 0
    if ms <= last_ms then
      ms = last_ms
      seq = last_seq + 1
    end
    redis.call('XADD', key, 'MAXLEN', ARGV[1], string.format('%.0f-%.0f', ms, seq),
               'a', ARGV[i + 2], 'i', entry_id)
    last_ms, last_seq = ms, seq
    held[entry_id] = true
  end
end
if cutoff > 0 then
  redis.call('XTRIM', key, 'MINID', ARGV[2])
end
local len = redis.call('XLEN', key)
if len == 0 then
  redis.call('DEL', key)
end
return len
"""


def _is_string_type(tp: Any) -> bool:
    if tp is str:
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return all(isinstance(arg, str) for arg in get_args(tp))
    if origin is Union or origin is types.UnionType:
        args = [arg for arg in get_args(tp) if arg is not type(None)]
        return bool(args) and all(_is_string_type(arg) for arg in args)
    return False


class _HashCodec:
    """Model <-> Redis hash: string fields as is, the rest JSON, ``None`` fields left out.

    Which fields are strings comes from the model's types, so decoding is unambiguous: a
    custom status that reads ``"null"`` or ``"42"`` stays a string.
    """

    def __init__(self, model: type[BaseModel], exclude: frozenset[str] = frozenset()) -> None:
        self.model = model
        self.exclude = exclude
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        self.fields = frozenset(fields) - exclude
        self.strings = frozenset(k for k, f in fields.items() if _is_string_type(f.annotation))

    def encode(self, record: BaseModel) -> dict[str, str]:
        out: dict[str, str] = {}
        dumped = record.model_dump(mode="json", by_alias=True, exclude_none=True)
        for key, value in dumped.items():
            if key in self.exclude:
                continue
            out[key] = value if key in self.strings else json.dumps(value, separators=(",", ":"))
        return out

    def decode(self, raw: dict[str, str]) -> dict[str, Any]:
        """Known fields only: an unknown field (a newer writer's) is ignored, not parsed.

        The JSON fields of a hash are parsed as one object (one ``json.loads`` a record, not
        one a field: that was most of a 100k-user load); a record whose text does not parse
        as exactly those fields (a hand edit) is parsed field by field instead.
        """
        out: dict[str, Any] = {}
        parts: list[str] = []
        for key, value in raw.items():
            if key not in self.fields:
                continue
            if key in self.strings:
                out[key] = value
            else:
                parts.append(f'"{key}":{value}')
        if not parts:
            return out
        try:
            parsed = json.loads("{" + ",".join(parts) + "}")
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and len(parsed) == len(parts):
            out.update(parsed)
            return out
        for key, value in raw.items():
            if key in self.fields and key not in self.strings:
                try:
                    out[key] = json.loads(value)
                except ValueError:
                    out[key] = value  # let the model report it as an invalid field
        return out


_LOAD_JSON_SCRIPT = """
-- ARGV[1]: the namespace; ARGV[2]/ARGV[3]: the user's string and other fields, ARGV[4]/
-- ARGV[5]: the device's (space-separated); ARGV[6..]: user ids. One JSON array, an entry per
-- user that exists: [id, {user fields}, [{device fields}, ...]] (devices in the order of the
-- user's devices field), written as the records' own JSON: string fields encoded, every other
-- known field's stored text (JSON already) put in as it is, unknown fields left out.
-- Why a script: redis-py parses every reply in Python (two replies a user with pipelines:
-- 330 us a user, 33 s for 100k users); one JSON string a chunk is parsed in C, with one
-- json.loads; a stored text that is not JSON (a hand edit) fails that parse, and the
-- chunk is read again with every field named a string, then parsed field by field.
local ns = ARGV[1]
local function set_of(text)
  local s = {}
  for name in string.gmatch(text, '%S+') do s[name] = true end
  return s
end
local ustr, uraw, dstr, draw = set_of(ARGV[2]), set_of(ARGV[3]), set_of(ARGV[4]), set_of(ARGV[5])
local function object(flat, strings, raws)
  local parts = {}
  for j = 1, #flat, 2 do
    local k, v = flat[j], flat[j + 1]
    if strings[k] then
      parts[#parts + 1] = cjson.encode(k) .. ':' .. cjson.encode(v)
    elseif raws[k] then
      parts[#parts + 1] = cjson.encode(k) .. ':' .. v
    end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end
local out = {}
for i = 6, #ARGV do
  local uid = ARGV[i]
  local flat = redis.call('HGETALL', ns .. ':user:' .. uid)
  if #flat > 0 then
    local devices = {}
    local listed = nil
    for j = 1, #flat, 2 do
      if flat[j] == 'devices' then listed = flat[j + 1] end
    end
    if listed then
      local ok, ids = pcall(cjson.decode, listed)
      if ok and type(ids) == 'table' then
        for _, did in ipairs(ids) do
          if type(did) == 'string' then
            local df = redis.call('HGETALL', ns .. ':device:' .. uid .. ':' .. did)
            if #df > 0 then devices[#devices + 1] = object(df, dstr, draw) end
          end
        end
      end
    end
    out[#out + 1] = '[' .. cjson.encode(uid) .. ',' .. object(flat, ustr, uraw) .. ',[' ..
      table.concat(devices, ',') .. ']]'
  end
end
return '[' .. table.concat(out, ',') .. ']'
"""


_MEMBERS_JSON = "return cjson.encode(redis.call('SMEMBERS', KEYS[1]))"

_SWAP_CLEAN_STOP = """
-- KEYS: the clean-stop marker, the hub lease's fence key. ARGV: new value, our fence ('': none).
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return -1
end
local was = redis.call('GETSET', KEYS[1], ARGV[1])
if was == false or was == '1' then
  return 1
end
return 0
"""


_USER_CODEC = _HashCodec(UserRecord, exclude=frozenset({"devices"}))
_DEVICE_CODEC = _HashCodec(DeviceRecord)
#: the fields _LOAD_JSON_SCRIPT puts in as strings and as stored JSON, for users and devices
_LOAD_FIELDS = tuple(" ".join(sorted(names)) for names in (
    _USER_CODEC.strings & _USER_CODEC.fields, _USER_CODEC.fields - _USER_CODEC.strings,
    _DEVICE_CODEC.strings & _DEVICE_CODEC.fields, _DEVICE_CODEC.fields - _DEVICE_CODEC.strings))
#: the same fields, all read as strings (the slow, safe read of a chunk with a hand edit)
_LOAD_AS_STRINGS = (" ".join(sorted(_USER_CODEC.fields)), "",
                    " ".join(sorted(_DEVICE_CODEC.fields)), "")


class RedisStore:
    """Users, devices and activity in Redis under one namespace; see the module docstring."""

    def __init__(
        self,
        url: str,
        limits: ActivityLimits | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        connect_timeout: float = 5.0,
        timeout: float = DEFAULT_TIMEOUT,
        fence: str | None = None,
    ) -> None:
        self.url = url
        #: the hub lease's fence value this store writes under (see :mod:`hub.stores.lease`):
        #: every write first checks that no other hub took the lease over, and raises
        #: :class:`StoreFenced` instead of writing if one did. None: no lease, no check.
        self.fence = fence
        self.fence_key = lease_keys(namespace)[2]
        self.limits = limits or ActivityLimits()
        self.namespace = namespace
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._client: aioredis.Redis | None = None
        self._append: Any = None
        self._load_json: Any = None
        self._swap: Any = None
        self._ids = ActivityIds()
        # Writes of this process reach Redis in call order (asyncio.Lock is FIFO); without it
        # two overlapping saves of one user could retry their WATCH and land swapped.
        self._write_lock = asyncio.Lock()

    # -- keys ---------------------------------------------------------------------------------

    @property
    def users_key(self) -> str:
        return f"{self.namespace}:users"

    def user_key(self, user_id: str) -> str:
        return f"{self.namespace}:user:{user_id}"

    def device_set_key(self, user_id: str) -> str:
        return f"{self.namespace}:devices:{user_id}"

    def device_key(self, user_id: str, device_id: str) -> str:
        return f"{self.namespace}:device:{user_id}:{device_id}"

    def activity_key(self, user_id: str) -> str:
        return f"{self.namespace}:activity:{user_id}"

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        where = redact_url(self.url)
        client: aioredis.Redis | None = None
        try:
            client = aioredis.from_url(
                self.url,
                decode_responses=True,
                socket_connect_timeout=self.connect_timeout,
                socket_timeout=self.timeout,
                retry=Retry(NoBackoff(), 1),
            )
            await client.ping()
        except (RedisError, OSError, ValueError) as exc:
            if client is not None:
                await client.aclose()
            raise StoreError(f"cannot reach Redis at {where}: {exc}") from exc
        self._client = client
        self._append = client.register_script(_APPEND_SCRIPT)
        self._load_json = client.register_script(_LOAD_JSON_SCRIPT)
        self._swap = client.register_script(_SWAP_CLEAN_STOP)

    async def flush(self) -> None:
        """Every batch is written when it is handed over: nothing is buffered."""
        return None

    async def close(self) -> None:
        # Every write was acknowledged by Redis already; durability is the server's setting.
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- the Store interface ------------------------------------------------------------------

    async def swap_clean_stop(self, clean: bool) -> bool:
        async def swap() -> bool:
            was = int(await self._swap(
                keys=[f"{self.namespace}:clean-stop", self.fence_key],
                args=["1" if clean else "0", self.fence or ""]))
            if was < 0:
                raise self._fenced()
            return was == 1

        return await self._guard("record the clean stop", swap, write=True)

    async def load_users(self) -> list[UserRecord]:
        return await self._guard("load users", self._load_users)

    async def save_users(self, users: Sequence[StoredUser]) -> None:
        batch = {u.id: u.record() for u in users}  # the last record of a user in a batch wins
        if batch:
            await self._guard("save users", lambda: self._save_users(batch), write=True)

    async def delete_user(self, user_id: str) -> None:
        await self._guard("delete a user", lambda: self._delete_user(user_id), write=True)

    async def append_activity(self, user_id: str, entries: Sequence[Activity], now: int) -> None:
        fresh = self._ids.fresh(entries)
        if not fresh:
            return
        args: list[str | int] = [
            self.limits.max_entries,
            max(0, now - self.limits.max_age_ms),
            self.fence or "",
        ]
        for entry_id, entry in fresh:
            args += [max(0, entry.received_at), entry_id, entry.model_dump_json()]
        keys = [self.activity_key(user_id), self.fence_key]

        async def append() -> None:
            if int(await self._append(keys=keys, args=args)) < 0:
                raise self._fenced()

        await self._guard("append activity", append, write=True)
        # Only now certainly stored: after a failure the ids go along again and the script
        # skips those an unanswered call did store.
        self._ids.take(entry_id for entry_id, _ in fresh)

    async def get_activity(
        self, user_id: str, limit: int | None = None, since: int | None = None
    ) -> list[Activity]:
        return await self._guard(
            "read activity", lambda: self._get_activity(user_id, limit, since)
        )

    # -- implementation -----------------------------------------------------------------------

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise StoreError(f"the Redis store at {redact_url(self.url)} is not open")
        return self._client

    async def _guard(
        self, action: str, fn: Callable[[], Awaitable[T]], *, write: bool = False
    ) -> T:
        _ = self.client  # a store that is not open says so as a StoreError
        try:
            if not write:
                return await fn()
            async with self._write_lock:
                return await fn()
        except (RedisError, OSError) as exc:
            raise StoreError(
                f"Redis at {redact_url(self.url)}: {action} failed: {self._reason(exc)}"
            ) from exc

    def _fenced(self) -> StoreFenced:
        return StoreFenced(
            f"Redis at {redact_url(self.url)}: another hub took the lease over (the fence "
            f"{self.fence_key} is no longer {self.fence!r}): this hub no longer writes")

    def _reason(self, exc: BaseException) -> str:
        """The cause in plain words first: a stall and a refused connection need different
        actions from the operator, and redis-py's own text does not always tell them apart."""
        if isinstance(exc, RedisTimeoutError | TimeoutError):
            return f"no answer within {self.timeout:g} s (Redis stalled or overloaded): {exc}"
        if isinstance(exc, RedisConnectionError | ConnectionError):
            return f"cannot reach Redis: {exc}"
        return str(exc)

    async def _load_users(self) -> list[UserRecord]:
        client = self.client
        # the ids as one JSON string: a 100k-member SMEMBERS reply took 2.6 s of redis-py's
        # Python parsing, one json.loads takes milliseconds
        user_ids = sorted(json.loads(await client.eval(_MEMBERS_JSON, 1, self.users_key)))
        out: list[UserRecord] = []
        for chunk in _chunks(user_ids, _CHUNK_USERS):
            out += await self._load_chunk(chunk)
        return out

    async def _load_chunk(self, user_ids: list[str]) -> list[UserRecord]:
        """One script call a chunk (see ``_LOAD_JSON_SCRIPT``): a user and its devices are
        read in one atomic step, as a writer's transaction left them, and parsed with one
        ``json.loads``; a chunk with a hand-edited value is read field by field."""
        raw = await self._load_json(args=[self.namespace, *_LOAD_FIELDS, *user_ids])
        try:
            rows = json.loads(raw)
        except ValueError:
            return await self._load_chunk_by_field(user_ids)
        return self._validated((uid, fields, devices) for uid, fields, devices in rows)

    async def _load_chunk_by_field(self, user_ids: list[str]) -> list[UserRecord]:
        # every field a string: the script's output is JSON whatever was stored
        raw = await self._load_json(args=[self.namespace, *_LOAD_AS_STRINGS, *user_ids])
        return self._validated(
            (uid, _USER_CODEC.decode(raw_user), [_DEVICE_CODEC.decode(d) for d in raw_devices])
            for uid, raw_user, raw_devices in json.loads(raw))

    def _validated(self, rows: Iterable[tuple[str, dict[str, Any], list[Any]]]
                   ) -> list[UserRecord]:
        """Records of (id, user fields, device fields); an unreadable one is skipped, said."""
        out: list[UserRecord] = []
        for uid, fields, devices in rows:
            fields["devices"] = devices
            try:
                out.append(UserRecord.model_validate(fields))
            except ValidationError as exc:
                log.warning(
                    "skipping unreadable user %r in Redis at %s: %s", uid,
                    redact_url(self.url), exc.errors(include_url=False)[:3],
                )
        return out

    async def _save_users(self, users: dict[str, UserRecord]) -> None:
        for chunk in _chunks(list(users), _CHUNK_USERS):
            await self._save_chunk({uid: users[uid] for uid in chunk})

    async def _save_chunk(self, batch: dict[str, UserRecord]) -> None:
        set_keys = [self.device_set_key(uid) for uid in batch]

        def queue(pipe: Any, before: dict[str, set[str]]) -> None:
            # Few commands per user on purpose: redis-py spends ~50-100 us of Python per
            # command (packing, a timeout context per reply), far more than Redis does.
            for uid, user in batch.items():
                devices = {d.id: d for d in user.devices}
                user_key = self.user_key(uid)
                device_set_key = self.device_set_key(uid)
                fields = _USER_CODEC.encode(user)
                fields["devices"] = json.dumps(list(devices), separators=(",", ":"))
                # Whole records replace whole records: drop the old hashes (and those of
                # devices that left the record) before writing the new ones.
                stale = before[uid] | set(devices)
                pipe.delete(user_key, device_set_key, *(self.device_key(uid, d) for d in stale))
                pipe.hset(user_key, mapping=fields)
                for device_id, device in devices.items():
                    pipe.hset(self.device_key(uid, device_id), mapping=_DEVICE_CODEC.encode(device))
                if devices:
                    pipe.sadd(device_set_key, *devices)
            pipe.sadd(self.users_key, *batch)

        await self._transaction(set_keys, list(batch), queue)

    async def _delete_user(self, user_id: str) -> None:
        def queue(pipe: Any, before: dict[str, set[str]]) -> None:
            pipe.delete(
                self.user_key(user_id),
                self.device_set_key(user_id),
                self.activity_key(user_id),
                *(self.device_key(user_id, d) for d in before[user_id]),
            )
            pipe.srem(self.users_key, user_id)

        await self._transaction([self.device_set_key(user_id)], [user_id], queue)

    async def _transaction(
        self,
        watched: list[str],
        user_ids: list[str],
        queue: Callable[[Any, dict[str, set[str]]], None],
    ) -> None:
        """Read the users' device sets under WATCH, then write in one MULTI/EXEC; retry on races.

        The sets are read on a second connection in one round trip: WATCH is per connection
        and still catches any change made after it, whoever reads.
        """
        client = self.client
        reconnected = False
        if self.fence is not None:
            # the fence under WATCH: a takeover between our check and EXEC aborts the EXEC
            watched = [*watched, self.fence_key]
        for _ in range(_WATCH_ATTEMPTS):
            async with client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(*watched)
                    async with client.pipeline(transaction=False) as reader:
                        for uid in user_ids:
                            reader.smembers(self.device_set_key(uid))
                        if self.fence is not None:
                            reader.get(self.fence_key)
                        replies: list[Any] = await reader.execute()
                    if self.fence is not None and replies.pop() != self.fence:
                        raise self._fenced()
                    sets: list[set[str]] = replies
                    pipe.multi()  # type: ignore[no-untyped-call]
                    queue(pipe, dict(zip(user_ids, sets, strict=True)))
                    await pipe.execute()
                    return
                except WatchError:
                    continue
                except RedisConnectionError:
                    # redis-py does not retry a WATCHed transaction itself. After a server
                    # restart the pool still holds dead connections, so try once more on a
                    # fresh one; the writes are whole records, repeating them is harmless.
                    if reconnected:
                        raise
                    reconnected = True
        raise StoreError(
            f"Redis at {redact_url(self.url)}: another writer kept changing the same users; "
            f"gave up after {_WATCH_ATTEMPTS} attempts"
        )

    async def _get_activity(
        self, user_id: str, limit: int | None, since: int | None
    ) -> list[Activity]:
        if limit is not None and limit <= 0:
            return []
        client = self.client
        key = self.activity_key(user_id)
        # the whole (bounded) log: the order is by timestamp, which arrival order is not
        entries: list[Activity] = []
        upper = "+"
        while True:
            rows: list[Any] = await client.xrevrange(key, max=upper, min="-", count=_PAGE) or []
            entries += self._decode(user_id, rows)
            if len(rows) < _PAGE:
                return select_activity(entries, limit, since)
            upper = f"({_text(rows[-1][0])}"

    def _decode(self, user_id: str, rows: Iterable[Any]) -> Iterable[Activity]:
        for entry_id, fields in rows:
            try:
                yield Activity.model_validate_json(fields.get(_ENTRY_FIELD, ""))
            except ValidationError as exc:
                log.warning(
                    "skipping unreadable activity %s of %r in Redis at %s: %s", entry_id,
                    user_id, redact_url(self.url), exc.errors(include_url=False)[:3],
                )


def _text(value: bytes | str) -> str:
    """Replies are ``str`` (``decode_responses=True``); redis-py's hints also allow bytes."""
    return value.decode() if isinstance(value, bytes) else value


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
