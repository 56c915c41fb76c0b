"""One client connection of the embedded broker: amqtt's protocol handler, its flows redone.

Read against amqtt 0.12.1, like the rest of this package (``AMQTT_VERSION`` in
:mod:`hub.broker.embedded`; the broker refuses to start on any other version). amqtt's
``BrokerProtocolHandler`` does four things the hub cannot live with:

* **PUBACK on receipt.** It acknowledges a client's QoS 1 PUBLISH as soon as it has parsed it,
  before anyone has acted on it, so a hub killed a moment later had acknowledged activity it
  never wrote (issue 11, defect 2). Here the PUBACK waits for whoever handles the message: the
  broker sends it (:meth:`HubHandler.send_pubacks`) at once, or after the store flush that
  persisted the message when the hub asks to hold it. QoS 2 is left as amqtt does it (PUBREC on
  receipt, the message handled at PUBREL): the presence protocol uses QoS 0 and 1 only.
* **One task per outgoing message**, each waiting up to 5 s for its PUBACK and then logging a
  traceback, and nothing bounding how many wait: three subscribers to ``presence/#`` that never
  read took the hub from 80 to 260 MB and starved every healthy device (defect 8). Here each
  session has one :class:`Outbox`: messages are written straight to the socket while it takes
  them, queued (at most ``max_queued``, as Mosquitto's ``max_queued_messages``) while it does
  not, and dropped beyond that, QoS 0 first. QoS 1 and 2 messages written but not acknowledged
  stay in the outbox (at most ``max_inflight``) and are sent again, flagged DUP, when a
  persistent session reconnects ([MQTT-4.4.0-1]). The hub's own bulk publishing waits (a
  while) for connections that fall behind (:class:`Backlog`), so a bounded queue costs a
  subscriber that keeps up nothing.
* **A DISCONNECT that is forgotten.** amqtt hands a DISCONNECT to a task and to a future that
  exists only once the connection is fully started; a DISCONNECT read before that, or in the
  same read as the end of the stream, was lost and the will went out after a clean stop
  (defect 9; MQTT says a DISCONNECT discards the will [MQTT-3.14.4-3]). Here the broker notes
  it on the handler as it handles the packet, in the order the client sent it.
* **Seven tasks and ~44 KB per idle connection** (issue 16; measured with tracemalloc and
  ``asyncio.all_tasks()`` at 1k-10k devices): a reader task, a task per read for the
  keepalive's ``wait_for``, four waiter tasks in the broker's message loop and the
  connection's own task (~10 KB with their coroutines and contexts); four ``asyncio.Queue``
  (subscriptions, unsubscriptions, and the session's two) of ~3.7 KB each and two ``Event``
  (~16 KB); asyncio's StreamReader, StreamWriter and their protocol (~4 KB); a keepalive timer
  re-made for every packet sent; the session's ``transitions`` machine was gone already
  (session.py). Here the broker's ``ClientConnection`` (an asyncio protocol) splits the
  client's bytes into packets and runs a task only while it has some to handle, one timer per
  connection watches its keepalive, and the handler keeps no queue, its fields in slots: 8.6
  KiB per device at 10k, most of it the socket's transport, the session and the broker's
  indexes. Only work that must wait for the client (retained messages beyond its queue) runs
  in a task of its own, while it waits.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from amqtt.errors import ProtocolHandlerError
from amqtt.events import MQTTEvents
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

__all__ = ["Backlog", "DeliveryLimits", "HubHandler", "Message", "Outbox"]

log = logging.getLogger(__name__)

#: Messages queued for one client before the broker drops what does not fit (Mosquitto's
#: ``max_queued_messages`` default).
MAX_QUEUED: Final = 1000
#: QoS 1/2 messages written to one client and not acknowledged yet before the broker waits for
#: acknowledgements (Mosquitto has 20; a larger window keeps a subscriber over a slow link fed
#: while a full republish streams to it).
MAX_INFLIGHT: Final = 1000

_PUBACK: Final = 0x40
_PUBREC: Final = 0x50
_PUBREL: Final = 0x62
_PUBCOMP: Final = 0x70
_PINGRESP: Final = b"\xd0\x00"
_pack_id = struct.Struct("!H").pack


@dataclass(frozen=True, slots=True)
class DeliveryLimits:
    """How much the broker keeps for one client (see :class:`Outbox`)."""

    max_queued: int = MAX_QUEUED
    max_inflight: int = MAX_INFLIGHT


class Message:
    """One message on its way to one client (the topic is UTF-8 already)."""

    __slots__ = ("data", "packet_id", "qos", "released", "retain", "sent", "topic")

    def __init__(self, topic: bytes, data: bytes, qos: int, retain: bool) -> None:
        self.topic = topic
        self.data = data
        self.qos = qos
        self.retain = retain
        self.packet_id = 0
        #: written at least once: a new write is a redelivery (DUP)
        self.sent = False
        #: QoS 2: PUBREC came, PUBREL sent; waiting for PUBCOMP
        self.released = False

    def encode(self) -> bytes:
        """The PUBLISH packet (or, once released, the PUBREL) for this message."""
        if self.released:
            return bytes((_PUBREL, 2)) + _pack_id(self.packet_id)
        first = 0x30 | (self.qos << 1) | (0x01 if self.retain else 0) | (
            0x08 if self.sent and self.qos else 0)
        topic = self.topic
        head = _pack_id(len(topic)) + topic + (_pack_id(self.packet_id) if self.qos else b"")
        size = len(head) + len(self.data)
        length = bytearray()
        while True:
            byte, size = size & 0x7F, size >> 7
            length.append(byte | (0x80 if size else 0))
            if not size:
                break
        return bytes((first,)) + bytes(length) + head + self.data


class Outbox:
    """What the broker owes one session: messages not yet written, and QoS 1/2 messages
    written but not acknowledged.

    Pure bookkeeping (no I/O): :class:`HubHandler` writes what :meth:`admit` and :meth:`take`
    hand out. It lives on the session, not the connection, so a persistent session's
    unacknowledged messages and queue survive into its next connection. The queue and the
    in-flight table exist only while they hold something: a session that keeps up costs about
    80 bytes, not the 1 KB of an empty deque and a used dict (10k devices: 10 MB).
    """

    __slots__ = ("_next_id", "dropped", "inflight", "limits", "qos0_queued", "queue")

    def __init__(self, limits: DeliveryLimits) -> None:
        self.limits = limits
        self.queue: deque[Message] | None = None
        #: packet id -> message, in the order they were first written
        self.inflight: dict[int, Message] | None = None
        self.qos0_queued = 0
        #: messages dropped because the queue was full, since the session began
        self.dropped = 0
        self._next_id = 0

    @property
    def queued(self) -> int:
        return len(self.queue) if self.queue is not None else 0

    @property
    def full(self) -> bool:
        return self.queued >= self.limits.max_queued

    @property
    def settled(self) -> bool:
        """Nothing left to write and nothing waiting for an acknowledgement."""
        return not self.queue and not self.inflight

    def admit(self, message: Message) -> bool:
        """Whether ``message`` may be written now, bypassing the queue (which must be empty,
        and the window open); if so it is in flight from here on."""
        if self.queue:
            return False
        if message.qos == 0:
            return True
        if self.inflight is not None and len(self.inflight) >= self.limits.max_inflight:
            return False
        self._in_flight(message)
        return True

    def offer(self, message: Message) -> bool:
        """Queue ``message``; False if it was dropped because the queue is full.

        A full queue makes room for a QoS 1/2 message by dropping its oldest QoS 0 message;
        a QoS 0 message, or a QoS 1/2 one when only those are queued, is dropped itself.
        """
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        if len(queue) >= self.limits.max_queued:
            self.dropped += 1
            if message.qos == 0 or not self.qos0_queued:
                return False
            for index, queued in enumerate(queue):
                if queued.qos == 0:
                    del queue[index]
                    self.qos0_queued -= 1
                    break
        queue.append(message)
        if message.qos == 0:
            self.qos0_queued += 1
        return True

    def take(self) -> Message | None:
        """The next queued message to write, or None (nothing queued, or the window is full)."""
        queue = self.queue
        if not queue:
            return None
        message = queue[0]
        if message.qos == 0:
            self.qos0_queued -= 1
        elif self.inflight is not None and len(self.inflight) >= self.limits.max_inflight:
            return None
        else:
            self._in_flight(message)
        queue.popleft()
        if not queue:
            self.queue = None
        return message

    def _in_flight(self, message: Message) -> None:
        inflight = self.inflight
        if inflight is None:
            inflight = self.inflight = {}
        packet_id = self._next_id
        while True:  # ids of acknowledged messages are free again; at most max_inflight in use
            packet_id = packet_id % 65535 + 1
            if packet_id not in inflight:
                break
        self._next_id = message.packet_id = packet_id
        inflight[packet_id] = message

    def acknowledged(self, packet_id: int) -> bool:
        """PUBACK (QoS 1) or PUBCOMP (QoS 2) came: the message is delivered."""
        inflight = self.inflight
        if inflight is None or inflight.pop(packet_id, None) is None:
            return False
        if not inflight:
            self.inflight = None
        return True

    def received(self, packet_id: int) -> Message | None:
        """PUBREC came for a QoS 2 message: it is released (PUBREL is due)."""
        message = self.inflight.get(packet_id) if self.inflight is not None else None
        if message is None or message.qos != 2:
            return None
        message.released = True
        return message

    def unacknowledged(self) -> list[Message]:
        """What a new connection of the session must send again first, in the original order."""
        return list(self.inflight.values()) if self.inflight is not None else []


class Backlog:
    """Which connections are behind, so that the hub's own publishing waits for them a while.

    Why: the hub publishes in bulk (its whole retained state at start, a storm of timeouts),
    far faster than any client reads. Without a wait, a healthy subscriber to ``#`` overflowed
    its queue and lost half of a 20,000-message republish (measured, a paho client on this
    box). So a connection whose queue passes half of ``max_queued`` is *behind*; the hub's
    publishing waits (:meth:`wait`) until no connection is behind, at most ``patience``
    seconds, and a connection still behind then is *waited out*: not waited for again until it
    has caught up (its queue empty), so a client that never reads delays the hub once, not
    every message. Clients' own messages are never held back: that would stall the sender.
    """

    def __init__(self, limits: DeliveryLimits, patience: float,
                 on_drop: Callable[[HubHandler], None]) -> None:
        self.high = max(1, limits.max_queued // 2)
        self.low = limits.max_queued // 4
        self.patience = patience
        self.on_drop = on_drop
        self.behind: set[HubHandler] = set()
        self._caught_up = asyncio.Event()
        self._caught_up.set()

    def update(self, handler: HubHandler, queued: int) -> None:
        """``handler``'s queue holds ``queued`` messages now."""
        behind = self.behind
        if handler in behind:
            if queued <= self.low:
                self.gone(handler)
        elif queued >= self.high and not handler.waited_out:
            behind.add(handler)
            self._caught_up.clear()
        if queued == 0:
            handler.waited_out = False

    def gone(self, handler: HubHandler) -> None:
        """``handler`` is not behind any more (it caught up, or its connection ended)."""
        self.behind.discard(handler)
        if not self.behind:
            self._caught_up.set()

    async def wait(self) -> None:
        """Return once no connection is behind, or after ``patience`` seconds."""
        if not self.behind:
            return
        try:
            async with asyncio.timeout(self.patience):
                await self._caught_up.wait()
        except TimeoutError:
            for handler in self.behind:
                handler.waited_out = True
            self.behind.clear()
            self._caught_up.set()


