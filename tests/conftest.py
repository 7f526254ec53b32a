"""Shared fixtures: a throwaway PostgreSQL cluster (``pg``) and a factory that
runs the pgcorral daemon as a real subprocess (``pgcorral``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import IO, Protocol

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devtools.pgcluster import PgCluster, find_free_port  # noqa: E402

import pgcorral  # noqa: E402
from pgcorral.build import info as build_info  # noqa: E402

#: The directory holding the pgcorral package the tests import (src/ with an in-place build, or
#: wherever PYTHONPATH points, e.g. the pure-Python smoke's install); the daemons run it too.
PGCORRAL_PATH = str(Path(pgcorral.__file__).resolve().parent.parent)


def wait_reset(pg: PgCluster, pid: int, timeout: float = 10.0) -> None:
    """Wait until pgcorral's reset (DISCARD ALL) of backend ``pid`` has run. The release of a
    session's server connection ends after its client has gone, so a test that expects the
    next client to get the same backend waits for it first."""
    sql = f"select state || ' ' || query from pg_stat_activity where pid = {pid}"
    deadline = time.monotonic() + timeout
    while pg.psql(sql).strip() != "idle DISCARD ALL":
        assert time.monotonic() < deadline, f"backend {pid} was not reset"
        time.sleep(0.01)


def pytest_report_header(config: pytest.Config) -> str:
    return f"pgcorral: {build_info().describe()} from {PGCORRAL_PATH}"


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test a stale in-place build (a .so older than its .py: the edit would not be
    tested); PGCORRAL_EXPECT_BUILD=compiled|pure: refuse to run on the other build, so
    `make test` cannot pass on pure Python by accident."""
    build = build_info()
    if build.stale:
        raise pytest.UsageError(f"pgcorral at {PGCORRAL_PATH} is {build.describe()}")
    expect = os.environ.get("PGCORRAL_EXPECT_BUILD")
    if not expect:
        return
    ok = (build.kind == "compiled with mypyc" and not build.stale) if expect == "compiled" else (
        build.kind == "pure Python"
    )
    if not ok:
        raise pytest.UsageError(
            f"PGCORRAL_EXPECT_BUILD={expect} but pgcorral at {PGCORRAL_PATH} is: {build.describe()}"
        )

pytest_plugins = ["tests.tlsfixtures"]  # pki, ssl_pg, ssl_pg_certonly (TLS)
INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"

TEST_DB = "pgcorral_test"
# user -> (password, pg_hba method)
PASSWORD_USERS: dict[str, tuple[str, str]] = {
    "md5user": ("md5pass", "md5"),
    "scramuser": ("scrampass", "scram-sha-256"),
    "pwuser": ("pwpass", "password"),
}

DAEMON_START_TIMEOUT = 15.0
DAEMON_STOP_TIMEOUT = 10.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


# --------------------------------------------------------------------------- pg


def _hba_lines() -> list[str]:
    lines: list[str] = []
    for user, (_, method) in PASSWORD_USERS.items():
        lines += [
            f"local all {user} {method}",
            f"host all {user} 127.0.0.1/32 {method}",
            f"host all {user} ::1/128 {method}",
        ]
    lines += [
        "local all all trust",
        "host all all 127.0.0.1/32 trust",
        "host all all ::1/128 trust",
        "local replication all trust",
        "host replication all 127.0.0.1/32 trust",
        "host replication all ::1/128 trust",
    ]
    return lines


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    """A running PostgreSQL cluster with databases pgcorral_test and db2, roles
    trustuser (trust), md5user/md5pass (md5), scramuser/scrampass (scram-sha-256),
    pwuser/pwpass (password) and pgbench tables (scale 1) in pgcorral_test."""
    basedir = tempfile.mkdtemp(prefix="pgcorral-pg-")
    os.chmod(basedir, 0o755)
    cluster = PgCluster(basedir)
    try:
        cluster.init(settings={"log_min_messages": "warning"}, hba_lines=_hba_lines())
        cluster.start()
        cluster.psql(f"CREATE DATABASE {TEST_DB}")
        cluster.psql("CREATE DATABASE db2")
        cluster.psql(
            """
            CREATE ROLE trustuser LOGIN;
            SET password_encryption = 'md5';
            CREATE ROLE md5user LOGIN PASSWORD 'md5pass';
            SET password_encryption = 'scram-sha-256';
            CREATE ROLE scramuser LOGIN PASSWORD 'scrampass';
            CREATE ROLE pwuser LOGIN PASSWORD 'pwpass';
            """
        )
        # PG 15 no longer lets PUBLIC create in schema public; the tests connect
        # as the non-superuser roles above and may need to.
        for db in (TEST_DB, "db2"):
            cluster.psql("GRANT ALL ON SCHEMA public TO PUBLIC", dbname=db)
        cluster.pgbench("-i", "-s", "1", "-q", dbname=TEST_DB)
        cluster.psql(
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;"
            "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO PUBLIC;",
            dbname=TEST_DB,
        )
        cluster.reload()
        yield cluster
    finally:
        cluster.destroy()


