"""Persistence behind one small interface: memory, TinyDB (one file) and Redis.

:mod:`.base` holds the :class:`Store` protocol every store implements; :func:`open_store` is
the one factory, which imports the TinyDB and Redis modules only when asked for them.
"""

from __future__ import annotations

import os
from typing import Literal

from hub.stores.base import (
    ActivityLimits,
    Store,
    StoreError,
    StoreErrorLog,
    StoreFenced,
    select_activity,
)
from hub.stores.memory import MemoryStore

__all__ = ["STORE_KINDS", "ActivityLimits", "MemoryStore", "Store", "StoreError",
           "StoreErrorLog", "StoreFenced", "StoreKind", "open_store", "select_activity"]


StoreKind = Literal["memory", "tinydb", "redis"]
STORE_KINDS: tuple[StoreKind, ...] = ("memory", "tinydb", "redis")


def open_store(
    kind: str,
    *,
    db_path: str | os.PathLike[str] | None = None,
    redis_url: str | None = None,
    limits: ActivityLimits | None = None,
    namespace: str = "presence",
    fence: str | None = None,
) -> Store:
    """Build the store named by ``kind``; the caller still awaits ``store.open()``.

    The TinyDB and Redis modules are imported here, not at the top, so ``redis`` stays an
    optional extra and a memory-only user never imports either. ``fence``: the hub lease's
    fence value every Redis write checks (see :mod:`hub.stores.lease`).
    """
    if fence is not None and kind != "redis":
        raise StoreError("a fenced store (hubs sharing a lease) must be Redis")
    if kind == "memory":
        return MemoryStore(limits, keep_users=False)
    if kind == "tinydb":
        if db_path is None:
            raise StoreError("storage 'tinydb' needs a database file path (--db)")
        from hub.stores.tinydb import TinyDBStore

        return TinyDBStore(db_path, limits)
    if kind == "redis":
        if not redis_url:
            raise StoreError("storage 'redis' needs a Redis URL (--redis-url)")
        try:
            from hub.stores.redis import RedisStore
        except ImportError as exc:
            raise StoreError(
                f"storage 'redis' needs the redis package ({exc}): "
                "pip install 'mqtt-presence-hub[redis]'"
            ) from exc
        return RedisStore(redis_url, limits, namespace=namespace, fence=fence)
    raise StoreError(f"unknown storage {kind!r}: choose one of {', '.join(STORE_KINDS)}")
