"""blocking_timeout for both pipelines: one timer per worker, set at the pool's earliest deadline.

A client that must wait for a server connection gets a ``Waiter`` from ``Pool.request`` with its
deadline and an ``expire`` callback; ``WaitTimer.watch`` then makes sure a timer fires at the
earliest deadline of any waiter. When it fires, every waiter past its deadline is expired (its
``expire`` takes it out of line with ``Pool.cancel`` and refuses the client with 53300), and the
timer is set again for the next deadline. No timer per client, no polling while nobody waits.
"""

from __future__ import annotations

import asyncio
import time

from pgcorral.pool.pool import Pool


class WaitTimer:
    def __init__(self, pool: Pool) -> None:
        self.pools = [pool]  # the primary pool, then each replica pool made (net.context)
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def watch(self) -> None:
        """A waiter joined the line (or the line changed): fire at the earliest deadline."""
        deadline = None
        for pool in self.pools:
            at = pool.next_deadline()
            if at is not None and (deadline is None or at < deadline):
                deadline = at
        if deadline is None:
            return
        if self._handle is not None:
            if self._at <= deadline:
                return
            self._handle.cancel()
        self._at = deadline
        self._handle = asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = time.monotonic()
        for pool in self.pools:
            for waiter in pool.expired_waiters(now):
                if waiter.expire is not None:
                    waiter.expire()
                else:
                    pool.cancel(waiter)
        self.watch()
