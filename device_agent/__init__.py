"""mqtt-presence device agent: publishes a device's presence and activity to the hub over MQTT.

Library use::

    from device_agent import AgentConfig, PresenceAgent

    config = AgentConfig.from_values(broker="mqtt://hub.lan", user="alice", device="laptop")
    with PresenceAgent(config, on_status=print) as agent:
        agent.record_activity("message", channel_id="telegram-123")
        print(agent.request("/presence who").text)

Command line: ``presence-agent`` (the daemon, see :mod:`device_agent.cli`) and ``presence``
(chat commands against the hub, see :mod:`device_agent.command`).
"""

from hub.protocol import BrokerURL

from .agent import PresenceAgent, build_activity, queue_activity
from .config import AgentConfig, load_config
from .errors import (
    AgentError,
    AgentLocked,
    BrokerUnavailable,
    ConfigError,
    GaveUp,
    HubUnavailable,
)
from .idle import CommandIdle, FileIdle, IdleSource, NoIdle, make_idle_source
from .outbox import Outbox

__all__ = [
    "AgentConfig",
    "AgentError",
    "AgentLocked",
    "BrokerURL",
    "BrokerUnavailable",
    "CommandIdle",
    "ConfigError",
    "FileIdle",
    "GaveUp",
    "HubUnavailable",
    "IdleSource",
    "NoIdle",
    "Outbox",
    "PresenceAgent",
    "build_activity",
    "load_config",
    "make_idle_source",
    "queue_activity",
]
