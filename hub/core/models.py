"""Data shapes of the Python API and of persistence.

The API models mirror the original TypeScript presence API in Python's style (snake_case,
pydantic). The record models are what a store keeps: plain, JSON-friendly, versioned by
``schema``, so every store (memory, TinyDB, Redis) saves and loads exactly the same thing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic_core import to_json

from hub.protocol import DeviceStatus, Status

# --------------------------------------------------------------------------------------------
# API models


class _ApiModel(BaseModel):
    """snake_case in Python; ``model_dump(by_alias=True)`` gives the wire's camelCase (the
    ``data`` of a reply is a payload like any other)."""

    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)


class UserStatus(_ApiModel):
    """What ``get_status`` returns."""

    user_id: str
    name: str
    status: Status
    custom_status: str | None = None
    last_seen: int | None = None
    active_device: str | None = None
    version: int = 0


class DeviceInfo(_ApiModel):
    """One device of a user, as ``get_devices`` returns it."""

    id: str
    name: str
    status: DeviceStatus
    last_seen: int | None = None
    is_active: bool = False
    virtual: bool = False


class OnlineUser(_ApiModel):
    """One entry of ``get_online_users``."""

    user_id: str
    name: str
    status: Status
    custom_status: str | None = None
    active_device: str | None = None


class SyncStatus(_ApiModel):
    """``synced`` devices have acked the current ``version`` out of ``total`` that can ack."""

    user_id: str
    version: int
    synced: int
    total: int
    last_sync: int | None = None


class Activity(_ApiModel):
    """One entry of a user's activity log.

    ``timestamp`` is the device's label (clamped so a device clock far in the future cannot
    pin an entry to the top); ``received_at`` is the hub's own clock.
    """

    type: str
    channel_id: str | None = None
    timestamp: int
    device_id: str | None = None
    received_at: int
    data: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# Records: what a store persists


class DeviceRecord(BaseModel):
    """Persisted device: enough to rebuild the engine's device after a restart."""

    model_config = ConfigDict(extra="ignore")

    id: str
    name: str
    virtual: bool = False
    session: str | None = None
    connected: bool = False
    #: the session ended by will or clean stop (its late messages are stale)
    ended: bool = False
    status: DeviceStatus = "offline"
    last_seen: int | None = None
    last_interaction: int | None = None
    acked_version: int = 0
    #: the device's own heartbeat timeout (2.5 x the interval its birth announced), if any
    timeout_ms: int | None = None
    #: an announced sleep ends at this time (epoch ms); None when the device is not asleep
    sleep_until: int | None = None
    #: the device clock's ``ts`` of the current session's birth (orders births)
    born_ts: int | None = None


class UserRecord(BaseModel):
    """Persisted user with all its devices (a store may split devices out, e.g. Redis hashes)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    schema_version: Literal[1] = Field(default=1, alias="schema")
    id: str
    name: str
    status: Status = "offline"
    manual_status: Status | None = None
    custom_status: str | None = None
    active_device: str | None = None
    version: int = 0
    #: versions up to this one may have been published (the engine reserves ahead of what it
    #: publishes); after a crash the user starts above it, so no version is ever reused
    version_reserved: int = 0
    last_seen: int | None = None
    last_sync: int | None = None
    channels: dict[str, int] = Field(default_factory=dict)
    devices: list[DeviceRecord] = Field(default_factory=list)
    #: a tombstone: the user was removed and only its version is kept, so that a user of the
    #: same id that comes back continues above every version published before
    removed: bool = False

    def to_json(self) -> bytes:
        """The record as a store writes it (wire names: ``schema``)."""
        return self.model_dump_json(by_alias=True).encode()

    def record(self) -> UserRecord:
        return self


class UserDoc:
    """A changed user as the engine hands it to a store: the fields of :class:`UserRecord`
    as plain values in its order (``doc``), written by :meth:`to_json` without the model.

    Why: after a timeout storm the next flush takes tens of thousands of users at once, and
    validating each into a ``UserRecord`` on the event loop was half of the flush's cost,
    taken from the hub while it still publishes the storm (50k users: 0.7-1.1 s, now 0.4-0.6
    s). The engine's values are valid by construction; a store that keeps JSON (TinyDB)
    writes :meth:`to_json` (pydantic's serializer on the plain values: byte for byte
    ``record().to_json()``, which a test checks), and a store that needs fields (Redis) asks
    for :meth:`record`.
    """

    __slots__ = ("doc", "id")

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.id: str = doc["id"]

    def to_json(self) -> bytes:
        return to_json(self.doc)  # pydantic's own serializer: the model's bytes, as fast

    def record(self) -> UserRecord:
        return UserRecord.model_validate(self.doc)

    def __repr__(self) -> str:
        return f"UserDoc({self.doc!r})"


#: what a store saves of a changed user: a record, or the engine's plain :class:`UserDoc`
StoredUser = UserRecord | UserDoc
