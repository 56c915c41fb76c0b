"""The broker's topic indexes (hub/broker/index.py) agree with amqtt's own matcher.

The tries replace amqtt's pairwise ``Broker._matches`` in the embedded broker's hot paths, so
each must give exactly the pairs amqtt would: checked with hypothesis over topics and filters
built from a small alphabet of levels that includes empty levels, ``$`` levels and literal
wildcard characters, plus some fixed cases worth naming.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from amqtt.broker import Broker
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.broker.index import RetainedIndex, SubscriptionIndex
from hub.protocol.matching import filter_is_valid, topic_matches

# amqtt's _matches only uses self.logger: call the real function with just that.
_AMQTT_SELF = SimpleNamespace(logger=logging.getLogger("test_broker_index"))


def amqtt_matches(topic: str, topic_filter: str) -> bool:
    result: bool = Broker._matches(_AMQTT_SELF, topic, topic_filter)
    return result


_TOPIC_LEVELS = st.sampled_from(["a", "b", "", "$SYS", "$x", "c d", "+", "#", "a+", "é"])
_FILTER_LEVELS = st.sampled_from(["a", "b", "", "$SYS", "$x", "+", "#", "a+", "#a", "é"])
topics = st.lists(_TOPIC_LEVELS, min_size=1, max_size=5).map("/".join)
filters = st.lists(_FILTER_LEVELS, min_size=1, max_size=5).map("/".join)


@pytest.mark.parametrize(
    ("topic", "topic_filter", "match"),
    [
        ("a", "a/#", True),  # '#' includes the parent level
        ("a/b", "a/#", True),
        ("a", "#", True),
        ("", "#", True),
        ("", "+", True),  # '+' matches an empty level
        ("/", "+/+", True),
        ("/", "+", False),
        ("a//b", "a/+/b", True),
        ("$SYS/x", "#", False),  # [MQTT-4.7.2-1]
        ("$SYS/x", "+/x", False),
        ("$SYS/x", "$SYS/#", True),
        ("$SYS", "$SYS/#", True),
        ("a/$x", "a/+", True),  # only the first level is special
        ("x", "+/#", True),
        ("a/b", "a/b#", False),  # invalid filters match nothing
        ("a/#/b", "a/#/b", False),
        ("a/+", "a/+", True),  # a topic with a literal '+' (a will could have one)
        ("a/+", "a/b", False),
    ],
)
def test_named_cases(topic: str, topic_filter: str, match: bool) -> None:
    assert amqtt_matches(topic, topic_filter) is match
    assert topic_matches(topic, topic_filter) is match
    subs = SubscriptionIndex()
    subs[topic_filter] = []
    assert subs.matching(topic) == ([topic_filter] if match else [])
    retained = RetainedIndex()
    retained[topic] = object()
    assert retained.matching(topic_filter) == ([topic] if match else [])


@settings(max_examples=400, deadline=None)
@given(topic=topics, topic_filter=filters)
def test_reference_matcher_is_amqtts(topic: str, topic_filter: str) -> None:
    assert topic_matches(topic, topic_filter) == amqtt_matches(topic, topic_filter)


@settings(max_examples=300, deadline=None)
@given(subscribed=st.lists(filters, max_size=30), topic=topics)
def test_subscription_index_finds_exactly_amqtts_filters(subscribed: list[str], topic: str) -> None:
    index = SubscriptionIndex()
    for f in subscribed:
        index.setdefault(f, [])
    found = index.matching(topic)
    assert len(found) == len(set(found)), "a filter reported twice"
    assert set(found) == {f for f in set(subscribed) if amqtt_matches(topic, f)}


@settings(max_examples=300, deadline=None)
@given(stored=st.lists(topics, max_size=30), topic_filter=filters)
def test_retained_index_finds_exactly_amqtts_topics(stored: list[str], topic_filter: str) -> None:
    index = RetainedIndex()
    for t in stored:
        index[t] = t
    found = index.matching(topic_filter)
    assert len(found) == len(set(found)), "a topic reported twice"
    assert set(found) == {t for t in set(stored) if amqtt_matches(t, topic_filter)}


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), filters), max_size=40),
    probes=st.lists(topics, min_size=1, max_size=5),
)
def test_index_stays_right_through_adds_and_removes(
    ops: list[tuple[bool, str]], probes: list[str]
) -> None:
    """Removal prunes the trie without losing filters that share its levels."""
    index = SubscriptionIndex()
    held: set[str] = set()
    for add, f in ops:
        if add:
            index[f] = []
            held.add(f)
        elif f in index:
            del index[f]
            held.discard(f)
    assert set(index) == held
    for topic in probes:
        assert set(index.matching(topic)) == {f for f in held if amqtt_matches(topic, f)}
    index.clear()
    assert all(index.matching(t) == [] for t in probes)


def test_mapping_behaves_like_the_dict_amqtt_expects() -> None:
    index = SubscriptionIndex()
    index.setdefault("a/+", []).append(("s", 1))  # the way a test may widen a session
    index["a/+"].append(("t", 0))
    assert index.get("a/+") == [("s", 1), ("t", 0)]
    assert index.get("nope") is None
    assert index.matching("a/b") == ["a/+"]
    assert index.pop("a/+") == [("s", 1), ("t", 0)]
    assert index.matching("a/b") == []
    assert "a/+" not in index and len(index) == 0


def test_own_filters_per_client() -> None:
    index = SubscriptionIndex()
    index.note_subscribed("c1", "a/+")
    index.note_subscribed("c1", "b")
    index.note_subscribed("c2", "b")
    assert sorted(index.filters_of("c1")) == ["a/+", "b"]
    index.note_unsubscribed("c1", "a/+")
    index.note_unsubscribed("c1", "b")
    assert index.filters_of("c1") == [] and "c1" not in index.own
    assert index.filters_of("c2") == ["b"]


@given(topic_filter=filters)
def test_filter_validity_is_amqtts_subscribe_rule(topic_filter: str) -> None:
    levels = topic_filter.split("/")
    amqtt_refuses = any(
        "#" in level and (level != "#" or i != len(levels) - 1) for i, level in enumerate(levels)
    ) or any("+" in level and level != "+" for level in levels)
    assert filter_is_valid(topic_filter) is not amqtt_refuses


def test_repr_does_not_grow_with_the_index() -> None:
    """amqtt formats ``repr(_subscriptions)`` on every SUBSCRIBE, debug logging or not."""
    index = SubscriptionIndex()
    for k in range(1000):
        index[f"presence/users/u{k}/+"] = [(object(), 1)]
    assert len(repr(index)) < 80


def test_session_states_follow_amqtts_machine() -> None:
    from transitions import MachineError

    from hub.broker.session import HubSession

    s = HubSession()
    assert s.transitions.state == "new" and s.transitions.is_new()
    s.transitions.disconnect()  # new -> disconnected is allowed
    assert s.transitions.is_disconnected() and s.last_disconnect_time is not None
    s.transitions.connect()
    assert s.transitions.is_connected() and s.last_disconnect_time is None
    assert s.last_connect_time is not None
    with pytest.raises(MachineError):
        s.transitions.connect()
    s.transitions.disconnect()
    s.transitions.disconnect()  # disconnected -> disconnected too
    assert s.transitions.state == "disconnected"
