"""Human durations (``500ms``, ``30s``, ``5m``, ``1h``) for flags, config files and chat commands.

One parser for the hub CLI, the agent and the chat commands, so ``--heartbeat-interval 30s`` and
``/presence activity --since 1h`` mean the same thing everywhere. Everything inside the program
is integer milliseconds (the wire unit); these two functions are the only place text meets them.
"""

from __future__ import annotations

import math
import re
from typing import Final

_UNITS_MS: Final[dict[str, int]] = {
    "ms": 1,
    "s": 1_000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
}

# A number (with optional fraction) followed by an optional unit; spaces between are allowed.
_DURATION_RE: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*", re.IGNORECASE)

_HINT: Final = "use e.g. 500ms, 30s, 5m, 1h"


def _invalid(text: object, why: str = "") -> ValueError:
    shown = text if isinstance(text, str) and len(text) <= 40 else str(text)[:40]
    extra = f" ({why})" if why else ""
    return ValueError(f"invalid duration {shown!r}{extra}: {_HINT}")


def parse_duration_ms(text: str | int | float) -> int:
    """Milliseconds in ``text``: ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1.5s"``, ``"2d"``.

    A plain number (``30``, ``"30"``, ``0.5``) is seconds, because that is what people mean
    when they write a bare interval. Negative, infinite and NaN values are refused; fractions
    of a millisecond are rounded to the nearest millisecond.
    """
    if isinstance(text, bool):  # bool is an int; True seconds is never meant
        raise _invalid(text)
    if isinstance(text, int | float):
        if not math.isfinite(text) or text < 0:
            raise _invalid(text, "must be a finite number >= 0")
        return round(text * 1_000)
    if not isinstance(text, str):
        raise _invalid(text, f"not text but {type(text).__name__}")
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise _invalid(text)
    number, unit = match.groups()
    factor = _UNITS_MS[(unit or "s").lower()]
    return round(float(number) * factor)


def format_duration_ms(ms: int | float) -> str:
    """A short human form: ``450ms``, ``30s``, ``2m 5s``, ``1h 30m``, ``3d 4h``.

    Shows at most two units, largest first; the rest is truncated, which suits "last seen 2m 5s
    ago" displays. Negative values get a leading minus.
    """
    if not math.isfinite(ms):
        return str(ms)
    total = round(ms)
    if total < 0:
        return "-" + format_duration_ms(-total)
    if total < 1_000:
        return f"{total}ms"
    parts: list[str] = []
    remainder = total
    for unit in ("d", "h", "m", "s"):
        size = _UNITS_MS[unit]
        count, remainder = divmod(remainder, size)
        if count or parts:
            parts.append(f"{count}{unit}")
        if len(parts) == 2:
            break
    # Drop a trailing zero unit: "2m 0s" reads better as "2m".
    while len(parts) > 1 and parts[-1].startswith("0"):
        parts.pop()
    return " ".join(parts)
