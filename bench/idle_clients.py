"""Memory per idle client (issue 15, item 1): N client connections held open through a pooler,
and the pooler's memory (PSS of all its processes) before and after.

    .venv/bin/python bench/idle_clients.py --clients 10000 --pipeline transaction --workers 1
    .venv/bin/python bench/idle_clients.py --clients 10000 --target pgbouncer

It starts a throwaway PostgreSQL 15 (devtools/pgcluster.py) and the pooler (pgcorral from src/,
or Debian's pgbouncer), opens the clients from one asyncio process with a raw protocol-v3
login (trust), keeps them open, measures, and reports JSON on stdout:

* transaction pooling: every client is logged in (ReadyForQuery seen) and idle; the pool has
  `--pool` server connections.
* session pooling: `--pool` clients hold a server connection each; the others wait in the
  pool's line (blocking_timeout is raised so that they stay): what a session pooler holds for a
  client it cannot serve yet.

While the clients are held, one more client runs `SELECT 1` in a loop: its median latency is
reported with and without the crowd. Everything stays on 127.0.0.1; the run is bounded by
`--timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.pgcluster import PgCluster, find_free_port, unprivileged_user  # noqa: E402


def pss_kib(root: int) -> int:
    """PSS of ``root`` and its descendants, KiB (``/proc/PID/smaps_rollup``)."""
    pids = [root]
    children = Path(f"/proc/{root}/task/{root}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def fds(root: int) -> int:
    pids = [root]
    children = Path(f"/proc/{root}/task/{root}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids if Path(f"/proc/{pid}").exists())


def startup(user: str, database: str) -> bytes:
    body = struct.pack("!i", 196608) + f"user\0{user}\0database\0{database}\0\0".encode()
    return struct.pack("!i", len(body) + 4) + body


async def login(port: int, user: str, database: str, wait_ready: bool
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(startup(user, database))
    await writer.drain()
    if wait_ready:
        while True:
            head = await reader.readexactly(5)
            body = await reader.readexactly(struct.unpack("!i", head[1:])[0] - 4)
            if head[:1] == b"E":
                raise RuntimeError(f"login refused: {body!r}")
            if head[:1] == b"Z":
                break
    return reader, writer


async def query_latency(port: int, user: str, database: str, seconds: float) -> float:
    """Median round trip of ``SELECT 1`` on one connection, ms."""
    reader, writer = await login(port, user, database, wait_ready=True)
    q = b"SELECT 1\0"
    message = b"Q" + struct.pack("!i", len(q) + 4) + q
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        writer.write(message)
        while True:
            head = await reader.readexactly(5)
            await reader.readexactly(struct.unpack("!i", head[1:])[0] - 4)
            if head[:1] == b"Z":
                break
        samples.append((time.perf_counter() - start) * 1000)
    writer.close()
    return statistics.median(samples)


async def hold(port: int, n: int, user: str, database: str, wait_ready: bool,
               concurrency: int = 200) -> list[asyncio.StreamWriter]:
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            _, writer = await login(port, user, database, wait_ready)
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(n)))
    return writers


def start_pgcorral(workdir: Path, pg: PgCluster,
                   args: argparse.Namespace) -> subprocess.Popen[bytes]:
    port = find_free_port()
    conf = workdir / "pgcorral.conf"
    conf.write_text(
        "[pgcorral]\nhost = 127.0.0.1\n"
        f"port = {port}\nunix_socket_dir = {workdir}\nlog_type = file\n"
        f"log_path = {workdir}/pgcorral.log\nlog_level = warn\n"
        f"pipeline = {args.pipeline}\nmax_connections = {args.pool}\n"
        f"workers = {args.workers}\nblocking_timeout = {int(args.timeout)}\n"
        f"\n[primary]\nhost = 127.0.0.1\nport = {pg.port}\n")
    hba = workdir / "hba.conf"
    hba.write_text("host all all 127.0.0.1/32 trust\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "pgcorral", "-c", str(conf), "-a", str(hba)],
                            env=env, cwd=workdir)
    proc.port = port  # type: ignore[attr-defined]
    return proc


def start_pgbouncer(workdir: Path, pg: PgCluster,
                    args: argparse.Namespace) -> subprocess.Popen[bytes]:
    port = find_free_port()
    ini = workdir / "pgbouncer.ini"
    users = workdir / "users.txt"
    users.write_text(f'"{args.user}" ""\n')
    ini.write_text(
        f"[databases]\n* = host=127.0.0.1 port={pg.port}\n[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {users}\npool_mode = {args.pipeline}\n"
        f"default_pool_size = {args.pool}\nmax_client_conn = {args.clients + 100}\n"
        f"query_wait_timeout = {int(args.timeout)}\nlogfile = {workdir}/pgbouncer.log\n")
    user = unprivileged_user()  # PgBouncer refuses to run as root
    if user is not None:
        pw = pwd.getpwnam(user)
        for path in (workdir, ini, users):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    proc = subprocess.Popen(["pgbouncer", str(ini)], cwd=workdir, user=user,
                            group=pwd.getpwnam(user).pw_gid if user else None,
                            extra_groups=[] if user else None)
    proc.port = port  # type: ignore[attr-defined]
    return proc


async def measure(args: argparse.Namespace, proc: subprocess.Popen[bytes]) -> dict[str, object]:
    port: int = proc.port  # type: ignore[attr-defined]
    for _ in range(200):
        try:
            _, w = await login(port, args.user, args.database, wait_ready=True)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    latency_before = await query_latency(port, args.user, args.database, 2)
    await asyncio.sleep(1)
    before, fds_before = pss_kib(proc.pid), fds(proc.pid)
    start = time.monotonic()
    writers = await hold(port, args.clients, args.user, args.database,
                         wait_ready=args.pipeline == "transaction")
    connect_s = time.monotonic() - start
    await asyncio.sleep(2)
    after, fds_after = pss_kib(proc.pid), fds(proc.pid)
    latency_during = await query_latency(port, args.user, args.database, 2) \
        if args.pipeline == "transaction" else None
    for w in writers:
        w.close()
    await asyncio.sleep(3)
    released = pss_kib(proc.pid)
    return {
        "clients": args.clients, "connect_seconds": round(connect_s, 2),
        "pss_before_kib": before, "pss_held_kib": after, "pss_after_close_kib": released,
        "kib_per_client": round((after - before) / args.clients, 2),
        "fds_before": fds_before, "fds_held": fds_after,
        "select1_ms_median_alone": round(latency_before, 3),
        "select1_ms_median_with_crowd": round(latency_during, 3)
        if latency_during is not None else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--pipeline", choices=["session", "transaction"], default="transaction")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--target", choices=["pgcorral", "pgbouncer"], default="pgcorral")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    args.user, args.database = "postgres", "postgres"
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.clients + 200 > hard:
        print(f"the fd limit ({hard}) is too low for {args.clients} clients", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="idle-clients-"))
    os.chmod(workdir, 0o755)
    pg = PgCluster(str(workdir / "pg"))
    pg.init()
    pg.start()
    proc = None
    try:
        proc = (start_pgcorral if args.target == "pgcorral" else start_pgbouncer)(
            workdir, pg, args)
        result = asyncio.run(asyncio.wait_for(measure(args, proc), args.timeout))
        result.update(target=args.target, pipeline=args.pipeline, workers=args.workers,
                      pool=args.pool)
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
