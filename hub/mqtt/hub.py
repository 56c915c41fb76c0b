"""The hub on MQTT: device topics in, retained user topics and events out.

:class:`MqttHub` is the one sink of effects for both ways onto the wire (a
:class:`~hub.mqtt.transport.Transport`): the embedded broker (:mod:`.embedded`) and an
external broker through the hub's own client (:mod:`.external`).

Retained user topics are published only when their payload changed (a ``sync`` republishes
all). ``P/hub/status`` is ``online`` while the hub runs, with ``offline`` as its will.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from hub.core.engine import DIGEST_MASK, digest_term
from hub.core.events import DeviceRemoved, DeviceTimedOut, EmitEvent, UserRemoved
from hub.mqtt.transport import CommandRunner, HubService, Transport
from hub.protocol import (
    BadRequest,
    DeviceMessage,
    ReplyPayload,
    RequestPayload,
    Topics,
    UserState,
    UserTopicKind,
    event_json,
    text_payload,
)

log = logging.getLogger(__name__)

#: users whose retained topics are republished per loop turn (4 messages each)
REPUBLISH_SLICE = 500
#: unacked messages above which a republish waits for the broker
REPUBLISH_BACKLOG = 50_000


class UserDiscovery(Protocol):
    """An integration that describes each user to another system once (Home Assistant's MQTT
    discovery, :mod:`hub.mqtt.homeassistant`): told when a user first appears and when one is
    removed, never per status change (that system reads the state topics itself)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def user_appeared(self, state: UserState) -> None: ...

    def user_removed(self, user_id: str) -> None: ...

    def republish_all(self) -> None:
        """Every user's description again (the hub did not republish its users' state)."""


def _digest_json(users: int, digest: int) -> bytes:
    return b'{"users":%d,"digest":"%016x"}' % (users, digest)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("republishing retained state failed", exc_info=task.exception())


