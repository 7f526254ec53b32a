"""Pool policy with a fake clock: reuse, limits, eviction, waiters, and a stateful model check."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import SimpleNamespace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pgcorral.config import LimitRule, best_limit_rule
from pgcorral.pool.budget import LocalBudget
from pgcorral.pool.pool import (
    ACTIVE,
    CLOSED,
    IDLE,
    OPENING,
    Grant,
    Key,
    Pool,
    Slot,
    Waiter,
    apply_limits,
)

A: Key = ("db1", "alice")
B: Key = ("db1", "bob")
C: Key = ("db2", "alice")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limit(database: str, user: str, max_size: int, line: int = 1) -> LimitRule:
    return LimitRule(line=line, database=database, aliases=(), user=user, max_size=max_size,
                     initial_size=0, min_size=0)


class Recorder:
    """Notify callbacks that record the grants they receive, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Grant]] = []

    def __call__(self, name: str) -> Callable[[Grant], None]:
        def notify(grant: Grant) -> None:
            self.calls.append((name, grant))
        return notify

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]


def never(grant: Grant) -> None:  # pragma: no cover - called only on a bug
    raise AssertionError(f"unexpected notify with {grant}")


def make_pool(max_connections: int = 10, limits: tuple[LimitRule, ...] = ()
              ) -> tuple[Pool, FakeClock]:
    clock = FakeClock()
    return Pool(max_connections, limits, clock), clock


def grant(pool: Pool, key: Key, notify: Callable[[Grant], None] = never) -> Grant:
    result = pool.request(key, None, notify)
    assert isinstance(result, Grant), result
    return result


def new_active(pool: Pool, key: Key) -> Slot:
    g = grant(pool, key)
    assert g.new and g.victim is None
    assert g.slot.state == OPENING
    pool.opened(g.slot)
    assert g.slot.state == ACTIVE
    return g.slot


def wait(pool: Pool, key: Key, notify: Callable[[Grant], None],
         timeout: float | None = None) -> Waiter:
    result = pool.request(key, timeout, notify)
    assert isinstance(result, Waiter), result
    return result


# --- reuse ----------------------------------------------------------------------------------


def test_idle_reuse_is_lifo_per_pair() -> None:
    pool, clock = make_pool()
    a1, a2, a3 = (new_active(pool, A) for _ in range(3))
    b1 = new_active(pool, B)
    for slot in (a1, a2, b1, a3):
        clock.now += 1
        pool.release(slot)
        assert slot.state == IDLE
    assert pool.count(IDLE) == 4
    got = [grant(pool, A) for _ in range(3)]
    assert [(g.slot, g.new) for g in got] == [(a3, False), (a2, False), (a1, False)]
    assert all(g.slot.state == ACTIVE for g in got)
    g = grant(pool, B)
    assert (g.slot, g.new) == (b1, False)
    g = grant(pool, A)  # nothing idle for A any more: a new connection
    assert g.new and g.slot not in (a1, a2, a3)
    assert pool.total == 5


def test_release_stamps_last_used() -> None:
    pool, clock = make_pool()
    slot = new_active(pool, A)
    assert slot.created_at == 100.0
    clock.now = 142.0
    pool.release(slot)
    assert slot.last_used == 142.0


def test_max_connections_is_never_exceeded() -> None:
    pool, _ = make_pool(max_connections=3)
    slots = [new_active(pool, k) for k in (A, A, B)]
    assert pool.total == 3
    rec = Recorder()
    for k in (A, B, C):
        wait(pool, k, rec(k[1]))
    assert pool.total == 3
    assert pool.waiting == 3
    assert {s.id for s in pool.slots()} == {s.id for s in slots}


def test_limit_rule_caps_its_pairs() -> None:
    pool, _ = make_pool(10, (limit("db1", "all", 2),))
    new_active(pool, A)
    new_active(pool, B)
    rec = Recorder()
    wait(pool, A, rec("a"))  # db1 is at its rule's max_size, though 8 connections are free
    wait(pool, B, rec("b"))
    assert new_active(pool, C).rule is None  # db2 has no rule
    assert pool.total == 3


