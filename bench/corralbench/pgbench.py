"""pgbench: the command line of a workload, running it, parsing its report into a RunResult."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from dataclasses import dataclass

from .common import DBNAME, DBUSER, WORKLOADS
from .procs import PROCS, clean_env


@dataclass
class RunResult:
    """One pgbench run of one target in one cell, and what its report said."""

    round: int
    workload: str
    clients: int
    target: str
    position: int  # 0 = this target ran first in this cell in this round
    auth: str = "trust"  # --auth value: which user pgbench logged in as, and how
    tps: float | None = None
    tps_kind: str = ""
    failed_tx: int | None = None
    transactions: int | None = None
    latency_ms: float | None = None
    aborted: bool = False
    returncode: int = 0
    elapsed_s: float = 0.0
    error: str | None = None
    # The pooler's CPU seconds (all its processes) from just before pgbench started until it
    # exited, and how many processes it had at the end; None for direct or when unreadable.
    cpu_user_s: float | None = None
    cpu_sys_s: float | None = None
    pooler_procs: int | None = None
    output: str = ""

    @property
    def usable(self) -> bool:
        """Counted in the median: pgbench finished normally (failed transactions are only
        marked: pgbench's TPS already excludes them)."""
        return self.tps is not None and not self.aborted and not self.returncode and not self.error

    def cpu_us(self) -> tuple[float, float] | None:
        """Pooler CPU per transaction in microseconds, (user, sys); failed ones count too.

        With -C every transaction is a new connection, so this is also the CPU per connection.
        """
        n = (self.transactions or 0) + (self.failed_tx or 0)
        if self.cpu_user_s is None or self.cpu_sys_s is None or not n:
            return None
        return 1e6 * self.cpu_user_s / n, 1e6 * self.cpu_sys_s / n

    @property
    def bad(self) -> bool:
        return bool(
            self.tps is None or self.failed_tx or self.aborted or self.returncode or self.error
        )


TPS_RE = re.compile(r"^tps = ([0-9.]+) \(([^)]*)\)", re.M)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)
XACTS_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
LATENCY_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)


def parse_pgbench(output: str, result: RunResult) -> None:
    """Fill result from pgbench's report (PostgreSQL 14+ format)."""
    if m := TPS_RE.search(output):
        result.tps = float(m.group(1))
        result.tps_kind = m.group(2)
    if m := FAILED_RE.search(output):
        result.failed_tx = int(m.group(1))
    if m := XACTS_RE.search(output):
        result.transactions = int(m.group(1))
    if m := LATENCY_RE.search(output):
        result.latency_ms = float(m.group(1))
    result.aborted = "Run was aborted" in output or "aborted in command" in output


def pgbench_cmd(
    pgbench: str, host: str, port: int, workload: str, clients: int, duration: int, jobs: int,
    user: str = DBUSER,
) -> list[str]:  # fmt: skip
    return [
        pgbench,
        "-h", host,
        "-p", str(port),
        "-U", user,
        "-n",  # no vacuum through the pooler: reset_tables() did it directly
        "-T", str(duration),
        "-j", str(max(1, min(jobs, clients))),
        "-c", str(clients),
        *WORKLOADS[workload][1],
        DBNAME,
    ]  # fmt: skip


def run_pgbench(
    cmd: list[str], result: RunResult, timeout: float, password: str | None = None,
    env: dict[str, str] | None = None,
) -> RunResult:  # fmt: skip
    """Run pgbench (password: its PGPASSWORD, for the scram user; env: more libpq settings,
    e.g. PGSSLMODE=require with --tls) and parse its report."""
    t0 = time.monotonic()
    extra = dict(env or {})
    if password is not None:
        extra["PGPASSWORD"] = password
    env = clean_env(**extra)
    proc = PROCS.start("pgbench", cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        PROCS.stop(proc, signal.SIGINT)
        result.error = f"pgbench still running after {timeout:.0f}s; stopped"
        out = b""
    finally:
        PROCS.forget(proc)
    result.elapsed_s = round(time.monotonic() - t0, 2)
    result.returncode = proc.returncode if proc.returncode is not None else -1
    result.output = out.decode("utf-8", errors="replace")
    parse_pgbench(result.output, result)
    if result.tps is None and result.error is None:
        result.error = "no tps line in pgbench output"
    return result
