"""Machine facts for the results file: CPU, memory, kernel, load, versions, git commit."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from devtools.pgcluster import PgCluster, PgClusterError

from . import REPO
from .procs import first_line


def machine_info(
    cluster: PgCluster, pgbench: str, pgbouncer: str | None, pgcorral_python: str
) -> dict[str, Any]:
    """CPU, memory, kernel, load and the versions of everything measured, for the JSON."""
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = f"{int(line.split()[1]) // 1024} MiB"
                break
    server_version = None
    with contextlib.suppress(PgClusterError, subprocess.TimeoutExpired):
        server_version = cluster.psql("SELECT version()").strip()
    git = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory": mem_total,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
        "postgresql": server_version,
        "pgbench": first_line([pgbench, "--version"]),
        "pgbouncer": first_line([pgbouncer, "--version"]) if pgbouncer else None,
        "python_harness": sys.version.split()[0],
        "python_pgcorral": first_line(
            [pgcorral_python, "-c", "import platform; print(platform.python_version())"]
        ),
        "uvloop": first_line([pgcorral_python, "-c", "import uvloop; print(uvloop.__version__)"]),
        "git_commit": git,
        "git_src_dirty": bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        )
        if git
        else None,
    }