def test_exact_rule_is_preferred_and_counted_apart() -> None:
    exact = limit("db1", "alice", 1, line=1)
    broad = limit("db1", "all", 3, line=2)
    pool, _ = make_pool(10, (exact, broad))
    assert pool.rule_for(A) is exact
    assert pool.rule_for(B) is broad
    assert new_active(pool, A).rule is exact
    wait(pool, A, Recorder()("a"))
    for _ in range(3):
        new_active(pool, B)
    wait(pool, B, Recorder()("b"))


def test_discarding_a_slot_frees_its_rule() -> None:
    pool, _ = make_pool(10, (limit("db1", "all", 1),))
    slot = new_active(pool, A)
    rec = Recorder()
    wait(pool, B, rec("b"))
    pool.discard(slot)
    assert rec.names() == ["b"]
    assert rec.calls[0][1].new
    assert rec.calls[0][1].slot.key == B


# --- eviction -------------------------------------------------------------------------------


def test_full_pool_evicts_the_oldest_idle_slot_of_another_pair() -> None:
    pool, clock = make_pool(max_connections=3)
    a1, a2, b1 = new_active(pool, A), new_active(pool, A), new_active(pool, B)
    for slot in (a2, b1, a1):  # a2 is the least recently used
        clock.now += 1
        pool.release(slot)
    g = grant(pool, C)
    assert g.new
    assert g.victim is a2
    assert a2.state == CLOSED
    assert pool.total == 3
    assert a2 not in pool.idle_slots()
    assert set(pool.idle_slots()) == {a1, b1}
    pool.discard(a2)  # the network layer closes the victim: a no-op for the pool
    assert pool.total == 3


def test_full_pool_never_evicts_an_idle_slot_of_the_same_pair() -> None:
    pool, _ = make_pool(max_connections=1)
    slot = new_active(pool, A)
    pool.release(slot)
    g = grant(pool, A)
    assert (g.slot, g.new, g.victim) == (slot, False, None)


def test_full_pool_without_idle_slots_makes_the_client_wait() -> None:
    pool, _ = make_pool(max_connections=2)
    new_active(pool, A)
    new_active(pool, B)
    wait(pool, C, Recorder()("c"))


def test_eviction_frees_the_rule_of_the_victim() -> None:
    pool, _ = make_pool(2, (limit("db1", "all", 1),))
    a = new_active(pool, A)
    c1 = new_active(pool, C)
    pool.release(a)
    g = grant(pool, C)  # the pool is full: a (db1) is evicted to make room for db2
    assert g.victim is a
    pool.discard(c1)
    assert grant(pool, B).new  # db1's rule no longer counts the victim


def test_full_rule_evicts_an_idle_slot_of_another_pair_under_the_same_rule() -> None:
    pool, _ = make_pool(10, (limit("db1", "all", 1),))
    a = new_active(pool, A)
    pool.release(a)
    result = pool.request(B, 30.0, never)
    assert isinstance(result, Grant)
    assert result.victim is a


def test_full_rule_evicts_the_oldest_idle_slot_under_that_rule() -> None:
    pool, clock = make_pool(3, (limit("db2", "all", 2),))
    d: Key = ("db2", "bob")
    c1, c2 = new_active(pool, C), new_active(pool, C)
    for slot in (c1, c2):
        clock.now += 1
        pool.release(slot)
    # db2's rule is full of C's idle slots: D gets the least recently used one closed at once.
    g = grant(pool, d)
    assert g.new and g.victim is c1
    assert pool.total == 2


def test_full_rule_never_evicts_a_slot_under_another_rule() -> None:
    pool, _ = make_pool(10, (limit("db1", "all", 1), limit("db2", "all", 5, line=2)))
    new_active(pool, A)  # db1's rule is full, and the slot is in use
    c = new_active(pool, C)
    pool.release(c)  # idle, but it counts against db2's rule: closing it would not help B
    rec = Recorder()
    wait(pool, B, rec("b"))
    assert c.state == IDLE


def test_full_rule_and_full_pool_evict_under_the_rule() -> None:
    pool, clock = make_pool(3, (limit("db1", "all", 2),))
    a1, a2, c = new_active(pool, A), new_active(pool, A), new_active(pool, C)
    for slot in (c, a1, a2):  # c is the least recently used, but closing it frees no db1 room
        clock.now += 1
        pool.release(slot)
    g = grant(pool, B)
    assert g.victim is a1
    assert pool.total == 3
    assert c.state == IDLE


