"""Transaction pooling around the transactions: logins while every server connection is busy,
graceful shutdown, track_prepared_statements with the mapping off, disconnect_client."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import pq
from tests.integration.test_transaction import (
    TEST_DB,
    direct,
    one,
    pq_connect,
    pq_sqlstate,
    tx_conf,
    wait_until,
)
from tests.integration.test_vault_auth import _vault

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import DaemonFactory


def in_transaction(pg: PgCluster, count: int) -> Callable[[], bool]:
    def check() -> bool:
        with direct(pg) as conn:
            row = one(conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                " AND state = 'idle in transaction'", (TEST_DB,)))
        return bool(row[0] == count)
    return check


@pytest.mark.single_worker
def test_login_needs_no_server_connection_once_known(pgcorral: DaemonFactory,
                                                     pg: PgCluster) -> None:
    """max_connections = 2, both in open transactions: a third client of the same user still
    logs in at once (pgcorral answers the login itself: the user was trusted at the last
    login), and its query runs as soon as a transaction ends."""
    d = pgcorral(tx_conf(2))
    holders = [psycopg.connect(d.dsn()) for _ in range(2)]
    try:
        for conn in holders:
            conn.execute("SELECT 1")  # BEGIN + SELECT: the transaction keeps its backend
        wait_until(in_transaction(pg, 2), "two idle-in-transaction backends")
        started = time.monotonic()
        with psycopg.connect(d.dsn(), connect_timeout=5, autocommit=True) as late:
            assert time.monotonic() - started < 3  # not queued behind the transactions
            result: list[Any] = []
            worker = threading.Thread(
                target=lambda: result.append(one(late.execute("SELECT 42"))), daemon=True)
            worker.start()
            worker.join(0.3)
            assert not result  # no server connection free yet
            holders[0].commit()
            worker.join(10)
            assert result == [(42,)]
    finally:
        for conn in holders:
            conn.close()


@pytest.mark.single_worker
def test_graceful_shutdown_closes_idle_clients_and_lets_transactions_finish(
        pgcorral: DaemonFactory, pg: PgCluster) -> None:
    """SIGTERM: a client between transactions gets 57P01 at once; a client inside one commits
    it, then is closed; the daemon exits."""
    d = pgcorral(tx_conf(3, flush_timeout="20"))
    idle = psycopg.connect(d.dsn(), autocommit=True)
    busy = psycopg.connect(d.dsn())
    try:
        idle.execute("SELECT 1")
        busy.execute("SELECT 1")
        wait_until(in_transaction(pg, 1), "the busy client's transaction")
        d.signal(signal.SIGTERM)
        d.wait_for_log("graceful shutdown")
        with pytest.raises(psycopg.OperationalError) as caught:
            idle.execute("SELECT 1")  # the 57P01 was sent when the shutdown began
        assert "administrator command" in str(caught.value), caught.value
        assert one(busy.execute("SELECT 2")) == (2,)  # inside its transaction: still served
        busy.commit()
        d.proc.wait(10)
        assert d.proc.returncode == 0, d.log()
    finally:
        idle.close()
        busy.close()


@pytest.mark.single_worker
@pytest.mark.parametrize("track", ["on", "off"])
def test_track_prepared_statements_with_the_mapping_off(pgcorral: DaemonFactory,
                                                        track: str) -> None:
    """max_prepared_statements = 0 (names go to PostgreSQL as they are), one server
    connection: with track_prepared_statements = on, a transaction that prepared a named
    statement leaves the connection through DEALLOCATE ALL (pgagroal's behaviour), so the next
    client can prepare the same name; with it off the name leaks (42P05)."""
    d = pgcorral(tx_conf(1, max_prepared_statements="0", track_prepared_statements=track))
    first = pq_connect(d.dsn())
    second = pq_connect(d.dsn())
    try:
        res = first.prepare(b"stmt", b"SELECT 1")
        assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        res = second.prepare(b"stmt", b"SELECT 2")
        if track == "on":
            assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        else:
            assert pq_sqlstate(res) == "42P05"
    finally:
        first.finish()
        second.finish()


def test_disconnect_client_ends_idle_transaction_mode_clients(pgcorral: DaemonFactory) -> None:
    """disconnect_client = 1 s: a client that sends nothing (no server connection linked)
    is ended with 57P05."""
    d = pgcorral(tx_conf(2, disconnect_client="1"))
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        d.wait_for_log("disconnecting client", timeout=10)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert "idle for" in d.log()


def test_postgresql_restart_between_and_inside_transactions(pgcorral: DaemonFactory,
                                                            pg: PgCluster) -> None:
    """PostgreSQL restarts: a client between transactions just goes on (its next transaction
    gets a live server connection); a client inside a transaction gets an error, not a hang;
    new clients are served."""
    d = pgcorral(tx_conf(4))
    between = psycopg.connect(d.dsn(), autocommit=True)
    inside = psycopg.connect(d.dsn())
    try:
        assert one(between.execute("SELECT 1")) == (1,)
        assert one(inside.execute("SELECT 1")) == (1,)  # BEGIN: keeps its backend
        before = one(inside.execute("SELECT pg_backend_pid()"))[0]
        pg.stop("fast")
        pg.start()
        with pytest.raises(psycopg.OperationalError):
            inside.execute("SELECT 1")
        row = one(between.execute("SELECT pg_backend_pid()"))
        assert row[0] != before
        with psycopg.connect(d.dsn(), autocommit=True) as conn:
            assert one(conn.execute("SELECT 2")) == (2,)
    finally:
        between.close()
        inside.close()
    assert d.running()


def test_vault_users_get_new_server_connections_in_the_middle_of_a_session(
        pgcorral: DaemonFactory, tmp_path: Path) -> None:
    """Vault users (SCRAM toward the client and toward PostgreSQL): four clients log in, then
    all open transactions at once over max_connections = 4, so connections are opened for
    clients already in session; pgcorral logs them in with the vault password."""
    users, env = _vault(tmp_path, {"scramuser": "scrampass"}, "users.conf")
    d = pgcorral(tx_conf(4), hba="host all all all scram-sha-256\n", env=env,
                 args=["-u", users])
    conns = [psycopg.connect(d.dsn(user="scramuser", password="scrampass"))
             for _ in range(4)]
    try:
        for conn in conns:
            assert one(conn.execute("SELECT current_user")) == ("scramuser",)  # in a transaction
        for conn in conns:
            conn.commit()
    finally:
        for conn in conns:
            conn.close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(d.dsn(user="scramuser", password="wrong"))


@pytest.mark.single_worker
def test_pass_through_md5_user_cannot_get_a_new_connection_mid_session(
        pgcorral: DaemonFactory) -> None:
    """A pass-through md5 user (no vault, no auth_query): the login's server connection is
    pooled; a transaction that needs a second, new connection gets 08004 with what to
    configure, and the first connection keeps serving."""
    d = pgcorral(tx_conf(2))
    first = psycopg.connect(d.dsn(user="md5user", password="md5pass"))
    second = psycopg.connect(d.dsn(user="md5user", password="md5pass"), autocommit=True)
    try:
        assert one(first.execute("SELECT 1")) == (1,)  # holds the only connection
        with pytest.raises(psycopg.OperationalError, match="vault") as caught:
            second.execute("SELECT 2")
        assert caught.value.sqlstate == "08004", caught.value
        first.commit()
        assert one(first.execute("SELECT 3")) == (3,)
    finally:
        first.close()
        second.close()
