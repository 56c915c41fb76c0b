"""Clocks: the engine takes ``now`` from one, so tests and simulations can own time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> int:
        """Milliseconds since the epoch (integer, like every time on the wire)."""


class SystemClock:
    """Wall-clock milliseconds; timers in the hub only ever compare these with each other."""

    def now(self) -> int:
        return time.time_ns() // 1_000_000


class FakeClock:
    """A settable clock for tests and simulations."""

    def __init__(self, start: int = 1_700_000_000_000) -> None:
        self.t = start

    def now(self) -> int:
        return self.t

    def advance(self, ms: int) -> int:
        self.t += ms
        return self.t
