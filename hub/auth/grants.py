"""Topic grants: what one connection may publish to, subscribe to and receive.

With no account at all the broker is open (everyone may do everything), which is why it then
listens on loopback only unless told otherwise (:func:`hub.auth.policy.listen_policy_error`).

Subscribing needs the *whole* filter to lie within one readable filter (``a/#`` is not within
``a/+``: amqtt's own ACL plugin got that wrong), and every message is checked again when it is
delivered, retained ones included, so a session that somehow holds a wider subscription still
receives only what its grant allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from hub.auth.accounts import Account
from hub.protocol import validate_prefix
from hub.protocol.matching import compile_filter, filter_within


@dataclass(frozen=True, slots=True)
class Grant:
    """What one connection may do: filters it may publish to and read from.

    ``everything`` is the open broker (no accounts configured). Matchers are compiled once
    here, so a check costs a few string comparisons.
    """

    who: str
    publish: tuple[str, ...] = ()
    read: tuple[str, ...] = ()
    everything: bool = False
    _pub: tuple[Callable[[str], bool], ...] = field(default=(), repr=False, compare=False)
    _read: tuple[Callable[[str], bool], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pub", tuple(compile_filter(f) for f in self.publish))
        object.__setattr__(self, "_read", tuple(compile_filter(f) for f in self.read))

    def may_publish(self, topic: str) -> bool:
        if self.everything:
            return True
        for match in self._pub:  # noqa: SIM110 - a loop, not any(): on every message
            if match(topic):
                return True
        return False

    def may_receive(self, topic: str) -> bool:
        if self.everything:
            return True
        for match in self._read:  # noqa: SIM110 - a loop, not any(): on every message
            if match(topic):
                return True
        return False

    def may_subscribe(self, topic_filter: str) -> bool:
        if self.everything:
            return True
        return any(filter_within(topic_filter, f) for f in self.read)


OPEN_GRANT: Final = Grant("anyone (no accounts configured)", everything=True)


def grant_for(account: Account | None, prefix: str) -> Grant:
    """The grant of an account; ``None`` is an anonymous client while accounts exist."""
    p = validate_prefix(prefix)
    watch = (f"{p}/users/#", f"{p}/events/#", f"{p}/hub/status")
    if account is None:
        return Grant("anonymous", read=watch)
    if account.role == "hub":
        return Grant(f"hub {account.username}", publish=(f"{p}/#",), read=(f"{p}/#",))
    if account.role == "watcher":
        return Grant(f"watcher {account.username}", read=watch)
    user, device = account.user, account.device
    return Grant(
        f"device {account.username}",
        publish=(f"{p}/devices/{user}/{device}/+",),
        # its own conn too: an agent that sees another session's birth there knows a second
        # agent runs for the same device (and says so); it shows nothing of anyone else
        read=(f"{p}/users/{user}/+", f"{p}/events/{user}", f"{p}/replies/{user}/{device}",
              f"{p}/hub/status", f"{p}/devices/{user}/{device}/conn"),
    )


