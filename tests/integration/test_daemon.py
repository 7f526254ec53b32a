"""The daemon as a process: command line, configuration errors, signals, reload, event loops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from tests.conftest import wait_reset
from tests.pgwire import connect_error

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import DaemonFactory

REPO = Path(__file__).resolve().parents[2]
USER = {"user": "trustuser", "database": "pgcorral_test"}


def _run_daemon(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "pgcorral", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_version_and_help() -> None:
    assert _run_daemon("-V").stdout.startswith("pgcorral ")
    out = _run_daemon("-?")
    assert out.returncode == 0
    for flag in ("--config", "--hba", "--limit", "--users", "--daemon"):
        assert flag in out.stdout


def test_config_errors_are_one_line_each_and_exit_1(tmp_path: Path) -> None:
    conf = tmp_path / "pgcorral.conf"
    conf.write_text("[pgagroal]\nport = notanumber\nmax_connections = -3\nfrobnicate = 1\n"
                    "\n[primary]\nhost = localhost\n")
    out = _run_daemon("-c", str(conf))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if "warning" not in line]
    assert any(f"{conf}:2" in line and "port" in line for line in lines), out.stderr
    assert any(f"{conf}:3" in line and "max_connections" in line for line in lines), out.stderr
    assert any("frobnicate" in line for line in out.stderr.splitlines()), out.stderr


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    out = _run_daemon("-c", str(tmp_path / "nope.conf"))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "nope.conf" in out.stderr


def test_pgbench_initialises_through_pgcorral(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = pgcorral()
    out = subprocess.run(["pgbench", "-h", d.host, "-p", str(d.port), "-U", "postgres", "-i",
                          "-s", "1", "-q", "db2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert pg.psql("select count(*) from pgbench_branches", dbname="db2").strip() == "1"


@pytest.mark.single_worker
def test_plain_asyncio_event_loop_works_too(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = pgcorral(env={"PGCORRAL_EVENT_LOOP": "asyncio"})
    with psycopg.connect(d.dsn()) as conn:
        pid = conn.info.backend_pid
        timer = threading.Timer(0.3, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(20)")
        conn.rollback()
    wait_reset(pg, pid)
    with psycopg.connect(d.dsn()) as conn:
        assert conn.info.backend_pid == pid
    assert "event loop asyncio" in d.log()


@pytest.mark.skipif(os.environ.get("PGCORRAL_EVENT_LOOP") == "asyncio",
                    reason="the whole suite is running on plain asyncio")
def test_uvloop_is_the_default(pgcorral: DaemonFactory) -> None:
    assert "event loop uvloop" in pgcorral().log()


def test_sighup_reloads_hba_without_dropping_clients(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with psycopg.connect(d.dsn(), autocommit=True) as kept:
        kept.execute("select 1")
        Path(d.dir, "pgcorral_hba.conf").write_text("host all postgres all trust\n")
        d.signal(signal.SIGHUP)
        d.wait_for_log("configuration reloaded")
        error = connect_error(d.host, d.port, USER)
        assert error is not None and error["C"] == "28000"
        assert kept.execute("select 2").fetchone() == (2,)  # the connected client is untouched
        with psycopg.connect(d.dsn(user="postgres")) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_broken_reload_keeps_the_running_configuration(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    Path(d.dir, "pgcorral_hba.conf").write_text("host all all all nosuchmethod\n")
    d.signal(signal.SIGHUP)
    d.wait_for_log("reload failed")
    assert "pgcorral_hba.conf:1" in d.log()
    with psycopg.connect(d.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_sigterm_lets_a_running_transaction_commit(pgcorral: DaemonFactory,
                                                  pg: PgCluster) -> None:
    pg.psql("create table if not exists graceful_check(x int)", dbname="pgcorral_test")
    pg.psql("grant all on graceful_check to public", dbname="pgcorral_test")
    d = pgcorral({"flush_timeout": "30"})
    with psycopg.connect(d.dsn()) as conn:
        conn.execute("insert into graceful_check values (42)")
        d.signal(signal.SIGTERM)
        d.wait_for_log("graceful shutdown")
        assert d.running()
        conn.commit()
    assert d.proc.wait(10) == 0
    count = pg.psql("select count(*) from graceful_check where x = 42", dbname="pgcorral_test")
    assert count.strip() == "1"


def test_vault_problems_stop_the_daemon_with_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "pgcorral.conf"
    conf.write_text("[pgcorral]\nhost = 127.0.0.1\nport = 6543\n\n[primary]\nhost = localhost\n"
                    "port = 5432\n")
    users = tmp_path / "users.conf"
    users.write_text("alice:bm90IGEgcmVhbCBibG9i\n")
    key = tmp_path / "keydir" / "master.key"
    env = {"PGCORRAL_MASTER_KEY_FILE": str(key)}
    out = subprocess.run([sys.executable, "-m", "pgcorral", "-c", str(conf), "-u", str(users)],
                         capture_output=True, text=True, timeout=20,
                         env=dict(os.environ, PYTHONPATH=str(REPO / "src"), **env))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "master key" in out.stderr and "pgcorral-admin master-key" in out.stderr


def test_log_connections_and_disconnections(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"log_connections": "on", "log_disconnections": "on"})
    with psycopg.connect(d.dsn()) as conn:
        conn.execute("select 1")
    d.wait_for_log("connection authorized: user=trustuser database=pgcorral_test")
    d.wait_for_log("disconnection: user=trustuser database=pgcorral_test")
    quiet = pgcorral()
    with psycopg.connect(quiet.dsn()) as conn:
        conn.execute("select 1")
    assert "connection authorized" not in quiet.log()


def test_reload_reports_restart_only_keys_without_applying_them(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"max_connections": "1", "blocking_timeout": "30"})
    conf = Path(d.dir, "pgcorral.conf")
    text = conf.read_text().replace("max_connections = 1", "max_connections = 5")
    conf.write_text(text.replace("blocking_timeout = 30", "blocking_timeout = 1"))
    d.signal(signal.SIGHUP)
    d.wait_for_log("configuration reloaded")
    assert "max_connections: changed from 1 to 5: restart required" in d.log()
    with psycopg.connect(d.dsn()):
        # blocking_timeout (live) is now 1 s; max_connections (restart only) is still 1
        started = time.monotonic()
        error = connect_error(d.host, d.port, USER)
        assert error is not None and error["C"] == "53300"
        assert time.monotonic() - started < 10
