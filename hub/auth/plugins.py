"""amqtt plugins that put an :class:`~hub.auth.policy.AccessPolicy` in front of the embedded broker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from hub.auth.policy import GRANT_KEY, VERDICT_KEY, AccessPolicy


class HubAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt authentication through an :class:`AccessPolicy` (config: ``{"policy": policy}``).

    Besides the yes/no amqtt asks for, it leaves the :class:`Verdict` in the session's
    attributes: the broker uses it for the CONNACK code and the grant for topic checks.
    """

    @dataclass
    class Config:
        policy: Any = None

    async def authenticate(self, *, session: Any) -> bool:
        policy: AccessPolicy = self.config.policy
        will = session.will_topic if session.will_flag else None
        verdict = await policy.admit(
            session.username, session.password, will,
            client=f"{session.client_id} from {session.remote_address}",
        )
        session.attributes[VERDICT_KEY] = verdict
        if verdict.grant is not None:
            session.attributes[GRANT_KEY] = verdict.grant
        return verdict.ok


class HubTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """amqtt topic checks (publish, subscribe, receive) from the session's :class:`Grant`.

    :meth:`check` is synchronous so the broker can call it without a task per message (amqtt's
    plugin manager wraps every call in a task: ~20 us each, measured, on every delivery).
    """

    @dataclass
    class Config:
        policy: Any = None

    def check(self, session: Any, topic: str | None, action: Action) -> bool:
        policy: AccessPolicy = self.config.policy
        if session is None:
            return True  # the broker's own messages (the hub's)
        if not topic:
            return False
        return policy.allowed(session.attributes.get(GRANT_KEY), topic, action,
                              str(session.client_id))

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        if action is None:
            return False
        return self.check(session, topic, action)


