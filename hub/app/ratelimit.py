"""Per-device message rate limit: a flooding device is throttled alone, O(1) per message.

GCRA (the "virtual scheduling" form of a token bucket): one float per device, the time its
next message is due, instead of a bucket's two numbers. ``rate`` messages/s sustained,
``burst`` at once.

Why the table stays small without living on the engine's devices: a device whose due time
has passed is in exactly the state of a device never seen (it may send its whole burst), so
its entry carries no information and :meth:`RateLimiter.sweep` drops it. Only devices that sent
within the last ``burst / rate`` seconds hold an entry: at 1M devices heartbeating every 30 s,
about one second's worth of senders (33k entries) between sweeps, instead of one per device.
A flood of made-up ids is bounded the same way, and by :data:`MAX_TRACKED` between sweeps.
"""

from __future__ import annotations

#: entries kept between two sweeps before the table is emptied (a flood of made-up ids must
#: not grow memory; emptying only resets limits, it never blocks a well-behaved device)
MAX_TRACKED = 200_000


class RateLimiter:
    __slots__ = ("_due", "_interval", "_tolerance", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("device rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._interval = 1000.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._due: dict[tuple[str, str], float] = {}

    def allow(self, user: str, device: str, now: int) -> bool:
        """May this message of ``user/device``, received at ``now`` (ms), through?"""
        due_of = self._due
        key = (user, device)
        due = due_of.get(key, now)
        if due < now:
            due = now
        if due - now > self._tolerance:
            return False
        if len(due_of) >= MAX_TRACKED and key not in due_of:
            due_of.clear()
        due_of[key] = due + self._interval
        return True

    def sweep(self, now: int) -> None:
        """Forget devices whose next message is already due (they are as good as unseen)."""
        self._due = {key: due for key, due in self._due.items() if due > now}

    def __len__(self) -> int:
        return len(self._due)
