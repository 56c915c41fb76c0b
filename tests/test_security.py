"""Security and hostile input (issue #5): accounts, topic grants, secure defaults, TLS, limits.

The hub runs in-process on a thread of its own (its embedded amqtt broker on a free port on
127.0.0.1) so the test can read its state directly; devices are real paho clients. One test
runs a real Mosquitto with the password and ACL files the hub exports.

Each hole measured in amqtt 0.12.1's own plugins has a test here that would fail if it came
back: the ``a/#``-within-``a/+`` subscription check, wills past the ACL, retained messages
past the receive check, and client-id take-over before authentication.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from amqtt.plugins.topic_checking import TopicAccessControlListPlugin

from hub import PresenceService, create_presence_service
from hub.app.factory import attach_broker
from hub.auth import (
    PBKDF2_ITERATIONS,
    AccessPolicy,
    CredentialsError,
    CredentialStore,
    Grant,
    grant_for,
    hash_password,
    verify_password,
)
from hub.broker import BrokerError, EmbeddedBroker
from hub.cli import main as hub_main
from hub.cli.run import CounterReport
from hub.cli.settings import build_parser, resolve
from hub.cli.users import users_main
from hub.mqtt import EmbeddedTransport
from hub.protocol import ConnPayload, Topics
from hub.protocol.matching import filter_within, topic_matches
from tests.support.mqtt_clients import MqttClient, SimDevice
from tests.support.procs import find_binary, free_port
from tests.support.wait import wait_for

HOST = "127.0.0.1"
T = Topics("presence")
PASSWORDS = {
    "alice/phone": "alice-phone-pw",
    "alice/laptop": "alice-laptop-pw",
    "bob/laptop": "bob-laptop-pw",
    "ha": "watcher-pw",
    "presence-hub": "hub-pw",
}
ROLES = {"ha": "watcher", "presence-hub": "hub"}


# ------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def accounts_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One credentials file for the module (PBKDF2 at the real cost: ~80 ms per account)."""
    path = tmp_path_factory.mktemp("accounts") / "credentials.json"
    store = CredentialStore(path)
    for name, password in PASSWORDS.items():
        store.put(name, ROLES.get(name, "device"), password)  # type: ignore[arg-type]
    return path


