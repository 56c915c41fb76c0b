"""The hub's HTTP side (``--http``): live dashboard, ``/api/users``, ``/healthz``, ``/metrics``.

A layer above the application (it reads the service and the engine) and below the command
line. :mod:`hub.web.access` (the address rule and the token) is plain standard library, so
the command line checks ``--http`` without loading aiohttp; :mod:`hub.web.server` is the rest.
"""

from hub.web.access import HttpAddress, HttpAddressError, http_access_error, parse_http_address

__all__ = ["HttpAddress", "HttpAddressError", "http_access_error", "parse_http_address"]
