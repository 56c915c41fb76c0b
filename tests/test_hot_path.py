"""The heartbeat's hot path reads the wire without the models, and must agree with them.

``Topics.split_device_topic`` (one anchored match) stands in for ``parse_device_topic`` (the
checks one by one) and ``read_heartbeat`` (one match of the agent's layout) for
``HeartbeatPayload``: whenever the fast reader answers, the model path gives the same answer,
and the service behaves the same whichever path a heartbeat takes.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub import create_presence_service
from hub.core.clock import FakeClock
from hub.protocol import DEVICE_KINDS, HeartbeatPayload, Topics, read_heartbeat
from hub.protocol.topics import DeviceTopic, Rejection

ID_CHARS = "abcXYZ019_.-"
ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=64)


def model_read(payload: bytes) -> tuple[str, int | None] | None:
    """What the model path makes of a heartbeat payload (None: refused)."""
    try:
        body = HeartbeatPayload.model_validate_json(payload)
    except ValueError:
        return None
    return body.session, body.idle_ms


# ------------------------------------------------------------------------------ payloads


@st.composite
def agent_payloads(draw: st.DrawFn) -> bytes:
    """Heartbeats as the agent writes them (the model's own JSON), any valid field values."""
    beat = HeartbeatPayload(
        session=draw(ids),
        seq=draw(st.integers(min_value=0, max_value=10**18 - 1)),
        ts=draw(st.none() | st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1)),
        idle_ms=draw(st.none() | st.integers(min_value=0, max_value=10**18 - 1)),
    )
    return beat.to_json()


@given(agent_payloads())
def test_the_agents_own_heartbeats_are_read_fast_and_as_the_model_reads_them(p: bytes) -> None:
    assert read_heartbeat(p) is not None
    assert read_heartbeat(p) == model_read(p)


def _edits(p: bytes) -> list[bytes]:
    """Near misses of a valid payload: what a hand-written device or a bit flip might send."""
    s = p.decode()
    obj = json.loads(s)
    out = [
        s.replace(":", ": ").encode(),                      # json.dumps' default spacing
        s.replace(",", ", ").replace(":", ": ").encode(),
        json.dumps(obj, indent=1).encode(),                 # newlines
        (s + "\n").encode(), (" " + s).encode(),            # whitespace around the object
        json.dumps(dict(reversed(list(obj.items())))).encode(),   # another key order
        s.replace('"session":"', '"session":"\\u0061').encode(),  # an escape in the id
        s.replace('"seq":', '"seq":-').encode(),             # negative seq
        s.replace('"seq":', '"seq":0').encode(),             # leading zero
        s.replace('"seq":', '"seq":1e').encode(),
        s.replace('"ts":', '"ts":0').encode(),               # the same for ts and idleMs
        s.replace('"ts":', '"ts":+').encode(),
        s.replace('"ts":', '"ts":--').encode(),
        s.replace('"idleMs":', '"idleMs":0').encode(),
        s.replace('"idleMs":', '"idleMs":-').encode(),
        s[:-1].encode() + b',"idleMs":null}',
        s[:-1].encode() + b',"idleMs":-1}',
        s[:-1].encode() + b',"idleMs":1.5}',
        s[:-1].encode() + b',"idle_ms":5}',                  # the Python name, which the model takes
        s[:-1].encode() + b',"v":1}',                        # an unknown field
        s[:-1].encode() + b',"session":"other"}',           # a duplicate key
        s.replace('"session":', '"session":"x",  "session":').encode(),
        s.replace('"ts":', '"ts":-0,"x":').encode(),
        s.replace('"ts":', '"ts":"').encode(),
        s.encode().replace(b"}", b"}}"),
        s.encode()[:-1],
        b"\xff" + s.encode(),
        s.replace('"session":"', '"session":"' + "a" * 64).encode(),  # a 65-character id
        s.replace('"session":"', '"session":"/').encode(),
        s.replace('"session":"', '"session":"\u00e9').encode("utf-8"),
        b'{"session":"s","seq":' + b"9" * 19 + b"}",          # past 18 digits
        b'{"session":"s","ts":-0}',
        b'{"session":"s"}', b'{"session":""}', b"{}", b"null", b"[]",
    ]
    return out


