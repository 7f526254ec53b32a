"""Pool lifecycle rules, each with a short timeout: idle_timeout, max_connection_age,
foreground and background validation."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import psycopg
import pytest

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import DaemonFactory


def _backend_pid(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.info.backend_pid


def _wait_until(pg: PgCluster, sql: str, expected: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := pg.psql(sql).strip()) != expected:
        assert time.monotonic() < deadline, f"{sql!r} gave {got!r}, expected {expected!r}"
        time.sleep(0.1)


def test_idle_timeout_closes_idle_server_connections(pgcorral: DaemonFactory,
                                                     pg: PgCluster) -> None:
    d = pgcorral({"idle_timeout": "1"})
    pid = _backend_pid(d.dsn())
    _wait_until(pg, f"select count(*) from pg_stat_activity where pid = {pid}", "0")
    assert _backend_pid(d.dsn()) != pid


def test_idle_timeout_leaves_busy_connections_alone(pgcorral: DaemonFactory,
                                                    pg: PgCluster) -> None:
    d = pgcorral({"idle_timeout": "1"})
    with psycopg.connect(d.dsn()) as conn:
        pid = conn.info.backend_pid
        conn.execute("select pg_sleep(2.5)")  # longer than idle_timeout, but in use
        assert conn.execute("select pg_backend_pid()").fetchone() == (pid,)


def test_max_connection_age_retires_old_connections(pgcorral: DaemonFactory,
                                                    pg: PgCluster) -> None:
    d = pgcorral({"max_connection_age": "1"})
    with psycopg.connect(d.dsn()) as conn:
        pid = conn.info.backend_pid
        _wait_until(pg, f"select (now() - backend_start) > interval '1.2 s' "
                        f"from pg_stat_activity where pid = {pid}", "t")
    # older than max_connection_age when it came back: closed instead of pooled
    _wait_until(pg, f"select count(*) from pg_stat_activity where pid = {pid}", "0")
    assert _backend_pid(d.dsn()) != pid


@pytest.mark.single_worker
def test_foreground_validation_keeps_healthy_connections(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"validation": "foreground", "max_connections": "1"})
    pid = _backend_pid(d.dsn())
    assert _backend_pid(d.dsn()) == pid
    assert _backend_pid(d.dsn()) == pid


@pytest.mark.single_worker
def test_background_validation_checks_idle_connections(pgcorral: DaemonFactory,
                                                       pg: PgCluster) -> None:
    d = pgcorral({"validation": "background", "background_interval": "1"})
    pid = _backend_pid(d.dsn())
    # the empty validation query replaces the reset as the backend's last statement
    _wait_until(pg, f"select query = '' from pg_stat_activity where pid = {pid}", "t")
    assert _backend_pid(d.dsn()) == pid


@pytest.mark.single_worker
def test_disconnect_client_ends_idle_sessions_only(pgcorral: DaemonFactory,
                                                   pg: PgCluster) -> None:
    d = pgcorral({"disconnect_client": "1", "max_connections": "2"})
    idle = psycopg.connect(d.dsn(), autocommit=True)
    pid = idle.info.backend_pid
    with psycopg.connect(d.dsn()) as busy:
        busy_pid = busy.info.backend_pid
        busy.execute("select pg_sleep(3)")  # running longer than disconnect_client: kept
        assert busy.execute("select 1").fetchone() == (1,)
    d.wait_for_log("idle for")
    try:
        with pytest.raises(psycopg.OperationalError, match="idle-session timeout"):
            idle.execute("select 1")
    finally:
        idle.close()
    with psycopg.connect(d.dsn()) as conn:  # both backends went back to the pool
        assert conn.info.backend_pid in (pid, busy_pid)
