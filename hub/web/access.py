"""Who may use the hub's HTTP side: the address rule and the token check.

The rule mirrors the broker's: an open listener only on loopback. The dashboard and
``/api/users`` show every user's whereabouts, so beyond 127.0.0.1/::1/localhost the hub needs
``--http-token`` and refuses to start without one. With a token, a request proves it with
``Authorization: Bearer TOKEN``, basic auth with the token as password (any user name: what a
browser's login prompt sends), or ``?token=TOKEN`` (what the page passes on to its event
stream, since ``EventSource`` cannot set headers).

Plain standard library on purpose: the command line validates ``--http`` before anything
starts, and that must work (and fail in one line) without aiohttp installed.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from hub.core.errors import PresenceError

#: host names that never leave the machine (besides every 127.0.0.0/8 and ::1 address)
LOOPBACK_NAMES = frozenset({"localhost"})


class HttpAddressError(ValueError):
    """An ``--http`` value that is not HOST:PORT, or a public one without a token."""


@dataclass(frozen=True, slots=True)
class HttpAddress:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def url(self) -> str:
        """Where a browser on this machine (or, beyond loopback, elsewhere) opens the page."""
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            import socket

            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def parse_http_address(value: str) -> HttpAddress:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6); port 0 lets the kernel pick one (tests)."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise HttpAddressError(f"invalid --http address {value!r}: use HOST:PORT, e.g. "
                               "127.0.0.1:8080")
    return HttpAddress(host, int(port))


def allowed_address(address: HttpAddress | str, token: str | None) -> HttpAddress:
    """The address to serve on, parsed; :class:`PresenceError` (one line) if it is refused."""
    if isinstance(address, str):
        address = parse_http_address(address)
    refused = http_access_error(address, token)
    if refused is not None:
        raise PresenceError(refused)
    return address


def http_access_error(address: HttpAddress, token: str | None) -> str | None:
    """Why the HTTP side must not start this way, or None. One line for the command line."""
    if token is not None and not token.strip():
        return "--http-token is empty: give a long random one (e.g. openssl rand -hex 24)"
    if token is None and not address.loopback:
        return (f"refusing to serve --http on {address.host}: the dashboard and /api/users "
                "show every user's presence to anyone who can reach it; give a token with "
                "--http-token (better: PRESENCE_HTTP_TOKEN), or serve on 127.0.0.1")
    return None


class TokenCheck:
    """Does a request carry the token? Every comparison takes the same time whatever the
    guess (``hmac.compare_digest``), so the token cannot be found a byte at a time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def _same(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token)

    def allows(self, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        given = query.get("token")
        if given is not None and self._same(given):
            return True
        auth = headers.get("Authorization", "")
        scheme, _, value = auth.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return self._same(value)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return False
            _user, sep, password = decoded.partition(":")
            return bool(sep) and self._same(password)
        return False
