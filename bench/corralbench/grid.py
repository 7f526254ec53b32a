"""The grid: cluster setup, targets, warm-up, interleaved rounds of runs, cleanup, the JSON."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devtools.pgcluster import PgCluster

from . import REPO
from .common import (
    DBNAME,
    MODES,
    SCRAM_USER,
    WARMUP_WORKLOAD,
    WORKLOADS,
    auth_user,
    log,
    pgcorral_name,
    target_names,
)
from .machine import machine_info
from .pgbench import RunResult, pgbench_cmd, run_pgbench
from .procs import PROCS
from .profile import run_profile
from .report import describe_problem, fmt_cpu, fmt_tps, report, summary
from .targets import (
    DirectTarget,
    PgBouncerTarget,
    PgCorralTarget,
    ScramUser,
    Target,
    TargetError,
    check_scram,
)
from .tls import TlsCheckError, check_tls, hostssl, make_tls

if TYPE_CHECKING:
    from .cli import Config


class Bench:
    """One benchmark: the cluster, the targets, the interleaved rounds, the results file."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.mode = MODES[cfg.mode]
        self.tmp = Path(tempfile.mkdtemp(prefix="pgcorral-bench-"))
        os.chmod(self.tmp, 0o755)  # the server user must traverse it
        self.cluster = PgCluster(self.tmp / "pg")
        self.pgbench = self.cluster.bin("pgbench")
        self.psql = self.cluster.bin("psql")
        self.targets: dict[str, Target] = {}
        self.skipped: dict[str, str] = {}
        self.start_failures: list[str] = []  # skipped because broken, not because not installed
        self.runs: list[RunResult] = []
        # --auth scram: a role of the throwaway cluster with a throwaway password.
        self.scram = (
            ScramUser(SCRAM_USER, f"scram-{secrets.token_hex(12)}") if "scram" in cfg.auth
            else None
        )  # fmt: skip
        self.auth_checks: dict[str, dict[str, str]] = {}  # target -> what check_scram saw
        # --tls: the run's PKI (devtools/certs.py) and, per target, what check_tls saw.
        self.tls = make_tls(self.tmp / "pki") if cfg.tls else None
        self.client_env = self.tls.client_env() if self.tls is not None else {}
        self.tls_checks: dict[str, dict[str, str]] = {}
        self.profile: dict[str, Any] | None = None
        self.machine: dict[str, Any] = {}
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        self.pgbouncer_bin = shutil.which("pgbouncer") or next(
            (b for b in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(b, os.X_OK)),
            None,
        )

    # -- setup ---------------------------------------------------------------
    def setup_cluster(self) -> None:
        log(f"initialising PostgreSQL in {self.cluster.basedir} (port {self.cluster.port})")
        self.cluster.init(
            settings={
                # direct runs need one backend per client (500-client cells)
                # every pooler target keeps up to --pool-size connections
                "max_connections": str(max(400, max(self.cfg.clients) + 50 + self.cfg.pool_size
                                           * len(target_names(self.cfg.targets,
                                                              self.cfg.workers,
                                                              self.cfg.builds)))),
                "shared_buffers": "256MB",
                "fsync": "off",
                "synchronous_commit": "off",
                "password_encryption": "scram-sha-256",
            },
            hba_lines=self.hba_lines(),
        )
        if self.tls is not None:
            pki = self.tls.pki
            self.cluster.enable_ssl(pki.server.cert, pki.server.key, ca_file=pki.ca_file)
            log(self.tls.describe())
        self.cluster.start()
        self.cluster.psql(f"CREATE DATABASE {DBNAME}")
        if self.scram is not None:
            # Superuser: may use the pgbench tables, and the reserved backend slots as
            # DBUSER does (its verifier is SCRAM-SHA-256: password_encryption above).
            pw = self.scram.password.replace("'", "''")
            self.cluster.psql(
                f"CREATE ROLE {self.scram.name} LOGIN SUPERUSER PASSWORD '{pw}'"
            )  # fmt: skip
            if self.cfg.pgbouncer_scram_secret == "verifier":
                verifier = self.cluster.psql(
                    f"SELECT rolpassword FROM pg_authid WHERE rolname = '{self.scram.name}'"
                ).strip()
                if not verifier.startswith("SCRAM-SHA-256$"):
                    raise RuntimeError(f"{self.scram.name} has no SCRAM verifier: {verifier!r}")
                self.scram = dataclasses.replace(self.scram, verifier=verifier)
        log(f"pgbench -i -s {self.cfg.scale}")
        self.cluster.pgbench("-i", "-q", "-s", str(self.cfg.scale), dbname=DBNAME)
        self.cluster.psql("VACUUM ANALYZE; CHECKPOINT;", dbname=DBNAME)

    def hba_lines(self) -> list[str]:
        """pgcluster.py's trust lines, after a scram-sha-256 line for the scram user (so that
        the direct target does real SCRAM too, and so do the poolers' server logins); with
        --tls every TCP line is hostssl, so that a plain server leg is refused."""
        lines = [
            "local all all trust",
            "host all all 127.0.0.1/32 trust",
            "host all all ::1/128 trust",
            "local replication all trust",
            "host replication all 127.0.0.1/32 trust",
            "host replication all ::1/128 trust",
        ]
        if self.scram is not None:
            lines[:0] = [f"host all {self.scram.name} 127.0.0.1/32 scram-sha-256",
                         f"local all {self.scram.name} scram-sha-256"]  # fmt: skip
        return hostssl(lines) if self.tls is not None else lines

    def setup_targets(self) -> None:
        for kind in self.cfg.targets:
            if kind == "direct":
                self.start_target(DirectTarget(self.cluster))
            elif kind == "pgbouncer":
                if self.pgbouncer_bin is None:
                    self.skip(
                        kind,
                        "pgbouncer not found on PATH (nor /usr/sbin); install it with "
                        "`apt-get update && apt-get install -y pgbouncer`",
                    )
                    continue
                self.start_target(PgBouncerTarget(
                    self.pgbouncer_bin, self.tmp / "pgbouncer", self.cluster,
                    self.cfg.pool_size, self.mode, self.psql, self.cfg.start_timeout,
                    scram=self.scram, tls=self.tls,
                ))  # fmt: skip
            else:
                for workers in self.cfg.workers:
                    for build in self.cfg.builds:
                        self.start_target(PgCorralTarget(
                            self.cfg.pgcorral_python, self.tmp / pgcorral_name(workers, build),
                            self.cluster, self.cfg.pool_size, self.mode, self.psql,
                            self.cfg.start_timeout, workers=workers, scram=self.scram,
                            build=build, tls=self.tls, base_rev=self.cfg.base_rev,
                            metrics_scrape=self.cfg.metrics_scrape,
                        ))  # fmt: skip

    def start_target(self, target: Target) -> None:
        name = target.name
        log(f"starting {name} on 127.0.0.1:{target.port}")
        try:
            target.start()
            if self.tls is not None:
                self.tls_checks[name] = c = check_tls(name, target.port, self.psql)
                log(f"{name}: TLS client leg {c['client_leg']}, server leg {c['server_leg']}; "
                    f"plain login refused ({c['plain_login']})")  # fmt: skip
            if self.scram is not None:
                self.auth_checks[name] = check_scram(
                    name, target.port, self.psql, self.scram, self.tls
                )  # fmt: skip
                log(f"{name}: {self.scram.name} is asked for "
                    f"{self.auth_checks[name]['method']}; a wrong password is refused")  # fmt: skip
        except (TargetError, TlsCheckError, OSError) as e:
            target.stop()
            why = f"failed to start: {e}"
            if self.tls is not None and isinstance(target, PgCorralTarget):
                why = ("with --tls (main section tls = on, server section tls = require): "
                       "this pgcorral may not support TLS yet; " + why)  # fmt: skip
            self.skip(name, why)
            self.start_failures.append(name)
            return
        if target.proc is not None:
            target.pid = target.proc.pid
            cpu = target.cpu()
            procs = f", {cpu.procs} process(es) now" if cpu is not None else ""
            log(f"{name} is up (pid {target.proc.pid}{procs})")
        self.targets[name] = target

    def skip(self, name: str, why: str) -> None:
        self.skipped[name] = why
        log(f"SKIPPING target {name}: {why}")

    def reset_tables(self) -> None:
        """What pgbench's own pre-run vacuum does, done directly on the server."""
        self.cluster.psql(
            "TRUNCATE pgbench_history; VACUUM pgbench_branches; VACUUM pgbench_tellers; "
            "CHECKPOINT;",
            dbname=DBNAME,
        )

    # -- running -------------------------------------------------------------
    def one_run(
        self, target: Target, workload: str, clients: int, rnd: int, position: int,
        duration: int, auth: str = "trust",
    ) -> RunResult:  # fmt: skip
        result = RunResult(rnd, workload, clients, target.name, position, auth)
        try:
            target.check_alive()
        except TargetError as e:
            result.error = str(e)
            return result
        self.reset_tables()
        cmd = pgbench_cmd(
            self.pgbench, target.host, target.port, workload, clients, duration, self.cfg.jobs,
            user=auth_user(auth),
        )  # fmt: skip
        password = self.scram.password if auth == "scram" and self.scram is not None else None
        before = target.cpu()
        run_pgbench(cmd, result, timeout=duration + 120, password=password, env=self.client_env)
        after = target.cpu()
        if before is not None and after is not None:
            used = after - before
            result.cpu_user_s = round(used.user, 3)
            result.cpu_sys_s = round(used.sys, 3)
            result.pooler_procs = used.procs
        return result

    def warmup(self, auth: str) -> None:
        """An unrecorded run per target as auth's user: fills that user's pools."""
        if self.cfg.warmup <= 0:
            return
        for target in self.targets.values():
            clients = max(self.cfg.clients)
            r = self.one_run(
                target, WARMUP_WORKLOAD, clients, -1, 0, self.cfg.warmup, auth
            )  # fmt: skip
            log(f"warm-up {target.name} ({auth}): {fmt_tps(r.tps).strip()} tps")
            if r.bad:
                log(f"warm-up {target.name} problem: {describe_problem(r)}; pgbench said:\n"
                    + "\n".join(r.output.splitlines()[-15:]))  # fmt: skip

    def run_rounds(self) -> None:
        # Cells grouped by auth within a round: the poolers' pools (one per user, under one
        # max_connections/max_db_connections budget) switch user once per auth block, after
        # that block's warm-up, instead of evicting connections of the other user in a
        # measured run of every cell.
        cells = [(w, c, a) for a in self.cfg.auth for w in self.cfg.workloads
                 for c in self.cfg.clients]  # fmt: skip
        names = target_names(self.cfg.targets, self.cfg.workers, self.cfg.builds)
        order = [t for t in names if t in self.targets]
        total = self.cfg.rounds * len(cells) * len(order)
        warmups = len(self.cfg.auth) * (self.cfg.rounds if len(self.cfg.auth) > 1 else 1)
        est = total * (self.cfg.duration + 1.5) + warmups * len(order) * (self.cfg.warmup + 1.5)
        log(f"{total} pgbench runs of {self.cfg.duration}s: about {est / 60:.1f} minutes")
        n = 0
        for rnd in range(self.cfg.rounds):
            for ci, (workload, clients, auth) in enumerate(cells):
                first_of_block = ci == 0 or auth != cells[ci - 1][2]
                if first_of_block and (rnd == 0 or len(self.cfg.auth) > 1):
                    self.warmup(auth)
                # Rotate who goes first, by round and by cell: each target goes first in a
                # different round, and no target always runs right after the same neighbour.
                k = (rnd + ci) % len(order)
                rotated = order[k:] + order[:k]
                for pos, name in enumerate(rotated):
                    n += 1
                    r = self.one_run(
                        self.targets[name], workload, clients, rnd, pos, self.cfg.duration, auth
                    )
                    self.runs.append(r)
                    flag = "" if not r.bad else f"  <-- {describe_problem(r)}"
                    log(
                        f"[{n}/{total}] round {rnd + 1} {WORKLOADS[workload][0]:<18} "
                        f"c={clients:<4} {auth:<5} {name:<11} {fmt_tps(r.tps)} tps"
                        f"{fmt_cpu(r)}{flag}"
                    )

    # -- results -------------------------------------------------------------
    def write_json(self, rows: list[dict[str, Any]], status: str) -> Path:
        outdir = Path(self.cfg.results_dir)
        outdir.mkdir(parents=True, exist_ok=True)
        path = outdir / f"{self.stamp}.json"
        doc = {
            "status": status,
            "started": self.started,
            "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": sys.argv,
            "config": asdict(self.cfg),
            "machine": self.machine,
            "loadavg_at_end": os.getloadavg(),
            "targets": {
                name: {
                    "port": t.port,
                    "version": t.version(),
                    "pid": t.pid,
                    "workers": getattr(t, "workers", None),
                }
                for name, t in self.targets.items()
            },
            "skipped": self.skipped,
            "scram_user": self.scram.name if self.scram is not None else None,
            "auth_checks": self.auth_checks,
            "tls": {
                "on": self.tls is not None,
                "what": self.tls.describe() if self.tls is not None else None,
                "checks": self.tls_checks,
            },
            "summary": rows,
            "profile": self.profile,
            "runs": [asdict(r) for r in self.runs],
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    # -- main ----------------------------------------------------------------
    def run(self) -> int:
        status = "interrupted"
        try:
            self.setup_cluster()
            self.machine = machine_info(
                self.cluster, self.pgbench, self.pgbouncer_bin, self.cfg.pgcorral_python
            )
            self.setup_targets()
            if not self.targets:
                log("no target could be started; nothing to measure")
                status = "no targets"
                return 1
            self.run_rounds()
            if self.cfg.profile:
                if self.cfg.rounds == 0 or self.cfg.auth[-1] != "trust":
                    self.warmup("trust")  # the profiled run logs in as the trust user
                self.profile = run_profile(self)
            status = "complete"
        except KeyboardInterrupt:
            log("interrupted; cleaning up")
        except Exception as e:  # report what we have, then clean up
            import traceback

            traceback.print_exc()
            status = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"{status}; cleaning up")
        finally:
            # No second Ctrl-C half way through the cleanup.
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self.cleanup()
                rows = summary(self.cfg, self.runs)
                if self.runs:
                    print()
                    print(report(self.cfg, rows, self.skipped, self.tls_checks))
                if self.runs or self.profile:
                    path = self.write_json(rows, status)
                    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                    log(f"results written to {shown}")
            finally:
                signal.signal(signal.SIGINT, old)
        ok = status == "complete" and not self.start_failures and not any(r.bad for r in self.runs)
        return 0 if ok else 1

    def cleanup(self) -> None:
        for target in list(self.targets.values())[::-1]:
            try:
                target.stop()
            except Exception as e:  # keep going: the cluster must still be stopped
                log(f"stopping {target.name}: {e}")
        PROCS.stop_all()
        try:
            if self.cfg.keep:
                self.cluster.stop()
                log(f"kept {self.tmp}")
            else:
                self.cluster.destroy()
                shutil.rmtree(self.tmp, ignore_errors=True)
        except Exception as e:
            log(f"stopping PostgreSQL: {e}")
