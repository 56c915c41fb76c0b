"""The two typed seams of the MQTT side.

:class:`Transport` is what :class:`~hub.mqtt.hub.MqttHub` needs from a way onto the wire; the
embedded broker and the external client both implement all of it (mypy checks that where the
composition root picks one). :class:`HubService` is what the MQTT side needs from the presence
service, so this package never imports the application layer above it.

Transports report facts (a batch of messages, the link went up or down, a device's connection
is known under a client id); what a fact means for a status is the engine's decision.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from hub.core.engine import Engine
from hub.core.events import DeviceTimedOut, Sink
from hub.protocol import BadRequest, DeviceMessage, Topics


class Transport(Protocol):
    """One way onto the wire. Every method runs on the hub's event loop."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Publish the hub's clean ``offline`` and leave; nothing is redelivered needlessly."""

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Put one message on the wire without blocking the loop; order is preserved."""

    async def drained(self, below: int) -> None:
        """Return once at most ``below`` published messages wait for the broker."""

    def before_flush(self) -> None:
        """A store flush starts: what was ingested until now is in it."""

    def after_flush(self) -> None:
        """That flush is durable: acknowledge its QoS 1 messages now."""

    def device_timed_out(self, effect: DeviceTimedOut, client_id: str | None) -> None:
        """The engine timed a device out; a broker that keeps silent sockets may close it."""


class ServiceConfigView(Protocol):
    @property
    def max_payload_bytes(self) -> int: ...


class HubService(Protocol):
    """What the MQTT side uses of :class:`hub.app.service.PresenceService`."""

    @property
    def topics(self) -> Topics: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def config(self) -> ServiceConfigView: ...

    def ingest(self, messages: Iterable[tuple[str, bytes]]) -> int: ...

    @property
    def fenced(self) -> bool:
        """Another hub took the lease over: this one neither writes nor publishes."""

    async def confirm_leading(self) -> bool:
        """True while this hub may act (always, without a lease); asks Redis when unsure."""

    def reject(self, reason: str, detail: str) -> None: ...

    def link_up(self) -> None: ...

    def link_down(self) -> None: ...

    def request_flush(self) -> None: ...

    async def flush(self) -> None: ...

    def add_sink(self, sink: Sink) -> None: ...

    def remove_sink(self, sink: Sink) -> None: ...

    def set_request_handler(
            self, handler: Callable[[DeviceMessage | BadRequest], Awaitable[None]]) -> None: ...


class CommandReply(Protocol):
    """The answer of a chat command (:class:`hub.app.commands.CommandResult`)."""

    @property
    def ok(self) -> bool: ...

    @property
    def text(self) -> str: ...

    @property
    def data(self) -> Any: ...


#: Runs one chat command for a user: ``(user_id, text) -> reply`` (the composition root binds it
#: to the service).
CommandRunner = Callable[[str, str], Awaitable[CommandReply]]
