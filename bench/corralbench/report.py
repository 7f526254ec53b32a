"""Results: per-cell medians, spreads and ratios, the printed table and its formatting."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from .common import ALL_TARGETS, WORKLOADS
from .pgbench import RunResult

if TYPE_CHECKING:
    from .cli import Config


def summary(cfg: Config, runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per workload x clients cell: per target the median, rounds, spread, failures."""
    rows = []
    for workload in cfg.workloads:
        for clients in cfg.clients:
            row: dict[str, Any] = {"workload": workload, "label": WORKLOADS[workload][0],
                                   "clients": clients}  # fmt: skip
            for t in cfg.targets:
                cell = [r for r in runs if (r.workload, r.clients, r.target)
                        == (workload, clients, t)]  # fmt: skip
                # An aborted run's TPS comes from the clients that survived: not comparable.
                vals = [r.tps for r in cell if r.tps is not None and r.usable]
                row[t] = {
                    "median_tps": statistics.median(vals) if vals else None,
                    "rounds": [r.tps for r in cell],
                    "spread_pct": (
                        round(100 * (max(vals) - min(vals)) / statistics.median(vals), 1)
                        if len(vals) > 1 and statistics.median(vals)
                        else None
                    ),
                    "failures": [describe_problem(r) for r in cell if r.bad],
                }
            row["pgcorral/pgbouncer"] = ratio(row, "pgcorral", "pgbouncer")
            row["pgcorral/direct"] = ratio(row, "pgcorral", "direct")
            row["pgbouncer/direct"] = ratio(row, "pgbouncer", "direct")
            rows.append(row)
    return rows


def report(cfg: Config, rows: list[dict[str, Any]], skipped: dict[str, str]) -> str:
    """The table of medians and ratios, then the per-round values, as printed at the end."""
    hdr = ["workload", "clients", "direct", "pgbouncer", "pgcorral",
           "corral/bouncer", "corral/direct", "bouncer/direct"]  # fmt: skip
    table = [hdr]
    for row in rows:
        cells = [row["label"], str(row["clients"])]
        for t in ALL_TARGETS:
            cells.append(_cell(row, t, skipped))
        for key in ("pgcorral/pgbouncer", "pgcorral/direct", "pgbouncer/direct"):
            cells.append(f"{row[key]:.2f}" if row[key] is not None else "-")
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(hdr))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(r, widths, strict=True)))
        for r in table
    ]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    out = [
        f"Median TPS over {cfg.rounds} round(s) of {cfg.duration}s, "
        f"mode={cfg.mode}, pool size {cfg.pool_size}, scale {cfg.scale}, "
        f"pgbench -j {cfg.jobs}",
        *lines,
        "'!' = a run of the cell failed or had failed transactions (an aborted run is left"
        " out of the median);",
        "'skipped' = target not run; ratio > 1: the first target is faster.",
    ]
    for name, why in skipped.items():
        out.append(f"{name} skipped: {why}")
    out += ["", "Per-round TPS (round 1, 2, ...; spread = (max-min)/median):"]
    for row in rows:
        for t in cfg.targets:
            d = row[t]
            if not d["rounds"]:
                continue
            vals = ", ".join(fmt_tps(v).strip() for v in d["rounds"])
            spread = f"  spread {d['spread_pct']}%" if d["spread_pct"] is not None else ""
            fails = f"  FAILED: {'; '.join(d['failures'])}" if d["failures"] else ""
            out.append(f"  {row['label']:<18} c={row['clients']:<4} {t:<9} "
                       f"[{vals}]{spread}{fails}")  # fmt: skip
    return "\n".join(out)


def _cell(row: dict[str, Any], t: str, skipped: dict[str, str]) -> str:
    if t not in row:
        return "-"
    if t in skipped:
        return "skipped"
    d = row[t]
    if not d["rounds"]:
        return "-"
    mark = "!" if d["failures"] else ""
    return (fmt_tps(d["median_tps"]).strip() if d["median_tps"] is not None else "fail") + mark


def describe_problem(r: RunResult) -> str:
    """One line on what went wrong with a run."""
    where = f"round {r.round + 1}" if r.round >= 0 else "warm-up/profile"
    if r.error:
        return f"{where}: {r.error.splitlines()[0]}"
    bits = []
    if r.failed_tx:
        bits.append(f"{r.failed_tx} failed transactions")
    if r.aborted:
        bits.append("run aborted")
    if r.returncode:
        bits.append(f"pgbench exit {r.returncode}")
    cause = next((ln for ln in r.output.splitlines() if "error" in ln.lower()), "")
    return f"{where}: " + ", ".join(bits) + (f" ({cause.strip()})" if cause else "")


def fmt_tps(v: float | None) -> str:
    return f"{v:9.0f}" if v is not None else "     fail"


def ratio(row: dict[str, Any], a: str, b: str) -> float | None:
    """Median TPS of target a over target b in one row, or None."""
    x = row.get(a, {}).get("median_tps")
    y = row.get(b, {}).get("median_tps")
    if x is None or not y:
        return None
    return round(float(x) / float(y), 3)