@settings(max_examples=300)
@given(agent_payloads(), st.data())
def test_near_misses_are_read_fast_only_where_the_model_agrees(p: bytes, data: st.DataObject) -> None:
    variants = _edits(p)
    # and random byte edits of the valid payload
    for _ in range(5):
        i = data.draw(st.integers(min_value=0, max_value=len(p)))
        b = data.draw(st.binary(min_size=0, max_size=3))
        cut = data.draw(st.integers(min_value=0, max_value=2))
        variants.append(p[:i] + b + p[i + cut:])
    for v in variants:
        fast = read_heartbeat(v)
        if fast is not None:
            assert fast == model_read(v), v


@given(st.binary(max_size=120))
def test_arbitrary_bytes_are_read_fast_only_where_the_model_agrees(p: bytes) -> None:
    fast = read_heartbeat(p)
    if fast is not None:
        assert fast == model_read(p)


def test_what_falls_back_to_the_model_is_still_accepted_there() -> None:
    """The fast reader answers None for layouts it does not know; the model still decides."""
    assert read_heartbeat(b'{"session": "s1", "seq": 1}') == ("s1", None)  # json.dumps' spacing
    for p in (b'{ "session":"s1"}', b'{"seq":1,"session":"s1"}',
              b'{"session":"s1","idle_ms":5}', b'{"session":"s1","v":1}'):
        assert read_heartbeat(p) is None
        assert model_read(p) is not None
    assert read_heartbeat(b'{"session":"s1","seq":1,"ts":5,"idleMs":70}') == ("s1", 70)


# ------------------------------------------------------------------------------ topics

prefixes = st.sampled_from(["presence", "home/presence", "a.b", "p-1/x_y"])
levels = st.sampled_from(["alice", "phone", "a.b", "", "x" * 64, "x" * 65, "+", "#", "a b",
                          "\u00e9", "a\n", "heartbeat"]) | st.text(max_size=8)


@st.composite
def topics(draw: st.DrawFn) -> tuple[str, str]:
    prefix = draw(prefixes)
    head = draw(st.sampled_from([f"{prefix}/devices/", f"{prefix}/devices", "presence/devices/",
                                 "aXb/devices/", f"{prefix}/device/", ""]))
    if draw(st.booleans()):  # the shape of a device topic, with good and bad levels
        parts = [draw(levels | ids), draw(levels | ids),
                 draw(st.sampled_from(DEVICE_KINDS) | levels)]
        parts += draw(st.lists(levels, max_size=1))
    else:
        parts = draw(st.lists(levels | st.sampled_from(DEVICE_KINDS), min_size=0, max_size=4))
    return prefix, head + "/".join(parts)


@settings(max_examples=400)
@given(topics())
def test_the_one_match_splits_topics_exactly_as_the_checks_do(case: tuple[str, str]) -> None:
    prefix, topic = case
    t = Topics(prefix)
    fast = t.split_device_topic(topic)
    slow = t.parse_device_topic(topic)
    if isinstance(slow, DeviceTopic):
        assert fast == (slow.user, slow.device, slow.kind)
    else:
        assert fast == slow


