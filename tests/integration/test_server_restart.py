"""PostgreSQL restarts under pgcorral: idle pooled connections are not handed out dead, a
connected client gets an error, and service resumes by itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
import pytest

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import DaemonFactory


def test_postgresql_restart_with_idle_and_active_connections(pgcorral: DaemonFactory,
                                                             pg: PgCluster) -> None:
    d = pgcorral({"max_connections": "4"})
    with psycopg.connect(d.dsn()) as conn:
        idle_pid = conn.info.backend_pid  # goes back to the pool, idle
    active = psycopg.connect(d.dsn(), autocommit=True)
    try:
        assert active.execute("select 1").fetchone() == (1,)
        pg.stop("fast")
        pg.start()
        with pytest.raises(psycopg.OperationalError):
            active.execute("select 1")  # its backend is gone: an error, not a hang
    finally:
        active.close()
    for _ in range(3):  # every new client gets a live backend at once
        with psycopg.connect(d.dsn()) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            assert conn.info.backend_pid != idle_pid
    assert d.running()


def test_silent_server_gives_08006_after_the_login_timeout(pgcorral: DaemonFactory) -> None:
    """A "server" that accepts and never answers: the client gets 08006, not a hang."""
    import socket
    import time

    from tests.pgwire import connect_error

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        d = pgcorral({"authentication_timeout": "1"}, servers=[("primary", "127.0.0.1", port)])
        started = time.monotonic()
        error = connect_error(d.host, d.port, {"user": "trustuser", "database": "x"})
        assert error is not None and error["C"] == "08006"
        assert time.monotonic() - started < 5
