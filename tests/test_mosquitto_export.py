"""The exported Mosquitto files on a real Mosquitto: client ids, and what differs from the hub's
embedded broker (issue 11, defect 14).

Why: ``presence-hub users export-mosquitto`` promises the same accounts and rules on Mosquitto,
and operators rely on the README's account of where the two brokers answer differently. The
embedded broker refuses a client id held by another account (CONNACK 2); with the files alone
Mosquitto 2.0 hands the id over and closes the holder's connection, so ``bob/desk`` could
disconnect ``alice/laptop`` or the hub (whose client id, ``presence-hub``, is no secret). These
tests pin both what the files cannot do and the listener setting that closes it.

Timing: a takeover happens before Mosquitto answers the newcomer's CONNECT, so once the
newcomer has its CONNACK, a QoS 1 round trip on the old connection tells whether it survived;
nothing here waits a fixed time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from hub import create_presence_service
from hub.auth import CredentialStore
from hub.auth.mosquitto import mosquitto_conf
from hub.cli.users import users_main
from hub.protocol import ConnPayload, Topics, new_session_id
from tests.support.mqtt_clients import MqttClient, SimDevice
from tests.support.procs import MosquittoProcess, free_port
from tests.support.wait import wait_for

HOST = "127.0.0.1"
T = Topics("presence")
ACCOUNTS = {
    "alice/laptop": ("device", "alice-laptop-pw"),
    "bob/desk": ("device", "bob-desk-pw"),
    "ha": ("watcher", "ha-pw"),
    # not named like its client id, so the log shows which of the two Mosquitto used
    "hub-main": ("hub", "hub-pw"),
}


def password(username: str) -> str:
    return ACCOUNTS[username][1]


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One accounts file for the module (PBKDF2 at its real cost, ~80 ms an account)."""
    path = tmp_path_factory.mktemp("accounts") / "credentials.json"
    store = CredentialStore(path)
    for name, (role, secret) in ACCOUNTS.items():
        store.put(name, role, secret)  # type: ignore[arg-type]
    return path


