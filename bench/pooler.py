"""What the client-crowd benchmarks (idle_clients.py, storm.py, rolling_restart.py) share: a
throwaway PostgreSQL and one pooler in front of it (pgcorral or PgBouncer), started and stopped
around a measurement; the pooler's memory (PSS) and descriptors; a raw-protocol login.

    with pooler_run("storm-", args) as proc:   # proc.port: the pooler's port
        result = asyncio.run(measure(args, proc))

``args`` needs: target (pgcorral|pgbouncer), pipeline, pool, workers, timeout, clients, user.
Loopback only; everything started is stopped (SIGINT, then SIGKILL after 20 s) on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devtools.pgcluster import PgCluster, find_free_port, unprivileged_user  # noqa: E402


def tree_pids(root: int) -> list[int]:
    pids = [root]
    children = Path(f"/proc/{root}/task/{root}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    return pids


def pss_kib(root: int) -> int:
    """PSS of ``root`` and its children, KiB (``/proc/PID/smaps_rollup``)."""
    total = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def fds(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(FileNotFoundError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


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


async def wait_ready(port: int, user: str, database: str) -> None:
    """Until a login through the pooler succeeds (20 s at most)."""
    for _ in range(200):
        try:
            _, w = await login(port, user, database, wait_ready=True)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)


def start_pgcorral(workdir: Path, pg: PgCluster, args: argparse.Namespace,
                   port: int | None = None, extra: str = "", name: str = "pgcorral",
                   log_level: str = "warn") -> subprocess.Popen[bytes]:
    """pgcorral in front of ``pg``; ``extra``: more lines for its [pgcorral] section; its
    configuration and log are ``<workdir>/<name>.conf`` and ``.log``."""
    port = port or find_free_port()
    conf = workdir / f"{name}.conf"
    conf.write_text(
        "[pgcorral]\nhost = 127.0.0.1\n"
        f"port = {port}\nunix_socket_dir = {workdir}\nlog_type = file\n"
        f"log_path = {workdir}/{name}.log\nlog_level = {log_level}\n"
        f"pipeline = {args.pipeline}\nmax_connections = {args.pool}\n"
        f"workers = {args.workers}\nblocking_timeout = {int(args.timeout)}\n{extra}"
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


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def raise_fd_limit() -> int:
    """The soft descriptor limit raised to the hard one; returns it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@contextlib.contextmanager
def cluster(prefix: str) -> Iterator[tuple[Path, PgCluster]]:
    """A work directory and a running throwaway PostgreSQL in it; both gone afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(workdir, 0o755)
    pg = PgCluster(str(workdir / "pg"))
    try:
        pg.init()
        pg.start()
        yield workdir, pg
    finally:
        pg.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def pooler_run(prefix: str, args: argparse.Namespace) -> Iterator[subprocess.Popen[bytes]]:
    """PostgreSQL and the pooler ``args.target`` in front of it, for the ``with`` block."""
    raise_fd_limit()
    with cluster(prefix) as (workdir, pg):
        start = start_pgcorral if args.target == "pgcorral" else start_pgbouncer
        proc = start(workdir, pg, args)
        try:
            yield proc
        finally:
            stop(proc)
