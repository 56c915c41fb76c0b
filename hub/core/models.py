"""Data shapes of the Python API and of persistence.

The API models mirror the original TypeScript presence API in Python's style (snake_case,
pydantic). The record models are what a store keeps: plain, JSON-friendly, versioned by
``schema``, so every store (memory, TinyDB, Redis) saves and loads exactly the same thing.
"""

from __future__ import annotations

import re
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


# --------------------------------------------------------------------------------------------
# A stored user read lazily


#: a string of the texts :class:`UserText` reads: nothing escaped in it (no backslash), so its
#: text is its value (possessive, ``*+``: nothing to backtrack into, a third faster)
_STR = rb'"[^"\\]*+"'
_INT = rb'-?(?:0|[1-9][0-9]{0,17})'
_UINT = rb'(?:0|[1-9][0-9]{0,17})'
#: one device as :meth:`UserRecord.to_json` writes it, not virtual: connected (of any status)
#: or not (and then offline)
_DEVICE = (
    rb'\{"id":"[^"\\]++","name":' + _STR + rb',"virtual":false,"session":(?:null|' + _STR
    + rb'),"connected":(?:true,"ended":(?:true|false),"status":"(?:online|away|offline)"'
    rb'|false,"ended":(?:true|false),"status":"offline"),'
    rb'"last_seen":(?:null|' + _INT + rb'),"last_interaction":(?:null|' + _INT
    + rb'),"acked_version":' + _UINT + rb',"timeout_ms":(?:null|[1-9][0-9]{0,11}),'
    rb'"sleep_until":(?:null|' + _INT + rb'),"born_ts":(?:null|' + _INT + rb')\}'
)
#: a user document exactly as :meth:`UserRecord.to_json` writes it (fields in the model's
#: order, compact), with every device real, connected or offline; what a restart needs is
#: captured
_USER_TEXT = re.compile(
    rb'\{"schema":1,"id":"([^"\\]++)","name":(' + _STR + rb'),'
    rb'"status":"(online|away|dnd|offline)","manual_status":(null|"(?:online|away|dnd|offline)"),'
    rb'"custom_status":(null|' + _STR + rb'),"active_device":(null|' + _STR + rb'),'
    rb'"version":(' + _UINT + rb'),"version_reserved":(' + _UINT + rb'),"last_seen":(?:null|' + _INT
    + rb'),"last_sync":(?:null|' + _INT + rb'),"channels":\{(?:' + _STR + rb':' + _INT
    + rb'(?:,' + _STR + rb':' + _INT + rb')*)?\},"devices":\[(' + _DEVICE + rb'(?:,' + _DEVICE
    + rb')*)\],"removed":false\}'
)
_ANNOUNCED = re.compile(rb',"timeout_ms":([1-9][0-9]*),')
_STATUS: dict[bytes, Status] = {b"online": "online", b"away": "away", b"dnd": "dnd",
                                b"offline": "offline"}


class UserText:
    """A stored user as its JSON text, with only what a restart needs now read off it.

    Why: validating a million devices' records into models and building the engine's
    objects from them took most of a restart (measured at 1M devices: 12 s validation and
    10 s engine load on a slow day, for users that mostly just sit in their restart grace
    until they are heard). A user whose devices are each either connected (held in its
    grace, so nothing about it can change before one heartbeat timeout has passed) or
    disconnected and offline (no timer at all) needs only its id, name, status, primary,
    custom status, version and the shortest of its devices' timeouts; the engine validates
    the text into a :class:`UserRecord` when the user is first needed, or in the background
    (see ``Engine.load``).

    :meth:`read` takes only texts whose every field that matters here is read exactly: the
    layout :meth:`UserRecord.to_json` writes, no escaped strings, every device real and
    connected or offline, the stored status the one its devices give, the primary one of its
    devices, and no removal. Anything else (a hand-edited file, an older layout, a user with
    a virtual device) is None, and the caller validates it at once, as before.
    """

    __slots__ = ("active_device", "custom_status", "devices", "id", "min_timeout", "name",
                 "status", "text", "uses_default", "version", "version_reserved")

    def __init__(self, text: bytes, user_id: str, name: str, status: Status,
                 custom_status: str | None, active_device: str | None, version: int,
                 version_reserved: int, devices: int, min_timeout: int | None,
                 uses_default: bool) -> None:
        self.text = text
        self.id = user_id
        self.name = name
        self.status = status
        self.custom_status = custom_status
        self.active_device = active_device
        self.version = version
        self.version_reserved = version_reserved
        #: how many devices the user has
        self.devices = devices
        #: the shortest timeout a device announced (None: none announced one) ...
        self.min_timeout = min_timeout
        #: ... and whether a device uses the hub's default timeout
        self.uses_default = uses_default

    @classmethod
    def read(cls, text: bytes) -> UserText | None:
        """The user's restart fields from its stored text, or None when they cannot be read
        exactly without validating it (see the class docstring).

        One regular expression checks the whole text, each device's every field included
        (a text it takes validates); the few searches after it look only inside the
        devices' part of the text, where every ``"status":`` is a device's.
        """
        m = _USER_TEXT.fullmatch(text)
        if m is None:
            return None
        if not text.isascii():
            try:  # not UTF-8: a corrupt file, which validating it says (see TinyDBStore)
                text.decode()
            except UnicodeDecodeError:
                return None
        user_id, name, status, manual, custom, active, version, reserved = m.group(
            1, 2, 3, 4, 5, 6, 7, 8)
        lo, hi = m.span(9)
        find = text.find
        online = find(b'"status":"online"', lo, hi) >= 0
        if online or find(b'"status":"away"', lo, hi) >= 0:
            derived = manual if manual != b"null" else b'"online"' if online else b'"away"'
        else:
            derived = b'"offline"'
        if derived[1:-1] != status:
            return None  # not a state this engine writes: validated and re-derived at load
        if active != b"null" and find(b'{"id":%s,' % active, lo, hi) < 0:
            return None
        n = text.count(b'{"id":"', lo, hi)
        defaults = text.count(b'"timeout_ms":null', lo, hi)
        return cls(
            text, user_id.decode(), name[1:-1].decode(), _STATUS[status],
            None if custom == b"null" else custom[1:-1].decode(),
            None if active == b"null" else active[1:-1].decode(),
            int(version), int(reserved), n,
            min(map(int, _ANNOUNCED.findall(text, lo, hi))) if defaults < n else None,
            defaults > 0,
        )

    def record(self) -> UserRecord:
        """The full record (validated now; raises ``ValidationError`` for a bad document)."""
        return UserRecord.model_validate_json(self.text)
