"""The session-state ledger of the transaction pipeline (issue 14, docs/TRANSACTION.md
"Session state"): state a client makes that outlives a transaction is carried to its next
server connection (settings, SQL-level PREPARE) or pins the client to its connection until
the state is gone (session advisory locks, temporary tables, WITH HOLD cursors), and never
reaches another client.

Most tests use max_connections = 2 and a second client that keeps the other connection busy
or shares the first one, so that "the client moved" and "another client got the connection"
both happen for sure. They run one worker (with two, each worker would have one connection);
the ledger is per client and the same code in every worker.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg
import pytest
from psycopg import errors
from tests.integration.test_management import cli_json, poll
from tests.integration.test_transaction import TEST_DB, tx_conf

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory


def one(cur: psycopg.Cursor[Any]) -> Any:
    row = cur.fetchone()
    assert row is not None
    return row


def connect(d: Daemon, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(d.dsn(**kw), autocommit=True)


def pinned_clients(d: Daemon) -> list[str]:
    """The pinned reasons of the pooler's clients (``status details``)."""
    return [s["pinned"] for s in cli_json(d, "status", "details")["sessions"] if s["pinned"]]


def expect_pinned(d: Daemon, reasons: list[str]) -> None:
    """The pinned clients' reasons become ``reasons`` (the probe that decides runs after the
    client has its answer: wait for it)."""
    poll(lambda: pinned_clients(d) == reasons, f"pinned clients {reasons}",
         more=lambda: pinned_clients(d))


def backend(conn: psycopg.Connection[Any]) -> int:
    return int(one(conn.execute("SELECT pg_backend_pid()"))[0])


# --------------------------------------------------------------------------- settings


def test_set_follows_its_client_and_never_reaches_another(pgcorral: DaemonFactory) -> None:
    """pgbouncer#396: a SET outside a transaction stays with its client on every server
    connection it gets, and the next client of that connection sees the default."""
    d = pgcorral(tx_conf(1))
    a, b = connect(d), connect(d)
    try:
        a.execute("SET work_mem = '7MB'")
        a.execute("SELECT set_config('geqo', 'off', false)")
        a.execute("SET statement_timeout TO 12345")
        assert one(b.execute("SELECT current_setting('work_mem'), current_setting('geqo'),"
                             " current_setting('statement_timeout')")) == ("4MB", "on", "0")
        assert one(a.execute("SELECT current_setting('work_mem'), current_setting('geqo'),"
                             " current_setting('statement_timeout')")) == \
            ("7MB", "off", "12345ms")
        a.execute("RESET work_mem")
        assert one(a.execute("SELECT current_setting('work_mem')")) == ("4MB",)
        # SET inside a transaction that rolls back is not kept; SET LOCAL never is
        a.execute("BEGIN")
        a.execute("SET work_mem = '9MB'")
        a.execute("ROLLBACK")
        a.execute("BEGIN")
        a.execute("SET LOCAL work_mem = '10MB'")
        a.execute("COMMIT")
        assert one(a.execute("SELECT current_setting('work_mem')")) == ("4MB",)
        assert one(b.execute("SELECT current_setting('geqo')")) == ("on",)
        # DISCARD ALL is RESET ALL
        a.execute("DISCARD ALL")
        assert one(a.execute("SELECT current_setting('geqo'),"
                             " current_setting('statement_timeout')")) == ("on", "0")
        expect_pinned(d, [])
    finally:
        a.close()
        b.close()


def test_set_follows_its_client_across_server_connections(pgcorral: DaemonFactory) -> None:
    """With two server connections and the client's transactions landing on both, each
    one shows the client's setting; a set ROLE follows too."""
    d = pgcorral(tx_conf(2, workers="1"))
    a, b = connect(d), connect(d)
    try:
        a.execute("SET search_path TO pg_catalog, public")
        seen = set()
        for _ in range(20):
            b.execute("BEGIN")  # b holds one connection: a runs on the other
            b.execute("SELECT 1")
            seen.add(backend(a))
            assert one(a.execute("SELECT current_setting('search_path')")) == \
                ("pg_catalog, public",)
            b.execute("COMMIT")
            seen.add(backend(a))
            assert one(a.execute("SELECT current_setting('search_path')")) == \
                ("pg_catalog, public",)
            if len(seen) == 2:
                break
        assert len(seen) == 2, "the client never moved to the other server connection"
        assert one(b.execute("SELECT current_setting('search_path')")) == ('"$user", public',)
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- pins