@pytest.fixture
def exported(credentials: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The password and ACL files, written by the export command itself."""
    pw, acl = tmp_path / "presence.pw", tmp_path / "presence.acl"
    out = StringIO()
    assert users_main(["export-mosquitto", "--password-file", str(pw), "--acl-file", str(acl)],
                      env={"PRESENCE_CREDENTIALS": str(credentials)}, out=out) == 0
    return pw, acl


class Login(MqttClient):
    """A paho client logged in as an account, recording its CONNACK and SUBACK answers."""

    def __init__(self, port: int, username: str | None, secret: str | None = None,
                 client_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(HOST, port, client_id=client_id, **kwargs)
        if username is not None:
            self.paho.username_pw_set(username, secret if secret is not None else password(username))
        self.connack: list[str] = []
        self.session_present: list[bool] = []
        self.granted: dict[int, int] = {}
        self.paho.on_connect = self._connected
        self.paho.on_subscribe = self._granted

    def _connected(self, _c: Any, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        self.session_present.append(bool(flags.session_present))
        self.connack.append(str(rc))

    def _granted(self, _c: Any, _u: Any, mid: int, codes: list[Any], _p: Any) -> None:
        self.granted[mid] = int(codes[0].value)

    def attempt(self) -> str:
        """Connect and return Mosquitto's answer as paho names it ("Success", ...)."""
        self.paho.connect(self.host, self.port, keepalive=30)
        self._thread = threading.Thread(target=self._run, name=self.client_id, daemon=True)
        self._thread.start()
        wait_for(lambda: self.connack, what=f"CONNACK for {self.client_id}")
        return self.connack[0]

    def grant(self, topic_filter: str) -> int:
        """Subscribe; the QoS granted, or 128 for a refusal."""
        with self._io:
            _rc, mid = self.paho.subscribe(topic_filter, 1)
        assert mid is not None, f"not connected: cannot subscribe to {topic_filter}"
        wait_for(lambda: mid in self.granted, what=f"SUBACK for {topic_filter}")
        return self.granted[mid]


class Agent(SimDevice):
    """A device as the agent connects: its client id carries the connection's session id."""

    def __init__(self, port: int, user: str, device: str) -> None:
        session = new_session_id()
        super().__init__(HOST, port, user, device,
                         client_id=f"presence-agent/{user}/{device}/{session}")
        self.first_session = session
        self.paho.username_pw_set(f"{user}/{device}", password(f"{user}/{device}"))

    def start(self) -> Agent:
        self.online(self.first_session)
        return self


def survives(client: MqttClient, topic: str) -> bool:
    """Whether ``client``'s connection is still open: one QoS 1 round trip, or its close."""
    with client._io:
        info = client.paho.publish(topic, b"{}", qos=1)
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        return False  # closed already
    wait_for(lambda: client.disconnected or info.is_published(),
             what=f"PUBACK or close for {client.client_id}")
    return not client.disconnected


@pytest.fixture
def clients() -> Iterator[list[MqttClient]]:
    made: list[MqttClient] = []
    yield made
    for client in made:
        client.close()


def broker(factory: Callable[..., MosquittoProcess], conf: str) -> MosquittoProcess:
    return factory(conf)


# ------------------------------------------------------------------------------------------
# Client ids


def test_with_the_files_alone_mosquitto_hands_a_known_client_id_to_another_account(
    exported: tuple[Path, Path], mosquitto_factory: Callable[..., MosquittoProcess],
    clients: list[MqttClient],
) -> None:
    """What the README warns about: the password and ACL files cannot prevent it, and a
    taken hub id costs the hub the messages Mosquitto was keeping for it."""
    mosq = broker(mosquitto_factory, mosquitto_conf(*exported))
    hub = Login(mosq.port, "hub-main", client_id="presence-hub", clean_session=False)
    alice = Agent(mosq.port, "alice", "laptop").start()
    clients += [hub, alice]
    assert hub.attempt() == "Success"
    assert hub.grant("presence/devices/#") == 1
    hub.kill()  # the hub is down; Mosquitto queues for its session
    alice.activity("telegram-123")  # acknowledged by Mosquitto
    for victim_id in ("presence-hub", alice.client_id):
        bob = Login(mosq.port, "bob/desk", client_id=victim_id)
        clients.append(bob)
        assert bob.attempt() == "Success"
    wait_for(lambda: alice.disconnected, what="Mosquitto closing alice's agent for bob")
    back = Login(mosq.port, "hub-main", client_id="presence-hub", clean_session=False)
    clients.append(back)
    assert back.attempt() == "Success"
    assert back.session_present == [False]  # bob's clean login ended the hub's session
    assert back.grant("presence/devices/#") == 1
    marker = T.device("alice", "laptop", "heartbeat")
    back.publish(marker, b"marker", qos=1)
    wait_for(lambda: back.got(marker) == [b"marker"], what="the marker")
    # queued messages would have come before the marker: the activity is gone
    assert T.device("alice", "laptop", "activity") not in [t for t, *_ in back.received]
    assert f"Client {alice.client_id} already connected, closing old connection" in mosq.log_text()


def test_client_id_is_username_stops_takeovers_across_accounts(
    exported: tuple[Path, Path], mosquitto_factory: Callable[..., MosquittoProcess],
    clients: list[MqttClient],
) -> None:
    devices_port, hub_port = free_port(), free_port()
    mosq = broker(mosquitto_factory, mosquitto_conf(
        *exported, client_id_is_username=True,
        listener=f"{devices_port} {HOST}", hub_listener=f"{hub_port} {HOST}",
    ))
    hub = Login(hub_port, "hub-main", client_id="presence-hub", clean_session=False)
    alice = Agent(devices_port, "alice", "laptop").start()
    clients += [hub, alice]
    assert hub.attempt() == "Success"
    for victim_id in (alice.client_id, "presence-hub"):
        bob = Login(devices_port, "bob/desk", client_id=victim_id)
        clients.append(bob)
        assert bob.attempt() == "Success"  # let in, under his own name
        assert survives(alice, T.device("alice", "laptop", "heartbeat"))
        assert survives(hub, T.hub_status)
    log = mosq.log_text()
    closed = [line.split(": ", 1)[1] for line in log.splitlines() if "already connected" in line]
    # bob's second login closed his first one; nobody else's was touched
    assert closed == ["Client bob/desk already connected, closing old connection."]
    # The hub's listener left the hub its own client id (and so its persistent session).
    assert "as presence-hub (p2, c0" in log and "u'hub-main'" in log
    # The cost: one connection per account. A second login of alice's device (the presence
    # command beside her agent) closes the agent's connection.
    command = Login(devices_port, "alice/laptop", client_id="laptop-cli-1234")
    clients.append(command)
    assert command.attempt() == "Success"
    wait_for(lambda: alice.disconnected, what="the command closing alice's agent")


def test_no_account_can_read_the_session_ids_in_other_agents_client_ids(
    exported: tuple[Path, Path], mosquitto_factory: Callable[..., MosquittoProcess],
    clients: list[MqttClient],
) -> None:
    """Without ``use_username_as_clientid`` an agent's client id is only as safe as its
    session id is secret: only the agent and the hub may read the ``conn`` topic naming it,
    and nothing the hub publishes repeats it."""
    mosq = broker(mosquitto_factory, mosquitto_conf(*exported))
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def run_hub() -> None:
        service = create_presence_service(
            storage="memory", broker=f"mqtt://hub-main:{password('hub-main')}@{HOST}:{mosq.port}")
        async with service:
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run_hub(),), daemon=True)
    thread.start()
    try:
        watcher = Login(mosq.port, "ha")
        bob_sees = Login(mosq.port, "bob/desk")
        clients += [watcher, bob_sees]
        assert watcher.attempt() == "Success" and bob_sees.attempt() == "Success"
        for topic_filter in ("#", "$SYS/#"):  # Mosquitto grants both and filters each delivery
            assert watcher.grant(topic_filter) == 1 and bob_sees.grant(topic_filter) == 1
        bob = Agent(mosq.port, "bob", "desk").start()
        alice = Agent(mosq.port, "alice", "laptop").start()
        clients += [bob, alice]
        alice.start_heartbeats(0.2)
        alice.activity("telegram-123")
        wait_for(lambda: watcher.last(T.user("alice", "status")) == b"online", what="alice")
        wait_for(lambda: bob_sees.last(T.user("bob", "status")) == b"online", what="bob's own")
        alice.stop_heartbeats()
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
    secret = alice.first_session.encode()
    assert any(payload for _t, payload, _q, _r in watcher.received)
    assert not [t for t, payload, _q, _r in watcher.received if secret in payload]
    assert not [t for t, payload, _q, _r in bob_sees.received if secret in payload]


