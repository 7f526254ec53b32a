"""Too many clients (issue 15, item 1): beyond max_client_conn, or near the file-descriptor
limit, a new client gets FATAL 53300 "sorry, too many clients already" at once, with one log
line a second, and the clients already connected are not touched."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from tests.integration.test_management import cli_json
from tests.pgwire import connect_error

if TYPE_CHECKING:
    from tests.conftest import DaemonFactory


def fill(d: Any, limit: int) -> tuple[list[psycopg.Connection[Any]], list[str]]:
    """Connect until refused (at most ``limit`` tries); the clients and the refusals."""
    conns: list[psycopg.Connection[Any]] = []
    refused: list[str] = []
    for _ in range(limit):
        try:
            conns.append(psycopg.connect(d.dsn(), autocommit=True, connect_timeout=10))
        except psycopg.OperationalError as exc:
            refused.append(str(exc))
            if len(refused) >= 3:
                break
    return conns, refused


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_max_client_conn(pgcorral: DaemonFactory, pipeline: str) -> None:
    d = pgcorral({"pipeline": pipeline, "max_client_conn": "6", "max_connections": "10",
                  "workers": "1"})
    conns, refused = fill(d, 20)
    try:
        assert len(conns) == 6
        assert refused and all("too many clients already" in r for r in refused)
        error = connect_error(d.host, d.port, {"user": "trustuser", "database": "pgcorral_test"})
        assert error is not None and error["C"] == "53300" and error["S"] == "FATAL"
        for conn in conns:  # the ones in are served
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert "max_client_conn" in d.log()
        assert cli_json(d, "status")["counters"]["clients_refused_too_many"] >= 4
    finally:
        for conn in conns:
            conn.close()
    with psycopg.connect(d.dsn(), autocommit=True) as conn:  # room again
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_descriptor_limit_refuses_cleanly(pgcorral: DaemonFactory) -> None:
    """The running daemon's descriptor limit lowered to 110 (prlimit): with max_connections
    10, auto lets 110 - 10 - 64 = 36 clients in; the next ones get 53300, not a hang or a
    crash, and the clients in are served."""
    d = pgcorral({"pipeline": "transaction", "max_connections": "10", "workers": "1"})
    subprocess.run(["prlimit", "--pid", str(d.pid), "--nofile=110:110"], check=True)
    conns, refused = fill(d, 60)
    try:
        assert len(conns) == 36
        assert refused and all("too many clients already" in r for r in refused)
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert d.running()
    finally:
        for conn in conns:
            conn.close()
