"""The hub on MQTT: one sink (:mod:`.hub`), two transports behind one typed seam (:mod:`.transport`).

* **Embedded** (``broker="embedded"``, :mod:`.embedded`): an amqtt broker in this process.
* **External** (``broker="mqtt://..."`` or ``mqtts://``, :mod:`.external`): the hub's own
  asyncio MQTT client (:mod:`.client`, which replaced paho there: see its docstring for the
  figures) on a persistent session.

:func:`attach_mqtt` picks one and returns the :class:`MqttHub` for the composition root to hand
to the service.
"""

from __future__ import annotations

import logging
import socket

from hub.auth.accounts import CredentialStore
from hub.broker import BrokerError, TlsListener
from hub.core.errors import PresenceError
from hub.mqtt.embedded import EmbeddedTransport
from hub.mqtt.external import HUB_CLIENT_ID, ExternalTransport
from hub.mqtt.homeassistant import HomeAssistant
from hub.mqtt.hub import MqttHub
from hub.mqtt.transport import CommandRunner, HubService, Transport
from hub.protocol import BrokerURL, InvalidURL

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:1883"

__all__ = [
    "DEFAULT_LISTEN",
    "HUB_CLIENT_ID",
    "BrokerError",
    "EmbeddedTransport",
    "ExternalTransport",
    "MqttHub",
    "Transport",
    "attach_mqtt",
    "broker_answers",
    "parse_listen",
]


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


def attach_mqtt(
    service: HubService,
    broker: str,
    *,
    commands: CommandRunner,
    listen: str = DEFAULT_LISTEN,
    client_id: str = HUB_CLIENT_ID,
    ca_file: str | None = None,
    tls_insecure: bool = False,
    allow_anonymous: bool | None = None,
    credentials: str | CredentialStore | None = None,
    tls_listen: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    homeassistant: str | None = None,
    leased: bool = False,
) -> MqttHub:
    """Put ``service`` on MQTT: ``broker`` is ``embedded``, ``auto`` or an MQTT URL.

    ``auto`` uses a broker that already answers on ``listen``, else starts the embedded one
    there, and logs which.

    ``homeassistant``: Home Assistant's discovery prefix (``homeassistant``) to describe
    every user there (:mod:`hub.mqtt.homeassistant`); None for none.

    For the embedded broker: ``credentials`` is the accounts file (or store); as soon as it
    holds an account, clients must log in and each may touch only its own topics.
    ``allow_anonymous`` (None: only while there are no accounts) and the TLS listener
    (``tls_listen`` HOST:PORT with ``tls_cert``/``tls_key`` PEM files) as in ``presence-hub``.
    For an external broker, the hub's own login is in the URL (``mqtt://user:pass@host``) and
    ``ca_file``/``tls_insecure`` apply to ``mqtts://``. ``leased``: several hubs share the
    broker and a Redis lease decides which is active (an external broker only).
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
        if leased:
            raise PresenceError("hubs that share a lease (--standby) need an external broker "
                                "that all of them reach, not the embedded one")

        def factory(hub: MqttHub) -> Transport:
            return EmbeddedTransport(hub, host, port, allow_anonymous=allow_anonymous,
                                     credentials=store, tls=tls)

    else:
        try:
            url = BrokerURL.parse(broker)
        except InvalidURL as exc:
            raise PresenceError(str(exc)) from None

        def factory(hub: MqttHub) -> Transport:
            return ExternalTransport(hub, url, client_id=client_id, ca_file=ca_file,
                                     tls_insecure=tls_insecure, leased=leased)

    hub = MqttHub(service, factory, commands)
    if homeassistant is not None:
        hub.discovery = HomeAssistant(hub, homeassistant)
    return hub
