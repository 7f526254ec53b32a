"""Targets pgbench connects to: PostgreSQL directly, a PgBouncer and a pgcorral of our own."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devtools.pgcluster import PgCluster, find_free_port, unprivileged_user

from . import REPO
from .common import DBNAME, DBUSER, ModeSpec, log, pgcorral_name
from .procs import PROCS, clean_env, first_line, tail
from .proctree import CpuSample, descendants, stop_leftovers, tree_cpu
from .tls import Tls, start_tls

#: loopback scrapes never go through an http_proxy of the environment
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TargetError(RuntimeError):
    """A target could not be started or died."""


@dataclass(frozen=True)
class ScramUser:
    """The --auth scram user: a PostgreSQL role with a SCRAM-SHA-256 verifier whose password
    each pooler also knows (PgBouncer: userlist.txt; pgcorral: its user vault)."""

    name: str
    password: str
    # PgBouncer's userlist.txt gets this SCRAM-SHA-256 verifier (pg_authid.rolpassword) instead
    # of the password when set (--pgbouncer-scram-secret verifier).
    verifier: str | None = None

    def __repr__(self) -> str:  # never in a log line
        return f"ScramUser({self.name!r})"


def auth_request(
    host: str, port: int, user: str, dbname: str, timeout: float = 10, tls: bool = False
) -> str:
    """What a server asks a client logging in as user: send a StartupMessage (after TLS
    negotiation with tls) and name the first answer ("SASL SCRAM-SHA-256", "ok" for trust,
    "cleartext", "md5", "error: ...")."""
    body = b"".join(k + b"\0" + v.encode() + b"\0" for k, v in
                    ((b"user", user), (b"database", dbname))) + b"\0"  # fmt: skip
    startup = struct.pack("!ii", 8 + len(body), 196608) + body
    with contextlib.ExitStack() as stack:
        sock: socket.socket = stack.enter_context(
            socket.create_connection((host, port), timeout=timeout)
        )
        if tls:
            sock = stack.enter_context(start_tls(sock, host))
        sock.sendall(startup)
        data = b""
        while len(data) < 5 or len(data) < 1 + struct.unpack("!i", data[1:5])[0]:
            chunk = sock.recv(4096)
            if not chunk:
                return "closed without an answer"
            data += chunk
    kind, length = data[:1], struct.unpack("!i", data[1:5])[0]
    payload = data[5 : 1 + length]
    if kind == b"E":
        fields = {f[:1]: f[1:].decode(errors="replace") for f in payload.split(b"\0") if f}
        return f"error: {fields.get(b'M', '?')}"
    if kind != b"R":
        return f"unexpected message {kind!r}"
    code = struct.unpack("!i", payload[:4])[0]
    if code == 10:
        mechs = [m.decode() for m in payload[4:].split(b"\0") if m]
        return "SASL " + ",".join(mechs)
    return {0: "ok", 3: "cleartext", 5: "md5"}.get(code, f"auth request {code}")


def check_scram(
    name: str, port: int, psql: str, user: ScramUser, tls: Tls | None = None
) -> dict[str, str]:
    """Check that a target makes user log in with SCRAM-SHA-256 and really checks the password:
    it must ask for SASL SCRAM-SHA-256, accept the password and refuse a wrong one (over TLS
    with --tls)."""
    method = auth_request("127.0.0.1", port, user.name, DBNAME, tls=tls is not None)
    env = tls.client_env() if tls is not None else {}

    def login(password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [psql, "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", user.name,
             "-d", DBNAME, "-c", "SELECT 1"],
            capture_output=True, text=True, timeout=30, check=False,
            env=clean_env(PGCONNECT_TIMEOUT="10", PGPASSWORD=password, **env),
        )  # fmt: skip

    right = login(user.password)
    wrong = login("not-" + user.password)
    problems = []
    # Over TLS PostgreSQL also offers SCRAM-SHA-256-PLUS (channel binding).
    mechanisms = method.removeprefix("SASL ").split(",") if method.startswith("SASL ") else []
    if "SCRAM-SHA-256" not in mechanisms:
        problems.append(f"asked {user.name} for {method!r}, not SASL SCRAM-SHA-256")
    if right.returncode != 0 or right.stdout.strip() != "1":
        problems.append(f"the right password failed: {(right.stderr or right.stdout).strip()}")
    if wrong.returncode == 0:
        problems.append("a wrong password was accepted")
    if problems:
        raise TargetError(f"{name}: SCRAM check failed: " + "; ".join(problems))
    said = (wrong.stderr or wrong.stdout).strip().splitlines()
    return {"method": method, "wrong_password": said[-1] if said else f"exit {wrong.returncode}"}


def wait_ready(
    name: str,
    port: int,
    psql: str,
    proc: subprocess.Popen[bytes] | None,
    logfile: Path | None,
    timeout: float,
    env: dict[str, str] | None = None,
) -> None:
    """Wait until `SELECT 1` works on 127.0.0.1:port (env: the clients' libpq settings, e.g.
    PGSSLMODE=require with --tls); raise with the log tail otherwise."""
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
                capture_output=True, text=True,
                env=clean_env(PGCONNECT_TIMEOUT="5", **(env or {})),
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
        psql: str, start_timeout: float, scram: ScramUser | None = None, tls: Tls | None = None,
    ) -> None:  # fmt: skip
        self.tls = tls  # None: no --tls
        self.workdir = workdir
        self.cluster = cluster
        self.pool_size = pool_size
        self.mode = mode
        self.psql = psql
        self.start_timeout = start_timeout
        self.scram = scram  # None: no --auth scram, trust only
        self.port = find_free_port()
        self.log_path = workdir / f"{self.name}.log"
        self.logfile = self.log_path

    def client_env(self) -> dict[str, str]:
        """libpq settings of the harness's own clients (readiness and checks)."""
        return self.tls.client_env() if self.tls is not None else {}

    def host_type(self) -> str:
        """The hba connection type of the pooler's TCP lines: hostssl with --tls."""
        return "hostssl" if self.tls is not None else "host"


