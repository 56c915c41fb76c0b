"""The hub on an external broker (Mosquitto, EMQX, ...) through its own asyncio MQTT client.

Two connections. The main one is a persistent session (fixed client id, clean session off)
subscribed at QoS 1 to the durable kinds (``activity``, ``set``, ``ack``), so what is published
while the hub is down is delivered when it returns. Its QoS 1 messages are acked manually, only
after the flush that persisted them, so a SIGKILL of the hub loses nothing: the broker
redelivers what was not acked. Every read from a socket is one ``ingest`` batch.

The live one (client id ``presence-hub/live``) carries liveness and commands (``conn``,
``heartbeat``, ``req``) and acks at once. It exists because held acks fill the broker's
in-flight window for a client (Mosquitto: 20), and the broker then withholds every further QoS 1
message from it: with one connection, a store outage (acks held until the store is back) made
the hub deaf to wills, births and commands. Nothing there needs the store before its ack: a
``conn`` is retained at the broker (every device's current one comes again on each subscribe,
and heartbeats stand in for a lost birth), a ``req`` changes nothing by itself (its reply waits
for the change to be durable, or says it is not saved yet). It is a persistent session too:
a request or a will published while the hub reconnects (a broker restart) is queued for it,
not lost.

One hub per broker and prefix: before it connects with the session's client id (which would
take a running hub's session over), the hub reads the retained ``P/hub/status`` with a
throw-away client and refuses to start while it says ``online``.

Whenever the broker has no session for the hub (a broker restarted without persistence), its
retained topics may be gone too: the hub republishes every user's state and says in the log
that messages published to it meanwhile may have been lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import shlex
import ssl

from hub.core.errors import PresenceError
from hub.core.events import DeviceTimedOut
from hub.mqtt.client import (
    FAST_RETRY_S,
    BrokerRefused,
    HubMqttClient,
    ProtocolError,
    Received,
    Will,
    jittered_backoff,
    read_retained,
)
from hub.mqtt.embedded import PACKET_HEADROOM
from hub.mqtt.hub import MqttHub
from hub.protocol import BrokerURL

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
#: attempts that could not reach the broker retried within 0.1-0.25 s (about 7 s) before the
#: backoff grows: a broker restart must not leave the hub away longer than its devices
FAST_RETRIES = 40
#: how long start() waits for the broker (the check for another hub, then the CONNACK)
START_WAIT_S = 10.0
#: one look at P/hub/status, from TCP connect to DISCONNECT
PROBE_TIMEOUT_S = 5.0
#: unacked QoS 1 messages that trigger an early flush (half Mosquitto's default in-flight 20)
ACK_WINDOW = 10
HUB_CLIENT_ID = "presence-hub"


def hub_client_id(url: BrokerURL) -> str:
    """The hub's client id on ``url``: ``presence-hub``, or, when the hub logs in, that name
    plus 16 hex digits of an HMAC of its username keyed by its password.

    Why: on Mosquitto any account may connect under any client id and so take over the
    holder's session (the password and ACL files cannot forbid it); a takeover of the hub's
    id would end its persistent session and lose what the broker was keeping for it. Agents'
    ids carry a random session id nobody else can read; this makes the hub's just as
    unguessable to other accounts, while it stays the same across restarts (the session
    survives them) and needs no setting.
    """
    if not (url.username and url.password):
        return HUB_CLIENT_ID
    tag = hmac.new(url.password.encode(), url.username.encode(), hashlib.sha256).hexdigest()
    return f"{HUB_CLIENT_ID}-{tag[:16]}"
#: the live connection's client id is the main one's plus this
LIVE_SUFFIX = "/live"
#: device topic kinds whose effect must be persisted before the broker may forget them: the
#: main persistent session, acked after the flush
DURABLE_KINDS = ("activity", "set", "ack")
#: liveness and commands, on the live connection (a session of its own, acked at once), with the
#: QoS of each subscription (heartbeats are QoS 0 by the protocol)
LIVE_KINDS = (("conn", 1), ("heartbeat", 0), ("req", 1))


class HubAlreadyActive(PresenceError):
    """Another hub's retained ``P/hub/status`` says ``online`` on this broker and prefix."""