def test_release_under_a_full_rule_serves_a_waiter_of_another_pair_of_that_rule() -> None:
    pool, _ = make_pool(10, (limit("db1", "all", 1),))
    a = new_active(pool, A)
    rec = Recorder()
    wait(pool, B, rec("b"))  # db1's rule is full and its only slot is in use
    pool.release(a)  # A has no waiter: a goes idle and is closed to make room for B
    [(name, g)] = rec.calls
    assert name == "b"
    assert g.new and g.victim is a and g.slot.key == B
    assert pool.total == 1


# --- waiters --------------------------------------------------------------------------------


def test_waiters_are_served_fifo_per_pair_on_release() -> None:
    pool, _ = make_pool(max_connections=1)
    slot = new_active(pool, A)
    rec = Recorder()
    w1, w2, w3 = wait(pool, A, rec("1")), wait(pool, A, rec("2")), wait(pool, A, rec("3"))
    assert w1.seq < w2.seq < w3.seq
    for expected in ("1", "2", "3"):
        pool.release(slot)
        name, g = rec.calls[-1]
        assert name == expected
        assert (g.slot, g.new, g.victim) == (slot, False, None)
        assert slot.state == ACTIVE
    assert pool.waiting == 0
    pool.release(slot)
    assert slot.state == IDLE
    assert len(rec.calls) == 3


def test_waiters_are_served_fifo_per_pair_on_discard() -> None:
    pool, _ = make_pool(max_connections=1)
    slot = new_active(pool, A)
    rec = Recorder()
    wait(pool, A, rec("1"))
    wait(pool, A, rec("2"))
    pool.discard(slot)
    assert slot.state == CLOSED
    assert rec.names() == ["1"]
    g1 = rec.calls[0][1]
    assert g1.new and g1.victim is None and g1.slot.key == A
    pool.opened(g1.slot)
    pool.discard(g1.slot)
    assert rec.names() == ["1", "2"]
    assert pool.total == 1
    assert pool.waiting == 0


def test_a_new_request_queues_behind_existing_waiters_of_its_pair() -> None:
    pool, _ = make_pool(max_connections=1)
    slot = new_active(pool, A)
    rec = Recorder()
    wait(pool, A, rec("first"))
    pool.release(slot)
    assert rec.names() == ["first"]
    # Nobody is waiting now; the slot is in use again, so a later request waits its turn.
    wait(pool, A, rec("second"))
    pool.release(slot)
    assert rec.names() == ["first", "second"]


def test_waiter_of_another_pair_is_served_when_a_slot_is_discarded() -> None:
    pool, _ = make_pool(max_connections=1)
    slot = new_active(pool, A)
    rec = Recorder()
    wait(pool, B, rec("b"))
    pool.discard(slot)
    [(name, g)] = rec.calls
    assert name == "b"
    assert g.new and g.slot.key == B and g.victim is None
    assert pool.total == 1


def test_waiter_of_another_pair_is_served_by_evicting_a_released_slot() -> None:
    pool, _ = make_pool(max_connections=1)
    slot = new_active(pool, A)
    rec = Recorder()
    wait(pool, B, rec("b"))
    pool.release(slot)  # no A waiter: the slot goes idle, and is closed to make room for B
    [(name, g)] = rec.calls
    assert name == "b"
    assert g.new and g.slot.key == B and g.victim is slot
    assert slot.state == CLOSED
    assert pool.total == 1
    assert pool.idle_slots() == []


def test_pairs_are_served_in_arrival_order() -> None:
    pool, _ = make_pool(max_connections=2)
    s1, s2 = new_active(pool, C), new_active(pool, C)
    rec = Recorder()
    wait(pool, B, rec("b"))
    wait(pool, A, rec("a"))
    pool.discard(s1)
    assert rec.names() == ["b"]
    pool.discard(s2)
    assert rec.names() == ["b", "a"]


