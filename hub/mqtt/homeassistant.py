"""Home Assistant MQTT discovery (``--homeassistant``): every user appears in HA as a device.

Per user, four retained discovery configs under
``{ha}/sensor/{node}/{user}_{kind}/config`` (``{ha}`` is ``--homeassistant-prefix``,
``homeassistant`` by default; ``{node}`` is the hub's prefix ``P`` and ``{user}`` the user id,
both as object ids, see :func:`object_id`):

========== ================================= =================================================
kind       reads                             what HA shows
========== ================================= =================================================
status     ``P/users/{user}/status``         ``enum`` sensor: online, away, dnd or offline
custom     ``P/users/{user}/custom``         the custom status (empty when there is none)
primary    ``P/users/{user}/primary``        the primary device's id (empty when none)
last_seen  ``P/users/{user}/state``          ``timestamp`` from ``lastSeen``; diagnostic,
                                             disabled by default
========== ================================= =================================================

All four are unavailable while ``P/hub/status`` is not ``online``: a stopped hub shows as
unavailable, not as everyone frozen in their last status.

When configs are published (never per heartbeat or status change: HA reads the state topics
themselves):

* when a user first appears, which includes every known user at hub start (the hub's first
  publish of each user's retained state goes through :meth:`HomeAssistant.user_appeared`);
* all of them again when HA's birth (``{ha}/status`` ``online``, not retained) arrives, and
  after the hub's own link for that birth was down (HA may have restarted meanwhile, and a
  broker that restarted without persistence lost every retained config);
* an empty retained message on each when a user is removed (:meth:`HomeAssistant.user_removed`);
* at start, on an external broker, configs retained under our node whose ``unique_id`` is ours
  but whose user the hub no longer knows are deleted (:meth:`HomeAssistant._remove_stale`). The
  look takes at most :data:`COLLECT_S`, in the background: start is not delayed by it. The
  embedded broker keeps retained messages in memory only, so it never has stale ones at start.

Why a connection of its own for HA's birth: neither transport hands the hub anything but
device topics, and this feature must cost nothing when it is off. The small client
(:class:`~hub.mqtt.client.HubMqttClient`, clean session) subscribes to ``{ha}/status`` only.
On the embedded broker it connects over loopback; the broker also still hands the birth to the
service, which counts it as a dropped ``unknown_topic`` as it does for any client's message
outside ``P/devices/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import ssl
from collections.abc import Container
from typing import Any, Final

from hub.mqtt.client import (
    CONNACK,
    DISCONNECT_PACKET,
    PINGREQ_PACKET,
    PINGRESP,
    PUBLISH,
    SUBACK,
    BrokerRefused,
    HubMqttClient,
    ProtocolError,
    Received,
    _read_packet,  # read_retained's packet reader: one reader of single packets, not two
    encode_connect,
    encode_subscribe,
)
from hub.mqtt.embedded import EmbeddedTransport
from hub.mqtt.external import ExternalTransport
from hub.mqtt.hub import REPUBLISH_BACKLOG, REPUBLISH_SLICE, MqttHub
from hub.protocol import STATUSES, Topics, UserState, validate_prefix

log = logging.getLogger(__name__)

DEFAULT_DISCOVERY_PREFIX: Final = "homeassistant"
#: the distribution whose version and URL go into every config's ``origin``
DISTRIBUTION: Final = "mqtt-presence-hub"
ORIGIN_NAME: Final = "mqtt-presence"
MANUFACTURER: Final = "mqtt-presence"
MODEL: Final = "Presence user"
#: the sensors of one user, in the order they are published
KINDS: Final = ("status", "custom", "primary", "last_seen")
#: the longest look at what is retained under our discovery topics at start (seconds)
COLLECT_S: Final = 1.0
#: HA's birth payload (its ``birth_message``, not retained)
BIRTH_ONLINE: Final = b"online"
HA_CLIENT_SUFFIX: Final = "/homeassistant"

#: HA object ids (node id and object id in a discovery topic) are ``[a-zA-Z0-9_-]+``; ids here
#: also have ``.`` (and a prefix ``/``). ``_`` is the escape character: each of these becomes
#: ``_`` plus a letter, ``_`` itself ``__``, so every ``_`` in an object id starts a pair and
#: the mapping can be read back: two different ids never share an object id.
_ESCAPES: Final = str.maketrans({"_": "__", ".": "_d", "/": "_s"})
_UNESCAPES: Final = {"_": "_", "d": ".", "s": "/"}
#: stand-ins for the user id (a valid id, as the topic builders check) and the name in the
#: config templates, and the name as ``json.dumps`` writes it there
_USER_MARK: Final = "USER-7f3a9c2e-MARK"
_NAME_MARK: Final = "\x02"
_NAME_JSON: Final = '"\\u0002"'


def object_id(text: str) -> str:
    """``text`` (an id, or a prefix of ids joined by ``/``) as an HA object id, injectively."""
    return text.translate(_ESCAPES)


def from_object_id(oid: str) -> str:
    """The inverse of :func:`object_id`; ValueError for what it never produces."""
    out: list[str] = []
    chars = iter(oid)
    for ch in chars:
        if ch == "_":
            nxt = next(chars, "")
            if nxt not in _UNESCAPES:
                raise ValueError(f"not an escaped id: {oid!r}")
            out.append(_UNESCAPES[nxt])
        else:
            out.append(ch)
    return "".join(out)


def installed_origin() -> dict[str, str]:
    """``origin`` of every config: who publishes it (name, version, and a support URL when the
    installed package declares one), so HA can say where an entity came from."""
    origin = {"name": ORIGIN_NAME}
    try:
        meta = importlib.metadata.metadata(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        origin["sw_version"] = "unknown"
        return origin
    origin["sw_version"] = meta["Version"] or "unknown"
    urls = [entry.rpartition(",")[2].strip() for entry in meta.get_all("Project-URL") or []]
    urls.extend(meta.get_all("Home-page") or [])
    for url in urls:
        if url.startswith(("https://", "http://")):
            origin["support_url"] = url
            break
    return origin


class Discovery:
    """The discovery topics and configs of one hub (prefix ``P``) under one HA prefix.

    Pure: no I/O, so every config can be checked against HA's documented schema in a test.
    """

    def __init__(self, topics: Topics, ha_prefix: str = DEFAULT_DISCOVERY_PREFIX,
                 origin: dict[str, str] | None = None) -> None:
        self.topics = topics
        self.ha_prefix = validate_prefix(ha_prefix)
        self.origin = origin if origin is not None else installed_origin()
        #: the node id: two hubs with different prefixes on one broker never share a topic
        self.node = object_id(topics.prefix)
        #: where HA announces itself (its birth, ``online``, and its will, ``offline``)
        self.birth_topic = f"{self.ha_prefix}/status"
        #: every config of this hub's users (and nothing of another hub or integration's)
        self.config_filter = f"{self.ha_prefix}/sensor/{self.node}/+/config"
        self._config_base = f"{self.ha_prefix}/sensor/{self.node}/"
        #: ``unique_id`` is ``mqtt-presence:P:USER:KIND``: ``:`` is in no id and no prefix, so
        #: it splits back unambiguously, and it stays the same across restarts and versions
        self._uid_base = f"{ORIGIN_NAME}:{topics.prefix}:"
        # Each kind's JSON once, with markers where the user id and name go: filling them in
        # costs ~16 us a user instead of ~65 for building and dumping the dicts (a hub start
        # publishes every user's configs, in slices that must not hold the loop long).
        self._templates = [
            json.dumps(config, separators=(",", ":"))
            for _, config in self.configs(_USER_MARK, _NAME_MARK)]

    def config_topic(self, user_id: str, kind: str) -> str:
        # no kind's "_KIND" ends another's, so (user, kind) -> object id is one-to-one too
        return f"{self._config_base}{object_id(user_id)}_{kind}/config"

    def unique_id(self, user_id: str, kind: str) -> str:
        return f"{self._uid_base}{user_id}:{kind}"

    def device_id(self, user_id: str) -> str:
        return f"{self._uid_base}{user_id}"

    def owner(self, unique_id: object) -> tuple[str, str] | None:
        """(user, kind) of one of our unique ids; None for anyone else's."""
        if not isinstance(unique_id, str) or not unique_id.startswith(self._uid_base):
            return None
        user, sep, kind = unique_id[len(self._uid_base):].rpartition(":")
        return (user, kind) if sep and user else None

    def configs(self, user_id: str, name: str) -> list[tuple[str, dict[str, Any]]]:
        """The four (topic, config) of one user, as HA's MQTT sensor documents its keys."""
        user_topic = self.topics.user
        common: dict[str, Any] = {
            "availability_topic": self.topics.hub_status,
            "payload_available": "online",
            "payload_not_available": "offline",
            "qos": 1,
            "device": {
                "identifiers": [self.device_id(user_id)],
                "name": name,
                "manufacturer": MANUFACTURER,
                "model": MODEL,
            },
            "origin": dict(self.origin),
        }
        sensors: dict[str, dict[str, Any]] = {
            "status": {
                "name": "Status",
                "state_topic": user_topic(user_id, "status"),
                "device_class": "enum",
                "options": list(STATUSES),
                "icon": "mdi:account-circle",
            },
            "custom": {
                "name": "Custom status",
                "state_topic": user_topic(user_id, "custom"),
                "icon": "mdi:message-text-outline",
            },
            "primary": {
                "name": "Primary device",
                "state_topic": user_topic(user_id, "primary"),
                "icon": "mdi:cellphone-link",
            },
            "last_seen": {
                "name": "Last seen",
                "state_topic": user_topic(user_id, "state"),
                "device_class": "timestamp",
                # lastSeen is epoch ms, or null for a user never seen ("None": unknown)
                "value_template": "{{ as_datetime(value_json.lastSeen / 1000) "
                                  "if value_json.lastSeen else None }}",
                "entity_category": "diagnostic",
                "enabled_by_default": False,
            },
        }
        return [
            (self.config_topic(user_id, kind),
             {"unique_id": self.unique_id(user_id, kind), **sensors[kind], **common})
            for kind in KINDS
        ]

    def payloads(self, user_id: str, name: str) -> list[tuple[str, bytes]]:
        """:meth:`configs` as JSON, from the templates. A user id needs no JSON escaping (its
        characters are ``[A-Za-z0-9_.-]``); the name is dumped."""
        quoted = json.dumps(name)
        return [
            (self.config_topic(user_id, kind),
             template.replace(_USER_MARK, user_id).replace(_NAME_JSON, quoted).encode())
            for kind, template in zip(KINDS, self._templates, strict=True)
        ]

    def removals(self, user_id: str) -> list[str]:
        """The config topics to clear (empty retained payload) when the user goes."""
        return [self.config_topic(user_id, kind) for kind in KINDS]

    def is_stale(self, topic: str, payload: bytes, known: Container[str]) -> bool:
        """A retained config of ours (its ``unique_id`` says so) that no user in ``known``
        would publish at ``topic``. Foreign or unreadable configs are never ours to delete."""
        if not payload:
            return False
        try:
            config = json.loads(payload)
        except (ValueError, RecursionError):
            return False
        if not isinstance(config, dict):
            return False
        owner = self.owner(config.get("unique_id"))
        if owner is None:
            return False
        user, kind = owner
        return not (user in known and kind in KINDS and topic == self.config_topic(user, kind))


