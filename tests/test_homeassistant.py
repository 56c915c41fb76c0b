"""Home Assistant MQTT discovery (``--homeassistant``), on the embedded broker and on Mosquitto.

What HA relies on, checked here: configs appear for a new user and name the state topics the
hub keeps current; they are republished on HA's birth and on nothing else (no heartbeat, no
status change); they are removed with the user, and stale ones at start; every config uses only
keys of HA's documented MQTT sensor schema, with the documented types; ids map to HA object ids
without collisions.

The embedded-broker tests run one ``presence-hub --homeassistant`` process for the module (so
the flag is tested through the command line); the ones that need the hub's objects (removal,
Mosquitto's stale configs) run the service in the test's own loop, where every blocking paho
call goes through a thread so the loop keeps serving the hub.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hub.app.factory import attach_broker, create_presence_service
from hub.auth import CredentialStore
from hub.auth.mosquitto import mosquitto_acl_file, mosquitto_password_file
from hub.cli.settings import UsageError, build_parser, resolve
from hub.mqtt import MqttHub
from hub.mqtt.homeassistant import (
    KINDS,
    Discovery,
    HomeAssistant,
    from_object_id,
    object_id,
)
from hub.protocol import ID_PATTERN, STATUSES, Topics
from tests.support.hub_process import HubProcess
from tests.support.mqtt_clients import MqttClient, SimDevice, Watcher
from tests.support.procs import MosquittoProcess, free_port
from tests.support.wait import async_wait_for, wait_for

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = {"name": "mqtt-presence", "sw_version": "0.1.0"}
ids = st.from_regex(f"^{ID_PATTERN}$", fullmatch=True)

# --------------------------------------------------------------------------------------------
# HA's documented schema, as its docs state it (home-assistant.io, "MQTT Sensor": configuration
# variables; "MQTT": discovery, origin). Key -> the JSON types it may take.

SENSOR_KEYS: dict[str, tuple[type, ...]] = {
    "availability": (list,),
    "availability_mode": (str,),
    "availability_template": (str,),
    "availability_topic": (str,),
    "device": (dict,),
    "device_class": (str, type(None)),
    "enabled_by_default": (bool,),
    "encoding": (str,),
    "entity_category": (str,),
    "entity_picture": (str,),
    "expire_after": (int,),
    "force_update": (bool,),
    "icon": (str,),
    "json_attributes_template": (str,),
    "json_attributes_topic": (str,),
    "last_reset_value_template": (str,),
    "name": (str, type(None)),
    "options": (list,),
    "origin": (dict,),
    "payload_available": (str,),
    "payload_not_available": (str,),
    "qos": (int,),
    "state_class": (str,),
    "state_topic": (str,),
    "suggested_display_precision": (int,),
    "unique_id": (str,),
    "unit_of_measurement": (str, type(None)),
    "value_template": (str,),
}
DEVICE_KEYS: dict[str, tuple[type, ...]] = {
    "configuration_url": (str,),
    "connections": (list,),
    "hw_version": (str,),
    "identifiers": (str, list),
    "manufacturer": (str,),
    "model": (str,),
    "model_id": (str,),
    "name": (str,),
    "serial_number": (str,),
    "suggested_area": (str,),
    "sw_version": (str,),
    "via_device": (str,),
}
ORIGIN_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "sw_version": (str,),
    "support_url": (str,),
}
#: HA's sensor device classes used here (of its documented list)
SENSOR_DEVICE_CLASSES = {"enum", "timestamp"}
#: how HA reads a discovery topic (homeassistant/components/mqtt/discovery.py, TOPIC_MATCHER)
HA_TOPIC = re.compile(r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
                      r"(?P<object_id>[a-zA-Z0-9_-]+)/config")


def _check_keys(where: str, mapping: dict[str, Any], schema: dict[str, tuple[type, ...]]) -> None:
    for key, value in mapping.items():
        assert key in schema, f"{where}: {key!r} is not a documented key"
        # bool is an int in Python; HA's int fields take no bool and its bool fields no int
        ok = isinstance(value, schema[key]) and not (
            isinstance(value, bool) and bool not in schema[key])
        assert ok, f"{where}: {key}={value!r} is not {schema[key]}"


def check_sensor_config(topic: str, config: dict[str, Any]) -> None:
    """Every rule HA's docs give for an MQTT sensor discovered with a device."""
    match = HA_TOPIC.fullmatch(topic.split("/", 1)[1])
    assert match and match["component"] == "sensor", topic
    _check_keys(topic, config, SENSOR_KEYS)
    assert "state_topic" in config, "state_topic is required"
    assert "platform" not in config, "platform belongs to device-based discovery only"
    assert not ("availability" in config and "availability_topic" in config)
    if "options" in config:
        assert config.get("device_class") == "enum", "options need device_class enum"
        assert config["options"] and all(isinstance(o, str) for o in config["options"])
        assert "state_class" not in config and "unit_of_measurement" not in config
    if config.get("device_class") is not None:
        assert config["device_class"] in SENSOR_DEVICE_CLASSES
    if "entity_category" in config:
        assert config["entity_category"] == "diagnostic", "sensors may only be diagnostic"
    assert config.get("qos", 0) in (0, 1, 2)
    device = config["device"]
    assert "unique_id" in config, "a device works only with a unique_id"
    _check_keys(f"{topic} device", device, DEVICE_KEYS)
    assert device.get("identifiers") or device.get("connections")
    assert all(isinstance(i, str) for i in device["identifiers"])
    origin = config["origin"]
    _check_keys(f"{topic} origin", origin, ORIGIN_KEYS)
    assert "name" in origin
    if "support_url" in origin:
        assert origin["support_url"].startswith(("http://", "https://"))


