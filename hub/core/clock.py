"""Clocks: the engine takes ``now`` from one, so tests and simulations can own time.

Two readings, because they answer different questions. ``now()`` drives every timer (heartbeat
timeouts, away, offline, graces): it is monotonic, so an NTP step of the wall clock (normal when
a Raspberry Pi without a real-time clock boots) neither times out every device at once nor keeps
a dead one present for an hour. ``wall()`` labels things for people and other machines
(``lastSeen``, activity times, event ``ts``): epoch milliseconds, stepped with the system.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> int:
        """Monotonic milliseconds: only ever compared with each other (timers)."""

    def wall(self) -> int:
        """Milliseconds since the epoch (integer, like every time on the wire)."""


class SystemClock:
    """``now()`` is the monotonic clock, started at the wall time of construction (so the two
    agree until the wall clock is stepped, which keeps numbers in logs readable)."""

    def __init__(self) -> None:
        self._base = time.time_ns() // 1_000_000 - time.monotonic_ns() // 1_000_000

    def now(self) -> int:
        return time.monotonic_ns() // 1_000_000 + self._base

    def wall(self) -> int:
        return time.time_ns() // 1_000_000


class FakeClock:
    """A settable clock for tests and simulations: ``advance`` moves both readings,
    ``step_wall`` only the wall clock (an NTP step)."""

    def __init__(self, start: int = 1_700_000_000_000) -> None:
        self.t = start
        self.wall_offset = 0

    def now(self) -> int:
        return self.t

    def wall(self) -> int:
        return self.t + self.wall_offset

    def advance(self, ms: int) -> int:
        self.t += ms
        return self.t

    def step_wall(self, ms: int) -> int:
        self.wall_offset += ms
        return self.wall()