def test_blocked_pair_does_not_hold_up_another_pair() -> None:
    pool, _ = make_pool(3, (limit("db1", "alice", 1),))
    new_active(pool, A)
    c1 = new_active(pool, C)
    new_active(pool, C)
    rec = Recorder()
    wait(pool, A, rec("a"))  # A is at its rule limit
    wait(pool, B, rec("b"))  # B only needs room in the pool
    pool.discard(c1)
    assert rec.names() == ["b"]


def test_cancel_a_waiter() -> None:
    pool, _ = make_pool(max_connections=1)
    slot = new_active(pool, A)
    rec = Recorder()
    w1 = wait(pool, A, rec("1"))
    wait(pool, A, rec("2"))
    assert pool.waiting == 2
    assert pool.cancel(w1) is True
    assert pool.waiting == 1
    assert pool.cancel(w1) is False
    assert pool.waiting == 1
    pool.release(slot)
    assert rec.names() == ["2"]


def test_cancel_after_being_served_is_refused() -> None:
    pool, _ = make_pool(max_connections=1)
    slot = new_active(pool, A)
    rec = Recorder()
    w = wait(pool, A, rec("1"))
    pool.release(slot)
    assert rec.names() == ["1"]
    assert pool.cancel(w) is False
    assert pool.waiting == 0


def test_expired_waiters_by_deadline() -> None:
    pool, clock = make_pool(max_connections=1)
    new_active(pool, A)
    rec = Recorder()
    w1 = wait(pool, A, rec("1"), timeout=1.0)
    w_none = wait(pool, B, rec("none"), timeout=None)
    clock.now += 2.0
    w5 = wait(pool, C, rec("5"), timeout=5.0)
    assert (w1.deadline, w_none.deadline, w5.deadline) == (101.0, None, 107.0)
    assert pool.expired_waiters(100.5) == []
    assert pool.expired_waiters(101.0) == [w1]
    assert set(map(id, pool.expired_waiters(1000.0))) == {id(w1), id(w5)}
    assert pool.cancel(w1)
    assert pool.expired_waiters(1000.0) == [w5]
    assert rec.calls == []


def test_discard_and_release_of_a_closed_slot_are_no_ops() -> None:
    pool, _ = make_pool(max_connections=1)
    slot = new_active(pool, A)
    pool.discard(slot)
    pool.discard(slot)
    pool.release(slot)
    assert slot.state == CLOSED
    assert pool.total == 0
    assert pool.idle_slots() == []


def test_discard_of_an_idle_slot() -> None:
    pool, _ = make_pool()
    slot = new_active(pool, A)
    pool.release(slot)
    pool.discard(slot)
    assert pool.idle_slots() == []
    assert grant(pool, A).new


def test_checkout_idle() -> None:
    pool, _ = make_pool()
    slot = new_active(pool, A)
    pool.release(slot)
    pool.checkout_idle(slot)
    assert slot.state == ACTIVE
    assert pool.idle_slots() == []
    pool.release(slot)
    assert pool.idle_slots() == [slot]


def test_set_limits_applies_to_new_requests() -> None:
    pool, _ = make_pool(10, (limit("db1", "all", 1),))
    slot = new_active(pool, A)
    pool.set_limits((limit("db1", "all", 2),))
    assert pool.rule_for(A) is slot.rule  # held slots count under the rule that matches now
    assert grant(pool, A).new
    assert isinstance(pool.request(A, None, never), Waiter)  # 2 of 2 under the new rule


def test_reload_keeps_counting_draining_connections() -> None:
    """A slot discarded while its connection drains stays in the budget until ``gone``; a
    reload in between must keep counting it, or ``gone`` takes it off twice and the pool then
    opens one more than max_connections (seen as 5 of 4 in the soak with SIGHUPs)."""
    pool, _ = make_pool(2, (limit("db1", "all", 2),))
    a, b = new_active(pool, A), new_active(pool, B)
    a.conn = SimpleNamespace(draining=True)
    pool.discard(a)
    waiting = Recorder()
    assert isinstance(pool.request(A, None, waiting("a2")), Waiter)  # a holds its place
    pool.set_limits((limit("db1", "all", 2),))  # SIGHUP, the same rules
    budget = pool.budget
    assert isinstance(budget, LocalBudget)
    assert budget.total == 2 and budget.per_rule == {1: 2}
    assert isinstance(pool.request(B, None, waiting("b2")), Waiter)
    pool.gone(a)  # a's place goes to the first waiter, none is left over for the second
    assert waiting.names() == ["a2"]
    assert budget.total == 2 and pool.total == 2
    pool.discard(b)
    assert waiting.names() == ["a2", "b2"] and budget.total == 2