# --------------------------------------------------------------------- pgcorral


def _dsn_quote(value: str) -> str:
    if value and not any(c in value for c in " '\\\t\n"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Daemon:
    """A pgcorral daemon running as a subprocess of the test."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        socket_dir: str,
        dir: str,
        proc: subprocess.Popen[bytes],
        log_path: str,
        log_file: IO[bytes],
    ) -> None:
        self.host = host
        self.port = port
        self.socket_dir = socket_dir
        self.dir = dir
        self.proc = proc
        self.log_path = log_path
        self._log_file = log_file
        # Set to True in a test that deliberately makes the daemon log a traceback.
        self.allow_traceback = False
        self.args: list[str] = []
        self.log_type = "console"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def dsn(
        self,
        dbname: str = "pgcorral_test",
        user: str = "trustuser",
        password: str | None = None,
        **params: str,
    ) -> str:
        """libpq keyword/value DSN pointing at the daemon's TCP port; extra
        keywords (``sslmode="disable"``, ``host=daemon.socket_dir``...) via params."""
        parts: dict[str, str] = {
            "host": self.host,
            "port": str(self.port),
            "dbname": dbname,
            "user": user,
        }
        if password is not None:
            parts["password"] = password
        parts.update(params)
        return " ".join(f"{k}={_dsn_quote(v)}" for k, v in parts.items())

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        """Poll the daemon's log until ``text`` appears; fail with the log after ``timeout``."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} not in the pgcorral log after {timeout:g} s:\n"
                            f"{self.log()}", pytrace=False)
            time.sleep(0.02)

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send a signal to the daemon's PID (only)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self) -> int:
        """SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit status."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._note(
                    f"pgcorral did not exit {DAEMON_STOP_TIMEOUT:.0f}s after SIGTERM; killed"
                )
        if not self._log_file.closed:
            self._log_file.close()
        rc = self.proc.returncode
        assert rc is not None
        return rc

    def _note(self, msg: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"\n[conftest] {msg}\n")

    def __repr__(self) -> str:
        return f"Daemon(pid={self.proc.pid}, port={self.port}, dir={self.dir!r})"


class DaemonFactory(Protocol):
    def __call__(
        self,
        conf_extra: dict[str, str] | None = None,
        hba: str | None = None,
        limits: str | None = None,
        servers: list[tuple[str, str, int]] | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        server_conf: dict[str, str] | None = None,
    ) -> Daemon: ...


DEFAULT_HBA = "host all all all all\nlocal all all all\n"

_daemons_key = pytest.StashKey[list[Daemon]]()


def _wait_for_port(daemon: Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if daemon.proc.poll() is not None:
            daemon.stop()
            pytest.fail(
                f"pgcorral exited with status {daemon.proc.returncode} before accepting "
                f"connections; log:\n{daemon.log()}",
                pytrace=False,
            )
        try:
            with socket.create_connection((daemon.host, daemon.port), timeout=0.5):
                if "-d" in daemon.args or daemon.log_type != "console" or (
                        "pgcorral: started" in daemon.log()):
                    return  # (with workers the port accepts before they are all ready)
        except OSError:
            pass
        if time.monotonic() > deadline:
            daemon.stop()
            pytest.fail(
                f"pgcorral did not accept connections on {daemon.host}:{daemon.port} "
                f"within {timeout:.0f}s; log:\n{daemon.log()}",
                pytrace=False,
            )
        time.sleep(0.05)


@pytest.fixture
def pgcorral(pg: PgCluster, request: pytest.FixtureRequest) -> Generator[DaemonFactory, None, None]:
    """Factory: ``pgcorral(conf_extra=None, hba=None, limits=None, servers=None,
    server_conf=None)`` starts ``python -m pgcorral`` and returns a Daemon once its TCP port
    accepts. ``server_conf``: extra keys written into every server section (``tls``...)."""
    daemons: list[Daemon] = []
    request.node.stash[_daemons_key] = daemons
    dirs: list[str] = []

    def start(
        conf_extra: dict[str, str] | None = None,
        hba: str | None = None,
        limits: str | None = None,
        servers: list[tuple[str, str, int]] | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        server_conf: dict[str, str] | None = None,
    ) -> Daemon:
        d = tempfile.mkdtemp(prefix="pgcorral-d-")
        os.chmod(d, 0o755)
        dirs.append(d)
        port = find_free_port()
        main: dict[str, str] = {
            "host": "127.0.0.1",
            "port": str(port),
            "unix_socket_dir": d,
            "log_type": "console",
            "log_level": "info",
            "max_connections": "20",
            # `make test` runs the integration suite with 1 and then with 2 workers
            "workers": os.environ.get("PGCORRAL_TEST_WORKERS", "1"),
        }
        main.update(conf_extra or {})
        if servers is None:
            servers = [("primary", "127.0.0.1", pg.port)]
        text = "[pgcorral]\n" + "".join(f"{k} = {v}\n" for k, v in main.items())
        for name, shost, sport in servers:
            text += f"\n[{name}]\nhost = {shost}\nport = {sport}\n"
            text += "".join(f"{k} = {v}\n" for k, v in (server_conf or {}).items())
        conf = os.path.join(d, "pgcorral.conf")
        Path(conf).write_text(text, encoding="utf-8")
        hba_path = os.path.join(d, "pgcorral_hba.conf")
        Path(hba_path).write_text(DEFAULT_HBA if hba is None else hba, encoding="utf-8")
        cmd = [sys.executable, "-m", "pgcorral", "-c", conf, "-a", hba_path]
        if limits is not None:
            limits_path = os.path.join(d, "pgcorral_databases.conf")
            Path(limits_path).write_text(limits, encoding="utf-8")
            cmd += ["-l", limits_path]
        cmd += args or []
        log_path = os.path.join(d, "pgcorral.log")
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed by Daemon.stop()
        environ = dict(os.environ)
        environ.update(env or {})
        environ["PYTHONUNBUFFERED"] = "1"
        src = PGCORRAL_PATH
        old_path = environ.get("PYTHONPATH")
        environ["PYTHONPATH"] = src + (os.pathsep + old_path if old_path else "")
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=d,
            env=environ,
        )
        daemon = Daemon(
            host=main["host"] if main["host"] not in ("*", "0.0.0.0", "") else "127.0.0.1",
            port=int(main["port"]),
            socket_dir=d,
            dir=d,
            proc=proc,
            log_path=log_path,
            log_file=log_file,
        )
        daemon.args = args or []
        daemon.log_type = main.get("log_type", "console")
        daemons.append(daemon)
        _wait_for_port(daemon, DAEMON_START_TIMEOUT)
        return daemon

    yield start

    problems: list[str] = []
    for daemon in daemons:
        daemon.stop()
        log = daemon.log()
        if "Traceback" in log and not daemon.allow_traceback:
            problems.append(f"pgcorral log of {daemon!r} contains a Traceback:\n{log}")
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the logs of the test's pgcorral daemons to failing reports."""
    report = yield
    if report.failed and call.when == "call":
        none: list[Daemon] = []
        daemons = item.stash.get(_daemons_key, none)
        for i, daemon in enumerate(daemons):
            try:
                report.sections.append((f"pgcorral log #{i} ({daemon.log_path})", daemon.log()))
            except OSError:
                pass
    return report
