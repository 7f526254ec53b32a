"""Pool policy: which server connection a client gets, when a new one may be opened, who waits.

Pure policy with no I/O and an injected clock. The network layer owns the sockets; here a server
connection is a ``Slot`` carrying an opaque ``conn`` the network layer attaches. Every change of a
slot's state goes through the few methods of ``Pool`` (as PgBouncer's ``objects.c``), so the
counts stay exact:

    request() -> Grant(idle slot) | Grant(new slot [, victim to close]) | Waiter
    opened(slot) / discard(slot) / release(slot)   (each may satisfy waiters)

Limits: ``max_connections`` over all slots, and the best-matching rule of the limits file per
database/user (pgagroal's order). When the global limit is reached and another database/user
has an idle connection, that connection is closed to make room (pgagroal does the same).
Waiters are served in FIFO order per database/user; a waiter that cannot be served yet does not
hold up waiters of other pairs that can.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pgcorral.config import LimitRule, best_limit_rule

Key = tuple[str, str]  # (real database, user)

OPENING = "opening"
IDLE = "idle"
ACTIVE = "active"
CLOSED = "closed"


class Slot:
    """One server connection, as the pool sees it."""

    __slots__ = ("conn", "created_at", "id", "key", "last_used", "rule", "state")

    def __init__(self, slot_id: int, key: Key, rule: LimitRule | None, now: float) -> None:
        self.id = slot_id
        self.key = key
        self.rule = rule
        self.state = OPENING
        self.created_at = now
        self.last_used = now
        self.conn: Any = None  # the network layer's server connection

    def __repr__(self) -> str:
        return f"<Slot {self.id} {self.key[1]}@{self.key[0]} {self.state}>"


@dataclass(slots=True)
class Grant:
    """What a client gets: an idle slot, or a new slot to open (after closing ``victim``)."""

    slot: Slot
    new: bool
    victim: Slot | None = None


class Waiter:
    """A client waiting for a slot. ``notify`` is called once, with the grant."""

    __slots__ = ("deadline", "key", "notify", "seq")

    def __init__(self, key: Key, seq: int, deadline: float | None,
                 notify: Callable[[Grant], None]) -> None:
        self.key = key
        self.seq = seq
        self.deadline = deadline
        self.notify = notify


class Pool:
    def __init__(self, max_connections: int, limits: Sequence[LimitRule],
                 clock: Callable[[], float]) -> None:
        self.max_connections = max_connections
        self.limits = tuple(limits)
        self.clock = clock
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._slots: dict[int, Slot] = {}
        self._idle: dict[Key, list[Slot]] = {}  # LIFO: the most recently used is reused first
        self._per_rule: dict[int, int] = {}  # id(rule) -> slots held under it
        self._waiters: dict[Key, deque[Waiter]] = {}
        self._waiting = 0
        self._rules: dict[Key, LimitRule | None] = {}

    # --- queries -----------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return len(self._slots)

    @property
    def waiting(self) -> int:
        return self._waiting

    def slots(self) -> Iterator[Slot]:
        return iter(list(self._slots.values()))

    def count(self, state: str) -> int:
        return sum(1 for s in self._slots.values() if s.state == state)

    def rule_for(self, key: Key) -> LimitRule | None:
        try:
            return self._rules[key]
        except KeyError:
            rule = best_limit_rule(self.limits, key[0], key[1]) if self.limits else None
            self._rules[key] = rule
            return rule

    def set_limits(self, limits: Sequence[LimitRule]) -> None:
        """New limit rules (reload). Slots already held keep counting against their old rule."""
        self.limits = tuple(limits)
        self._rules.clear()

    # --- the transitions ---------------------------------------------------------------------

    def request(self, key: Key, timeout: float | None,
                notify: Callable[[Grant], None]) -> Grant | Waiter:
        """A slot for ``key`` now, or a Waiter registered until ``timeout`` seconds pass."""
        queue = self._waiters.get(key)
        if not queue:  # nobody of this pair is ahead in line
            grant = self._try_grant(key)
            if grant is not None:
                return grant
        deadline = None if timeout is None else self.clock() + timeout
        waiter = Waiter(key, next(self._seq), deadline, notify)
        self._waiters.setdefault(key, deque()).append(waiter)
        self._waiting += 1
        return waiter

    def take_idle(self, key: Key) -> Slot | None:
        """The most recently used idle slot of ``key`` if one is free and nobody of that pair
        waits; else None (the caller then goes through ``request``). The transaction
        pipeline's fast path, without a Grant."""
        if key in self._waiters:
            return None
        stack = self._idle.get(key)
        if not stack:
            return None
        slot = stack.pop()
        if not stack:
            del self._idle[key]
        slot.state = ACTIVE
        return slot

    def cancel(self, waiter: Waiter) -> bool:
        """Forget a waiter (timed out, or its client left). False if it was already served."""
        queue = self._waiters.get(waiter.key)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        self._waiting -= 1
        if not queue:
            del self._waiters[waiter.key]
        return True

    def opened(self, slot: Slot) -> None:
        """A new slot finished logging in and is now in use by the client that asked for it."""
        slot.state = ACTIVE
        slot.last_used = self.clock()

    def release(self, slot: Slot) -> None:
        """A clean slot comes back: hand it to a waiter of the same pair or keep it idle."""
        if slot.state == CLOSED:
            return
        slot.last_used = self.clock()
        queue = self._waiters.get(slot.key)
        if queue:
            slot.state = ACTIVE
            self._notify(queue.popleft(), Grant(slot, new=False))
            return
        slot.state = IDLE
        self._idle.setdefault(slot.key, []).append(slot)
        if self._waiting:
            self._dispatch()

    def checkout_idle(self, slot: Slot) -> None:
        """Take a specific idle slot out of the pool (for maintenance such as validation)."""
        self._remove_idle(slot)
        slot.state = ACTIVE

    def discard(self, slot: Slot) -> None:
        """A slot is gone (closed, failed to open, broken). Its capacity serves waiters."""
        if slot.state == CLOSED:
            return
        if slot.state == IDLE:
            self._remove_idle(slot)
        slot.state = CLOSED
        del self._slots[slot.id]
        if slot.rule is not None:
            self._per_rule[id(slot.rule)] -= 1
        if self._waiting:
            self._dispatch()

    def expired_waiters(self, now: float) -> list[Waiter]:
        return [w for q in self._waiters.values() for w in q
                if w.deadline is not None and w.deadline <= now]

    def idle_slots(self) -> list[Slot]:
        return [s for stack in self._idle.values() for s in stack]

    def count_key(self, key: Key) -> int:
        """Slots held for ``key`` (opening, in use or idle)."""
        return sum(1 for s in self._slots.values() if s.key == key)

    def reserve_new(self, key: Key) -> Slot | None:
        """A new slot for prefill, only if the limits allow it without evicting anything and
        nobody is waiting (waiters come first)."""
        rule = self.rule_for(key)
        if self._waiting or len(self._slots) >= self.max_connections:
            return None
        if rule is not None and self._per_rule.get(id(rule), 0) >= rule.max_size:
            return None
        slot = Slot(next(self._ids), key, rule, self.clock())
        self._slots[slot.id] = slot
        if rule is not None:
            self._per_rule[id(rule)] = self._per_rule.get(id(rule), 0) + 1
        return slot

    def expired_idle(self, now: float, idle_timeout: float, max_age: float) -> list[Slot]:
        """Idle slots past ``idle_timeout`` since their last use or past ``max_age`` since they
        were opened (0 disables either rule)."""
        return [s for s in self.idle_slots() if self.too_old(s, now, max_age)
                or (idle_timeout > 0 and now - s.last_used > idle_timeout)]

    @staticmethod
    def too_old(slot: Slot, now: float, max_age: float) -> bool:
        return max_age > 0 and now - slot.created_at > max_age

    # --- internals ---------------------------------------------------------------------------

    def _try_grant(self, key: Key) -> Grant | None:
        stack = self._idle.get(key)
        if stack:
            slot = stack.pop()
            if not stack:
                del self._idle[key]
            slot.state = ACTIVE
            return Grant(slot, new=False)
        rule = self.rule_for(key)
        rule_full = rule is not None and self._per_rule.get(id(rule), 0) >= rule.max_size
        victim = None
        if rule_full or len(self._slots) >= self.max_connections:
            # Make room by closing the least recently used idle slot of another pair: under
            # the same rule when the rule is what is full, else anywhere.
            victim = self._oldest_idle_elsewhere(key, rule if rule_full else None)
            if victim is None:
                return None
            self._remove_idle(victim)
            victim.state = CLOSED
            del self._slots[victim.id]
            if victim.rule is not None:
                self._per_rule[id(victim.rule)] -= 1
        slot = Slot(next(self._ids), key, rule, self.clock())
        self._slots[slot.id] = slot
        if rule is not None:
            self._per_rule[id(rule)] = self._per_rule.get(id(rule), 0) + 1
        return Grant(slot, new=True, victim=victim)

    def _oldest_idle_elsewhere(self, key: Key, rule: LimitRule | None) -> Slot | None:
        best: Slot | None = None
        for other, stack in self._idle.items():
            if other == key or not stack or (rule is not None and stack[0].rule is not rule):
                continue
            if best is None or stack[0].last_used < best.last_used:
                best = stack[0]
        return best

    def _remove_idle(self, slot: Slot) -> None:
        stack = self._idle.get(slot.key)
        if stack is not None and slot in stack:
            stack.remove(slot)
            if not stack:
                del self._idle[slot.key]

    def _dispatch(self) -> None:
        """Serve waiters in arrival order, skipping pairs that still cannot be served."""
        heads = sorted((q[0] for q in self._waiters.values()), key=lambda w: w.seq)
        for waiter in heads:
            queue = self._waiters.get(waiter.key)
            while queue:
                grant = self._try_grant(waiter.key)
                if grant is None:
                    break
                self._notify(queue.popleft(), grant)
            if queue is not None and not queue:
                self._waiters.pop(waiter.key, None)

    def _notify(self, waiter: Waiter, grant: Grant) -> None:
        self._waiting -= 1
        queue = self._waiters.get(waiter.key)
        if queue is not None and not queue:
            del self._waiters[waiter.key]
        waiter.notify(grant)
