"""The one error type a caller of the presence API handles."""


class PresenceError(ValueError):
    """A call the service refuses: bad id, unknown status, too long a custom status, ..."""
