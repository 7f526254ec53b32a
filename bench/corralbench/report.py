"""Results: per-cell medians, spreads and ratios, the printed table and its formatting."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from .common import ALL_TARGETS, WORKLOADS, auth_user, connects_per_transaction, target_names
from .pgbench import RunResult

if TYPE_CHECKING:
    from .cli import Config


def cells(cfg: Config) -> list[tuple[str, int, str]]:
    """The (workload, clients, auth) cells in table order: the auth values of a workload x
    clients next to each other."""
    return [(w, c, a) for w in cfg.workloads for c in cfg.clients for a in cfg.auth]


def summary(cfg: Config, runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per workload x clients x auth cell: per target the median TPS, rounds, spread,
    failures and the pooler's median CPU per unit (a transaction, a new connection for -C);
    then the ratios of TPS and of CPU per unit."""
    names = target_names(cfg.targets, cfg.workers, cfg.builds)
    corrals = [t for t in names if t.startswith("pgcorral")]
    rows = []
    for workload, clients, auth in cells(cfg):
        row: dict[str, Any] = {
            "workload": workload, "label": WORKLOADS[workload][0], "clients": clients,
            "auth": auth, "user": auth_user(auth),
            "cpu_per": "connection" if connects_per_transaction(workload) else "transaction",
        }  # fmt: skip
        for t in names:
            cell = [r for r in runs if (r.workload, r.clients, r.auth, r.target)
                    == (workload, clients, auth, t)]  # fmt: skip
            row[t] = _target_summary(cell)
        for base in ("pgbouncer", "direct"):
            for t in corrals:
                row[f"{t}/{base}"] = ratio(row, t, base)
        row["pgbouncer/direct"] = ratio(row, "pgbouncer", "direct")
        # CPU per unit (user+sys) of each pgcorral over PgBouncer's: < 1 = pgcorral spends less.
        row["cpu_ratios"] = {f"{t}/pgbouncer": ratio(row, t, "pgbouncer", "cpu_us")
                             for t in corrals}  # fmt: skip
        rows.append(row)
    return rows


def _target_summary(cell: list[RunResult]) -> dict[str, Any]:
    """One target in one cell: TPS median and rounds, CPU per unit medians, failures."""
    # An aborted run's TPS comes from the clients that survived: not comparable.
    vals = [r.tps for r in cell if r.tps is not None and r.usable]
    cpus = [us for r in cell if r.usable and (us := r.cpu_us()) is not None]
    procs = [r.pooler_procs for r in cell if r.pooler_procs is not None]
    median = statistics.median(vals) if vals else None
    spread = round(100 * (max(vals) - min(vals)) / median, 1) if len(vals) > 1 and median else None
    return {
        "median_tps": median,
        "rounds": [r.tps for r in cell],
        "spread_pct": spread,
        "failures": [describe_problem(r) for r in cell if r.bad],
        # microseconds per unit (transaction; new connection for -C), all its processes:
        # medians over the usable runs of user, of sys and of user+sys (the last is what the
        # CPU ratios use; it need not be the sum of the first two)
        "cpu_user_us": _median1([c[0] for c in cpus]),
        "cpu_sys_us": _median1([c[1] for c in cpus]),
        "cpu_us": _median1([c[0] + c[1] for c in cpus]),
        "cpu_rounds": [_round1(r.cpu_us()) for r in cell],
        "processes": max(procs) if procs else None,
    }


