"""The wire protocol of mqtt-presence, defined once for the hub and the device agent.

Everything that crosses MQTT is described in this package: the id rule (:mod:`.ids`), every
topic with its builder and the one parser (:mod:`.topics`), the JSON payload models
(:mod:`.payloads`), topic-filter matching (:mod:`.matching`), and the two text formats people
type (durations, broker URLs). ``topics.md`` documents the same facts for people and a test
keeps the two in step, so a change to the wire starts here.

This package imports nothing else from ``hub``: the device agent depends on it alone.
"""

from hub.protocol.durations import format_duration_ms, parse_duration_ms
from hub.protocol.ids import (
    DEFAULT_PREFIX,
    DEVICE_KINDS,
    DEVICE_TOPIC_QOS,
    ID_FIELD_PATTERN,
    ID_PATTERN,
    MAX_CUSTOM_STATUS,
    MAX_PAYLOAD_BYTES,
    STATUSES,
    DeviceKind,
    DeviceStatus,
    InvalidId,
    Status,
    is_valid_id,
    new_session_id,
    validate_id,
    validate_prefix,
)
from hub.protocol.payloads import (
    DEVICE_PAYLOADS,
    AckPayload,
    ActivityPayload,
    ConnPayload,
    DeviceEntry,
    DeviceState,
    EventPayload,
    HeartbeatPayload,
    ReplyPayload,
    RequestPayload,
    SetPayload,
    UserState,
    UserStatePayload,
    WireModel,
    dumps,
    encode,
    event_json,
    text_payload,
)
from hub.protocol.topics import (
    USER_TOPIC_KINDS,
    BadRequest,
    DeviceMessage,
    DeviceTopic,
    Rejection,
    Topics,
    UserTopicKind,
    decode_payload,
    request_id,
)
from hub.protocol.urls import BrokerURL, InvalidURL, redact_url

__all__ = [
    "DEFAULT_PREFIX",
    "DEVICE_KINDS",
    "DEVICE_PAYLOADS",
    "DEVICE_TOPIC_QOS",
    "ID_FIELD_PATTERN",
    "ID_PATTERN",
    "MAX_CUSTOM_STATUS",
    "MAX_PAYLOAD_BYTES",
    "STATUSES",
    "USER_TOPIC_KINDS",
    "AckPayload",
    "ActivityPayload",
    "BadRequest",
    "BrokerURL",
    "ConnPayload",
    "DeviceEntry",
    "DeviceKind",
    "DeviceMessage",
    "DeviceState",
    "DeviceStatus",
    "DeviceTopic",
    "EventPayload",
    "HeartbeatPayload",
    "InvalidId",
    "InvalidURL",
    "Rejection",
    "ReplyPayload",
    "RequestPayload",
    "SetPayload",
    "Status",
    "Topics",
    "UserState",
    "UserStatePayload",
    "UserTopicKind",
    "WireModel",
    "decode_payload",
    "dumps",
    "encode",
    "event_json",
    "format_duration_ms",
    "is_valid_id",
    "new_session_id",
    "parse_duration_ms",
    "redact_url",
    "request_id",
    "text_payload",
    "validate_id",
    "validate_prefix",
]