class PgBouncerTarget(PoolerTarget):
    """A PgBouncer of our own: own ini, own port, run as the unprivileged user."""

    name = "pgbouncer"

    def __init__(
        self, binary: str, workdir: Path, cluster: PgCluster, pool_size: int, mode: ModeSpec,
        psql: str, start_timeout: float, scram: ScramUser | None = None, tls: Tls | None = None,
    ) -> None:  # fmt: skip
        super().__init__(workdir, cluster, pool_size, mode, psql, start_timeout, scram, tls)
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
{self.auth_settings()}
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
{self.tls.pgbouncer_settings(w) if self.tls is not None else ""}"""

    def auth_settings(self) -> str:
        """trust only: auth_type = trust.  With the scram user: auth_type = hba, whose file
        gives that user scram-sha-256 and everyone else trust (auth_type is global)."""
        if self.scram is None:
            return "auth_type = trust"
        return f"auth_type = hba\nauth_hba_file = {self.workdir / 'pgbouncer_hba.conf'}"

    def userlist(self) -> str:
        """DBUSER without a password (trust); the scram user with its password in plain text
        (PgBouncer derives a SCRAM secret from it, with a new salt, at every client login, and
        logs in to PostgreSQL with it) or with PostgreSQL's SCRAM verifier (no derivation;
        PgBouncer logs in to PostgreSQL with the ClientKey from the client's proof)."""
        lines = [f'"{DBUSER}" ""']
        if self.scram is not None:
            pw = (self.scram.verifier or self.scram.password).replace('"', '""')
            lines.append(f'"{self.scram.name}" "{pw}"')
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        user = unprivileged_user()  # PgBouncer refuses to run as root
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "userlist.txt").write_text(self.userlist())
        if self.scram is not None:
            host = self.host_type()
            (self.workdir / "pgbouncer_hba.conf").write_text(
                f"{host} all {self.scram.name} 127.0.0.1/32 scram-sha-256\n"
                f"{host} all all 127.0.0.1/32 trust\n"
            )
        if self.tls is not None:
            self.tls.install_pgbouncer_files(self.workdir)
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
        wait_ready(self.name, self.port, self.psql, self.proc, self.logfile, self.start_timeout,
                   self.client_env())  # fmt: skip

    def version(self) -> str | None:
        return first_line([self.binary, "--version"])


