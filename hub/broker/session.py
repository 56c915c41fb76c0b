"""Lighter amqtt sessions for the embedded broker, and the CONNECT reader that makes them.

Why: every amqtt ``Session`` builds its own ``transitions.Machine`` for a three-state life
(new -> connected <-> disconnected). Measured on this box: 318 us and 22.9 KiB per session,
~180 Python objects that every full garbage collection then walks: at 10k devices that was
about 40% of the broker's memory per connection and most of its connect cost.
:class:`SessionStates` keeps the part amqtt and the hub use (``state``, ``connect()``,
``disconnect()``, ``is_connected()`` ...) with the same transitions, the same refusal
(``MachineError``) and the same enter hooks, in one small object.

amqtt creates the session inside ``BrokerProtocolHandler.init_from_connect``, so
:func:`read_connect` does that job again with :class:`HubSession`: same checks of the CONNECT,
same CONNACK refusals, same session fields. One difference (issue 11, defect 11): amqtt parses
every CONNECT as MQTT 3.1.1 before looking at its protocol level. An MQTT 5 CONNECT carries
properties where 3.1.1 has the client id, so the parser took them for a string length and
waited for bytes that never came: the client got no CONNACK at all. :func:`read_connect` reads
the whole packet first and answers any protocol but MQTT 3.1.1 (name ``MQTT``, level 4) with
CONNACK 0x01 (unacceptable protocol version) at once, then closes. Mosquitto serves MQTT 5.

The session object is also slimmed (issue 16): amqtt gives every session two ``asyncio.Queue``
(each with three deques and an ``Event``: ~3.7 KB) and two ``OrderedDict``, and keeps its ~30
fields in a ``__dict__``. Here the fields are slots, the two queues are :class:`LazyQueue` (a
deque made on first use; nothing in the embedded broker waits on them) and the in-flight
tables plain dicts: about 0.6 KB a session instead of ~6 KB.

Read against amqtt 0.12.1, like the rest of this package (``AMQTT_VERSION`` in
:mod:`hub.broker.embedded`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from amqtt.adapters import BufferReader
from amqtt.codecs_amqtt import read_or_raise
from amqtt.errors import MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import CONNECT, MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from transitions import MachineError

__all__ = ["HubSession", "LazyQueue", "SessionStates", "read_connect"]

#: MQTT 3.1.1's protocol level; amqtt's broker speaks only this one.
_PROTOCOL_LEVEL = 4


class SessionStates:
    """amqtt's session state machine (``Session._init_states``) without ``transitions``.

    connect: new or disconnected -> connected (else ``MachineError``); disconnect: from any
    state -> disconnected. Entering a state runs the session's hook as amqtt's machine does
    (it stamps ``last_connect_time``/``last_disconnect_time``, which session expiry reads).
    """

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> bool:
        if self.state == "connected":
            raise MachineError("can't trigger event connect from state connected")
        self.state = "connected"
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        self.state = "disconnected"
        self._session._on_enter_disconnected()
        return True

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


class LazyQueue:
    """The part of ``asyncio.Queue`` amqtt calls on a session's two queues, over a deque made
    on first use.

    Why: amqtt's ``Session`` keeps a queue of messages for the connection's message loop and
    one of messages kept while the client was away, each an ``asyncio.Queue`` of ~3.7 KB
    whether it ever holds anything or not. The embedded broker uses neither (a client's
    messages are handled as they are read, and what a session is owed lives in its outbox,
    hub/broker/connection.py), so nothing ever waits on them: :meth:`get` does not block.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: deque[Any] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    async def get(self) -> Any:
        return self.get_nowait()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items is not None else 0


#: Every field amqtt 0.12.1's ``Session.__init__`` sets, plus the hub's own.
_SESSION_FIELDS: tuple[str, ...] = (
    "transitions", "remote_address", "remote_port", "client_id", "clean_session", "will_flag",
    "will_message", "will_qos", "will_retain", "will_topic", "keep_alive",
    "publish_retry_delay", "broker_uri", "username", "password", "cafile", "capath", "cadata",
    "_packet_id", "parent", "last_connect_time", "ssl_object", "last_disconnect_time",
    "attributes", "inflight_out", "inflight_in", "retained_messages",
    "delivered_message_queue", "is_anonymous", "hub_outbox",
)
#: What a copy of a session does not take over (it gets its own).
_NOT_COPIED: frozenset[str] = frozenset(
    ("transitions", "retained_messages", "delivered_message_queue"))