class HubHandler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's broker-side protocol handler with the flows of the module docstring redone.

    ``outbox_of(session)`` gives the session's :class:`Outbox`; ``backlog`` hears how full its
    queue is, and its ``on_drop(handler)`` is called once per connection, when the queue first
    overflows.

    It reads nothing itself: the broker's ``ClientConnection`` parses the client's packets
    and the broker (``_HubBroker._packet``) calls it for acknowledgements. amqtt's handler
    ran a reader task per connection (plus a task per read for its keepalive ``wait_for``),
    an ``Event`` pair, two ``asyncio.Queue`` for subscriptions, a write lock and a logger
    adapter: ~15 KB an idle connection. What is left here is the transport, the outbox
    bookkeeping and one keepalive timer.
    """

    # Slots for amqtt's fields as well as ours: nothing goes to a per-instance __dict__
    # (amqtt's handler kept ~20 fields there; ten more of ours made each connection ~900
    # bytes bigger, measured with tracemalloc; in slots they cost ~100).
    __slots__ = (  # amqtt 0.12.1's ProtocolHandler and BrokerProtocolHandler fields, and ours
        "_backlog", "_disconnect_waiter", "_drainer", "_high_water", "_keepalive_s",
        "_keepalive_task", "_loop", "_on_silent",
        "_outbox_of", "_pending_subscriptions", "_pending_unsubscriptions", "_puback_waiters",
        "_pubcomp_waiters", "_pubrec_waiters", "_pubrel_waiters", "_reader_ready",
        "_reader_stopped", "_reader_task", "_retained", "_retained_task", "_room",
        "_transport", "_write_lock", "disconnect_packet", "dropping", "heard_at", "held",
        "hub_grant", "hub_will", "keepalive_timeout", "logger", "plugins_manager", "reader",
        "session", "waited_out", "writer",
    )

    def __init__(self, plugins_manager: Any, outbox_of: Callable[[Any], Outbox],
                 backlog: Backlog) -> None:
        # Not amqtt's __init__: it builds the Events, queues, lock and waiter tables this
        # handler does without (the class docstring). Its fields are kept, empty, for amqtt's
        # own code that may look at them.
        self.plugins_manager = plugins_manager
        self.logger = log
        self.session: Any = None
        self.reader: Any = None
        self.writer: Any = None
        self._loop = asyncio.get_running_loop()
        self.keepalive_timeout = None
        self._reader_task = None
        self._reader_ready = None
        self._reader_stopped = None
        self._write_lock = None
        self._puback_waiters = self._pubrec_waiters = _NO_WAITERS
        self._pubrel_waiters = self._pubcomp_waiters = _NO_WAITERS
        self._disconnect_waiter = None
        self._pending_subscriptions = self._pending_unsubscriptions = None
        self._outbox_of = outbox_of
        self._backlog = backlog
        #: behind for longer than the backlog's patience: not waited for until it catches up
        self.waited_out = False
        #: the connection's will and grant, as its CONNECT gave them (set by the broker)
        self.hub_will: Any = None
        self.hub_grant: Any = None
        #: the DISCONNECT this client sent, kept from the moment it was parsed
        self.disconnect_packet: DisconnectPacket | None = None
        #: PUBACKs the hub holds for this connection until its next store flush
        self.held = 0
        #: whether this connection has dropped messages (logged once)
        self.dropping = False
        #: loop time of the last bytes read from the client (its ClientConnection sets it)
        self.heard_at = 0.0
        self._keepalive_task: asyncio.TimerHandle | None = None
        self._keepalive_s = 0.0
        self._on_silent: Callable[[HubHandler], None] | None = None
        self._transport: asyncio.WriteTransport | None = None
        self._high_water = 64 * 1024
        self._drainer: asyncio.Task[None] | None = None
        self._room: asyncio.Event | None = None
        #: retained messages of new subscriptions still to send, and the task sending them
        self._retained: deque[Message] | None = None
        self._retained_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def attach(self, session: Any, reader: Any, writer: Any) -> None:
        # amqtt's also makes a logger adapter per connection (~0.5 KB); the module's logger does
        if self.session is not None:
            raise ProtocolHandlerError("Handler is already attached to a session")
        self.session = session
        self.reader = reader
        self.writer = writer
        transport = getattr(writer, "transport", None)  # the broker's ClientConnection
        if isinstance(transport, asyncio.WriteTransport):
            self._transport = transport
            self._high_water = transport.get_write_buffer_limits()[1]

    async def start(self) -> None:
        # amqtt starts a reader task and a keepalive timer here, then replays the session's
        # unfinished flows, each in a task. The broker's ClientConnection does the reading, the
        # keepalive is watch_keepalive's one timer, and what the broker owes the client is in
        # its outbox (resume). Left: client QoS 2 messages still waiting for their PUBREL,
        # whose PUBREC goes again ([MQTT-4.4.0-1]).
        if self.session is None:
            raise ProtocolHandlerError("Handler is not attached to a stream")
        for packet_id in self.session.inflight_in:
            self.write(_ack(_PUBREC, packet_id))

    async def stop(self) -> None:
        # amqtt's cancels its reader task and waits for it; there is none (the connection ends
        # on its own once the socket closes), so what is left is closing the socket.
        self._closed()
        writer = self.writer
        if writer is None:
            return
        try:
            await writer.close()
        except (TimeoutError, OSError):
            log.debug("closing a client's connection failed", exc_info=True)

    async def handle_connection_closed(self) -> None:
        # amqtt resolves its disconnect waiter; here the connection must end: end its socket
        _abort_transport(self)

    def _closed(self) -> None:
        self._transport = None
        self._backlog.gone(self)
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            self._keepalive_task = None
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None
        if self._room is not None:
            self._room.set()  # wake a sender waiting for room: there will be none

    @property
    def writable(self) -> bool:
        transport = self._transport
        return transport is not None and not transport.is_closing()

    def write(self, data: bytes) -> None:
        """Write a packet the broker owes the client (an ack), unless the connection ended."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def _send_packet(self, packet: Any) -> None:
        # amqtt's takes a lock, waits for the socket to drain and restarts a keepalive timer
        # (whose expiry the broker ignores) for every packet it sends: CONNACK, SUBACK,
        # UNSUBACK here. The bytes go to the transport's buffer like every other write.
        writer = self.writer
        if writer is not None:
            writer.write(packet.to_bytes())
        await self.plugins_manager.fire_event(
            MQTTEvents.PACKET_SENT, packet=packet, session=self.session)

    # -- keepalive --------------------------------------------------------------------------------
    def watch_keepalive(self, seconds: float, on_silent: Callable[[HubHandler], None]) -> None:
        """Call ``on_silent(self)`` once the client has been silent for ``seconds``.

        One timer per connection, moved on only when it fires (to ``heard_at + seconds``):
        amqtt wrapped every read in ``wait_for``, a task and a timer per read.
        """
        self._keepalive_s = seconds
        self._on_silent = on_silent
        self.heard_at = self._loop.time()
        self._keepalive_task = self._loop.call_at(self.heard_at + seconds, self._check_silence)

    def _check_silence(self) -> None:
        due = self.heard_at + self._keepalive_s
        if self._loop.time() < due:
            self._keepalive_task = self._loop.call_at(due, self._check_silence)
            return
        self._keepalive_task = None
        if self._on_silent is not None and self.writable:
            self._on_silent(self)

    # -- incoming acknowledgements, from the broker -----------------------------------------------
    def send_pubacks(self, packet_ids: list[int]) -> None:
        """Acknowledge these QoS 1 PUBLISHes of this connection (nothing if it has ended)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(b"".join(_ack(_PUBACK, packet_id) for packet_id in packet_ids))

    # -- outgoing messages ------------------------------------------------------------------------
    def deliver(self, message: Message) -> None:
        """Send ``message`` to this client now, or queue it, or drop it if the queue is full."""
        outbox = self._outbox_of(self.session)
        transport = self._transport
        if (self._drainer is None and transport is not None and not transport.is_closing()
                and transport.get_write_buffer_size() < self._high_water
                and outbox.admit(message)):
            transport.write(message.encode())  # the usual case: nothing queued, socket free
            message.sent = True
            self._backlog.update(self, 0)
            return
        dropped = outbox.dropped
        outbox.offer(message)
        if outbox.dropped != dropped and not self.dropping:
            self.dropping = True
            self._backlog.on_drop(self)
        self.pump()

    async def deliver_waiting(self, message: Message) -> None:
        """:meth:`deliver`, but wait for room rather than drop (retained messages on SUBSCRIBE:
        a subscriber to ``#`` must get every one, at the pace it reads them)."""
        outbox = self._outbox_of(self.session)
        while outbox.full and self.writable:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()
        if self.writable:
            self.deliver(message)

    def resume(self) -> None:
        """A connection of a session that has unacknowledged messages sends them again first."""
        outbox = self._outbox_of(self.session)
        transport = self._transport
        if transport is not None:
            for message in outbox.unacknowledged():
                transport.write(message.encode())
                message.sent = True
        self.pump()

    def pump(self) -> None:
        """Write queued messages while the socket takes them and the window allows."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        outbox = self._outbox_of(self.session)
        if self._drainer is None:  # else the socket is full: the drainer pumps when it is not
            high_water = self._high_water
            while transport.get_write_buffer_size() < high_water:
                message = outbox.take()
                if message is None:
                    break
                transport.write(message.encode())
                message.sent = True
            if outbox.queue and transport.get_write_buffer_size() >= high_water:
                # the client reads slower than we write: wait for its socket in one task, not
                # one per message
                self._drainer = asyncio.get_running_loop().create_task(self._drain())
        self._backlog.update(self, outbox.queued)
        if self._room is not None and not outbox.full:
            self._room.set()

    async def _drain(self) -> None:
        writer = self.writer
        try:
            if writer is not None:
                await writer.drain()  # returns once the socket's buffer is below its low mark
        except (ConnectionError, RuntimeError):
            return  # the connection ended while we waited
        finally:
            self._drainer = None
        self.pump()

    def acknowledged(self, packet_id: int) -> None:
        """PUBACK (QoS 1) or PUBCOMP (QoS 2) from the client."""
        # amqtt looks for a task waiting on this id; ours are in the outbox, and an id we do not
        # know (a late ack of a previous connection) is ignored, as MQTT allows
        if self.session is not None and self._outbox_of(self.session).acknowledged(packet_id):
            self.pump()

    def pubrec(self, packet_id: int) -> None:
        """PUBREC from the client: its QoS 2 message is received; PUBREL is due."""
        if self.session is None:
            return
        message = self._outbox_of(self.session).received(packet_id)
        if message is not None:
            self.write(message.encode())  # the PUBREL

    def pong(self) -> None:
        """PINGRESP, for the client's PINGREQ."""
        self.write(_PINGRESP)

    def qos2_received(self, packet_id: int) -> None:
        """PUBREC: the client's QoS 2 PUBLISH is stored until its PUBREL."""
        self.write(_ack(_PUBREC, packet_id))

    def qos2_completed(self, packet_id: int) -> None:
        """PUBCOMP: the client's PUBREL came (and its message, if known, was handled)."""
        self.write(_ack(_PUBCOMP, packet_id))

    # -- retained messages of a new subscription --------------------------------------------------
    def deliver_retained(self, messages: list[Message]) -> None:
        """Send ``messages`` at the pace the client reads: a subscriber to ``#`` must get every
        one. What fits in the client's queue goes now; the rest from one task that waits for
        room (the client's PUBACKs come through its connection, which must not wait for them).
        """
        if self._retained is not None:  # still sending an earlier subscription's: after them
            self._retained.extend(messages)
            return
        outbox = self._outbox_of(self.session)
        for sent, message in enumerate(messages):
            if outbox.full or not self.writable:
                if self.writable:
                    self._retained = deque(messages[sent:])
                    self._retained_task = self._loop.create_task(self._send_retained())
                return
            self.deliver(message)

    async def _send_retained(self) -> None:
        pending = self._retained
        try:
            while pending and self.writable:
                await self.deliver_waiting(pending.popleft())
        finally:
            self._retained = None
            self._retained_task = None


#: amqtt's waiter tables (packet id -> future), which this handler never fills.
_NO_WAITERS: Final[Mapping[int, Any]] = MappingProxyType({})


def _ack(kind: int, packet_id: int) -> bytes:
    """A PUBACK, PUBREC, PUBREL or PUBCOMP for ``packet_id``."""
    return bytes((kind, 2)) + _pack_id(packet_id)


def _abort_transport(handler: HubHandler) -> None:
    """End ``handler``'s connection the way a dead network would (the broker then ends it)."""
    transport = getattr(handler.writer, "transport", None)
    if transport is not None:
        transport.abort()
    elif handler.reader is not None:
        handler.reader.feed_eof()
