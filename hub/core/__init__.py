"""The sans-I/O core: events in, effects out, every presence rule in one engine.

Nothing here touches a socket, a file, a task or the real clock (h11's discipline), so tests
drive it with a fake clock in microseconds. :mod:`.events` is the vocabulary, :mod:`.engine`
the rules, :mod:`.models` the API views and persistence records, :mod:`.clock` the clocks.
"""

from hub.core.clock import Clock, FakeClock, SystemClock
from hub.core.engine import Engine, EngineConfig, EngineError
from hub.core.errors import PresenceError
from hub.core.events import (
    Ack,
    ActivityEvent,
    Birth,
    DeviceOffline,
    DeviceRemoved,
    DeviceTimedOut,
    Effect,
    EmitEvent,
    Event,
    Heartbeat,
    PublishState,
    RecordActivity,
    RemoveDevice,
    SetCustomStatus,
    SetDeviceStatus,
    SetStatus,
    Sink,
    Sleep,
    SyncRequest,
    events_from_message,
)

__all__ = [
    "Ack",
    "ActivityEvent",
    "Birth",
    "Clock",
    "DeviceOffline",
    "DeviceRemoved",
    "DeviceTimedOut",
    "Effect",
    "EmitEvent",
    "Engine",
    "EngineConfig",
    "EngineError",
    "Event",
    "FakeClock",
    "Heartbeat",
    "PresenceError",
    "PublishState",
    "RecordActivity",
    "RemoveDevice",
    "SetCustomStatus",
    "SetDeviceStatus",
    "SetStatus",
    "Sink",
    "Sleep",
    "SyncRequest",
    "SystemClock",
    "events_from_message",
]