# --------------------------------------------------------------------------------------------
# Pure: ids, topics, configs


@given(ids, ids)
def test_two_different_user_ids_never_share_an_object_id(a: str, b: str) -> None:
    assert (object_id(a) == object_id(b)) == (a == b)
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", object_id(a))
    assert from_object_id(object_id(a)) == a


@given(ids, st.sampled_from(KINDS), ids, st.sampled_from(KINDS))
def test_config_topics_and_unique_ids_are_one_per_user_and_sensor(
        u1: str, k1: str, u2: str, k2: str) -> None:
    d = Discovery(Topics("presence"), origin=ORIGIN)
    same = (u1, k1) == (u2, k2)
    assert (d.config_topic(u1, k1) == d.config_topic(u2, k2)) == same
    assert (d.unique_id(u1, k1) == d.unique_id(u2, k2)) == same
    assert d.owner(d.unique_id(u1, k1)) == (u1, k1)


@given(ids, st.text(max_size=40))
def test_the_json_on_the_wire_is_the_config_whatever_the_name(user: str, name: str) -> None:
    d = Discovery(Topics("home/presence"), origin=ORIGIN)
    wire = d.payloads(user, name)
    assert [(t, json.loads(p)) for t, p in wire] == d.configs(user, name)


def test_object_ids_escape_dots_and_the_escape_itself() -> None:
    assert object_id("alice") == "alice"
    assert object_id("a.b") == "a_db"
    assert object_id("a_db") == "a__db"
    assert object_id("home/presence") == "home_spresence"
    with pytest.raises(ValueError):
        from_object_id("a_x")


def test_every_config_uses_only_documented_keys_with_their_types() -> None:
    for prefix in ("presence", "home/presence"):
        d = Discovery(Topics(prefix), origin={**ORIGIN, "support_url": "https://example.org/"})
        for user in ("alice", "a.b_c-d", "x" * 64):
            configs = d.configs(user, user)
            assert [t for t, _ in configs] == [d.config_topic(user, k) for k in KINDS]
            for topic, config in configs:
                check_sensor_config(topic, config)


def test_the_configs_say_what_the_design_promises() -> None:
    t = Topics("presence")
    configs = dict(Discovery(t, origin=ORIGIN).configs("alice", "alice"))
    by_kind = {k: configs[Discovery(t, origin=ORIGIN).config_topic("alice", k)] for k in KINDS}
    status = by_kind["status"]
    assert status["device_class"] == "enum" and status["options"] == list(STATUSES)
    assert status["state_topic"] == "presence/users/alice/status"
    assert by_kind["custom"]["state_topic"] == "presence/users/alice/custom"
    assert by_kind["primary"]["state_topic"] == "presence/users/alice/primary"
    seen = by_kind["last_seen"]
    assert seen["state_topic"] == "presence/users/alice/state"
    assert seen["device_class"] == "timestamp" and "lastSeen" in seen["value_template"]
    assert seen["enabled_by_default"] is False and seen["entity_category"] == "diagnostic"
    for config in by_kind.values():
        assert config["availability_topic"] == t.hub_status
        assert (config["payload_available"], config["payload_not_available"]) == (
            "online", "offline")  # what the hub publishes on P/hub/status
        assert config["device"]["identifiers"] == ["mqtt-presence:presence:alice"]
        assert config["origin"] == ORIGIN
    # stable: the same ids from a fresh object (a restart), different for another hub prefix
    again = Discovery(Topics("presence"), origin=ORIGIN)
    other = Discovery(Topics("office"), origin=ORIGIN)
    assert again.configs("alice", "alice") == Discovery(t, origin=ORIGIN).configs("alice", "alice")
    assert not ({u["unique_id"] for _, u in other.configs("alice", "alice")}
                & {c["unique_id"] for c in by_kind.values()})


