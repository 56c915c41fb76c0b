"""Indexes for the embedded broker: which filters match a topic, which topics match a filter.

Why: amqtt 0.12 answers both questions by scanning. Every published message is compared with
every subscribed filter (``Broker._run_broadcast``), and every SUBSCRIBE with every retained
topic (``_publish_retained_messages_for_subscription``). With agents holding two filters each
and leaving a retained ``conn`` topic behind, both grow with the number of devices, so a
heartbeat nobody subscribes to cost O(devices) and the broker saturated at ~1-2k devices.

Both indexes are tries over topic levels (split on ``/``), kept in step with the mapping amqtt
already uses: :class:`SubscriptionIndex` stands in for ``Broker._subscriptions`` and
:class:`RetainedIndex` for ``Broker._retained_messages``. They are full mappings, so amqtt's
own code (and tests that reach into the broker) keep working on them unchanged; every change
of keys goes through ``__setitem__``/``__delitem__``, which update the trie.

Matching follows amqtt's ``Broker._matches`` exactly, which is MQTT 3.1.1's rule set (the
one reference is :func:`hub.protocol.matching.topic_matches`):

* ``+`` matches one whole level (also an empty one), ``#`` the rest of the topic including
  its parent (``a/#`` matches ``a``);
* a topic starting with ``$`` is not matched by a filter starting with a wildcard
  [MQTT-4.7.2-1];
* a filter with a wildcard character anywhere but a whole level (``a+``, ``#/a``) never
  matches anything, so such filters are kept in the mapping but not in the trie.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from hub.protocol.matching import filter_is_valid

__all__ = ["RetainedIndex", "SubscriptionIndex"]

V = TypeVar("V")


class _Node:
    """One level of a trie; ``key`` is the full filter (or topic) that ends here, if any.

    A leaf shares one empty, read-only ``children`` (most nodes are leaves: a device's
    ``conn`` topic, a user's ``status``): a dict of its own cost ~80 bytes per leaf, ~300 per
    device with the agent's topics and filters (issue 16).
    """

    __slots__ = ("children", "key")

    def __init__(self) -> None:
        self.children: Mapping[str, _Node] = _NO_CHILDREN
        self.key: str | None = None


_NO_CHILDREN: Mapping[str, _Node] = MappingProxyType({})


class _Trie:
    """Strings split on ``/`` into a tree of levels, with insert and prune-on-remove."""

    __slots__ = ("root",)

    def __init__(self) -> None:
        self.root = _Node()

    def add(self, key: str) -> None:
        node = self.root
        for level in key.split("/"):
            child = node.children.get(level)
            if child is None:
                children = node.children
                if not isinstance(children, dict):  # a leaf so far
                    children = node.children = {}
                child = children[level] = _Node()
            node = child
        node.key = key

    def remove(self, key: str) -> None:
        path: list[tuple[_Node, str]] = []
        node = self.root
        for level in key.split("/"):
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        node.key = None
        # prune the levels nothing ends at or passes through any more
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.key is not None or child.children:
                break
            children = parent.children
            assert isinstance(children, dict)  # it has a child
            del children[level]
            if not children:
                parent.children = _NO_CHILDREN

    def clear(self) -> None:
        self.root = _Node()


class _IndexedMapping(MutableMapping[str, V], Generic[V]):
    """A dict whose keys are mirrored in a trie; only key changes touch the trie."""

    def __init__(self) -> None:
        self._data: dict[str, V] = {}
        self._trie = _Trie()

    def _indexable(self, key: str) -> bool:
        return True

    def __getitem__(self, key: str) -> V:
        return self._data[key]

    def __setitem__(self, key: str, value: V) -> None:
        if key not in self._data and self._indexable(key):
            self._trie.add(key)
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._trie.remove(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:  # a dict's speed: amqtt calls it a lot
        return self._data.get(key, default)

    def clear(self) -> None:
        self._data.clear()
        self._trie.clear()

    def __repr__(self) -> str:
        # Short on purpose: amqtt 0.12.1 evaluates ``repr(self._subscriptions)`` for a debug
        # line after every SUBSCRIBE, even with debug logging off. A dict's repr (every
        # session of every filter) made each connect O(all subscriptions): 70% of the hub's
        # CPU while 6,000 devices connected, profiled.
        return f"<{type(self).__name__}: {len(self._data)} keys>"


class SubscriptionIndex(_IndexedMapping[list[tuple[Any, int]]]):
    """``Broker._subscriptions`` (filter -> [(session, qos)]) that finds a topic's filters.

    :meth:`matching` walks the topic's levels once, following at each trie node the literal
    level, ``+`` and ``#``: a few dict lookups per level instead of one comparison per
    subscribed filter. It also remembers which filters each client id holds (kept by the
    broker's ``add_subscription``/``_del_subscription``), so ending a session visits only
    its own filters.
    """

    def __init__(self) -> None:
        super().__init__()
        #: client id -> the filters it subscribed to through the broker
        self.own: dict[str, set[str]] = {}

    def _indexable(self, key: str) -> bool:
        return filter_is_valid(key)  # an invalid filter matches nothing: leave it out

    def clear(self) -> None:
        super().clear()
        self.own.clear()

    def note_subscribed(self, client_id: str, topic_filter: str) -> None:
        self.own.setdefault(client_id, set()).add(topic_filter)

    def note_unsubscribed(self, client_id: str, topic_filter: str) -> None:
        filters = self.own.get(client_id)
        if filters is not None:
            filters.discard(topic_filter)
            if not filters:
                del self.own[client_id]

    def filters_of(self, client_id: str) -> list[str]:
        return list(self.own.get(client_id, ()))

    def matching(self, topic: str) -> list[str]:
        """Every subscribed filter that matches ``topic``, each once (empty ones included)."""
        found: list[str] = []
        nodes = [self._trie.root]
        wild = not topic.startswith("$")  # [MQTT-4.7.2-1]: no wildcard first level for $
        for level in topic.split("/"):
            following: list[_Node] = []
            for node in nodes:
                children = node.children
                if not children:
                    continue
                if wild:
                    rest = children.get("#")
                    if rest is not None and rest.key is not None:
                        found.append(rest.key)
                    one = children.get("+")
                    if one is not None:
                        following.append(one)
                if level != "+" and level != "#":  # a literal wildcard level is the node above
                    same = children.get(level)
                    if same is not None:
                        following.append(same)
            if not following:
                return found
            nodes = following
            wild = True
        for node in nodes:
            if node.key is not None:
                found.append(node.key)
            rest = node.children.get("#")  # "a/#" matches "a" as well
            if rest is not None and rest.key is not None:
                found.append(rest.key)
        return found


class RetainedIndex(_IndexedMapping[Any]):
    """``Broker._retained_messages`` (topic -> message) that finds the topics a filter matches.

    :meth:`matching` follows a literal level to one child, ``+`` to all children and ``#`` to
    the whole subtree, so a SUBSCRIBE costs what it delivers rather than one comparison per
    retained topic.
    """

    def matching(self, topic_filter: str) -> list[str]:
        """Every retained topic that ``topic_filter`` matches."""
        if not filter_is_valid(topic_filter):
            return []
        found: list[str] = []
        levels = topic_filter.split("/")
        last = len(levels) - 1
        # (node, index of the filter level to match against its children)
        stack: list[tuple[_Node, int]] = [(self._trie.root, 0)]
        while stack:
            node, i = stack.pop()
            level = levels[i]
            if level == "#":
                if i > 0 and node.key is not None:  # "a/#" matches "a"
                    found.append(node.key)
                below = [c for name, c in node.children.items() if i > 0 or not name.startswith("$")]
                while below:
                    child = below.pop()
                    if child.key is not None:
                        found.append(child.key)
                    below.extend(child.children.values())
                continue
            if level == "+":
                children = [c for name, c in node.children.items() if i > 0 or not name.startswith("$")]
            else:
                same = node.children.get(level)
                children = [same] if same is not None else []
            for child in children:
                if i == last:
                    if child.key is not None:
                        found.append(child.key)
                else:
                    stack.append((child, i + 1))
        return found
