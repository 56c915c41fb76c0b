"""Keeping the active hub's lease, and waiting for it as a standby.

:class:`LeaseKeeper` renews the lease of :mod:`hub.stores.lease` in the background and tells the
service (it implements :class:`~hub.app.service.Leadership`) whether the hub may act:

* A standby-mode hub (``--standby``) trusts its lease only until ``renewed + ttl * MARGIN``,
  measured on its own monotonic clock from the moment it *sent* the last successful renewal.
  Redis expires the key no earlier than ``ttl`` after it applied that renewal, which is later,
  so while :meth:`LeaseKeeper.valid` is True no other hub can have taken over. A hub that was
  paused (SIGSTOP, a long GC, a VM migration) finds its lease not valid when it wakes up, and
  asks Redis (:meth:`LeaseKeeper.confirm`) before it fires a timer or applies a message.
* A single hub (no ``--standby``; the lease only keeps a second hub from starting) keeps
  working when Redis is out of reach: there is nobody to take over, and a hub that stopped
  acting would be a deaf hub. It stops only when Redis says another hub holds the lease.

Every store write is fenced as well (see :mod:`hub.stores.lease`): whatever a clock says, a hub
that lost its lease cannot overwrite the new active hub's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from hub.stores import StoreError
from hub.stores.lease import LeaseHolder, RedisLease

log = logging.getLogger(__name__)

#: share of the lease's TTL a hub trusts it after sending a renewal: the rest absorbs the
#: renewal's round trip and the drift between this clock and Redis's
MARGIN = 0.75
#: renewals per TTL: two may fail (a Redis hiccup) before the lease is in doubt
RENEWALS_PER_TTL = 4
#: how often a standby asks for the lease: a takeover starts at most this long after the
#: active hub's lease lapsed (one small Lua call; cheap for Redis at this rate)
STANDBY_POLL_S = 0.25


class LeaseKeeper:
    """Renews ``lease`` every ``ttl / RENEWALS_PER_TTL``; see the module docstring."""

    def __init__(self, lease: RedisLease, monotonic: Callable[[], float] = time.monotonic
                 ) -> None:
        self.lease = lease
        self.strict = lease.mode == "standby"
        self._monotonic = monotonic
        ttl = lease.ttl_ms / 1000
        self.interval = ttl / RENEWALS_PER_TTL
        self._trust = ttl * MARGIN
        self.valid_until = 0.0
        #: set when Redis says another hub holds the lease
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def acquired(self, sent_at: float) -> None:
        """The lease was acquired by a call sent at ``sent_at`` (monotonic seconds)."""
        self.valid_until = sent_at + self._trust

    def valid(self) -> bool:
        if self.lost.is_set():
            return False
        return not self.strict or self._monotonic() < self.valid_until

    async def confirm(self) -> bool:
        sent = self._monotonic()
        if await self.lease.renew():
            self.valid_until = sent + self._trust
            return True
        self.lost.set()
        return False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="presence-lease")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while not self.lost.is_set():
            await asyncio.sleep(self.interval)
            try:
                ours = await self.confirm()
            except StoreError as exc:
                if not self._failing:
                    self._failing = True
                    log.warning("cannot renew the hub's lease: %s%s", exc,
                                "; this hub stops acting once it lapses" if self.strict else
                                "; this single hub keeps working")
                continue
            if self._failing:
                self._failing = False
                if ours:
                    log.info("the hub's lease is renewed again")
            if not ours:
                holder = await self._holder()
                log.warning("another hub took the lease over%s",
                            f": {holder.describe()}" if holder is not None else "")

    async def _holder(self) -> LeaseHolder | None:
        try:
            return await self.lease.holder()
        except StoreError:
            return None


async def wait_for_lease(lease: RedisLease, stop: asyncio.Event,
                         monotonic: Callable[[], float] = time.monotonic,
                         on_holder: Callable[[LeaseHolder], None] | None = None
                         ) -> float | None:
    """As a standby: try to take the lease every :data:`STANDBY_POLL_S` (at most) until it is
    ours (the monotonic time the winning call was sent) or ``stop`` is set (None).

    Says in the log who is active, once, and again whenever that changes (and to
    ``on_holder``, at every look).
    """
    interval = min(STANDBY_POLL_S, lease.ttl_ms / 1000 / RENEWALS_PER_TTL)
    seen: tuple[int, str] | None = None
    failing = False
    while not stop.is_set():
        sent = monotonic()
        try:
            holder = await lease.try_acquire()
        except StoreError as exc:
            if not failing:
                log.warning("standby: %s; retrying", exc)
            failing = True
            holder = None
        else:
            if failing:
                log.info("standby: Redis answers again")
            failing = False
            if holder is None:
                return sent
            if on_holder is not None:
                on_holder(holder)
            if (holder.token, holder.instance) != seen:
                seen = (holder.token, holder.instance)
                log.info("standby: the active hub is %s; taking over when its lease lapses",
                         holder.describe())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    return None
