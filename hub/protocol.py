"""The wire protocol of mqtt-presence, defined once for the hub and the device agent.

Everything that crosses MQTT is described here: the id rule, every topic (builders and one
parser), and the JSON payload models. ``topics.md`` documents the same facts for people and a
test keeps the two in step, so a change to the wire starts in this module.

Parsing never raises: a bad topic or payload becomes a :class:`Rejection` with a short machine
reason (counted by the hub) and a human detail (logged). The hub drops rejected input without
touching any state.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic.alias_generators import to_camel

# --------------------------------------------------------------------------------------------
# Ids, statuses, limits

ID_PATTERN: Final = r"[A-Za-z0-9_.-]{1,64}"
_ID_RE: Final = re.compile(ID_PATTERN)
#: The same rule for pydantic fields, anchored (pydantic patterns search, they do not fullmatch).
ID_FIELD_PATTERN: Final = f"^{ID_PATTERN}$"

DEFAULT_PREFIX: Final = "presence"
#: Largest payload the hub accepts on any device topic; larger ones are dropped unparsed.
MAX_PAYLOAD_BYTES: Final = 64 * 1024
#: Longest custom status text; longer ones are refused rather than silently cut.
MAX_CUSTOM_STATUS: Final = 256

Status: TypeAlias = Literal["online", "away", "dnd", "offline"]
DeviceStatus: TypeAlias = Literal["online", "away", "offline"]
STATUSES: Final[tuple[str, ...]] = ("online", "away", "dnd", "offline")

#: The topic kinds a device may publish below ``P/devices/{user}/{device}/``.
DeviceKind: TypeAlias = Literal["conn", "heartbeat", "activity", "set", "ack", "req"]
DEVICE_KINDS: Final[tuple[str, ...]] = ("conn", "heartbeat", "activity", "set", "ack", "req")

#: QoS and retain flag of each device topic kind, as the agent publishes them.
DEVICE_TOPIC_QOS: Final[dict[str, tuple[int, bool]]] = {
    "conn": (1, True),
    "heartbeat": (0, False),
    "activity": (1, False),
    "set": (1, False),
    "ack": (1, False),
    "req": (1, False),
}


class InvalidId(ValueError):
    """An id that could not be used in a topic (empty, too long, or with ``/ + #`` and such)."""


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid user/device/session id, else raise :class:`InvalidId`.

    Ids become topic levels, so anything that could widen a subscription or split a level
    (``/``, ``+``, ``#``, spaces, control characters) is refused here, once, for both sides.
    """
    if is_valid_id(value):
        return value  # type: ignore[return-value]
    shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80])
    raise InvalidId(
        f"invalid {what} {shown}: use 1-64 characters from A-Z a-z 0-9 _ . -"
    )


def validate_prefix(prefix: str) -> str:
    """A prefix is one or more id-like levels joined by ``/`` (``presence``, ``home/presence``)."""
    levels = prefix.split("/")
    if not prefix or not all(is_valid_id(level) for level in levels):
        raise InvalidId(
            f"invalid prefix {prefix!r}: use levels of A-Z a-z 0-9 _ . - joined by '/'"
        )
    return prefix


def new_session_id() -> str:
    """A fresh random session id for one MQTT connection of an agent (96 bits, 24 hex chars)."""
    return secrets.token_hex(12)


# --------------------------------------------------------------------------------------------
# Payload models

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


class ConnPayload(WireModel):
    """``P/devices/{user}/{device}/conn``: birth, last will, or clean stop of one session."""

    state: Literal["online", "offline"]
    session: SessionId = Field(pattern=ID_FIELD_PATTERN)
    name: StrictStr | None = Field(default=None, max_length=128)
    reason: StrictStr | None = Field(default=None, max_length=64)
    ts: Millis | None = None


class HeartbeatPayload(WireModel):
    """``P/devices/{user}/{device}/heartbeat``: liveness, plus idle time where the device senses it."""

    session: SessionId = Field(pattern=ID_FIELD_PATTERN)
    seq: StrictInt = Field(default=0, ge=0)
    ts: Millis | None = None
    idle_ms: StrictInt | None = Field(default=None, ge=0)


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
    id: str
    name: str
    status: DeviceStatus
    last_seen: int | None = None
    is_active: bool = False


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


# --------------------------------------------------------------------------------------------
# Topics

UserTopicKind: TypeAlias = Literal["state", "status", "custom", "primary"]
USER_TOPIC_KINDS: Final[tuple[str, ...]] = ("state", "status", "custom", "primary")


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an incoming message was dropped: ``reason`` is a short counter key, ``detail`` is for logs."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    user: str
    device: str
    kind: DeviceKind


@dataclass(frozen=True, slots=True)
class DeviceMessage:
    """A device message that passed every check: the topic decides whose state it touches."""

    user: str
    device: str
    kind: DeviceKind
    body: WireModel


class Topics:
    """Builds and parses every topic under one prefix (default ``presence``)."""

    __slots__ = ("_device_prefix", "prefix")

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = validate_prefix(prefix)
        self._device_prefix = f"{prefix}/devices/"

    # device -> hub
    def device(self, user: str, device: str, kind: DeviceKind) -> str:
        validate_id(user, "user id")
        validate_id(device, "device id")
        if kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device topic kind {kind!r}")
        return f"{self._device_prefix}{user}/{device}/{kind}"

    def device_base(self, user: str, device: str) -> str:
        """``P/devices/{user}/{device}`` : a device may publish only below this."""
        validate_id(user, "user id")
        validate_id(device, "device id")
        return f"{self._device_prefix}{user}/{device}"

    @property
    def device_filter(self) -> str:
        """The one subscription that carries every device topic to the hub."""
        return f"{self._device_prefix}+/+/+"

    # hub -> everyone
    def user(self, user: str, kind: UserTopicKind) -> str:
        validate_id(user, "user id")
        if kind not in USER_TOPIC_KINDS:
            raise ValueError(f"unknown user topic kind {kind!r}")
        return f"{self.prefix}/users/{user}/{kind}"

    def user_base(self, user: str) -> str:
        """``P/users/{user}/``: the four retained topics are this plus their kind (one id check
        for all four, where :meth:`user` checks each)."""
        validate_id(user, "user id")
        return f"{self.prefix}/users/{user}/"

    def user_filter(self, user: str) -> str:
        validate_id(user, "user id")
        return f"{self.prefix}/users/{user}/+"

    def events(self, user: str) -> str:
        validate_id(user, "user id")
        return f"{self.prefix}/events/{user}"

    def reply(self, user: str, device: str) -> str:
        validate_id(user, "user id")
        validate_id(device, "device id")
        return f"{self.prefix}/replies/{user}/{device}"

    @property
    def hub_status(self) -> str:
        return f"{self.prefix}/hub/status"

    # parsing
    def parse_device_topic(self, topic: str) -> DeviceTopic | Rejection:
        """Split ``P/devices/{user}/{device}/{kind}``; anything else is a rejection."""
        if not topic.startswith(self._device_prefix):
            return Rejection("unknown_topic", f"not a device topic: {topic[:200]!r}")
        parts = topic[len(self._device_prefix):].split("/")
        if len(parts) != 3:
            return Rejection("unknown_topic", f"expected devices/USER/DEVICE/KIND: {topic[:200]!r}")
        user, device, kind = parts
        if not is_valid_id(user):
            return Rejection("bad_id", f"invalid user id in {topic[:200]!r}")
        if not is_valid_id(device):
            return Rejection("bad_id", f"invalid device id in {topic[:200]!r}")
        if kind not in DEVICE_PAYLOADS:
            return Rejection("unknown_topic", f"unknown device topic kind {kind[:40]!r}")
        return DeviceTopic(user, device, kind)  # type: ignore[arg-type]

    def parse(
        self, topic: str, payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES
    ) -> DeviceMessage | Rejection:
        """Turn one incoming message into a :class:`DeviceMessage`, or say why not."""
        where = self.parse_device_topic(topic)
        if isinstance(where, Rejection):
            return where
        return decode_payload(where, payload, max_bytes)


def decode_payload(
    where: DeviceTopic, payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES
) -> DeviceMessage | Rejection:
    if len(payload) > max_bytes:
        return Rejection("too_large", f"{where.kind} payload of {len(payload)} bytes > {max_bytes}")
    if not payload:
        return Rejection("empty_payload", f"empty {where.kind} payload")
    model = DEVICE_PAYLOADS[where.kind]
    try:
        body = model.model_validate_json(payload)
    except ValidationError as exc:
        return Rejection("bad_payload", f"{where.kind}: {_summarize(exc)}")
    except (ValueError, RecursionError) as exc:  # pragma: no cover - pydantic wraps most
        return Rejection("bad_payload", f"{where.kind}: {exc}"[:300])
    return DeviceMessage(where.user, where.device, where.kind, body)


def _summarize(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0].get("type") in ("json_invalid", "model_type"):
        return "not a JSON object"
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "payload"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def encode(payload: WireModel) -> bytes:
    return payload.to_json()


def text_payload(value: str | None) -> bytes:
    """Plain-text retained topics (status, custom, primary); ``None`` clears the retained message."""
    return b"" if value is None else value.encode()


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
