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
same CONNACK refusals, same session fields.
"""

from __future__ import annotations

from typing import Any

from amqtt.errors import MQTTError
from amqtt.events import MQTTEvents
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from transitions import MachineError

__all__ = ["HubSession", "SessionStates", "read_connect"]

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


class HubSession(Session):  # type: ignore[misc]  # amqtt ships no type information
    """An amqtt session whose state machine is a :class:`SessionStates`."""

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.transitions._session = self  # the copy's machine must point at the copy


async def read_connect(
    reader: Any, writer: Any, plugins_manager: Any
) -> tuple[BrokerProtocolHandler, HubSession]:
    """amqtt's ``BrokerProtocolHandler.init_from_connect``, making a :class:`HubSession`.

    Reads the CONNECT, refuses what amqtt refuses (``MQTTError``; a CONNACK with the reason
    where MQTT has one) and returns a fresh handler and the session the CONNECT describes.
    """
    connect = await ConnectPacket.from_stream(reader)
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
    if connect.proto_name != "MQTT":
        raise MQTTError(f"[MQTT-3.1.2-1] incorrect protocol name: {connect.proto_name!r}")
    peer = writer.get_peer_info()
    if peer is None:
        raise MQTTError("no peer address for the connection")
    remote_address, remote_port = peer

    refusal: int | None = None
    if connect.proto_level != _PROTOCOL_LEVEL:
        refusal = UNACCEPTABLE_PROTOCOL_VERSION
    elif (not connect.username_flag and connect.password_flag) or (
        connect.username_flag and connect.username is None
    ) or (connect.password_flag and connect.password is None):
        refusal = BAD_USERNAME_PASSWORD  # [MQTT-3.1.2-22]
    elif not connect.clean_session_flag and payload.client_id_is_random:
        refusal = IDENTIFIER_REJECTED  # [MQTT-3.1.3-8]
    if refusal is not None:
        connack = ConnackPacket.build(0, refusal)
        await plugins_manager.fire_event(MQTTEvents.PACKET_SENT, packet=connack)
        await connack.to_stream(writer)
        await writer.close()
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
    return BrokerProtocolHandler(plugins_manager), session
