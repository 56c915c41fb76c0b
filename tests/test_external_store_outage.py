"""Never deaf during a store outage, on an external broker (issue 11, defect 6).

The hub acks a durable QoS 1 message (activity, set, ack) only once the flush that persisted
it is done. While the store cannot be written those acks are held, Mosquitto's in-flight
window for the hub (``max_inflight_messages``, 20) fills, and Mosquitto then withholds every
further QoS 1 message from that connection. When wills, births and commands shared it, the
hub heard none of them until the store was back. They now come on a second connection of the
hub that acks at once; the durable kinds still wait for the store, and nothing of them is lost
or doubled when it returns.

Real processes throughout: a Mosquitto, the hub as a ``presence-hub`` process on TinyDB, paho
devices. The store fails for real: its folder is a bind mount remounted read-only (root with
CAP_SYS_ADMIN; elsewhere the test skips).
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import MosquittoProcess
from tests.support.wait import wait_for
from tests.test_external_faults import (
    HUB_STATUS,
    World,
    activity,
    ask,
    assert_nothing_left_for_the_hub,
    channels_logged,
)

pytestmark = pytest.mark.slow

#: more activity than Mosquitto's default in-flight window for one client (20)
BEYOND_THE_WINDOW = 30


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


class ReadOnlySwitch:
    """A folder bound onto itself, whose bind can be made read-only and writable again:
    writes in it then fail with EROFS, even for root, as on a file system gone read-only."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read_only(self) -> None:
        _mount("-o", "remount,bind,ro", str(self.folder))

    def writable(self) -> None:
        _mount("-o", "remount,bind,rw", str(self.folder))


@pytest.fixture
def store_switch(tmp_path: Path) -> Iterator[ReadOnlySwitch]:
    folder = tmp_path / "store"
    folder.mkdir()
    try:
        _mount("--bind", str(folder), str(folder))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot mount here ({exc}; {detail.decode(errors='replace').strip()})")
    try:
        yield ReadOnlySwitch(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


@pytest.fixture
def world(mosquitto: MosquittoProcess, tmp_path: Path) -> Iterator[World]:
    w = World(mosquitto, tmp_path)
    try:
        yield w
    finally:
        w.close()


def test_wills_and_commands_are_heard_while_the_store_is_read_only(
    world: World, store_switch: ReadOnlySwitch
) -> None:
    """30 activities while the TinyDB folder is read-only fill the hub's in-flight window at
    Mosquitto. Before the live connection, the will of a device killed then never reached the
    hub (the device stayed online) and a ``/presence`` request got no reply. Now both are
    handled during the outage, and once the store is writable again every activity is logged
    exactly once and acked (the broker holds nothing more for the hub's session)."""
    watcher = world.watcher()
    # heartbeat timeout 12.5 s: within the test's deadlines only the will takes a device off
    hub = world.hub("a", "--db", str(store_switch.folder / "presence.json"),
                    "--heartbeat-interval", "5s").start()
    wait_for(lambda: watcher.last(HUB_STATUS) == b"online", what="hub online")
    pc = world.live("alice", "pc")
    phone = world.live("alice", "phone")
    watcher.wait_device("alice", "phone", "online")
    watcher.wait_device("alice", "pc", "online")

    store_switch.read_only()
    try:
        sent = [f"outage-{i:02d}" for i in range(BEYOND_THE_WINDOW)]
        for channel in sent:
            activity(pc, channel)
        wait_for(lambda: re.search(r"cannot write|store.*fail", hub.output()),
                 timeout=10, what="a failed store write in the hub's log")

        phone.kill()  # its socket goes: Mosquitto publishes its will
        # the will grace is 1 s by default; a deaf hub hears no will
        watcher.wait_device("alice", "phone", "offline", timeout=5)
        reply = ask(world, "alice", "/presence", timeout=8)
        assert reply["ok"], reply
        assert watcher.device_status("alice", "pc") == "online"
    finally:
        store_switch.writable()

    def all_logged() -> list[str] | None:
        got = [c for c in channels_logged(world, "alice") if c.startswith("outage-")]
        return got if len(got) >= len(sent) else None

    # the 10 beyond the window come once the first 20 are acked, and need a flush of their own
    outage = wait_for(all_logged, timeout=15, what="every activity of the outage in the log")
    assert outage is not None
    assert sorted(outage) == sent, f"lost or doubled: {sorted(outage)}"
    pc.close()
    assert hub.stop() == 0
    assert_nothing_left_for_the_hub(world, "presence/devices/alice/pc/activity")


def test_the_single_filter_an_older_hub_left_in_its_session_is_dropped(world: World) -> None:
    """An older hub subscribed its persistent session to ``P/devices/+/+/+``; Mosquitto keeps
    that subscription. Left there, a request would come on both connections of the hub and be
    answered twice; the hub unsubscribes it on connecting."""
    old = world.client(client_id="presence-hub", clean_session=False)
    old.connect()
    old.subscribe("presence/devices/+/+/+", 1)
    wait_for(lambda: old.subacks, what="the old subscription in place")
    old.disconnect()
    watcher = world.watcher()
    hub = world.hub("a").start()
    wait_for(lambda: watcher.last(HUB_STATUS) == b"online", what="hub online")

    device = f"cli-{uuid.uuid4().hex[:6]}"
    requester = world.client().connect()
    replies = f"presence/replies/alice/{device}"
    requester.subscribe(replies, 1)
    wait_for(lambda: requester.subacks, what="the requester subscribed")
    ids = [uuid.uuid4().hex, uuid.uuid4().hex]
    for rid in ids:
        requester.publish(f"presence/devices/alice/{device}/req",
                          json.dumps({"id": rid, "command": "/presence"}).encode(), qos=1)
        # Mosquitto sends every copy of a request when it gets it, so a second copy of the
        # first would be in the hub before the second request is even published
        wait_for(lambda: any(json.loads(r).get("id") == rid  # noqa: B023 - waited on here
                             for r in requester.got(replies)),
                 timeout=8, what="the hub's reply")
    answered = [json.loads(r)["id"] for r in requester.got(replies)]
    assert answered == ids, f"answered: {answered}"
    assert hub.stop() == 0
