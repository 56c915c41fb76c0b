"""mqtt-presence hub: the presence engine, the service API, stores and the MQTT side.

    from hub import create_presence_service
    presence = create_presence_service(storage="memory")
    async with presence:
        await presence.set_status("user-1", "dnd")
"""

from hub.commands import CommandResult, handle_command, run_command
from hub.models import Activity, DeviceInfo, OnlineUser, SyncStatus, UserStatus
from hub.service import PresenceError, PresenceService, create_presence_service

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
