"""mqtt-presence hub: the presence engine, the service API, stores and the MQTT side.

    from hub import create_presence_service
    presence = create_presence_service(storage="memory")
    async with presence:
        await presence.set_status("user-1", "dnd")

The names below are imported lazily: the device agent imports ``hub.protocol`` and should not
pay for the service, the stores and the broker on every start (0.5 s on a small device).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hub.commands import CommandResult, handle_command, run_command
    from hub.models import Activity, DeviceInfo, OnlineUser, SyncStatus, UserStatus
    from hub.service import PresenceError, PresenceService, create_presence_service

_EXPORTS = {
    "CommandResult": "hub.commands",
    "handle_command": "hub.commands",
    "run_command": "hub.commands",
    "Activity": "hub.models",
    "DeviceInfo": "hub.models",
    "OnlineUser": "hub.models",
    "SyncStatus": "hub.models",
    "UserStatus": "hub.models",
    "PresenceError": "hub.service",
    "PresenceService": "hub.service",
    "create_presence_service": "hub.service",
}

__all__ = [
    "Activity",
    "CommandResult",
    "DeviceInfo",
    "OnlineUser",
    "PresenceError",
    "PresenceService",
    "SyncStatus",
    "UserStatus",
    "create_presence_service",
    "handle_command",
    "run_command",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hub' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
