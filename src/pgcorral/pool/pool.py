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

What may be opened is asked of a ``Budget`` (``pool.budget``): the counts of one process, or of
every worker process in shared memory. When the budget is spent and no idle slot of this
process can make room, ``on_starved`` tells the network layer, which asks the other workers to
close an idle connection; ``retry`` serves waiters once capacity came back.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pgcorral.config import LimitRule, best_limit_rule
from pgcorral.pool.budget import NO_RULE, OK, RULE_FULL, Budget, LocalBudget

Key = tuple[str, str]  # (real database, user)

OPENING = "opening"
IDLE = "idle"
ACTIVE = "active"
CLOSED = "closed"


class Slot:
    """One server connection, as the pool sees it."""

    __slots__ = ("conn", "created_at", "home", "id", "key", "last_used", "rule", "rule_no",
                 "state")

    def __init__(self, slot_id: int, key: Key, rule: LimitRule | None, now: float,
                 rule_no: int = NO_RULE, home: Pool | None = None) -> None:
        self.id = slot_id
        self.home = home  # the pool it belongs to (None: a connection kept outside pools)
        self.key = key
        self.rule = rule
        self.rule_no = rule_no  # the rule's number in the budget (0: none)
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

    __slots__ = ("deadline", "expire", "key", "notify", "rule_no", "seq", "since")

    def __init__(self, key: Key, seq: int, deadline: float | None,
                 notify: Callable[[Grant], None], expire: Callable[[], None] | None = None,
                 rule_no: int = NO_RULE, since: float = 0.0) -> None:
        self.key = key
        self.since = since  # the pool's clock when it began to wait
        self.seq = seq
        self.deadline = deadline
        self.notify = notify
        self.expire = expire  # called by the network layer once the deadline passed
        self.rule_no = rule_no


