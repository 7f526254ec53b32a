"""pgcorral benchmark harness: pgbench at PostgreSQL, PgBouncer and pgcorral (see bench/README.md).

Modules: common (names, workloads, modes, log), procs (child processes, environment), proctree
(a pooler's processes: CPU, leftovers), pgbench (command, run, parse), targets (what pgbench
connects to), machine (machine facts), profile (py-spy/cProfile and the files they produce), cli
(options), grid (the runs), report (tables), tls (--tls: certificates, settings, checks).
Importing the package puts the repository on sys.path, for devtools/pgcluster.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:
    import devtools.pgcluster  # noqa: F401
except ImportError as _exc:  # pragma: no cover - only when the checkout is incomplete
    sys.exit(f"bench/run.py: cannot import devtools/pgcluster.py from {REPO}: {_exc}")
