"""Names shared by every module: database, user, targets, workloads, pooling modes, the log line."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from . import REPO

DBNAME = "pgbench"
DBUSER = "postgres"
RESULTS_DIR = REPO / "bench" / "results"
# What --targets accepts; "pgcorral" becomes one target per --workers value (pgcorral-w1, ...).
ALL_TARGETS = ("direct", "pgbouncer", "pgcorral")

# name -> (label, pgbench arguments).  tpcb-like is pgbench's default builtin script.
WORKLOADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "simple": ("tpcb -M simple", ("-M", "simple")),
    "extended": ("tpcb -M extended", ("-M", "extended")),
    "prepared": ("tpcb -M prepared", ("-M", "prepared")),
    "select-prepared": ("select -M prepared", ("-S", "-M", "prepared")),
    "select-connect": ("select -C", ("-S", "-C")),
}


PROFILE_WORKLOAD = os.environ.get("PGCORRAL_PROFILE_WORKLOAD", "select-prepared")
PROFILE_CLIENTS = 100


@dataclass(frozen=True)
class ModeSpec:
    """How one pooling mode maps onto each pooler's configuration."""

    pgbouncer_pool_mode: str
    pgcorral_pipeline: str


# Adding a mode is one entry here (plus whatever the poolers need for it).  Caveat for
# "transaction": PgBouncer 1.18 (Debian 12) has no protocol-level prepared statement
# support, so the -M prepared workloads fail through it in that mode.
MODES: dict[str, ModeSpec] = {
    "session": ModeSpec(pgbouncer_pool_mode="session", pgcorral_pipeline="session"),
    "transaction": ModeSpec(pgbouncer_pool_mode="transaction", pgcorral_pipeline="transaction"),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def connects_per_transaction(workload: str) -> bool:
    """pgbench -C: a new connection per transaction, so per transaction = per connection."""
    return "-C" in WORKLOADS[workload][1]


def pgcorral_name(workers: int) -> str:
    return f"pgcorral-w{workers}"


def target_names(targets: list[str], workers: list[int]) -> list[str]:
    """The targets of a run, in --targets order, "pgcorral" expanded per workers value."""
    names: list[str] = []
    for t in targets:
        names += [pgcorral_name(w) for w in workers] if t == "pgcorral" else [t]
    return names
