"""A pooler's process tree from /proc: its CPU time (user, sys, all processes), its leftovers."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds a process tree has used so far, and how many processes it has now."""

    user: float
    sys: float
    procs: int

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(self.user - other.user, self.sys - other.sys, self.procs)


class _Stat(NamedTuple):
    ppid: int
    user: int  # clock ticks, its reaped children included
    sys: int
    start: int  # clock ticks after boot: with the PID, identifies the process
    zombie: bool


def _read_stat(pid: int) -> _Stat | None:
    """/proc/<pid>/stat, the fields we use; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:  # gone meanwhile
        return None
    # "pid (comm) state ppid ..."; comm may hold spaces and parentheses: split after the last ')'.
    # fields[0] is field 3 (state) of proc(5): ppid 4, utime 14, stime 15, cutime 16,
    # cstime 17, starttime 22.
    fields = data[data.rindex(b")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    # cutime/cstime: children that exited and were waited for.  Counting them keeps the sum
    # steady when a worker exits (its time moves into its parent's cutime).
    return _Stat(int(fields[1]), utime + cutime, stime + cstime, int(fields[19]), fields[0] == b"Z")


def _tree(root: int) -> dict[int, _Stat]:
    """Root and all its descendants (empty when root is gone)."""
    stats: dict[int, _Stat] = {}
    with os.scandir("/proc") as it:
        for entry in it:
            if entry.name.isdigit() and (st := _read_stat(int(entry.name))) is not None:
                stats[int(entry.name)] = st
    if root not in stats:
        return {}
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st.ppid, []).append(pid)
    tree = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        tree[pid] = stats[pid]
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu(root: int) -> CpuSample | None:
    """User and system CPU seconds of root and every descendant; None when root is gone."""
    tree = _tree(root)
    if not tree:
        return None
    user = sum(st.user for st in tree.values())
    system = sum(st.sys for st in tree.values())
    return CpuSample(user / CLK_TCK, system / CLK_TCK, len(tree))


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of every descendant of root: what may outlive it."""
    return [(pid, st.start) for pid, st in _tree(root).items() if pid != root]


def stop_leftovers(procs: list[tuple[int, int]], grace: float = 5) -> list[int]:
    """SIGTERM, then SIGKILL, those of procs (from descendants()) that are still running as
    the same processes (same PID and start time); returns the PIDs that were still there."""

    def alive() -> list[int]:
        return [
            pid
            for pid, start in procs
            if (st := _read_stat(pid)) is not None and st.start == start and not st.zombie
        ]

    left = alive()
    still = left
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not still:
            break
        for pid in still:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while (still := alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
    return left
