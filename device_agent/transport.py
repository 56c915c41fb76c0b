"""Making paho clients from an :class:`AgentConfig`, and reading paho's answers for people.

Both the long-running agent and the short-lived ``presence`` command connect the same way
(same URL, credentials and TLS files), so that is done once here. Clients use MQTT 3.1.1 with a
clean session: durability is the agent's own outbox, not broker-side session state, and 3.1.1
works with every broker a home hub might run. The clean session matters more because every
agent connection has a client id of its own (its session id is in it): a persistent session
would never be resumed, only left behind on the broker, one per reconnect. The hub needs no
device session either: it reads the retained ``conn`` and the last will.
"""

from __future__ import annotations

import ssl
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .config import AgentConfig
from .errors import ConfigError

#: CONNACK refusals that no amount of retrying can fix (MQTT 5 reason code values, which
#: paho 2.x also uses for 3.1.1 brokers).
PERMANENT_REFUSALS: Final = frozenset({
    0x84,  # Unsupported protocol version
    0x85,  # Client identifier not valid
    0x86,  # Bad user name or password
    0x87,  # Not authorized
    0x8C,  # Bad authentication method
})


def make_client(config: AgentConfig, client_id: str) -> mqtt.Client:
    """A paho client with the configured credentials and TLS, not yet connected.

    ``reconnect_on_failure`` is off: the caller decides when and how to reconnect (the agent
    needs a fresh session id and last will for each connection, see ``agent.py``).
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311,
        clean_session=True,
        reconnect_on_failure=False,
    )
    broker = config.broker
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        try:
            client.tls_set(
                ca_certs=str(config.ca_file) if config.ca_file else None,
                certfile=str(config.cert_file) if config.cert_file else None,
                keyfile=str(config.key_file) if config.key_file else None,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"cannot set up TLS for {broker}: {exc}") from None
        if config.tls_insecure:
            client.tls_insecure_set(True)
    return client


def reason_text(reason_code: Any) -> str:
    """paho's reason code as a short phrase ("Not authorized"), whatever its type."""
    text = str(getattr(reason_code, "getName", lambda: reason_code)())
    return text or "unknown reason"


def disconnect_text(reason_code: Any) -> str:
    """Why a connection ended, for a log line.

    With MQTT 3.1.1 paho reports every unexpected end as "Unspecified error", which reads
    like a bug; say what it means instead.
    """
    text = reason_text(reason_code)
    if text == "Unspecified error":
        return "the connection was closed (broker stopped or network lost)"
    return text


def reason_value(reason_code: Any) -> int:
    value = getattr(reason_code, "value", reason_code)
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def is_failure(reason_code: Any) -> bool:
    failure = getattr(reason_code, "is_failure", None)
    if isinstance(failure, bool):
        return failure
    return reason_value(reason_code) >= 0x80


def connect_error_text(exc: BaseException) -> str:
    """An OSError from ``connect()`` as a phrase: "connection refused", "timed out", ..."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running and listening on that port?)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
    return str(exc) or type(exc).__name__
