"""Prepared statements that survive DDL in transaction pooling (issue 14, part 3), against a
real PostgreSQL 15 with real drivers.

- A new Parse sees the schema as it is now: a driver's reproduction (a statement run on a
  table with an ``int`` column; the table dropped and made again with a ``text`` column and
  the same text prepared as another statement in one transaction) gives the row, as
  PostgreSQL does, with libpq-level prepare (psycopg), psycopg's ``prepare=True`` across two
  clients on one server connection, and asyncpg (which names every statement).
- Migrations: clients run prepared statements in a loop (autocommit) while another client runs
  ``ALTER TABLE ... ALTER COLUMN ... TYPE``, ``DROP TYPE`` / ``CREATE TYPE``, through pgcorral
  and directly on PostgreSQL (bypassing pgcorral: the error-driven repair); no client outside
  a transaction sees an error.
- Inside a transaction the client gets PostgreSQL's own error, and the stale statement is not
  used again (the next execution on the same server connection works).

Every test runs with one and with two workers (``PGCORRAL_TEST_WORKERS``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
from tests.integration.test_transaction import TEST_DB, tx_conf
from tests.integration.test_transaction_differential import (
    EXECUTE,
    SYNC,
    bind,
    connected,
    describe,
    parse,
    query,
)

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory


def name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def daemon(pgcorral: DaemonFactory, connections: int = 2) -> Daemon:
    return pgcorral(tx_conf(connections, max_prepared_statements="20"))


def direct(pg: PgCluster) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.dsn(dbname=TEST_DB, user="trustuser"), autocommit=True)


# --------------------------------------------------------------- a new Parse sees the schema

def test_reproduction_libpq_prepare(pgcorral: DaemonFactory) -> None:
    """One client, libpq-level named statements ``a`` and ``b`` of the same text: ``b``,
    prepared after the table was made again with a text column, gives the text row."""
    d = daemon(pgcorral)
    table = name("repro")
    query = f"SELECT * FROM {table}".encode()
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        pgconn = conn.pgconn
        conn.execute(f"CREATE TABLE {table} (x int)")
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert pgconn.prepare(b"a", query).status == psycopg.pq.ExecStatus.COMMAND_OK
        res = pgconn.exec_prepared(b"a", [])
        assert res.status == psycopg.pq.ExecStatus.TUPLES_OK and res.get_value(0, 0) == b"1"
        with conn.transaction():
            conn.execute(f"DROP TABLE {table}")
            conn.execute(f"CREATE TABLE {table} (x text)")
            conn.execute(f"INSERT INTO {table} VALUES ('row')")
            assert pgconn.prepare(b"b", query).status == psycopg.pq.ExecStatus.COMMAND_OK
            res = pgconn.exec_prepared(b"b", [])
            assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message
            assert res.get_value(0, 0) == b"row"
            assert res.ftype(0) == 25  # text
        # ``a`` was prepared before: PostgreSQL answers it 0A000 on the client's own
        # connection; outside a transaction pgcorral prepares it anew (libpq sends a Describe)
        res = pgconn.exec_prepared(b"a", [])
        assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message
        assert res.get_value(0, 0) == b"row"


def test_reproduction_two_psycopg_clients(pgcorral: DaemonFactory) -> None:
    """psycopg ``prepare=True``: a second client prepares the text the first one prepared
    before the change, inside the transaction that changed the table, on the same server
    connection (one connection only): it gets the new row."""
    d = pgcorral(tx_conf(1, max_prepared_statements="20"))
    table = name("repro")
    with psycopg.connect(d.dsn(), autocommit=True) as first, \
            psycopg.connect(d.dsn(), autocommit=True) as second:
        first.execute(f"CREATE TABLE {table} (x int)")
        first.execute(f"INSERT INTO {table} VALUES (1)")
        assert first.execute(f"SELECT * FROM {table}", prepare=True).fetchall() == [(1,)]
        with second.transaction():
            second.execute(f"DROP TABLE {table}")
            second.execute(f"CREATE TABLE {table} (x text)")
            second.execute(f"INSERT INTO {table} VALUES ('row')")
            assert second.execute(f"SELECT * FROM {table}",
                                  prepare=True).fetchall() == [("row",)]
        assert first.execute(f"SELECT * FROM {table}", prepare=True).fetchall() == [("row",)]


def test_reproduction_asyncpg(pgcorral: DaemonFactory) -> None:
    """asyncpg names every statement: ``conn.prepare`` of the same text in the transaction
    that made the table again gives the text row; the statement cache of ``fetch`` recovers
    from 0A000 by itself outside a transaction (pgcorral lets the error through: asyncpg sends
    no Describe, so new rows would be decoded with the old column type), and the statement
    prepared before the change fails with 0A000 every time, as on PostgreSQL, also where the
    server connection no longer has it."""
    d = pgcorral(tx_conf(1, max_prepared_statements="20"))
    table = name("repro")

    async def run() -> None:
        conn = await asyncpg.connect(host=d.host, port=d.port, user="trustuser",
                                     database=TEST_DB, timeout=20)
        try:
            await conn.execute(f"CREATE TABLE {table} (x int)")
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            first = await conn.prepare(f"SELECT * FROM {table}")
            assert await first.fetchval() == 1
            assert await conn.fetchval(f"SELECT * FROM {table}") == 1
            async with conn.transaction():
                await conn.execute(f"DROP TABLE {table}")
                await conn.execute(f"CREATE TABLE {table} (x text)")
                await conn.execute(f"INSERT INTO {table} VALUES ('row')")
                again = await conn.prepare(f"SELECT * FROM {table}")
                assert await again.fetchval() == "row"
            assert await conn.fetchval(f"SELECT * FROM {table}") == "row"
            for _ in range(2):
                with pytest.raises(asyncpg.exceptions.InvalidCachedStatementError):
                    await first.fetchval()
            assert await again.fetchval() == "row"
        finally:
            await conn.close(timeout=5)

    asyncio.run(run())


# --------------------------------------------------------------------------- migrations

MIGRATION_STEPS = [
    "ALTER TABLE {t} ALTER COLUMN v TYPE text",
    "ALTER TABLE {t} ALTER COLUMN v TYPE bigint USING v::bigint",
    "DROP TYPE {m}; CREATE TYPE {m} AS ENUM ('a', 'b')",
    "ALTER TABLE {t} ADD COLUMN w int",
    "ALTER TABLE {t} DROP COLUMN w",
    "DROP TYPE {m}; CREATE TYPE {m} AS ENUM ('a', 'b', 'c')",
    "ALTER TABLE {t} ALTER COLUMN v TYPE int USING v::int",
]


def _migration(pgcorral: DaemonFactory, pg: PgCluster, via_pgcorral: bool) -> None:
    """Eight psycopg clients (prepare_threshold 0: every statement named, libpq's Bind,
    Describe, Execute, Sync) and four asyncpg clients run prepared statements over two server
    connections while the schema changes under them, through pgcorral or directly on
    PostgreSQL. Outside a transaction, no client sees an error.

    The asyncpg clients' statements keep their result types (``id``, a cast to text): asyncpg
    sends Bind/Execute without a Describe and decodes rows by the description it cached, so a
    statement whose result type changed must reach it as 0A000 (asyncpg then prepares it
    again), which pgcorral gives only where the server connection still has the old
    statement; one prepared again on another connection after the change returns rows of the
    new type (docs/TRANSACTION.md, remaining gaps)."""
    d = daemon(pgcorral)
    table, mood = name("mig"), name("mood")
    with direct(pg) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
        conn.execute(f"INSERT INTO {table} SELECT g, g FROM generate_series(1, 10) g")
        conn.execute(f"CREATE TYPE {mood} AS ENUM ('a', 'b')")
    queries = [f"SELECT * FROM {table} WHERE id = %s", f"SELECT 'a'::{mood}, %s::int",
               f"SELECT v FROM {table} WHERE id = %s"]
    stable = [f"SELECT id FROM {table} WHERE id = $1::int",
              f"SELECT 'a'::{mood}::text, $1::int", f"SELECT count(v) FROM {table} WHERE id = $1"]
    done = asyncio.Event()
    runs = [0]

    async def psycopg_client() -> None:
        async with await psycopg.AsyncConnection.connect(
                d.dsn(), autocommit=True, prepare_threshold=0) as conn:
            i = 0
            while not done.is_set() or i < 2 * len(queries):
                i += 1
                q = queries[i % len(queries)]
                rows = await (await conn.execute(q, (i % 10 + 1,))).fetchall()
                assert len(rows) == 1, (q, rows)
                runs[0] += 1

    async def asyncpg_client() -> None:
        conn = await asyncpg.connect(host=d.host, port=d.port, user="trustuser",
                                     database=TEST_DB, timeout=20)
        try:
            i = 0
            while not done.is_set() or i < 2 * len(queries):
                i += 1
                assert len(await conn.fetch(stable[i % len(stable)], i % 10 + 1)) == 1
                runs[0] += 1
        finally:
            await conn.close(timeout=5)

    async def migrate() -> None:
        if via_pgcorral:
            conn = await psycopg.AsyncConnection.connect(d.dsn(), autocommit=True)
        else:
            conn = await psycopg.AsyncConnection.connect(pg.dsn(dbname=TEST_DB, user="trustuser"),
                                                         autocommit=True)
        try:
            for step in MIGRATION_STEPS:
                before = runs[0]
                deadline = asyncio.get_running_loop().time() + 20
                while runs[0] < before + 24:  # the clients use the schema before the change
                    assert asyncio.get_running_loop().time() < deadline, "clients stalled"
                    await asyncio.sleep(0.01)
                await conn.execute(step.format(t=table, m=mood))
        finally:
            await conn.close()
            done.set()

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(
            migrate(), *(psycopg_client() for _ in range(8)),
            *(asyncpg_client() for _ in range(4))), 90)

    asyncio.run(run())


def test_migration_through_pgcorral(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    _migration(pgcorral, pg, via_pgcorral=True)


def test_migration_bypassing_pgcorral(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    """The DDL runs on PostgreSQL directly: pgcorral sees no command tag, and repairs the
    statements when their Bind fails (0A000, XX000 cache lookup failed for type)."""
    _migration(pgcorral, pg, via_pgcorral=False)


# ------------------------------------------------------------------- inside a transaction

@pytest.mark.parametrize("change", [
    ("CREATE TABLE {t} (x int); INSERT INTO {t} VALUES (1)", "SELECT * FROM {t}",
     "ALTER TABLE {t} ALTER COLUMN x TYPE text", "0A000"),
    ("CREATE TYPE {t} AS ENUM ('a')", "SELECT 'a'::{t}",
     "DROP TYPE {t}; CREATE TYPE {t} AS ENUM ('a')", "XX000"),
])
def test_inside_a_transaction_the_error_is_postgresqls(pgcorral: DaemonFactory, pg: PgCluster,
                                                       change: tuple[str, str, str, str]) -> None:
    """A statement prepared before DDL that bypassed pgcorral, executed inside a transaction:
    the client gets the error PostgreSQL gives on its own connection (same SQLSTATE and
    message, the transaction aborted). After ROLLBACK the same statement works, on the same
    (only) server connection: the stale one was dropped from the mapping."""
    setup, query, ddl, state = change
    d = pgcorral(tx_conf(1, max_prepared_statements="20"))
    t = name("intx")
    with direct(pg) as ref:
        ref.execute(setup.format(t=t))
    sql = query.format(t=t)
    with psycopg.connect(d.dsn(), autocommit=True) as conn, direct(pg) as ref, \
            direct(pg) as other:
        assert len(conn.execute(sql, prepare=True).fetchall()) == 1
        assert len(ref.execute(sql, prepare=True).fetchall()) == 1
        # on PostgreSQL directly (psycopg forgets its own statements after its own DDL)
        other.execute(ddl.format(t=t))
        errors = []
        for c in (ref, conn):
            with pytest.raises(psycopg.Error) as info, c.transaction():
                c.execute(sql, prepare=True)
            diag = info.value.diag
            errors.append((diag.sqlstate, (diag.message_primary or "").split(" type ")[0]))
        assert errors[0] == errors[1]
        assert errors[0][0] == state
        for _ in range(3):
            assert len(conn.execute(sql, prepare=True).fetchall()) == 1
        with conn.transaction():
            assert len(conn.execute(sql, prepare=True).fetchall()) == 1


def test_bypass_outside_a_transaction_raw_batches(pgcorral: DaemonFactory,
                                                  pg: PgCluster) -> None:
    """Raw protocol, the same batches through pgcorral and on PostgreSQL directly, after DDL
    on PostgreSQL directly: Bind/Describe/Execute/Sync of a stale statement outside a
    transaction gets the row with the new column type through pgcorral (PostgreSQL: 0A000);
    a batch that had already run something (an INSERT before the stale Bind, one implicit
    transaction) gets the error on both, and the INSERT is rolled back on both."""
    d = pgcorral(tx_conf(1, max_prepared_statements="20"))
    t = name("raw")
    with direct(pg) as ref:
        ref.execute(f"CREATE TABLE {t} (x int)")
        ref.execute(f"INSERT INTO {t} VALUES (1)")
    select = f"SELECT * FROM {t}".encode()
    insert = f"INSERT INTO {t} VALUES (2)".encode()
    run_s = bind(b"s", 0) + describe(b"P", b"") + EXECUTE + SYNC
    with connected(d.host, d.port) as pooled, connected(pg.host, pg.port) as own, \
            direct(pg) as ref:
        for c in (pooled, own):
            assert c.run(parse(b"s", select) + SYNC) == [(b"1",), (b"Z", b"I")]
            assert [r[0] for r in c.run(run_s)] == [b"2", b"T", b"D", b"C", b"Z"]
        ref.execute(f"ALTER TABLE {t} ALTER COLUMN x TYPE text")
        assert own.run(run_s) == [(b"E", b"0A000"), (b"Z", b"I")]
        got = pooled.run(run_s)
        assert [r[0] for r in got] == [b"2", b"T", b"D", b"C", b"Z"], got
        assert got[1][1] == b"\0\x01"  # one column, of the new type:
        assert pooled.run(query(f"SELECT pg_typeof(x) FROM {t}".encode()))[1] == (
            b"D", b"\0\x01\0\0\0\x04text")
        ref.execute(f"ALTER TABLE {t} ALTER COLUMN x TYPE bigint USING x::bigint")
        batch = (parse(b"", insert) + bind(b"", 0) + EXECUTE + run_s)
        expected = [(b"1",), (b"2",), (b"C", b"INSERT 0 1\0"), (b"E", b"0A000"), (b"Z", b"I")]
        assert own.run(batch) == expected
        assert pooled.run(batch) == expected
        assert ref.execute(f"SELECT count(*) FROM {t}").fetchone() == (1,)


def test_a_parse_after_drop_table_goes_to_the_server(pgcorral: DaemonFactory,
                                                     pg: PgCluster) -> None:
    """A statement some server accepted before a DROP TABLE that went through pgcorral,
    parsed again under another name with no transaction open: PostgreSQL's 42P01 at the
    Parse, not a ParseComplete pgcorral made up (and the error at the Bind)."""
    d = daemon(pgcorral)
    t = name("gone")
    select = f"SELECT x FROM {t}".encode()
    with direct(pg) as ref:
        ref.execute(f"CREATE TABLE {t} (x int)")
    with connected(d.host, d.port) as pooled, connected(pg.host, pg.port) as own:
        for c in (own, pooled):
            assert c.run(parse(b"a", select) + SYNC) == [(b"1",), (b"Z", b"I")]
        own.run(query(f"DROP TABLE {t}".encode()))
        pooled.run(query(f"CREATE TABLE IF NOT EXISTS {t} (x int)".encode()))
        pooled.run(query(f"DROP TABLE {t}".encode()))
        batch = parse(b"b", select) + SYNC
        assert own.run(batch) == [(b"E", b"42P01"), (b"Z", b"I")]
        assert pooled.run(batch) == [(b"E", b"42P01"), (b"Z", b"I")]
