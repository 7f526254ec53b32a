"""The memory the worker processes share: the connection budget of the whole pool.

One memfd (created by the supervisor, inherited by every worker) holds a table of 64-bit
integers: a row per worker with its pid, its server connections in all and per limit rule, and
its clients waiting in all and per rule. A worker writes only its own row. Claiming a new
connection reads every row and writes its own under one cross-process lock (``fcntl.lockf`` on
the memfd: the kernel drops it if its holder dies), so ``max_connections`` and each rule's
``max_size`` hold across workers at every instant. Giving one back needs no lock (one aligned
store by the row's only writer). When a worker dies the supervisor zeroes its row: the kernel
closed its sockets, so PostgreSQL ends those backends.

Why shared memory and not a coordinator process: a claim costs two system calls here instead of
a round trip through another event loop, and only opening a connection claims; taking an idle
connection of the worker's own pool touches nothing shared.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Callable

from pgcorral.pool.budget import FULL, NO_RULE, OK, RULE_FULL

#: Rules the table counts apart (rule numbers beyond it share the last column).
MAX_RULES = 256
_HEADER = 4
_PID, _TOTAL, _WAITING = 0, 1, 2
_COUNTS = 4
_WAITS = _COUNTS + MAX_RULES
_ROW = _WAITS + MAX_RULES
_MAGIC = 0x70676372  # "pgcr"


class SharedTable:
    def __init__(self, fd: int, workers: int) -> None:
        self.fd = fd
        self.workers = workers
        size = (_HEADER + workers * _ROW) * 8
        self._map = mmap.mmap(fd, size)
        self.ints = memoryview(self._map).cast("q")
        if self.ints[0] == 0:
            self.ints[0] = _MAGIC
            self.ints[1] = workers

    @classmethod
    def create(cls, workers: int) -> SharedTable:
        fd = os.memfd_create("pgcorral-shared", 0)
        os.ftruncate(fd, (_HEADER + workers * _ROW) * 8)
        os.set_inheritable(fd, True)
        return cls(fd, workers)

    def lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def base(self, worker: int) -> int:
        return _HEADER + worker * _ROW

    def set_pid(self, worker: int, pid: int) -> None:
        self.ints[self.base(worker) + _PID] = pid

    def clear(self, worker: int) -> dict[str, int]:
        """Forget a dead worker's row; what it held."""
        self.lock()
        try:
            base = self.base(worker)
            held = {"connections": self.ints[base + _TOTAL],
                    "waiting": self.ints[base + _WAITING]}
            self.ints[base:base + _ROW] = memoryview(bytes(_ROW * 8)).cast("q")
        finally:
            self.unlock()
        return held

    def total(self) -> int:
        return sum(self.ints[self.base(w) + _TOTAL] for w in range(self.workers))

    def waiting(self, worker: int) -> int:
        return int(self.ints[self.base(worker) + _WAITING])

    def row(self, worker: int) -> dict[str, int]:
        base = self.base(worker)
        return {"pid": self.ints[base + _PID], "connections": self.ints[base + _TOTAL],
                "waiting": self.ints[base + _WAITING]}

    def close(self) -> None:
        self.ints.release()
        self._map.close()


def _column(rule: int) -> int:
    return rule if rule < MAX_RULES else MAX_RULES - 1


class SharedBudget:
    """``pool.budget.Budget`` over the shared table, for worker ``worker``."""

    def __init__(self, table: SharedTable, worker: int) -> None:
        self.table = table
        self.worker = worker
        self._base = table.base(worker)
        self._others = [table.base(w) for w in range(table.workers) if w != worker]
        self._all = [table.base(w) for w in range(table.workers)]
        #: called when this worker gave a connection back while others wait (the supervisor
        #: then tells them to try again)
        self.on_freed: Callable[[], None] | None = None

    def claim(self, rule: int, rule_max: int, total_max: int, victim: int = -1) -> int:
        ints, base, col = self.table.ints, self._base, _column(rule)
        self.table.lock()
        try:
            if rule != NO_RULE:
                held = sum(ints[b + _COUNTS + col] for b in self._all)
                if victim >= 0 and _column(victim) == col:
                    held -= 1
                if held >= rule_max:
                    return RULE_FULL
            total = sum(ints[b + _TOTAL] for b in self._all)
            if victim >= 0:
                total -= 1
            if total >= total_max:
                return FULL
            if victim >= 0:
                ints[base + _COUNTS + _column(victim)] -= 1
            else:
                ints[base + _TOTAL] += 1
            ints[base + _COUNTS + col] += 1
            return OK
        finally:
            self.table.unlock()

    def release(self, rule: int) -> None:
        ints, base = self.table.ints, self._base
        ints[base + _TOTAL] -= 1
        ints[base + _COUNTS + _column(rule)] -= 1
        if self.on_freed is not None and self.waiting_elsewhere():
            self.on_freed()

    def adopt(self, rule: int) -> None:
        ints, base = self.table.ints, self._base
        self.table.lock()
        try:
            ints[base + _TOTAL] += 1
            ints[base + _COUNTS + _column(rule)] += 1
        finally:
            self.table.unlock()

    def rebuild(self, counts: dict[int, int]) -> None:
        ints, base = self.table.ints, self._base
        self.table.lock()
        try:
            for col in range(MAX_RULES):
                ints[base + _COUNTS + col] = 0
            for rule, n in counts.items():
                ints[base + _COUNTS + _column(rule)] += n
            ints[base + _TOTAL] = sum(counts.values())
        finally:
            self.table.unlock()

    def waiting(self, rule: int, delta: int) -> None:
        ints, base = self.table.ints, self._base
        ints[base + _WAITING] += delta
        ints[base + _WAITS + _column(rule)] += delta

    def waiting_elsewhere(self) -> bool:
        ints = self.table.ints
        return any(ints[b + _WAITING] for b in self._others)

    def wanted_elsewhere(self, rule: int, total_max: int) -> bool:
        ints = self.table.ints
        if not any(ints[b + _WAITING] for b in self._others):
            return False
        col = _column(rule)
        if any(ints[b + _WAITS + col] for b in self._others):
            return True  # someone waits under this very rule
        return sum(ints[b + _TOTAL] for b in self._all) >= total_max