def test_advisory_lock_pins_until_unlocked(pgcorral: DaemonFactory) -> None:
    """A session advisory lock keeps the client on its backend (the lock is its); the other
    client runs on the other connection; unlock gives the connection back."""
    d = pgcorral(tx_conf(2, workers="1"))
    a, b = connect(d), connect(d)
    try:
        a.execute("SELECT pg_advisory_lock(4242)")
        a_pid = backend(a)
        expect_pinned(d, ["advisory lock"])
        for _ in range(5):
            assert backend(a) == a_pid
            assert one(b.execute("SELECT pg_try_advisory_xact_lock(4242)")) == (False,)
            assert backend(b) != a_pid
        assert cli_json(d, "status")["pinned_clients"] == 1
        assert one(a.execute("SELECT pg_advisory_unlock(4242)")) == (True,)
        expect_pinned(d, [])
        assert one(b.execute("SELECT pg_try_advisory_xact_lock(4242)")) == (True,)
    finally:
        a.close()
        b.close()


def test_temp_table_pins_until_dropped(pgcorral: DaemonFactory) -> None:
    d = pgcorral(tx_conf(2, workers="1"))
    a, b = connect(d), connect(d)
    try:
        a.execute("CREATE TEMP TABLE mine (x int)")
        a.execute("INSERT INTO mine VALUES (1), (2)")
        a_pid = backend(a)
        expect_pinned(d, ["temporary table"])
        for _ in range(3):
            assert one(a.execute("SELECT count(*) FROM mine")) == (2,)
            assert one(b.execute("SELECT to_regclass('pg_temp.mine')")) == (None,)
        a.execute("DROP TABLE mine")
        expect_pinned(d, [])
        a.execute("CREATE TEMP TABLE again (x int)")
        expect_pinned(d, ["temporary table"])
        a.execute("DISCARD TEMP")
        expect_pinned(d, [])
        # ON COMMIT DROP inside one transaction never pins
        with a.transaction():
            a.execute("CREATE TEMP TABLE scratch (x int) ON COMMIT DROP")
        expect_pinned(d, [])
        assert a_pid
    finally:
        a.close()
        b.close()


def test_with_hold_cursor_pins_until_closed(pgcorral: DaemonFactory) -> None:
    d = pgcorral(tx_conf(2, workers="1"))
    a, b = connect(d), connect(d)
    try:
        a.execute("BEGIN")
        a.execute("DECLARE held CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 10) g")
        a.execute("COMMIT")
        expect_pinned(d, ["cursor WITH HOLD"])
        assert a.execute("FETCH 3 FROM held").fetchall() == [(1,), (2,), (3,)]
        with pytest.raises(errors.InvalidCursorName):
            b.execute("FETCH 1 FROM held")
        assert a.execute("FETCH 2 FROM held").fetchall() == [(4,), (5,)]
        a.execute("CLOSE held")
        expect_pinned(d, [])
    finally:
        a.close()
        b.close()


def test_sql_prepare_is_carried_and_private(pgcorral: DaemonFactory) -> None:
    """SQL-level PREPARE follows the client to every server connection and is never seen by
    another client; DEALLOCATE and DEALLOCATE ALL remove it."""
    d = pgcorral(tx_conf(2, workers="1"))
    a, b = connect(d), connect(d)
    try:
        a.execute("PREPARE answer (int) AS SELECT $1 + 40")
        seen = set()
        for i in range(20):
            if i % 2:
                b.execute("BEGIN")
                b.execute("SELECT 1")
            seen.add(backend(a))
            assert one(a.execute("EXECUTE answer(2)")) == (42,)
            if i % 2:
                b.execute("COMMIT")
            with pytest.raises(errors.InvalidSqlStatementName):
                b.execute("EXECUTE answer(2)")
        assert len(seen) == 2
        expect_pinned(d, [])
        a.execute("DEALLOCATE answer")
        with pytest.raises(errors.InvalidSqlStatementName):
            a.execute("EXECUTE answer(2)")
        a.execute("PREPARE p1 AS SELECT 1")
        a.execute("PREPARE p2 AS SELECT 2")
        assert one(a.execute("EXECUTE p2")) == (2,)
        a.execute("DEALLOCATE ALL")
        with pytest.raises(errors.InvalidSqlStatementName):
            a.execute("EXECUTE p1")
    finally:
        a.close()
        b.close()


