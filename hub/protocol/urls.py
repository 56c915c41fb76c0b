"""Broker URLs, parsed once for the hub, the agent and the ``presence`` command.

Passwords ride in URLs (``mqtt://alice%2Fphone:secret@hub.lan``), so every message and log line
that shows a URL goes through :func:`redact_url` or ``str(BrokerURL)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote, urlsplit, urlunsplit

_SCHEMES: Final[dict[str, tuple[bool, int]]] = {
    "mqtt": (False, 1883),
    "tcp": (False, 1883),
    "mqtts": (True, 8883),
    "ssl": (True, 8883),
}


class InvalidURL(ValueError):
    """A URL that cannot be used; the message names it (password hidden) and says why."""


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if port is not None:
        host = f"{host}:{port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """Where the broker is and how to log in; ``str()`` hides the password for log lines."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str) -> BrokerURL:
        """``mqtt://[user:pass@]host[:1883]`` or ``mqtts://...`` (``tcp://``/``ssl://`` too)."""
        if "://" not in text:
            raise InvalidURL(
                f"invalid broker URL {redact_url(text)!r}: use mqtt://host:1883 or mqtts://host:8883"
            )
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise InvalidURL(f"invalid broker URL {redact_url(text)!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise InvalidURL(
                f"unsupported broker URL scheme {parts.scheme!r} in {redact_url(text)!r}:"
                " use mqtt:// or mqtts://"
            )
        if not parts.hostname:
            raise InvalidURL(f"broker URL {redact_url(text)!r} has no host name")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise InvalidURL(
                f"broker URL {redact_url(text)!r} must not have a path or query: "
                "use scheme://host:port"
            )
        tls, default_port = _SCHEMES[scheme]
        return cls(
            host=parts.hostname,
            port=port or default_port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        auth = ""
        if self.username:
            auth = self.username + (":***" if self.password else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}"