class HomeAssistant:
    """Discovery on the wire for one :class:`~hub.mqtt.hub.MqttHub` (see the module docstring).

    Configs go out through the hub's transport, in order with the state topics they describe;
    HA's birth comes in on :attr:`client`, a connection of its own.
    """

    def __init__(self, hub: MqttHub, ha_prefix: str = DEFAULT_DISCOVERY_PREFIX,
                 origin: dict[str, str] | None = None) -> None:
        self.hub = hub
        self.discovery = Discovery(hub.topics, ha_prefix, origin)
        self.client: HubMqttClient | None = None
        self._republishing: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connects = 0
        #: births of HA seen (``online``), and configs deleted as stale: for logs and tests
        self.births = 0
        self.stale_removed = 0
        #: set once the look for stale configs at start is over (or was not needed)
        self.stale_checked = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen for HA's birth (and, on an external broker, clear stale configs)."""
        transport = self.hub.transport
        d = self.discovery
        common: dict[str, Any] = {
            "subscriptions": [(d.birth_topic, 1)], "clean_session": True, "keepalive": 30,
            "on_messages": self._on_messages, "on_connect": self._on_connect,
        }
        if isinstance(transport, ExternalTransport):
            url, main = transport.url, transport.client
            self.client = HubMqttClient(
                url.host, url.port, client_id=main.client_id + HA_CLIENT_SUFFIX,
                username=url.username, password=url.password, ssl_context=main.ssl_context,
                **common)
        elif isinstance(transport, EmbeddedTransport):
            broker = transport.broker
            self.stale_checked.set()  # a broker in this process retains nothing from before
            if broker.policy.auth_required:
                log.warning(
                    "Home Assistant discovery: the embedded broker has accounts, and no "
                    "account may read or write %s/#, so Home Assistant cannot use the configs "
                    "nor be heard coming online; use it with an open broker on loopback, or "
                    "with Mosquitto (README, 'Home Assistant')", d.ha_prefix)
                return
            host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
                broker.host, broker.host)
            self.client = HubMqttClient(
                host, broker.port, client_id="presence-hub" + HA_CLIENT_SUFFIX,
                username="presence-hub", **common)
        else:  # a transport of a test, or of the future: configs still go out
            self.stale_checked.set()
            return
        await self.client.start()
        log.info("Home Assistant discovery on: configs under %s, republished when %s says "
                 "online", d.config_filter, d.birth_topic)

    async def stop(self) -> None:
        for task in [*self._tasks, self._republishing]:
            if task is not None:
                task.cancel()
        if self.client is not None:
            await self.client.stop()
            self.client = None

    # ------------------------------------------------------------------ from the hub

    def user_appeared(self, state: UserState) -> None:
        """The hub publishes this user's retained state for the first time since it started."""
        self._publish_configs(state.user_id, state.name)

    def user_removed(self, user_id: str) -> None:
        """Delete the user's entities: an empty retained config removes one in HA."""
        if self.hub.service.fenced:
            return
        publish = self.hub.transport.publish
        for topic in self.discovery.removals(user_id):
            publish(topic, b"", 1, True)

    def _publish_configs(self, user_id: str, name: str) -> None:
        if self.hub.service.fenced:  # another hub is active (--standby): it speaks for users
            return
        publish = self.hub.transport.publish
        for topic, payload in self.discovery.payloads(user_id, name):
            publish(topic, payload, 1, True)

    def republish_all(self) -> None:
        """Every known user's configs again, in the background and in slices, as the hub
        republishes its retained state (a later call starts over with the newest users)."""
        if self._republishing is not None:
            self._republishing.cancel()
        self._republishing = asyncio.ensure_future(self._republish())
        self._republishing.add_done_callback(_log_failure)

    async def _republish(self) -> None:
        engine = self.hub.service.engine
        transport = self.hub.transport
        user_ids = engine.user_ids()
        for start in range(0, len(user_ids), REPUBLISH_SLICE):
            for uid in user_ids[start:start + REPUBLISH_SLICE]:
                state = engine.snapshot(uid)
                if state is not None:
                    self._publish_configs(uid, state.name)
            await asyncio.sleep(0)
            await transport.drained(REPUBLISH_BACKLOG)
        log.info("republished the Home Assistant discovery configs of %d users", len(user_ids))

    # ------------------------------------------------------------------ HA's side

    def _on_connect(self, _session_present: bool) -> None:
        self._connects += 1
        if self._connects == 1:
            if not self.stale_checked.is_set():
                self._spawn(self._remove_stale())
            return
        # HA's birth may have come while this link was down (a broker restart: the broker
        # may also have lost every retained config)
        log.info("Home Assistant discovery: link back; republishing every config")
        self.republish_all()

    def _on_messages(self, received: list[Received]) -> None:
        client = self.client
        birth = False
        for topic, payload, mid, qos in received:
            if qos and client is not None:
                client.ack(mid, qos, client.generation)
            if topic == self.discovery.birth_topic and payload.strip() == BIRTH_ONLINE:
                birth = True
        if birth:  # one republish for a batch, however many births it held
            self.births += 1
            log.info("Home Assistant is online (%s): republishing the discovery configs of "
                     "every user", self.discovery.birth_topic)
            self.republish_all()

    async def _remove_stale(self) -> None:
        """Delete our retained configs whose user the hub no longer knows (at start)."""
        transport = self.hub.transport
        assert isinstance(transport, ExternalTransport)
        url = transport.url
        try:
            retained = await collect_retained(
                url.host, url.port, self.discovery.config_filter,
                client_id=f"{transport.client.client_id}{HA_CLIENT_SUFFIX}/look",
                username=url.username, password=url.password,
                ssl_context=transport.client.ssl_context, within=COLLECT_S)
        except (OSError, TimeoutError, ssl.SSLError, ProtocolError, BrokerRefused) as exc:
            log.warning("Home Assistant discovery: could not look for stale configs under %s "
                        "(%s); configs of removed users stay until the next start",
                        self.discovery.config_filter, exc or type(exc).__name__)
            self.stale_checked.set()
            return
        # decided and published in one loop turn: a user who appears later is known by then
        if self.hub.service.fenced:
            self.stale_checked.set()
            return
        engine = self.hub.service.engine
        known = set(engine.user_ids())
        stale = [t for t, p in retained.items() if self.discovery.is_stale(t, p, known)]
        publish = transport.publish
        for topic in stale:
            publish(topic, b"", 1, True)
        self.stale_removed += len(stale)
        if stale:
            log.info("Home Assistant discovery: removed %d retained configs of users the hub "
                     "no longer knows", len(stale))
        self.stale_checked.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("Home Assistant discovery failed", exc_info=task.exception())