def test_extended_protocol_lock_statements_are_seen(pgcorral: DaemonFactory) -> None:
    """asyncpg names every statement: the lock taken by a Bind of a prepared statement (not
    its Parse) pins the client all the same, and the unlock frees it."""
    d = pgcorral(tx_conf(2, workers="1"))

    async def run() -> None:
        conn = await asyncpg.connect(host=d.host, port=d.port, user="trustuser",
                                     database=TEST_DB, timeout=30)
        try:
            for key in (1, 2, 3):  # the same statement, bound again
                await conn.fetchval("SELECT pg_advisory_lock($1)", key)
            expect_pinned(d, ["advisory lock"])
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            for key in (1, 2):
                assert await conn.fetchval("SELECT pg_advisory_unlock($1)", key)
            expect_pinned(d, ["advisory lock"])
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
            assert await conn.fetchval("SELECT pg_advisory_unlock($1)", 3)
            expect_pinned(d, [])
        finally:
            await conn.close()

    asyncio.run(run())


def test_a_pinned_client_that_leaves_frees_its_state(pgcorral: DaemonFactory) -> None:
    d = pgcorral(tx_conf(2, workers="1"))
    a, b = connect(d), connect(d)
    a.execute("SELECT pg_advisory_lock(777)")
    a.execute("CREATE TEMP TABLE gone_with_it (x int)")
    a.close()
    poll(lambda: one(b.execute("SELECT pg_try_advisory_xact_lock(777)")) == (True,),
         "the lock to be released")
    b.execute("SELECT pg_advisory_unlock_all()")
    assert cli_json(d, "status")["pinned_clients"] == 0
    b.close()


# --------------------------------------------------------------------------- limits


def test_pin_timeout_closes_an_idle_pinned_client(pgcorral: DaemonFactory) -> None:
    d = pgcorral(tx_conf(2, pin_timeout="1"))
    a, b = connect(d), connect(d)
    try:
        a.execute("SELECT pg_advisory_lock(99)")
        d.wait_for_log("pin_timeout")
        with pytest.raises(psycopg.OperationalError, match="pin_timeout"):
            a.execute("SELECT 1")
        poll(lambda: one(b.execute("SELECT pg_try_advisory_xact_lock(99)")) == (True,),
             "the timed-out client's lock to be released")
    finally:
        a.close()
        b.close()


def test_max_pinned_connections_refuses_one_more(pgcorral: DaemonFactory) -> None:
    """max_pinned_connections = 1: the second client whose state would pin a connection is
    closed with 53300 (and its lock released); clients without session state go on."""
    d = pgcorral(tx_conf(3, max_pinned_connections="1", workers="1"))
    a, c, b = connect(d), connect(d), connect(d)
    try:
        a.execute("SELECT pg_advisory_lock(1)")
        # (the probe after a's transaction runs while a already has its answer: the first
        # probe to finish pins, so wait for a's)
        poll(lambda: pinned_clients(d) == ["advisory lock"], "a to be pinned")
        with pytest.raises(psycopg.OperationalError, match="max_pinned_connections"):
            c.execute("SELECT pg_advisory_lock(2)")
            c.execute("SELECT 1")
        poll(lambda: one(b.execute("SELECT pg_try_advisory_xact_lock(2)")) == (True,),
             "the refused client's lock to be released (its backend closed)")
        assert one(b.execute("SELECT 1")) == (1,)
        expect_pinned(d, ["advisory lock"])
        assert "max_pinned_connections" in d.log()
    finally:
        a.close()
        b.close()
        c.close()


# --------------------------------------------------------------------------- hostile


