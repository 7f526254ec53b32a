"""Targets pgbench connects to: PostgreSQL directly, a PgBouncer and a pgcorral of our own."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from devtools.pgcluster import PgCluster, find_free_port, unprivileged_user

from . import REPO
from .common import DBNAME, DBUSER, ModeSpec, log, pgcorral_name
from .procs import PROCS, clean_env, first_line, tail
from .proctree import CpuSample, descendants, stop_leftovers, tree_cpu


class TargetError(RuntimeError):
    """A target could not be started or died."""


def wait_ready(
    name: str,
    port: int,
    psql: str,
    proc: subprocess.Popen[bytes] | None,
    logfile: Path | None,
    timeout: float,
) -> None:
    """Wait until `SELECT 1` works on 127.0.0.1:port; raise with the log tail otherwise."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TargetError(
                f"{name} exited with code {proc.returncode} during startup"
                + (f"; tail of {logfile}:\n{tail(logfile)}" if logfile else "")
            )
        with socket.socket() as s:
            s.settimeout(1)
            listening = s.connect_ex(("127.0.0.1", port)) == 0
        if listening:
            res = subprocess.run(
                [psql, "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", DBUSER,
                 "-d", DBNAME, "-c", "SELECT 1"],
                capture_output=True, text=True, env=clean_env(PGCONNECT_TIMEOUT="5"),
                timeout=30, check=False,
            )  # fmt: skip
            if res.returncode == 0 and res.stdout.strip() == "1":
                return
            last = (res.stderr or res.stdout).strip()
        time.sleep(0.2)
    raise TargetError(
        f"{name} did not accept `SELECT 1` on 127.0.0.1:{port} within {timeout:.0f}s"
        + (f" (last error: {last})" if last else "")
        + (f"; tail of {logfile}:\n{tail(logfile)}" if logfile else "")
    )


class Target:
    """What pgbench connects to; a subclass starts it (or not) and knows its process."""

    name = "?"
    host = "127.0.0.1"
    port = 0
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    logfile: Path | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            # Its children (pgcorral's workers) should go with it; stop any that do not.
            children = descendants(self.proc.pid) if self.proc.poll() is None else []
            if self.proc.poll() is None:
                log(f"stopping {self.name} (pid {self.proc.pid})")
            PROCS.stop(self.proc)
            self.proc = None
            if left := stop_leftovers(children):
                log(f"{self.name}: stopped leftover child process(es) {left}")

    def cpu(self) -> CpuSample | None:
        """CPU time so far of the target's process and all its descendants (None: direct)."""
        return tree_cpu(self.proc.pid) if self.proc is not None else None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise TargetError(
                f"{self.name} (pid {self.proc.pid}) died with code {self.proc.returncode}"
                + (f"; tail of {self.logfile}:\n{tail(self.logfile)}" if self.logfile else "")
            )

    def version(self) -> str | None:
        return None


class DirectTarget(Target):
    """PostgreSQL itself: nothing to start."""

    name = "direct"

    def __init__(self, cluster: PgCluster) -> None:
        self.port = cluster.port

    def start(self) -> None:
        pass


class PoolerTarget(Target):
    """A pooler in front of the cluster (what the PgBouncer and pgcorral targets share)."""

    def __init__(
        self, workdir: Path, cluster: PgCluster, pool_size: int, mode: ModeSpec,
        psql: str, start_timeout: float,
    ) -> None:  # fmt: skip
        self.workdir = workdir
        self.cluster = cluster
        self.pool_size = pool_size
        self.mode = mode
        self.psql = psql
        self.start_timeout = start_timeout
        self.port = find_free_port()
        self.log_path = workdir / f"{self.name}.log"
        self.logfile = self.log_path