class PgCorralTarget(PoolerTarget):
    """pgcorral from this checkout's src/, run as `python -m pgcorral`, with `workers = N`."""

    def __init__(
        self, python: str, workdir: Path, cluster: PgCluster, pool_size: int, mode: ModeSpec,
        psql: str, start_timeout: float, workers: int = 1, scram: ScramUser | None = None,
        build: str = "src", tls: Tls | None = None, base_rev: str = "HEAD~1",
        metrics_scrape: float = 0.0,
    ) -> None:  # fmt: skip
        self.name = pgcorral_name(workers, build)
        self.workers = workers
        self.build = build
        self.base_rev = base_rev
        # /metrics served and scraped every metrics_scrape seconds while the target runs
        self.metrics_scrape = metrics_scrape
        self.metrics_port = find_free_port() if metrics_scrape > 0 else 0
        self.scrapes = {"ok": 0, "failed": 0}
        self._scraping = threading.Event()
        self._version: str | None = None
        super().__init__(workdir, cluster, pool_size, mode, psql, start_timeout, scram, tls)
        self.python = python
        # The vault (only with the scram user): a master key of its own in a 0700 directory
        # (PGCORRAL_MASTER_KEY_FILE, so HOME is not touched) and the users file.
        self.master_key = workdir / "vault" / "master.key"
        self.users_file = workdir / "pgcorral_users.conf"

    def conf(self) -> str:
        tls_main = self.tls.pgcorral_main() if self.tls is not None else ""
        tls_server = self.tls.pgcorral_server() if self.tls is not None else ""
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
{f"metrics = {self.metrics_port}" if self.metrics_port else ""}
{tls_main}
[primary]
host = {self.cluster.host}
port = {self.cluster.port}
{tls_server}"""

    def command(self, wrapper: Sequence[str] = ()) -> list[str]:
        """`python [wrapper...] -m pgcorral ...`; wrapper is e.g. ("-m", "cProfile", ...)."""
        return [
            self.python, *wrapper, "-m", "pgcorral",
            "-c", str(self.workdir / "pgcorral.conf"),
            "-a", str(self.workdir / "pgcorral_hba.conf"),
            *(("-u", str(self.users_file)) if self.scram is not None else ()),
        ]  # fmt: skip

    def hba(self) -> str:
        """Everyone as before (method `all`; DBUSER is not in the vault, so its login is
        passed through to PostgreSQL, which trusts it); the scram user with scram-sha-256.
        With --tls the lines are hostssl: a client without TLS is refused."""
        host = self.host_type()
        lines = [f"{host} all all all all"]
        if self.scram is not None:
            lines.insert(0, f"{host} all {self.scram.name} all scram-sha-256")
        return "\n".join(lines) + "\n"

    def env(self) -> dict[str, str]:
        env = clean_env(PGCORRAL_MASTER_KEY_FILE=str(self.master_key))
        # Works from a plain checkout too; harmless with an editable install.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.source()), os.environ.get("PYTHONPATH", "")) if p
        )
        return env

    def source(self) -> Path:
        """The directory holding the pgcorral package this target runs: src/ itself, or for
        the pure build a copy of its .py files (no compiled modules)."""
        if self.build == "src":
            return REPO / "src"
        if self.build == "base":
            return self.base_source()
        pure = self.workdir / "pure-src"
        if not pure.exists():
            shutil.copytree(
                REPO / "src" / "pgcorral", pure / "pgcorral",
                ignore=shutil.ignore_patterns("*.so", "__pycache__"),
            )  # fmt: skip
        return pure

    def base_source(self) -> Path:
        """The revision ``base_rev`` of this repository, exported and compiled with mypyc
        (``setup.py build_ext --inplace``, as `make build` does) in the work directory."""
        tree = self.workdir / "base-tree"
        if not (tree / "src").exists():
            tree.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", self.base_rev],
                                     capture_output=True, check=True, timeout=120)
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True,
                           timeout=120)
            env = clean_env(PGCORRAL_BUILD="compiled")
            res = subprocess.run([self.python, "setup.py", "-q", "build_ext", "--inplace"],
                                 cwd=tree, env=env, capture_output=True, text=True,
                                 timeout=1800, check=False)
            if res.returncode != 0:
                raise TargetError(f"{self.name}: compiling {self.base_rev} failed: "
                                  f"{res.stderr[-2000:]}")
        return tree / "src"

    def scrape_forever(self) -> None:
        """GET /metrics every ``metrics_scrape`` seconds until the target stops (a thread)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        while not self._scraping.wait(self.metrics_scrape):
            try:
                with _NO_PROXY.open(url, timeout=5) as answer:
                    answer.read()
                self.scrapes["ok"] += 1
            except OSError:
                self.scrapes["failed"] += 1

    def make_vault(self) -> None:
        """pgcorral-admin master-key, then user add of the scram user into users_file."""
        assert self.scram is not None
        self.master_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.master_key.parent, 0o700)
        # Passes the master key rules: upper, lower, digit, special.
        passphrase = f"Bench-{secrets.token_hex(12)}-Key1!"
        admin = [self.python, "-m", "pgcorral.cli.admin"]
        steps = [
            ([*admin, "master-key"], passphrase),
            ([*admin, "-f", str(self.users_file), "-U", self.scram.name, "user", "add"],
             self.scram.password),
        ]  # fmt: skip
        for cmd, secret in steps:
            env = self.env()
            env["PGCORRAL_PASSWORD"] = secret
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120,
                                 stdin=subprocess.DEVNULL, check=False)  # fmt: skip
            if res.returncode != 0:
                raise TargetError(
                    f"{self.name}: `{' '.join(cmd[1:])}` failed with exit {res.returncode}: "
                    f"{(res.stderr or res.stdout).strip()}"
                )

    def start(self, wrapper: Sequence[str] = ()) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "pgcorral.conf").write_text(self.conf())
        (self.workdir / "pgcorral_hba.conf").write_text(self.hba())
        if self.scram is not None and not self.users_file.exists():
            self.make_vault()
        env = self.env()
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
        wait_ready(self.name, self.port, self.psql, self.proc, self.logfile, self.start_timeout,
                   self.client_env())  # fmt: skip
        self.version()
        if self.metrics_port:
            self._scraping.clear()
            threading.Thread(target=self.scrape_forever, daemon=True,
                             name=f"scrape-{self.name}").start()

    def stop(self) -> None:
        self._scraping.set()
        if self.metrics_port:
            log(f"{self.name}: /metrics scraped {self.scrapes['ok']} times "
                f"({self.scrapes['failed']} failed)")
        super().stop()

    def version(self) -> str | None:
        # e.g. "pgcorral 0.1.0 (compiled with mypyc)"; asked once, while the source exists
        # (the base build's tree goes with the work directory)
        if self._version is None:
            self._version = first_line([self.python, "-m", "pgcorral", "-V"],
                                       env={"PYTHONPATH": str(self.source())})
        return self._version