def test_only_our_configs_of_unknown_users_are_stale() -> None:
    d = Discovery(Topics("presence"), origin=ORIGIN)
    known = {"alice"}
    alice = dict(d.payloads("alice", "alice"))
    ghost = dict(d.payloads("ghost", "ghost"))
    assert not any(d.is_stale(t, p, known) for t, p in alice.items())
    assert all(d.is_stale(t, p, known) for t, p in ghost.items())
    foreign = json.dumps({"unique_id": "zigbee2mqtt_0x1", "state_topic": "z/x"}).encode()
    topic = d.config_topic("ghost", "status")
    for payload in (foreign, b"", b"not json", b"[1]", b'{"unique_id": 5}'):
        assert not d.is_stale(topic, payload, known)
    # ours, for a known user, but not where we publish it (an old layout): stale
    assert d.is_stale(d.config_topic("alice", "custom"), alice[d.config_topic("alice", "status")],
                      known)


def _doc_section(path: Path, heading: str) -> str:
    text = path.read_text()
    assert heading in text, f"{path.name} has no section {heading!r}"
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def test_topics_md_shows_the_config_the_hub_publishes() -> None:
    section = _doc_section(ROOT / "topics.md", "## Home Assistant discovery")
    block = re.search(r"```text\n(.*?)```", section, re.S)
    assert block, "topics.md: no example config"
    example = json.loads(block.group(1))
    d = Discovery(Topics("presence"), origin=example["origin"])
    assert example == dict(d.configs("alice", "alice"))[d.config_topic("alice", "status")]
    for kind in KINDS:
        assert f"`{d.config_topic('{user}', kind)}`" in section


def test_the_flags_resolve_to_the_discovery_prefix_or_none() -> None:
    parser = build_parser()
    assert resolve(parser.parse_args([]), {})["homeassistant"] is None
    assert resolve(parser.parse_args(["--homeassistant"]), {})["homeassistant"] == "homeassistant"
    on = resolve(parser.parse_args(["--homeassistant-prefix", "ha/disc"]),
                 {"PRESENCE_HOMEASSISTANT": "true"})
    assert on["homeassistant"] == "ha/disc"
    with pytest.raises(UsageError, match="--homeassistant-prefix"):
        resolve(parser.parse_args(["--homeassistant", "--homeassistant-prefix", "a b"]), {})


# --------------------------------------------------------------------------------------------
# One presence-hub --homeassistant process on the embedded broker


HA_STATUS = "homeassistant/status"


def config_topic(user: str, kind: str = "status") -> str:
    return Discovery(Topics("presence"), origin=ORIGIN).config_topic(user, kind)


class HubWorld:
    def __init__(self, hub: HubProcess, port: int, watcher: Watcher) -> None:
        self.hub, self.port, self.watcher = hub, port, watcher
        self.devices: list[SimDevice] = []

    def device(self, user: str, device: str) -> SimDevice:
        d = SimDevice("127.0.0.1", self.port, user, device)
        self.devices.append(d)
        return d.online()

    def configs_seen(self, user: str) -> int:
        return sum(len(self.watcher.got(config_topic(user, k))) for k in KINDS)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubWorld]:
    tmp = tmp_path_factory.mktemp("ha")
    port = free_port()
    hub = HubProcess(["--broker", "embedded", "--listen", f"127.0.0.1:{port}",
                      "--storage", "memory", "--homeassistant"], tmp).start()
    watcher = Watcher("127.0.0.1", port)
    w = HubWorld(hub, port, watcher)
    try:
        watcher.start()
        watcher.subscribe("homeassistant/#")
        yield w
    finally:
        for d in w.devices:
            d.close()
        watcher.close()
        hub.stop()


@pytest.mark.slow
def test_configs_appear_for_a_new_user_and_its_status_follows(world: HubWorld) -> None:
    w = world.watcher
    phone = world.device("alice", "phone")
    wait_for(lambda: all(w.last(config_topic("alice", k)) for k in KINDS), what="4 configs")
    config = json.loads(w.last(config_topic("alice")) or b"")
    check_sensor_config(config_topic("alice"), config)
    assert config["state_topic"] == "presence/users/alice/status"
    world.watcher.wait_text("alice", "status", "online")
    phone.set(status="dnd", custom_status="In a meeting")
    world.watcher.wait_text("alice", "status", "dnd")
    custom = json.loads(w.last(config_topic("alice", "custom")) or b"")
    assert w.last(custom["state_topic"]) == b"In a meeting"
    assert w.last("presence/hub/status") == b"online"  # every entity is available
    assert world.configs_seen("alice") == len(KINDS)  # a status change republishes none