@pytest.fixture
def accounts(accounts_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "data" / "credentials.json"
    path.parent.mkdir()
    shutil.copy(accounts_template, path)
    path.chmod(0o600)
    return path


class HubThread:
    """The hub (service + embedded broker) on its own event loop thread.

    Sync tests can then use blocking paho helpers; :meth:`call` runs a function on the hub's
    loop (the engine is single-threaded) and returns its result.
    """

    def __init__(self, credentials: Path | None, *, allow_anonymous: bool | None = None,
                 tls: tuple[str, str] | None = None, **service: Any) -> None:
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self._credentials = credentials
        self._allow_anonymous = allow_anonymous
        self._tls = tls
        self._service_options = {"storage": "memory", **service}
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.service: PresenceService | None = None
        self.broker: EmbeddedBroker | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HubThread:
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(ready)),
                                        name="hub", daemon=True)
        self._thread.start()
        wait_for(ready.is_set, 10, "hub thread to start")
        if self.error is not None:
            raise self.error
        return self

    async def _main(self, ready: threading.Event) -> None:
        try:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            service = create_presence_service(**self._service_options)
            tls = {}
            if self._tls:
                tls = {"tls_listen": f"{HOST}:{self.tls_port}", "tls_cert": self._tls[0],
                       "tls_key": self._tls[1]}
            hub = attach_broker(
                service, "embedded", listen=f"{HOST}:{self.port}",
                credentials=str(self._credentials) if self._credentials else None,
                allow_anonymous=self._allow_anonymous, **tls,
            )
            async with service:
                self.service = service
                transport = hub.transport
                assert isinstance(transport, EmbeddedTransport)
                self.broker = transport.broker
                ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self.error = exc
            ready.set()

    def call(self, fn: Callable[[], Any]) -> Any:
        assert self.loop is not None

        async def run() -> Any:
            result = fn()
            return await result if inspect.isawaitable(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def state(self, user: str) -> Any:
        assert self.service is not None
        service = self.service
        return self.call(lambda: service.engine.snapshot(user))

    def status(self, user: str) -> str | None:
        state = self.state(user)
        return None if state is None else str(state.status)

    def custom(self, user: str) -> str | None:
        state = self.state(user)
        return None if state is None else state.custom_status

    def refused(self) -> dict[str, int]:
        assert self.broker is not None
        broker = self.broker
        return dict(self.call(lambda: dict(broker.refused)))

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
            assert not self._thread.is_alive(), "hub thread did not stop"


class Client(MqttClient):
    """A paho client that records CONNACK and SUBACK codes (refusals are what we test)."""

    def __init__(self, port: int, username: str | None = None, password: str | None = None,
                 client_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(HOST, port, client_id=client_id, **kwargs)
        if username is not None:
            self.paho.username_pw_set(username, password)
        self.connack: list[str] = []
        self.suback_codes: dict[int, list[int]] = {}
        self.paho.on_connect = self._on_connect
        self.paho.on_subscribe = self._on_sub

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        self.connack.append(str(rc))

    def _on_sub(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any = None) -> None:
        self.suback_codes[mid] = [getattr(c, "value", c) for c in codes]
        self.subacks.append(mid)

    def attempt(self) -> str:
        """Connect and return the CONNACK text ("Success", "Not authorized", ...)."""
        self.paho.connect(self.host, self.port, keepalive=30)
        self._thread = threading.Thread(target=self._run, name=self.client_id, daemon=True)
        self._thread.start()
        wait_for(lambda: self.connack, what=f"CONNACK for {self.client_id}")
        return self.connack[0]

    def sub(self, topic_filter: str) -> int:
        """Subscribe and return the granted QoS, or 128 (0x80) if refused."""
        _rc, mid = self.paho.subscribe(topic_filter, 1)
        wait_for(lambda: mid in self.suback_codes, what=f"SUBACK for {topic_filter}")
        return self.suback_codes[mid][0]


class Device(SimDevice):
    def __init__(self, port: int, user: str, device: str, password: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(HOST, port, user, device, **kwargs)
        username = f"{user}/{device}"
        self.paho.username_pw_set(username, password or PASSWORDS[username])


@pytest.fixture
def made() -> Iterator[list[MqttClient]]:
    clients: list[MqttClient] = []
    yield clients
    for client in clients:
        client.close()


@pytest.fixture
def hub(accounts: Path) -> Iterator[HubThread]:
    h = HubThread(accounts, heartbeat_interval_ms=1000).start()
    try:
        yield h
    finally:
        h.stop()


def device(hub: HubThread, made: list[MqttClient], user: str, dev: str, **kw: Any) -> Device:
    d = Device(hub.port, user, dev, **kw)
    made.append(d)
    return d


def client(hub: HubThread, made: list[MqttClient], username: str | None = None,
           password: str | None = None, **kw: Any) -> Client:
    c = Client(hub.port, username, password if password is not None else PASSWORDS.get(
        username or ""), **kw)
    made.append(c)
    return c


# ------------------------------------------------------------------------------------------
# Topic filters and grants (no network)


@pytest.mark.parametrize(("inner", "outer", "within"), [
    ("cmd/dev1/+", "cmd/dev1/+", True),
    ("cmd/dev1/x", "cmd/dev1/+", True),
    ("cmd/dev1/#", "cmd/dev1/+", False),  # amqtt's ACL plugin grants this
    ("cmd/dev1/+/x", "cmd/dev1/+", False),
    ("cmd/+/x", "cmd/dev1/+", False),
    ("cmd/dev1", "cmd/dev1/#", True),  # "a/#" matches "a" itself
    ("cmd/dev1/+", "cmd/dev1/#", True),
    ("cmd/#", "cmd/dev1/#", False),
    ("#", "presence/#", False),
    ("$SYS/x", "#", False),
    ("presence/users/alice/+", "presence/users/alice/+", True),
    ("presence/users/+/status", "presence/users/alice/+", False),
])
def test_filter_within(inner: str, outer: str, within: bool) -> None:
    assert filter_within(inner, outer) is within


def test_amqtt_acl_plugin_still_has_the_wildcard_hole() -> None:
    # Pinned: if amqtt fixes this, its plugin may become an option again.
    assert TopicAccessControlListPlugin.topic_ac("cmd/dev1/#", "cmd/dev1/+") is True
    assert filter_within("cmd/dev1/#", "cmd/dev1/+") is False


@pytest.mark.parametrize(("topic", "topic_filter", "match"), [
    ("a/b", "a/+", True), ("a", "a/#", True), ("a/b/c", "a/+", False), ("$SYS/x", "#", False),
    ("a/b", "+/+", True), ("a", "a/+", False), ("a/b", "a/b", True), ("a/bc", "a/b", False),
])
def test_topic_matches(topic: str, topic_filter: str, match: bool) -> None:
    assert topic_matches(topic, topic_filter) is match


def test_compiled_grant_matchers_agree_with_the_spec() -> None:
    filters = ["#", "+", "a", "a/+", "a/#", "a/b", "+/b", "a/+/c", "a/b/#", "$SYS/#", "+/#"]
    topics = ["a", "a/b", "a/b/c", "a/", "a//b", "b/b", "/a", "$SYS/x", "ab", "a/bc/c", ""]
    for f in filters:
        grant = Grant("t", publish=(f,), read=(f,))
        for t in topics:
            assert grant.may_receive(t) is grant.may_publish(t) is topic_matches(t, f), (t, f)


def test_grants_of_each_role(accounts: Path) -> None:
    store = CredentialStore(accounts)
    dev = grant_for(store.get("alice/phone"), "presence")
    assert dev.may_publish("presence/devices/alice/phone/conn")
    assert not dev.may_publish("presence/devices/alice/laptop/conn")  # another device
    assert not dev.may_publish("presence/devices/alice/phone/conn/x")
    assert not dev.may_publish("presence/users/alice/status")
    for topic in ("presence/users/alice/state", "presence/events/alice",
                  "presence/replies/alice/phone", "presence/hub/status",
                  "presence/devices/alice/phone/conn"):  # its own births: a second agent?
        assert dev.may_receive(topic), topic
    for topic in ("presence/users/bob/state", "presence/events/bob",
                  "presence/replies/alice/laptop", "presence/devices/alice/laptop/conn",
                  "presence/devices/alice/phone/activity"):
        assert not dev.may_receive(topic), topic
    assert dev.may_subscribe("presence/users/alice/+")
    assert not dev.may_subscribe("presence/users/+/status")
    assert not dev.may_subscribe("presence/#")

    watcher = grant_for(store.get("ha"), "presence")
    assert watcher.may_subscribe("presence/users/#") and watcher.may_subscribe("presence/events/+")
    assert not watcher.may_publish("presence/users/alice/status")
    assert not watcher.may_receive("presence/replies/alice/phone")

    hub = grant_for(store.get("presence-hub"), "presence")
    assert hub.may_publish("presence/users/alice/status") and hub.may_subscribe("presence/#")
    assert not hub.may_publish("other/topic")

    assert grant_for(store.get("alice/phone"), "home/presence").may_publish(
        "home/presence/devices/alice/phone/heartbeat")


# ------------------------------------------------------------------------------------------
# Passwords and the credentials file


def test_hashes_are_mosquitto_pbkdf2_both_ways(tmp_path: Path) -> None:
    ours = hash_password("s3cret")
    assert ours.startswith(f"$7${PBKDF2_ITERATIONS}$")
    assert verify_password("s3cret", ours) and not verify_password("s3cret!", ours)
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        pytest.skip("mosquitto_passwd not installed")
    pwfile = tmp_path / "pw"
    subprocess.run([passwd, "-c", "-b", str(pwfile), "alice/phone", "s3cret"], check=True,
                   timeout=10, capture_output=True)
    theirs = pwfile.read_text().strip().split(":", 1)[1]
    assert theirs.startswith("$7$")
    assert verify_password("s3cret", theirs) and not verify_password("nope", theirs)
    assert not verify_password("s3cret", "$6$garbage") and not verify_password("x", "")


def test_credentials_file_is_private_atomic_and_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "creds" / "credentials.json"
    store = CredentialStore(path)
    assert len(store) == 0 and not path.exists()
    assert store.put("alice/phone", "device", "pw-1", iterations=1000) is True
    assert path.stat().st_mode & 0o777 == 0o600
    assert "pw-1" not in path.read_text()
    assert store.put("alice/phone", "device", "pw-2", iterations=1000) is False  # new password
    assert verify_password("pw-2", CredentialStore(path).get("alice/phone").password_hash)  # type: ignore[union-attr]
    with pytest.raises(CredentialsError, match="already a device account"):
        store.put("alice/phone", "watcher", "x")
    with pytest.raises(ValueError, match="invalid user id"):
        from hub.auth import device_username
        device_username("a/b", "c")
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []

    # a broken file is an error, never "no accounts" (which would open the broker)
    path.write_text("{not json")
    with pytest.raises(CredentialsError, match="cannot read"):
        CredentialStore(path)
    path.write_text(json.dumps({"version": 1, "accounts": {"x": {"role": "device",
                                                                 "hash": "$7$1$AA==$AA=="}}}))
    with pytest.raises(CredentialsError, match="not USER/DEVICE"):
        CredentialStore(path)
    # ... and a running broker that sees it break keeps the accounts it had
    path.unlink()
    store = CredentialStore(path)
    store.put("bob/laptop", "device", "pw", iterations=1000)
    policy = AccessPolicy("presence", store)
    path.write_text("{half-written")
    policy.refresh()
    assert policy.auth_required and store.get("bob/laptop") is not None


def test_users_command_add_list_remove_export(tmp_path: Path) -> None:
    env = {"PRESENCE_DB": str(tmp_path / "data" / "presence.json")}
    creds = tmp_path / "data" / "credentials.json"

    class Tty(StringIO):
        def isatty(self) -> bool:
            return True

    out = StringIO()
    assert users_main(["add", "alice", "phone"], stdin=Tty(), env=env, out=out) == 0
    generated = out.getvalue().split("password: ")[1].split()[0]
    assert len(generated) >= 20
    assert verify_password(generated, CredentialStore(creds).get("alice/phone").password_hash)  # type: ignore[union-attr]
    out = StringIO()
    assert users_main(["add", "bob", "laptop"], stdin=StringIO("piped-pw\n"), env=env,
                      out=out) == 0
    assert "piped-pw" not in out.getvalue()  # a password we did not make is never echoed
    assert users_main(["add-hub", "--password", "hub-pw"], env=env, out=StringIO()) == 0
    assert users_main(["add-watcher", "ha"], stdin=StringIO(""), env=env, out=StringIO()) == 2
    out = StringIO()
    assert users_main(["list"], env=env, out=out) == 0
    listing = out.getvalue()
    assert "alice/phone" in listing and "presence-hub  hub" in listing and "$7$" not in listing
    assert creds.stat().st_mode & 0o777 == 0o600
    assert users_main(["remove", "bob", "laptop"], env=env, out=StringIO()) == 0
    assert users_main(["remove", "bob", "laptop"], env=env, out=StringIO()) == 1
    pw, acl = tmp_path / "mosq.pw", tmp_path / "mosq.acl"
    assert users_main(["export-mosquitto", "--password-file", str(pw), "--acl-file", str(acl)],
                      env=env, out=StringIO()) == 0
    assert pw.stat().st_mode & 0o777 == 0o600
    lines = pw.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice/phone", "presence-hub"]
    assert all(line.split(":", 1)[1].startswith("$7$") for line in lines)
    text = acl.read_text()
    assert "user alice/phone\ntopic write presence/devices/alice/phone/+\n" in text
    assert "topic read presence/users/alice/+" in text
    assert "user presence-hub\ntopic readwrite presence/#" in text


def test_new_settings_are_flags_env_and_file(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "--allow-anonymous", "--device-rate", "off", "--max-payload-bytes", "16KiB",
        "--tls-cert", "c.pem", "--tls-key", "k.pem", "--db", str(tmp_path / "x" / "p.json"),
    ])
    settings = resolve(args, {"PRESENCE_DEVICE_BURST": "7", "PRESENCE_ACTIVITY_MAX_AGE": "2d",
                              "PRESENCE_MAX_CUSTOM_STATUS": "40"})
    assert settings["allow_anonymous"] is True and settings["device_rate"] is None
    assert settings["max_payload_bytes"] == 16384 and settings["device_burst"] == 7
    assert settings["activity_max_age"] == 2 * 86_400_000 and settings["max_custom_status"] == 40
    assert settings["credentials"] == str(tmp_path / "x" / "credentials.json")
    defaults = resolve(build_parser().parse_args([]), {})
    assert defaults["allow_anonymous"] is None and defaults["device_rate"] == 20.0
    assert defaults["max_payload_bytes"] == 65536 and defaults["stats_interval"] == 60_000
    from hub.cli.settings import UsageError
    for bad in (["--device-rate", "fast"], ["--max-payload-bytes", "1GB"], ["--tls-cert", "c"]):
        with pytest.raises(UsageError):
            resolve(build_parser().parse_args(bad), {})


# ------------------------------------------------------------------------------------------
# Secure defaults


async def test_open_broker_refuses_a_public_address_unless_told(accounts: Path) -> None:
    with pytest.raises(BrokerError, match=r"refusing to listen on 0\.0\.0\.0: no accounts"):
        await EmbeddedBroker("0.0.0.0", 0).start()
    for broker in (EmbeddedBroker("0.0.0.0", 0, allow_anonymous=True),
                   EmbeddedBroker("0.0.0.0", 0, credentials=CredentialStore(accounts))):
        await broker.start()
        await broker.stop()


def test_cli_refuses_a_public_address_with_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = hub_main(["--broker", "embedded", "--listen", f"0.0.0.0:{free_port()}",
                     "--storage", "memory", "--db", str(tmp_path / "presence.json")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("presence-hub: refusing to listen on 0.0.0.0")


def test_first_account_turns_authentication_on_without_restart(
    tmp_path: Path, made: list[MqttClient]
) -> None:
    creds = tmp_path / "credentials.json"
    hub = HubThread(creds).start()
    try:
        assert client(hub, made).attempt() == "Success"  # open: no accounts yet
        CredentialStore(creds).put("alice/phone", "device", "pw", iterations=1000)
        assert client(hub, made).attempt() == "Not authorized"
        assert client(hub, made, "alice/phone", "pw").attempt() == "Success"
    finally:
        hub.stop()


# ------------------------------------------------------------------------------------------
# Logins


def test_logins_wrong_unknown_anonymous_refused_and_never_logged(
    hub: HubThread, made: list[MqttClient], caplog: pytest.LogCaptureFixture
) -> None:
    assert client(hub, made, "alice/phone", "wrong-pw-123").attempt() == "Bad user name or password"
    assert client(hub, made, "mallory/phone", "x").attempt() == "Bad user name or password"
    assert client(hub, made, "alice/phone", "").attempt() == "Bad user name or password"
    assert client(hub, made).attempt() == "Not authorized"  # anonymous, even on localhost
    assert client(hub, made, "alice/phone").attempt() == "Success"
    assert hub.refused() == {"bad_password": 2, "unknown_user": 1, "anonymous": 1}
    assert "wrong-pw-123" not in caplog.text and PASSWORDS["alice/phone"] not in caplog.text
    assert "wrong password for alice/phone" in caplog.text


def test_anonymous_allowed_with_accounts_is_read_only(
    accounts: Path, made: list[MqttClient]
) -> None:
    hub = HubThread(accounts, allow_anonymous=True).start()
    try:
        alice = device(hub, made, "alice", "phone").online()
        wait_for(lambda: hub.status("alice") == "online", what="alice online")
        anon = client(hub, made)
        assert anon.attempt() == "Success"
        assert anon.sub("presence/users/#") == 1
        wait_for(lambda: anon.last("presence/users/alice/status") == b"online", what="status")
        anon.publish("presence/devices/alice/phone/set", b'{"status":"dnd"}')
        anon.publish("presence/users/alice/status", b"offline", retain=True)
        watcher = client(hub, made, "ha")  # a watcher account: read-only as well
        assert watcher.attempt() == "Success"
        watcher.publish("presence/users/alice/status", b"offline", retain=True)
        alice.set(customStatus="marker")
        wait_for(lambda: hub.custom("alice") == "marker", what="alice's own set")
        assert hub.status("alice") == "online"
        assert anon.got("presence/users/alice/status") == [b"online"]  # no forged update
        assert hub.refused()["forbidden_publish"] == 3
    finally:
        hub.stop()


# ------------------------------------------------------------------------------------------
# Whose topics


def test_bob_cannot_touch_alice(hub: HubThread, made: list[MqttClient]) -> None:
    alice = device(hub, made, "alice", "phone").online()
    bob = device(hub, made, "bob", "laptop").online()
    wait_for(lambda: hub.status("alice") == "online" and hub.status("bob") == "online",
             what="both online")
    before = hub.state("alice")
    forged = ConnPayload(state="offline", session=alice.session, reason="disconnect").to_json()
    for topic, payload in [
        (T.device("alice", "phone", "conn"), forged),
        (T.device("alice", "phone", "set"), b'{"status":"dnd","customStatus":"hacked"}'),
        (T.device("alice", "newdev", "activity"), b'{"type":"message"}'),
        (T.user("alice", "status"), b"offline"),
        (T.events("alice"), b'{"event":"offline"}'),
        (T.reply("alice", "phone"), b'{"id":"x","ok":true,"text":"phish"}'),
        (T.hub_status, b"offline"),
    ]:
        bob.publish(topic, payload, qos=1, retain=topic.endswith(("conn", "status")))
    bob.set(customStatus="marker")  # same connection, so handled after all of the above
    wait_for(lambda: hub.custom("bob") == "marker", what="bob's own set")
    assert hub.state("alice") == before
    assert hub.refused()["forbidden_publish"] == 7
    # nothing was retained either: a fresh subscriber of alice sees the hub's state
    other = device(hub, made, "alice", "laptop")
    other.connect()
    other.subscribe(T.user_filter("alice"))
    other.subscribe(T.hub_status)
    wait_for(lambda: other.last(T.user("alice", "status")) == b"online", what="retained status")
    wait_for(lambda: other.last(T.hub_status) == b"online", what="hub status")


def test_a_device_reads_only_its_own_user(hub: HubThread, made: list[MqttClient]) -> None:
    device(hub, made, "bob", "laptop").online()
    wait_for(lambda: hub.status("bob") == "online", what="bob online")
    alice = Client(hub.port, "alice/phone", PASSWORDS["alice/phone"])
    made.append(alice)
    assert alice.attempt() == "Success"
    refused = 0x80
    assert alice.sub("presence/#") == refused
    assert alice.sub("presence/users/+/status") == refused
    assert alice.sub("presence/users/bob/+") == refused
    assert alice.sub("presence/replies/alice/laptop") == refused
    assert alice.sub("presence/devices/#") == refused
    assert alice.sub("presence/users/alice/+") == 1
    assert alice.sub("presence/replies/alice/phone") == 1
    assert alice.sub("presence/hub/status") == 1
    wait_for(lambda: alice.last("presence/hub/status") == b"online", what="hub status")
    assert not [m for m in alice.received if "/bob" in m[0]]
    assert hub.refused()["forbidden_subscribe"] == 5


def test_receive_check_holds_even_for_a_wider_subscription(
    hub: HubThread, made: list[MqttClient]
) -> None:
    # A subscription the grant would refuse can still exist (a session restored or made by
    # another plugin); amqtt's retained-on-subscribe path skips its own receive check.
    bob = device(hub, made, "bob", "laptop").online()
    wait_for(lambda: hub.status("bob") == "online", what="bob online")
    alice = Client(hub.port, "alice/phone", PASSWORDS["alice/phone"], client_id="alice-wide")
    made.append(alice)
    assert alice.attempt() == "Success"
    assert hub.broker is not None
    amqtt_broker = hub.broker._broker
    assert amqtt_broker is not None

    async def widen() -> None:
        session = amqtt_broker.sessions["alice-wide"][0]
        amqtt_broker.subscriptions.setdefault("presence/#", []).append((session, 1))
        await amqtt_broker._publish_retained_messages_for_subscription(("presence/#", 1), session)

    hub.call(widen)
    bob.set(customStatus="now")  # live messages about bob go past alice too
    wait_for(lambda: hub.custom("bob") == "now", what="bob's custom status")
    alice.sub("presence/users/alice/+")  # a marker: SUBACK after the broadcasts above
    wait_for(lambda: alice.last("presence/hub/status") == b"online", what="retained hub status")
    assert [m[0] for m in alice.received if "bob" in m[0]] == []
    assert hub.refused()["forbidden_receive"] >= 4  # bob's retained state, status, ...


def test_will_of_another_device_is_refused_at_connect(
    hub: HubThread, made: list[MqttClient]
) -> None:
    alice = device(hub, made, "alice", "phone").online()
    wait_for(lambda: hub.status("alice") == "online", what="alice online")
    forger = Client(hub.port, "bob/laptop", PASSWORDS["bob/laptop"])
    made.append(forger)
    will = ConnPayload(state="offline", session=alice.session, reason="lost").to_json()
    forger.paho.will_set(T.device("alice", "phone", "conn"), will, qos=1, retain=True)
    assert forger.attempt() == "Not authorized"
    assert hub.refused() == {"forbidden_will": 1}
    wild = Client(hub.port, "bob/laptop", PASSWORDS["bob/laptop"])  # its own, but a wildcard
    made.append(wild)
    wild.paho.will_set("presence/devices/bob/laptop/+", b"x")
    assert wild.attempt() == "Not authorized"
    assert hub.refused() == {"forbidden_will": 1, "bad_will": 1}
    assert hub.status("alice") == "online"
    # its own will is fine, and goes out when it dies
    bob = device(hub, made, "bob", "laptop").online()
    wait_for(lambda: hub.status("bob") == "online", what="bob online")
    bob.kill()
    wait_for(lambda: hub.status("bob") == "offline", what="bob's own will")
    assert hub.status("alice") == "online"


def test_client_id_cannot_be_taken_over_without_or_with_another_login(
    hub: HubThread, made: list[MqttClient]
) -> None:
    alice = device(hub, made, "alice", "phone", client_id="presence-agent/alice/phone").online()
    wait_for(lambda: hub.status("alice") == "online", what="alice online")
    # amqtt alone drops alice's connection before it even checks the password
    intruder = client(hub, made, "alice/phone", "wrong", client_id="presence-agent/alice/phone")
    assert intruder.attempt() == "Bad user name or password"
    anon = client(hub, made, client_id="presence-agent/alice/phone")
    assert anon.attempt() == "Not authorized"
    # a valid login of another account may not take the id over either
    bob = client(hub, made, "bob/laptop", client_id="presence-agent/alice/phone")
    assert bob.attempt() == "Client identifier not valid"  # CONNACK 2
    alice.heartbeat()
    alice.set(customStatus="still here")
    wait_for(lambda: hub.custom("alice") == "still here", what="alice still connected")
    assert alice.paho.is_connected() and not alice.disconnected
    assert hub.status("alice") == "online"
    assert hub.refused() == {"bad_password": 1, "anonymous": 1, "client_id_taken": 1}
    # the same account may (a device reconnecting before the old socket timed out)
    again = device(hub, made, "alice", "phone", client_id="presence-agent/alice/phone").online()
    wait_for(lambda: alice.disconnected, what="old connection dropped")
    assert again.paho.is_connected()


def test_oversized_packets_close_the_connection_large_payloads_are_dropped(
    hub: HubThread, made: list[MqttClient]
) -> None:
    alice = device(hub, made, "alice", "phone").online()
    wait_for(lambda: hub.status("alice") == "online", what="alice online")
    assert hub.service is not None
    service = hub.service
    # over the payload limit but within the packet limit: dropped by the hub, connection kept
    alice.publish(alice.topic("activity"), b'{"type":"x","data":"' + b"a" * 70_000 + b'"}')
    wait_for(lambda: hub.call(lambda: service.rejected["too_large"]) == 1, what="too_large")
    assert alice.paho.is_connected()
    # over the packet limit: the connection is closed and its will says "lost"
    alice.paho.publish(alice.topic("activity"), b"a" * 200_000, qos=0)
    wait_for(lambda: alice.disconnected, what="connection closed by the broker")
    wait_for(lambda: hub.status("alice") == "offline", what="alice offline by will")
    assert hub.refused()["too_large"] == 1


def test_hub_drops_what_the_sender_may_not_write(hub: HubThread) -> None:
    # The last line of defence, for any path that skips the broker's checks.
    assert hub.broker is not None and hub.service is not None
    broker, service = hub.broker, hub.service
    bob = grant_for(CredentialStore(broker.policy.credentials.path).get("bob/laptop"),  # type: ignore[union-attr]
                    "presence")
    hub.call(lambda: broker._deliver(T.device("alice", "phone", "set"), b'{"status":"dnd"}', 1,
                                     False, "bob", bob))
    hub.call(lambda: broker._deliver(T.device("alice", "phone", "set"), b'{"status":"dnd"}', 1,
                                     False, "nobody", None))
    assert hub.refused() == {"hub_dropped": 2}
    assert hub.status("alice") is None and hub.call(lambda: sum(service.rejected.values())) == 0


# ------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    openssl = find_binary("openssl", "apt-get install openssl")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=30)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
            "-subj", f"/CN=test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return {name: str(d / f"{name}.pem") for name in ("ca", "other-ca", "server")} | {
        "key": str(d / "server.key")}


def test_agent_and_presence_command_over_tls(
    accounts: Path, certs: dict[str, str], tmp_path: Path
) -> None:
    from device_agent.agent import PresenceAgent
    from device_agent.command import ask_hub
    from device_agent.config import AgentConfig

    hub = HubThread(accounts, tls=(certs["server"], certs["key"]),
                    heartbeat_interval_ms=1000).start()
    try:
        assert hub.broker is not None and hub.broker.tls_url == f"mqtts://{HOST}:{hub.tls_port}"

        def config(ca: str, **extra: Any) -> AgentConfig:
            values: dict[str, Any] = {
                "broker": f"mqtts://alice%2Flaptop:{PASSWORDS['alice/laptop']}@{HOST}:{hub.tls_port}",
                "ca_file": ca, "user": "alice", "device": "laptop", "idle_source": "none",
                "heartbeat_interval": "1s", "outbox": str(tmp_path / "outbox.sqlite3"),
                "reconnect_min": "50ms", "reconnect_max": "300ms", **extra,
            }
            return AgentConfig.from_values(**values)

        agent = PresenceAgent(config(certs["ca"]))
        agent.start()
        try:
            assert agent.wait_connected(10), "agent did not connect over TLS"
            wait_for(lambda: hub.status("alice") == "online", what="alice online over TLS")
            reply = ask_hub(config(certs["ca"]), "/presence", 5)
            assert reply.ok and "online" in reply.text
            wait_for(lambda: agent.state is not None and agent.state.status == "online",
                     what="the agent reads its user's state over TLS")
        finally:
            agent.stop()
            agent.close()
        # a broker certificate from another CA is not accepted
        from device_agent.errors import BrokerUnavailable

        with pytest.raises(BrokerUnavailable, match="certificate"):
            ask_hub(config(certs["other-ca"]), "/presence", 3)
        # plain MQTT on the TLS port gets nowhere
        plain = Client(hub.tls_port or 0, "alice/laptop", PASSWORDS["alice/laptop"])
        try:
            plain.paho.connect(HOST, hub.tls_port or 0, keepalive=5)
            plain._thread = threading.Thread(target=plain._run, daemon=True)
            plain._thread.start()
            wait_for(lambda: plain.disconnected or plain.connack, what="plain client ended")
            assert plain.connack in ([], ["Unspecified error"]) and not plain.paho.is_connected()
        finally:
            plain.close()
        # TLS 1.2 or newer, server authentication only (amqtt alone also allows TLS 1.0)
        ctx = ssl.create_default_context(cafile=certs["ca"])
        with socket.create_connection((HOST, hub.tls_port or 0), timeout=3) as sock, \
                ctx.wrap_socket(sock, server_hostname=HOST) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        from hub.broker.embedded import _HubBroker

        server_ctx = _HubBroker._create_ssl_context({"certfile": certs["server"],
                                                     "keyfile": certs["key"]})
        assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert server_ctx.verify_mode == ssl.CERT_NONE
    finally:
        hub.stop()


# ------------------------------------------------------------------------------------------
# Counters


def test_counter_report_sums_dropped_engine_and_broker(hub: HubThread,
                                                       made: list[MqttClient]) -> None:
    assert hub.service is not None and hub.broker is not None
    service, broker = hub.service, hub.broker

    report = CounterReport(service, SimpleNamespace(transport=SimpleNamespace(broker=broker)))
    assert client(hub, made, "alice/phone", "nope").attempt() == "Bad user name or password"
    hub.call(lambda: service.ingest([("presence/devices/alice/phone/set", b"not json")]))
    first = hub.call(report.since_last)
    assert first["dropped"] == {"bad_payload": 1}
    assert first["broker refused"] == {"bad_password": 1}
    assert hub.call(report.since_last) == {"dropped": {}, "engine": {}, "broker refused": {}}


# ------------------------------------------------------------------------------------------
# The same accounts on a real Mosquitto


def test_exported_files_work_on_mosquitto(
    accounts: Path, tmp_path: Path, mosquitto_factory: Any, made: list[MqttClient]
) -> None:
    env = {"PRESENCE_CREDENTIALS": str(accounts)}
    pw, acl = tmp_path / "mosq.pw", tmp_path / "mosq.acl"
    assert users_main(["export-mosquitto", "--password-file", str(pw), "--acl-file", str(acl)],
                      env=env, out=StringIO()) == 0
    mosq = mosquitto_factory(f"allow_anonymous false\npassword_file {pw}\nacl_file {acl}\n")
    port = mosq.port

    def login(username: str | None, password: str | None = None, **kw: Any) -> Client:
        c = Client(port, username, password if password is not None else PASSWORDS.get(
            username or ""), **kw)
        made.append(c)
        return c

    assert login("alice/phone", "wrong").attempt() == "Not authorized"  # Mosquitto says 5
    assert login(None).attempt() == "Not authorized"

    async def run_hub() -> None:
        service = create_presence_service(
            storage="memory", broker=f"mqtt://presence-hub:{PASSWORDS['presence-hub']}@{HOST}:{port}")
        async with service:
            await stop.wait()
            states.update({u: service.engine.snapshot(u) for u in ("alice", "bob")})

    states: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(run_hub(),), daemon=True)
    thread.start()
    try:
        watcher = login("ha")
        assert watcher.attempt() == "Success"
        assert watcher.sub("presence/users/#") == 1
        alice = Device(port, "alice", "phone")
        made.append(alice)
        alice.online()
        wait_for(lambda: watcher.last("presence/users/alice/status") == b"online",
                 what="the hub's account publishes alice's state")
        bob = Device(port, "bob", "laptop")
        made.append(bob)
        bob.online()
        wait_for(lambda: watcher.last("presence/users/bob/status") == b"online", what="bob")
        bob.subscribe("presence/#")  # Mosquitto grants it, and filters each delivery
        # Measured with Mosquitto 2.0.11: a denied PUBLISH (any QoS) closes the sender's
        # connection ("Bad socket read/write ... Unknown error" in its log). So each forgery
        # comes from a connection of its own, logged in as bob's device.
        for n, (topic, payload, retain) in enumerate([
            (T.device("alice", "phone", "set"), b'{"status":"dnd"}', False),
            (T.user("alice", "status"), b"offline", True),
            (T.events("alice"), b'{"event":"offline"}', False),
        ]):
            rogue = login("bob/laptop", client_id=f"rogue-{n}")
            assert rogue.attempt() == "Success"
            rogue.paho.publish(topic, payload, qos=1, retain=retain)
            wait_for(lambda r=rogue: r.disconnected, what="Mosquitto closing the forger")  # type: ignore[misc]
        bob.set(customStatus="marker")
        wait_for(lambda: b'"marker"' in (watcher.last("presence/users/bob/state") or b""),
                 what="bob's own set through Mosquitto")
        assert watcher.last("presence/users/alice/status") == b"online"
        assert watcher.got("presence/users/alice/status") == [b"online"]
        assert not [m for m in bob.received if "/alice" in m[0]]
        assert any(m[0] == "presence/users/bob/state" for m in bob.received)
        # a will on another device's topic: Mosquitto accepts the login but never sends it
        forger = login("bob/laptop", client_id="forger")
        forger.paho.will_set(T.device("alice", "phone", "conn"), ConnPayload(
            state="offline", session=alice.session, reason="lost").to_json(), qos=1)
        forger.attempt()
        forger.kill()
        bob.set(customStatus="marker2")
        wait_for(lambda: b'"marker2"' in (watcher.last("presence/users/bob/state") or b""),
                 what="second marker")
        assert watcher.last("presence/users/alice/status") == b"online"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
    assert states["alice"].status == "online" and states["alice"].custom_status is None
