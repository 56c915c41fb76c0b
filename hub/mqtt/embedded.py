"""The hub on its embedded broker: the broker's plugin hands every client message to the service.

An amqtt broker runs in this process (:mod:`hub.broker`) and hands every client message
straight to the service on the loop thread; the hub publishes straight into the broker. No
client loop, no socket between hub and broker.
"""

from __future__ import annotations

import asyncio

from hub.auth.accounts import CredentialStore
from hub.broker import EmbeddedBroker, TlsListener
from hub.core.events import DeviceTimedOut
from hub.mqtt.hub import MqttHub
from hub.protocol import DeviceTopic

#: Room for the topic and headers above the payload limit before a packet closes the connection
#: (payloads between the two are dropped by the hub, counted as ``too_large``).
PACKET_HEADROOM = 64 * 1024


class EmbeddedTransport:
    """Runs an :class:`EmbeddedBroker` and feeds the service from its plugin, in-loop.

    ``credentials`` (a :class:`~hub.auth.CredentialStore`), ``allow_anonymous`` and ``tls`` go
    to the broker (see :class:`~hub.broker.EmbeddedBroker` for what they mean).
    """

    def __init__(
        self,
        hub: MqttHub,
        host: str,
        port: int,
        *,
        allow_anonymous: bool | None = None,
        credentials: CredentialStore | None = None,
        tls: TlsListener | None = None,
    ):
        self.hub = hub
        self.broker = EmbeddedBroker(
            host, port, on_message=self._on_message, allow_anonymous=allow_anonymous,
            credentials=credentials, prefix=hub.topics.prefix, tls=tls,
            max_packet_bytes=hub.service.config.max_payload_bytes + PACKET_HEADROOM,
        )
        self._conn_suffix = "/conn"

    async def start(self) -> None:
        await self.broker.start()
        self.publish(self.hub.topics.hub_status, b"online", 1, True)
        self.hub.republish_all()

    async def stop(self) -> None:
        # the broker dies with the hub: the retained "offline" is for clients still connected
        await self.broker.publish(self.hub.topics.hub_status, b"offline", 1, True)
        await self.broker.stop()

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.broker.publish_nowait(topic, payload, qos, retain)

    def _on_message(
        self, topic: str, payload: bytes, qos: int, retain: bool, client_id: str | None
    ) -> None:
        if client_id is not None and topic.endswith(self._conn_suffix):
            where = self.hub.topics.parse_device_topic(topic)
            if isinstance(where, DeviceTopic):
                self.hub.client_ids[(where.user, where.device)] = client_id
        self.hub.service.ingest(((topic, payload),))

    def device_timed_out(self, effect: DeviceTimedOut, client_id: str | None) -> None:
        # amqtt would keep a silent client's socket (and will) until TCP gives up: close it so
        # the will is released; the engine ignores it (the device is already offline)
        if client_id is not None:
            task = asyncio.ensure_future(self.broker.disconnect_client(client_id))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def drained(self, below: int) -> None:
        return None  # publishing into the broker in-process never waits on a socket

    def before_flush(self) -> None:
        return None

    def after_flush(self) -> None:
        return None