class HubSession(Session):  # type: ignore[misc]  # amqtt ships no type information
    """An amqtt session whose state machine is a :class:`SessionStates`, in slots.

    ``hub_outbox`` holds what the broker owes the client (hub/broker/connection.py), made on
    the first message: most sessions of idle devices never need one.
    """

    __slots__ = _SESSION_FIELDS

    def __init__(self) -> None:
        # amqtt's Session.__init__, field for field, but without its two asyncio queues and
        # ordered dicts (see the module docstring); not called, as it would build them
        self._init_states()
        self.remote_address: str | None = None
        self.remote_port: int | None = None
        self.client_id: str | None = None
        self.clean_session: bool | None = None
        self.will_flag = False
        self.will_message: bytes | bytearray | None = None
        self.will_qos: int | None = None
        self.will_retain: bool | None = None
        self.will_topic: str | None = None
        self.keep_alive: float = 0
        self.publish_retry_delay = 0
        self.broker_uri: str | None = None
        self.username: str | None = None
        self.password: str | None = None
        self.cafile: str | None = None
        self.capath: str | None = None
        self.cadata: bytes | None = None
        self._packet_id = 0
        self.parent = 0
        self.last_connect_time: int | None = None
        self.ssl_object: Any = None
        self.last_disconnect_time: int | None = None
        self.attributes: dict[str, Any] = {}
        self.inflight_out: dict[int, Any] = {}
        #: client QoS 2 messages that got PUBREC and wait for their PUBREL
        self.inflight_in: dict[int, Any] = {}
        self.retained_messages = LazyQueue()
        self.delivered_message_queue = LazyQueue()
        self.is_anonymous = False
        self.hub_outbox: Any = None

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)

    def __getstate__(self) -> dict[str, Any]:
        # amqtt copies its __dict__, which holds nothing here: the fields are slots
        state = {name: getattr(self, name) for name in _SESSION_FIELDS if name not in _NOT_COPIED}
        state["state"] = self.transitions.state
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self._init_states()  # the copy's machine must point at the copy
        self.transitions.state = state.pop("state", "new")
        for name, value in state.items():
            setattr(self, name, value)
        self.retained_messages = LazyQueue()
        self.delivered_message_queue = LazyQueue()


async def read_connect(
    reader: Any, writer: Any, plugins_manager: Any,
    make_handler: Callable[[Any], BrokerProtocolHandler],
) -> tuple[BrokerProtocolHandler, HubSession]:
    """amqtt's ``BrokerProtocolHandler.init_from_connect``, making a :class:`HubSession`.

    Reads the CONNECT, refuses what amqtt refuses (``MQTTError``; a CONNACK with the reason
    where MQTT has one) and returns a fresh handler (``make_handler(plugins_manager)``) and the
    session the CONNECT describes.
    """
    fixed = await MQTTFixedHeader.from_stream(reader)
    if fixed is None:
        raise NoDataError("the connection ended before its CONNECT")
    if fixed.packet_type != CONNECT:
        raise MQTTError(f"[MQTT-3.1.0-1] first packet is not CONNECT (type {fixed.packet_type})")
    body = await read_or_raise(reader, fixed.remaining_length)  # the whole packet
    if _protocol_of(body) != ("MQTT", _PROTOCOL_LEVEL):
        # refused before parsing the rest, which another version lays out differently
        await _refuse(writer, plugins_manager, UNACCEPTABLE_PROTOCOL_VERSION)
        raise MQTTError(f"CONNECT of protocol {_protocol_of(body)!r}, not MQTT 3.1.1: refused")
    connect = await ConnectPacket.from_stream(BufferReader(body), fixed_header=fixed)
    await plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=connect)
    header, payload = connect.variable_header, connect.payload
    if header is None or payload is None:
        raise MQTTError("CONNECT packet without variable header or payload")
    if payload.client_id is None:
        raise MQTTError("[MQTT-3.1.3-3] client identifier must be present")
    if header.will_flag and (payload.will_topic is None or payload.will_message is None):
        raise MQTTError("will flag set, but will topic/message not present in payload")
    if header.reserved_flag:
        raise MQTTError("[MQTT-3.1.2-3] CONNECT reserved flag must be set to 0")
    peer = writer.get_peer_info()
    if peer is None:
        raise MQTTError("no peer address for the connection")
    remote_address, remote_port = peer

    refusal: int | None = None  # (protocol name and level were checked above)
    if (not connect.username_flag and connect.password_flag) or (
        connect.username_flag and connect.username is None
    ) or (connect.password_flag and connect.password is None):
        refusal = BAD_USERNAME_PASSWORD  # [MQTT-3.1.2-22]
    elif not connect.clean_session_flag and payload.client_id_is_random:
        refusal = IDENTIFIER_REJECTED  # [MQTT-3.1.3-8]
    if refusal is not None:
        await _refuse(writer, plugins_manager, refusal)
        raise MQTTError(f"CONNECT from {remote_address}:{remote_port} refused ({refusal})")

    session = HubSession()
    session.client_id = connect.client_id
    session.clean_session = connect.clean_session_flag
    session.will_flag = connect.will_flag
    session.will_retain = connect.will_retain_flag
    session.will_qos = connect.will_qos
    session.will_topic = connect.will_topic
    session.will_message = connect.will_message
    session.username = connect.username
    session.password = connect.password
    session.remote_address = remote_address
    session.remote_port = remote_port
    session.ssl_object = writer.get_ssl_info()
    session.keep_alive = max(connect.keep_alive, 0)
    return make_handler(plugins_manager), session


def _protocol_of(body: bytes) -> tuple[str, int] | None:
    """A CONNECT's protocol name and level (the same place in every MQTT version), or None."""
    if len(body) < 2:
        return None
    size = int.from_bytes(body[:2], "big")
    if len(body) < 2 + size + 1:
        return None
    try:
        name = body[2:2 + size].decode()
    except UnicodeDecodeError:
        return None
    return name, body[2 + size]


async def _refuse(writer: Any, plugins_manager: Any, code: int) -> None:
    """CONNACK with ``code`` (session present 0, [MQTT-3.2.2-4]), then close."""
    connack = ConnackPacket.build(0, code)
    await plugins_manager.fire_event(MQTTEvents.PACKET_SENT, packet=connack)
    await connack.to_stream(writer)
    await writer.close()
