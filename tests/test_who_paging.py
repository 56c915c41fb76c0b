"""``who`` a page at a time from a sorted index of present users (issue 16, item 5).

The index (hub.core.sortedset) is built in bounded steps while the set keeps changing, so
these tests shrink its step sizes to go through every phase of a build with a few hundred ids,
and change the set between steps: after a build the order must hold exactly the members.
"""

from __future__ import annotations

import random

import pytest

from hub.app.commands import run_command
from hub.app.factory import create_presence_service
from hub.core import sortedset
from hub.core.clock import FakeClock
from hub.core.engine import Engine, EngineConfig
from hub.core.events import ActivityEvent, Birth, DeviceOffline, RemoveUser
from hub.core.sortedset import SortedIdSet

T0 = 1_000_000


@pytest.fixture
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of 8, pairs merged up to 32 ids, the last merge and the replay 16 a step."""
    monkeypatch.setattr(sortedset, "RUN", 8)
    monkeypatch.setattr(sortedset, "MERGE", 32)
    monkeypatch.setattr(sortedset, "STEP", 16)
    monkeypatch.setattr(sortedset, "BUCKET", 4)


def _build(s: SortedIdSet, between: object = None) -> int:
    steps = 0
    while not s.build_step():
        steps += 1
        if callable(between):
            between()
    return steps


@pytest.mark.parametrize("seed", range(5))
def test_order_is_exact_after_a_build_the_set_changed_during(small_steps: None, seed: int) -> None:
    rnd = random.Random(seed)
    universe = [f"id{i:04d}" for i in range(400)]
    s = SortedIdSet.over(set(rnd.sample(universe, 250)))
    model = set(s)

    def churn() -> None:  # a few adds and removals between two steps, re-adds included
        for _ in range(rnd.randrange(4)):
            x = rnd.choice(universe)
            if rnd.random() < 0.5:
                s.add(x)
                model.add(x)
            else:
                s.discard(x)
                model.discard(x)

    assert _build(s, churn) > 20  # every phase ran in several steps
    assert list(s.after(None)) == sorted(model)
    for _ in range(300):  # kept in order once built, buckets split and emptied
        churn()
    assert set(s) == model and len(s) == len(model)
    assert list(s.after(None)) == sorted(model)
    for cut in ("", "id0100", "id0399", "id9", rnd.choice(universe)):
        assert list(s.after(cut)) == sorted(x for x in model if x > cut)


def test_an_empty_set_builds_and_pages(small_steps: None) -> None:
    s = SortedIdSet()
    _build(s)
    assert list(s.after(None)) == [] and list(s.after("x")) == []
    s.add("b")
    s.add("a")
    s.discard("b")
    s.discard("zz")
    assert list(s.after(None)) == ["a"]


def _engine_with(users: int) -> Engine:
    engine = Engine(EngineConfig(heartbeat_interval_ms=1000, away_after_ms=5000,
                                 offline_after_ms=20_000))
    for i in range(users):
        engine.handle(Birth(f"u{i:03d}", "d", "s"), T0)
        if i % 3 == 0:
            engine.handle(ActivityEvent(f"u{i:03d}", "message", "d", "tg", T0), T0)
    return engine


def _walk(engine: Engine, channel: str | None, limit: int, scan: int) -> list[str]:
    """Every page of ``online_page``, going on from its cursor when a scan stops short."""
    while not engine.index_present():
        pass
    got: list[str] = []
    after: str | None = None
    while True:
        page, cursor = engine.online_page(channel, T0, limit, after, scan=scan)
        while cursor is not None and len(page) < limit:
            more, cursor = engine.online_page(channel, T0, limit - len(page), cursor, scan=scan)
            page += more
        got += [u.user_id for u in page]
        if len(page) < limit:
            return got
        after = page[-1].user_id


@pytest.mark.parametrize(("channel", "limit", "scan"), [(None, 7, 5000), ("tg", 4, 5),
                                                         ("tg", 50, 3), ("nobody", 3, 4)])
def test_pages_list_every_present_user_once_in_order(small_steps: None, channel: str | None,
                                                      limit: int, scan: int) -> None:
    engine = _engine_with(60)
    for i in range(0, 60, 7):  # some leave: the index follows
        engine.handle(DeviceOffline(f"u{i:03d}", "d", "s", "disconnect"), T0)
    want = [u.user_id for u in engine.get_online_users(channel, T0)]
    assert _walk(engine, channel, limit, scan) == want
    engine.handle(Birth("u000", "d", "s2"), T0)  # and comes back after the build
    engine.handle(Birth("zed", "d", "s"), T0)
    want = [u.user_id for u in engine.get_online_users(channel, T0)]
    assert _walk(engine, channel, limit, scan) == want


async def test_who_command_pages_through_a_service_whose_users_change(small_steps: None) -> None:
    clock = FakeClock(T0)
    async with create_presence_service(storage="memory", clock=clock) as p:
        for i in range(45):
            await p.set_device_status(f"u{i:03d}", "d", "online")
        seen: list[str] = []
        after = ""
        while True:
            res = await run_command(p, "asker", f"/presence who --limit 10{after}")
            assert res.ok and isinstance(res.data, dict)
            seen += [u["userId"] for u in res.data["users"]]
            if res.data["next"] is None:
                break
            after = f" --after {res.data['next']}"
            if len(seen) == 20:  # between two pages: one leaves ahead, one joins behind
                await p.set_device_status("u040", "d", "offline")
                await p.set_device_status("a-late", "d", "online")
        assert seen == [f"u{i:03d}" for i in range(45) if i != 40]
        first = await run_command(p, "asker", "/presence who --limit 10")
        assert first.text.startswith("10 online (first page):\n")
        assert first.text.endswith("\nmore: /presence who --after u008")  # a-late comes first


def test_user_pages_list_every_user_offline_ones_too_while_users_come_and_go(
        small_steps: None) -> None:
    """``/presence users`` pages from an index of every user id, built in steps while users
    are added and removed, then kept: the pages are exactly the engine's users, in order."""
    engine = _engine_with(40)
    for i in range(0, 40, 5):
        engine.handle(DeviceOffline(f"u{i:03d}", "d", "s", "disconnect"), T0)  # still users
    k = 0
    while not engine.index_users():  # users come and go during the build
        engine.handle(Birth(f"b{k:03d}", "d", "s"), T0)
        if k % 3 == 0:
            engine.handle(RemoveUser(f"u{k:03d}"), T0)
        k += 1
    engine.handle(Birth("zz", "d", "s"), T0)  # and after it
    engine.handle(RemoveUser("u039"), T0)

    def walk(limit: int) -> list[str]:
        got: list[str] = []
        page = engine.user_page(limit, None)
        while page:
            got += page
            page = engine.user_page(limit, page[-1])
        return got

    assert walk(6) == walk(1) == sorted(engine.user_ids())
    assert "u005" in walk(6)  # offline users are listed
