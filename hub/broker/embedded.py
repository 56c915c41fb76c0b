"""The embedded MQTT broker: amqtt running in the hub's own asyncio loop.

Why embedded: an edge box should not need a separate Mosquitto to start. The hub is *not* an
MQTT client of its own broker: a subclass of amqtt's broker hands it every PUBLISH that clients
send, and the hub publishes straight into the broker, so no socket, client loop or encoding
round trip sits between them.

Read against amqtt 0.12.1 (:data:`AMQTT_VERSION`), and only that: the broker below, the
connection handler (hub/broker/connection.py) and the session and CONNECT reader
(hub/broker/session.py) override 28 of amqtt's methods (17 of them private), redo one
(``init_from_connect``), replace two of its internal dicts and, with :class:`ClientConnection`,
its per-connection streams, reader task and message loop, and another version may no longer
call them, or call them with other arguments, without any error. pyproject.toml pins
amqtt to exactly this version, and :meth:`EmbeddedBroker.start` refuses any other with one line
saying so (:func:`check_amqtt_version`). Moving to a new amqtt means reading each override
against its code again, then changing both.

amqtt 0.12.1 deviates from MQTT 3.1.1 in ways the hub would feel. Measured, and what we do
(each has a test in tests/test_broker_embedded.py or, for the faults of issue 11, in
tests/test_embedded_faults.py):

* Keepalive is never enforced: a silent client's socket, and so its will, lingers until TCP
  gives up. We close a connection that has been silent for 1.5 x its keepalive
  ([MQTT-3.1.2-24]), which also publishes its will.
* A connection that never sends CONNECT is kept forever, and one whose first packet is not a
  valid CONNECT is dropped without closing its socket. We close both (after
  ``connect_timeout`` for the silent kind).
* Wills do not pass through any plugin event (nor the path of client messages). We catch them
  where amqtt decides a disconnect was abnormal and hand them to ``on_message`` like any
  other message.
* On connect amqtt sends the client every retained message matching *any* client's
  subscriptions, at QoS 0, and sends them again when the client subscribes. We send retained
  messages only for the connecting session's own subscriptions, at the QoS it was granted.
* A refused client stays registered as connected, and a client that publishes to an empty
  topic is left with an open socket and a reader nobody serves. We end both (the second as a
  protocol error [MQTT-4.7.3-1]: its will goes out). (A wildcard in a PUBLISH topic makes
  amqtt's parser stop inside the packet, so the rest of that client's stream is garbage until
  its keepalive runs out and its will goes out; left alone, being that client's own doing.)
* A client that publishes to a ``$`` topic is treated the same way. MQTT reserves those
  topics for the server but does not make the PUBLISH an error; we acknowledge it and drop the
  message (counted as ``dollar_topic``), as Mosquitto does for ``$SYS``.
* A client reconnecting with a client id that is still connected does not drop the old
  connection when the new one asks for a clean session ([MQTT-3.1.4-2]). We drop it (its will
  goes out, with its own session id, as for any lost connection) before the new one starts.
* A QoS 1 PUBLISH is acknowledged on receipt, before the hub has acted on it, let alone
  persisted it. Our connection handler (hub/broker/connection.py) leaves the PUBACK to us: sent
  once the hub has handled the message, or held until the hub's store flush has persisted it
  (``on_message`` returns True; :meth:`EmbeddedBroker.send_acks`).
* Every outgoing message is a task of its own, waiting up to 5 s for its PUBACK, with nothing
  bounding how many wait for a client that does not read. Ours go through one bounded queue
  per session (connection.py), written while the socket takes them, dropped (QoS 0 first, one
  log line per connection) beyond ``max_queued``. The hub's own messages skip amqtt's
  broadcast queue (a task per message) and wait, at most ``HUB_PATIENCE_S`` per client, for
  clients that fall behind, so one that keeps up loses nothing of a bulk republish.
* The persistent session of an anonymous client is forgotten the moment it disconnects, and
  nothing is queued for it; without accounts every client is anonymous. We keep persistent
  sessions whoever owns them, with their QoS 1/2 messages queued (bounded, see below).
* Messages are delivered at the subscription's QoS, not min(publish, subscription)
  ([MQTT-3.8.4-6]): a QoS 0 heartbeat reached a QoS 1 watcher as QoS 1. We deliver at the
  lower of the two.
* A stop closes every connection without DISCONNECT, and amqtt queues each client's will for
  a broadcast loop it is stopping, then logs "N messages not broadcasted" (twice) at every
  clean stop. While stopping we pass no will on: wills are not reported then (the clients did
  not fail; the broker went), and their subscribers are being closed too (tested in
  tests/test_first_hour.py).

Security (issue #5; the rules themselves are in hub/auth/, tests in tests/test_security.py):

* Authentication and topic checks are our own amqtt plugins (``HubAuthPlugin``,
  ``HubTopicPlugin``) driven by an :class:`~hub.auth.AccessPolicy`. amqtt's built-in ACL plugin
  grants ``a/#`` to a client allowed only ``a/+``, has no per-user substitution, and its
  receive ACL cannot be configured; none of it is used.
* amqtt takes over (and so disconnects) an existing client id *before* authenticating the new
  connection, so anyone could kick a device off by reusing its client id. We read CONNECT,
  authenticate, and only then touch existing sessions. With accounts configured, a client id
  held by another account is refused (CONNACK 2) rather than taken over.
* amqtt never checks a will against the publish ACL, so a device could forge another device's
  ``conn`` through its will. We check the will topic at CONNECT and refuse (CONNACK 5).
* Retained messages sent on SUBSCRIBE skip amqtt's receive check; ours check every one.
* amqtt reads a packet of any size (up to MQTT's 256 MB) into memory. A connection that sends
  a packet larger than ``max_packet_bytes`` is closed (its will goes out).
* Every message handed to the hub is checked once more against the sender's grant.
* With no accounts the broker is open, so it refuses to listen beyond loopback unless
  anonymous access is asked for explicitly (Mosquitto 2.0's rule).

Scale (issue #6): amqtt scans every subscribed filter per message, every retained topic per
SUBSCRIBE and every filter per connect and disconnect, and builds a ``transitions`` state
machine per session. Tries over topic levels (hub/broker/index.py) replace the scans, lighter
sessions (hub/broker/session.py) the machines, and the session monitor looks only at
connections that ended. Every delivery still passes the receive check of hub/auth/.
Measured with ``python -m bench --only embedded``: 10k agent-like devices at ~8% of a core
(amqtt alone: 1,000 at 30%, 2,000 at 100%).

Memory (issue 16): amqtt kept seven tasks, four ``asyncio.Queue`` and a keepalive task per read
for every connection, ~44 KB per idle device. A task per connection now handles
its packets (``ClientConnection``, an asyncio protocol, in place of amqtt's streams, reader
task and message loop), and only while it has any; one timer watches its keepalive, and
handler and session keep their fields in slots (hub/broker/connection.py,
hub/broker/session.py).

Known and left alone (harmless for presence, documented here so nobody is surprised):

* An outgoing QoS 1 message not acknowledged is sent again only when a persistent session
  reconnects (as MQTT 3.1.1 has it), never on a timer.
* A client's QoS 2 PUBLISH is acknowledged (PUBREC) on receipt, not after the hub's flush: the
  presence protocol uses QoS 0 and 1 only.
* Retained messages live in memory only: a stopped broker forgets them, so the hub republishes
  its retained state after every start.
* A persistent session (clean session off) that has been offline for ``SESSION_EXPIRY_S``
  (24 h) is forgotten, with the QoS 1/2 messages queued for it (at most ``max_queued``).
"""

from __future__ import annotations

