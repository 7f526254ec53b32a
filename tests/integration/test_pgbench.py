"""pgbench's workloads run through pgcorral with no failed transaction."""

from __future__ import annotations

import re
import subprocess
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import DaemonFactory

WORKLOADS = {
    "simple": ["-M", "simple"],
    "extended": ["-M", "extended"],
    "prepared": ["-M", "prepared"],
    "select-only prepared": ["-S", "-M", "prepared"],
    "select-only reconnect": ["-S", "-C"],
}


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_pgbench_workload_has_no_failures(pgcorral: DaemonFactory, workload: str) -> None:
    d = pgcorral({"max_connections": "4"})
    cmd = ["pgbench", "-h", d.host, "-p", str(d.port), "-U", "trustuser", "-n",
           "-c", "4", "-j", "2", "-t", "50", *WORKLOADS[workload], "pgcorral_test"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    assert processed is not None and int(processed.group(1)) == 4 * 50, out.stdout
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert failed is None or int(failed.group(1)) == 0, out.stdout


def test_reconnecting_clients_share_a_small_pool(pgcorral: DaemonFactory) -> None:
    """Twice as many reconnecting clients as server connections: they queue, none fails.

    One pgbench thread per client: a pgbench thread connects its clients one after the other,
    so with fewer threads a thread would wait for a slot its own other client holds."""
    d = pgcorral({"max_connections": "2", "blocking_timeout": "30"})
    cmd = ["pgbench", "-h", d.host, "-p", str(d.port), "-U", "trustuser", "-n",
           "-c", "4", "-j", "4", "-t", "50", "-S", "-C", "pgcorral_test"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "number of transactions actually processed: 200" in out.stdout, out.stdout
