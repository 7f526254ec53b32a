"""The soak (issue 15, item 7; ``make soak``, ``make soak-ci``): the mixing fuzzer's clients
(tests/fuzz/mixer.py: 16 clients, every mix, with its checks) run through pgcorral
(transaction pooling, 2 workers) for SOAK_SECONDS while faults come on a schedule, one every
SOAK_FAULT_INTERVAL seconds in turn:

- backend kills: pg_terminate_backend of 10 random backends of the pool, over about a second;
- SIGHUP: 10 reloads;
- kill -9 of a worker (the supervisor starts a new one);
- PostgreSQL restarted with ``-m fast``;
- a black-hole episode: the TCP proxy between pgcorral and PostgreSQL (tests/faultproxy.py)
  stops forwarding for 3 s, then cuts every connection, as a partition that ends (the proxy
  runs in a process of its own).

After each fault it times how long until a new client is served again (the recovery). At the
end it prints the figures: transactions, mixed and leaked ones (the fuzzer's checks), errors
by kind and SQLSTATE, faults and recovery times, pgcorral's descriptors and memory (PSS) and
server connections before and after. It fails (exit status 1, ``Report.problems``) on a mixed
or leaked transaction, a traceback in pgcorral's log, pgcorral gone, a recovery that did not
happen, clients or server connections left over, or descriptors that grew.

Environment: SOAK_SECONDS (1800), SOAK_FAULT_INTERVAL (15), SOAK_SEED (random, printed),
SOAK_WORKERS (2), SOAK_POOL (4), SOAK_CLIENTS (16). Loopback only; everything it starts is
stopped by PID on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devtools.pgcluster import PgCluster  # noqa: E402
from tests.faultproxy import ProxyProcess  # noqa: E402
from tests.fuzz.__main__ import start_pgcorral  # noqa: E402
from tests.fuzz.mixer import Config, Result, Target, fuzz  # noqa: E402
from tests.load import tree_fds, tree_pids, tree_pss_kib  # noqa: E402

DB = "soak"
USER = "soakuser"
FD_MARGIN = 6  # descriptors a quiet pgcorral may hold more at the end (a cancel in flight...)


@dataclass
class Settings:
    seconds: float = 1800
    fault_interval: float = 15
    seed: int = 0
    workers: int = 2
    pool: int = 4
    clients: int = 16

    @classmethod
    def from_env(cls, **override: Any) -> Settings:
        def num(name: str, default: float) -> float:
            value = os.environ.get(name, "")
            return float(value) if value else default

        s = cls(seconds=num("SOAK_SECONDS", 1800),
                fault_interval=num("SOAK_FAULT_INTERVAL", 15),
                seed=int(num("SOAK_SEED", random.randrange(1 << 32))),
                workers=int(num("SOAK_WORKERS", 2)), pool=int(num("SOAK_POOL", 4)),
                clients=int(num("SOAK_CLIENTS", 16)))
        for k, v in override.items():
            setattr(s, k, v)
        return s


@dataclass
class Report:
    settings: Settings
    fuzz: Result | None = None
    faults: Counter[str] = field(default_factory=Counter)
    recovery: dict[str, list[float]] = field(default_factory=dict)  # fault -> seconds
    backends_killed: int = 0
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        r = self.fuzz
        return {
            "seed": self.settings.seed, "seconds": self.settings.seconds,
            "workers": self.settings.workers, "pool": self.settings.pool,
            "clients": self.settings.clients,
            "transactions": r.transactions if r else 0,
            "committed": r.committed if r else 0,
            "mixed": r.mixed if r else None, "leaked": r.leaked if r else None,
            "errors": dict(sorted(r.errors.items())) if r else {},
            "faults": dict(self.faults), "backends_killed": self.backends_killed,
            "recovery_max_s": {k: round(max(v), 2) for k, v in self.recovery.items() if v},
            "before": self.before, "after": self.after,
            "problems": self.problems,
        }

    def summary(self) -> str:
        lines = [json.dumps(self.figures(), indent=2)]
        if self.fuzz is not None:
            lines.append(self.fuzz.summary())
        return "\n".join(lines)


class Soak:
    def __init__(self, settings: Settings, pg: PgCluster, proxy: ProxyProcess,
                 proc: subprocess.Popen[bytes], port: int, conf: str, log: str) -> None:
        self.s = settings
        self.pg = pg
        self.proxy = proxy
        self.proc = proc
        self.port = port
        self.conf = conf
        self.log = log
        self.report = Report(settings)
        self.rng = random.Random(f"{settings.seed}:faults")
        self.done = False

    # -- what pgcorral holds

    def status(self) -> dict[str, Any]:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
        out = subprocess.run([sys.executable, "-m", "pgcorral.cli.cli", "-c", self.conf,
                              "-F", "json", "status"], capture_output=True, text=True,
                             timeout=60, env=env, check=False)
        if out.returncode != 0:
            return {}
        answer: dict[str, Any] = json.loads(out.stdout)
        return answer

    def connection_rows(self) -> list[str]:
        """One line per server connection pgcorral holds (``status details``), and the
        backends PostgreSQL has for the soak's user: what a count over the pool is made of."""
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
        out = subprocess.run([sys.executable, "-m", "pgcorral.cli.cli", "-c", self.conf,
                              "-F", "json", "status", "details"], capture_output=True,
                             text=True, timeout=60, env=env, check=False)
        if out.returncode != 0:
            return [f"status details failed: {out.stderr.strip()}"]
        rows = [f"worker {c['worker']} slot {c['id']} {c['state']} pid {c['pid']}"
                for c in json.loads(out.stdout).get("connections", [])]
        psql = subprocess.run([self.pg.bin("psql"), "-h", "127.0.0.1", "-p", str(self.pg.port),
                               "-U", "postgres", "-d", DB, "-Atc",
                               "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity "
                               f"WHERE usename = '{USER}'"],
                              capture_output=True, text=True, timeout=60, check=False)
        return [*rows, f"PostgreSQL backends of {USER}: {psql.stdout.strip() or psql.stderr}"]

    def holdings(self) -> dict[str, int]:
        st = self.status()
        clients, servers = int(st.get("clients", -1)), int(st.get("total_connections", -1))
        fds = tree_fds(self.proc.pid)
        return {"fds": fds, "fds_less_connections": fds - max(clients, 0) - max(servers, 0),
                "pss_kib": tree_pss_kib(self.proc.pid), "clients": clients,
                "server_connections": servers, "processes": len(tree_pids(self.proc.pid))}

    # -- the faults

    async def served(self, timeout: float = 60) -> float:
        """Seconds until a new client gets an answer through pgcorral."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                c = await asyncpg.connect(host="127.0.0.1", port=self.port, user=USER,
                                          database=DB, timeout=5)
                try:
                    await c.fetchval("SELECT 1", timeout=5)
                    return time.monotonic() - start
                finally:
                    await c.close(timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await asyncio.sleep(0.1)
        raise TimeoutError

    async def kill_backends(self) -> None:
        c = await asyncpg.connect(host="127.0.0.1", port=self.pg.port, user="postgres",
                                  database=DB, timeout=10)
        try:
            for _ in range(10):
                self.report.backends_killed += int(bool(await c.fetchval(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ("
                    "SELECT pid FROM pg_stat_activity WHERE usename = $1 "
                    "AND backend_type = 'client backend' ORDER BY random() LIMIT 1)", USER)))
                await asyncio.sleep(0.1)
        finally:
            await c.close()

    async def sighup(self) -> None:
        for _ in range(10):
            self.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.1)

    async def kill_worker(self) -> None:
        workers = tree_pids(self.proc.pid)[1:]
        if not workers:
            return
        os.kill(self.rng.choice(workers), signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(tree_pids(self.proc.pid)) - 1 < len(workers):  # the new one
            if time.monotonic() > deadline:
                self.report.problems.append("no new worker 20 s after a worker's kill -9")
                return
            await asyncio.sleep(0.1)

    async def restart_postgresql(self) -> None:
        await asyncio.to_thread(self.pg.stop, "fast")
        await asyncio.to_thread(self.pg.start)

    async def black_hole(self) -> None:
        self.proxy.black_hole()
        await asyncio.sleep(3)
        self.proxy.heal()

    FAULTS = ("backend_kills", "sighup", "worker_kill_9", "postgresql_fast_restart",
              "black_hole")

    async def faults(self) -> None:
        actions = {"backend_kills": self.kill_backends, "sighup": self.sighup,
                   "worker_kill_9": self.kill_worker,
                   "postgresql_fast_restart": self.restart_postgresql,
                   "black_hole": self.black_hole}
        n = 0
        while True:
            await asyncio.sleep(self.s.fault_interval)
            if self.done:
                return
            name = self.FAULTS[n % len(self.FAULTS)]
            n += 1
            print(f"soak: {time.strftime('%H:%M:%S')} fault {name}", file=sys.stderr,
                  flush=True)
            try:
                await actions[name]()
                self.report.faults[name] += 1
                self.report.recovery.setdefault(name, []).append(await self.served())
            except TimeoutError:
                self.report.problems.append(f"not served again 60 s after {name}")
            except Exception as exc:  # (the fault itself failed: say so, go on)
                self.report.problems.append(f"fault {name} failed: {exc!r}")

    async def run(self) -> Report:
        await self.served()
        self.report.before = self.holdings()
        target = Target(host="127.0.0.1", port=self.port, database=DB, user=USER,
                        direct_host="127.0.0.1", direct_port=self.pg.port,
                        direct_user="postgres")
        config = Config(seed=self.s.seed, transactions=0, seconds=self.s.seconds,
                        clients=self.s.clients, kill_interval=0)
        faults = asyncio.ensure_future(self.faults())
        try:
            self.report.fuzz = await fuzz(target, config)
        finally:
            self.done = True
            faults.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await faults
        await self.check_after()
        return self.report

    async def check_after(self) -> None:
        rep = self.report
        r = rep.fuzz
        assert r is not None
        if r.mixed or r.leaked or r.failures:
            rep.problems.append(f"mixed {r.mixed}, leaked {r.leaked}, "
                                f"{len(r.failures)} failed checks")
        if self.proc.poll() is not None:
            rep.problems.append(f"pgcorral exited ({self.proc.returncode})")
            return
        try:
            await self.served()
        except TimeoutError:
            rep.problems.append("not served at the end")
        deadline = time.monotonic() + 20
        while True:  # the fuzzer's clients are gone; pgcorral lets go of them
            rep.after = self.holdings()
            quiet = rep.after["clients"] == 0 and 0 <= rep.after["server_connections"] \
                <= self.s.pool and rep.after["fds_less_connections"] <= \
                rep.before["fds_less_connections"] + FD_MARGIN
            if quiet or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        if rep.after["clients"] != 0:
            rep.problems.append(f"{rep.after['clients']} clients left over")
        if not 0 <= rep.after["server_connections"] <= self.s.pool:
            rep.problems.append(f"{rep.after['server_connections']} server connections "
                                f"(pool {self.s.pool}): "
                                + "; ".join(await asyncio.to_thread(self.connection_rows)))
        grown = rep.after["fds_less_connections"] - rep.before["fds_less_connections"]
        if grown > FD_MARGIN:
            rep.problems.append(f"descriptors grew by {grown}")
        text = Path(self.log).read_text(errors="replace")
        if "Traceback" in text:
            rep.problems.append(f"a Traceback in pgcorral's log {self.log}")


def soak(settings: Settings) -> Report:
    """Start PostgreSQL, the proxy and pgcorral, soak, stop them all; the report."""
    basedir = tempfile.mkdtemp(prefix="pgcorral-soak-pg-")
    os.chmod(basedir, 0o755)
    workdir = tempfile.mkdtemp(prefix="pgcorral-soak-d-")
    os.chmod(workdir, 0o755)
    pg = PgCluster(basedir)
    proxy = None
    proc = None
    try:
        pg.init(settings={"log_min_messages": "warning"},
                hba_lines=["host all all 127.0.0.1/32 trust", "local all all trust"])
        pg.start()
        pg.psql(f"CREATE DATABASE {DB}")
        pg.psql(f"CREATE ROLE {USER} LOGIN")
        pg.psql("GRANT ALL ON SCHEMA public TO PUBLIC", dbname=DB)
        proxy = ProxyProcess(pg.port)
        proc, port, log = start_pgcorral(workdir, proxy.port, settings.workers, settings.pool)
        run = Soak(settings, pg, proxy, proc, port, os.path.join(workdir, "pgcorral.conf"),
                   log)
        report = asyncio.run(run.run())
        if report.problems:  # (the work directory goes: keep the log to look into)
            kept = shutil.copy(log, f"/tmp/pgcorral-soak-{settings.seed}.log")
            report.problems.append(f"pgcorral's log kept: {kept}")
        return report
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proxy is not None:
            proxy.close()
        pg.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    settings = Settings.from_env()
    print(f"soak: seed={settings.seed} seconds={settings.seconds:g} "
          f"fault_interval={settings.fault_interval:g} workers={settings.workers} "
          f"pool={settings.pool} clients={settings.clients}", flush=True)
    report = soak(settings)
    print(report.summary(), flush=True)
    return 1 if report.problems else 0
