"""The command line: Config, parse_args and main (what bench/run.py calls)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import REPO
from .common import (
    ALL_TARGETS,
    AUTHS,
    BUILDS,
    MODES,
    PROFILE_CLIENTS,
    PROFILE_WORKLOAD,
    RESULTS_DIR,
    WORKLOADS,
)
from .grid import Bench
from .procs import raise_interrupt


@dataclass
class Config:
    """What to run, from the command line (stored in the JSON as is)."""

    rounds: int
    duration: int
    clients: list[int]
    workloads: list[str]
    auth: list[str]  # each value is its own set of cells: trust (DBUSER), scram (SCRAM_USER)
    pgbouncer_scram_secret: str  # what PgBouncer's userlist.txt holds: plain or verifier
    targets: list[str]
    workers: list[int]  # one pgcorral target per value
    builds: list[str]  # ... and per build (src, pure, base)
    base_rev: str  # the git revision of the base build
    scale: int
    pool_size: int
    mode: str
    jobs: int
    profile: bool
    py_spy: str | None
    pgcorral_python: str
    start_timeout: float
    warmup: int
    tls: bool  # TLS on both legs of every target (bench/corralbench/tls.py)
    metrics_scrape: float  # > 0: pgcorral targets serve /metrics, scraped this often (s)
    keep: bool
    results_dir: str


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """The options (bench/README.md lists them), with the --quick defaults applied."""
    default_py = REPO / ".venv" / "bin" / "python"
    p = argparse.ArgumentParser(
        description="pgbench: direct PostgreSQL vs PgBouncer vs pgcorral (see bench/README.md)"
    )

    def csv(kind: Callable[[str], Any], choices: Sequence[str] = ()) -> Callable[[str], list[Any]]:
        def conv(s: str) -> list[Any]:
            items = [kind(x.strip()) for x in s.split(",") if x.strip()]
            bad = [x for x in items if choices and x not in choices]
            if bad or not items:
                hint = f"; choose from {','.join(choices)}" if choices else ""
                raise argparse.ArgumentTypeError(f"bad value(s) {bad or s!r}{hint}")
            return items

        return conv

    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; quick 1)")
    p.add_argument("--duration", type=int, default=None, help="seconds per run (10; quick 2)")
    p.add_argument("--clients", type=csv(int), default=[10, 100], help="e.g. 10,100")
    p.add_argument(
        "--workloads", type=csv(str, list(WORKLOADS)), default=list(WORKLOADS),
        help=f"comma list from {','.join(WORKLOADS)} (default all)",
    )  # fmt: skip
    p.add_argument(
        "--auth", type=csv(str, list(AUTHS)), default=["trust"],
        help="comma list from trust,scram: how pgbench logs in; each value is its own set of "
        "cells, interleaved in the same run (default trust)",
    )  # fmt: skip
    p.add_argument(
        "--pgbouncer-scram-secret", choices=("plain", "verifier"), default="verifier",
        help="--auth scram: PgBouncer's userlist.txt holds PostgreSQL's SCRAM verifier "
        "(verifier, default: no key derivation per login) or the password (plain)",
    )  # fmt: skip
    p.add_argument(
        "--targets", type=csv(str, ALL_TARGETS), default=list(ALL_TARGETS),
        help="comma list from direct,pgbouncer,pgcorral (default all)",
    )  # fmt: skip
    p.add_argument("--scale", type=int, default=None, help="pgbench -i -s (default 10; quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke: 1 round of 2 s runs, scale 1")
    p.add_argument(
        "--workers", type=csv(int), default=[1, 2],
        help="pgcorral `workers` values, one pgcorral target each (pgcorral-w1, ...; default 1,2)",
    )  # fmt: skip
    p.add_argument(
        "--builds", type=csv(str, BUILDS), default=["src"],
        help="pgcorral builds, one target each per --workers value: src (src/ as it is, "
        "compiled after `make build`), pure (its .py files only: pgcorral-wN-pure), base "
        "(the revision --base-rev, compiled in a copy: pgcorral-wN-base)",
    )  # fmt: skip
    p.add_argument("--base-rev", default="HEAD~1",
                   help="git revision of the base build (default HEAD~1)")
    p.add_argument(
        "--metrics-scrape", type=float, default=0.0,
        help="seconds between scrapes of /metrics on every pgcorral target (they get a "
        "`metrics` port); 0 (default) = no metrics port",
    )  # fmt: skip
    p.add_argument("--pool-size", type=int, default=100, help="pooler server connections (100)")
    p.add_argument("--mode", choices=list(MODES), default="session", help="pooling mode")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j threads (default 2)")
    p.add_argument(
        "--profile", action="store_true",
        help=f"after the rounds, profile pgcorral (py-spy, else cProfile) during one "
        f"{WORKLOADS[PROFILE_WORKLOAD][0]} {PROFILE_CLIENTS}-client run",
    )  # fmt: skip
    p.add_argument("--py-spy", default=None, help="py-spy binary (default: PATH, then venvs)")
    p.add_argument(
        "--pgcorral-python", default=str(default_py) if default_py.exists() else sys.executable,
        help="interpreter that runs `-m pgcorral` (default .venv/bin/python)",
    )  # fmt: skip
    p.add_argument("--start-timeout", type=float, default=30, help="seconds for a pooler to start")
    p.add_argument("--warmup", type=int, default=None, help="unrecorded seconds per target (3)")
    p.add_argument(
        "--tls", action="store_true",
        help="TLS on both legs of every target: PostgreSQL ssl = on (hostssl only), pgbench "
        "sslmode=require, PgBouncer client/server_tls_sslmode = require, pgcorral tls = on and "
        "server tls = require",
    )  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the JSON goes")
    a = p.parse_args(argv)
    duration = a.duration if a.duration is not None else (2 if a.quick else 10)
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    scale = a.scale if a.scale is not None else (1 if a.quick else 10)
    warmup = a.warmup if a.warmup is not None else 3  # 100 clients need ~1 s just to connect
    if (rounds < 0 or duration < 1 or scale < 1 or a.pool_size < 1 or min(a.clients) < 1
            or min(a.workers) < 1):  # fmt: skip
        p.error(
            "--rounds >= 0, --duration, --scale, --pool-size, --clients and --workers must be >= 1"
        )
    if rounds == 0 and not a.profile:
        p.error("--rounds 0 only makes sense with --profile")
    return Config(
        rounds=rounds, duration=duration, clients=a.clients, workloads=a.workloads,
        auth=list(dict.fromkeys(a.auth)), pgbouncer_scram_secret=a.pgbouncer_scram_secret,
        targets=a.targets, workers=list(dict.fromkeys(a.workers)),
        builds=list(dict.fromkeys(a.builds)), base_rev=a.base_rev, scale=scale,
        pool_size=a.pool_size, mode=a.mode, jobs=a.jobs,
        profile=a.profile, py_spy=a.py_spy, pgcorral_python=a.pgcorral_python,
        start_timeout=a.start_timeout,
        warmup=warmup, tls=a.tls, metrics_scrape=a.metrics_scrape, keep=a.keep,
        results_dir=a.results_dir,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """bench/run.py: parse the options, run the grid, return the exit status."""
    cfg = parse_args(argv)
    # Explicit, so that cleanup also runs when started with SIGINT ignored (e.g. `cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)
    bench = Bench(cfg)
    return bench.run()
