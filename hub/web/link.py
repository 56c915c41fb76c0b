"""What the HTTP side reports of the MQTT side: is the broker link up, how many clients.

A fact read when asked (a health check, a scrape), never tracked on the way: the transports
already know whether they are connected, and the embedded broker which clients it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from hub.mqtt import EmbeddedTransport, ExternalTransport, MqttHub


class BrokerLink(Protocol):
    """The broker as /healthz and /metrics see it."""

    @property
    def kind(self) -> str:
        """``embedded``, ``external`` or ``none`` (an in-process service)."""

    def up(self) -> bool:
        """The hub hears devices: its broker runs (embedded) or both its links are up."""

    def clients(self) -> int | None:
        """Clients connected to the embedded broker; None on a broker the hub does not run."""

    def refused(self) -> Mapping[str, int] | None:
        """What the embedded broker refused, by reason; None on a broker the hub does not run."""


class MqttLink:
    """The link of an :class:`~hub.mqtt.MqttHub`, whichever transport it started."""

    def __init__(self, hub: MqttHub) -> None:
        self.hub = hub

    @property
    def kind(self) -> str:
        transport = self._transport()
        if isinstance(transport, EmbeddedTransport):
            return "embedded"
        return "external" if isinstance(transport, ExternalTransport) else "none"

    def _transport(self) -> object | None:
        try:
            return self.hub.transport
        except RuntimeError:  # not started (or already stopped)
            return None

    def up(self) -> bool:
        transport = self._transport()
        if isinstance(transport, EmbeddedTransport):
            return transport.broker.running
        if isinstance(transport, ExternalTransport):
            # the main session carries activity and the hub's status, the live one births,
            # wills and heartbeats: without either the hub is partly deaf
            return transport.client.connected and transport.live.connected
        return False

    def clients(self) -> int | None:
        transport = self._transport()
        if isinstance(transport, EmbeddedTransport):
            return len(transport.broker.connected_clients())
        return None

    def refused(self) -> Mapping[str, int] | None:
        transport = self._transport()
        if isinstance(transport, EmbeddedTransport):
            return transport.broker.refused
        return None


class NoBroker:
    """A service without MQTT (in-process): nothing to be cut off from."""

    kind = "none"

    def up(self) -> bool:
        return True

    def clients(self) -> int | None:
        return None

    def refused(self) -> Mapping[str, int] | None:
        return None