def report(
    cfg: Config, rows: list[dict[str, Any]], skipped: dict[str, str],
    tls_checks: dict[str, dict[str, str]] | None = None,
) -> str:  # fmt: skip
    """The table of medians and CPU, the per-unit CPU table, the table of TPS ratios, then the
    per-round values (tls_checks: what bench/corralbench/tls.py's check saw per target)."""
    shown = target_names(list(ALL_TARGETS), cfg.workers, cfg.builds)  # every column, run or not
    corrals = [t for t in shown if t.startswith("pgcorral")]
    hdr = ["workload", "clients", "auth", "cpu per"]
    for t in shown:
        hdr += [t] if t == "direct" else [t, "cpu us"]
    table = [hdr]
    for row in rows:
        cols = [row["label"], str(row["clients"]), row["auth"], _unit(row)]
        for t in shown:
            cols.append(_cell(row, t, skipped))
            if t != "direct":
                cols.append(_cpu_cell(row.get(t)))
        table.append(cols)
    keys = [f"{c}/pgbouncer" for c in corrals] + [f"{c}/direct" for c in corrals]
    keys.append("pgbouncer/direct")
    ratios = [["workload", "clients", "auth", *(k.replace("pg", "") for k in keys)]]
    for row in rows:
        rs = [row.get(k) for k in keys]
        ratios.append([row["label"], str(row["clients"]), row["auth"], *map(_fmt_ratio, rs)])
    out = [
        f"Median TPS over {cfg.rounds} round(s) of {cfg.duration}s, "
        f"mode={cfg.mode}, auth={','.join(cfg.auth)}, pool size {cfg.pool_size}, "
        f"scale {cfg.scale}, pgbench -j {cfg.jobs}, TLS {'ON' if cfg.tls else 'off'}",
        *_tls_note(cfg, tls_checks or {}),
        *_align(table),
        "'!' = a run of the cell failed or had failed transactions (an aborted run is left"
        " out of the median);",
        "'skipped' = target not run; 'cpu us' = the pooler's median CPU per unit ('cpu per':",
        "a transaction, or a new connection for -C), microseconds user/sys, summed over all its",
        "processes.",
        *_scram_note(cfg),
        "",
        *per_unit_table(cfg, rows),
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
        for t in target_names(cfg.targets, cfg.workers, cfg.builds):
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
            out.append(f"  {row['label']:<18} c={row['clients']:<4} {row['auth']:<5} "
                       f"{t:<{width}} [{vals}]{spread}{cpu}{fails}")  # fmt: skip
    return "\n".join(out)


def _tls_note(cfg: Config, checks: dict[str, dict[str, str]]) -> list[str]:
    """With --tls: what ran over TLS, as checked on each target before the rounds."""
    if not cfg.tls:
        return []
    out = ["TLS on both legs of every target: pgbench sslmode=require; PostgreSQL ssl = on, "
           "hostssl only (a plain server leg is refused)."]  # fmt: skip
    for name, c in checks.items():
        out.append(f"  {name}: client leg {c['client_leg']}, server leg {c['server_leg']}, "
                   f"plain login refused")  # fmt: skip
    return out


def _scram_note(cfg: Config) -> list[str]:
    """What PgBouncer knows of the scram user (it decides PgBouncer's CPU per SCRAM login)."""
    if "scram" not in cfg.auth:
        return []
    if cfg.pgbouncer_scram_secret == "plain":
        held = "the password in plain text (it derives a SCRAM secret, PBKDF2 with a new salt, at"
        held += " every login)"
    else:
        held = "PostgreSQL's SCRAM verifier (no PBKDF2 per login)"
    return [f"--auth scram: PgBouncer's userlist.txt holds {held}."]


def per_unit_table(cfg: Config, rows: list[dict[str, Any]]) -> list[str]:
    """Pooler CPU per unit, user+sys (user/sys), per pooler run, and each pgcorral against
    PgBouncer: CPU per unit (< 1: pgcorral spends less) and TPS (> 1: pgcorral is faster)."""
    poolers = [t for t in target_names(cfg.targets, cfg.workers, cfg.builds) if t != "direct"]
    if not poolers:
        return []
    corrals = [t for t in poolers if t.startswith("pgcorral")]
    vs_bouncer = corrals if "pgbouncer" in poolers else []
    hdr = ["workload", "clients", "auth", "unit", *poolers]
    for t in vs_bouncer:
        short = t.replace("pgcorral-", "")
        hdr += [f"{short}/PgB cpu", f"{short}/PgB tps"]
    table = [hdr]
    for row in rows:
        cols = [row["label"], str(row["clients"]), row["auth"], _unit(row)]
        cols += [_cpu_total_cell(row.get(t)) for t in poolers]
        for t in vs_bouncer:
            cols += [_fmt_ratio(row["cpu_ratios"].get(f"{t}/pgbouncer")),
                     _fmt_ratio(row.get(f"{t}/pgbouncer"))]  # fmt: skip
        table.append(cols)
    return [
        "Pooler CPU per unit, microseconds: user+sys (user/sys), medians over the rounds, all"
        " the pooler's processes;",
        "unit: tx = a transaction, new conn = a new client connection (-C: one per"
        " transaction). Ratios to PgBouncer:",
        "cpu = CPU per unit (< 1: pgcorral spends less), tps = median TPS (> 1: pgcorral is"
        " faster).",
        *_align(table),
    ]


def _cpu_total_cell(d: dict[str, Any] | None) -> str:
    if not d or None in (d["cpu_us"], d["cpu_user_us"], d["cpu_sys_us"]):
        return "-"
    return f"{d['cpu_us']:.1f} ({d['cpu_user_us']:.1f}/{d['cpu_sys_us']:.1f})"


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


def _unit(row: dict[str, Any]) -> str:
    return "new conn" if row["cpu_per"] == "connection" else "tx"


def _fmt_ratio(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "-"


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


def ratio(row: dict[str, Any], a: str, b: str, key: str = "median_tps") -> float | None:
    """Median TPS (or another key, e.g. cpu_us) of target a over target b in one row, or None."""
    x = row.get(a, {}).get(key)
    y = row.get(b, {}).get(key)
    if x is None or not y:
        return None
    return round(float(x) / float(y), 3)