# ------------------------------------------------------------------------------------------
# Where Mosquitto answers differently from the embedded broker (README, "Mosquitto")


def test_mosquitto_answers_as_the_readme_says(
    exported: tuple[Path, Path], mosquitto_factory: Callable[..., MosquittoProcess],
    clients: list[MqttClient],
) -> None:
    """The embedded broker's answers to the same attempts are pinned in test_security."""
    mosq = broker(mosquitto_factory, mosquitto_conf(*exported))

    def login(username: str | None, secret: str | None = None, **kw: Any) -> Login:
        client = Login(mosq.port, username, secret, **kw)
        clients.append(client)
        return client

    # A wrong password: CONNACK 5, where the embedded broker says 4.
    assert login("alice/laptop", "wrong").attempt() == "Not authorized"
    assert login(None).attempt() == "Not authorized"  # no login: 5 on both
    # A subscription beyond the grant: granted (the embedded broker answers 0x80), and
    # nothing on it is ever delivered.
    bob = login("bob/desk")
    assert bob.attempt() == "Success"
    assert bob.grant(T.user("alice", "status")) == 1
    assert bob.grant(T.user("bob", "status")) == 1
    # A will on another device's topic: let in, where the embedded broker refuses with
    # CONNACK 5 (Mosquitto drops the will when it would fire: test_security).
    forger = login("bob/desk", client_id="forger")
    forger.paho.will_set(T.device("alice", "laptop", "conn"), ConnPayload(
        state="offline", session="x", reason="lost").to_json(), qos=1, retain=True)
    assert forger.attempt() == "Success"
    hub = login("hub-main")
    assert hub.attempt() == "Success"
    hub.publish(T.user("alice", "status"), b"online", qos=1, retain=True)
    hub.publish(T.user("bob", "status"), b"online", qos=1, retain=True)
    # Deliveries keep publish order: once bob has his own status, alice's was filtered.
    wait_for(lambda: bob.last(T.user("bob", "status")) == b"online", what="bob's own status")
    assert bob.last(T.user("alice", "status")) is None


def test_the_hub_logs_in_under_an_id_no_other_account_can_guess(
    exported: tuple[Path, Path], mosquitto_factory: Callable[..., MosquittoProcess],
    clients: list[MqttClient], tmp_path: Path,
) -> None:
    """With the files alone (the default export), taking over the hub's session needs its
    client id: derived from its login, so another account cannot take it."""
    from hub.mqtt.external import hub_client_id
    from hub.protocol import BrokerURL
    from tests.support.hub_process import HubProcess

    mosq = broker(mosquitto_factory, mosquitto_conf(*exported))
    url = f"mqtt://hub-main:{password('hub-main')}@{HOST}:{mosq.port}"
    expected = hub_client_id(BrokerURL.parse(url))
    assert expected.startswith("presence-hub-") and len(expected) == len("presence-hub-") + 16
    assert expected != hub_client_id(BrokerURL.parse(url.replace("hub-pw", "other-pw")))
    assert hub_client_id(BrokerURL.parse(f"mqtt://{HOST}:1883")) == "presence-hub"
    hub = HubProcess(["--broker", url, "--storage", "memory"], tmp_path).start()
    try:
        wait_for(lambda: f"as {expected}" in hub.output(), what="the hub's client id in its log")
        bob = Login(mosq.port, "bob/desk", client_id="presence-hub")  # the id that was known
        clients.append(bob)
        assert bob.attempt() == "Success"
        alice = Agent(mosq.port, "alice", "laptop").start()
        clients.append(alice)
        wait_for(lambda: f"{expected} already connected" not in mosq.log_text()
                 and "presence-hub" in mosq.log_text(), what="both connections logged")
        assert "link to the MQTT broker" not in hub.output()  # never dropped: kept its session
    finally:
        hub.close()
