"""The Patroni run's figures: kept per run, printed as a table at the end of the pytest run
(tests/ha/conftest.py) and written as JSON to $PGCORRAL_HA_REPORT when it is set."""

from __future__ import annotations

import json
import os
import time
from typing import Any

RUNS: list[dict[str, Any]] = []


def add(result: dict[str, Any]) -> None:
    RUNS.append(result)
    write_json(RUNS)


def write_json(runs: list[dict[str, Any]]) -> None:
    path = os.environ.get("PGCORRAL_HA_REPORT")
    if not path:
        return
    doc = {"generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {n}" for k, n in sorted(v.items())) or "none"
    return str(v)


def table(result: dict[str, Any]) -> list[str]:
    """A short table of one run."""
    mode = result["mode"] + (f" (workers={result['workers']})" if result.get("workers") else "")
    lines = [
        f"Patroni failover via {mode}: {result['clients']} clients, "
        f"{len(result['failovers'])} kill(s) of the leader's postmaster, "
        f"{result['duration_s']} s",
        f"  {'kill':<16}{'switch s':>9}{'1st err s':>10}{'unavail s':>10}"
        f"{'kill->ok s':>11}{'max gap s':>10}{'errors':>7}  by SQLSTATE",
    ]
    for w in result["failovers"]:
        lines.append(
            f"  {w['killed'] + '->' + w['new_leader']:<16}{_fmt(w['leader_switch_s']):>9}"
            f"{_fmt(w['first_error_after_kill_s']):>10}{_fmt(w['unavailable_s']):>10}"
            f"{_fmt(w['kill_to_recovery_s']):>11}{_fmt(w['max_client_gap_s']):>10}"
            f"{w['errors']:>7}  {_fmt(w['errors_by_sqlstate'])}"
        )
    lines.append(
        f"  commits acknowledged {result['acknowledged']}, lost {result['lost']}, "
        f"in doubt {result['in_doubt']} (committed {result['in_doubt_committed']}), "
        f"errors {result['errors']} ({_fmt(result['errors_by_sqlstate'])}), "
        f"stuck clients {result['stuck_clients']}"
    )
    return lines
