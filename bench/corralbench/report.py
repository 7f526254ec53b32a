"""Results: per-cell medians, spreads and ratios, the printed table and its formatting."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from .common import ALL_TARGETS, WORKLOADS, connects_per_transaction, target_names
from .pgbench import RunResult

if TYPE_CHECKING:
    from .cli import Config


def summary(cfg: Config, runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per workload x clients cell: per target the median TPS, rounds, spread, failures
    and the pooler's median CPU per transaction; then the ratios."""
    names = target_names(cfg.targets, cfg.workers)
    rows = []
    for workload in cfg.workloads:
        for clients in cfg.clients:
            row: dict[str, Any] = {
                "workload": workload, "label": WORKLOADS[workload][0], "clients": clients,
                "cpu_per": "connection" if connects_per_transaction(workload) else "transaction",
            }  # fmt: skip
            for t in names:
                cell = [r for r in runs if (r.workload, r.clients, r.target)
                        == (workload, clients, t)]  # fmt: skip
                # An aborted run's TPS comes from the clients that survived: not comparable.
                vals = [r.tps for r in cell if r.tps is not None and r.usable]
                cpus = [us for r in cell if r.usable and (us := r.cpu_us()) is not None]
                procs = [r.pooler_procs for r in cell if r.pooler_procs is not None]
                row[t] = {
                    "median_tps": statistics.median(vals) if vals else None,
                    "rounds": [r.tps for r in cell],
                    "spread_pct": (
                        round(100 * (max(vals) - min(vals)) / statistics.median(vals), 1)
                        if len(vals) > 1 and statistics.median(vals)
                        else None
                    ),
                    "failures": [describe_problem(r) for r in cell if r.bad],
                    # microseconds per transaction (per connection for -C), all its processes
                    "cpu_user_us": _median1([c[0] for c in cpus]),
                    "cpu_sys_us": _median1([c[1] for c in cpus]),
                    "cpu_rounds": [_round1(r.cpu_us()) for r in cell],
                    "processes": max(procs) if procs else None,
                }
            corrals = [t for t in names if t.startswith("pgcorral")]
            for base in ("pgbouncer", "direct"):
                for t in corrals:
                    row[f"{t}/{base}"] = ratio(row, t, base)
            row["pgbouncer/direct"] = ratio(row, "pgbouncer", "direct")
            rows.append(row)
    return rows


def report(cfg: Config, rows: list[dict[str, Any]], skipped: dict[str, str]) -> str:
    """The table of medians and CPU, the table of ratios, then the per-round values."""
    shown = target_names(list(ALL_TARGETS), cfg.workers)  # every column, run or not
    corrals = [t for t in shown if t.startswith("pgcorral")]
    hdr = ["workload", "clients"]
    for t in shown:
        hdr += [t] if t == "direct" else [t, "cpu us"]
    table = [hdr]
    for row in rows:
        cells = [row["label"], str(row["clients"])]
        for t in shown:
            cells.append(_cell(row, t, skipped))
            if t != "direct":
                cells.append(_cpu_cell(row.get(t)))
        table.append(cells)
    keys = [f"{c}/pgbouncer" for c in corrals] + [f"{c}/direct" for c in corrals]
    keys.append("pgbouncer/direct")
    ratios = [["workload", "clients", *(k.replace("pg", "") for k in keys)]]
    for row in rows:
        rs = [row.get(k) for k in keys]
        ratios.append([row["label"], str(row["clients"]),
                       *(f"{v:.2f}" if v is not None else "-" for v in rs)])  # fmt: skip
    out = [
        f"Median TPS over {cfg.rounds} round(s) of {cfg.duration}s, "
        f"mode={cfg.mode}, pool size {cfg.pool_size}, scale {cfg.scale}, "
        f"pgbench -j {cfg.jobs}",
        *_align(table),
        "'!' = a run of the cell failed or had failed transactions (an aborted run is left"
        " out of the median);",
        "'skipped' = target not run; 'cpu us' = the pooler's median CPU per transaction (per new",
        "connection for -C: one each), microseconds user/sys, summed over all its processes.",
        "",
        "Ratios of median TPS (> 1: the first target is faster):",
        *_align(ratios),
    ]
    for name, why in skipped.items():
        out.append(f"{name} skipped: {why}")
    procs = {t: max((row[t]["processes"] or 0 for row in rows if t in row), default=0)
             for t in shown if t != "direct"}  # fmt: skip
    seen = ", ".join(f"{t} {n}" for t, n in procs.items() if n)
    if seen:
        out.append(f"Pooler processes at the end of a run (most seen): {seen}")
    width = max(len(t) for t in shown)
    out += ["", "Per-round TPS (round 1, 2, ...; spread = (max-min)/median), cpu us user/sys:"]
    for row in rows:
        for t in target_names(cfg.targets, cfg.workers):
            d = row[t]
            if not d["rounds"]:
                continue
            vals = ", ".join(fmt_tps(v).strip() for v in d["rounds"])
            spread = f"  spread {d['spread_pct']}%" if d["spread_pct"] is not None else ""
            cpu = ""
            if any(c is not None for c in d["cpu_rounds"]):
                cpu = "  cpu [" + ", ".join(
                    f"{c[0]:.0f}/{c[1]:.0f}" if c is not None else "-" for c in d["cpu_rounds"]
                ) + "]"  # fmt: skip
            fails = f"  FAILED: {'; '.join(d['failures'])}" if d["failures"] else ""
            out.append(f"  {row['label']:<18} c={row['clients']:<4} {t:<{width}} "
                       f"[{vals}]{spread}{cpu}{fails}")  # fmt: skip
    return "\n".join(out)


def _align(table: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell (the first left-aligned), a rule under the header."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(r, widths, strict=True)))
        for r in table
    ]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    return lines


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


def _cpu_cell(d: dict[str, Any] | None) -> str:
    if not d or d["cpu_user_us"] is None or d["cpu_sys_us"] is None:
        return "-"
    return f"{d['cpu_user_us']:.0f}/{d['cpu_sys_us']:.0f}"


def _median1(vals: list[float]) -> float | None:
    return round(statistics.median(vals), 1) if vals else None


def _round1(c: tuple[float, float] | None) -> list[float] | None:
    return [round(c[0], 1), round(c[1], 1)] if c is not None else None


def fmt_cpu(r: RunResult) -> str:
    """The pooler CPU of one run for the progress log, e.g. "  cpu 13/40 us/tx, 3 procs"."""
    c = r.cpu_us()
    if c is None:
        return ""
    per = "conn" if connects_per_transaction(r.workload) else "tx"
    return f"  cpu {c[0]:.0f}/{c[1]:.0f} us/{per}, {r.pooler_procs} proc"


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