def test_reload_rebuilds_the_budget_from_every_pool_sharing_it() -> None:
    """A primary's pool and a replica's share one budget: a reload counts both."""
    clock = FakeClock()
    primary = Pool(3, (), clock)
    replica = Pool(3, (), clock, primary.budget, server="replica1")
    new_active(primary, A)
    new_active(replica, A)
    new_active(replica, B)
    apply_limits((primary, replica), (limit("db1", "all", 3),))
    budget = primary.budget
    assert isinstance(budget, LocalBudget)
    assert budget.total == 3 and budget.per_rule == {1: 3}
    assert isinstance(primary.request(C, None, never), Waiter)  # 3 of max_connections 3
    assert replica.rule_for(A) is primary.rule_for(A) is primary.limits[0]


# --- stateful model check -------------------------------------------------------------------

KEYS: list[Key] = [A, B, C, ("db2", "bob")]
RULE_SETS: list[tuple[LimitRule, ...]] = [
    (),
    (limit("db1", "all", 2),),
    (limit("db1", "alice", 1, line=1), limit("db2", "all", 2, line=2)),
    (limit("all", "bob", 1),),
]


class PoolMachine(RuleBasedStateMachine):
    """Random request/open/release/discard/cancel/expire sequences against a model."""

    @initialize(max_connections=st.integers(1, 4), rules=st.sampled_from(RULE_SETS))
    def setup(self, max_connections: int, rules: tuple[LimitRule, ...]) -> None:
        self.clock = FakeClock()
        self.pool = Pool(max_connections, rules, self.clock)
        self.rules = rules
        self.held: dict[int, Slot] = {}  # slot id -> slot held by a client
        self.idle: dict[Key, list[Slot]] = {}  # in release order
        self.queues: dict[Key, list[Waiter]] = {}
        self.waiters: list[Waiter] = []  # every waiter ever created
        self.notified: set[int] = set()
        self.handing: Slot | None = None  # a released slot that must go to a waiter
        self.draining: dict[int, Slot] = {}  # discarded, the budget holds them until gone()

    # -- bookkeeping of grants ---------------------------------------------------------------

    def take(self, key: Key, g: Grant) -> None:
        slot = g.slot
        assert slot.key == key
        assert slot.id not in self.held
        if g.new:
            assert slot.state == OPENING
            if g.victim is not None:
                victim = g.victim
                assert victim.key != key
                assert victim.state == CLOSED
                stack = self.idle.get(victim.key, [])
                assert victim in stack, "victim was not idle"
                assert stack[0] is victim, "victim is not the oldest idle slot of its pair"
                stack.remove(victim)
        else:
            assert g.victim is None
            assert slot.state == ACTIVE
            if self.handing is slot:
                self.handing = None
            else:
                stack = self.idle.get(key, [])
                assert stack and stack[-1] is slot, "idle reuse is not LIFO"
                stack.pop()
        self.held[slot.id] = slot

    def notify_for(self, box: list[Waiter]) -> Callable[[Grant], None]:
        def notify(g: Grant) -> None:
            [waiter] = box
            assert id(waiter) not in self.notified, "waiter notified twice"
            self.notified.add(id(waiter))
            queue = self.queues.get(waiter.key, [])
            assert queue and queue[0] is waiter, "waiters of a pair not served FIFO"
            queue.pop(0)
            self.take(waiter.key, g)
        return notify

    # -- rules -------------------------------------------------------------------------------

    @rule(key=st.sampled_from([A, A, A, *KEYS]),
          timeout=st.one_of(st.none(), st.sampled_from([0.0, 1, 5])),
          open_now=st.booleans())
    def request(self, key: Key, timeout: float | None, open_now: bool) -> None:
        box: list[Waiter] = []
        queued_before = bool(self.queues.get(key))
        result = self.pool.request(key, timeout, self.notify_for(box))
        if isinstance(result, Grant):
            assert not queued_before, "a request jumped ahead of waiters of its pair"
            self.take(key, result)
            if open_now and result.new:
                self.pool.opened(result.slot)
        else:
            box.append(result)
            self.queues.setdefault(key, []).append(result)
            self.waiters.append(result)

    def _held(self, state: str) -> list[Slot]:
        return sorted((s for s in self.held.values() if s.state == state), key=lambda s: s.id)

    @precondition(lambda self: any(s.state == OPENING for s in self.held.values()))
    @rule(i=st.integers(0, 50))
    def open_slot(self, i: int) -> None:
        slots = self._held(OPENING)
        self.pool.opened(slots[i % len(slots)])

    @precondition(lambda self: any(s.state == ACTIVE for s in self.held.values()))
    @rule(i=st.integers(0, 50), dt=st.sampled_from([0.0, 0.5, 2.0]))
    def release(self, i: int, dt: float) -> None:
        self.clock.now += dt
        slots = self._held(ACTIVE)
        slot = slots[i % len(slots)]
        del self.held[slot.id]
        if self.queues.get(slot.key):
            self.handing = slot
        else:
            self.idle.setdefault(slot.key, []).append(slot)
        self.pool.release(slot)
        assert self.handing is None, "a released slot was not handed to its pair's waiter"

    def _take_held(self, i: int) -> Slot:
        """The ``i``-th held slot (by id, wrapping), no longer held in the model."""
        slots = sorted(self.held.values(), key=lambda s: s.id)
        slot = slots[i % len(slots)]
        del self.held[slot.id]
        return slot

    @precondition(lambda self: bool(self.held))
    @rule(i=st.integers(0, 50))
    def discard_held(self, i: int) -> None:
        slot = self._take_held(i)
        self.pool.discard(slot)
        assert slot.state == CLOSED

    @precondition(lambda self: bool(self.held))
    @rule(i=st.integers(0, 50))
    def discard_draining(self, i: int) -> None:
        """Discarded while PostgreSQL has not closed it yet: its place is freed by gone()."""
        slot = self._take_held(i)
        slot.conn = SimpleNamespace(draining=True)
        self.pool.discard(slot)
        self.draining[slot.id] = slot

    @precondition(lambda self: bool(self.draining))
    @rule(i=st.integers(0, 50))
    def drained(self, i: int) -> None:
        slots = sorted(self.draining.values(), key=lambda s: s.id)
        slot = slots[i % len(slots)]
        del self.draining[slot.id]
        self.pool.gone(slot)

    @rule()
    def reload(self) -> None:
        """SIGHUP with the limits file unchanged: equal rules, new objects."""
        self.rules = tuple(dataclasses.replace(r) for r in self.rules)
        self.pool.set_limits(self.rules)

    @precondition(lambda self: any(self.idle.values()))
    @rule(i=st.integers(0, 50))
    def discard_idle(self, i: int) -> None:
        slots = [s for stack in self.idle.values() for s in stack]
        slot = slots[i % len(slots)]
        self.idle[slot.key].remove(slot)
        self.pool.discard(slot)
        assert slot.state == CLOSED

    @precondition(lambda self: bool(self.waiters))
    @rule(i=st.integers(0, 50))
    def cancel(self, i: int) -> None:
        waiter = self.waiters[i % len(self.waiters)]
        queue = self.queues.get(waiter.key, [])
        expected = waiter in queue
        assert self.pool.cancel(waiter) is expected
        if expected:
            queue.remove(waiter)

    @rule(dt=st.sampled_from([0.5, 1.0, 3.0]))
    def expire(self, dt: float) -> None:
        self.clock.now += dt
        now = self.clock.now
        expired = self.pool.expired_waiters(now)
        waiting = [w for q in self.queues.values() for w in q]
        assert {id(w) for w in expired} == {
            id(w) for w in waiting if w.deadline is not None and w.deadline <= now}
        for waiter in expired:
            assert self.pool.cancel(waiter)
            self.queues[waiter.key].remove(waiter)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def counts(self) -> None:
        pool = self.pool
        assert pool.total <= pool.max_connections
        idle = [s for stack in self.idle.values() for s in stack]
        assert pool.total == len(self.held) + len(idle)
        for slot in pool.slots():
            assert slot.rule is best_limit_rule(self.rules, *slot.key)
        for r in self.rules:
            held_under = sum(1 for s in pool.slots() if best_limit_rule(self.rules, *s.key) is r)
            assert held_under <= r.max_size, r
        assert pool.waiting == sum(len(q) for q in self.queues.values())

    @invariant()
    def state_counts(self) -> None:
        for state in (OPENING, ACTIVE, IDLE):
            assert self.pool.count(state) == sum(
                1 for s in self.pool.slots() if s.state == state), state

    @invariant()
    def budget(self) -> None:
        """The budget counts every slot held, idle or still draining, under its rule."""
        budget = self.pool.budget
        assert isinstance(budget, LocalBudget)
        counted = [*self.pool.slots(), *self.draining.values()]
        assert budget.total == len(counted) <= self.pool.max_connections
        for number in range(len(self.rules) + 1):
            assert budget.per_rule.get(number, 0) == sum(
                1 for s in counted if s.rule_no == number), number

    @invariant()
    def states(self) -> None:
        pool_idle = self.pool.idle_slots()
        assert {s.id for s in pool_idle}.isdisjoint(self.held), "slot both idle and held"
        assert sorted(s.id for s in pool_idle) == sorted(
            s.id for stack in self.idle.values() for s in stack)
        assert all(s.state == IDLE for s in pool_idle)
        assert all(s.state in (OPENING, ACTIVE) for s in self.held.values())
        assert {s.id for s in self.pool.slots()} == (
            set(self.held) | {s.id for s in pool_idle})

    @invariant()
    def no_needless_wait(self) -> None:
        """No waiter is left while the pool's policy could serve it right now."""
        pool = self.pool
        idle = pool.idle_slots()
        for key, queue in self.queues.items():
            if not queue:
                continue
            assert all(s.key != key for s in idle), f"{key} waits while its slot is idle"
            r = best_limit_rule(self.rules, *key)
            counted = [*pool.slots(), *self.draining.values()]
            rule_full = r is not None and sum(
                1 for s in counted if best_limit_rule(self.rules, *s.key) is r
            ) >= r.max_size
            if rule_full:
                servable = any(s.key != key and s.rule is r for s in idle)
            else:
                servable = len(counted) < pool.max_connections or any(
                    s.key != key for s in idle)
            assert not servable, f"{key} waits while the pool could serve it"


PoolMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_pool_state_machine = PoolMachine.TestCase


def test_expired_idle_by_idle_timeout_and_by_age() -> None:
    pool, clock = make_pool()
    old = new_active(pool, A)  # opened at 100
    clock.now = 150.0
    young = new_active(pool, B)  # opened at 150
    pool.release(old)  # last used at 150
    pool.release(young)
    clock.now = 155.0
    assert pool.expired_idle(clock.now, idle_timeout=10, max_age=0) == []
    assert pool.expired_idle(clock.now, idle_timeout=0, max_age=50) == [old]
    assert pool.expired_idle(clock.now, idle_timeout=4, max_age=0) == [old, young]
    assert pool.expired_idle(clock.now, idle_timeout=0, max_age=0) == []
    active = new_active(pool, ("db2", "carol"))
    clock.now = 1000.0
    assert active not in pool.expired_idle(clock.now, idle_timeout=1, max_age=1)


def test_reserve_new_for_prefill_respects_limits_and_waiters() -> None:
    pool, _ = make_pool(2, (limit("db1", "alice", 1),))
    first = pool.reserve_new(A, 99)
    assert first is not None and pool.count_key(A) == 1
    assert pool.reserve_new(A, 99) is None  # alice's rule is full
    assert pool.reserve_new(B, 99) is not None  # bob has no rule of his own
    assert pool.reserve_new(("db2", "carol"), 99) is None  # max_connections reached, no eviction


def test_reserve_new_leaves_room_to_waiters() -> None:
    pool, _ = make_pool(3, (limit("db1", "alice", 1),))
    assert pool.reserve_new(A, 99) is not None
    wait(pool, A, never)  # alice's rule is full: a second alice waits
    assert pool.reserve_new(B, 99) is None  # capacity is free, but a waiter comes first
