"""The JSON payload models of every topic, defined once for the hub and the device agent.

camelCase on the wire, snake_case in Python, unknown fields ignored; ``topics.md`` documents
the same fields for people and a test keeps the two in step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import to_json

from hub.protocol.ids import (
    ID_FIELD_PATTERN,
    MAX_CUSTOM_STATUS,
    DeviceStatus,
    Status,
    is_valid_id,
)


class WireModel(BaseModel):
    """Base of every payload: camelCase on the wire, snake_case in Python, unknown fields ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
    )

    def to_json(self) -> bytes:
        """Serialize with wire names, leaving out fields that are ``None``."""
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


SessionId = StrictStr
Millis = StrictInt


#: longest announced heartbeat interval or sleep the wire accepts (a week); the hub bounds the
#: interval further by its own ``--max-heartbeat-interval``
MAX_ANNOUNCED_MS = 7 * 24 * 3600 * 1000


class ConnPayload(WireModel):
    """``P/devices/{user}/{device}/conn``: birth, last will, clean stop or announced sleep of one
    session.

    A birth may announce the device's own ``heartbeatMs`` (its timeout is then 2.5 x that) and
    its user's ``idleMs`` (so reconnecting is not mistaken for using the device). A sleeping
    device announces ``sleepMs`` before it disconnects cleanly.
    """

    state: Literal["online", "offline", "sleeping"]
    session: SessionId = Field(pattern=ID_FIELD_PATTERN)
    name: StrictStr | None = Field(default=None, max_length=128)
    reason: StrictStr | None = Field(default=None, max_length=64)
    ts: Millis | None = None
    heartbeat_ms: StrictInt | None = Field(default=None, gt=0, le=MAX_ANNOUNCED_MS)
    idle_ms: StrictInt | None = Field(default=None, ge=0)
    sleep_ms: StrictInt | None = Field(default=None, gt=0, le=MAX_ANNOUNCED_MS)

    @model_validator(mode="after")
    def _sleep_says_how_long(self) -> ConnPayload:
        if self.state == "sleeping" and self.sleep_ms is None:
            raise ValueError("a sleeping conn needs sleepMs (how long the device sleeps)")
        return self


class HeartbeatPayload(WireModel):
    """``P/devices/{user}/{device}/heartbeat``: liveness, plus idle time where the device senses it."""

    session: SessionId = Field(pattern=ID_FIELD_PATTERN)
    seq: StrictInt = Field(default=0, ge=0)
    ts: Millis | None = None
    idle_ms: StrictInt | None = Field(default=None, ge=0)


#: A heartbeat exactly as the agent writes it (``HeartbeatPayload.to_json``: these keys in this
#: order, each but ``session`` optional, an optional space after ``:`` and ``,`` as Python's
#: ``json.dumps`` writes), with plain integers of up to 18 digits (no leading zero, no ``-0``,
#: no exponent) and a session id with no escapes. Anything else goes through the model.
_HEARTBEAT: Final = re.compile(
    rb'\{"session": ?"([A-Za-z0-9_.-]{1,64})"'
    rb'(?:, ?"seq": ?(?:0|[1-9][0-9]{0,17}))?'
    rb'(?:, ?"ts": ?(?:0|-?[1-9][0-9]{0,17}))?'
    rb'(?:, ?"idleMs": ?(0|[1-9][0-9]{0,17}))?\}'
)


def read_heartbeat(payload: bytes) -> tuple[str, int | None] | None:
    """``(session, idle_ms)`` of a heartbeat in the agent's own layout, else None.

    Why: at 1M devices the hub takes 33k heartbeats a second, and validating each through
    :class:`HeartbeatPayload` (plus the objects around it) was about a third of its steady
    CPU (py-spy). One anchored match reads the agent's layout; whenever it answers, the model would
    accept the payload and give the same session and ``idle_ms`` (a property test checks
    this over arbitrary and near-miss payloads). None means only "not this layout": the
    caller validates through the model, which accepts or refuses it as before.
    """
    m = _HEARTBEAT.fullmatch(payload)
    if m is None:
        return None
    idle = m.group(2)
    return m.group(1).decode("ascii"), (int(idle) if idle is not None else None)


class ActivityPayload(WireModel):
    """``P/devices/{user}/{device}/activity``: one thing the user did (sent a message, ...)."""

    type: StrictStr = Field(min_length=1, max_length=64)
    channel_id: StrictStr | None = Field(default=None, pattern=ID_FIELD_PATTERN)
    timestamp: Millis | None = None
    data: dict[str, Any] | None = None


class SetPayload(WireModel):
    """``P/devices/{user}/{device}/set``: the user sets their status and/or custom status.

    ``customStatus: null`` clears the custom status, while a missing ``customStatus`` leaves it
    alone; :meth:`has_custom_status` tells the two apart.
    """

    status: Status | None = None
    custom_status: StrictStr | None = Field(default=None, max_length=MAX_CUSTOM_STATUS)

    def has_custom_status(self) -> bool:
        return "custom_status" in self.model_fields_set


