"""A restarted hub republishes its users' retained state only when the broker may lack it.

At a million devices a republish is millions of QoS 1 messages and most of a restart. The hub
skips it when the broker kept the hub's session and the digest the last run left on
``presence/hub/retained`` at its clean stop matches what the store loaded (see
``MqttHub.broker_holds_loaded_state``). These tests run the hub as a real process on a real
Mosquitto, restarted with and without persistence, and check what a watcher sees: whether the
retained state came again, and that it is there and right either way.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.hub_process import HubProcess
from tests.support.mqtt_clients import MqttClient, SimDevice, Watcher
from tests.support.procs import MosquittoProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.slow

HUB_STATUS = "presence/hub/status"
DIGEST = "presence/hub/retained"
STATE = "presence/users/{}/state"
KEPT = "nothing to republish"
REPUBLISHED = "republished the retained state of"


class Setup:
    """One Mosquitto, one hub (its TinyDB file kept across restarts) and its clients."""

    def __init__(self, broker: MosquittoProcess, tmp_path: Path) -> None:
        self.broker = broker
        workdir = tmp_path / "hub"
        workdir.mkdir()
        self.hub = HubProcess(
            ["--broker", broker.url, "--storage", "tinydb", "--db", str(workdir / "db.json"),
             "--heartbeat-interval", "500ms", "--away-after", "5m", "--offline-after", "1h",
             "--flush-interval", "200ms"], workdir)
        self.clients: list[MqttClient] = []

    def watcher(self) -> Watcher:
        w = Watcher(self.broker.host, self.broker.port)
        self.clients.append(w)
        return w.start()

    def device(self, user: str, device: str) -> SimDevice:
        d = SimDevice(self.broker.host, self.broker.port, user, device,
                      client_id=f"sim-{user}-{device}-{uuid.uuid4().hex[:6]}")
        self.clients.append(d)
        return d

    def start_hub(self) -> int:
        """Start the hub; the index of its first log line of this run."""
        first = len(self.hub.lines)
        self.hub.start()
        return first

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.hub.close()


@pytest.fixture
def kept(mosquitto: MosquittoProcess, tmp_path: Path) -> Iterator[Setup]:
    s = Setup(mosquitto, tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def forgetful(mosquitto_factory: Callable[..., MosquittoProcess],
              tmp_path: Path) -> Iterator[Setup]:
    s = Setup(mosquitto_factory("persistence false\n"), tmp_path)
    try:
        yield s
    finally:
        s.close()


def first_run(s: Setup, before_the_end: Callable[[], None] = lambda: None) -> Watcher:
    """alice with a custom status, bob seen and gone; both offline (no device is connected
    while brokers restart), the hub stopped cleanly. ``before_the_end`` runs while the hub
    still runs, before bob leaves."""
    watcher = s.watcher()
    s.start_hub()
    wait_for(lambda: watcher.last(HUB_STATUS) == b"online", what="hub online")
    alice = s.device("alice", "phone").online()
    alice.set(customStatus="on call")
    watcher.wait_text("alice", "custom", "on call")
    alice.clean_offline()
    bob = s.device("bob", "pc").online()
    watcher.wait_status("bob", "online")
    before_the_end()
    bob.clean_offline()
    watcher.wait_status("bob", "offline")
    assert s.hub.stop() == 0
    wait_for(lambda: watcher.last(HUB_STATUS) == b"offline", what="hub offline")
    digest = watcher.last(DIGEST)
    assert digest is not None and b'"users":2' in digest, digest
    return watcher


def assert_retained_state(s: Setup) -> None:
    """What a client subscribing now gets: every user's retained topics, as they were."""
    fresh = s.watcher()
    fresh.wait_text("alice", "custom", "on call")
    fresh.wait_status("alice", "offline")
    fresh.wait_status("bob", "offline")
    state = fresh.state("bob")
    assert state is not None and [d["id"] for d in state["devices"]] == ["pc"]


def run_lines(s: Setup, first: int) -> str:
    return "\n".join(s.hub.lines[first:])


def test_a_hub_restart_on_a_broker_that_kept_everything_republishes_nothing(kept: Setup) -> None:
    """The broker (persistent, itself restarted while the hub was down) kept the session and
    the retained topics: the restarted hub sends none of them again, and what it publishes
    next continues from the versions the broker holds."""
    first_run(kept)
    kept.broker.restart()  # with persistence: its session and retained messages survive
    watcher = kept.watcher()  # from before the hub starts: the retained state, once
    watcher.wait_text("alice", "custom", "on call")
    version = (watcher.state("alice") or {})["version"]
    first = kept.start_hub()
    kept.hub.wait_line(KEPT, after=first)
    assert REPUBLISHED not in run_lines(kept, first)
    assert_retained_state(kept)
    # a change after the restart: one new state, nothing republished before it
    phone = kept.device("alice", "phone")
    phone.connect()
    phone.set(customStatus="back")
    watcher.wait_text("alice", "custom", "back")
    states = watcher.got(STATE.format("alice"))
    assert len(states) == 2, states  # the retained one at subscription, then the change
    assert (watcher.state("alice") or {})["version"] == version + 1
    phone.disconnect()
    assert kept.hub.stop() == 0
    wait_for(lambda: len(watcher.got(DIGEST)) == 2, what="the digest of the second run")
    assert b'"users":2' in (watcher.last(DIGEST) or b"")


def test_a_broker_restarted_without_persistence_gets_everything_again(forgetful: Setup) -> None:
    """The broker forgot the session, the retained state and the digest: all republished."""
    first_run(forgetful)
    forgetful.broker.restart()
    first = forgetful.start_hub()
    forgetful.hub.wait_line(REPUBLISHED, after=first)
    assert KEPT not in run_lines(forgetful, first)
    assert_retained_state(forgetful)


def test_a_crashed_hub_republishes_with_new_versions(kept: Setup) -> None:
    """A SIGKILLed hub may have published versions its store never saw: the next start moves
    every version ahead and republishes, although the broker still holds the digest that the
    clean stop before the crash left."""
    watcher = first_run(kept)
    kept.start_hub()
    wait_for(lambda: watcher.got(HUB_STATUS)[-1:] == [b"online"], what="hub online again")
    version = (watcher.state("bob") or {})["version"]
    kept.hub.kill()
    first = kept.start_hub()
    kept.hub.wait_line(REPUBLISHED, after=first)
    assert KEPT not in run_lines(kept, first)
    wait_for(lambda: (watcher.state("bob") or {}).get("version", 0) > version,
             what="bob republished above the versions before the crash")
    assert_retained_state(kept)


def test_a_store_restored_from_an_older_copy_republishes(kept: Setup) -> None:
    """The digest names the state the broker holds; a store that says otherwise (an older
    copy of the file put back while the hub was down) is the truth, and is republished."""
    db = Path(kept.hub.args[kept.hub.args.index("--db") + 1])
    older = db.with_name("older.json")

    def keep_a_copy() -> None:  # bob online, as the file says once the hub flushed it
        wait_for(lambda: db.exists() and b'"status":"online"' in db.read_bytes(),
                 what="bob online in the file")
        older.write_bytes(db.read_bytes())

    first_run(kept, keep_a_copy)
    older.replace(db)
    first = kept.start_hub()
    kept.hub.wait_line(REPUBLISHED, after=first)
    assert KEPT not in run_lines(kept, first)
    assert_retained_state(kept)  # bob offline again: his retained clean stop came after
