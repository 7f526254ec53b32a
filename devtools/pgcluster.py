"""Throwaway PostgreSQL clusters for tests, ``make run`` and the benchmark.

PostgreSQL refuses to run as root.  When this module is used as root, the
server (initdb, pg_ctl) runs as an unprivileged OS user: ``postgres`` when it
exists, otherwise a system user ``pgcorral`` that is created on demand.  The
client programs (psql, pgbench) run as the calling user and connect over TCP.

Example::

    with PgCluster(tempfile.mkdtemp(prefix="pgcorral-pg-")) as pg:
        pg.init()
        pg.start()
        print(pg.psql("SELECT version()"))

With TLS (``ssl = on``; certificates e.g. from devtools/certs.py)::

    pg.init()
    pg.enable_ssl(pki.server.cert, pki.server.key, ca_file=pki.ca_file)
    pg.start()
    psycopg.connect(pg.dsn(sslmode="verify-full", sslrootcert=str(pki.ca_file)))
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "PgCluster",
    "PgClusterError",
    "SslFiles",
    "child_pids",
    "find_bindir",
    "find_free_port",
    "pid_alive",
    "unprivileged_user",
]

FALLBACK_USER = "pgcorral"
PREFERRED_MAJOR = "15"

# Settings written to postgresql.conf by init(); ``settings`` overrides them.
_BASE_SETTINGS: dict[str, str] = {
    "max_connections": "300",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "password_encryption": "scram-sha-256",
}


class PgClusterError(RuntimeError):
    """A PostgreSQL program failed; the message carries its output."""


@dataclass(frozen=True)
class SslFiles:
    """The server's TLS files as enable_ssl() installed them in the data directory (owned by
    the server user, mode 0600), and where they were copied from."""

    cert_file: str  # ssl_cert_file
    key_file: str  # ssl_key_file
    ca_file: str | None  # ssl_ca_file: the CAs whose client certificates the server accepts
    source_cert: str
    source_key: str
    source_ca: str | None


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def unprivileged_user() -> str | None:
    """The OS user the server must run as: None when not root.

    As root: ``postgres`` if it exists, else ``pgcorral`` (created with
    ``useradd --system --no-create-home`` when missing).
    """
    if os.geteuid() != 0:
        return None
    if _user_exists("postgres"):
        return "postgres"
    if not _user_exists(FALLBACK_USER):
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        nologin = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
        res = subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", nologin, FALLBACK_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        # Exit status 9: created concurrently by someone else; fine.
        if res.returncode not in (0, 9) or not _user_exists(FALLBACK_USER):
            raise PgClusterError(
                f"cannot create system user {FALLBACK_USER!r} "
                f"(useradd exit {res.returncode}): {res.stderr.strip()}"
            )
    return FALLBACK_USER


def _major_version(path: str) -> tuple[int, ...]:
    m = re.search(r"/postgresql/([0-9.]+)/bin$", path)
    if not m:
        return (0,)
    return tuple(int(p) for p in m.group(1).split(".") if p)


def find_bindir() -> str:
    """Directory holding initdb/pg_ctl/psql/pgbench.

    ``$PGCORRAL_PG_BINDIR`` wins; then /usr/lib/postgresql/15/bin; then the
    newest /usr/lib/postgresql/*/bin; then the directory of ``initdb`` on PATH;
    then ``pg_config --bindir``.
    """
    env = os.environ.get("PGCORRAL_PG_BINDIR")
    if env:
        return env
    preferred = f"/usr/lib/postgresql/{PREFERRED_MAJOR}/bin"
    if os.access(os.path.join(preferred, "initdb"), os.X_OK):
        return preferred
    candidates = [
        d
        for d in glob.glob("/usr/lib/postgresql/*/bin")
        if os.access(os.path.join(d, "initdb"), os.X_OK)
    ]
    if candidates:
        return max(candidates, key=_major_version)
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    pg_config = shutil.which("pg_config")
    if pg_config:
        res = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        d = res.stdout.strip()
        if res.returncode == 0 and os.access(os.path.join(d, "initdb"), os.X_OK):
            return d
    raise PgClusterError("cannot find the PostgreSQL binaries (initdb); set PGCORRAL_PG_BINDIR")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus libpq/server variables that could interfere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _dsn_quote(value: str) -> str:
    if value and not any(c in value for c in " '\\\t\n"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _tail(path: str, lines: int = 60) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"<cannot read {path}: {e}>"


_LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


def _check_identifier(name: str) -> None:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain lower-case identifier: {name!r}")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def child_pids(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(entry))
    return out


def _makedirs_traversable(path: Path) -> None:
    """mkdir -p, giving every directory created here mode 0755."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
        os.chmod(d, 0o755)


class PgCluster:
    """One PostgreSQL cluster living entirely inside ``basedir``.

    Layout: ``basedir/data`` (PGDATA), ``basedir/sock`` (unix sockets),
    ``basedir/postgresql.log`` (server log, unless ``log_to`` is given).
    """

    host: str = "127.0.0.1"

    def __init__(
        self, basedir: str | Path, port: int | None = None, *, log_to: str | None = None
    ) -> None:
        self.basedir = str(Path(basedir).absolute())
        self._auto_port = port is None
        self.port: int = find_free_port() if port is None else port
        self.datadir: str = os.path.join(self.basedir, "data")
        self.socket_dir: str = os.path.join(self.basedir, "sock")
        self.logfile: str = (
            log_to if log_to is not None else os.path.join(self.basedir, "postgresql.log")
        )
        self.bindir: str = find_bindir()
        self.user: str | None = unprivileged_user()
        self._running = False
        self._atexit_registered = False
        self.ssl: SslFiles | None = None  # set by enable_ssl()

    # ------------------------------------------------------------------ helpers
    def bin(self, name: str) -> str:
        """Absolute path of a PostgreSQL program (``psql``, ``pgbench``...)."""
        return os.path.join(self.bindir, name)

    def _as_server_user(self, cmd: list[str]) -> list[str]:
        if self.user is None:
            return cmd
        if shutil.which("runuser"):
            return ["runuser", "-u", self.user, "--", *cmd]
        pw = pwd.getpwnam(self.user)
        return [
            "setpriv",
            f"--reuid={pw.pw_uid}",
            f"--regid={pw.pw_gid}",
            "--init-groups",
            "--",
            *cmd,
        ]

    def _run_server_cmd(
        self, cmd: list[str], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        # Own process group, so that an interruption (Ctrl-C, timeout) can kill
        # runuser *and* its child (initdb, pg_ctl) instead of orphaning it.
        # The postmaster is immune: pg_ctl starts it in a session of its own.
        proc = subprocess.Popen(
            self._as_server_user(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.basedir,
            env=_clean_env(LC_ALL="C"),
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and res.returncode != 0:
            raise PgClusterError(
                f"{' '.join(cmd)} failed with exit {res.returncode}\n"
                f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
            )
        return res

    def _chown(self, path: str) -> None:
        if self.user is not None:
            shutil.chown(path, self.user, self.user_group())

    def user_group(self) -> str:
        """Primary group name of the server user (as a string gid if unnamed)."""
        assert self.user is not None
        gid = pwd.getpwnam(self.user).pw_gid
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)

    def _prepare_dirs(self) -> None:
        _makedirs_traversable(Path(self.basedir))
        os.chmod(self.basedir, 0o755)
        self._chown(self.basedir)
        os.makedirs(self.socket_dir, exist_ok=True)
        os.chmod(self.socket_dir, 0o755)
        self._chown(self.socket_dir)
        logdir = os.path.dirname(self.logfile)
        if not os.path.isdir(logdir):
            _makedirs_traversable(Path(logdir))
        if not os.path.exists(self.logfile):
            Path(self.logfile).touch()
        self._chown(self.logfile)
        if self.user is not None:
            res = self._run_server_cmd(
                ["test", "-w", self.basedir, "-a", "-x", self.basedir, "-a", "-w", self.logfile],
                check=False,
            )
            if res.returncode != 0:
                raise PgClusterError(
                    f"user {self.user!r} cannot use {self.basedir} (or {self.logfile}); "
                    "every parent directory must be traversable (chmod 0755), e.g. create "
                    "the base directory with tempfile.mkdtemp() and chmod it 0755 "
                    f"{res.stderr.strip()}"
                )

    # -------------------------------------------------------------------- setup
    def init(
        self, *, settings: dict[str, str] | None = None, hba_lines: list[str] | None = None
    ) -> None:
        """initdb, then write postgresql.conf additions and pg_hba.conf."""
        if os.path.exists(os.path.join(self.datadir, "PG_VERSION")):
            raise PgClusterError(f"{self.datadir} is already initialized")
        self._prepare_dirs()
        errors: list[str] = []
        for locale in ("C.UTF-8", "C"):
            cmd = [
                self.bin("initdb"),
                "-D",
                self.datadir,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                f"--locale={locale}",
                "--no-sync",
            ]
            res = self._run_server_cmd(cmd, check=False)
            if res.returncode == 0:
                break
            errors.append(f"--locale={locale}: exit {res.returncode}\n{res.stdout}{res.stderr}")
            shutil.rmtree(self.datadir, ignore_errors=True)
        else:
            raise PgClusterError("initdb failed:\n" + "\n".join(errors))
        conf: dict[str, str] = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": self.socket_dir,
            **_BASE_SETTINGS,
            **(settings or {}),
        }
        self.append_conf(conf)
        if hba_lines is None:
            hba_lines = [
                "local all all trust",
                "host all all 127.0.0.1/32 trust",
                "host all all ::1/128 trust",
                "local replication all trust",
                "host replication all 127.0.0.1/32 trust",
                "host replication all ::1/128 trust",
            ]
        self.write_hba(hba_lines)

    def init_from(self, template: PgCluster) -> None:
        """Instead of init(): copy the data directory of ``template``, an initialized cluster
        that is stopped (cheaper than initdb plus setup for many alike clusters; the copies
        share its system identifier).  This cluster keeps its own port and sockets."""
        if os.path.exists(os.path.join(self.datadir, "PG_VERSION")):
            raise PgClusterError(f"{self.datadir} is already initialized")
        if os.path.exists(os.path.join(template.datadir, "postmaster.pid")):
            raise PgClusterError(f"{template!r} must be stopped to be copied")
        self._prepare_dirs()
        res = subprocess.run(
            ["cp", "-a", template.datadir, self.datadir], capture_output=True, text=True,
            check=False,
        )
        if res.returncode != 0:
            raise PgClusterError(f"copying {template.datadir} failed: {res.stderr.strip()}")
        self.append_conf({
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": self.socket_dir,
        })

    def append_conf(self, settings: dict[str, str]) -> None:
        """Append settings to postgresql.conf (later lines win); reload to apply."""
        lines = [f"{k} = {_conf_quote(v)}" for k, v in settings.items()]
        with open(os.path.join(self.datadir, "postgresql.conf"), "a", encoding="utf-8") as f:
            f.write("\n# --- added by devtools/pgcluster.py ---\n" + "\n".join(lines) + "\n")

    def enable_ssl(
        self,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        *,
        ca_file: str | os.PathLike[str] | None = None,
        settings: dict[str, str] | None = None,
    ) -> SslFiles:
        """Turn on TLS: copy the server certificate and key (and ca_file, the CAs for client
        certificates, as ssl_ca_file) into the data directory as server.crt, server.key and
        root.crt, owned by the server user with mode 0600, and append ``ssl = on`` and the
        file settings (plus ``settings``) to postgresql.conf.  Call after init(); takes effect
        at start(), or at reload() on a running server."""
        if not os.path.exists(os.path.join(self.datadir, "PG_VERSION")):
            raise PgClusterError("enable_ssl() needs an initialized cluster: call init() first")
        copied: dict[str, str] = {}
        for name, src in (("server.crt", cert_file), ("server.key", key_file),
                          ("root.crt", ca_file)):  # fmt: skip
            if src is None:
                continue
            dst = os.path.join(self.datadir, name)
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o600)
            self._chown(dst)
            copied[name] = dst
        conf = {
            "ssl": "on",
            "ssl_cert_file": copied["server.crt"],
            "ssl_key_file": copied["server.key"],
            "ssl_ca_file": copied.get("root.crt", ""),
            **(settings or {}),
        }
        self.append_conf(conf)
        self.ssl = SslFiles(
            cert_file=copied["server.crt"],
            key_file=copied["server.key"],
            ca_file=copied.get("root.crt"),
            source_cert=os.fspath(cert_file),
            source_key=os.fspath(key_file),
            source_ca=os.fspath(ca_file) if ca_file is not None else None,
        )
        return self.ssl

    def write_hba(self, hba_lines: list[str]) -> None:
        """Replace pg_hba.conf; call reload() afterwards if the server runs."""
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w", encoding="utf-8") as f:
            f.write("# written by devtools/pgcluster.py\n" + "\n".join(hba_lines) + "\n")

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """pg_ctl start -w; raises PgClusterError with the server log tail on failure."""
        for attempt in range(3):
            log_size = os.path.getsize(self.logfile) if os.path.exists(self.logfile) else 0
            res = self._run_server_cmd(
                [
                    self.bin("pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-s",
                    "-D",
                    self.datadir,
                    "-l",
                    self.logfile,
                ],
                check=False,
            )
            if res.returncode == 0:
                self._running = True
                if not self._atexit_registered:
                    atexit.register(self._atexit_stop)
                    self._atexit_registered = True
                return
            tail = _tail(self.logfile)
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                f.seek(log_size)
                new_log = f.read()
            if self._auto_port and attempt < 2 and "could not bind" in new_log:
                # Somebody grabbed our port between find_free_port() and now.
                self.port = find_free_port()
                self.append_conf({"port": str(self.port)})
                continue
            raise PgClusterError(
                f"pg_ctl start failed with exit {res.returncode}\n{res.stdout}{res.stderr}\n"
                f"--- tail of {self.logfile} ---\n{tail}"
            )

    def is_running(self) -> bool:
        res = self._run_server_cmd([self.bin("pg_ctl"), "status", "-D", self.datadir], check=False)
        return res.returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m mode -w (no-op when the server is not running)."""
        if not os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            self._running = False
            return
        res = self._run_server_cmd(
            [self.bin("pg_ctl"), "stop", "-w", "-t", "60", "-s", "-m", mode, "-D", self.datadir],
            check=False,
        )
        if res.returncode != 0 and self.is_running():
            raise PgClusterError(
                f"pg_ctl stop -m {mode} failed with exit {res.returncode}\n{res.stdout}"
                f"{res.stderr}\n--- tail of {self.logfile} ---\n{_tail(self.logfile)}"
            )
        self._running = False

    def _kill_postmaster(self) -> None:
        try:
            with open(os.path.join(self.datadir, "postmaster.pid"), encoding="utf-8") as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def destroy(self) -> None:
        """Stop the server if it runs (escalating to immediate/SIGKILL) and rm -rf basedir."""
        if os.path.isdir(self.datadir):
            try:
                self.stop("fast")
            except (PgClusterError, subprocess.TimeoutExpired):
                try:
                    self.stop("immediate")
                except (PgClusterError, subprocess.TimeoutExpired):
                    self._kill_postmaster()
        self._running = False
        if self._atexit_registered:
            atexit.unregister(self._atexit_stop)
            self._atexit_registered = False
        shutil.rmtree(self.basedir, ignore_errors=True)

    def _atexit_stop(self) -> None:
        # Last resort so an interrupted test run does not leak a postmaster.
        with contextlib.suppress(Exception):
            self.stop("immediate")

    def reload(self) -> None:
        """pg_ctl reload, then wait until the postmaster has re-read its files."""
        before = self._conf_load_time()
        self._run_server_cmd([self.bin("pg_ctl"), "reload", "-s", "-D", self.datadir])
        if before is None:
            time.sleep(0.5)
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = self._conf_load_time()
            if now is not None and now != before:
                return
            time.sleep(0.05)

    def _conf_load_time(self) -> str | None:
        # A new backend reports the postmaster's load time, so a change means
        # the postmaster has processed SIGHUP (including pg_hba.conf).
        res = self._psql_cmd("SELECT pg_conf_load_time()", self.socket_dir, "postgres", "postgres")
        if res.returncode != 0:
            return None
        return res.stdout.strip() or None

    # -------------------------------------------------------------- replication
    # A primary: enable_replication() (before start(), or restart() after), create_slot(),
    # set_synchronous_standby_names(). A replica: PgCluster.replica_of(primary, basedir, ...)
    # (pg_basebackup -R). Then promote(), current_lsn() / replay_lsn() / wait_replayed(),
    # wait_streaming(), kill_postmaster().

    def enable_replication(
        self, *, max_wal_senders: int = 10, settings: dict[str, str] | None = None
    ) -> None:
        """Make this cluster a primary that replicas can stream from: wal_level = replica,
        max_wal_senders, max_replication_slots, hot_standby = on (inherited by replicas made
        with pg_basebackup), wal_log_hints and full_page_writes on (for pg_rewind), a pg_hba
        ``replication`` trust line for loopback when there is none.  Call after init() and
        before start() (wal_level needs a restart)."""
        if not os.path.exists(os.path.join(self.datadir, "PG_VERSION")):
            raise PgClusterError("enable_replication() needs init() first")
        self.append_conf({
            "wal_level": "replica",
            "max_wal_senders": str(max_wal_senders),
            "max_replication_slots": str(max_wal_senders),
            "hot_standby": "on",
            "wal_keep_size": "64MB",
            "wal_log_hints": "on",  # so that pg_rewind (rejoin()) can run on it later,
            "full_page_writes": "on",  # which needs these two on its source
            **(settings or {}),
        })
        hba = os.path.join(self.datadir, "pg_hba.conf")
        with open(hba, encoding="utf-8") as f:
            lines = f.read().splitlines()
        has_replication = any(
            len(fields) >= 3 and fields[0] == "host" and fields[1] == "replication"
            for fields in (line.split() for line in lines)
        )
        if not has_replication:
            with open(hba, "a", encoding="utf-8") as f:
                f.write(
                    "host replication all 127.0.0.1/32 trust\n"
                    "host replication all ::1/128 trust\n"
                )

    def restart(self) -> None:
        """stop("fast") then start()."""
        self.stop("fast")
        self.start()

    def create_slot(self, name: str) -> None:
        """Create a physical replication slot (no-op when it exists)."""
        _check_identifier(name)
        self.psql(
            f"SELECT pg_create_physical_replication_slot('{name}') WHERE NOT EXISTS "
            f"(SELECT 1 FROM pg_replication_slots WHERE slot_name = '{name}')"
        )

    def set_synchronous_standby_names(self, value: str, *, commit: str = "on") -> None:
        """synchronous_standby_names = value (e.g. ``'replica1'``, ``'ANY 1 (*)'``, or ``''``
        to turn it off), and synchronous_commit = commit (the base settings have it off, under
        which no commit waits for a standby); reloads a running server."""
        self.append_conf({"synchronous_standby_names": value, "synchronous_commit": commit})
        if self.is_running():
            self.reload()

    @classmethod
    def replica_of(
        cls,
        primary: PgCluster,
        basedir: str | Path,
        port: int | None = None,
        *,
        name: str | None = None,
        slot: str | None = None,
        apply_delay: str | None = None,
        hot_standby_feedback: bool = False,
        settings: dict[str, str] | None = None,
        log_to: str | None = None,
        start: bool = True,
    ) -> PgCluster:
        """A streaming replica of the running ``primary`` (after its enable_replication()):
        pg_basebackup -R into ``basedir/data``, with its own port and socket directory.

        name: the walreceiver's application_name (what synchronous_standby_names and
        pg_stat_replication see; default: the base directory's name).  slot: a physical
        replication slot on the primary, created when missing (primary_slot_name).
        apply_delay: recovery_min_apply_delay (``"2s"``...).  With ``start`` (default), the
        replica is started and streaming when this returns."""
        replica = cls(basedir, port, log_to=log_to)
        replica._prepare_dirs()
        app = name if name is not None else os.path.basename(replica.basedir)
        cmd = [
            replica.bin("pg_basebackup"),
            "-D", replica.datadir,
            "-R",
            "-X", "stream",
            "-c", "fast",
            "--no-sync",
            "-d", f"host={primary.host} port={primary.port} user=postgres "
                  f"application_name={_dsn_quote(app)}",
        ]  # fmt: skip
        if slot is not None:
            primary.create_slot(slot)
            cmd += ["-S", slot]
        replica._run_server_cmd(cmd)
        conf: dict[str, str] = {
            "listen_addresses": replica.host,
            "port": str(replica.port),
            "unix_socket_directories": replica.socket_dir,
            "hot_standby": "on",
            "hot_standby_feedback": "on" if hot_standby_feedback else "off",
            "synchronous_standby_names": "",
        }
        if slot is not None:
            conf["primary_slot_name"] = slot
        if apply_delay is not None:
            conf["recovery_min_apply_delay"] = apply_delay
        conf.update(settings or {})
        replica.append_conf(conf)
        if start:
            replica.start()
            replica.wait_streaming()
        return replica

    def rejoin(
        self, primary: PgCluster, *, name: str | None = None, slot: str | None = None,
        start: bool = True,
    ) -> None:
        """Make this cluster (an old primary, stopped or killed) a streaming replica of
        ``primary`` (the promoted one): pg_rewind from it (which first finishes the crash
        recovery of a killed server), then standby.signal and primary_conninfo.  name: the
        application_name (default: the base directory's name); slot: created on
        ``primary`` when missing."""
        if self.postmaster_pid() is not None and pid_alive(self.postmaster_pid() or 0):
            self.stop("fast")
        self._running = False
        app = name if name is not None else os.path.basename(self.basedir)
        # A just-promoted server's control file still names the old timeline until its first
        # checkpoint; pg_rewind would then find nothing to rewind.
        primary.psql("CHECKPOINT")
        self._run_server_cmd([
            self.bin("pg_rewind"),
            "--target-pgdata", self.datadir,
            "--source-server", f"host={primary.host} port={primary.port} user=postgres "
                               "dbname=postgres",
            "--no-sync",
        ])  # fmt: skip
        Path(os.path.join(self.datadir, "standby.signal")).touch()
        self._chown(os.path.join(self.datadir, "standby.signal"))
        # pg_rewind copied the source's configuration files: its postgresql.auto.conf (with
        # the primary_conninfo and slot pg_basebackup -R wrote there) would win over ours.
        with open(os.path.join(self.datadir, "postgresql.auto.conf"), "w",
                  encoding="utf-8") as f:
            f.write("# emptied by devtools/pgcluster.py rejoin()\n")
        conf = {
            "primary_conninfo": f"host={primary.host} port={primary.port} user=postgres "
                                f"application_name={_dsn_quote(app)}",
            "primary_slot_name": "",
            "recovery_min_apply_delay": "0",
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": self.socket_dir,
            "synchronous_standby_names": "",
        }
        if slot is not None:
            primary.create_slot(slot)
            conf["primary_slot_name"] = slot
        self.append_conf(conf)
        if start:
            self.start()
            self.wait_streaming()

    def _query_value(self, sql: str) -> str:
        return self.psql(sql).strip()

    def is_in_recovery(self) -> bool:
        return self._query_value("SELECT pg_is_in_recovery()") == "t"

    def current_lsn(self) -> str:
        """The primary's current WAL insert position (pg_current_wal_insert_lsn(): with
        synchronous_commit = off the write position, pg_current_wal_lsn(), can still be
        behind the last commit)."""
        return self._query_value("SELECT pg_current_wal_insert_lsn()")

    def replay_lsn(self) -> str | None:
        """A replica's last replayed WAL position (None on a primary)."""
        return self._query_value("SELECT pg_last_wal_replay_lsn()") or None

    def wait_replayed(self, lsn: str, timeout: float = 30.0) -> None:
        """Wait until this replica has replayed WAL up to ``lsn`` (e.g. a primary's
        current_lsn() after a commit)."""
        if not _LSN_RE.match(lsn):
            raise ValueError(f"not an LSN: {lsn!r}")
        self._wait_true(
            f"SELECT coalesce(pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn, false)",
            timeout,
            f"replay of {lsn}",
        )

    def wait_streaming(self, timeout: float = 30.0) -> None:
        """Wait until this replica's walreceiver is streaming from its primary."""
        self._wait_true(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')",
            timeout,
            "a streaming walreceiver",
        )

    def promote(self, timeout: float = 30.0) -> None:
        """pg_ctl promote, then wait until pg_is_in_recovery() is false."""
        self._run_server_cmd(
            [self.bin("pg_ctl"), "promote", "-w", "-t", str(int(timeout)), "-s", "-D",
             self.datadir]
        )  # fmt: skip
        self._wait_true("SELECT NOT pg_is_in_recovery()", timeout, "the end of recovery")

    def _wait_true(self, sql: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            res = self._psql_cmd(sql, self.host, "postgres", "postgres")
            last = res.stdout.strip() or res.stderr.strip()
            if res.returncode == 0 and last == "t":
                return
            if time.monotonic() > deadline:
                raise PgClusterError(
                    f"{self!r}: no {what} after {timeout:g} s (last answer: {last!r})\n"
                    f"--- tail of {self.logfile} ---\n{_tail(self.logfile)}"
                )
            time.sleep(0.02)

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid from postmaster.pid (None without the file)."""
        try:
            with open(os.path.join(self.datadir, "postmaster.pid"), encoding="utf-8") as f:
                return int(f.readline().strip())
        except (OSError, ValueError):
            return None

    def kill_postmaster(self, *, wait: bool = True, timeout: float = 10.0) -> int | None:
        """SIGKILL the postmaster (a crash: no shutdown checkpoint, postmaster.pid stays).
        With ``wait``, return once it and its children (backends, walsenders...) are gone, so
        that start() may run again.  Returns the pid killed (None when none ran)."""
        pid = self.postmaster_pid()
        if pid is None or not pid_alive(pid):
            self._running = False
            return None
        children = child_pids(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._running = False
        if wait:
            # Also until the dead postmaster is reaped: a new one refuses to start while the
            # pid in postmaster.pid exists, and a zombie does until init collects it.
            deadline = time.monotonic() + timeout
            while os.path.exists(f"/proc/{pid}") or any(pid_alive(c) for c in children):
                if time.monotonic() > deadline:
                    if pid_alive(pid) or any(pid_alive(c) for c in children):
                        raise PgClusterError(f"postmaster {pid} or its children still alive")
                    break  # only an unreaped zombie is left
                time.sleep(0.01)
        return pid

    # ------------------------------------------------------------------ clients
    def _psql_cmd(
        self, sql: str, host: str, dbname: str, user: str
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            self.bin("psql"),
            "-X",
            "-At",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            host,
            "-p",
            str(self.port),
            "-U",
            user,
            "-d",
            dbname,
            "-f",
            "-",
        ]
        return subprocess.run(
            cmd,
            input=sql,
            capture_output=True,
            text=True,
            env=_clean_env(PGCONNECT_TIMEOUT="10"),
            check=False,
            timeout=300,
        )

    def psql(
        self,
        sql: str,
        *,
        dbname: str = "postgres",
        user: str = "postgres",
        check: bool = True,
        unix_socket: bool = False,
    ) -> str:
        """Run SQL (several statements allowed, each in its own transaction) via psql
        -X -At over TCP (over the unix socket with ``unix_socket=True``, e.g. when TCP
        needs a client certificate); returns stdout (command tags suppressed)."""
        host = self.socket_dir if unix_socket else self.host
        res = self._psql_cmd(sql, host, dbname, user)
        if check and res.returncode != 0:
            raise PgClusterError(
                f"psql (db={dbname} user={user}) failed with exit {res.returncode}: "
                f"{res.stderr.strip()}\nSQL:\n{sql}"
            )
        return res.stdout

    def pgbench(self, *args: str, dbname: str = "postgres", user: str = "postgres") -> str:
        """Run pgbench against the cluster directly (as the calling user); returns stdout."""
        cmd = [
            self.bin("pgbench"),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            user,
            *args,
            dbname,
        ]
        res = subprocess.run(
            cmd, capture_output=True, text=True, env=_clean_env(), check=False, timeout=600
        )
        if res.returncode != 0:
            raise PgClusterError(
                f"{' '.join(cmd)} failed with exit {res.returncode}\n{res.stdout}{res.stderr}"
            )
        return res.stdout

    def dsn(
        self,
        *,
        dbname: str = "postgres",
        user: str = "postgres",
        password: str | None = None,
        **params: str,
    ) -> str:
        """libpq keyword/value DSN for a direct TCP connection to the cluster; extra keywords
        (``sslmode="verify-full"``, ``sslrootcert=...``, ``host="localhost"``...) via params."""
        parts = {"host": self.host, "port": str(self.port), "dbname": dbname, "user": user}
        if password is not None:
            parts["password"] = password
        parts.update(params)
        return " ".join(f"{k}={_dsn_quote(v)}" for k, v in parts.items())

    # ----------------------------------------------------------- context manager
    def __enter__(self) -> PgCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"PgCluster(basedir={self.basedir!r}, port={self.port}, user={self.user!r})"