import asyncio
import errno
import importlib.metadata
import logging
import math
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from amqtt.adapters import BufferReader, ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.errors import BrokerError as AmqttBrokerError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import (
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RESERVED_0,
    RESERVED_15,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import (
    BrokerProtocolHandler,
    Subscription,
    UnSubscription,
)
from amqtt.session import IncomingApplicationMessage
from amqtt.utils import gen_client_id
from transitions import MachineError

from hub.auth.accounts import CredentialStore
from hub.auth.grants import Grant
from hub.auth.plugins import HubTopicPlugin
from hub.auth.policy import (
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_NOT_AUTHORIZED,
    GRANT_KEY,
    VERDICT_KEY,
    AccessPolicy,
    Verdict,
    listen_policy_error,
)
from hub.broker.connection import Backlog, DeliveryLimits, HubHandler, Message, Outbox
from hub.broker.index import RetainedIndex, SubscriptionIndex
from hub.broker.session import HubSession, read_connect

__all__ = [
    "AMQTT_VERSION", "BrokerError", "ClientHandler", "DeliveryLimits", "EmbeddedBroker",
    "HeldAck", "MessageHandler", "TlsListener", "check_amqtt_version",
]

#: The amqtt release every override in this package was read against (see the docstring).
AMQTT_VERSION: Final = "0.12.1"

log = logging.getLogger(__name__)

#: ``(topic, payload, qos, retain, client_id) -> hold``, called in the broker's loop for every
#: message a client publishes and every will the broker sends for a client. Returning True for a
#: QoS 1 PUBLISH holds its PUBACK until released with :meth:`EmbeddedBroker.send_acks`;
#: anything else acknowledges it as soon as the handler returns.
MessageHandler: TypeAlias = Callable[[str, bytes, int, bool, "str | None"], "bool | None"]
#: A PUBACK held for the hub: the connection and the packet id it acknowledges.
HeldAck: TypeAlias = tuple[HubHandler, int]
#: Called with the client id once a client's connection is gone (clean or not).
ClientHandler: TypeAlias = Callable[[str], None]

#: MQTT 3.1.1 [MQTT-3.1.2-24]: a server closes a connection silent for 1.5 x keepalive.
KEEPALIVE_GRACE: Final = 1.5
#: How long a new connection may take to send CONNECT (amqtt alone waits forever).
CONNECT_TIMEOUT: Final = 10.0
#: How often the session monitor looks at every session, not only those that just ended.
_FULL_SWEEP_S: Final = 60.0
#: How long :meth:`EmbeddedBroker.disconnect_client` waits for amqtt to finish the disconnect.
DISCONNECT_TIMEOUT: Final = 5.0

#: Largest MQTT packet a client may send before its connection is closed (see max_packet_bytes).
MAX_PACKET_BYTES: Final = 1024 * 1024
#: How long a disconnected authenticated session (clean session off) keeps its subscriptions
#: and queued messages. amqtt's queues are unbounded, so they must not live forever.
SESSION_EXPIRY_S: Final = 24 * 3600

_AUTH_PLUGIN: Final = "hub.auth.plugins.HubAuthPlugin"
_TOPIC_PLUGIN: Final = "hub.auth.plugins.HubTopicPlugin"
#: The session attribute naming the account that owns a session (None: anonymous).
_OWNER_KEY: Final = "hub.owner"
#: In the text of the AMQTTError we raise for a refused CONNECT (filtered from amqtt's log:
#: our own line, limited to one per second per reason, already says why).
_REFUSED: Final = "hub: connection refused"


class _HideRefusals(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _REFUSED not in record.getMessage()


logging.getLogger("amqtt.broker").addFilter(_HideRefusals())


class _HideBindFailure(logging.Filter):
    """amqtt logs a start that failed with its whole traceback before it raises; a listener
    that cannot bind is then said by :meth:`EmbeddedBroker.start` in one line, so the
    traceback of that case is noise (any other start failure keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        failure = record.exc_info[1] if record.exc_info else None
        return not (record.msg == "Broker startup failed" and isinstance(failure, OSError))


#: How long the hub's own publishing waits for a client that has fallen behind (see Backlog)
#: before it goes on without it.
HUB_PATIENCE_S: Final = 1.0
#: How long a stopping broker waits for subscribers to take (and acknowledge) what it sent last,
#: the hub's own ``offline`` among it, before it closes their connections.
STOP_GRACE_S: Final = 2.0

#: What becomes of a client's QoS 1 PUBLISH once handled: acknowledged at once, held for the
#: hub's next flush, or never (the broker is stopping: the client keeps it and sends it again).
_ACK_NOW: Final = 0
_ACK_HELD: Final = 1
_NO_ACK: Final = 2


class _Handling:
    """The client PUBLISH amqtt is handling in the current task, and what to do with its ack."""

    __slots__ = ("message", "outcome")

    def __init__(self, message: Any) -> None:
        self.message = message
        self.outcome = _ACK_NOW


#: The client PUBLISH amqtt is handling in the current task (each connection has its own).
_handling: ContextVar[_Handling | None] = ContextVar("hub_broker_handling", default=None)


class BrokerError(Exception):
    """The embedded broker could not do what was asked (listen, start, publish)."""


def installed_amqtt_version() -> str | None:
    """The amqtt version installed in this environment (None: not installed as a package)."""
    try:
        return importlib.metadata.version("amqtt")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_amqtt_version() -> None:
    """Refuse to run the broker on an amqtt other than :data:`AMQTT_VERSION`, in one line."""
    installed = installed_amqtt_version()
    if installed == AMQTT_VERSION:
        return
    found = "amqtt is not installed" if installed is None else f"amqtt {installed} is installed"
    raise BrokerError(
        f"the embedded broker overrides amqtt {AMQTT_VERSION}'s internals and runs on that "
        f"version only, but {found}: pip install 'amqtt=={AMQTT_VERSION}' (or use an "
        "external broker with --broker mqtt://HOST:PORT)"
    )


def _abort_writer(writer: Any) -> bool:
    """Abort the TCP transport under a connection's writer; False if there is none."""
    transport = getattr(writer, "transport", None)  # a ClientConnection's
    if transport is None:  # an asyncio.StreamWriter inside amqtt's adapter
        transport = getattr(getattr(writer, "_writer", None), "transport", None)
    if transport is None:
        return False
    transport.abort()
    return True


def _abort(handler: Any) -> None:
    """Drop a client's connection the way a dead network would.

    Aborting the transport (rather than amqtt's polite close, which first drains the send
    buffer and so can hang on a half-open peer) makes amqtt's reader see end-of-stream; it then
    takes its own "connection lost" path, which publishes the will and ends the session.
    """
    if not _abort_writer(handler.writer) and handler.reader is not None:
        # not a TCP stream (a websocket listener): end the read side instead
        handler.reader.feed_eof()


@dataclass(frozen=True, slots=True)
class _Will:
    """A connection's will as its CONNECT gave it (amqtt keeps it only on the shared session)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool

    @classmethod
    def of(cls, session: Any) -> _Will | None:
        if not session.will_flag or not session.will_topic:
            return None
        return cls(
            session.will_topic,
            bytes(session.will_message or b""),
            session.will_qos or 0,
            bool(session.will_retain),
        )

    @staticmethod
    def put(session: Any, will: _Will | None) -> None:
        session.will_flag = will is not None
        session.will_topic = will.topic if will else None
        session.will_message = will.payload if will else None
        session.will_qos = will.qos if will else None
        session.will_retain = will.retain if will else None


class _HubBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's broker with the deviations listed in the module docstring corrected.

    Each override changes one decision of amqtt and then hands back to it, so the protocol
    work itself stays amqtt's.
    """

    def __init__(self, config: dict[str, Any], owner: EmbeddedBroker) -> None:
        super().__init__(config)
        self._owner = owner
        #: Futures resolved once amqtt has finished with a given connection (its handler).
        self._gone_waiters: dict[Any, asyncio.Future[None]] = {}
        #: Writers of connections that have not finished CONNECT yet (closed on stop).
        self.connecting: set[Any] = set()
        # amqtt scans every filter per message and every retained topic per SUBSCRIBE; these
        # stand-ins for its two dicts answer both by walking a trie (hub/broker/index.py).
        self._subscriptions: SubscriptionIndex = SubscriptionIndex()
        self._retained_messages: RetainedIndex = RetainedIndex()
        #: Client ids whose connection ended since _session_monitor last looked.
        self._ended: set[str] = set()
        #: Messages put on amqtt's broadcast queue and not yet handed to their subscribers.
        self._pending_broadcasts = 0
        #: Wills of the connections a stop closes, not passed on (see _broadcast_message).
        self.not_passed_on = 0
        #: Connections behind with their messages, for the hub's publishing to wait on.
        self.backlog = Backlog(owner.limits, HUB_PATIENCE_S, owner._dropping)
        # Topic checks run for every publish and for every delivery to every subscriber; when
        # ours is the only topic plugin we call it directly rather than through amqtt's plugin
        # manager, which makes a task per call.
        topic_plugins = list(self.plugins_manager._topic_plugins)
        self._acl: HubTopicPlugin | None = (
            topic_plugins[0]
            if len(topic_plugins) == 1 and isinstance(topic_plugins[0], HubTopicPlugin)
            else None
        )

    async def _create_server_instance(
        self, listener_name: str, listener_type: Any, address: str | None, port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        # amqtt serves TCP through asyncio streams: a StreamReader, StreamWriter and their
        # protocol, and a task, per connection. Each connection here is one ClientConnection
        # (a protocol, no task while the client is quiet); other listener types stay amqtt's.
        if listener_type != "tcp":
            return await super()._create_server_instance(
                listener_name, listener_type, address, port, ssl_context)
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: ClientConnection(self, listener_name), address, port,
            reuse_address=True, ssl=ssl_context,
        )

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        # amqtt asks every client for a certificate it then cannot verify (no CA configured)
        # and accepts TLS 1.0; we want server authentication only, TLS 1.2 or newer.
        certfile, keyfile = listener.get("certfile"), listener.get("keyfile")
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise AmqttBrokerError(
                f"cannot load TLS certificate {certfile} with key {keyfile}: {exc}"
            ) from exc
        return context

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Any]:
        # amqtt waits for CONNECT without a deadline and, when the first packet is missing or
        # bad, returns without closing the socket: both leak connections. Bound the wait and
        # close the socket on every failure (amqtt's caller then just releases the slot).
        if self._owner._stopping:  # accepted just as the broker began to stop
            _abort_writer(writer)
            raise AMQTTError("broker stopping")
        self.connecting.add(writer)
        try:
            async with asyncio.timeout(self._owner.connect_timeout):
                return await self._open_session(reader, writer, remote_address, remote_port)
        except TimeoutError:
            _abort_writer(writer)
            log.info(
                "no CONNECT from %s:%s within %.0fs; closing",
                remote_address, remote_port, self._owner.connect_timeout,
            )
            raise AMQTTError("no CONNECT packet in time") from None
        except BaseException:
            _abort_writer(writer)
            raise
        finally:
            self.connecting.discard(writer)

    async def _open_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Any]:
        # amqtt's _initialize_client_session, reordered: authenticate the CONNECT (and its
        # will) before it may touch any existing session of the same client id.
        try:
            handler, incoming = await read_connect(
                reader, writer, self.plugins_manager, self._new_handler
            )
        except (AMQTTError, MQTTError, NoDataError):
            raise
        except Exception as exc:  # e.g. a CONNECT string that is not UTF-8
            raise AMQTTError(f"unreadable CONNECT from {remote_address}: {exc!r}") from exc
        verdict = await self._admit(incoming, writer)
        session = await self._attach_session(incoming)
        if session.transitions.is_connected():
            # Take-over of a persistent session that is still connected. amqtt has already
            # copied the new CONNECT's will onto the shared session; the old connection must
            # go with its own will, not the new one, before the new connection starts.
            old_handler = self.sessions[session.client_id][1]
            new_will = _Will.of(session)
            _Will.put(session, getattr(old_handler, "hub_will", None))
            log.info("client %s connected again; dropping its old connection", session.client_id)
            await self.close_connection(old_handler)
            _Will.put(session, new_will)
        grant = verdict.grant
        session.attributes[VERDICT_KEY] = verdict
        session.attributes[GRANT_KEY] = grant
        session.attributes[_OWNER_KEY] = verdict.username
        session.password = None  # checked; no reason to keep it in memory
        # amqtt forgets the persistent session of an anonymous client the moment it disconnects
        # and queues nothing for it; MQTT makes no such exception [MQTT-3.1.2-4], and without
        # accounts every client is anonymous. So no session is marked anonymous here: a
        # persistent one keeps its subscriptions and up to max_queued QoS 1/2 messages until it
        # returns or SESSION_EXPIRY_S passes.
        session.is_anonymous = False
        handler.hub_will = _Will.of(session)
        handler.hub_grant = grant
        # Keepalive: amqtt times reads out after `keep_alive` seconds but then does nothing;
        # the handler's timer closes the connection (_serve_client arms it).
        if session.keep_alive > 0:
            session.keep_alive = session.keep_alive * KEEPALIVE_GRACE
        return handler, session

    def _new_handler(self, plugins_manager: Any) -> HubHandler:
        return HubHandler(plugins_manager, self._outbox_of, self.backlog)

    def _outbox_of(self, session: Any) -> Outbox:
        outbox: Outbox | None = getattr(session, "hub_outbox", None)
        if outbox is None:
            outbox = session.hub_outbox = Outbox(self._owner.limits)
        return outbox

    async def _admit(self, incoming: Any, writer: Any) -> Verdict:
        """Authenticate a CONNECT (the auth plugins) and check its client id; refuse or pass."""
        try:
            await super()._authenticate(incoming, None)  # amqtt runs the auth plugins
        except Exception:  # a failing check refuses; it never lets a client in
            log.exception("authenticating client %s failed; refusing it", incoming.client_id)
            incoming.attributes.pop(VERDICT_KEY, None)
        verdict = incoming.attributes.get(VERDICT_KEY)
        if not isinstance(verdict, Verdict):  # another auth plugin said no before ours ran
            verdict = Verdict(None, "refused", CONNACK_NOT_AUTHORIZED)
        if verdict.ok:
            verdict = self._check_client_id(incoming, verdict)
        if not verdict.ok:
            await _send_connack(writer, verdict.connack or CONNACK_NOT_AUTHORIZED)
            raise AMQTTError(f"{_REFUSED} ({verdict.reason})")
        return verdict

    def _check_client_id(self, incoming: Any, verdict: Verdict) -> Verdict:
        """With accounts, a client id belongs to the account that holds it.

        Taking over a connected client id, or resuming a persistent session, of another account
        would let one device kick another off (its will then says "lost") or read what was
        queued for it. A clean-session CONNECT may replace another account's disconnected
        session: that only discards it.
        """
        policy = self._owner.policy
        entry = self.sessions.get(incoming.client_id) if incoming.client_id else None
        if not policy.auth_required or entry is None:
            return verdict
        old = entry[0]
        owner = old.attributes.get(_OWNER_KEY)
        if owner == verdict.username:
            return verdict
        if old.transitions.is_connected() or not incoming.clean_session:
            policy.note(
                "client_id_taken", "refused client %s (%s): that client id belongs to %s",
                incoming.client_id, verdict.username or "anonymous", owner or "an anonymous client",
            )
            return Verdict(None, "client_id_taken", CONNACK_IDENTIFIER_REJECTED)
        return verdict

    async def _attach_session(self, incoming: Any) -> Any:
        """amqtt's choice between a new session and a stored one, for an admitted CONNECT."""
        session = incoming
        if incoming.clean_session:
            if incoming.client_id:
                await self._delete_session(incoming.client_id)
            else:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
        elif incoming.client_id in self.sessions:
            session = self.sessions[incoming.client_id][0]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain",
                         "keep_alive", "username"):
                setattr(session, name, getattr(incoming, name))  # amqtt forgets will_retain
            session.parent = 1
        else:
            incoming.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return session

    async def _delete_session(self, client_id: str) -> None:
        # Called for a clean-session CONNECT: amqtt forgets the old session but leaves its
        # connection open. Close it first, so its will goes out before the new connection.
        old = self.sessions.get(client_id)
        if old is not None and old[0].transitions.is_connected():
            log.info("client %s connected again; dropping its old connection", client_id)
            await self.close_connection(old[1])
        await super()._delete_session(client_id)

    async def _authenticate(self, session: Any, listener: Any) -> bool:
        # Called by amqtt after our _open_session, which already authenticated this CONNECT.
        verdict = session.attributes.get(VERDICT_KEY)
        ok = isinstance(verdict, Verdict) and verdict.ok
        session.attributes["hub.refused"] = not ok
        return ok

    async def _topic_filtering(self, session: Any, topic: str, action: Any) -> bool:
        acl = self._acl
        if acl is not None:
            return acl.check(session, topic, action)
        result: bool = await super()._topic_filtering(session, topic, action)
        return result

    async def _handle_client_session(
        self, reader: Any, writer: Any, session: Any, handler: Any, *rest: Any
    ) -> None:
        # amqtt's path for its own listeners (websockets); only TCP is configured, and each
        # TCP client is a ClientConnection, which calls _serve_client itself
        await self._connection_over(session, handler)
        raise AMQTTError("the embedded broker serves its own TCP listeners only")

    async def _connection_over(self, session: Any, handler: Any) -> None:
        """What amqtt's ``_handle_client_session`` leaves behind, once a connection is over."""
        current = self.sessions.get(session.client_id)
        if current is not None and current[1] is handler and session.transitions.is_connected():
            await self._ended_without_disconnect(session, handler)

    async def _serve_client(self, reader: Any, writer: Any, session: Any, handler: Any) -> bool:
        """amqtt 0.12.1's ``_handle_client_session`` up to the client's packets: True once
        they may flow (ClientConnection hands each to :meth:`_packet`), False if the client
        was refused.

        amqtt ends the connect by offering retained messages for every filter *anyone* holds
        (one call per filter, then filtered to the session's own in our override): O(all
        subscriptions) per connect, ~2 us each, so 40 ms per connect at 10k devices. Only the
        session's own filters (a resumed persistent session's) can have anything to send.
        """
        authenticated = await self._authenticate(session, None)  # ours ignores the listener
        if session.client_id is None:
            raise AMQTTError("client id was not set")
        while True:
            try:
                session.transitions.connect()
                break
            except (MachineError, ValueError):
                if session.transitions.is_connected():  # take-over (our _open_session did it)
                    old_handler = self._sessions[session.client_id][1]
                    await old_handler.handle_connection_closed()
                    await old_handler.stop()
                    break
                await asyncio.sleep(1)  # amqtt's "reconnecting too quickly"
        handler.attach(session, reader, writer)
        self._sessions[session.client_id] = (session, handler)
        await handler.mqtt_connack_authorize(authenticated)
        if not authenticated:
            await writer.close()
            return False
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id, client_session=session
        )
        await handler.start()
        if session.keep_alive > 0 and isinstance(handler, HubHandler):
            handler.watch_keepalive(session.keep_alive, self._keepalive_expired)
        # what a persistent session was sent and not acknowledged, then what was queued for it
        # while it was away (amqtt replays only the latter, through a task per message)
        handler.resume()
        for topic_filter in self._subscriptions.filters_of(session.client_id):
            await self._publish_retained_messages_for_subscription((topic_filter, 0), session)
        return True

    async def _end(self, session: Any, handler: HubHandler,
                   disconnect: DisconnectPacket | None) -> None:
        await self._handle_disconnect(session, handler, _Ready(disconnect))

    def _too_large(self, transport: Any, size: int, limit: int) -> None:
        """A client announced a packet over ``max_packet_bytes``: abort its connection (amqtt
        would read any size MQTT allows, 256 MB, into memory); its will goes out."""
        self._owner.policy.note(
            "too_large", "closing the connection from %s: a %d-byte packet is over the "
            "%d-byte limit", transport.get_extra_info("peername"), size, limit,
        )
        transport.abort()

    async def _packet(self, session: Any, handler: HubHandler, first: int, body: bytes) -> Any:
        """Handle one packet of a client; say how the connection goes on: None (it does),
        the DISCONNECT packet, ``_CLOSE`` (as lost: its will goes out) or
        ``_PROTOCOL_ERROR`` (amqtt's path for an invalid PUBLISH, in :meth:`_connection_over`).

        amqtt read each packet byte by byte in a reader task, each read wrapped in a
        keepalive ``wait_for`` (a task and a timer per read), made a task per packet, and
        passed messages, subscriptions and the DISCONNECT through queues to a message loop of
        four waiter tasks. Here ClientConnection hands over each packet as it was read, in
        order, as MQTT has them handled: a PUBLISH read before the connection ended is handled
        before the end (amqtt handled a DISCONNECT or end of stream first and dropped
        PUBLISHes queued behind it: a clean ``offline`` sent with its DISCONNECT was lost).
        The same plugin events and broker methods as amqtt's; nothing here waits for the
        client (retained messages beyond its queue go from a task of their own,
        HubHandler.deliver_retained, and acknowledgements to the socket's buffer).
        """
        kind = first >> 4
        if kind in (RESERVED_0, RESERVED_15):  # amqtt ends the connection
            log.warning("client %s sent a reserved packet type; closing its connection",
                        session.client_id)
            return _CLOSE
        fixed = MQTTFixedHeader(kind, first & 0x0F, len(body))
        try:
            packet = await packet_class(fixed).from_stream(BufferReader(body), fixed_header=fixed)
        except MQTTError:
            log.debug("client %s: packet of type %d discarded", session.client_id, kind)
            return None  # as amqtt (the packet's bytes are consumed all the same)
        except NoDataError as exc:
            raise _BadPacket(f"a packet of type {kind} shorter than it says") from exc
        await self.plugins_manager.fire_event(
            MQTTEvents.PACKET_RECEIVED, packet=packet, session=session)
        if kind == PUBLISH:
            return await self._publish(session, handler, packet)
        if kind == PUBACK:
            handler.acknowledged(packet.variable_header.packet_id)
        elif kind == PINGREQ:
            handler.pong()
        elif kind == SUBSCRIBE:
            await self._handle_subscription(session, handler, _Ready(
                Subscription(packet.variable_header.packet_id, packet.payload.topics)))
        elif kind == UNSUBSCRIBE:
            await self._handle_unsubscription(session, handler, _Ready(
                UnSubscription(packet.variable_header.packet_id, packet.payload.topics)))
        elif kind == DISCONNECT:
            handler.disconnect_packet = packet
            return packet
        elif kind == PUBREC:
            handler.pubrec(packet.packet_id)
        elif kind == PUBCOMP:
            handler.acknowledged(packet.packet_id)
        elif kind == PUBREL:
            message = session.inflight_in.pop(packet.packet_id, None)
            if message is not None and not await self._handle_message_delivery(
                    session, handler, _Ready(message)):
                return _PROTOCOL_ERROR
            handler.qos2_completed(packet.packet_id)
        elif kind == CONNECT:  # [MQTT-3.1.0-2]: a second CONNECT is a protocol violation
            log.warning("client %s sent a second CONNECT; closing its connection",
                        session.client_id)
            return _CLOSE
        # anything else a client has no business sending (CONNACK, SUBACK, ...): ignored,
        # as amqtt does
        return None

    async def _publish(self, session: Any, handler: HubHandler, packet: Any) -> Any:
        """A client's PUBLISH: amqtt's ``handle_publish`` and QoS flows, then delivery."""
        header = packet.variable_header
        if packet.topic_name is None or packet.data is None:
            return None
        qos = packet.qos
        packet_id = header.packet_id if header is not None else None
        message = IncomingApplicationMessage(
            packet_id, packet.topic_name, qos, packet.data, packet.retain_flag)
        message.publish_packet = packet
        if qos == 0 and packet.dup_flag:
            log.warning("client %s: [MQTT-3.3.1-2] a QoS 0 PUBLISH flagged DUP; ignored",
                        session.client_id)
            return None
        if qos == 2 and packet_id is not None:  # handled at its PUBREL (amqtt's flow, no task)
            session.inflight_in[packet_id] = message
            handler.qos2_received(packet_id)
            return None
        if qos not in (0, 1):
            raise _BadPacket("a PUBLISH with QoS 3 [MQTT-3.3.1-4]")
        if not await self._handle_message_delivery(session, handler, _Ready(message)):
            return _PROTOCOL_ERROR
        return None

    async def _ended_without_disconnect(self, session: Any, handler: Any) -> None:
        """amqtt is done with a connection but left its session marked connected.

        Two ways: it refused the client (it registers sessions before authenticating them),
        or it quit the message loop over a bad PUBLISH (an empty topic) without closing the
        socket, leaving a reader running that nobody serves.
        """
        if session.attributes.get("hub.refused"):
            _abort(handler)
            session.transitions.disconnect()  # never connected as far as anyone knows
            self._ended.add(session.client_id)
            return
        log.info("client %s sent an invalid PUBLISH; closing its connection", session.client_id)
        _abort(handler)
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ended.set_result(None)  # None: no DISCONNECT packet, so the will goes out
        await self._handle_disconnect(session, handler, ended)

    def _keepalive_expired(self, handler: Any) -> None:
        session = handler.session
        if session is not None:
            log.info(
                "client %s silent for %.0fs (1.5 x keepalive): closing its connection",
                session.client_id,
                session.keep_alive,
            )
        _abort(handler)

    async def close_connection(self, handler: Any) -> None:
        """Abort ``handler``'s connection and wait until amqtt has sent the will and let go."""
        waiter = self._gone_waiters.get(handler)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            self._gone_waiters[handler] = waiter
        _abort(handler)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), DISCONNECT_TIMEOUT)
        except TimeoutError:
            log.warning(
                "broker did not finish disconnecting a client within %.0fs", DISCONNECT_TIMEOUT
            )

    async def _handle_disconnect(self, client_session: Any, handler: Any, waiter: Any) -> None:
        # amqtt sends the will when the connection ended without a DISCONNECT packet; the same
        # test here tells us a will went out, so the hub sees it like any other message. A
        # DISCONNECT the handler noted counts even when amqtt's waiter lost it (connection.py).
        noted = getattr(handler, "disconnect_packet", None)
        if noted is not None and not isinstance(waiter.result(), DisconnectPacket):
            waiter = asyncio.get_running_loop().create_future()
            waiter.set_result(noted)
        abnormal = not isinstance(waiter.result(), DisconnectPacket)
        will: _Will | None = getattr(handler, "hub_will", None)
        if abnormal and will is not None:
            self._owner._deliver(
                will.topic, will.payload, will.qos, will.retain, client_session.client_id,
                getattr(handler, "hub_grant", None),
            )
        try:
            await super()._handle_disconnect(client_session, handler, waiter)
        finally:
            gone = self._gone_waiters.pop(handler, None)
            if gone is not None and not gone.done():
                gone.set_result(None)
            self._ended.add(client_session.client_id)  # for _session_monitor
            current = self.sessions.get(client_session.client_id)
            if current is None or current[1] is handler:
                self._owner._client_gone(client_session.client_id)

    async def _handle_message_delivery(self, session: Any, handler: Any, delivered: Any) -> bool:
        # Remember which PUBLISH this connection's task is handling, for _broadcast_message.
        message = delivered.result()
        if message is not None and message.topic and message.topic.startswith("$"):
            # amqtt ends the connection; MQTT only reserves these topics for the server
            self._owner.policy.note(
                "dollar_topic", "dropped a PUBLISH of client %s to %r: $ topics are the "
                "broker's", session.client_id, message.topic[:200],
            )
            if message.qos == 1 and message.packet_id and isinstance(handler, HubHandler):
                handler.send_pubacks([message.packet_id])
            return True
        handling = _Handling(message)
        token = _handling.set(handling)
        try:
            result: bool = await super()._handle_message_delivery(session, handler, delivered)
        finally:
            _handling.reset(token)
        # Our handler leaves QoS 1 unacknowledged on receipt (connection.py): acknowledge it
        # now, or hold it for the hub. A PUBLISH that ended the connection gets no PUBACK.
        if result and message is not None and message.qos == 1 and message.packet_id:
            if handling.outcome == _ACK_HELD:
                self._owner._hold_ack(handler, message.packet_id)
            elif handling.outcome == _ACK_NOW and isinstance(handler, HubHandler):
                handler.send_pubacks([message.packet_id])
        # Fairness: amqtt reads a client's already-buffered packets without ever yielding to
        # the loop, so one flooding client would hold it for seconds while others' heartbeats
        # wait (and time out). One yield per message lets every connection take turns.
        await asyncio.sleep(0)
        return result

    async def _broadcast_message(
        self, session: Any, topic: Any, data: Any, force_qos: int | None = None
    ) -> None:
        # amqtt calls this for a client's PUBLISH only once the topic is valid and topic
        # filters allow it; wills (force_qos set) and the hub's own messages (no session) take
        # other paths. Handing the message over here, inside amqtt's own await, costs no task
        # (a plugin event would cost one per message: ~40 us measured).
        handling = _handling.get()
        client_publish = handling is not None and session is not None and force_qos is None
        if self._owner._stopping and not client_publish:
            # A will, as the stop closes connections without DISCONNECT: amqtt would queue it
            # for a broadcast loop that is about to stop, and log "N messages not broadcasted"
            # at every clean stop. Wills are not reported while stopping (stop()): the
            # clients did not fail, the broker went, and their subscribers are closed too.
            self.not_passed_on += 1
            return
        if client_publish:
            assert handling is not None
            message = handling.message
            handling.outcome = self._owner._deliver(
                topic, data, message.qos, message.retain, session.client_id,
                session.attributes.get(GRANT_KEY),
            )
            force_qos = message.qos  # delivered at min(publish, subscription) QoS: MQTT's rule
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        if force_qos is not None:
            broadcast["qos"] = force_qos
        self._pending_broadcasts += 1
        await self._broadcast_queue.put(broadcast)

    def broadcasts_done(self) -> bool:
        """Every message put on the broadcast queue has been handed to its subscribers."""
        return self._pending_broadcasts == 0

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        # amqtt calls this on connect for every filter anyone subscribed to, with QoS 0; only
        # the session's own subscriptions should get retained messages, at their granted QoS.
        # And amqtt sends them without its receive check: each one is checked here.
        topic_filter = subscription[0]
        granted = next(
            (qos for subscriber, qos in self.subscriptions.get(topic_filter, ())
             if subscriber.client_id == session.client_id),
            None,
        )
        handler = self._get_handler(session)
        if granted is None or not isinstance(handler, HubHandler):
            return
        messages: list[Message] = []
        for topic in self._retained_messages.matching(topic_filter):
            retained = self._retained_messages.get(topic)
            if retained is None:
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            qos = min(granted, retained.qos if retained.qos is not None else granted)
            messages.append(Message(topic.encode(), bytes(retained.data), qos, retain=True))
        # at the pace the client reads: a subscriber to '#' gets every retained message
        handler.deliver_retained(messages)


    def create_offline_session(self, client_id: str) -> tuple[Any, Any]:
        # as amqtt's, with the light session (hub/broker/session.py)
        session = HubSession()
        session.client_id = client_id
        handler = BrokerProtocolHandler(self.plugins_manager, session)
        session.transitions.disconnect()
        return handler, session

    async def _session_monitor(self) -> None:
        """amqtt's session expiry, without scanning every session every second.

        amqtt's monitor walks all sessions twice a second to find the disconnected ones that
        must go (clean or anonymous: at once; others after ``session_expiry_interval``): 6% of
        a core at 10k idle devices, profiled. Connections that end note their client id in
        ``_ended`` and only those are looked at each second; a full sweep every
        ``_FULL_SWEEP_S`` catches sessions made another way and expires persistent ones.
        """
        sweep_due = 0.0
        while True:
            now = time.monotonic()
            if now >= sweep_due:
                sweep_due = now + _FULL_SWEEP_S
                candidates = list(self._sessions)
            else:
                candidates = list(self._ended)
            self._ended.clear()
            expiry = self.config.session_expiry_interval
            retain_after = None if expiry is None else math.floor(time.time() - expiry)
            for client_id in candidates:
                entry = self._sessions.get(client_id)
                if entry is None or entry[0].transitions.state != "disconnected":
                    continue
                session = entry[0]
                ended_at = session.last_disconnect_time
                if session.clean_session or (
                        retain_after is not None and ended_at and ended_at < retain_after):
                    await self._cleanup_session(client_id)
            await asyncio.sleep(1)

    # -- subscription index -----------------------------------------------------------------------
    # amqtt compares a published topic with every subscribed filter in turn (and formats a debug
    # line for each miss): with agents holding two filters each, a heartbeat nobody subscribes
    # to cost O(devices), and every disconnect walked all filters. The trie in
    # SubscriptionIndex finds the matching filters directly; the client id -> own filters map
    # lets a disconnect visit only its own.

    async def add_subscription(self, subscription: tuple[str, int], session: Any) -> int:
        result: int = await super().add_subscription(subscription, session)
        if result != 0x80 and session.client_id is not None:
            self._subscriptions.note_subscribed(session.client_id, subscription[0])
        return result

    def _del_subscription(self, a_filter: str, session: Any) -> int:
        deleted: int = super()._del_subscription(a_filter, session)
        if deleted:
            self._subscriptions.note_unsubscribed(session.client_id, a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Any) -> None:
        subscriptions = self._subscriptions
        for a_filter in subscriptions.filters_of(session.client_id):
            self._del_subscription(a_filter, session)
            if not subscriptions.get(a_filter, True):
                del subscriptions[a_filter]

    async def _run_broadcast(self, running_tasks: deque[Any]) -> None:
        """amqtt 0.12.1's delivery of one queued message, through each subscriber's outbox.

        amqtt made a task per subscriber per message, each waiting up to 5 s for its PUBACK:
        unbounded for a subscriber that does not read. Here a delivery is written at once or
        queued in the session's bounded outbox (connection.py), and never waits. Every delivery
        still passes the receive check (``_topic_filtering`` with ``Action.RECEIVE``: the grant
        of the receiving session, hub/auth/) before it is sent or queued, as in amqtt.
        """
        broadcast = await self._broadcast_queue.get()
        try:
            await self._fan_out(broadcast)
        except Exception:  # one bad delivery must not end the broadcast loop
            log.exception("delivering a message on %r failed", broadcast.get("topic"))
        finally:
            self._pending_broadcasts -= 1

    async def _fan_out(self, broadcast: dict[str, Any]) -> None:
        await self.fan_out(broadcast["topic"], bytes(broadcast["data"]), broadcast.get("qos"))

    async def fan_out(self, topic: str, data: bytes, published: int | None) -> None:
        """Hand one message to every matching subscriber's outbox (or queue it for an offline
        persistent session); never waits on a client. ``published``: the QoS it was published
        with (None: each subscription's own)."""
        encoded = topic.encode()
        subscriptions = self._subscriptions
        for a_filter in subscriptions.matching(topic):
            # a copy: the awaits below may let a SUBSCRIBE change the list
            for target, granted in list(subscriptions.get(a_filter, ())):
                qos = granted if published is None else min(published, granted)
                if not await self._topic_filtering(target, topic, Action.RECEIVE):
                    continue
                if target.transitions.state != "connected":
                    # queued only for a persistent session, at QoS 1 or 2 (as Mosquitto does)
                    if not target.clean_session and qos in (1, 2):
                        self._outbox_of(target).offer(Message(encoded, data, qos, False))
                    continue
                handler = self._get_handler(target)
                if isinstance(handler, HubHandler):
                    handler.deliver(Message(encoded, data, qos, False))


