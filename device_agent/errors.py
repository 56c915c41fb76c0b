"""The agent's own exception types, each with a message a user can act on.

The command-line tools map them to exit codes (``ConfigError`` -> 2, the unavailability errors
-> 1) and print only the message, so every message names what failed and what to check.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the device agent raises on purpose."""


class ConfigError(AgentError):
    """A setting is missing or wrong (bad id, bad broker URL, unreadable config file...)."""


class AgentLocked(AgentError):
    """Another agent process already runs for the same user and device (it holds the lock)."""


class HubUnavailable(AgentError):
    """The hub did not answer a request in time, or could not be reached at all."""


class BrokerUnavailable(HubUnavailable):
    """The MQTT broker refused or failed the connection, so the hub could not even be asked.

    A subclass of :class:`HubUnavailable` because a caller of ``request()`` usually only cares
    that no answer can come; the message still says which of the two happened.
    """


class GaveUp(AgentError):
    """The agent stopped reconnecting (the broker refused the credentials, or retries ran out)."""
