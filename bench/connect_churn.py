"""A new connection per transaction over a small pool: TPS and how many backends PostgreSQL
started, straight, through PgBouncer and through pgcorral with 1 and 2 workers.

pgbench's TPC-B-like script with ``-C`` (each transaction on a new client connection) and
8 clients over a pool of 8 in transaction pooling. With several workers the kernel spreads the
new client connections unevenly over them, so one worker's clients wait while another holds
idle server connections. pgcorral then moves capacity: the other worker closes an idle
connection (``Context.release_server`` / the ``evict`` request) and the waiting one opens a
new one, a backend start each time. ``backends`` (``pg_stat_database.sessions`` during the
run) shows how often. Measured 2026-12-05: 2 workers at 496 tps with 1,758 backends started
in 8 s, against 1,650 tps and none with 1 worker (bench/README.md). An open problem; see
docs/ARCHITECTURE.md ("Capacity moving between workers") for the fix that was tried and why
it was taken back.

    .venv/bin/python bench/connect_churn.py               # 3 rounds of 8 s per target
    .venv/bin/python bench/connect_churn.py --rounds 1 --seconds 4

Prints a table (median TPS and backends over the rounds, ratio to PgBouncer) and the JSON.
Loopback only; every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pooler
from rolling_restart import wait_log


def sessions(pg: pooler.PgCluster) -> int:
    out = subprocess.run([pg.bin("psql"), "-h", "127.0.0.1", "-p", str(pg.port), "-U",
                          "postgres", "-d", "postgres", "-Atc",
                          "SELECT sum(sessions) FROM pg_stat_database"],
                         capture_output=True, text=True, check=True, timeout=60)
    return int(out.stdout.strip() or 0)


def pgbench(pg: pooler.PgCluster, port: int, args: argparse.Namespace) -> float:
    out = subprocess.run([pg.bin("pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U",
                          "postgres", "-n", "-C", "-c", str(args.clients), "-j", "2",
                          "-T", str(args.seconds), "postgres"],
                         capture_output=True, text=True, timeout=args.seconds + 120)
    found = re.search(r"tps = ([\d.]+)", out.stdout)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"pgbench failed on port {port}:\n{out.stdout}\n{out.stderr}")
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pool", type=int, default=8)
    args = parser.parse_args()
    args.pipeline, args.timeout, args.user = "transaction", 30, "postgres"
    pooler.raise_fd_limit()
    results: dict[str, list[tuple[float, int]]] = {}
    with pooler.cluster("connect-churn-") as (workdir, pg):
        pg.pgbench("-i", "-s", "1", "-q")
        procs = {"pgbouncer": pooler.start_pgbouncer(workdir, pg, args)}
        try:
            for workers in (1, 2):
                args.workers = workers
                name = f"pgcorral-w{workers}"
                procs[name] = pooler.start_pgcorral(workdir, pg, args, name=name,
                                                    log_level="info")
                wait_log(workdir / f"{name}.log", "pgcorral: started")
            ports = {"direct": pg.port, **{n: p.port for n, p in procs.items()}}  # type: ignore[attr-defined]
            for _ in range(args.rounds):
                for name, port in ports.items():
                    before = sessions(pg)
                    tps = pgbench(pg, port, args)
                    results.setdefault(name, []).append((tps, sessions(pg) - before - 1))
        finally:
            for proc in procs.values():
                pooler.stop(proc)
    table = {name: {"tps": statistics.median(t for t, _ in runs),
                    "backends": statistics.median(b for _, b in runs), "runs": runs}
             for name, runs in results.items()}
    base = table["pgbouncer"]["tps"]
    print(f"pgbench -C -c {args.clients} (TPC-B-like), pool {args.pool}, "
          f"{args.rounds} x {args.seconds} s")
    print(f"{'target':<14}{'tps':>10}{'backends':>10}{'/PgBouncer':>12}")
    for name, row in table.items():
        print(f"{name:<14}{row['tps']:>10.0f}{row['backends']:>10.0f}"
              f"{row['tps'] / base:>12.2f}")
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