def test_every_rule_of_the_checks_holds_in_the_match() -> None:
    """Every combination of good and bad prefixes, levels and kinds (about 40,000 topics)."""
    good = ["alice", "a.b", "x" * 64, "heartbeat", "A-Z_9"]
    bad = ["", "x" * 65, "+", "#", "a b", "\u00e9", "a\n", "a/b"]
    kinds = [*DEVICE_KINDS, "beat", "Heartbeat", "conn/x"]
    for prefix in ["presence", "home/presence", "a.b", "p-1/x_y"]:
        t = Topics(prefix)
        for head in [f"{prefix}/devices/", f"{prefix}/devices", "aXb/devices/",
                     f"{prefix}/device/", f"x/{prefix}/devices/", ""]:
            for user in good + bad:
                for device in good + bad:
                    for kind in kinds:
                        topic = f"{head}{user}/{device}/{kind}"
                        slow = t.parse_device_topic(topic)
                        want = (slow.user, slow.device, slow.kind) \
                            if isinstance(slow, DeviceTopic) else slow
                        assert t.split_device_topic(topic) == want, topic


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_every_kind_of_a_valid_topic_is_split(kind: str) -> None:
    t = Topics("home/presence")
    assert t.split_device_topic(f"home/presence/devices/u.1/d-2/{kind}") == ("u.1", "d-2", kind)
    assert isinstance(t.split_device_topic(f"homeXpresence/devices/u/d/{kind}"), Rejection)


# ------------------------------------------------------------------------------ the service

HEARTBEATS = {
    # the agent's layout (fast path) and the same content in others (model path)
    "fast": lambda s, idle: HeartbeatPayload(session=s, seq=1, ts=1, idle_ms=idle).to_json(),
    "model": lambda s, idle: json.dumps(
        {"idleMs": idle, "ts": 1, "session": s} if idle is not None else {"session": s, "v": 1}
    ).encode(),
}


async def _run(layout: str) -> list[object]:
    """A script of births, heartbeats with and without idle time, stale sessions, timeouts."""
    clock = FakeClock()
    beat = HEARTBEATS[layout]
    seen: list[object] = []
    async with create_presence_service(storage="memory", clock=clock, heartbeat_interval_ms=1000,
                                       away_after_ms=5000, offline_after_ms=20_000) as p:
        events: list[tuple[str, str, str]] = []
        p.on("statusChange", lambda u, old, new: events.append((u, old, new)))

        def hb(user: str, device: str, session: str, idle: int | None) -> int:
            payload = beat(session, idle)
            # each layout really takes the path it is named after
            assert (read_heartbeat(payload) is not None) == (layout == "fast")
            return p.ingest([(f"presence/devices/{user}/{device}/heartbeat", payload)])

        async def look() -> None:
            for u in ("u", "v"):
                s = await p.get_status(u)
                devs = await p.get_devices(u)
                seen.append((clock.now(), u, s.status, s.active_device, s.last_seen,
                             [(d.id, d.status, d.last_seen) for d in devs]))

        hb("u", "phone", "s1", None)  # an implicit birth
        hb("v", "laptop", "s9", 0)
        await look()
        for step in range(12):
            clock.advance(900)
            hb("u", "phone", "s1", None)
            hb("v", "laptop", "s9", 2000 * step)  # the user walks away
            if step == 6:
                hb("u", "phone", "old", None)  # a stale session
                hb("u", "tablet", "t1", 100)
            await p.tick()
            await look()
        clock.advance(10_000)  # everyone times out
        await p.tick()
        await look()
        seen.append(events)
        seen.append(dict(p.received))
        seen.append(dict(p.rejected))
    return seen


async def test_a_heartbeat_does_the_same_whichever_path_reads_it() -> None:
    assert await _run("fast") == await _run("model")


async def test_the_payload_limit_and_the_rate_limit_hold_on_the_fast_path() -> None:
    clock = FakeClock()
    beat = HeartbeatPayload(session="s1", seq=1, ts=1).to_json()
    async with create_presence_service(storage="memory", clock=clock,
                                       max_payload_bytes=len(beat) - 1) as p:
        assert p.ingest([("presence/devices/u/d/heartbeat", beat)]) == 1
        assert p.rejected["too_large"] == 1
        assert (await p.get_status("u")).status == "offline"
    async with create_presence_service(storage="memory", clock=clock, device_rate=1.0,
                                       device_burst=2) as p:
        assert p.ingest([("presence/devices/u/d/heartbeat", beat)] * 5) == 3
        assert p.rejected["rate_limited"] == 3
        assert (await p.get_status("u")).status == "online"
