"""Broker addresses, parsed once for the hub, the agent, the ``presence`` command and the examples.

One parser, so a broker written one way works everywhere: a URL (``mqtt://hub.lan:1883``,
``mqtts://hub.lan``) or the ``HOST:PORT`` people type after ``mosquitto_sub -h`` (plain MQTT,
port 1883 when left out). Passwords ride in URLs (``mqtt://alice%2Fphone:secret@hub.lan``), so
every message and log line that shows one goes through :func:`redact_url` or ``str(BrokerURL)``.
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
    """The URL without its password, for messages and logs (also when it does not parse)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # an out-of-range port, say: show what was written, minus the secret
        return _hide_password(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if port is not None:
        host = f"{host}:{port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _hide_password(text: str) -> str:
    """``[scheme://]user:password@rest`` with the password as ``***``, by plain string
    splitting: for text that is not a valid URL, where a parser may put the secret anywhere
    (``alice/phone:secret@hub`` parses as a path)."""
    head, at, rest = text.rpartition("@")
    if not at:
        return text
    scheme, sep, login = head.rpartition("://")
    user, colon, _password = login.partition(":")
    return f"{scheme}{sep}{user}{colon}{'***' if colon else ''}@{rest}"

_FORMS: Final = "use HOST:PORT, mqtt://HOST:PORT or mqtts://HOST:8883"


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
        """``mqtt://[user:pass@]host[:1883]`` or ``mqtts://...`` (``tcp://``/``ssl://`` too),
        or ``[user:pass@]host[:port]`` without a scheme, which is plain MQTT.

        Errors quote what was written (password hidden), not a normalized form of it.
        """
        given = text.strip()
        if not given:
            raise InvalidURL(f"the broker address is empty: {_FORMS}")
        shown = _hide_password(given)
        url = given if "://" in given else "mqtt://" + given
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            ipv6 = " (an IPv6 address goes in brackets: [::1]:1883)" \
                if parts.netloc.rpartition("@")[2].count(":") > 1 else ""
            raise InvalidURL(f"invalid broker address {shown!r}: {exc}{ipv6}; {_FORMS}") from None
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES:
            raise InvalidURL(
                f"unsupported broker URL scheme {parts.scheme!r} in {shown!r}:"
                " use mqtt:// or mqtts://"
            )
        if not parts.hostname:
            raise InvalidURL(f"broker address {shown!r} has no host name; {_FORMS}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            hint = " (write a / in a username as %2F)" if "@" in parts.path else ""
            raise InvalidURL(
                f"broker address {shown!r} must not have a path or query{hint}; {_FORMS}"
            )
        tls, default_port = _SCHEMES[scheme]
        return cls(
            host=parts.hostname,
            port=port or default_port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def with_login(self, username: str | None, password: str | None) -> BrokerURL:
        """This broker with the login replaced where one is given (flags and environment
        win over what the URL itself says)."""
        return BrokerURL(
            self.host, self.port, self.tls,
            self.username if username is None else username,
            self.password if password is None else password,
        )

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        auth = ""
        if self.username:
            auth = self.username + (":***" if self.password else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{auth}{host}:{self.port}"