async def collect_retained(
    host: str,
    port: int,
    topic_filter: str,
    *,
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    within: float = COLLECT_S,
) -> dict[str, bytes]:
    """The retained messages under ``topic_filter`` (topic -> payload), read with a clean
    session: all of them, or as many as came within ``within`` seconds.

    The end is known without waiting out the deadline: a broker handles one client's packets
    in order, so the PINGRESP to a PINGREQ sent after the SUBACK comes behind the retained
    messages that the subscription released (as :func:`hub.mqtt.client.read_retained` does
    for one topic). Raises OSError when the broker cannot be reached in time,
    :class:`BrokerRefused` for a refused login or subscription, :class:`ProtocolError` for
    garbage.
    """
    found: dict[str, bytes] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        host, port, ssl=ssl_context, server_hostname=host if ssl_context is not None else None),
        within)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await _collect(reader, writer, topic_filter, client_id, username, password,
                               found)
    finally:
        with contextlib.suppress(OSError, ssl.SSLError):
            writer.write(DISCONNECT_PACKET)
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(0.2):
                await writer.wait_closed()
    return found


async def _collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, topic_filter: str,
                   client_id: str, username: str | None, password: str | None,
                   found: dict[str, bytes]) -> None:
    writer.write(encode_connect(client_id, keepalive=60, clean_session=True, username=username,
                                password=password))
    first, body = await _read_packet(reader)
    if first >> 4 != CONNACK or len(body) != 2:
        raise ProtocolError("no CONNACK")
    if body[1]:
        raise BrokerRefused(f"CONNACK return code {body[1]}")
    writer.write(encode_subscribe(1, [(topic_filter, 0)]))
    subscribed = False
    while True:
        first, body = await _read_packet(reader)
        kind = first >> 4
        if kind == PUBLISH and len(body) >= 2:
            end = 2 + ((body[0] << 8) | body[1])
            topic = body[2:end].decode("utf-8", "replace")
            if first & 0x06:
                end += 2  # a packet id (the broker kept a higher QoS than asked)
            if first & 0x01:  # retained: what was there before we looked
                found[topic] = bytes(body[end:])
        elif kind == SUBACK and not subscribed:
            if body[2:3] == b"\x80":
                raise BrokerRefused(f"subscription to {topic_filter} refused")
            subscribed = True
            writer.write(PINGREQ_PACKET)
        elif kind == PINGRESP and subscribed:
            return