class MqttHub:
    """The MQTT side of the service: a sink for effects and a source of device messages."""

    def __init__(self, service: HubService, transport_factory: Callable[[MqttHub], Transport],
                 commands: CommandRunner) -> None:
        self.service = service
        self.topics: Topics = service.topics
        self._commands = commands
        #: per user, what its retained topics hold: (hash of the state JSON, status, custom
        #: status, primary, version). The strings are the engine's own objects and the JSON is
        #: kept as a hash, so this costs ~80 bytes a user instead of ~870 for topic -> payload.
        self._retained: dict[str, tuple[int, str, str | None, str | None, int]] = {}
        #: ``_retained`` is known to be what the broker holds for every user the hub knows
        #: (see :meth:`retained_digest`): after a republish of everyone, or after the broker
        #: proved at start that it kept the last run's state; not while a republish runs
        self._digest_valid = False
        self._factory = transport_factory
        self._transport: Transport | None = None
        #: (user, device) -> MQTT client id that sent its birth (embedded broker only)
        self.client_ids: dict[tuple[str, str], str] = {}
        self._republishing: asyncio.Future[None] | None = None
        #: Home Assistant discovery when on (``attach_mqtt(homeassistant=...)``); None costs
        #: nothing: it is looked at only the first time a user's state is published
        self.discovery: UserDiscovery | None = None

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise RuntimeError("the MQTT side is not started")
        return self._transport

    async def start(self) -> None:
        self._transport = self._factory(self)
        self.service.add_sink(self)
        self.service.set_request_handler(self._serve_request)
        await self._transport.start()
        if self.discovery is not None:
            await self.discovery.start()

    async def stop(self) -> None:
        if self._transport is None:
            return
        if self.discovery is not None:
            await self.discovery.stop()
        if self._republishing is not None:
            self._republishing.cancel()
        await self._transport.stop()
        self.service.remove_sink(self)

    # ------------------------------------------------------------------ sink

    def _publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.transport.publish(topic, payload, qos, retain)

    def publish_state(self, state: UserState, forced: bool) -> None:
        """The user's four retained topics, each only when its payload changed (or forced)."""
        uid = state.user_id
        doc = state.to_json()
        now = (hash(doc), state.status, state.custom_status, state.active_device, state.version)
        was = self._retained.get(uid)
        if was is None and self.discovery is not None:  # the user's first publish
            self.discovery.user_appeared(state)
        if forced:
            was = None
        self._retained[uid] = now
        base = self.topics.user_base(uid)
        publish = self.transport.publish
        if was is None or was[0] != now[0]:
            publish(base + "state", doc, 1, True)
        if was is None or was[1] != now[1]:
            publish(base + "status", text_payload(now[1]), 1, True)
        if was is None or was[2] != now[2]:
            publish(base + "custom", text_payload(now[2]), 1, True)
        if was is None or was[3] != now[3]:
            publish(base + "primary", text_payload(now[3]), 1, True)

    def publish_event(self, event: EmitEvent) -> None:
        payload = event_json(event.event, event.user_id, event.old, event.new, event.ts)
        self._publish(self.topics.events(event.user_id), payload, 1, False)

    def device_timed_out(self, effect: DeviceTimedOut) -> None:
        """The transport closes the connection of a device whose client id it knows (the
        embedded broker); with none known (an external broker keeps its own keepalive) there
        is nothing to close, and a storm of 100k timeouts makes no 100k calls for nothing."""
        client_id = self.client_ids.get((effect.user_id, effect.device_id)) if self.client_ids \
            else None
        if client_id is not None:
            self.transport.device_timed_out(effect, client_id)

    def device_removed(self, effect: DeviceRemoved) -> None:
        """Clear the device's retained ``conn`` (an empty retained message deletes it)."""
        self._publish(self.topics.device(effect.user_id, effect.device_id, "conn"), b"", 1, True)

    def user_removed(self, effect: UserRemoved) -> None:
        """The user is gone from the hub: clear its retained topics (an empty retained message
        deletes one), forget what they held (it would be new again), and take it out of Home
        Assistant. Its devices' retained births are cleared by their own DeviceRemoved."""
        user_id = effect.user_id
        kinds: tuple[UserTopicKind, ...] = ("state", "status", "custom", "primary")
        for kind in kinds:
            self._publish(self.topics.user(user_id, kind), b"", 1, True)
        self._retained.pop(user_id, None)
        if self.discovery is not None:
            self.discovery.user_removed(user_id)

    def before_flush(self) -> None:
        self.transport.before_flush()

    def after_flush(self) -> None:
        self.transport.after_flush()

    def republish_all(self) -> None:
        """Every user's retained topics, e.g. at start (an embedded broker forgets them).

        In the background, :data:`REPUBLISH_SLICE` users per loop turn, pausing while the
        transport has more than :data:`REPUBLISH_BACKLOG` messages unacked: a million devices
        are millions of messages, which must not sit in memory at once nor hold the loop
        (heartbeats are read in between). A user whose state changes meanwhile is published
        with its newest state; publishing a snapshot is idempotent.
        """
        if self._republishing is not None:
            self._republishing.cancel()
        self._digest_valid = False  # the broker may have lost anything until it is done
        self._republishing = asyncio.ensure_future(self._republish(self.service.engine.user_ids()))
        self._republishing.add_done_callback(_log_failure)

    async def _republish(self, user_ids: list[str]) -> None:
        engine = self.service.engine
        transport = self.transport
        began = asyncio.get_running_loop().time()
        for start in range(0, len(user_ids), REPUBLISH_SLICE):
            for uid in user_ids[start:start + REPUBLISH_SLICE]:
                state = engine.snapshot(uid)
                if state is not None:
                    self.publish_state(state, forced=True)
            await asyncio.sleep(0)
            await transport.drained(REPUBLISH_BACKLOG)
        # users that appeared meanwhile were published as they appeared
        self._digest_valid = True
        if user_ids:
            log.info("republished the retained state of %d users in %.2f s", len(user_ids),
                     asyncio.get_running_loop().time() - began)

    # ------------------------------------------------------------------ the broker kept it

    def broker_holds_loaded_state(self, digest_payload: bytes | None) -> bool:
        """Does the broker's ``P/hub/retained`` (read at start, before anything was
        published) say that it holds exactly the state this hub loaded?

        It does when the last run stopped cleanly (a crash may have published versions the
        store never saw) and left this digest of what the broker then held, and the digest
        is that of the (user, version) pairs the store gave: a version names one state of a
        user (it moves whenever anything published but ``lastSeen`` changes, and is never
        reused), so equal pairs mean equal retained topics.
        """
        engine = self.service.engine
        if digest_payload is None or engine.crashed_at_load:
            return False
        return digest_payload == _digest_json(engine.loaded_users, engine.loaded_digest)

    def adopt_broker_state(self) -> None:
        """The broker holds what the last run published (:meth:`broker_holds_loaded_state`):
        take that as what every user's retained topics hold, instead of republishing
        millions of messages, and publish only the users the load itself changed."""
        engine = self.service.engine
        retained = self._retained
        changed = engine.changed_at_load
        for uid, status, custom, primary, version in engine.published_fields():
            if uid not in changed:
                retained[uid] = (0, status, custom, primary, version)  # the state's hash unknown
        self._digest_valid = True
        for uid in changed:
            state = engine.snapshot(uid)
            if state is not None:
                self.publish_state(state, forced=True)
        if self.discovery is not None:
            self.discovery.republish_all()
        log.info("the broker kept the retained state of all %d users from the last run: "
                 "nothing to republish (%d changed at load)", len(retained), len(changed))

    def retained_digest(self) -> bytes:
        """``P/hub/retained``'s payload at a clean stop: the digest of the (user, version)
        pairs whose state this hub published to the broker, or empty (the retained message
        cleared) when the hub does not know that the broker holds every user's state."""
        if not self._digest_valid:
            return b""
        total = 0
        for uid, held in self._retained.items():
            total += digest_term(uid, held[4])
        return _digest_json(len(self._retained), total & DIGEST_MASK)

    # ------------------------------------------------------------------ requests

    async def _serve_request(self, msg: DeviceMessage | BadRequest) -> None:
        if isinstance(msg, BadRequest):
            bad = ReplyPayload(id=msg.id, ok=False, text=f"bad request: {msg.why}")
            self._publish(self.topics.reply(msg.user, msg.device), bad.to_json(), 1, False)
            return
        body = msg.body
        assert isinstance(body, RequestPayload)
        try:
            result = await self._commands(msg.user, body.command)
            reply = ReplyPayload(id=body.id, ok=result.ok, text=result.text, data=result.data)
        except Exception as exc:  # never leave a caller waiting on a crash
            log.exception("command %r of %s failed", body.command, msg.user)
            reply = ReplyPayload(id=body.id, ok=False, text=f"hub error: {exc}")
        self._publish(self.topics.reply(msg.user, msg.device), reply.to_json(), 1, False)
