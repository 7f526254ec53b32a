"""Pass-through authentication: whatever PostgreSQL asks is relayed to the client, and a reused
server connection is never handed out without the client proving the same password."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
import pytest

if TYPE_CHECKING:
    from tests.conftest import DaemonFactory


@pytest.mark.parametrize(("user", "password"), [("md5user", "md5pass"), ("pwuser", "pwpass"),
                                                 ("scramuser", "scrampass")])
def test_password_methods_pass_through(pgcorral: DaemonFactory, user: str,
                                       password: str) -> None:
    d = pgcorral({"max_connections": "1"})
    with psycopg.connect(d.dsn(user=user, password=password)) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(d.dsn(user=user, password="wrong"))
    with psycopg.connect(d.dsn(user=user, password=password)) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)


@pytest.mark.single_worker
@pytest.mark.parametrize(("user", "password"), [("md5user", "md5pass"), ("pwuser", "pwpass")])
def test_reused_connection_checks_the_password_again(pgcorral: DaemonFactory, user: str,
                                                     password: str) -> None:
    d = pgcorral({"max_connections": "1"})
    with psycopg.connect(d.dsn(user=user, password=password)) as conn:
        pid = conn.info.backend_pid
    # same user and database: the pooled backend is reused only with the right password
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(d.dsn(user=user, password="wrong"))
    with psycopg.connect(d.dsn(user=user, password=password)) as conn:
        assert conn.info.backend_pid == pid


def test_scram_pass_through_is_not_pooled_but_works_repeatedly(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"max_connections": "1"})
    pids = set()
    for _ in range(3):
        with psycopg.connect(d.dsn(user="scramuser", password="scrampass")) as conn:
            pids.add(conn.info.backend_pid)
    assert len(pids) == 3  # SCRAM cannot be replayed to a later client: fresh login each time
