"""The workers' shared budget: the same answers as the one-process budget, whichever worker
asks, with limits that hold for the sum of all workers (also from a second process)."""

from __future__ import annotations

import multiprocessing
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcorral.pool.budget import FULL, OK, RULE_FULL, LocalBudget
from pgcorral.supervisor.shared import SharedBudget, SharedTable


def test_limits_hold_over_the_sum_of_workers() -> None:
    table = SharedTable.create(3)
    a, b, c = (SharedBudget(table, i) for i in range(3))
    assert a.claim(1, 2, 4) == OK
    assert b.claim(1, 2, 4) == OK
    assert c.claim(1, 2, 4) == RULE_FULL  # rule 1 holds 2 of 2, in two workers
    assert c.claim(0, 0, 4) == OK
    assert c.claim(2, 9, 4) == OK
    assert a.claim(2, 9, 4) == FULL  # 4 of 4 in all
    assert table.total() == 4
    a.release(1)
    assert c.claim(1, 2, 4) == OK


def test_a_victim_swaps_in_one_step() -> None:
    table = SharedTable.create(2)
    a, b = SharedBudget(table, 0), SharedBudget(table, 1)
    assert a.claim(1, 1, 2) == OK and b.claim(2, 5, 2) == OK
    assert a.claim(2, 5, 2) == FULL
    assert a.claim(2, 5, 2, victim=1) == OK  # a gives back its rule-1 connection
    assert table.total() == 2 and b.claim(1, 1, 2) == FULL


def test_a_dead_workers_row_is_cleared() -> None:
    table = SharedTable.create(2)
    a, b = SharedBudget(table, 0), SharedBudget(table, 1)
    for _ in range(3):
        assert a.claim(0, 0, 3) == OK
    a.waiting(0, 1)
    assert b.waiting_elsewhere() and b.claim(0, 0, 3) == FULL
    assert table.clear(0) == {"connections": 3, "waiting": 1}
    assert not b.waiting_elsewhere() and b.claim(0, 0, 3) == OK


def test_wanted_elsewhere_follows_the_waiters() -> None:
    table = SharedTable.create(2)
    a, b = SharedBudget(table, 0), SharedBudget(table, 1)
    assert a.claim(1, 5, 10) == OK
    assert not a.wanted_elsewhere(1, 10)
    b.waiting(1, 1)  # someone waits under the same rule
    assert a.wanted_elsewhere(1, 10)
    b.waiting(1, -1)
    b.waiting(2, 1)  # under another rule, while the pool is not full: no help
    assert not a.wanted_elsewhere(1, 10)
    assert a.wanted_elsewhere(1, 1)  # the pool is full: closing any connection helps


def test_freed_is_told_only_when_others_wait() -> None:
    table = SharedTable.create(2)
    a, b = SharedBudget(table, 0), SharedBudget(table, 1)
    told: list[int] = []
    a.on_freed = lambda: told.append(1)
    assert a.claim(0, 0, 5) == OK and a.claim(0, 0, 5) == OK
    a.release(0)
    assert told == []
    b.waiting(0, 1)
    a.release(0)
    assert told == [1]


ops = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["claim", "release"]),
                         st.integers(0, 3)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_same_answers_as_one_local_budget(steps: list[tuple[int, str, int]]) -> None:
    """Three workers on the shared table answer as one LocalBudget would for the pool."""
    table = SharedTable.create(3)
    workers = [SharedBudget(table, i) for i in range(3)]
    local = LocalBudget()
    held: list[list[int]] = [[], [], []]
    maxima = {0: 0, 1: 2, 2: 3, 3: 1}
    for worker, op, rule in steps:
        if op == "claim":
            got = workers[worker].claim(rule, maxima[rule], 5)
            assert got == local.claim(rule, maxima[rule], 5)
            if got == OK:
                held[worker].append(rule)
        elif held[worker] and rule < len(held[worker]):
            taken = held[worker].pop(rule)
            workers[worker].release(taken)
            local.release(taken)
        assert table.total() == local.total


def _claim_many(fd: int, worker: int, n: int, out: multiprocessing.Queue[int]) -> None:
    budget = SharedBudget(SharedTable(fd, 2), worker)
    out.put(sum(budget.claim(1, 150, 1000) == OK for _ in range(n)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_two_processes_never_exceed_the_rule() -> None:
    table = SharedTable.create(2)
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[int] = ctx.Queue()
    procs = [ctx.Process(target=_claim_many, args=(table.fd, i, 500, out)) for i in range(2)]
    for proc in procs:
        proc.start()
    granted = [out.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(30)
    assert sum(granted) == 150
    assert table.total() == 150
