#!/usr/bin/env python3
"""pgcorral benchmark: pgbench straight at PostgreSQL vs through PgBouncer vs through pgcorral.

One command (see bench/README.md)::

    .venv/bin/python bench/run.py            # full run, about 25 minutes
    .venv/bin/python bench/run.py --quick    # 2-second smoke of every cell

It starts a throwaway PostgreSQL cluster (devtools/pgcluster.py), one PgBouncer and one
pgcorral per --workers value (pgcorral-w1, pgcorral-w2) of its own, runs every pgbench
workload x client count against every target for several interleaved rounds, prints tables of
median TPS, pooler CPU per transaction and ratios, writes the full results to
bench/results/<timestamp>.json and stops everything it started, by PID, even on Ctrl-C.
The code is the package bench/corralbench/; this file is only its entry point.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from corralbench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