class HubRefused(PresenceError):
    """The broker refused the hub's login (or its look at ``P/hub/status``) at start.

    A configuration error, not an outage: retrying cannot fix a wrong password, so the hub
    stops with one line saying what to change instead of running on without a broker.
    """


#: the one CONNACK refusal that is worth retrying: the broker is there but busy
CONNACK_SERVER_UNAVAILABLE = 3


class ExternalTransport:
    """The hub on an external broker through two :class:`~hub.mqtt.client.HubMqttClient`.

    ``client``: the persistent session for durable messages, acked after the flush that
    persisted them; it holds the hub's will and ``P/hub/status``. ``live``: a session of its own
    for liveness and commands, acked at once, so held acks never stop wills, births and requests
    (see the module docstring). Every read from either socket becomes one ``ingest`` batch.
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
        leased: bool = False,
    ) -> None:
        self.hub = hub
        self.url = url
        #: several hubs share this broker and a Redis lease decides which one is active (see
        #: hub/app/leadership.py): no look at P/hub/status before connecting (a dead active
        #: hub's status stays 'online' until the broker's keepalive runs out, long after its
        #: lease), and no reconnect that would take the hub's session over before the lease
        #: is confirmed ours
        self.leased = leased
        self.loop = asyncio.get_running_loop()
        if client_id == HUB_CLIENT_ID:
            client_id = hub_client_id(url)
        self._client_id = client_id
        # (mid, qos, connection generation) ingested, not yet persisted / in the flush under way
        self._unacked: list[tuple[int, int, int]] = []
        self._acking: list[tuple[int, int, int]] = []
        self._first_connect = True
        #: the retained ``P/hub/retained`` as read at start (None: none, or not read)
        self._broker_digest: bytes | None = None
        self.connected = asyncio.Event()
        self.ingested = 0
        context: ssl.SSLContext | None = None
        if url.tls:
            context = ssl.create_default_context(cafile=ca_file)
            if tls_insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        self._ssl = context
        self.client = HubMqttClient(
            url.host, url.port, client_id=client_id, clean_session=False, keepalive=keepalive,
            username=url.username, password=url.password, ssl_context=context,
            will=Will(hub.topics.hub_status, b"offline", 1, True),
            subscriptions=[(self._filter(kind), 1) for kind in DURABLE_KINDS],
            # the single filter of hub versions before the live connection: left in the
            # session, it would deliver liveness here too (twice, and behind held acks)
            unsubscriptions=[hub.topics.device_filter],
            on_messages=self._on_messages, on_connect=self._on_connect,
            on_disconnect=self._on_disconnect, on_oversize=self._on_oversize,
            max_packet_bytes=hub.service.config.max_payload_bytes + PACKET_HEADROOM,
            backoff=_backoff, fast_retries=FAST_RETRIES,
        )
        # No will and no P/hub/status here: the main connection speaks for the hub. Each of its
        # connections waits for the main one to be up (_after_main).
        self.live = HubMqttClient(
            url.host, url.port, client_id=client_id + LIVE_SUFFIX, clean_session=False,
            keepalive=keepalive, username=url.username, password=url.password,
            ssl_context=context,
            subscriptions=[(self._filter(kind), qos) for kind, qos in LIVE_KINDS],
            on_messages=self._on_live_messages, on_connect=self._on_live_connect,
            on_disconnect=self._on_live_disconnect, on_oversize=self._on_oversize,
            max_packet_bytes=hub.service.config.max_payload_bytes + PACKET_HEADROOM,
            backoff=_backoff, fast_retries=FAST_RETRIES, before_connect=self._after_main,
        )

    def _filter(self, kind: str) -> str:
        """``P/devices/+/+/KIND``: MQTT has no filter for a set of kinds, so one per kind."""
        return self.hub.topics.device_filter.rpartition("/")[0] + "/" + kind

    async def start(self) -> None:
        """Check that no other hub is active, then connect (retrying in the background).

        Raises :class:`HubAlreadyActive` (one line for the command line) when another hub is,
        and :class:`HubRefused` when the broker refuses the hub's login: only network errors
        (and a busy broker) are retried, since no retry fixes a wrong password.
        If the broker cannot be asked within :data:`START_WAIT_S`, the hub starts anyway and
        asks before its first connection: while another hub is active it waits, never taking
        that hub's session over.
        """
        deadline = self.loop.time() + START_WAIT_S
        checked = self.leased or await self._check_until(deadline)
        if not checked:
            self.client.before_connect = self._gate
        elif not self.leased:
            self._broker_digest = await self._read_digest()
        log.info("connecting to MQTT broker %s as %s", self.url, self.client.client_id)
        await self.client.start()
        await self.live.start()
        try:
            await asyncio.wait_for(self.connected.wait(),
                                   timeout=max(0.0, deadline - self.loop.time()))
        except TimeoutError:
            log.warning("broker %s not reachable yet; the hub keeps retrying", self.url)

    async def _check_until(self, deadline: float) -> bool:
        """Ask the broker whether another hub is active, retrying quickly until ``deadline``;
        False if it could not be asked. Raises :class:`HubAlreadyActive`, :class:`HubRefused`."""
        while True:
            try:
                await self._check_no_active_hub()
                return True
            except (OSError, TimeoutError, ssl.SSLError, ProtocolError) as exc:
                why = f"{exc or type(exc).__name__}"
            except BrokerRefused as exc:
                if exc.code != CONNACK_SERVER_UNAVAILABLE:
                    raise HubRefused(self._refusal(exc)) from None
                why = f"refused: {exc}"
            if self.loop.time() >= deadline:
                break
            await asyncio.sleep(min(FAST_RETRY_S[1], max(0.0, deadline - self.loop.time())))
        log.warning("cannot ask the MQTT broker %s yet whether another presence hub is active "
                    "(%s); the hub asks again before it connects", self.url, why)
        return False

    def _refusal(self, exc: BrokerRefused) -> str:
        """One line for a refusal at start: what the broker said and what to change."""
        url, accounts = self.url, ("an account made with 'presence-hub users add-hub' and "
                                   "given to the broker with 'presence-hub users "
                                   "export-mosquitto' (then reload Mosquitto)")
        if exc.code is None:  # the login was accepted; reading P/hub/status was not
            return (f"the MQTT broker {url} accepted the hub's login but refused it "
                    f"{exc}: the hub's account must read and write "
                    f"{self.hub.topics.prefix}/#, as {accounts} may")
        if exc.code in (4, 5) and url.username:
            return (f"the MQTT broker {url} refused the hub's login as {url.username!r}: "
                    f"{exc}. Check the username and password in --broker (or PRESENCE_BROKER, "
                    f"or broker in the --config file): the hub needs {accounts}")
        if exc.code in (4, 5):
            return (f"the MQTT broker {url} refused the hub, which gave no login: {exc}. "
                    f"Give one in the URL, --broker 'mqtt://presence-hub:PASSWORD@{url.host}:"
                    f"{url.port}', with {accounts}")
        return f"the MQTT broker {url} refused the hub: {exc}"

    async def _check_no_active_hub(self) -> None:
        """Read the retained ``P/hub/status`` with a client of its own (a random client id and
        a clean session); ``online`` there means another hub holds this broker and prefix."""
        topic = self.hub.topics.hub_status
        status = await read_retained(
            self.url.host, self.url.port, topic,
            client_id=f"{self._client_id}/probe-{secrets.token_hex(4)}",
            username=self.url.username, password=self.url.password, ssl_context=self._ssl,
            timeout=PROBE_TIMEOUT_S)
        if status == b"online":
            login = (f" -u {shlex.quote(self.url.username)} -P PASSWORD"
                     if self.url.username else "")
            tls = " --cafile CA.pem" if self.url.tls else ""
            raise HubAlreadyActive(
                f"another presence hub is active on the MQTT broker {self.url} with prefix "
                f"{self.hub.topics.prefix!r} (its retained {topic} is 'online'): stop it "
                f"first. A hub that died is marked offline by the broker within "
                f"{self.client.keepalive * 3 // 2} s; only if it died while the broker was down, "
                f"clear its status by hand and start again: mosquitto_pub -h {self.url.host} "
                f"-p {self.url.port}{login}{tls} -r -t {topic} -m offline")

    @property
    def digest_topic(self) -> str:
        """``P/hub/retained``: what the broker held of the hub's retained state when it last
        stopped cleanly (see :meth:`MqttHub.retained_digest`)."""
        return f"{self.hub.topics.prefix}/hub/retained"

    async def _read_digest(self) -> bytes | None:
        """The retained digest the last run left, before this hub publishes anything; None
        when there is none or it cannot be read (then everything is republished)."""
        try:
            return await read_retained(
                self.url.host, self.url.port, self.digest_topic,
                client_id=f"{self._client_id}/probe-{secrets.token_hex(4)}",
                username=self.url.username, password=self.url.password, ssl_context=self._ssl,
                timeout=PROBE_TIMEOUT_S) or None
        except (OSError, TimeoutError, ssl.SSLError, ProtocolError, BrokerRefused) as exc:
            log.info("could not read %s (%s): republishing every user's retained state",
                     self.digest_topic, exc or type(exc).__name__)
            return None

    async def _gate(self) -> str | None:
        """The client's ``before_connect`` when start() could not ask: None to connect, else
        why not yet (another hub is active: wait for it to go; the login was refused)."""
        try:
            await self._check_no_active_hub()
        except HubAlreadyActive as exc:
            return f"{exc} [this hub waits and asks again]"
        except BrokerRefused as exc:
            return f"the MQTT broker {self.url} refused the hub: {exc}"
        except ProtocolError as exc:
            return f"the MQTT broker {self.url} answered the hub's check garbled: {exc}"
        return None

    async def _lease_gate(self) -> str | None:
        """The main client's ``before_connect`` after a lost link when hubs share a lease:
        take the hub's session (from whoever holds it) only while the lease is ours."""
        if await self.hub.service.confirm_leading():
            return None
        return "another hub holds the lease: this hub does not take the hub's session over"

    async def stop(self) -> None:
        if self.hub.service.fenced:
            # another hub is active: no flush (the store refuses it), no 'offline' over the
            # new active hub's 'online'; what we did not ack goes to it with the session
            await self.live.stop()
            await self.client.stop()
            return
        # persist and ack what we have before leaving, so nothing is redelivered needlessly
        await self.hub.service.flush()
        # after every user topic on this connection: if the broker has it, it has them
        self.client.publish(self.digest_topic, self.hub.retained_digest(), qos=1, retain=True)
        self.client.publish(self.hub.topics.hub_status, b"offline", qos=1, retain=True)
        if self.client.connected:
            await self.client.wait_all_acked(2.0)
        await self.live.stop()
        await self.client.stop()  # DISCONNECT (no will), socket closed, no more reconnects

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """On the main connection: the hub's status and every user topic keep one order."""
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
        self._link_up()
        if not session_present and not first:
            # The broker forgot the hub: it restarted without persistence (or the session
            # expired). Its retained messages went with it, and what devices published
            # before the hub subscribed again was delivered to no one.
            log.warning("the MQTT broker %s has no session for the hub (it restarted without "
                        "persistence, or the session expired): messages published to the hub "
                        "while it was away may have been lost; republishing every user's "
                        "retained state", self.url)
        elif not session_present:
            log.info("the MQTT broker %s holds no session for the hub yet (a first start, or "
                     "the broker lost it while the hub was away)", self.url)
        elif not first and self.client.failures_before:
            # The broker was unreachable for a while: if it restarted after a crash, its
            # retained messages are those of its last autosave, older than what we published.
            log.info("the MQTT broker %s was unreachable for a while: republishing every "
                     "user's retained state in case it restarted from an older save", self.url)
        elif self.client.short_links:
            # A link the broker closed soon after accepting it: a restart, or another client
            # with the hub's id (a second hub) that may have published its own state.
            log.info("the MQTT broker %s closed the hub's last link soon after accepting it: "
                     "republishing every user's retained state", self.url)
        digest, self._broker_digest = self._broker_digest, None
        if first and session_present and self.hub.broker_holds_loaded_state(digest):
            # A restart of the hub alone: the broker kept its session and every retained
            # topic as the last run left them at its clean stop (its digest says so), so a
            # republish (millions of messages at a million devices) would change nothing.
            self.hub.adopt_broker_state()
        elif first or not session_present or self.client.failures_before or self.client.short_links:
            self.hub.republish_all()

    def _on_disconnect(self, why: str) -> None:
        log.warning("hub lost the broker %s (%s); reconnecting", self.url, why)
        self.connected.clear()
        if self.leased:
            self.client.before_connect = self._lease_gate  # the client clears it once up
        # Without it the hub hears no activity: idle clocks must not run on that silence.
        # What was ingested and not acked is acked after the flush as usual: the broker sends
        # it again on the next connection, and the client acks that copy instead of handing
        # it on twice. Wills that came just before (a broker shutdown sends every client's
        # will, then drops the hub) are the engine's to judge: link_down voids those still in
        # their grace.
        self.hub.service.link_down()

    def _link_up(self) -> None:
        """The hub hears devices again once both links are up: without the live one it hears
        no heartbeats, wills or births; without the main one no activity."""
        if self.client.connected and self.live.connected:
            self.hub.service.link_up()

    async def _after_main(self) -> None:
        """The live client's ``before_connect``: wait until the main connection is up.

        So the live session is never taken from another hub that the check in start() finds
        active, and after a common outage (a broker restart) the main session's backlog comes
        first: a request queued behind earlier activity (``presence activity``) then sees it,
        as it did when both kinds shared one session.
        """
        await self.connected.wait()

    def _on_live_connect(self, session_present: bool) -> None:
        # the broker sends every device's retained conn on this subscribe (after what it queued
        # for the session): the engine takes a birth of the session it knows as liveness, an
        # older one as stale
        log.info("hub's live link to %s up (liveness and commands; session present: %s)",
                 self.url, session_present)
        self._link_up()

    def _on_live_disconnect(self, why: str) -> None:
        log.warning("hub's live link to %s lost (%s); reconnecting", self.url, why)
        self.live.before_connect = self._after_main  # the client clears it once connected
        self.hub.service.link_down()

    def _on_live_messages(self, received: list[Received]) -> None:
        """Liveness and commands: ingested, then acked at once (nothing of them waits for
        the store; see the module docstring)."""
        if not received:
            return
        self.ingested += len(received)
        self.hub.service.ingest([(topic, payload) for topic, payload, _mid, _qos in received])
        gen = self.live.generation
        ack = self.live.ack
        for _topic, _payload, mid, qos in received:
            if qos:
                ack(mid, qos, gen)

    def _on_oversize(self, topic: str, size: int, mid: int, qos: int) -> None:
        self.hub.service.reject("too_large", f"{topic}: payload of {size} bytes, over "
                                f"{self.hub.service.config.max_payload_bytes}")

    def _on_messages(self, received: list[Received]) -> None:
        batch: list[tuple[str, bytes]] = []
        acks = self._unacked
        gen = self.client.generation
        ack_now: list[tuple[int, int]] = []
        for topic, payload, mid, qos in received:
            if qos:
                # a request needs no persistence: ack it at once; the rest after their flush
                if topic.endswith("/req"):
                    ack_now.append((mid, qos))
                else:
                    acks.append((mid, qos, gen))
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
    """The hub's reconnect delay after the quick retries (:data:`FAST_RETRIES`) and after a
    refusal: 0.25-0.5 s first, doubling up to 15-30 s, half random."""
    return jittered_backoff(failures, RECONNECT_MIN_S, RECONNECT_MAX_S)
