"""The engine's vocabulary: events in (what happened), effects out (what must be done).

Small immutable values, as h11 keeps its events apart from its state machine: an adapter turns
what it heard into events, the engine (:mod:`hub.core.engine`) turns events and ``now`` into
effects, and the service carries the effects out (publish, emit, persist, close a session).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias

from hub.core.models import Activity
from hub.protocol import (
    AckPayload,
    ActivityPayload,
    ConnPayload,
    DeviceMessage,
    DeviceStatus,
    HeartbeatPayload,
    SetPayload,
    Status,
    UserState,
)

# --------------------------------------------------------------------------------------------
# Events (inputs)


@dataclass(frozen=True, slots=True)
class Birth:
    """A device's session began (``conn`` online). ``heartbeat_ms`` is the device's own interval
    (its timeout is 2.5 x that), ``idle_ms`` its user's idle time at birth, ``ts`` the device's
    clock at birth (orders births of one device: a late birth of an older session is stale)."""

    user: str
    device: str
    session: str
    name: str | None = None
    heartbeat_ms: int | None = None
    idle_ms: int | None = None
    ts: int | None = None


@dataclass(frozen=True, slots=True)
class Sleep:
    """The current session announced it sleeps for ``sleep_ms`` and then disconnects."""

    user: str
    device: str
    session: str
    sleep_ms: int


@dataclass(frozen=True, slots=True)
class DeviceOffline:
    """A session ended: ``reason`` is ``lost`` (last will) or ``disconnect`` (clean stop)."""

    user: str
    device: str
    session: str
    reason: str = "lost"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    user: str
    device: str
    session: str
    idle_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ActivityEvent:
    """Something the user did. ``device=None`` (API activity) means the virtual device named
    after the channel."""

    user: str
    type: str
    device: str | None = None
    channel_id: str | None = None
    timestamp: int | None = None
    data: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SetStatus:
    user: str
    status: Status
    device: str | None = None


@dataclass(frozen=True, slots=True)
class SetCustomStatus:
    user: str
    text: str | None
    device: str | None = None


@dataclass(frozen=True, slots=True)
class SetDeviceStatus:
    """The API sets a device's status; such a device has no connection (idle timers only)."""

    user: str
    device: str
    status: DeviceStatus


@dataclass(frozen=True, slots=True)
class Ack:
    user: str
    device: str
    version: int


@dataclass(frozen=True, slots=True)
class SyncRequest:
    user: str


@dataclass(frozen=True, slots=True)
class RemoveDevice:
    user: str
    device: str


@dataclass(frozen=True, slots=True)
class RemoveUser:
    """Forget a user and everything the hub keeps of it (devices, state, activity)."""

    user: str


Event: TypeAlias = (
    Birth
    | DeviceOffline
    | Heartbeat
    | ActivityEvent
    | SetStatus
    | SetCustomStatus
    | SetDeviceStatus
    | Ack
    | SyncRequest
    | RemoveDevice
    | RemoveUser
    | Sleep
)


def events_from_message(msg: DeviceMessage) -> list[Event]:
    """All events of one message (a ``set`` may hold a status and a custom status)."""
    body = msg.body
    if isinstance(body, SetPayload):
        out: list[Event] = []
        if body.status is not None:
            out.append(SetStatus(msg.user, body.status, msg.device))
        if body.has_custom_status():
            out.append(SetCustomStatus(msg.user, body.custom_status, msg.device))
        return out
    if isinstance(body, HeartbeatPayload):
        return [Heartbeat(msg.user, msg.device, body.session, body.idle_ms)]
    if isinstance(body, ConnPayload):
        if body.state == "online":
            return [Birth(msg.user, msg.device, body.session, body.name, body.heartbeat_ms,
                          body.idle_ms, body.ts)]
        if body.state == "sleeping":
            assert body.sleep_ms is not None  # the payload model requires it
            return [Sleep(msg.user, msg.device, body.session, body.sleep_ms)]
        return [DeviceOffline(msg.user, msg.device, body.session, body.reason or "lost")]
    if isinstance(body, ActivityPayload):
        return [
            ActivityEvent(msg.user, body.type, msg.device, body.channel_id, body.timestamp,
                          body.data)
        ]
    if isinstance(body, AckPayload):
        return [Ack(msg.user, msg.device, body.version)]
    return []  # ``req`` is served by the command handler, not the engine


# --------------------------------------------------------------------------------------------
# Effects (outputs)


@dataclass(frozen=True, slots=True)
class PublishState:
    """Publish the user's retained topics. ``forced`` marks a sync: publish even if unchanged."""

    user_id: str
    state: UserState
    forced: bool = False


@dataclass(frozen=True, slots=True)
class EmitEvent:
    """A user-level event: ``statusChange``, ``online`` (came from offline) or ``offline``."""

    user_id: str
    event: Literal["statusChange", "online", "offline"]
    old: Status
    new: Status
    ts: int


@dataclass(frozen=True, slots=True)
class RecordActivity:
    user_id: str
    activity: Activity


@dataclass(frozen=True, slots=True)
class DeviceTimedOut:
    """A connected device went silent past the heartbeat timeout; the broker adapter may close
    its session so its will and resources are released."""

    user_id: str
    device_id: str
    session: str | None


@dataclass(frozen=True, slots=True)
class DeviceRemoved:
    """A real device was removed: its retained ``conn`` must go too, or the next time the hub
    subscribes the retained birth brings the device back."""

    user_id: str
    device_id: str


@dataclass(frozen=True, slots=True)
class UserRemoved:
    """A user was removed: its retained topics (and anything published about it, such as Home
    Assistant's discovery) must go, and the store forgets its devices and activity. Its
    version survives in the store as a tombstone, so a user of the same id that comes back
    later continues above it (a version never goes back)."""

    user_id: str


Effect: TypeAlias = (
    PublishState | EmitEvent | RecordActivity | DeviceTimedOut | DeviceRemoved | UserRemoved
)


class Sink(Protocol):
    """Where effects leave the process (the MQTT side of the hub). Called on the loop thread."""

    def publish_state(self, state: UserState, forced: bool) -> None: ...

    def publish_event(self, event: EmitEvent) -> None: ...

    def device_timed_out(self, effect: DeviceTimedOut) -> None: ...

    def device_removed(self, effect: DeviceRemoved) -> None: ...

    def user_removed(self, effect: UserRemoved) -> None: ...

    def before_flush(self) -> None:
        """A flush starts: what was ingested until now is in it."""

    def after_flush(self) -> None:
        """The flush that last started is durable (manual MQTT acks go here)."""
