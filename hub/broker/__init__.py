"""The embedded MQTT broker: amqtt in the hub's own loop, with indexes and light sessions.

:mod:`.embedded` is the broker (and every deviation from amqtt it corrects), :mod:`.connection`
one client's connection (held PUBACKs, bounded outgoing queue), :mod:`.index` the tries that
replace amqtt's linear matching, :mod:`.session` the light session object.
"""

from hub.broker.embedded import (
    BrokerError,
    ClientHandler,
    DeliveryLimits,
    EmbeddedBroker,
    HeldAck,
    MessageHandler,
    TlsListener,
)

__all__ = [
    "BrokerError", "ClientHandler", "DeliveryLimits", "EmbeddedBroker", "HeldAck",
    "MessageHandler", "TlsListener",
]
