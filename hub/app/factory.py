"""The composition root: the one place that builds a service and wires stores and MQTT to it.

No other module builds what it depends on: the service is handed its store and clock, the MQTT
side is handed the service and the command handler. That keeps the import graph one-way
(cli -> app -> mqtt, stores -> core -> protocol) and every seam typed.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from hub.app.commands import run_command
from hub.app.service import PresenceService, ServiceConfig
from hub.core.clock import Clock
from hub.core.engine import EngineConfig
from hub.core.errors import PresenceError
from hub.protocol import MAX_PAYLOAD_BYTES
from hub.stores import ActivityLimits, Store, open_store

if TYPE_CHECKING:
    from hub.mqtt import MqttHub

StorageKind = Literal["memory", "tinydb", "redis"]


def create_presence_service(
    *,
    heartbeat_interval_ms: int = 30_000,
    away_after_ms: int = 300_000,
    offline_after_ms: int = 3_600_000,
    heartbeat_timeout_ms: int | None = None,
    storage: StorageKind | Store = "memory",
    db_path: str | None = None,
    redis_url: str | None = None,
    activity_limit: int = 1000,
    activity_max_age_ms: int = 7 * 24 * 3600 * 1000,
    prefix: str = "presence",
    broker: str | None = None,
    clock: Clock | None = None,
    flush_interval_ms: int = 1000,
    device_rate: float | None = 20.0,
    device_burst: int = 100,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    max_devices_per_user: int = 64,
    max_custom_status: int = 256,
    will_grace_ms: int = 1_000,
    max_heartbeat_interval_ms: int = 30 * 60_000,
    fence: str | None = None,
    **hub_options: Any,
) -> PresenceService:
    """Build a presence service: in-process by default, the hub on MQTT when given a broker.

    ``storage`` is ``"memory"``, ``"tinydb"`` (``db_path``) or ``"redis"`` (``redis_url``), or a
    :class:`~hub.stores.Store`. ``broker`` is ``None`` (no MQTT), ``"embedded"`` (an amqtt broker
    in this process), ``"auto"`` or an ``mqtt://``/``mqtts://`` URL; ``hub_options`` go to the
    MQTT side (listen address, credentials, ...).

    Limits: ``device_rate``/``device_burst`` (messages per second a device may send, sustained
    and in a burst; ``None`` for no limit), ``max_payload_bytes``, ``max_devices_per_user``,
    ``max_custom_status`` (characters), ``activity_limit``/``activity_max_age_ms`` per user.

    Availability: ``will_grace_ms`` is how long a device's last will waits for a birth of a new
    session before it takes effect (a reconnect never flaps the user; 0: at once), and
    ``max_heartbeat_interval_ms`` bounds the interval a device may announce in its birth.

    ``fence``: the Redis lease's fence value this hub writes under, when several hubs share
    the store (see :mod:`hub.stores.lease`).
    """
    try:
        engine_config = EngineConfig(
            heartbeat_interval_ms=heartbeat_interval_ms,
            away_after_ms=away_after_ms,
            offline_after_ms=offline_after_ms,
            heartbeat_timeout_ms=heartbeat_timeout_ms,
            max_devices_per_user=max_devices_per_user,
            max_custom_status=max_custom_status,
            will_grace_ms=will_grace_ms,
            max_heartbeat_interval_ms=max_heartbeat_interval_ms,
        )
    except ValueError as exc:
        raise PresenceError(str(exc)) from None
    limits = ActivityLimits(max_entries=activity_limit, max_age_ms=activity_max_age_ms)
    if isinstance(storage, str):
        store = open_store(
            storage, db_path=db_path, redis_url=redis_url, limits=limits, namespace=prefix,
            fence=fence,
        )
    else:
        store = storage
    config = ServiceConfig(
        engine=engine_config, prefix=prefix, flush_interval_ms=flush_interval_ms,
        max_payload_bytes=max_payload_bytes, device_rate=device_rate, device_burst=device_burst,
    )
    service = PresenceService(config, store=store, clock=clock)
    if broker is not None:
        attach_broker(service, broker, **hub_options)
    elif hub_options:
        raise PresenceError(f"options need a broker: {', '.join(sorted(hub_options))}")
    return service


def attach_broker(service: PresenceService, broker: str, **options: Any) -> MqttHub:
    """Put ``service`` on MQTT (``broker`` as in :func:`create_presence_service`) with the chat
    commands answering requests; the service starts and stops it with itself."""
    # imported here: an in-process service (a chat bot) never loads the broker stack
    from hub.mqtt import attach_mqtt

    hub = attach_mqtt(service, broker, commands=partial(run_command, service), **options)
    service.attach(hub)
    return hub
