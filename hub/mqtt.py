"""The hub on MQTT: device topics in, retained user topics and events out.

Two ways onto the wire, one sink:

* **Embedded** (``broker="embedded"``): an amqtt broker runs in this process and its plugin
  hands every client message straight to the service on the loop thread; the hub publishes
  straight into the broker. No client loop, no socket between hub and broker.
* **External** (``broker="mqtt://..."`` or ``mqtts://``): the hub's own asyncio MQTT client
  (:mod:`hub.mqtt_client`, which replaced paho there: see its docstring for the figures) on a
  persistent session (fixed client id, clean session off) subscribed at QoS 1, so activity
  published while the hub is down is delivered when it returns. Every read from the socket is
  one ``ingest`` batch. QoS 1 messages are acked manually, only after the flush that persisted
  them, so a SIGKILL of the hub loses nothing: the broker redelivers what was not acked.

Retained user topics are published only when their payload changed (a ``sync`` republishes
all). ``P/hub/status`` is ``online`` while the hub runs, with ``offline`` as its will.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from hub.auth import CredentialStore
from hub.broker import BrokerError, EmbeddedBroker, TlsListener
from hub.engine import DeviceTimedOut, EmitEvent
from hub.mqtt_client import HubMqttClient, Received, Will, jittered_backoff
from hub.protocol import (
    DeviceMessage,
    DeviceTopic,
    ReplyPayload,
    RequestPayload,
    Topics,
    UserStatePayload,
    event_json,
    text_payload,
)
from hub.service import PresenceError, PresenceService
from hub.urls import BrokerURL, InvalidURL

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:1883"
RECONNECT_MIN_S = 0.5
#: unacked QoS 1 messages that trigger an early flush (half Mosquitto's default in-flight 20)
ACK_WINDOW = 10
RECONNECT_MAX_S = 30.0
HUB_CLIENT_ID = "presence-hub"
#: users whose retained topics are republished per loop turn (4 messages each)
REPUBLISH_SLICE = 500
#: unacked messages above which a republish waits for the broker
REPUBLISH_BACKLOG = 50_000


class Publisher(Protocol):
    """Puts one message on the wire without blocking the loop; order is preserved."""

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None: ...


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("republishing retained state failed", exc_info=task.exception())


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PresenceError(f"invalid listen address {listen!r}: use HOST:PORT, e.g. 127.0.0.1:1883")
    return host.strip("[]"), int(port)


def broker_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Does something accept TCP connections on ``host:port``? (for ``--broker auto``)"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class MqttHub:
    """The MQTT side of the service: a sink for effects and a source of device messages."""

    def __init__(self, service: PresenceService, publisher_factory: Callable[[MqttHub], Any]):
        self.service = service
        self.topics: Topics = service.topics
        #: per user, what its retained topics hold: (hash of the state JSON, status, custom
        #: status, primary). The strings are the engine's own objects and the JSON is kept as
        #: a hash, so this costs ~70 bytes a user instead of ~870 for topic -> payload.
        self._retained: dict[str, tuple[int, str, str | None, str | None]] = {}
        self._factory = publisher_factory
        self._transport: Any = None
        #: (user, device) -> MQTT client id that sent its birth (embedded broker only)
        self.client_ids: dict[tuple[str, str], str] = {}
        self._republishing: asyncio.Future[None] | None = None

    @property
    def transport(self) -> Any:
        return self._transport

    async def start(self) -> None:
        self._transport = self._factory(self)
        self.service.add_sink(self)
        self.service.set_request_handler(self._serve_request)
        await self._transport.start()

    async def stop(self) -> None:
        if self._transport is None:
            return
        if self._republishing is not None:
            self._republishing.cancel()
        await self._transport.stop()
        self.service.remove_sink(self)

    # ------------------------------------------------------------------ sink

    def _publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._transport.publish(topic, payload, qos, retain)

    def publish_state(self, state: UserStatePayload, forced: bool) -> None:
        """The user's four retained topics, each only when its payload changed (or forced)."""
        uid = state.user_id
        doc = state.to_json()
        now = (hash(doc), state.status, state.custom_status, state.active_device)
        was = None if forced else self._retained.get(uid)
        self._retained[uid] = now
        base = self.topics.user_base(uid)
        publish = self._transport.publish
        if was is None or was[0] != now[0]:
            publish(base + "state", doc, 1, True)
        if was is None or was[1] != now[1]:
            publish(base + "status", text_payload(now[1]), 1, True)
        if was is None or was[2] != now[2]:
            publish(base + "custom", text_payload(now[2]), 1, True)
        if was is None or was[3] != now[3]:
            publish(base + "primary", text_payload(now[3]), 1, True)

    def publish_event(self, event: EmitEvent) -> None:
        payload = event_json(event.event, event.user_id, event.old, event.new, event.ts)
        self._publish(self.topics.events(event.user_id), payload, 1, False)

    def device_timed_out(self, effect: DeviceTimedOut) -> None:
        hook = getattr(self._transport, "device_timed_out", None)
        if hook is not None:
            hook(effect, self.client_ids.get((effect.user_id, effect.device_id)))

    def before_flush(self) -> None:
        hook = getattr(self._transport, "before_flush", None)
        if hook is not None:
            hook()

    def after_flush(self) -> None:
        hook = getattr(self._transport, "after_flush", None)
        if hook is not None:
            hook()

    def republish_all(self) -> None:
        """Every user's retained topics, e.g. at start (an embedded broker forgets them).

        In the background, :data:`REPUBLISH_SLICE` users per loop turn, pausing while the
        transport has more than :data:`REPUBLISH_BACKLOG` messages unacked: a million devices
        are millions of messages, which must not sit in memory at once nor hold the loop
        (heartbeats are read in between). A user whose state changes meanwhile is published
        with its newest state; publishing a snapshot is idempotent.
        """
        if self._republishing is not None:
            self._republishing.cancel()
        self._republishing = asyncio.ensure_future(self._republish(self.service.engine.user_ids()))
        self._republishing.add_done_callback(_log_failure)

    async def _republish(self, user_ids: list[str]) -> None:
        engine = self.service.engine
        drained = getattr(self._transport, "drained", None)
        began = asyncio.get_running_loop().time()
        for start in range(0, len(user_ids), REPUBLISH_SLICE):
            for uid in user_ids[start:start + REPUBLISH_SLICE]:
                state = engine.snapshot(uid)
                if state is not None:
                    self.publish_state(state, forced=True)
            await asyncio.sleep(0)
            if drained is not None:
                await drained(REPUBLISH_BACKLOG)
        if user_ids:
            log.info("republished the retained state of %d users in %.2f s", len(user_ids),
                     asyncio.get_running_loop().time() - began)

    # ------------------------------------------------------------------ requests

    async def _serve_request(self, msg: DeviceMessage) -> None:
        from hub.commands import run_command  # commands import the service; avoid a cycle

        body = msg.body
        assert isinstance(body, RequestPayload)
        try:
            result = await run_command(self.service, msg.user, body.command)
            reply = ReplyPayload(id=body.id, ok=result.ok, text=result.text, data=result.data)
        except Exception as exc:  # never leave a caller waiting on a crash
            log.exception("command %r of %s failed", body.command, msg.user)
            reply = ReplyPayload(id=body.id, ok=False, text=f"hub error: {exc}")
        self._publish(self.topics.reply(msg.user, msg.device), reply.to_json(), 1, False)