@dataclass(frozen=True, slots=True)
class TlsListener:
    """A second listener speaking MQTT over TLS (``mqtts://``), e.g. ``0.0.0.0:8883``."""

    host: str
    port: int  # 0: any free port, known as EmbeddedBroker.tls_port once started
    certfile: str
    keyfile: str


class EmbeddedBroker:
    """An amqtt broker in this asyncio loop, bound to ``host:port``, feeding the hub directly.

    ``on_message`` runs in the broker's loop for every message a client publishes and every
    will sent for a client; it must not block. Messages published through :meth:`publish` are
    not passed to it. It returns True to hold a QoS 1 message's PUBACK until the caller has
    persisted the message (:meth:`take_held_acks`, :meth:`send_acks`); ``on_ack_held`` is
    called with the number of PUBACKs then held for that client, so the caller can persist
    (and acknowledge) early rather than let a client's in-flight window fill.

    Each client's outgoing messages are bounded (``limits``): a subscriber that does not read
    gets at most ``max_queued`` messages queued, then loses messages (QoS 0 first), with one
    log line, and never slows anyone else down.

    Access: with ``credentials`` holding at least one account, clients must log in and each
    gets its account's grant (hub/auth/); the file is re-read when it changes. Without
    accounts the broker is open and listens on loopback only, unless ``allow_anonymous`` is
    True. ``allow_anonymous=False`` without accounts only makes clients give a username.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,  # 0: any free port, known as .port once started
        *,
        on_message: MessageHandler | None = None,
        on_client_disconnected: ClientHandler | None = None,
        allow_anonymous: bool | None = None,
        credentials: CredentialStore | None = None,
        prefix: str = "presence",
        tls: TlsListener | None = None,
        max_packet_bytes: int = MAX_PACKET_BYTES,
        connect_timeout: float = CONNECT_TIMEOUT,
        on_ack_held: Callable[[int], None] | None = None,
        limits: DeliveryLimits | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.on_message = on_message
        self.on_ack_held = on_ack_held
        #: What the broker keeps for one client before dropping (connection.py).
        self.limits = limits or DeliveryLimits()
        #: Connections that overflowed their queue and dropped messages (each logged once).
        self.slow_clients = 0
        self._held: list[HeldAck] = []
        self.on_client_disconnected = on_client_disconnected
        self.allow_anonymous = allow_anonymous
        self.tls = tls
        self.tls_port = tls.port if tls is not None else None
        #: A client sending a larger packet is disconnected (its will goes out).
        self.max_packet_bytes = max_packet_bytes
        #: Who may connect and what each client may publish, subscribe to and receive.
        self.policy = AccessPolicy(prefix, credentials, allow_anonymous)
        #: Seconds a new TCP connection may take to send its CONNECT before it is closed.
        self.connect_timeout = connect_timeout
        self._broker: _HubBroker | None = None
        self._stopping = False
        #: Messages ``on_message`` raised on (logged each time, never fatal to the broker).
        self.handler_errors = 0
        self._outbox: deque[tuple[str, bytes, int, bool]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        #: callers of drained(below) waiting for the queue to shrink
        self._below: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    @property
    def tls_url(self) -> str | None:
        if self.tls is None:
            return None
        host = f"[{self.tls.host}]" if ":" in self.tls.host else self.tls.host
        return f"mqtts://{host}:{self.tls_port}"

    @property
    def running(self) -> bool:
        return self._broker is not None

    @property
    def refused(self) -> Counter[str]:
        """Refusals by reason (bad_password, forbidden_publish, ...): see AccessPolicy."""
        return self.policy.refused

    def _plugins_config(self) -> dict[str, dict[str, Any]]:
        """The amqtt plugins to load: our authentication and topic checks (hub/auth/).

        Listing plugins replaces amqtt's defaults, which would log every packet and run $SYS.
        """
        return {
            _AUTH_PLUGIN: {"policy": self.policy},
            _TOPIC_PLUGIN: {"policy": self.policy},
        }

    def _listeners_config(self) -> dict[str, dict[str, Any]]:
        # Always bind explicitly: amqtt's default listener is 0.0.0.0:1883.
        listeners: dict[str, dict[str, Any]] = {
            "default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        }
        if self.tls is not None:
            listeners["tls"] = {
                "type": "tcp", "bind": f"{self.tls.host}:{self.tls.port}", "ssl": True,
                "certfile": self.tls.certfile, "keyfile": self.tls.keyfile,
            }
        return listeners

    async def start(self) -> None:
        """Listen on ``host:port`` (and the TLS listener); raise :class:`BrokerError` if not."""
        if self._broker is not None:
            raise BrokerError(f"broker already running on {self.host}:{self.port}")
        check_amqtt_version()
        self.policy.refresh()
        hosts = [self.host] + ([self.tls.host] if self.tls is not None else [])
        refusal = listen_policy_error(hosts, self.policy)
        if refusal is not None:
            raise BrokerError(refusal)
        config = {
            "listeners": self._listeners_config(),
            "plugins": self._plugins_config(),
            "session_expiry_interval": SESSION_EXPIRY_S,
        }
        try:
            broker = _HubBroker(config, self)
        except (OSError, ValueError) as exc:  # amqtt checks that TLS files exist here
            raise BrokerError(f"cannot configure the broker: {exc}") from exc
        self._stopping = False
        quiet = _HideBindFailure()
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(quiet)
        try:
            await broker.start()
        except AmqttBrokerError as exc:
            raise BrokerError(self._bind_failure(broker, exc.__cause__ or exc)) from exc
        finally:
            amqtt_log.removeFilter(quiet)
        self._broker = broker
        if self.port == 0:  # the kernel picked one: tests use this to avoid port races
            self.port = _bound_port(broker, "default", self.port)
        if self.tls is not None and self.tls_port == 0:
            self.tls_port = _bound_port(broker, "tls", 0)
        tls = f" and {self.tls_url}" if self.tls is not None else ""
        log.info("embedded MQTT broker listening on %s%s; %s", self.url, tls,
                 self.policy.describe())

    def _bind_failure(self, broker: _HubBroker, cause: BaseException) -> str:
        """One line for a listener that could not open: which address, and for the common
        case (a system Mosquitto already on 1883) what to do instead."""
        address = f"{self.host}:{self.port}"
        # amqtt opens the listeners in order and records each one it opened
        if self.tls is not None and "default" in broker._servers:
            address = f"{self.tls.host}:{self.tls.port}"
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            return (f"cannot listen on {address}: the address is already in use (another "
                    "MQTT broker, such as a system Mosquitto? --broker auto uses a broker "
                    "found there; or give the embedded one a free port: --listen "
                    "127.0.0.1:1884)")
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
        return f"cannot listen on {address}: {reason}"

    def stop_taking_messages(self) -> None:
        """The hub is stopping: take no more client messages (nor wills, nor connections).

        A message taken now would be acted on by the hub's last flush but never acknowledged
        (the broker stops first), so its client would send it again to the next hub: a
        duplicate. Left unacknowledged and untaken, it is sent again exactly once.
        """
        self._stopping = True

    async def stop(self) -> None:
        """Close every connection and the listener. No wills are reported while stopping."""
        if self._broker is None:
            return
        self.stop_taking_messages()
        if self._outbox:  # what the hub queued before stopping still goes out
            await self._drained.wait()
        await self._settle(self._broker)
        broker, self._broker = self._broker, None
        # Abort connections first: amqtt's shutdown closes each politely, which waits on the
        # send buffer of clients that may be long gone.
        for writer in list(broker.connecting):
            _abort_writer(writer)
        for _session, handler in list(broker.sessions.values()):
            if handler.writer is not None:
                _abort(handler)
        await broker.shutdown()

    async def _settle(self, broker: _HubBroker) -> None:
        """Let subscribers take what was published last before their connections close.

        amqtt's shutdown dropped whatever was still on its broadcast queue ("6 messages not
        broadcasted"), the hub's own ``offline`` among it, and closing a connection at once
        would discard what sits in its socket buffer. So wait, at most :data:`STOP_GRACE_S`,
        until every message is handed out and every client that keeps up has acknowledged what
        it was sent; a client already dropping messages is not waited for.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE_S

        def settled() -> bool:
            if not broker.broadcasts_done():
                return False
            for session, handler in broker.sessions.values():
                outbox = getattr(session, "hub_outbox", None)
                if (outbox is not None and not outbox.settled and isinstance(handler, HubHandler)
                        and handler.writable and not handler.dropping):
                    return False
            return True

        while not settled():
            if loop.time() >= deadline:
                log.warning("stopping the broker with messages still on their way to subscribers")
                return
            await asyncio.sleep(0.01)  # a shutdown wait, polled: nothing signals "all acked"

    def _require(self) -> _HubBroker:
        if self._broker is None:
            raise BrokerError("embedded broker is not running")
        return self._broker

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish as the hub: to current subscribers and, if ``retain``, to later ones.

        An empty payload with ``retain`` clears the topic's retained message. The message is
        not passed to ``on_message``. Messages queued by :meth:`publish_nowait` go first.
        """
        broker = self._require()
        message = _outgoing(topic, payload, qos, retain)
        if self._outbox:
            await self._drained.wait()
        await _send(broker, *message)

    async def drained(self, below: int) -> None:
        """Return once at most ``below`` messages of :meth:`publish_nowait` wait to go out.

        They wait while a subscriber that keeps up has fallen behind (at most
        ``HUB_PATIENCE_S`` for each): a bulk publisher (the hub's republish) pauses here
        rather than queue without bound.
        """
        loop = asyncio.get_running_loop()
        while self._broker is not None and len(self._outbox) > below:
            waiter = loop.create_future()
            self._below.append((below, waiter))
            await waiter

    def _wake_below(self) -> None:
        queued = len(self._outbox)
        waiting = self._below
        self._below = [(below, w) for below, w in waiting if below < queued and not w.done()]
        for below, waiter in waiting:
            if below >= queued and not waiter.done():
                waiter.set_result(None)

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> None:
        """:meth:`publish` for synchronous code in the broker's loop (an ``on_message`` handler).

        The message is checked now and sent, in call order, as soon as the caller yields to
        the loop. One task drains a burst, not one task per message.
        """
        self._require()
        self._outbox.append(_outgoing(topic, payload, qos, retain))
        if self._drainer is None or self._drainer.done():
            self._drained.clear()
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._outbox and self._broker is not None:
                # the hub publishes faster than any client reads: wait for those behind
                await self._broker.backlog.wait()
                if self._broker is None:
                    break
                message = self._outbox.popleft()
                if self._below:
                    self._wake_below()
                try:
                    await _send(self._broker, *message)
                except Exception:
                    log.exception("publishing %r failed", message[0])
                # let the clients' packets (PUBACKs, heartbeats) in between the hub's messages
                await asyncio.sleep(0)
        finally:
            self._outbox.clear()
            self._drained.set()
            self._wake_below()

    async def disconnect_client(self, client_id: str) -> bool:
        """Drop ``client_id``'s connection as if its network died, so its will is published.

        Returns once amqtt has sent the will and ended the session; False if no such client is
        connected.
        """
        broker = self._require()
        entry = broker.sessions.get(client_id)
        if entry is None or not entry[0].transitions.is_connected():
            return False
        await broker.close_connection(entry[1])
        return True

    def connected_clients(self) -> list[str]:
        """Client ids with a live connection right now."""
        if self._broker is None:
            return []
        return [
            client_id
            for client_id, (session, _handler) in self._broker.sessions.items()
            if session.transitions.is_connected()
        ]

    # -- called by the amqtt side ---------------------------------------------------------------
    def _deliver(
        self, topic: str, payload: bytes | bytearray, qos: int | None, retain: bool,
        client_id: str | None, grant: Grant | None,
    ) -> int:
        """Hand a message to ``on_message``; say what becomes of its PUBACK (``_ACK_*``)."""
        handler = self.on_message
        if self._stopping:
            return _NO_ACK  # nobody acts on it now: unacknowledged, the client sends it again
        if handler is None:
            return _ACK_NOW
        # The broker's checks already ran; this one is for paths that might skip them (amqtt
        # sends wills past its ACL, for one): the hub acts only on what the sender may write.
        if grant is None or not grant.may_publish(topic):
            self.policy.note(
                "hub_dropped", "hub dropped %r from client %s (%s): not its topic",
                topic[:200], client_id, grant.who if grant else "not admitted",
            )
            return _ACK_NOW
        try:
            hold = handler(topic, bytes(payload), qos or 0, retain, client_id)
        except Exception:  # acknowledged all the same: sent again, it would fail again
            self.handler_errors += 1
            log.exception("message handler failed on %r from client %s", topic, client_id)
            return _ACK_NOW
        return _ACK_HELD if hold is True else _ACK_NOW

    def _hold_ack(self, handler: HubHandler, packet_id: int) -> None:
        self._held.append((handler, packet_id))
        handler.held += 1
        if self.on_ack_held is not None:
            self.on_ack_held(handler.held)

    def take_held_acks(self) -> list[HeldAck]:
        """The PUBACKs held since the last call: what a flush starting now will persist."""
        held, self._held = self._held, []
        return held

    def send_acks(self, acks: list[HeldAck]) -> None:
        """Send held PUBACKs (their messages are persisted now), in order, one write per client.

        A connection that has ended meanwhile gets nothing: its client sends the message again
        if its session persists, as MQTT has it.
        """
        by_connection: dict[HubHandler, list[int]] = {}
        for handler, packet_id in acks:
            handler.held -= 1
            by_connection.setdefault(handler, []).append(packet_id)
        for handler, packet_ids in by_connection.items():
            handler.send_pubacks(packet_ids)

    def _dropping(self, handler: HubHandler) -> None:
        """A client's queue overflowed: the one line it gets (per connection)."""
        self.slow_clients += 1
        session = handler.session
        log.warning(
            "client %s is not reading its messages: %d are queued for it; dropping what does "
            "not fit (QoS 0 first) until it catches up",
            session.client_id if session is not None else "?", self.limits.max_queued,
        )

    def _client_gone(self, client_id: str) -> None:
        handler = self.on_client_disconnected
        if handler is None or self._stopping:
            return
        try:
            handler(client_id)
        except Exception:
            self.handler_errors += 1
            log.exception("disconnect handler failed for client %s", client_id)

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()


def _bound_port(broker: _HubBroker, listener: str, default: int) -> int:
    server = broker._servers.get(listener)  # amqtt keeps no public handle on its listener
    sockets = getattr(getattr(server, "instance", None), "sockets", None) or ()
    for sock in sockets:
        port: int = sock.getsockname()[1]
        return port
    return default


def _outgoing(topic: str, payload: bytes, qos: int, retain: bool) -> tuple[str, bytes, int, bool]:
    """Check a hub publish up front, so a bad one fails at the caller, not in the broker."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError(f"invalid topic to publish {topic!r}: empty or with a wildcard")
    if qos not in (0, 1, 2):
        raise ValueError(f"invalid QoS {qos!r}: use 0, 1 or 2")
    return topic, bytes(payload), qos, retain


async def _send(broker: _HubBroker, topic: str, payload: bytes, qos: int, retain: bool) -> None:
    # Store before delivering, so a client subscribing meanwhile still gets the message. The
    # hub's messages go straight to the subscribers' outboxes, not through amqtt's broadcast
    # queue (a task per message there), so the hub's flow control sees them as they land.
    if retain:
        await broker.retain_message(None, topic, payload, qos)
    await broker.fan_out(topic, payload, qos)


async def _send_connack(writer: Any, code: int) -> None:
    """Tell a refused client why (CONNACK return code), then close; never hang on it."""
    try:
        async with asyncio.timeout(1.0):
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
    except Exception:  # the client is gone already: nothing to tell
        log.debug("could not send CONNACK %d", code, exc_info=True)


class ClientConnection(asyncio.Protocol, ReaderAdapter, WriterAdapter):  # type: ignore[misc]
    """One client's TCP (or TLS) connection: the socket's protocol, and the reader and writer
    amqtt's CONNECT handling and protocol handler expect.

    Why not amqtt's asyncio streams: a StreamReader, a StreamWriter, their protocol (with a
    deque of drain waiters each) and a task blocked in a read, kept for every idle device,
    were most of what a connection cost once the broker's queues and tasks were gone (issue
    16). Here the bytes arrive in :meth:`data_received` and are split into packets at once;
    a task handles them (:meth:`_work`, the broker's ``_packet`` one at a time, in order) only
    while there are any, so a quiet client costs this object, its socket and its session.

    Life: :meth:`_open` (a task) reads the CONNECT through :meth:`read` and runs amqtt's
    session set-up (``_initialize_client_session``, ``_serve_client``), then packets flow;
    the DISCONNECT, the end of the stream or a protocol error end it (:meth:`_finish`). The
    size limit (``max_packet_bytes``) applies to every packet's announced length, the
    CONNECT's included: beyond it the socket is aborted and the will goes out.
    """

    __slots__ = (
        "_broker", "_buffer", "_drained", "_eof", "_listener", "_over", "_packets",
        "_queued_bytes", "_read_paused", "_reading", "_running", "_server", "_worker",
        "_write_paused", "handler", "is_closed", "session", "transport",
    )

    def __init__(self, broker: _HubBroker, listener: str) -> None:
        self._broker = broker
        self._listener = listener
        self.transport: Any = None
        self.handler: Any = None
        self.session: Any = None
        #: bytes read and not yet split into packets (or, before CONNECT is done, not read)
        self._buffer = b""
        #: (first byte, body) of packets read and not yet handled; None when there are none
        self._packets: deque[tuple[int, bytes]] | None = None
        self._queued_bytes = 0
        #: the task opening the connection or handling its packets, while there is one
        self._worker: asyncio.Task[None] | None = None
        self._reading: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._server: Any = None
        self._running = False  # CONNECT done: packets go to the broker
        self._over = False  # the connection's end is handled: nothing more is read
        self._eof = False
        self._read_paused = False
        self._write_paused = False
        self.is_closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self._broker._owner._stopping:  # accepted just as the broker began to stop
            self.transport.abort()
            return
        self._worker = asyncio.get_running_loop().create_task(self._open())

    def data_received(self, data: bytes) -> None:
        if self._over:
            return
        self._buffer = self._buffer + data if self._buffer else data
        if self._running:
            self.handler.heard_at = self.handler._loop.time()
            self._split()
            return
        reading = self._reading
        if reading is not None and not reading.done():
            reading.set_result(None)
        if len(self._buffer) > self._broker._owner.max_packet_bytes + _READ_SIZE:
            self._pause_reading()  # a client that floods before its CONNACK: wait for it

    def eof_received(self) -> bool | None:
        self._stream_ended()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream_ended()
        self._write_paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _stream_ended(self) -> None:
        if self._eof:
            return
        self._eof = True
        reading = self._reading
        if reading is not None and not reading.done():
            reading.set_result(None)
        if self._running and self._worker is None and not self._over:
            self._worker = asyncio.get_running_loop().create_task(self._work())

    def _pause_reading(self) -> None:
        if not self._read_paused and not self.transport.is_closing():
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    # -- packets ----------------------------------------------------------------------------------
    def _split(self) -> None:
        """Move every whole packet from the buffer to the queue; start a task to handle them."""
        data = self._buffer
        offset, end = 0, len(data)
        limit = self._broker._owner.max_packet_bytes
        packets = self._packets
        try:
            while offset < end:
                header = _packet_header(data, offset)
                if header is None:
                    break  # the rest of the header has not come yet
                first, start, size = header
                if size > limit:
                    self._broker._too_large(self.transport, size, limit)
                    data, offset = b"", 0  # packets before it are still handled
                    break
                if start + size > end:
                    break  # the rest of the packet has not come yet
                if packets is None:
                    packets = self._packets = deque()
                packets.append((first, data[start:start + size]))
                self._queued_bytes += size
                offset = start + size
        except _BadPacket as exc:
            log.info("client %s sent %s; closing its connection", self.session.client_id, exc)
            self.transport.abort()
            data, offset = b"", 0
        self._buffer = data[offset:] if offset else data
        if packets:
            if self._worker is None:
                self._worker = asyncio.get_running_loop().create_task(self._work())
            if len(packets) >= _PAUSE_AT or self._queued_bytes >= _PAUSE_AT_BYTES:
                self._pause_reading()  # the client sends faster than the broker handles

    async def _work(self) -> None:
        """Handle the packets read so far, in order; end the connection when they end it."""
        broker, session, handler = self._broker, self.session, self.handler
        outcome: Any = None
        try:
            while True:
                packets = self._packets
                if not packets:
                    if self._eof:
                        break  # the end of the stream, after every packet read before it
                    self._packets = None
                    self._worker = None
                    return
                first, body = packets.popleft()
                self._queued_bytes -= len(body)
                if self._read_paused and len(packets) <= _PAUSE_AT // 4 and (
                        self._queued_bytes <= _PAUSE_AT_BYTES // 4):
                    self._resume_reading()
                outcome = await broker._packet(session, handler, first, body)
                if outcome is not None:
                    break
        except _BadPacket as exc:
            log.info("client %s sent %s; closing its connection", session.client_id, exc)
            outcome = _CLOSE
        except (ConnectionError, OSError):
            outcome = _CLOSE  # the connection is gone: as an end of stream
        except Exception:  # amqtt's reader too ends the connection (will and all) on anything
            log.exception("handling a packet of client %s failed; closing its connection",
                          session.client_id)
            outcome = _CLOSE
        await self._finish(outcome)

    async def _open(self) -> None:
        """amqtt's ``_client_connected``: the CONNECT, the session, then the packets."""
        broker = self._broker
        server = broker._servers.get(self._listener)
        if server is None:
            self.transport.abort()
            return
        await server.acquire_connection()
        self._server = server
        peer = self.get_peer_info()
        if peer is None:
            _amqtt_log.warning("Remote info could not be retrieved from peer info")
            self._over = True
            self.transport.abort()
            self._release()
            return
        try:
            handler, session = await broker._initialize_client_session(self, self, *peer)
        except (AMQTTError, MQTTError, NoDataError) as exc:
            _amqtt_log.warning("Failed to initialize client session: %s", exc)
            self._over = True
            self._release()
            return
        self.handler, self.session = handler, session
        try:
            running = await broker._serve_client(self, self, session, handler)
        except (AMQTTError, MQTTError, NoDataError) as exc:
            _amqtt_log.warning("Error while handling client session: %s", exc)
            running = False
        except BaseException:
            await self._finish(_PROTOCOL_ERROR)
            raise
        if not running:  # refused: no packets of it are handled
            await self._finish(_PROTOCOL_ERROR)
            return
        self._running = True
        self.handler.heard_at = self.handler._loop.time()
        self._split()  # what came after the CONNECT (this task handles it)
        await self._work()

    async def _finish(self, outcome: Any) -> None:
        """The connection's end: the DISCONNECT (no will), a protocol error (amqtt's path in
        ``_connection_over``), anything else as a lost connection (the will goes out)."""
        self._over = True
        self._packets = None
        self._queued_bytes = 0
        broker, session, handler = self._broker, self.session, self.handler
        try:
            if session is not None and handler is not None:
                if isinstance(outcome, DisconnectPacket):
                    await broker._end(session, handler, outcome)
                elif outcome is not _PROTOCOL_ERROR:
                    await broker._end(session, handler, None)
                await broker._connection_over(session, handler)
        except (AMQTTError, MQTTError, NoDataError) as exc:
            _amqtt_log.warning("Error while handling client session: %s", exc)
        finally:
            self._worker = None
            self._release()

    def _release(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.release_connection()

    # -- amqtt's ReaderAdapter: the CONNECT ------------------------------------------------------
    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            raise ValueError("the broker reads packets of a known length only")
        limit = self._broker._owner.max_packet_bytes
        if n > limit:
            self._broker._too_large(self.transport, n, limit)
            raise asyncio.IncompleteReadError(b"", n)
        while len(self._buffer) < n:
            if self._eof:
                raise asyncio.IncompleteReadError(self._buffer, n)
            self._resume_reading()
            self._reading = asyncio.get_running_loop().create_future()
            try:
                await self._reading
            finally:
                self._reading = None
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def feed_eof(self) -> None:
        self._stream_ended()

    # -- amqtt's WriterAdapter --------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.is_closed and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        """Return once the socket's buffer is below its low mark (or the connection is gone)."""
        while self._write_paused and not self._eof:
            drained = self._drained
            if drained is None or drained.done():
                drained = self._drained = asyncio.get_running_loop().create_future()
            await drained
        self._drained = None

    def get_peer_info(self) -> tuple[str, int] | None:
        peer = self.transport.get_extra_info("peername")
        if not peer or len(peer) < 2:
            return None
        return peer[0], peer[1]

    def get_ssl_info(self) -> Any:
        return self.transport.get_extra_info("ssl_object")

    async def close(self) -> None:
        # as amqtt's stream writer: what is buffered goes first, then FIN, then the socket
        if self.is_closed:
            return
        self.is_closed = True
        await self.drain()
        transport = self.transport
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        transport.close()


class _Ready:
    """A result already there, for amqtt methods that take a finished future (``.result()``)
    where a real one would cost a future per message."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def result(self) -> Any:
        return self._value


class _BadPacket(Exception):
    """A client's bytes are not MQTT any more: its connection ends (its will goes out)."""


#: How a connection goes on after a packet (_HubBroker._packet): end it as lost (its will goes
#: out), or leave it to _connection_over (amqtt's protocol-error path: an invalid PUBLISH).
_CLOSE: Final = object()
_PROTOCOL_ERROR: Final = object()
#: What a client may send before its CONNACK beyond the largest packet, before reading pauses.
_READ_SIZE: Final = 64 * 1024
#: Packets (or bytes of them) read and not yet handled at which a connection stops reading
#: until it has handled three quarters of them (asyncio's streams paused at 128 KB).
_PAUSE_AT: Final = 1000
_PAUSE_AT_BYTES: Final = 256 * 1024

_amqtt_log = logging.getLogger("amqtt.broker")  # amqtt's own lines, filtered as amqtt's are


def _packet_header(data: bytes, offset: int) -> tuple[int, int, int] | None:
    """The MQTT fixed header at ``offset``: (first byte, where the body starts, its length),
    or None if the header is not all there yet."""
    end = len(data)
    position = offset + 1
    size = 0
    for shift in (0, 7, 14, 21):
        if position >= end:
            return None
        byte = data[position]
        position += 1
        size |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return data[offset], position, size
    raise _BadPacket("a remaining length longer than four bytes")
