"""Ids, statuses and limits: the rules every topic level and payload field obeys.

Ids become topic levels, so the one rule here (1-64 characters from ``[A-Za-z0-9_.-]``) is what
keeps a user or device id from widening a subscription (``+``, ``#``) or splitting a level (``/``).
"""

from __future__ import annotations

import re
import secrets
from typing import Final, Literal, TypeAlias

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