@pytest.mark.slow
def test_heartbeats_publish_no_config(world: HubWorld) -> None:
    laptop = world.device("bob", "laptop")
    wait_for(lambda: world.configs_seen("bob") == len(KINDS), what="bob's configs")
    for _ in range(20):
        laptop.heartbeat()
    laptop.set(status="away")  # QoS 1 behind the heartbeats: handled after them
    world.watcher.wait_text("bob", "status", "away")
    assert world.configs_seen("bob") == len(KINDS)


@pytest.mark.slow
def test_every_config_is_republished_when_home_assistant_comes_online(world: HubWorld) -> None:
    world.device("carol", "tablet")
    wait_for(lambda: world.configs_seen("carol") == len(KINDS), what="carol's configs")
    users = ("alice", "bob", "carol")
    before = {u: world.configs_seen(u) for u in users}
    ha = MqttClient("127.0.0.1", world.port).connect()
    try:
        ha.publish(HA_STATUS, b"online", qos=0)  # HA's birth: QoS 0, not retained
        wait_for(lambda: all(world.configs_seen(u) >= before[u] + len(KINDS) for u in users),
                 what="configs republished after HA's birth")
    finally:
        ha.disconnect()


# --------------------------------------------------------------------------------------------
# The service in this loop: removal, off, Mosquitto


@asynccontextmanager
async def running(broker: str, *, homeassistant: str | None = "homeassistant",
                  **options: Any) -> AsyncIterator[tuple[Any, MqttHub, int]]:
    """The service on ``broker`` (``embedded`` on a free port, or a URL) in this loop."""
    presence = create_presence_service(**options)
    if broker == "embedded":
        port = free_port()
        hub = attach_broker(presence, broker, homeassistant=homeassistant,
                            listen=f"127.0.0.1:{port}")
    else:
        port = int(broker.rpartition(":")[2])
        hub = attach_broker(presence, broker, homeassistant=homeassistant)
    async with presence:
        yield presence, hub, port


async def watch(port: int, *filters: str, login: tuple[str, str] | None = None) -> MqttClient:
    """A paho client; its blocking calls run in a thread, so this loop serves the hub."""
    client = MqttClient("127.0.0.1", port)
    if login is not None:
        client.paho.username_pw_set(*login)
    await asyncio.to_thread(client.connect)
    for f in filters:
        await asyncio.to_thread(client.subscribe, f)
    return client


async def test_configs_are_removed_with_the_user() -> None:
    async with running("embedded", storage="memory") as (presence, _hub, port):
        w = await watch(port, "homeassistant/#")
        try:
            await presence.set_device_status("dave", "phone", "online")
            await async_wait_for(lambda: all(w.last(config_topic("dave", k)) for k in KINDS),
                                 what="dave's configs")
            await presence.remove_user("dave")  # what /presence forget --yes does
            await async_wait_for(lambda: all(w.last(config_topic("dave", k)) == b""
                                             for k in KINDS), what="dave's configs cleared")
            # back again: a new user as far as HA is concerned
            await presence.set_device_status("dave", "phone", "online")
            await async_wait_for(lambda: all(w.last(config_topic("dave", k)) for k in KINDS),
                                 what="dave's configs again")
        finally:
            await asyncio.to_thread(w.close)


async def test_without_the_flag_nothing_goes_to_home_assistant() -> None:
    async with running("embedded", homeassistant=None, storage="memory") as (presence, hub,
                                                                            port):
        assert hub.discovery is None
        w = await watch(port, "homeassistant/#", "presence/users/#")
        try:
            await presence.set_device_status("erin", "phone", "online")
            await async_wait_for(lambda: w.last("presence/users/erin/status") == b"online",
                                 what="erin online")
            assert not [m for m in w.received if m[0].startswith("homeassistant/")]
        finally:
            await asyncio.to_thread(w.close)


#: accounts on Mosquitto: the hub, and Home Assistant as a watcher
ACCOUNTS = {"hub-main": ("hub", "hub-pw"), "ha": ("watcher", "ha-pw")}
#: what README and topics.md say to add to the exported ACL for Home Assistant
ACL_FOR_HA = """
user hub-main
topic readwrite homeassistant/#

user ha
topic read homeassistant/#
topic write homeassistant/status
"""