class AckPayload(WireModel):
    """``P/devices/{user}/{device}/ack``: the device has applied user state ``version``."""

    version: StrictInt = Field(ge=0)


class RequestPayload(WireModel):
    """``P/devices/{user}/{device}/req``: a chat command for the hub, answered on the reply topic."""

    id: StrictStr = Field(pattern=ID_FIELD_PATTERN)
    command: StrictStr = Field(min_length=1, max_length=1024)


class ReplyPayload(WireModel):
    """``P/replies/{user}/{device}``: the hub's answer to one request, matched by ``id``."""

    id: StrictStr
    ok: bool
    text: StrictStr
    data: Any = None


class DeviceEntry(WireModel):
    """One device in a user's state. A ``sleeping`` device announced when it wakes
    (``wakeAt``, epoch ms; null when the device is not asleep)."""

    id: str
    name: str
    status: DeviceStatus
    last_seen: int | None = None
    is_active: bool = False
    sleeping: bool = False
    wake_at: int | None = None


class UserStatePayload(WireModel):
    """``P/users/{user}/state`` (retained): everything a device or dashboard shows of a user."""

    user_id: str
    name: str
    status: Status
    custom_status: str | None = None
    last_seen: int | None = None
    active_device: str | None = None
    version: int
    devices: list[DeviceEntry] = Field(default_factory=list)

    def to_json(self) -> bytes:
        # customStatus and activeDevice are always present (null when unset) so that readers
        # need not tell "missing" from "cleared".
        return self.model_dump_json(by_alias=True).encode()


@dataclass(slots=True)
class DeviceState:
    """One device of a :class:`UserState` (the attributes of :class:`DeviceEntry`)."""

    id: str
    name: str
    status: DeviceStatus
    last_seen: int | None
    is_active: bool
    sleeping: bool = False
    wake_at: int | None = None

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "status": self.status,
                "lastSeen": self.last_seen, "isActive": self.is_active,
                "sleeping": self.sleeping, "wakeAt": self.wake_at}


@dataclass(slots=True)
class UserState:
    """A user's state as the engine derives it: the attributes of :class:`UserStatePayload`
    and the same JSON, without the model.

    Why not the model itself: a timeout storm or a republish builds one state per user for
    tens of thousands of users at once, and validating each into the pydantic model, then
    serializing it, was the largest single cost of both (about 20 of the ~40 us per user of
    an engine tick). The engine's values are valid by construction, so this is plain slots,
    written by pydantic's serializer; :meth:`to_json` is byte for byte the model's output (a
    property test checks that), and :meth:`model` builds the model where an API returns it.
    """

    user_id: str
    name: str
    status: Status
    custom_status: str | None
    last_seen: int | None
    active_device: str | None
    version: int
    devices: list[DeviceState]

    def wire(self) -> dict[str, Any]:
        """The JSON object of ``P/users/{user}/state`` (customStatus and activeDevice always
        present, null when unset, as in :meth:`UserStatePayload.to_json`)."""
        return {"userId": self.user_id, "name": self.name, "status": self.status,
                "customStatus": self.custom_status, "lastSeen": self.last_seen,
                "activeDevice": self.active_device, "version": self.version,
                "devices": [d.wire() for d in self.devices]}

    def to_json(self) -> bytes:
        """pydantic's own serializer on :meth:`wire`: the model's bytes, without the model
        (as fast as formatting the JSON by hand, measured)."""
        return to_json(self.wire())

    def model(self) -> UserStatePayload:
        return UserStatePayload.model_validate(self.wire())


class EventPayload(WireModel):
    """``P/events/{user}`` (not retained): ``statusChange``, ``online`` or ``offline``."""

    event: Literal["statusChange", "online", "offline"]
    user_id: str
    old: Status
    new: Status
    ts: int


def event_json(event: str, user_id: str, old: str, new: str, ts: int) -> bytes:
    """``EventPayload(...).to_json()``, formatted directly: a storm publishes two events per
    user and the model made up a quarter of that. Byte for byte the model's output (tested);
    a user id outside the id rule (which needs no JSON escaping) goes through the model."""
    if not is_valid_id(user_id):
        return EventPayload(event=event, user_id=user_id, old=old, new=new,
                            ts=ts).to_json()
    return b'{"event":"%s","userId":"%s","old":"%s","new":"%s","ts":%d}' % (
        event.encode(), user_id.encode(), old.encode(), new.encode(), ts)


DEVICE_PAYLOADS: Final[dict[str, type[WireModel]]] = {
    "conn": ConnPayload,
    "heartbeat": HeartbeatPayload,
    "activity": ActivityPayload,
    "set": SetPayload,
    "ack": AckPayload,
    "req": RequestPayload,
}


def encode(payload: WireModel) -> bytes:
    return payload.to_json()


def text_payload(value: str | None) -> bytes:
    """Plain-text retained topics (status, custom, primary); ``None`` clears the retained message."""
    return b"" if value is None else value.encode()


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
