"""``make fuzz``: start a throwaway PostgreSQL and pgcorral (``pipeline = transaction``), run
the mixing fuzzer against them and print the figure.

Environment: FUZZ_TRANSACTIONS (default 1000000; 0 = no limit), FUZZ_SECONDS (0 = no limit),
FUZZ_SEED (default: random, printed), FUZZ_CLIENTS (16), FUZZ_WORKERS (pgcorral's `workers`,
default 1), FUZZ_POOL (`max_connections`, default 4), FUZZ_KILL_INTERVAL (mean seconds between
pg_terminate_backend calls, default 0.25; 0 = none), FUZZ_OWNER_GUC (the session setting
each client SETs and checks: search_path by default, fuzz.owner for a custom one),
FUZZ_DIRECT=1 (the control run: the clients connect to PostgreSQL directly, so what fails
then is the fuzzer's, not pgcorral's), FUZZ_KNOWN_BUGS=1 (also run the steps that meet the
bugs known today, see docs).
Exit status 1 when a check failed.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devtools.pgcluster import PgCluster, find_free_port  # noqa: E402
from tests.fuzz.mixer import OWNER_GUC, Config, Target, fuzz  # noqa: E402

DB = "fuzz"
USER = "fuzzuser"


def env_num(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value else default


def start_pgcorral(workdir: str, pg_port: int, workers: int, pool: int) -> tuple[
        subprocess.Popen[bytes], int, str]:
    port = find_free_port()
    conf = os.path.join(workdir, "pgcorral.conf")
    Path(conf).write_text(
        "[pgcorral]\nhost = 127.0.0.1\n"
        f"port = {port}\nunix_socket_dir = {workdir}\nlog_type = console\nlog_level = info\n"
        f"workers = {workers}\npipeline = transaction\nmax_connections = {pool}\n"
        "blocking_timeout = 30\n"
        f"\n[primary]\nhost = 127.0.0.1\nport = {pg_port}\n", encoding="utf-8")
    hba = os.path.join(workdir, "pgcorral_hba.conf")
    Path(hba).write_text("host all all all all\n", encoding="utf-8")
    log = os.path.join(workdir, "pgcorral.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "src"),
                                                    env.get("PYTHONPATH")) if p)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pgcorral", "-c", conf, "-a", hba],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=workdir, env=env)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"pgcorral exited ({proc.returncode}):\n{Path(log).read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if "pgcorral: started" in Path(log).read_text(errors="replace"):
                    return proc, port, log
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"pgcorral did not start:\n{Path(log).read_text()}")
        time.sleep(0.05)


def main() -> int:
    seed = int(env_num("FUZZ_SEED", random.randrange(1 << 32)))
    config = Config(
        seed=seed,
        transactions=int(env_num("FUZZ_TRANSACTIONS", 1_000_000)),
        seconds=env_num("FUZZ_SECONDS", 0),
        clients=int(env_num("FUZZ_CLIENTS", 16)),
        kill_interval=env_num("FUZZ_KILL_INTERVAL", 0.25),
        progress=True,
        owner_guc=os.environ.get("FUZZ_OWNER_GUC") or OWNER_GUC,
        known_bugs=os.environ.get("FUZZ_KNOWN_BUGS", "1") == "1",
    )
    workers = int(env_num("FUZZ_WORKERS", 1))
    pool = int(env_num("FUZZ_POOL", 4))
    print(f"fuzz: seed={seed} transactions={config.transactions} seconds={config.seconds:g} "
          f"clients={config.clients} workers={workers} pool={pool}", flush=True)
    basedir = tempfile.mkdtemp(prefix="pgcorral-fuzz-pg-")
    os.chmod(basedir, 0o755)
    workdir = tempfile.mkdtemp(prefix="pgcorral-fuzz-d-")
    os.chmod(workdir, 0o755)
    pg = PgCluster(basedir)
    proc = None
    try:
        pg.init(settings={"log_min_messages": "warning"},
                hba_lines=["host all all 127.0.0.1/32 trust", "local all all trust"])
        pg.start()
        pg.psql(f"CREATE DATABASE {DB}")
        pg.psql(f"CREATE ROLE {USER} LOGIN")
        pg.psql("GRANT ALL ON SCHEMA public TO PUBLIC", dbname=DB)
        proc, port, log = start_pgcorral(workdir, pg.port, workers, pool)
        if os.environ.get("FUZZ_DIRECT") == "1":  # the control run: no pgcorral in between
            port = pg.port
        target = Target(host="127.0.0.1", port=port, database=DB, user=USER,
                        direct_host="127.0.0.1", direct_port=pg.port, direct_user="postgres")
        result = asyncio.run(fuzz(target, config))
        print(result.summary(), flush=True)
        print(f"pgcorral's log: {log}", flush=True)
        text = Path(log).read_text(errors="replace")
        bad = result.failures or "Traceback" in text
        if "Traceback" in text:
            print(f"pgcorral's log has a Traceback: {log} (kept)", flush=True)
        return 1 if bad else 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        pg.destroy()
        shutil.rmtree(basedir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
