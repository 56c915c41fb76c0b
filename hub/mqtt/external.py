"""The hub on an external broker (Mosquitto, EMQX, ...) through its own asyncio MQTT client.

A persistent session (fixed client id, clean session off) subscribed at QoS 1, so activity
published while the hub is down is delivered when it returns. Every read from the socket is one
``ingest`` batch. QoS 1 messages are acked manually, only after the flush that persisted them,
so a SIGKILL of the hub loses nothing: the broker redelivers what was not acked.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from hub.core.events import DeviceTimedOut
from hub.mqtt.client import HubMqttClient, Received, Will, jittered_backoff
from hub.mqtt.embedded import PACKET_HEADROOM
from hub.mqtt.hub import MqttHub
from hub.protocol import BrokerURL

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
#: unacked QoS 1 messages that trigger an early flush (half Mosquitto's default in-flight 20)
ACK_WINDOW = 10
HUB_CLIENT_ID = "presence-hub"


class ExternalTransport:
    """The hub on an external broker through :class:`~hub.mqtt_client.HubMqttClient`.

    A persistent session (fixed client id, clean session off) subscribed at QoS 1; every read
    from the socket becomes one ``ingest`` batch. QoS 1 messages are acked after the flush that
    persisted them (requests at once: they need no persistence).
    """

    def __init__(
        self,
        hub: MqttHub,
        url: BrokerURL,
        *,
        client_id: str = HUB_CLIENT_ID,
        ca_file: str | None = None,
        tls_insecure: bool = False,
        keepalive: int = 30,
        will_hold_ms: int = 25,
    ) -> None:
        self.hub = hub
        self.will_hold_ms = will_hold_ms
        self._held: list[tuple[str, bytes]] = []
        self.wills_dropped = 0
        self.url = url
        self.loop = asyncio.get_running_loop()
        # (mid, qos, connection generation) ingested, not yet persisted / in the flush under way
        self._unacked: list[tuple[int, int, int]] = []
        self._acking: list[tuple[int, int, int]] = []
        self._first_connect = True
        self.connected = asyncio.Event()
        self.ingested = 0
        context: ssl.SSLContext | None = None
        if url.tls:
            context = ssl.create_default_context(cafile=ca_file)
            if tls_insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        self.client = HubMqttClient(
            url.host, url.port, client_id=client_id, clean_session=False, keepalive=keepalive,
            username=url.username, password=url.password, ssl_context=context,
            will=Will(hub.topics.hub_status, b"offline", 1, True),
            subscriptions=[(hub.topics.device_filter, 1)],
            on_messages=self._on_messages, on_connect=self._on_connect,
            on_disconnect=self._on_disconnect, on_oversize=self._on_oversize,
            max_packet_bytes=hub.service.config.max_payload_bytes + PACKET_HEADROOM,
            backoff=_backoff,
        )

    async def start(self) -> None:
        log.info("connecting to MQTT broker %s as %s", self.url, self.client.client_id)
        await self.client.start()
        try:
            await asyncio.wait_for(self.connected.wait(), timeout=10)
        except TimeoutError:
            log.warning("broker %s not reachable yet; the hub keeps retrying", self.url)

    async def stop(self) -> None:
        # persist and ack what we have before leaving, so nothing is redelivered needlessly
        self._release()
        await self.hub.service.flush()
        self.client.publish(self.hub.topics.hub_status, b"offline", qos=1, retain=True)
        if self.client.connected:
            await self.client.wait_all_acked(2.0)
        await self.client.stop()  # DISCONNECT (no will), socket closed, no more reconnects

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.client.publish(topic, payload, qos, retain)

    async def drained(self, below: int) -> None:
        """Return once at most ``below`` published messages wait for the broker's ack."""
        await self.client.drained(below)

    # client callbacks, on the loop ----------------------------------------------------------
    def _on_connect(self, session_present: bool) -> None:
        log.info("hub connected to %s (session present: %s)", self.url, session_present)
        self.client.publish(self.hub.topics.hub_status, b"online", qos=1, retain=True)
        first, self._first_connect = self._first_connect, False
        self.connected.set()
        self.hub.service.link_up()
        if first:
            self.hub.republish_all()

    def _on_disconnect(self, why: str) -> None:
        log.warning("hub lost the broker %s (%s); reconnecting", self.url, why)
        self.connected.clear()
        # acks of messages from the lost connection are void: the broker redelivers them
        self._unacked = []
        if self._held:
            log.warning("dropped %d offline message(s) that came just before the broker link "
                        "went down (a broker shutdown sends every will)", len(self._held))
            self.wills_dropped += len(self._held)
            self._held = []
        self.hub.service.link_down()

    def _on_oversize(self, topic: str, size: int, mid: int, qos: int) -> None:
        self.hub.service.reject("too_large", f"{topic}: payload of {size} bytes, over "
                                f"{self.hub.service.config.max_payload_bytes}")

    def _on_messages(self, received: list[Received]) -> None:
        batch: list[tuple[str, bytes]] = []
        acks = self._unacked
        gen = self.client.generation
        hold = self.will_hold_ms > 0
        ack_now: list[tuple[int, int]] = []
        for topic, payload, mid, qos in received:
            if qos:
                # a request needs no persistence: ack it at once; the rest after their flush
                if topic.endswith("/req"):
                    ack_now.append((mid, qos))
                else:
                    acks.append((mid, qos, gen))
            if hold and topic.endswith("/conn") and b'"offline"' in payload:
                self._hold(topic, payload)
                continue
            batch.append((topic, payload))
        if batch:
            self.ingested += len(batch)
            self.hub.service.ingest(batch)
        for mid, qos in ack_now:
            self.client.ack(mid, qos, gen)
        if len(acks) >= ACK_WINDOW:
            # the broker stops sending QoS 1 at its in-flight limit (Mosquitto: 20) until we
            # ack: flush now rather than at the next period so they do not stall
            self.hub.service.request_flush()

    def _hold(self, topic: str, payload: bytes) -> None:
        """Keep an offline ``conn`` back for ``will_hold_ms``.

        A broker that shuts down (a Mosquitto restart) sends every client's will and then
        drops the hub, within a millisecond (measured: 0.5 ms with 20 clients). Held wills are
        dropped when the hub's own link goes down in the meantime, so a broker restart does not
        flap every user offline; the devices reconnect with new sessions and the hub gives
        them a heartbeat timeout of grace. Otherwise they are applied, a few ms late.
        """
        self._held.append((topic, payload))
        if len(self._held) == 1:
            self.loop.call_later(self.will_hold_ms / 1000, self._release)

    def _release(self) -> None:
        held, self._held = self._held, []
        if held:
            self.ingested += len(held)
            self.hub.service.ingest(held)

    def before_flush(self) -> None:
        """What was ingested until now goes into the flush that starts now."""
        self._acking.extend(self._unacked)
        self._unacked = []

    def after_flush(self) -> None:
        """That flush is durable: ack its messages so the broker can forget them."""
        acks, self._acking = self._acking, []
        ack = self.client.ack
        for mid, qos, gen in acks:
            ack(mid, qos, gen)

    def device_timed_out(self, effect: DeviceTimedOut, client_id: str | None) -> None:
        return None  # the external broker enforces keepalive and sends the will itself


def _backoff(failures: int) -> float:
    """The hub's reconnect delay: 0.25-0.5 s first, doubling up to 15-30 s, half random."""
    return jittered_backoff(failures, RECONNECT_MIN_S, RECONNECT_MAX_S)
