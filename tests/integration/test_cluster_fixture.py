"""Checks of the test harness itself: the `pg` fixture's roles, auth methods and data."""

from __future__ import annotations

import psycopg
import pytest
from devtools.pgcluster import PgCluster


def _whoami(dsn: str) -> str:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_user").fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("postgres", None),
        ("trustuser", None),
        ("md5user", "md5pass"),
        ("scramuser", "scrampass"),
        ("pwuser", "pwpass"),
    ],
)
def test_roles_can_log_in(pg: PgCluster, user: str, password: str | None) -> None:
    for db in ("pgcorral_test", "db2"):
        assert _whoami(pg.dsn(dbname=db, user=user, password=password)) == user


@pytest.mark.parametrize("user", ["md5user", "scramuser", "pwuser"])
def test_wrong_password_is_rejected(pg: PgCluster, user: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _whoami(pg.dsn(dbname="pgcorral_test", user=user, password="wrong"))


@pytest.mark.parametrize("user", ["md5user", "scramuser", "pwuser"])
def test_password_is_required(pg: PgCluster, user: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="password"):
        _whoami(pg.dsn(dbname="pgcorral_test", user=user, password=""))


def test_password_storage(pg: PgCluster) -> None:
    out = pg.psql(
        "SELECT rolname || ' ' || split_part(rolpassword, '$', 1) FROM pg_authid "
        "WHERE rolname IN ('md5user', 'scramuser', 'pwuser') ORDER BY rolname"
    )
    rows = dict(line.split(" ", 1) for line in out.splitlines())
    assert rows["md5user"].startswith("md5")
    assert rows["scramuser"] == "SCRAM-SHA-256"
    assert rows["pwuser"] == "SCRAM-SHA-256"


def test_hba_methods(pg: PgCluster) -> None:
    out = pg.psql(
        "SELECT type, user_name[1], auth_method FROM pg_hba_file_rules "
        "WHERE error IS NULL ORDER BY line_number"
    )
    rules = [tuple(line.split("|")) for line in out.splitlines()]
    assert ("host", "md5user", "md5") in rules
    assert ("host", "scramuser", "scram-sha-256") in rules
    assert ("host", "pwuser", "password") in rules
    assert ("local", "md5user", "md5") in rules
    assert rules[-1][2] == "trust"


def test_pgbench_tables(pg: PgCluster) -> None:
    dsn = pg.dsn(dbname="pgcorral_test", user="trustuser")
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone()
        assert row is not None and row[0] == 100000
        # trustuser can run the pgbench TPC-B-like transaction.
        conn.execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1")
        conn.rollback()


def test_dsn_quoting(pg: PgCluster) -> None:
    assert pg.dsn(user="md5user", password="a b'c").endswith("password='a b\\'c'")


def test_is_marked_integration(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("integration") is not None
