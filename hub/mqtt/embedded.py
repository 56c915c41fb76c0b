"""The hub on its embedded broker: the broker's plugin hands every client message to the service.

An amqtt broker runs in this process (:mod:`hub.broker`) and hands every client message
straight to the service on the loop thread; the hub publishes straight into the broker. No
client loop, no socket between hub and broker.

Nothing acknowledged is lost: a client's QoS 1 PUBLISH gets its PUBACK only after the store
flush that persisted its effect (the broker holds it; :meth:`EmbeddedTransport.before_flush`
and :meth:`~EmbeddedTransport.after_flush` release it), as the external transport acks its
broker. Requests (``.../req``) are acknowledged at once: they change nothing to persist, and
their reply is the answer.

How long a PUBACK waits: a device sees it as the latency of every QoS 1 message (a birth, an
activity, its clean offline before it disconnects), so the transport does not leave it to the
periodic flush (1 s). A held PUBACK asks for a flush after :data:`ACK_DELAY_FLUSHES` times the
last flush's duration (at least :data:`ACK_DELAY_MIN_S`): the store then spends at most about a
tenth of its time on early flushes, however busy the clients (TinyDB rewrites its file on every
flush). A client with :data:`ACK_WINDOW` PUBACKs held asks for one at once: at its in-flight
window (paho's default is 20) it would send no QoS 1 until acknowledged.
"""

from __future__ import annotations

import asyncio
import logging

from hub.auth.accounts import CredentialStore
from hub.broker import EmbeddedBroker, HeldAck, TlsListener
from hub.core.events import DeviceTimedOut
from hub.mqtt.hub import MqttHub
from hub.protocol import DeviceTopic

log = logging.getLogger(__name__)

#: PUBACKs held for one client that ask for a flush at once (half paho's in-flight window)
ACK_WINDOW = 10
#: a held PUBACK asks for a flush after this many times the last flush's duration ...
ACK_DELAY_FLUSHES = 10
#: ... but not sooner than this (held PUBACKs of a burst go out with one flush)
ACK_DELAY_MIN_S = 0.02

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
            on_ack_held=self._ack_held,
        )
        self._loop = asyncio.get_running_loop()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_began = 0.0
        self._flush_cost = 0.0
        self._conn_suffix = "/conn"
        self._req_suffix = "/req"
        #: what the hub hears: on an external broker it subscribes to this and no more
        self._device_prefix = hub.topics.prefix + "/devices/"
        #: PUBACKs of the flush under way: sent once it is durable
        self._acking: list[HeldAck] = []

    async def start(self) -> None:
        await self.broker.start()
        self.publish(self.hub.topics.hub_status, b"online", 1, True)
        self.hub.republish_all()

    async def stop(self) -> None:
        # persist and acknowledge what has arrived, so clients need not send it again; what
        # comes after stays unacknowledged, for the next hub
        self.broker.stop_taking_messages()
        try:
            await self.hub.service.flush()
        except Exception:  # the service's own final flush retries; the broker must still stop
            log.exception("flush before stopping the embedded broker failed")
        # the broker dies with the hub: the retained "offline" is for clients still connected,
        # and the broker's stop lets them take it before it closes their connections
        await self.broker.publish(self.hub.topics.hub_status, b"offline", 1, True)
        await self.broker.stop()

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.broker.publish_nowait(topic, payload, qos, retain)

    def _on_message(
        self, topic: str, payload: bytes, qos: int, retain: bool, client_id: str | None
    ) -> bool:
        """Ingest one message; True holds its PUBACK until the flush that persists it.

        Traffic outside ``P/devices/`` is other clients' business (Home Assistant's birth on
        ``homeassistant/status``, a zigbee2mqtt sharing the broker): not input to the hub, so
        neither ingested nor counted as dropped, as on an external broker where the hub does
        not subscribe to it."""
        if not topic.startswith(self._device_prefix):
            return False
        if client_id is not None and topic.endswith(self._conn_suffix):
            where = self.hub.topics.parse_device_topic(topic)
            if isinstance(where, DeviceTopic):
                self.hub.client_ids[(where.user, where.device)] = client_id
        self.hub.service.ingest(((topic, payload),))
        return qos > 0 and not topic.endswith(self._req_suffix)

    def device_timed_out(self, effect: DeviceTimedOut, client_id: str | None) -> None:
        # amqtt would keep a silent client's socket (and will) until TCP gives up: close it so
        # the will is released; the engine ignores it (the device is already offline)
        if client_id is not None:
            task = asyncio.ensure_future(self.broker.disconnect_client(client_id))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def drained(self, below: int) -> None:
        """Return once at most ``below`` of the hub's messages wait for the broker, which holds
        them while a subscriber that keeps up has fallen behind (a republish pauses here)."""
        await self.broker.drained(below)

    def _ack_held(self, held_for_client: int) -> None:
        if held_for_client >= ACK_WINDOW:
            self.hub.service.request_flush()
        elif self._flush_timer is None:
            delay = max(ACK_DELAY_MIN_S, ACK_DELAY_FLUSHES * self._flush_cost)
            self._flush_timer = self._loop.call_later(delay, self._flush_due)

    def _flush_due(self) -> None:
        self._flush_timer = None
        self.hub.service.request_flush()

    def before_flush(self) -> None:
        """What was ingested until now goes into the flush that starts now."""
        if self._flush_timer is not None:  # this flush takes the PUBACKs it was waiting for
            self._flush_timer.cancel()
            self._flush_timer = None
        self._acking.extend(self.broker.take_held_acks())
        self._flush_began = self._loop.time()

    def after_flush(self) -> None:
        """That flush is durable: acknowledge its messages to their clients."""
        self._flush_cost = self._loop.time() - self._flush_began
        acks, self._acking = self._acking, []
        self.broker.send_acks(acks)
