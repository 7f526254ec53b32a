"""The connection budget: how many server connections exist, in all, and under each limit rule.

``Pool`` keeps its own slots, idle stacks and waiters; what it may *open* is asked of a budget.
With one process the budget is ``LocalBudget`` (plain integers). With several worker processes
it is ``supervisor.shared.SharedBudget``: the same counts in shared memory, claimed under one
cross-process lock, so ``max_connections`` and every rule's ``max_size`` hold across all
workers at every instant.

Rules are numbered: 0 is "no rule", rule ``i`` of the limits file is ``i + 1``.
"""

from __future__ import annotations

from typing import Protocol

#: claim() results
OK = 0
FULL = 1  # max_connections reached
RULE_FULL = 2  # the rule's max_size reached

NO_RULE = 0


class Budget(Protocol):
    def claim(self, rule: int, rule_max: int, total_max: int, victim: int = -1) -> int:
        """Take one connection under ``rule`` if the total stays within ``total_max`` and the
        rule's count within ``rule_max`` (rule 0: no rule bound). With ``victim`` (a rule
        number), one of this process's connections under that rule is given back in the same
        step (the caller closes it). OK, else RULE_FULL (checked first) or FULL."""
        ...

    def release(self, rule: int) -> None:
        """A connection under ``rule`` is gone."""
        ...

    def adopt(self, rule: int) -> None:
        """A connection under ``rule`` handed over by another worker, which still counts it
        until this one has it (so the count is briefly one high, never low)."""
        ...

    def rebuild(self, counts: dict[int, int]) -> None:
        """This process's counts per rule, recomputed (the rules changed on reload)."""
        ...

    def waiting(self, rule: int, delta: int) -> None:
        """This process has ``delta`` more (or fewer) clients waiting under ``rule``."""
        ...

    def wanted_elsewhere(self, rule: int, total_max: int) -> bool:
        """Would closing one of this process's idle connections under ``rule`` let a client
        waiting in another process get one? (Always False with one process.)"""
        ...

    def waiting_elsewhere(self) -> bool:
        """Does any other process have clients waiting?"""
        ...


class LocalBudget:
    """The budget of a single process: plain counters."""

    def __init__(self) -> None:
        self.total = 0
        self.per_rule: dict[int, int] = {}

    def claim(self, rule: int, rule_max: int, total_max: int, victim: int = -1) -> int:
        per_rule = self.per_rule
        held = per_rule.get(rule, 0) - (1 if victim == rule else 0)
        if rule != NO_RULE and held >= rule_max:
            return RULE_FULL
        if self.total - (1 if victim >= 0 else 0) >= total_max:
            return FULL
        if victim >= 0:
            per_rule[victim] -= 1
        else:
            self.total += 1
        per_rule[rule] = per_rule.get(rule, 0) + 1
        return OK

    def release(self, rule: int) -> None:
        self.total -= 1
        self.per_rule[rule] -= 1

    def adopt(self, rule: int) -> None:
        self.total += 1
        self.per_rule[rule] = self.per_rule.get(rule, 0) + 1

    def rebuild(self, counts: dict[int, int]) -> None:
        self.per_rule = dict(counts)
        self.total = sum(counts.values())

    def waiting(self, rule: int, delta: int) -> None:
        pass

    def wanted_elsewhere(self, rule: int, total_max: int) -> bool:
        return False

    def waiting_elsewhere(self) -> bool:
        return False
