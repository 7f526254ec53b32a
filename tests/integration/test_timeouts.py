"""The timeouts PgBouncer users rely on (issue 15, item 6; docs/RELIABILITY.md "Timeouts"):
query_timeout cancels a long query (the client keeps its connection), idle_transaction_timeout
and transaction_timeout close the client (25P03, 25P04) and roll its transaction back. Both
pipelines."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import errors

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import DaemonFactory

PIPELINES = ["session", "transaction"]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_query_timeout_cancels_the_query(pgcorral: DaemonFactory, pipeline: str) -> None:
    d = pgcorral({"pipeline": pipeline, "query_timeout": "1"})
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        start = time.monotonic()
        with pytest.raises(errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - start < 15
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection goes on
        assert conn.execute("SELECT pg_sleep(0.2)").fetchone() == ("",)  # short ones run
    assert "query_timeout" in d.log()


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_idle_transaction_timeout_closes_and_rolls_back(pgcorral: DaemonFactory,
                                                        pg: PgCluster, pipeline: str) -> None:
    table = f"idle_tx_{pipeline}"
    pg.psql(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (x int); "
            f"GRANT ALL ON {table} TO PUBLIC", dbname="pgcorral_test")
    d = pgcorral({"pipeline": pipeline, "idle_transaction_timeout": "1"})
    conn = psycopg.connect(d.dsn())
    try:
        conn.execute(f"INSERT INTO {table} VALUES (1)")  # a transaction, left open
        deadline = time.monotonic() + 15
        while "idle_transaction_timeout" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(errors.IdleInTransactionSessionTimeout):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    with psycopg.connect(d.dsn(), autocommit=True) as other:
        assert other.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        # idle outside a transaction is not touched
        time.sleep(1.5)
        assert other.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_transaction_timeout_ends_a_long_transaction(pgcorral: DaemonFactory,
                                                     pipeline: str) -> None:
    d = pgcorral({"pipeline": pipeline, "transaction_timeout": "1"})
    conn = psycopg.connect(d.dsn())
    try:
        with pytest.raises(errors.TransactionTimeout):
            for _ in range(100):  # busy, never idle: only the transaction's age ends it
                conn.execute("SELECT pg_sleep(0.1)")
    finally:
        conn.close()
