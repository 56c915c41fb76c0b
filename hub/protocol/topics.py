"""Every topic of the wire: builders and the one parser of incoming device messages.

Parsing never raises: a bad topic or payload becomes a :class:`Rejection` with a short machine
reason (counted by the hub) and a human detail (logged). The hub drops rejected input without
touching any state.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from pydantic import ValidationError

from hub.protocol.ids import (
    DEFAULT_PREFIX,
    DEVICE_KINDS,
    ID_PATTERN,
    MAX_PAYLOAD_BYTES,
    DeviceKind,
    is_valid_id,
    validate_id,
    validate_prefix,
)
from hub.protocol.payloads import DEVICE_PAYLOADS, WireModel

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
class BadRequest:
    """A ``req`` whose payload was refused but whose ``id`` could be read: the requester gets an
    error reply instead of waiting out its timeout."""

    user: str
    device: str
    id: str
    why: str


def request_id(payload: bytes) -> str | None:
    """The valid ``id`` of a refused request payload, if one can be read at all."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if is_valid_id(rid) else None


@dataclass(frozen=True, slots=True)
class DeviceMessage:
    """A device message that passed every check: the topic decides whose state it touches."""

    user: str
    device: str
    kind: DeviceKind
    body: WireModel


class Topics:
    """Builds and parses every topic under one prefix (default ``presence``)."""

    __slots__ = ("_device_prefix", "_device_re", "prefix")

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = validate_prefix(prefix)
        self._device_prefix = f"{prefix}/devices/"
        # the rules of parse_device_topic in one anchored match (the hot path's split)
        self._device_re = re.compile(
            re.escape(self._device_prefix)
            + f"({ID_PATTERN})/({ID_PATTERN})/({'|'.join(DEVICE_PAYLOADS)})"
        )

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
    def split_device_topic(self, topic: str) -> tuple[str, str, DeviceKind] | Rejection:
        """``(user, device, kind)`` of ``P/devices/{user}/{device}/{kind}``; anything else is a
        rejection. The hot path: one match and no object built, where the checks one by one
        (which say why a topic is refused) cost a fifth of a heartbeat at 1M devices."""
        m = self._device_re.fullmatch(topic)
        if m is not None:
            return m.groups()  # type: ignore[return-value]
        where = self.parse_device_topic(topic)
        if type(where) is Rejection:
            return where
        # the match and the checks agree on every topic (tested); were they ever not to, the
        # checks decide, so a valid message is never dropped
        return where.user, where.device, where.kind  # type: ignore[union-attr]  # pragma: no cover

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
