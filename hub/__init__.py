"""mqtt-presence hub: the presence engine, the service API, stores and the MQTT side.

The folders are the architecture, each layer importing only those below it (a test walks the
import graph to keep it so)::

    cli      presence-hub: settings, run, users
    app      the service (API, clock task, flush), rate limiting, chat commands, the factory
    mqtt     the hub on MQTT behind one typed Transport: embedded broker or own client
    broker   the embedded amqtt broker, its indexes and sessions
    auth     accounts, grants, the access policy, amqtt plugins, Mosquitto export
    stores   the Store interface and open_store: memory, TinyDB, Redis
    core     sans-I/O: events and effects, the engine, the clock, records
    protocol the wire: ids, topics, payloads, matching, durations, broker URLs
             (imports nothing else from hub; the device agent imports only this)

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
    from hub.app.commands import CommandResult, handle_command, run_command
    from hub.app.factory import create_presence_service
    from hub.app.service import PresenceService
    from hub.core.errors import PresenceError
    from hub.core.models import Activity, DeviceInfo, OnlineUser, SyncStatus, UserStatus

_EXPORTS = {
    "CommandResult": "hub.app.commands",
    "handle_command": "hub.app.commands",
    "run_command": "hub.app.commands",
    "Activity": "hub.core.models",
    "DeviceInfo": "hub.core.models",
    "OnlineUser": "hub.core.models",
    "SyncStatus": "hub.core.models",
    "UserStatus": "hub.core.models",
    "PresenceError": "hub.core.errors",
    "PresenceService": "hub.app.service",
    "create_presence_service": "hub.app.factory",
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