@pytest.fixture
def mosquitto_with_accounts(tmp_path: Path, mosquitto_factory: Any) -> MosquittoProcess:
    """Mosquitto with the accounts as ``presence-hub users export-mosquitto`` writes them, plus
    the lines the README gives for Home Assistant."""
    store = CredentialStore(tmp_path / "credentials.json")
    for name, (role, secret) in ACCOUNTS.items():
        store.put(name, role, secret, iterations=1000)  # type: ignore[arg-type]
    pw, acl = tmp_path / "presence.pw", tmp_path / "presence.acl"
    pw.write_text(mosquitto_password_file(store.accounts))
    acl.write_text(mosquitto_acl_file(store.accounts, "presence") + ACL_FOR_HA)
    proc: MosquittoProcess = mosquitto_factory(
        f"allow_anonymous false\npassword_file {pw}\nacl_file {acl}")
    return proc


@pytest.mark.slow
async def test_on_mosquitto_stale_configs_go_at_start_and_a_birth_republishes(
        mosquitto_with_accounts: MosquittoProcess, tmp_path: Path) -> None:
    mosq = mosquitto_with_accounts
    db = str(tmp_path / "presence.json")
    before = create_presence_service(storage="tinydb", db_path=db)
    async with before:  # alice is a user the hub knows from its store
        await before.set_device_status("alice", "phone", "online")
    d = Discovery(Topics("presence"), origin=ORIGIN)
    foreign = "homeassistant/sensor/presence/someone_else/config"
    seed = await watch(mosq.port, login=("hub-main", "hub-pw"))
    try:
        for topic, payload in [*d.payloads("alice", "alice"), *d.payloads("ghost", "ghost"),
                               (foreign, b'{"unique_id":"other-tool-1","state_topic":"x/y"}')]:
            await asyncio.to_thread(seed.publish, topic, payload, 1, True)
    finally:
        await asyncio.to_thread(seed.disconnect)
    # Home Assistant's account sees the configs and the values, and announces itself
    w = await watch(mosq.port, "homeassistant/#", "presence/users/#", login=("ha", "ha-pw"))
    try:
        await async_wait_for(lambda: w.last(config_topic("ghost")), what="the seeded configs")
        url = f"mqtt://hub-main:hub-pw@127.0.0.1:{mosq.port}"
        async with running(url, storage="tinydb", db_path=db) as (presence, hub, _):
            ha = hub.discovery
            assert isinstance(ha, HomeAssistant)
            await asyncio.wait_for(ha.stale_checked.wait(), 5)
            assert ha.stale_removed == len(KINDS)
            await async_wait_for(lambda: all(w.last(config_topic("ghost", k)) == b""
                                             for k in KINDS), what="ghost's configs cleared")
            assert all(w.last(config_topic("alice", k)) for k in KINDS)
            assert w.last(foreign)  # not ours: left alone
            # HA's birth on the external broker, heard on the hub's own link: all again
            seen = len(w.got(config_topic("alice")))
            await asyncio.to_thread(w.publish, HA_STATUS, b"online", 0)
            await async_wait_for(lambda: len(w.got(config_topic("alice"))) > seen,
                                 what="alice's config republished")
            assert ha.births == 1
            await presence.set_device_status("frank", "laptop", "online")
            await async_wait_for(lambda: w.last(config_topic("frank")), what="frank's config")
            await async_wait_for(lambda: w.last("presence/users/frank/status") == b"online",
                                 what="frank's status, readable by HA's account")
    finally:
        await asyncio.to_thread(w.close)


def test_readme_gives_the_acl_lines_tested_above() -> None:
    section = _doc_section(ROOT / "README.md", "## Home Assistant")
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", section, re.S | re.M)
    assert [b for lang, b in blocks if "homeassistant/#" in b] == [
        ACL_FOR_HA.lstrip("\n").replace("hub-main", "HUB")]


async def test_the_embedded_broker_with_accounts_says_home_assistant_cannot_use_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CredentialStore(tmp_path / "credentials.json")
    store.put("ha", "watcher", "ha-pw", iterations=1000)
    presence = create_presence_service(storage="memory")
    hub = attach_broker(presence, "embedded", listen=f"127.0.0.1:{free_port()}",
                        credentials=store, homeassistant="homeassistant")
    with caplog.at_level(logging.WARNING, logger="hub.mqtt.homeassistant"):
        async with presence:
            ha = hub.discovery
            assert isinstance(ha, HomeAssistant) and ha.client is None
    assert "no account may read or write homeassistant/#" in caplog.text
