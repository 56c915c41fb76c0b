"""One client connection of the embedded broker: amqtt's protocol handler, three flows redone.

Read against amqtt 0.12.1, like the rest of this package (``AMQTT_VERSION`` in
:mod:`hub.broker.embedded`; the broker refuses to start on any other version). amqtt's
``BrokerProtocolHandler`` does three things the hub cannot live with:

* **PUBACK on receipt.** It acknowledges a client's QoS 1 PUBLISH as soon as it has parsed it,
  before anyone has acted on it, so a hub killed a moment later had acknowledged activity it
  never wrote (issue 11, defect 2). Here the PUBACK waits for whoever handles the message: the
  broker sends it (:meth:`HubHandler.send_pubacks`) at once, or after the store flush that
  persisted the message when the hub asks to hold it. QoS 2 is left as amqtt does it (PUBREC on
  receipt): the presence protocol uses QoS 0 and 1 only.
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
  (defect 9; MQTT says a DISCONNECT discards the will [MQTT-3.14.4-3]). Here it is noted on the
  handler the moment it is parsed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import INCOMING

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
_PUBREL: Final = 0x62
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
    """amqtt's broker-side protocol handler with the three flows of the module docstring redone.

    ``outbox_of(session)`` gives the session's :class:`Outbox`; ``backlog`` hears how full its
    queue is, and its ``on_drop(handler)`` is called once per connection, when the queue first
    overflows.
    """

    # slots: amqtt's handler keeps ~20 attributes in its __dict__ already, and ten more made
    # each connection ~900 bytes bigger (measured, tracemalloc); in slots they cost ~100
    __slots__ = (
        "_backlog", "_drainer", "_high_water", "_outbox_of", "_room", "_stream", "_transport",
        "disconnect_packet", "dropping", "held", "hub_grant", "hub_will", "waited_out",
    )

    def __init__(self, plugins_manager: Any, outbox_of: Callable[[Any], Outbox],
                 backlog: Backlog) -> None:
        super().__init__(plugins_manager)
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
        self._transport: asyncio.WriteTransport | None = None
        self._stream: asyncio.StreamWriter | None = None
        self._high_water = 64 * 1024
        self._drainer: asyncio.Task[None] | None = None
        self._room: asyncio.Event | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def attach(self, session: Any, reader: Any, writer: Any) -> None:
        super().attach(session, reader, writer)
        stream = getattr(writer, "_writer", None)  # asyncio.StreamWriter inside amqtt's adapter
        if isinstance(stream, asyncio.StreamWriter):
            self._stream = stream
            transport = stream.transport
            assert isinstance(transport, asyncio.WriteTransport)
            self._transport = transport
            self._high_water = transport.get_write_buffer_limits()[1]

    async def start(self) -> None:
        await super().start()
        # a DISCONNECT parsed before amqtt made its waiter (just above) would wait forever
        waiter = self._disconnect_waiter
        if self.disconnect_packet is not None and waiter is not None and not waiter.done():
            waiter.set_result(self.disconnect_packet)

    async def stop(self) -> None:
        self._closed()
        await super().stop()

    def _closed(self) -> None:
        self._transport = None
        self._backlog.gone(self)
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None
        if self._room is not None:
            self._room.set()  # wake a sender waiting for room: there will be none

    @property
    def writable(self) -> bool:
        transport = self._transport
        return transport is not None and not transport.is_closing()

    # -- DISCONNECT -------------------------------------------------------------------------------
    def handle_disconnect(
        self, disconnect: DisconnectPacket | None
    ) -> Coroutine[Any, Any, None]:
        # Deliberately not a coroutine function: amqtt's reader calls this the moment the packet
        # is parsed and only then wraps the coroutine in a task, which it cancels unrun if the
        # stream ends in the same read. Noting the packet here cannot be lost that way.
        if isinstance(disconnect, DisconnectPacket) and self.disconnect_packet is None:
            self.disconnect_packet = disconnect
        coroutine: Coroutine[Any, Any, None] = super().handle_disconnect(disconnect)
        return coroutine

    async def wait_disconnect(self) -> DisconnectPacket | None:
        result: DisconnectPacket | None = await super().wait_disconnect()
        # amqtt's waiter is gone (None) once a DISCONNECT was handled before anyone waited
        return self.disconnect_packet or result

    # -- incoming QoS 1: the PUBACK waits for whoever handles the message -------------------------
    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        if app_message.direction != INCOMING:
            await super()._handle_qos1_message_flow(app_message)
            return
        # amqtt queues the message for the broker and acknowledges it here, at once; the broker
        # acknowledges it instead once the message is handled (EmbeddedBroker, send_pubacks)
        await self.session.delivered_message_queue.put(app_message)

    def send_pubacks(self, packet_ids: list[int]) -> None:
        """Acknowledge these QoS 1 PUBLISHes of this connection (nothing if it has ended)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        head = bytes((_PUBACK, 2))
        transport.write(b"".join(head + _pack_id(packet_id) for packet_id in packet_ids))

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
        stream = self._stream
        try:
            if stream is not None:
                await stream.drain()  # returns once the socket's buffer is below its low mark
        except (ConnectionError, RuntimeError):
            return  # the connection ended while we waited
        finally:
            self._drainer = None
        self.pump()

    async def handle_puback(self, puback: Any) -> None:
        self._acked(puback.variable_header.packet_id)

    async def handle_pubcomp(self, pubcomp: Any) -> None:
        self._acked(pubcomp.packet_id)

    def _acked(self, packet_id: int) -> None:
        # amqtt looks for a task waiting on this id; ours are in the outbox, and an id we do not
        # know (a late ack of a previous connection) is ignored, as MQTT allows
        if self.session is not None and self._outbox_of(self.session).acknowledged(packet_id):
            self.pump()

    async def handle_pubrec(self, pubrec: Any) -> None:
        if self.session is None:
            return
        message = self._outbox_of(self.session).received(pubrec.packet_id)
        transport = self._transport
        if message is not None and transport is not None and not transport.is_closing():
            transport.write(message.encode())  # the PUBREL