def test_ten_thousand_advisory_locks(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    """One client takes 10,000 advisory locks: one pinned connection, others unharmed; one
    unlock_all frees it."""
    d = pgcorral(tx_conf(2, workers="1"))
    a, b = connect(d), connect(d)
    try:
        assert one(a.execute("SELECT count(pg_advisory_lock(g))"
                             " FROM generate_series(1, 10000) g")) == (10000,)
        expect_pinned(d, ["advisory lock"])
        stop = threading.Event()
        done: list[int] = []

        def others() -> None:
            with connect(d) as c:
                while not stop.is_set() and len(done) < 200:
                    done.append(int(one(c.execute("SELECT 1"))[0]))

        t = threading.Thread(target=others)
        t.start()
        t.join(30)
        stop.set()
        assert len(done) == 200
        assert one(b.execute("SELECT pg_try_advisory_xact_lock(5000)")) == (False,)
        a.execute("SELECT pg_advisory_unlock_all()")
        expect_pinned(d, [])
        assert one(b.execute("SELECT pg_try_advisory_xact_lock(5000)")) == (True,)
    finally:
        a.close()
        b.close()


def test_the_admin_console_shows_who_is_pinned(pgcorral: DaemonFactory) -> None:
    d = pgcorral(tx_conf(2, workers="1"))
    a = connect(d, application_name="pinner")
    try:
        a.execute("SELECT pg_advisory_lock(31337)")
        rows = cli_json(d, "stats")["clients"]
        mine = [r for r in rows if r["application_name"] == "pinner"]
        assert [r["pinned"] for r in mine] == ["advisory lock"]
        pools = cli_json(d, "stats")["pools"]  # (pgcorral_pool_pinned_clients in /metrics)
        assert sum(p["cl_pinned"] for p in pools) == 1
    finally:
        a.close()


def test_set_role_follows_its_client(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    pg.psql("DO $$ BEGIN CREATE ROLE pgc_ledger_role; EXCEPTION WHEN duplicate_object THEN "
            "NULL; END $$; GRANT pgc_ledger_role TO trustuser")
    d = pgcorral(tx_conf(1))
    a, b = connect(d), connect(d)
    try:
        a.execute("SET ROLE pgc_ledger_role")
        for _ in range(3):
            assert one(b.execute("SELECT current_user")) == ("trustuser",)
            assert one(a.execute("SELECT current_user")) == ("pgc_ledger_role",)
        a.execute("RESET ROLE")
        assert one(a.execute("SELECT current_user")) == ("trustuser",)
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- pids


def test_signalling_a_virtual_pid_is_refused_clearly(pgcorral: DaemonFactory) -> None:
    """pg_cancel_backend / pg_terminate_backend of a pid pgcorral gave a client: PostgreSQL
    itself raises 0A000 with pgcorral's message (so a transaction is aborted as by any error);
    the client named is untouched; the cancel protocol still works with the same pid."""
    d = pgcorral(tx_conf(2, workers="1"))
    a, b = connect(d), connect(d)
    try:
        vpid = b.info.backend_pid
        assert vpid >= 1 << 22
        with pytest.raises(errors.FeatureNotSupported, match="virtual pid"):
            a.execute(f"SELECT pg_terminate_backend({vpid})")
        a.execute("BEGIN")
        with pytest.raises(errors.FeatureNotSupported, match="cancel protocol"):
            a.execute(f"SELECT pg_cancel_backend({vpid})")
        with pytest.raises(errors.InFailedSqlTransaction):
            a.execute("SELECT 1")
        a.execute("ROLLBACK")
        assert one(b.execute("SELECT 1")) == (1,)
        timer = threading.Timer(0.5, b.cancel)
        timer.start()
        with pytest.raises(errors.QueryCanceled):
            b.execute("SELECT pg_sleep(20)")
        timer.join()
    finally:
        a.close()
        b.close()


def test_listen_inside_a_transaction_pins_and_delivers(pgcorral: DaemonFactory) -> None:
    """LISTEN inside a transaction block runs on the server connection: the client is pinned
    to it and gets the notifications there, until UNLISTEN."""
    d = pgcorral(tx_conf(2, workers="1"))
    a, b = connect(d), connect(d)
    try:
        with a.transaction():
            a.execute("LISTEN ledger_channel")
        expect_pinned(d, ["LISTEN"])
        b.execute("NOTIFY ledger_channel, 'hello'")
        got = next(a.notifies(timeout=10, stop_after=1))
        assert (got.channel, got.payload) == ("ledger_channel", "hello")
        a.execute("UNLISTEN ledger_channel")
        expect_pinned(d, [])
    finally:
        a.close()
        b.close()