class Pool:
    def __init__(self, max_connections: int, limits: Sequence[LimitRule],
                 clock: Callable[[], float], budget: Budget | None = None,
                 server: str = "") -> None:
        #: the server section of a replica pool (issue 13: read routing); "" for the pool of
        #: the primary, whichever server that is now. Replica pools share the primary pool's
        #: budget, so max_connections and the limits hold over all servers together.
        self.server = server
        self.max_connections = max_connections
        self.limits = tuple(limits)
        self.clock = clock
        self.budget: Budget = budget if budget is not None else LocalBudget()
        #: called with (key, rule number, FULL or RULE_FULL) when a client must wait because
        #: the budget is spent and this process has no idle slot to close for it
        self.on_starved: Callable[[Key, int, int], None] | None = None
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._slots: dict[int, Slot] = {}
        self._draining: dict[int, Slot] = {}  # discarded, budget held until gone()
        self._idle: dict[Key, list[Slot]] = {}  # LIFO: the most recently used is reused first
        self._waiters: dict[Key, deque[Waiter]] = {}
        self._waiting = 0
        #: slots in use (ACTIVE), kept as they change state: read routing (least_busy) asks
        #: for it on every read-only transaction, so it must not scan the slots
        self._active = 0
        self._rules: dict[Key, LimitRule | None] = {}
        self._rule_numbers = {id(rule): i + 1 for i, rule in enumerate(self.limits)}
        #: PAUSE: databases whose clients get no server connection until RESUME ("*": all);
        #: they wait as for a full pool (``blocking_timeout`` applies)
        self.paused: set[str] = set()
        #: issue 13: no primary now (a failover is under way): every request waits, as for
        #: PAUSE, until ``hold(False)`` (blocking_timeout applies)
        self.held = False

    # --- queries -----------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return len(self._slots)

    @property
    def waiting(self) -> int:
        return self._waiting

    def slots(self) -> Iterator[Slot]:
        return iter(list(self._slots.values()))

    def waiting_by_key(self) -> dict[Key, tuple[int, float]]:
        """(clients waiting, when the first of them began to wait) per database/user."""
        return {key: (len(queue), queue[0].since) for key, queue in self._waiters.items()
                if queue}

    def is_paused(self, key: Key) -> bool:
        paused = self.paused
        return self.held or (bool(paused) and (key[0] in paused or "*" in paused))

    def hold(self, held: bool) -> None:
        """Hold every request (True) or serve who waited (False)."""
        was, self.held = self.held, held
        if was and not held and self._waiting:
            self._dispatch()

    def count(self, state: str) -> int:
        if state == ACTIVE:
            return self._active
        return sum(1 for s in self._slots.values() if s.state == state)

    def rule_for(self, key: Key) -> LimitRule | None:
        try:
            return self._rules[key]
        except KeyError:
            rule = best_limit_rule(self.limits, key[0], key[1]) if self.limits else None
            self._rules[key] = rule
            return rule

    def rule_number(self, rule: LimitRule | None) -> int:
        return NO_RULE if rule is None else self._rule_numbers[id(rule)]

    def set_limits(self, limits: Sequence[LimitRule]) -> None:
        """New limit rules (reload) for a pool that has its budget to itself; pools that share
        one (a primary's and its replicas') go through ``apply_limits`` together."""
        apply_limits((self,), limits)

    def relimit(self, limits: Sequence[LimitRule]) -> dict[int, int]:
        """New limit rules: slots held, draining ones included (the budget still counts
        them until ``gone``), count against the rule that matches them now. Their count per
        rule number, for the budget's rebuild."""
        self.limits = tuple(limits)
        self._rules.clear()
        self._rule_numbers = {id(rule): i + 1 for i, rule in enumerate(self.limits)}
        counts: dict[int, int] = {}
        for slot in (*self._slots.values(), *self._draining.values()):
            slot.rule = self.rule_for(slot.key)
            slot.rule_no = self.rule_number(slot.rule)
            counts[slot.rule_no] = counts.get(slot.rule_no, 0) + 1
        for queue in self._waiters.values():
            for waiter in queue:
                self.budget.waiting(waiter.rule_no, -1)
                waiter.rule_no = self.rule_number(self.rule_for(waiter.key))
                self.budget.waiting(waiter.rule_no, 1)
        return counts

    # --- the transitions ---------------------------------------------------------------------

    def request(self, key: Key, timeout: float | None, notify: Callable[[Grant], None],
                expire: Callable[[], None] | None = None) -> Grant | Waiter:
        """A slot for ``key`` now, or a Waiter registered until ``timeout`` seconds pass
        (``expire`` is what the network layer calls then, see ``expired_waiters``)."""
        queue = self._waiters.get(key)
        if not queue and not ((self.paused or self.held) and self.is_paused(key)):
            grant = self._try_grant(key)
            if grant is not None:
                return grant
        now = self.clock()
        deadline = None if timeout is None else now + timeout
        rule_no = self.rule_number(self.rule_for(key))
        waiter = Waiter(key, next(self._seq), deadline, notify, expire, rule_no, now)
        self._waiters.setdefault(key, deque()).append(waiter)
        self._waiting += 1
        self.budget.waiting(rule_no, 1)
        return waiter

    def take_idle(self, key: Key) -> Slot | None:
        """The most recently used idle slot of ``key`` if one is free and nobody of that pair
        waits; else None (the caller then goes through ``request``). The transaction
        pipeline's fast path, without a Grant."""
        if key in self._waiters or ((self.paused or self.held) and self.is_paused(key)):
            return None
        stack = self._idle.get(key)
        if not stack:
            return None
        slot = stack.pop()
        if not stack:
            del self._idle[key]
        slot.state = ACTIVE
        self._active += 1
        return slot

    def cancel(self, waiter: Waiter) -> bool:
        """Forget a waiter (timed out, or its client left). False if it was already served."""
        queue = self._waiters.get(waiter.key)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        self._waiting -= 1
        self.budget.waiting(waiter.rule_no, -1)
        if not queue:
            del self._waiters[waiter.key]
        return True

    def opened(self, slot: Slot) -> None:
        """A new slot finished logging in and is now in use by the client that asked for it."""
        if slot.state == OPENING:
            self._active += 1
        slot.state = ACTIVE
        slot.last_used = self.clock()

    def release(self, slot: Slot) -> bool:
        """A clean slot comes back: hand it to a waiter of the same pair or keep it idle.
        True when it went idle while a client of another worker waits for what it holds: the
        caller then hands the connection over, or takes it out and closes it."""
        if slot.state == CLOSED:
            return False
        was_active = slot.state == ACTIVE
        slot.last_used = self.clock()
        queue = self._waiters.get(slot.key)
        if queue and not ((self.paused or self.held) and self.is_paused(slot.key)):
            if not was_active:
                self._active += 1
            slot.state = ACTIVE
            self._notify(queue.popleft(), Grant(slot, new=False))
            return False
        if was_active:
            self._active -= 1
        slot.state = IDLE
        self._idle.setdefault(slot.key, []).append(slot)
        if self._waiting:
            self._dispatch()
        return slot.state == IDLE and self.budget.wanted_elsewhere(slot.rule_no,
                                                                   self.max_connections)

    def checkout_idle(self, slot: Slot) -> None:
        """Take a specific idle slot out of the pool (for maintenance such as validation)."""
        self._remove_idle(slot)
        if slot.state != ACTIVE:
            self._active += 1
        slot.state = ACTIVE

    def discard(self, slot: Slot) -> None:
        """A slot is gone (closed, failed to open, broken). Its capacity serves waiters, at
        once, or, while its connection is still draining (``conn.draining``: told to
        terminate, PostgreSQL has not closed it yet), when the network layer calls ``gone``."""
        if slot.state == CLOSED:
            return
        if slot.state == IDLE:
            self._remove_idle(slot)
        elif slot.state == ACTIVE:
            self._active -= 1
        slot.state = CLOSED
        del self._slots[slot.id]
        if getattr(slot.conn, "draining", False):
            self._draining[slot.id] = slot
            return
        self.budget.release(slot.rule_no)
        if self._waiting:
            self._dispatch()

    def gone(self, slot: Slot) -> None:
        """A draining connection is closed: its capacity is free now."""
        if self._draining.pop(slot.id, None) is not None:
            self.budget.release(slot.rule_no)
            if self._waiting:
                self._dispatch()

    def adopt(self, key: Key) -> Slot:
        """A connection for ``key`` handed over by another worker: a slot in use (ACTIVE)
        counted in this process's budget; the caller then releases it (to a waiter)."""
        rule = self.rule_for(key)
        rule_no = self.rule_number(rule)
        self.budget.adopt(rule_no)
        slot = Slot(next(self._ids), key, rule, self.clock(), rule_no, self)
        slot.state = ACTIVE
        self._active += 1
        self._slots[slot.id] = slot
        return slot

    def pause(self, database: str) -> None:
        """New requests of ``database`` ("*": every database) wait until ``resume``."""
        self.paused.add(database)

    def resume(self, database: str) -> None:
        """End a pause ("*": every pause) and serve who waited."""
        if database == "*":
            self.paused.clear()
        else:
            self.paused.discard(database)
        if self._waiting:
            self._dispatch()

    def retry(self) -> None:
        """Capacity may have come back elsewhere (another worker closed a connection)."""
        if self._waiting:
            self._dispatch()

    def evict_idle(self, rule_no: int | None) -> Slot | None:
        """Another worker needs room: the least recently used idle slot (under ``rule_no``
        when given), taken out of the pool (ACTIVE); the caller terminates its connection
        and discards it. None if there is none."""
        best: Slot | None = None
        for stack in self._idle.values():
            slot = stack[0]
            if rule_no is not None and slot.rule_no != rule_no:
                continue
            if best is None or slot.last_used < best.last_used:
                best = slot
        if best is not None:
            self.checkout_idle(best)
        return best

    def next_deadline(self) -> float | None:
        """The earliest deadline of a waiter (the heads of the queues)."""
        deadlines = [q[0].deadline for q in self._waiters.values() if q[0].deadline is not None]
        return min(deadlines) if deadlines else None

    def expired_waiters(self, now: float) -> list[Waiter]:
        return [w for q in self._waiters.values() for w in q
                if w.deadline is not None and w.deadline <= now]

    def idle_slots(self) -> list[Slot]:
        return [s for stack in self._idle.values() for s in stack]

    def count_key(self, key: Key) -> int:
        """Slots held for ``key`` (opening, in use or idle)."""
        return sum(1 for s in self._slots.values() if s.key == key)

    def reserve_new(self, key: Key, target: int) -> Slot | None:
        """A new slot for prefill while the rule of ``key`` holds fewer than ``target``
        connections (in every worker), only if the limits allow it without evicting anything
        and nobody is waiting (waiters come first)."""
        rule = self.rule_for(key)
        if self._waiting or self.budget.waiting_elsewhere():
            return None
        rule_no = self.rule_number(rule)
        cap = target if rule is None else min(target, rule.max_size)
        if self.budget.claim(rule_no, cap, self.max_connections) != OK:
            return None
        slot = Slot(next(self._ids), key, rule, self.clock(), rule_no, self)
        self._slots[slot.id] = slot
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
            self._active += 1
            return Grant(slot, new=False)
        rule = self.rule_for(key)
        rule_no = self.rule_number(rule)
        rule_max = rule.max_size if rule is not None else 0
        budget = self.budget
        outcome = budget.claim(rule_no, rule_max, self.max_connections)
        victim = None
        if outcome != OK:
            # Make room by closing the least recently used idle slot of another pair: under
            # the same rule when the rule is what is full, else anywhere.
            victim = self._oldest_idle_elsewhere(key, rule if outcome == RULE_FULL else None)
            if victim is None or budget.claim(rule_no, rule_max, self.max_connections,
                                              victim.rule_no) != OK:
                if self.on_starved is not None:
                    self.on_starved(key, rule_no, outcome)
                return None
            self._remove_idle(victim)
            victim.state = CLOSED
            del self._slots[victim.id]
        slot = Slot(next(self._ids), key, rule, self.clock(), rule_no, self)
        self._slots[slot.id] = slot
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
            if (self.paused or self.held) and self.is_paused(waiter.key):
                continue
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
        self.budget.waiting(waiter.rule_no, -1)
        queue = self._waiters.get(waiter.key)
        if queue is not None and not queue:
            del self._waiters[waiter.key]
        waiter.notify(grant)


def apply_limits(pools: Sequence[Pool], limits: Sequence[LimitRule]) -> None:
    """New limit rules (reload) for ``pools``, which share one budget: every slot they hold,
    draining ones included, is counted again under the rule that matches it now, and the
    budget's counts for this process are rebuilt from all of them at once (rebuilt from one
    pool, the others' connections would drop out of the count and the limits would let more
    through)."""
    counts: dict[int, int] = {}
    for pool in pools:
        for rule_no, n in pool.relimit(limits).items():
            counts[rule_no] = counts.get(rule_no, 0) + n
    if pools:
        pools[0].budget.rebuild(counts)
