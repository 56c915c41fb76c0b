"""The wire protocol: ids, topics, payloads, and rejections that never raise."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.protocol import (
    MAX_PAYLOAD_BYTES,
    AckPayload,
    BrokerURL,
    ConnPayload,
    DeviceMessage,
    DeviceState,
    HeartbeatPayload,
    InvalidId,
    InvalidURL,
    Rejection,
    SetPayload,
    Topics,
    UserState,
    UserStatePayload,
    new_session_id,
    validate_id,
    validate_prefix,
)

T = Topics()


@pytest.mark.parametrize("good", ["alice", "a", "A-b_c.d", "x" * 64, "0"])
def test_valid_ids_are_accepted(good: str) -> None:
    assert validate_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "x" * 65, "a/b", "a+b", "a#", "with space", "ünïcode", "tab\t", None, 5]
)
def test_invalid_ids_are_refused_with_a_clear_error(bad: object) -> None:
    with pytest.raises(InvalidId, match="use 1-64 characters"):
        validate_id(bad, "user id")


def test_builders_refuse_ids_that_would_change_the_topic_shape() -> None:
    with pytest.raises(InvalidId):
        T.device("alice/bob", "phone", "conn")
    with pytest.raises(InvalidId):
        T.user("+", "state")
    with pytest.raises(InvalidId):
        T.events("#")


def test_prefix_may_have_levels_but_no_wildcards() -> None:
    assert Topics("home/presence").user("a", "status") == "home/presence/users/a/status"
    for bad in ("", "a/+/b", "a//b", "#", "/lead"):
        with pytest.raises(InvalidId):
            validate_prefix(bad)


def test_topics_round_trip() -> None:
    topic = T.device("alice", "phone", "heartbeat")
    assert topic == "presence/devices/alice/phone/heartbeat"
    msg = T.parse(topic, b'{"session":"s1","seq":3,"ts":5,"idleMs":10}')
    assert isinstance(msg, DeviceMessage)
    assert (msg.user, msg.device, msg.kind) == ("alice", "phone", "heartbeat")
    assert msg.body == HeartbeatPayload(session="s1", seq=3, ts=5, idle_ms=10)


def test_payloads_are_camel_case_on_the_wire_and_leave_out_nones() -> None:
    assert json.loads(HeartbeatPayload(session="s", seq=1, ts=2, idle_ms=3).to_json()) == {
        "session": "s", "seq": 1, "ts": 2, "idleMs": 3
    }
    assert json.loads(ConnPayload(state="offline", session="s", reason="lost").to_json()) == {
        "state": "offline", "session": "s", "reason": "lost"
    }


def test_user_state_always_carries_custom_status_and_active_device() -> None:
    data = json.loads(UserStatePayload(user_id="a", name="a", status="offline", version=1).to_json())
    assert data["customStatus"] is None and data["activeDevice"] is None
    assert data["devices"] == []


def test_set_tells_null_custom_status_from_missing() -> None:
    cleared = T.parse("presence/devices/a/b/set", b'{"customStatus":null}')
    untouched = T.parse("presence/devices/a/b/set", b'{"status":"dnd"}')
    assert isinstance(cleared, DeviceMessage) and isinstance(untouched, DeviceMessage)
    assert isinstance(cleared.body, SetPayload) and isinstance(untouched.body, SetPayload)
    assert cleared.body.has_custom_status() and cleared.body.custom_status is None
    assert not untouched.body.has_custom_status()


def test_unknown_fields_are_ignored() -> None:
    msg = T.parse("presence/devices/a/b/ack", b'{"version":3,"future":"field"}')
    assert isinstance(msg, DeviceMessage) and msg.body == AckPayload(version=3)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("other/devices/a/b/conn", b"{}", "unknown_topic"),
        ("presence/devices/a/b", b"{}", "unknown_topic"),
        ("presence/devices/a/b/c/d", b"{}", "unknown_topic"),
        ("presence/devices/a/b/reboot", b"{}", "unknown_topic"),
        ("presence/devices/a+/b/conn", b"{}", "bad_id"),
        ("presence/devices/a/" + "x" * 65 + "/conn", b"{}", "bad_id"),
        ("presence/devices/a/b/heartbeat", b"", "empty_payload"),
        ("presence/devices/a/b/heartbeat", b"not json", "bad_payload"),
        ("presence/devices/a/b/heartbeat", b"[1,2]", "bad_payload"),
        ("presence/devices/a/b/heartbeat", b'"str"', "bad_payload"),
        ("presence/devices/a/b/heartbeat", b'{"seq":1}', "bad_payload"),
        ("presence/devices/a/b/heartbeat", b'{"session":"s","seq":"1"}', "bad_payload"),
        ("presence/devices/a/b/heartbeat", b'{"session":"s","seq":true}', "bad_payload"),
        ("presence/devices/a/b/heartbeat", b'{"session":"s","idleMs":-5}', "bad_payload"),
        ("presence/devices/a/b/heartbeat", b'{"session":"a/b"}', "bad_payload"),
        ("presence/devices/a/b/conn", b'{"state":"maybe","session":"s"}', "bad_payload"),
        ("presence/devices/a/b/set", b'{"status":"busy"}', "bad_payload"),
        ("presence/devices/a/b/set", b'{"customStatus":"' + b"x" * 300 + b'"}', "bad_payload"),
        ("presence/devices/a/b/activity", b'{"type":""}', "bad_payload"),
        ("presence/devices/a/b/activity", b'{"type":"m","channelId":"a/b"}', "bad_payload"),
        ("presence/devices/a/b/ack", b'{"version":-1}', "bad_payload"),
        ("presence/devices/a/b/heartbeat", b"\xff\xfe", "bad_payload"),
    ],
)
def test_bad_input_becomes_a_rejection_with_a_reason(topic: str, payload: bytes, reason: str) -> None:
    result = T.parse(topic, payload)
    assert isinstance(result, Rejection), result
    assert result.reason == reason
    assert result.detail


def test_huge_payloads_are_refused_before_parsing() -> None:
    payload = b'{"type":"m","data":{"x":"' + b"a" * MAX_PAYLOAD_BYTES + b'"}}'
    result = T.parse("presence/devices/a/b/activity", payload)
    assert isinstance(result, Rejection) and result.reason == "too_large"


def test_deeply_nested_json_is_a_rejection_not_a_crash() -> None:
    payload = b'{"type":"m","data":{"x":' + b"[" * 5000 + b"]" * 5000 + b"}}"
    assert isinstance(T.parse("presence/devices/a/b/activity", payload), Rejection | DeviceMessage)


def test_session_ids_are_fresh_and_valid() -> None:
    ids = {new_session_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(validate_id(s) for s in ids)


@settings(max_examples=300, deadline=None)
@given(topic=st.text(max_size=80), payload=st.binary(max_size=200))
def test_parse_never_raises(topic: str, payload: bytes) -> None:
    result = T.parse(topic, payload)
    assert isinstance(result, Rejection | DeviceMessage)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["conn", "heartbeat", "activity", "set", "ack", "req"]),
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["state", "session", "seq", "ts", "idleMs", "type", "channelId",
                             "timestamp", "status", "customStatus", "version", "id", "command"]),
            children, max_size=6),
        max_leaves=12,
    ),
)
def test_parse_never_raises_on_json_shaped_garbage(kind: str, body: object) -> None:
    payload = json.dumps(body).encode()
    result = T.parse(f"presence/devices/u/d/{kind}", payload)
    assert isinstance(result, Rejection | DeviceMessage)


def test_broker_urls_are_parsed_once_for_hub_and_agent_and_never_show_passwords() -> None:
    from hub.protocol import BrokerURL, InvalidURL, redact_url

    url = BrokerURL.parse("mqtts://alice%2Fphone:s3cret@hub.lan")
    assert (url.host, url.port, url.tls, url.username, url.password) == (
        "hub.lan", 8883, True, "alice/phone", "s3cret")
    assert "s3cret" not in str(url) and "s3cret" not in repr(url)
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    for bad in ("http://hub.lan", "mqtt://", "mqtt://h/path", "mqtt://h:99999",
                "mqtt://u:s3cret@h:99999", "u:s3cret@h:99999", "alice/phone:s3cret@h", ""):
        with pytest.raises(InvalidURL) as info:
            BrokerURL.parse(bad)
        assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(("text", "parsed"), [
    ("hub.lan:1884", BrokerURL("hub.lan", 1884)),
    ("hub.lan", BrokerURL("hub.lan", 1883)),
    (" 127.0.0.1:1883 ", BrokerURL("127.0.0.1", 1883)),
    ("[::1]:1999", BrokerURL("::1", 1999)),
    ("alice%2Fphone:pw@hub.lan", BrokerURL("hub.lan", 1883, False, "alice/phone", "pw")),
    ("mqtt://hub.lan:1884", BrokerURL("hub.lan", 1884)),
    ("mqtts://hub.lan", BrokerURL("hub.lan", 8883, True)),
])
def test_a_broker_is_host_port_or_a_url_everywhere(text: str, parsed: BrokerURL) -> None:
    """One parser for the hub, the agent, ``presence`` and the examples (issue 15, item 7):
    ``HOST:PORT`` as for mosquitto_sub, or a URL; without a scheme it is plain MQTT."""
    assert BrokerURL.parse(text) == parsed


def test_errors_about_a_broker_address_quote_it_and_say_what_works() -> None:
    with pytest.raises(InvalidURL, match=r"'::1:1883'.*in brackets: \[::1\]:1883"):
        BrokerURL.parse("::1:1883")
    with pytest.raises(InvalidURL, match=r"'alice/phone:\*\*\*@h'.*a / in a username as %2F"):
        BrokerURL.parse("alice/phone:pw@h")
    with pytest.raises(InvalidURL, match="use HOST:PORT, mqtt://HOST:PORT or mqtts://HOST:8883"):
        BrokerURL.parse("hub.lan:port")


def test_a_login_from_flags_or_environment_wins_over_the_url() -> None:
    url = BrokerURL.parse("mqtt://a:b@h")
    assert url.with_login("c", None) == BrokerURL("h", 1883, False, "c", "b")
    assert url.with_login(None, "d") == BrokerURL("h", 1883, False, "a", "d")
    assert url.with_login(None, None) == url


@pytest.mark.parametrize(("event", "user", "old", "new", "ts"), [
    ("statusChange", "alice", "online", "offline", 1_700_000_000_123),
    ("online", "u-1.x_Y", "offline", "dnd", 0),
    ("offline", "b" * 64, "away", "offline", 2**53),
])
def test_event_json_is_the_models_json_byte_for_byte(
    event: str, user: str, old: str, new: str, ts: int
) -> None:
    from hub.protocol import EventPayload, event_json

    model = EventPayload(event=event, user_id=user, old=old, new=new, ts=ts)  # type: ignore[arg-type]
    assert event_json(event, user, old, new, ts) == model.to_json()
    assert EventPayload.model_validate_json(event_json(event, user, old, new, ts)) == model


_times = st.none() | st.integers(min_value=0, max_value=2**53)
_device_states = st.builds(
    lambda id, name, status, seen, active, wake: DeviceState(
        id, name, status, seen, active, wake is not None, wake),
    st.text(max_size=12), st.text(max_size=12), st.sampled_from(["online", "away", "offline"]),
    _times, st.booleans(), _times)


@settings(max_examples=300, deadline=None)
@given(user=st.text(max_size=12), name=st.text(max_size=20),
       status=st.sampled_from(["online", "away", "dnd", "offline"]),
       custom=st.none() | st.text(max_size=20), seen=_times,
       active=st.none() | st.text(max_size=12), version=st.integers(min_value=0, max_value=2**53),
       devices=st.lists(_device_states, max_size=4))
def test_user_state_json_is_the_models_json_byte_for_byte(
    user: str, name: str, status: str, custom: str | None, seen: int | None,
    active: str | None, version: int, devices: list[object],
) -> None:
    """The engine's plain UserState is written without the model (a storm builds tens of
    thousands at once), yet devices and dashboards must read exactly what the model writes:
    any text (quotes, control characters, non-ASCII, surrogate-free) in ids, names and the
    custom status."""
    state = UserState(user, name, status, custom, seen, active, version, devices)  # type: ignore[arg-type]
    model = state.model()
    assert state.to_json() == model.to_json()
    assert UserStatePayload.model_validate_json(state.to_json()) == model
    assert json.loads(state.to_json()) == state.wire()


def test_user_state_json_is_compact_in_order_and_utf8_as_topics_md_says() -> None:
    state = UserState("alice", 'Zoë "Z"\n', "dnd", "Café ☕", 5, "laptop", 17,
                      [DeviceState("laptop", "Work laptop", "online", 5, True)])
    assert state.to_json() == (
        '{"userId":"alice","name":"Zoë \\"Z\\"\\n","status":"dnd","customStatus":"Café ☕",'
        '"lastSeen":5,"activeDevice":"laptop","version":17,"devices":[{"id":"laptop",'
        '"name":"Work laptop","status":"online","lastSeen":5,"isActive":true,'
        '"sleeping":false,"wakeAt":null}]}').encode()
