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
    "select-simple": ("select -M simple", ("-S", "-M", "simple")),
    "select-connect": ("select -C", ("-S", "-C")),
}

# The unrecorded warm-up run: a workload every target runs in every mode (PgBouncer 1.18 cannot
# run -M prepared in transaction mode).
WARMUP_WORKLOAD = "select-simple"

# --auth: how pgbench logs in.  "trust": as DBUSER, no password anywhere (PostgreSQL's hba and
# both poolers trust it).  "scram": as SCRAM_USER with its password (PGPASSWORD); PostgreSQL,
# PgBouncer and pgcorral each check it with SCRAM-SHA-256, and the poolers know the password
# (PgBouncer's userlist.txt, pgcorral's user vault) to log in to PostgreSQL with SCRAM in turn.
SCRAM_USER = "bench_scram"
AUTHS: dict[str, str] = {"trust": DBUSER, "scram": SCRAM_USER}

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


def auth_user(auth: str) -> str:
    """The user pgbench connects as for an --auth value."""
    return AUTHS[auth]


#: What --builds accepts: "src" runs src/ as it is (compiled if `make build` ran there),
#: "pure" runs a copy of src/'s .py files only (the pure-Python fallback), "base" runs the
#: git revision --base-rev, compiled with mypyc in a copy (the cost of a change, measured in
#: the same run: e.g. the counters of issue 12 against the revision before them).
BUILDS = ("src", "pure", "base")


def pgcorral_name(workers: int, build: str = "src") -> str:
    return f"pgcorral-w{workers}" + ("" if build == "src" else f"-{build}")


def target_names(targets: list[str], workers: list[int], builds: list[str]) -> list[str]:
    """The targets of a run, in --targets order, "pgcorral" expanded per workers value and
    build."""
    names: list[str] = []
    for t in targets:
        if t == "pgcorral":
            names += [pgcorral_name(w, b) for w in workers for b in builds]
        else:
            names.append(t)
    return names