class PgBouncerTarget(PoolerTarget):
    """A PgBouncer of our own: own ini, own port, run as the unprivileged user."""

    name = "pgbouncer"

    def __init__(
        self, binary: str, workdir: Path, cluster: PgCluster, pool_size: int, mode: ModeSpec,
        psql: str, start_timeout: float,
    ) -> None:  # fmt: skip
        super().__init__(workdir, cluster, pool_size, mode, psql, start_timeout)
        self.binary = binary

    def ini(self) -> str:
        w = self.workdir
        return f"""\
[databases]
{DBNAME} = host={self.cluster.host} port={self.cluster.port} dbname={DBNAME}
postgres = host={self.cluster.host} port={self.cluster.port} dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {w / "userlist.txt"}
admin_users = {DBUSER}
pool_mode = {self.mode.pgbouncer_pool_mode}
default_pool_size = {self.pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 1000
max_db_connections = {self.pool_size}
server_reset_query = DISCARD ALL
ignore_startup_parameters = extra_float_digits,options
logfile = {self.log_path}
pidfile = {w / "pgbouncer.pid"}
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
"""

    def start(self) -> None:
        user = unprivileged_user()  # PgBouncer refuses to run as root
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "userlist.txt").write_text(f'"{DBUSER}" ""\n')
        ini = self.workdir / "pgbouncer.ini"
        ini.write_text(self.ini())
        self.log_path.touch()
        if user is not None:
            pw = pwd.getpwnam(user)
            for p in (self.workdir, *self.workdir.iterdir()):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        # Our own process with our own ini on our own port (never the Debian service).
        self.proc = PROCS.start(
            "pgbouncer",
            [self.binary, str(ini)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "pgbouncer.stderr", "wb"),  # noqa: SIM115
            cwd=self.workdir,
            user=user,
            group=pwd.getpwnam(user).pw_gid if user else None,
            extra_groups=[] if user else None,
            start_new_session=True,
            env=clean_env(),
        )
        wait_ready(self.name, self.port, self.psql, self.proc, self.logfile, self.start_timeout)

    def version(self) -> str | None:
        return first_line([self.binary, "--version"])


class PgCorralTarget(PoolerTarget):
    """pgcorral from this checkout's src/, run as `python -m pgcorral`, with `workers = N`."""

    def __init__(
        self, python: str, workdir: Path, cluster: PgCluster, pool_size: int, mode: ModeSpec,
        psql: str, start_timeout: float, workers: int = 1,
    ) -> None:  # fmt: skip
        self.name = pgcorral_name(workers)
        self.workers = workers
        super().__init__(workdir, cluster, pool_size, mode, psql, start_timeout)
        self.python = python

    def conf(self) -> str:
        return f"""\
[pgcorral]
host = 127.0.0.1
port = {self.port}
unix_socket_dir = {self.workdir}
log_type = console
log_level = warn
max_connections = {self.pool_size}
pipeline = {self.mode.pgcorral_pipeline}
blocking_timeout = 30
workers = {self.workers}

[primary]
host = {self.cluster.host}
port = {self.cluster.port}
"""

    def command(self, wrapper: Sequence[str] = ()) -> list[str]:
        """`python [wrapper...] -m pgcorral ...`; wrapper is e.g. ("-m", "cProfile", ...)."""
        return [
            self.python, *wrapper, "-m", "pgcorral",
            "-c", str(self.workdir / "pgcorral.conf"),
            "-a", str(self.workdir / "pgcorral_hba.conf"),
        ]  # fmt: skip

    def start(self, wrapper: Sequence[str] = ()) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "pgcorral.conf").write_text(self.conf())
        (self.workdir / "pgcorral_hba.conf").write_text("host all all all all\n")
        env = clean_env()
        # Works from a plain checkout too; harmless with an editable install.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p
        )
        self.proc = PROCS.start(
            "pgcorral",
            self.command(wrapper),
            stdin=subprocess.DEVNULL,
            stdout=open(self.log_path, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
            env=env,
        )
        wait_ready(self.name, self.port, self.psql, self.proc, self.logfile, self.start_timeout)

    def version(self) -> str | None:
        return first_line(
            [self.python, "-c", "import pgcorral; print(pgcorral.__version__)"],
            env={"PYTHONPATH": str(REPO / "src")},
        )