# ---------------------------------------------------------------------- embedded broker


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


# ---------------------------------------------------------------------- external broker


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


def attach_mqtt(
    service: PresenceService,
    broker: str,
    *,
    listen: str = DEFAULT_LISTEN,
    client_id: str = HUB_CLIENT_ID,
    ca_file: str | None = None,
    tls_insecure: bool = False,
    allow_anonymous: bool | None = None,
    credentials: str | CredentialStore | None = None,
    tls_listen: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> MqttHub:
    """Put ``service`` on MQTT: ``broker`` is ``embedded``, ``auto`` or an MQTT URL.

    ``auto`` uses a broker that already answers on ``listen``, else starts the embedded one
    there, and logs which.

    For the embedded broker: ``credentials`` is the accounts file (or store); as soon as it
    holds an account, clients must log in and each may touch only its own topics.
    ``allow_anonymous`` (None: only while there are no accounts) and the TLS listener
    (``tls_listen`` HOST:PORT with ``tls_cert``/``tls_key`` PEM files) as in ``presence-hub``.
    For an external broker, the hub's own login is in the URL (``mqtt://user:pass@host``) and
    ``ca_file``/``tls_insecure`` apply to ``mqtts://``.
    """
    host, port = parse_listen(listen)
    tls: TlsListener | None = None
    if tls_listen or tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise PresenceError("a TLS listener needs both a certificate and a key file "
                                "(--tls-cert and --tls-key)")
        tls_host, tls_port = parse_listen(tls_listen or f"{host}:8883")
        tls = TlsListener(tls_host, tls_port, tls_cert, tls_key)
    store = CredentialStore(credentials) if isinstance(credentials, str) else credentials
    if broker == "auto":
        if broker_answers(host, port):
            log.info("a broker answers on %s:%d: the hub connects to it", host, port)
            broker = f"mqtt://{host}:{port}"
        else:
            log.info("no broker on %s:%d: starting the embedded broker there", host, port)
            broker = "embedded"
    if broker == "embedded":

        def factory(hub: MqttHub) -> Any:
            return EmbeddedTransport(hub, host, port, allow_anonymous=allow_anonymous,
                                     credentials=store, tls=tls)

    else:
        try:
            url = BrokerURL.parse(broker)
        except InvalidURL as exc:
            raise PresenceError(str(exc)) from None

        def factory(hub: MqttHub) -> Any:
            return ExternalTransport(hub, url, client_id=client_id, ca_file=ca_file,
                                     tls_insecure=tls_insecure)

    hub = MqttHub(service, factory)
    service.attach(hub)
    return hub


__all__ = [
    "BrokerError",
    "BrokerURL",
    "EmbeddedTransport",
    "ExternalTransport",
    "MqttHub",
    "attach_mqtt",
    "broker_answers",
    "parse_listen",
]
