"""Transaction pooling (``pipeline = transaction``) with real clients against a real
PostgreSQL 15.

A server connection is linked to a client only while a transaction (or one statement outside a
transaction) runs and goes back to the pool at ReadyForQuery 'I'. These tests check what a
client must not be able to tell apart from having its own connection: results, transaction
boundaries, protocol-level prepared statements, reported session parameters, COPY, abandoned
transactions and ``server_reset_query_always``. Cancel is in test_transaction_cancel.py.

Determinism: to make a client land on a chosen backend, ``Backends`` keeps max_connections = 2
server connections pinned by two holder clients that sit inside a transaction, and frees one at
a time: the next transaction of any other client can only run there.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import socket
import struct
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
from psycopg import pq
from tests.pgwire import error_fields, read_message, startup_packet

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import DaemonFactory

TEST_DB = "pgcorral_test"
USER = {"user": "trustuser", "database": TEST_DB}
SOCK_TIMEOUT = 20.0
R = TypeVar("R")


# --------------------------------------------------------------------------- helpers


def tx_conf(max_connections: int, **extra: str) -> dict[str, str]:
    """Main-section keys for a transaction-pooling daemon. blocking_timeout is short so that a
    daemon that pools per session fails these tests quickly instead of hanging them."""
    conf = {
        "pipeline": "transaction",
        "max_connections": str(max_connections),
        "blocking_timeout": "10",
    }
    conf.update(extra)
    return conf


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``cond`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}", pytrace=False)
        time.sleep(0.02)


def run_in_processes(fn: Callable[[int], object], n: int, timeout: float) -> None:
    """Run ``fn(0) .. fn(n - 1)`` in forked processes; fail if one fails or is still running
    after ``timeout`` seconds. For clients that call libpq's blocking functions through
    psycopg.pq, which keep the GIL: in threads, one client waiting for a server connection
    would stop the client that holds it from sending its next message."""
    ctx = multiprocessing.get_context("fork")

    def target(i: int) -> None:
        try:
            fn(i)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)

    procs = [ctx.Process(target=target, args=(i,), daemon=True) for i in range(n)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    failed = [i for i, p in enumerate(procs) if p.exitcode not in (0, None) and p not in alive]
    if alive:
        pytest.fail(f"{len(alive)} of {n} workers still running after {timeout:g} s",
                    pytrace=False)
    if failed:
        pytest.fail(f"workers {failed} failed (tracebacks above, on stderr)", pytrace=False)


def run_concurrently(fn: Callable[[int], R], n: int, timeout: float) -> list[R]:
    """Run ``fn(0) .. fn(n - 1)`` in daemon threads; re-raise the first failure; fail if any
    is still running after ``timeout`` seconds (daemon threads never block the interpreter)."""
    results: dict[int, R] = {}
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def target(i: int) -> None:
        try:
            value = fn(i)
        except BaseException as exc:
            with lock:
                errors.append((i, exc))
        else:
            with lock:
                results[i] = value

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        if errors:
            i, exc = errors[0]
            exc.add_note(f"(in worker {i}; {len(errors)} of {n} workers failed)")
            raise exc
    alive = sum(t.is_alive() for t in threads)
    if alive:
        pytest.fail(f"{alive} of {n} workers still running after {timeout:g} s", pytrace=False)
    return [results[i] for i in range(n)]


def one(cur: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    row = cur.fetchone()
    assert row is not None
    return tuple(row)


def new_table(pg: PgCluster, columns: str) -> str:
    """A fresh table in the test database that every role may use."""
    name = f"tx_{uuid.uuid4().hex[:10]}"
    pg.psql(f"CREATE TABLE {name} ({columns}); GRANT ALL ON {name} TO PUBLIC", dbname=TEST_DB)
    return name


def direct(pg: PgCluster) -> psycopg.Connection[Any]:
    """A superuser connection straight to PostgreSQL, for pg_stat_activity and checks."""
    return psycopg.connect(pg.dsn(dbname=TEST_DB), autocommit=True)


# -- libpq at the lowest level (psycopg.pq): exact protocol-level prepared statements, COPY


def pq_connect(dsn: str) -> pq.abc.PGconn:
    conn = pq.PGconn.connect(dsn.encode())
    assert conn.status == pq.ConnStatus.OK, conn.error_message
    return conn


def pq_ok(res: pq.abc.PGresult) -> pq.abc.PGresult:
    assert res.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK), (
        res.status, res.error_message)
    return res


def pq_sqlstate(res: pq.abc.PGresult) -> str | None:
    assert res.status == pq.ExecStatus.FATAL_ERROR, (res.status, "expected an error")
    code = res.error_field(pq.DiagnosticField.SQLSTATE)
    return None if code is None else code.decode()


def pq_row(res: pq.abc.PGresult) -> tuple[str | None, ...]:
    pq_ok(res)
    assert res.ntuples == 1, res.ntuples
    values = (res.get_value(0, c) for c in range(res.nfields))
    return tuple(None if v is None else bytes(v).decode() for v in values)


def pq_pid(conn: pq.abc.PGconn) -> int:
    return int(pq_row(conn.exec_(b"SELECT pg_backend_pid()"))[0] or 0)


# -- a raw protocol client: exact control over Terminate, abrupt closes and in-flight queries


def query_msg(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


@dataclass
class Reply:
    rows: list[tuple[str | None, ...]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None
    status: str = "?"

    def sqlstate(self) -> str | None:
        return None if self.error is None else self.error.get("C")


def _data_row(body: bytes) -> tuple[str | None, ...]:
    (count,) = struct.unpack_from("!h", body)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + length].decode())
            pos += length
    return tuple(values)


class RawClient:
    """Simple-protocol client on a plain socket; tracks ParameterStatus and BackendKeyData."""

    def __init__(self, host: str, port: int, params: dict[str, str]) -> None:
        self.sock = socket.create_connection((host, port), timeout=SOCK_TIMEOUT)
        self.params: dict[str, str] = {}
        self.key: tuple[int, int] | None = None
        self.sock.sendall(startup_packet(params))
        reply = self._until_ready()
        if reply.error is not None:
            self.sock.close()
            raise AssertionError(f"login failed: {reply.error}")

    def send_query(self, sql: str) -> None:
        self.sock.sendall(query_msg(sql))

    def query(self, sql: str) -> Reply:
        self.send_query(sql)
        return self._until_ready()

    def ok(self, sql: str, status: str) -> Reply:
        """Run ``sql``; it must succeed and leave the transaction status ``status``."""
        reply = self.query(sql)
        assert reply.error is None, (sql, reply.error)
        assert reply.status == status, (sql, reply.status, status)
        return reply

    def _until_ready(self) -> Reply:
        reply = Reply()
        while True:
            message = read_message(self.sock)
            if message is None:
                raise ConnectionError("pgcorral closed the connection")
            type_, body = message
            if type_ == b"D":
                reply.rows.append(_data_row(body))
            elif type_ == b"C":
                reply.tags.append(body.rstrip(b"\0").decode())
            elif type_ == b"E":
                reply.error = error_fields(body)
            elif type_ == b"S":
                name, value, _ = body.split(b"\0", 2)
                self.params[name.decode()] = value.decode()
            elif type_ == b"K":
                pid, secret = struct.unpack("!ii", body)
                self.key = (pid, secret)
            elif type_ == b"R":
                assert struct.unpack("!i", body[:4])[0] == 0, "unexpected password request"
            elif type_ == b"Z":
                reply.status = body.decode()
                return reply

    def abort(self, reset: bool = False) -> None:
        """Drop the connection without Terminate (FIN, or RST when ``reset``)."""
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        try:
            self.sock.sendall(b"X\0\0\0\x04")
        except OSError:
            pass
        self.sock.close()


# -- pinning server connections


class Holder:
    """A client that keeps one server connection linked by staying inside a transaction."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn)  # not autocommit: the first execute opens a transaction

    def hold(self) -> int:
        pid: int = one(self.conn.execute("SELECT pg_backend_pid()"))[0]
        return pid

    def release(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()


class Backends:
    """Two holders for a daemon with max_connections = 2: ``each(fn)`` runs ``fn`` once on
    each of the two server connections, while the other one is pinned by a holder."""

    def __init__(self, dsn: str) -> None:
        self.holders = [Holder(dsn), Holder(dsn)]

    def each(self, fn: Callable[[], int]) -> list[int]:
        """``fn`` does its work and returns the backend pid it saw; checked to be the free one.
        Returns the two backend pids."""
        h0, h1 = self.holders
        x, y = h0.hold(), h1.hold()
        assert x != y, "max_connections = 2 must give the two holders two backends"
        h0.release()
        assert fn() == x, "with one backend free, the transaction must run there"
        assert h0.hold() == x
        h1.release()
        assert fn() == y, "with one backend free, the transaction must run there"
        h0.release()
        return [x, y]

    def close(self) -> None:
        for h in self.holders:
            h.close()


# --------------------------------------------------------------------------- load


@pytest.mark.single_worker
def test_fifty_psycopg_clients_share_five_server_connections(pgcorral: DaemonFactory,
                                                             pg: PgCluster) -> None:
    """50 psycopg clients, all connected at once, over max_connections = 5: each runs 20
    transactions mixing automatic server-side prepare (prepare_threshold 5), prepare=True,
    pipeline mode, rollbacks and multi-row results. Every result is right, a transaction keeps
    one backend from BEGIN to COMMIT, committed rows are all there, and at most 5 backends
    (pg_backend_pid(), and pg_stat_activity sampled meanwhile) served the 50 clients."""
    clients, rounds = 50, 20
    table = new_table(pg, "client int, n int, note text")
    d = pgcorral(tx_conf(5))
    pids: set[int] = set()
    lock = threading.Lock()
    barrier = threading.Barrier(clients, timeout=40)
    done = threading.Event()
    most_backends = [0]

    def sample() -> None:
        with direct(pg) as conn:
            while not done.is_set():
                (count,) = one(conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'load-%'"))
                most_backends[0] = max(most_backends[0], count)
                done.wait(0.05)

    def client(i: int) -> int:
        try:
            conn = psycopg.connect(d.dsn(application_name=f"load-{i}"), connect_timeout=30)
        except BaseException:
            barrier.abort()
            raise
        committed = 0
        with conn:
            # All 50 connected at once: only possible if an idle client holds no server.
            barrier.wait()
            for n in range(rounds):
                seen: set[int] = set()
                kind = (i + n) % 4
                with conn.transaction():
                    # the same text every transaction: psycopg prepares it (named) after 5 runs
                    pid, doubled = one(conn.execute("SELECT pg_backend_pid(), %s::int * 2", (n,)))
                    assert doubled == 2 * n
                    seen.add(pid)
                    if kind == 0:
                        pid, text = one(conn.execute(
                            "SELECT pg_backend_pid(), %s::text || '/' || %s::text",
                            (f"c{i}", str(n)), prepare=True))
                        assert text == f"c{i}/{n}"
                        seen.add(pid)
                    elif kind == 1:
                        with conn.pipeline():
                            ins = conn.execute(
                                f"INSERT INTO {table} (client, n, note) VALUES (%s, %s, 'pipe')"
                                " RETURNING pg_backend_pid()", (i, n))
                            cnt = conn.execute(
                                f"SELECT count(*) FROM {table} WHERE client = %s", (i,))
                            inc = conn.execute("SELECT pg_backend_pid(), %s::int + 1", (n,),
                                               prepare=True)
                        seen.add(one(ins)[0])
                        assert one(cnt) == (committed + 1,)
                        pid, plus = one(inc)
                        assert plus == n + 1
                        seen.add(pid)
                    elif kind == 2:
                        conn.execute(f"INSERT INTO {table} (client, n, note) VALUES"
                                     " (%s, %s, 'rolled back')", (i, n))
                        pid, cnt = one(conn.execute(
                            f"SELECT pg_backend_pid(), count(*) FROM {table} WHERE client = %s",
                            (i,)))
                        assert cnt == committed + 1
                        seen.add(pid)
                        raise psycopg.Rollback()
                    else:
                        rows = conn.execute(
                            "SELECT g, pg_backend_pid() FROM generate_series(1, %s) g",
                            (n + 10,)).fetchall()
                        assert [r[0] for r in rows] == list(range(1, n + 11))
                        seen.update(r[1] for r in rows)
                if kind == 1:
                    committed += 1
                assert len(seen) == 1, f"one transaction ran on several backends: {seen}"
                with lock:
                    pids.update(seen)
            assert one(conn.execute(
                f"SELECT count(*), count(*) FILTER (WHERE note = 'rolled back')"
                f" FROM {table} WHERE client = %s", (i,))) == (committed, 0)
            conn.commit()
        return committed

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        committed = run_concurrently(client, clients, timeout=90)
    finally:
        done.set()
        sampler.join(10)
    assert sum(committed) == clients * rounds // 4
    with direct(pg) as conn:
        assert one(conn.execute(f"SELECT count(*) FROM {table}")) == (sum(committed),)
    assert 2 <= len(pids) <= 5, pids
    assert most_backends[0] <= 5


@pytest.mark.single_worker
def test_fifty_asyncpg_clients_with_named_statements(pgcorral: DaemonFactory,
                                                     pg: PgCluster) -> None:
    """asyncpg names every statement (``__asyncpg_stmt_N__``) and caches it per connection: 50
    connections over max_connections = 5 use cached statements, ``conn.prepare()``,
    ``executemany`` and ``async with conn.transaction()``. A few connections have a 2-entry
    cache, so asyncpg also closes evicted statements. Results are right, a transaction keeps
    its backend, and at most 5 backends served everything."""
    clients, rounds = 50, 20
    table = new_table(pg, "client int, n int, k int")
    d = pgcorral(tx_conf(5))

    async def work(i: int, conn: Any) -> set[int]:
        pids: set[int] = set()
        stmt = await conn.prepare("SELECT pg_backend_pid(), $1::int * 3")
        for n in range(rounds):
            assert await conn.fetchval("SELECT $1::int + 1", n) == n + 1
            row = await stmt.fetchrow(n)
            assert row[1] == 3 * n
            pids.add(int(row[0]))
            # four texts in turn: a 2-statement cache evicts and closes statements
            assert await conn.fetchval(f"SELECT $1::int + {n % 4}", n) == n + n % 4
            async with conn.transaction():
                first = int(await conn.fetchval("SELECT pg_backend_pid()"))
                await conn.executemany(
                    f"INSERT INTO {table} (client, n, k) VALUES ($1, $2, $3)",
                    [(i, n, k) for k in range(3)])
                count = await conn.fetchval(
                    f"SELECT count(*) FROM {table} WHERE client = $1", i)
                assert count == 3 * (n + 1)
                assert int(await conn.fetchval("SELECT pg_backend_pid()")) == first
                pids.add(first)
            rows = await conn.fetch("SELECT generate_series(1, $1::int)", 50)
            assert [r[0] for r in rows] == list(range(1, 51))
        return pids

    async def run() -> set[int]:
        connected = await asyncio.wait_for(asyncio.gather(
            *(asyncpg.connect(host=d.host, port=d.port, user="trustuser", database=TEST_DB,
                              timeout=30, statement_cache_size=2 if i % 10 == 0 else 100,
                              server_settings={"application_name": f"apg-{i}"})
              for i in range(clients)),
            return_exceptions=True), 60)
        conns = [c for c in connected if not isinstance(c, BaseException)]
        try:
            for c in connected:
                if isinstance(c, BaseException):
                    raise c
            results = await asyncio.wait_for(
                asyncio.gather(*(work(i, c) for i, c in enumerate(conns))), 90)
        finally:
            await asyncio.gather(*(c.close(timeout=5) for c in conns), return_exceptions=True)
        pids: set[int] = set()
        for r in results:
            pids |= r
        return pids

    pids = asyncio.run(run())
    assert 2 <= len(pids) <= 5, pids
    with direct(pg) as conn:
        assert one(conn.execute(f"SELECT count(*) FROM {table}")) == (clients * rounds * 3,)


@pytest.mark.parametrize("mode", ["prepared", "extended", "simple"])
def test_pgbench_in_transaction_mode(pgcorral: DaemonFactory, mode: str) -> None:
    """pgbench's TPC-B-like script, 20 clients over max_connections = 5, in each query mode
    (-M prepared names its statements per connection): no error, no aborted client, every
    transaction processed."""
    d = pgcorral(tx_conf(5))
    cmd = ["pgbench", "-h", d.host, "-p", str(d.port), "-U", "trustuser", "-n",
           "-c", "20", "-j", "4", "-t", "50", "-M", mode, TEST_DB]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "ERROR" not in text and "error" not in out.stderr.lower(), text
    assert "aborted" not in text, text
    assert "number of transactions actually processed: 1000/1000" in out.stdout, text
    assert "number of failed transactions: 0 " in out.stdout, text


# --------------------------------------------------------------------------- isolation


def test_transactions_never_mix_clients(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    """30 raw clients over max_connections = 5 loop BEGIN; SET LOCAL application_name; several
    probes of (pg_backend_pid(), txid_current(), application_name); then COMMIT, ROLLBACK, an
    error (the failed transaction must stay on its backend: 25P02), or an abrupt disconnect
    (FIN or RST, sometimes with a query in flight) and a reconnect. Between transactions
    clients change their session application_name with a plain SET.

    Within a transaction pid and txid never change and the setting is the client's own; at the
    start of every transaction the session application_name is the client's own (never another
    client's SET); no txid is ever seen by two transactions; the client's ParameterStatus view
    matches; nothing is left idle in transaction at the end."""
    clients, per_client = 30, 15
    seed = random.randrange(1 << 30)
    d = pgcorral(tx_conf(5))
    probe = "SELECT pg_backend_pid(), txid_current(), current_setting('application_name')"
    txids: dict[str, str] = {}
    pids: set[str] = set()
    aborts = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(seed + i)
        session = 0

        def connect() -> RawClient:
            c = RawClient(d.host, d.port, {**USER, "application_name": f"c{i}-s{session}"})
            assert c.params.get("application_name") == f"c{i}-s{session}"
            return c

        conn = connect()
        for n in range(per_client):
            expected = f"c{i}-s{session}"
            if rng.random() < 0.2:  # session-level SET, outside a transaction
                session += 1
                expected = f"c{i}-s{session}"
                conn.ok(f"SET application_name = '{expected}'", "I")
            assert conn.params.get("application_name") == expected
            conn.ok("BEGIN", "T")
            row = conn.ok(probe, "T").rows[0]
            pid, txid, app = row
            assert app == expected, (
                f"client {i} transaction {n} starts with application_name {app!r}, "
                f"its own is {expected!r} (seed {seed})")
            local = f"c{i}-t{n}"
            conn.ok(f"SET LOCAL application_name = '{local}'", "T")
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.3:
                    conn.ok("SELECT pg_sleep(0.002)", "T")
                assert conn.ok(probe, "T").rows[0] == (pid, txid, local), (
                    f"client {i} transaction {n} left its backend or transaction (seed {seed})")
            assert txid is not None and pid is not None
            with lock:
                assert txid not in txids, (
                    f"txid {txid} seen by {txids[txid]} and c{i}/t{n} (seed {seed})")
                txids[txid] = f"c{i}/t{n}"
                pids.add(pid)
            end = rng.random()
            if end < 0.1:  # an error keeps the failed transaction on its backend
                reply = conn.query("SELECT 1/0")
                assert (reply.sqlstate(), reply.status) == ("22012", "E")
                reply = conn.query("SELECT 1")
                assert (reply.sqlstate(), reply.status) == ("25P02", "E")
                conn.ok("ROLLBACK", "I")
            elif end < 0.25:
                conn.ok("ROLLBACK", "I")
            elif end < 0.37:
                if rng.random() < 0.5:
                    conn.send_query("SELECT pg_sleep(0.02)")  # still running when we vanish
                conn.abort(reset=rng.random() < 0.5)
                with lock:
                    aborts[0] += 1
                session += 1
                conn = connect()
                continue
            else:
                assert conn.ok("COMMIT", "I").tags == ["COMMIT"]
            # PostgreSQL reports the reverted value at the end of the transaction
            assert conn.params.get("application_name") == expected
        conn.close()

    run_concurrently(client, clients, timeout=60)
    # a backend abandoned mid-transaction may be closed rather than rolled back
    assert 1 <= len(pids) <= 5 + aborts[0], pids
    with direct(pg) as conn:
        wait_until(lambda: one(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            " AND state LIKE 'idle in transaction%%'", (TEST_DB,))) == (0,),
            "no backend left idle in transaction")


@pytest.mark.parametrize("how", ["fin", "rst", "query-in-flight", "terminate"])
def test_abandoned_transaction_never_reaches_the_next_client(pgcorral: DaemonFactory,
                                                             pg: PgCluster, how: str) -> None:
    """Client A: BEGIN; INSERT; then leaves without COMMIT (socket closed, reset, closed with a
    query still running, or a polite Terminate). With max_connections = 1, client B gets a
    backend that is not inside A's transaction (no xid assigned, now() is its own statement's
    time, A's row invisible), and A's row is never committed."""
    table = new_table(pg, "tag text")
    d = pgcorral(tx_conf(1))
    a = RawClient(d.host, d.port, USER)
    a.ok("BEGIN", "T")
    assert a.ok(f"INSERT INTO {table} VALUES ('abandoned')", "T").tags == ["INSERT 0 1"]
    if how == "query-in-flight":
        a.send_query("SELECT pg_sleep(0.5)")
    if how == "terminate":
        a.close()
    else:
        a.abort(reset=how == "rst")
    with psycopg.connect(d.dsn(), autocommit=True) as b:
        row = one(b.execute(
            f"SELECT txid_current_if_assigned(), now() = statement_timestamp(),"
            f" (SELECT count(*) FROM {table})"))
        assert row == (None, True, 0)
        assert b.info.transaction_status == pq.TransactionStatus.IDLE
    with direct(pg) as conn:
        wait_until(lambda: one(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            " AND state LIKE 'idle in transaction%%'", (TEST_DB,))) == (0,),
            "no backend left idle in transaction")
        assert one(conn.execute(f"SELECT count(*) FROM {table}")) == (0,)


# --------------------------------------------------------------------------- prepared statements


@pytest.mark.single_worker
def test_prepared_statements_follow_the_client_across_backends(pgcorral: DaemonFactory) -> None:
    """Protocol-level named statements (libpq PQprepare/PQexecPrepared/PQdescribePrepared) of
    two clients that use the same name for different statements, run alternately on both
    backends of a max_connections = 2 pool: each client always gets its own statement's
    result, on a backend where it never prepared it too (transparent re-prepare)."""
    d = pgcorral(tx_conf(2))
    p, q = pq_connect(d.dsn()), pq_connect(d.dsn())
    backends = Backends(d.dsn())
    try:
        pq_ok(p.prepare(b"s1", b"SELECT pg_backend_pid(), $1::int * 2"))
        pq_ok(q.prepare(b"s1", b"SELECT pg_backend_pid(), 'q:' || $1::text"))
        seen: list[int] = []
        for r in range(3):
            def run(r: int = r) -> int:
                pid, doubled = pq_row(p.exec_prepared(b"s1", [str(r).encode()]))
                assert doubled == str(2 * r)
                q_pid, text = pq_row(q.exec_prepared(b"s1", [f"x{r}".encode()]))
                assert (q_pid, text) == (pid, f"q:x{r}")
                desc = pq_ok(p.describe_prepared(b"s1"))
                assert (desc.nparams, desc.nfields) == (1, 2)
                desc = pq_ok(q.describe_prepared(b"s1"))
                assert (desc.nparams, desc.nfields) == (1, 2)
                return int(pid or 0)

            seen += backends.each(run)
        # the Parse went to one backend: on the other, the statement was prepared again
        assert len(set(seen)) == 2
    finally:
        backends.close()
        p.finish()
        q.finish()


@pytest.mark.single_worker
def test_deallocate_discard_and_close_act_per_client(pgcorral: DaemonFactory) -> None:
    """DEALLOCATE name, DEALLOCATE PREPARE name, DEALLOCATE ALL, DISCARD ALL and a protocol
    Close behave as on a private connection, on either backend: the statement is gone (26000
    "prepared statement does not exist"), the name can be prepared again (with new text, whose
    result is then returned), and another client's statement of the same name keeps working."""
    d = pgcorral(tx_conf(2))
    p, q = pq_connect(d.dsn()), pq_connect(d.dsn())
    backends = Backends(d.dsn())

    def gone(*names: bytes) -> Callable[[], int]:
        def check() -> int:
            for name in names:
                assert pq_sqlstate(p.exec_prepared(name, [b"1"])) == "26000", name
            # the other client's "s1" is untouched, wherever it runs
            assert pq_row(q.exec_prepared(b"s1", [b"7"]))[1] == "q:7"
            return pq_pid(p)
        return check

    def works(name: bytes, expected: str) -> Callable[[], int]:
        def check() -> int:
            pid, value = pq_row(p.exec_prepared(name, [b"5"]))
            assert value == expected, (name, value)
            return int(pid or 0)
        return check

    try:
        pq_ok(q.prepare(b"s1", b"SELECT pg_backend_pid(), 'q:' || $1::text"))
        pq_ok(p.prepare(b"s1", b"SELECT pg_backend_pid(), $1::int * 2"))
        backends.each(works(b"s1", "10"))

        res = pq_ok(p.exec_(b"DEALLOCATE s1"))
        assert res.command_status == b"DEALLOCATE"
        backends.each(gone(b"s1"))
        pq_ok(p.prepare(b"s1", b"SELECT pg_backend_pid(), 'again:' || $1::text"))
        backends.each(works(b"s1", "again:5"))

        pq_ok(p.prepare(b"s6", b"SELECT pg_backend_pid(), $1::int + 6"))
        pq_ok(p.exec_(b"DEALLOCATE PREPARE s6"))
        backends.each(gone(b"s6"))

        pq_ok(p.prepare(b"s2", b"SELECT pg_backend_pid(), $1::int + 2"))
        pq_ok(p.prepare(b"s3", b"SELECT pg_backend_pid(), $1::int + 3"))
        backends.each(works(b"s2", "7"))
        res = pq_ok(p.exec_(b"DEALLOCATE ALL"))
        assert res.command_status == b"DEALLOCATE ALL"
        backends.each(gone(b"s1", b"s2", b"s3"))
        pq_ok(p.prepare(b"s2", b"SELECT pg_backend_pid(), $1::int + 20"))
        backends.each(works(b"s2", "25"))

        pq_ok(p.prepare(b"s4", b"SELECT pg_backend_pid(), $1::int + 4"))
        backends.each(works(b"s4", "9"))
        res = pq_ok(p.exec_(b"DISCARD ALL"))
        assert res.command_status == b"DISCARD ALL"
        backends.each(gone(b"s2", b"s4"))
        pq_ok(p.prepare(b"s4", b"SELECT pg_backend_pid(), $1::int + 40"))
        backends.each(works(b"s4", "45"))

        pq_ok(p.prepare(b"s5", b"SELECT pg_backend_pid(), $1::int + 5"))
        backends.each(works(b"s5", "10"))
        pq_ok(p.close_prepared(b"s5"))
        backends.each(gone(b"s5"))
        pq_ok(p.prepare(b"s5", b"SELECT pg_backend_pid(), $1::int + 50"))
        backends.each(works(b"s5", "55"))
    finally:
        backends.close()
        p.finish()
        q.finish()


@pytest.mark.single_worker
def test_statements_evicted_from_a_small_server_cache_are_prepared_again(
        pgcorral: DaemonFactory) -> None:
    """max_prepared_statements = 2 per server connection and one client with 6 statements
    used in turn on both backends: evicted statements are prepared again, every result right."""
    d = pgcorral(tx_conf(2, max_prepared_statements="2"))
    p = pq_connect(d.dsn())
    backends = Backends(d.dsn())
    try:
        for k in range(6):
            pq_ok(p.prepare(f"e{k}".encode(), f"SELECT pg_backend_pid(), $1::int + {k}".encode()))

        def all_six() -> int:
            pids = set()
            for k in list(range(6)) + list(range(5, -1, -1)):
                pid, value = pq_row(p.exec_prepared(f"e{k}".encode(), [b"100"]))
                assert value == str(100 + k)
                pids.add(int(pid or 0))
            assert len(pids) == 1
            return pids.pop()

        for _ in range(2):
            backends.each(all_six)
    finally:
        backends.close()
        p.finish()


def test_unnamed_statements_work_with_prepared_statement_mapping_off(
        pgcorral: DaemonFactory) -> None:
    """max_prepared_statements = 0 turns the mapping off: clients that never name a statement
    (psycopg with prepare_threshold=None, also in pipeline mode) work over a shared pool."""
    d = pgcorral(tx_conf(2, max_prepared_statements="0"))

    def client(i: int) -> None:
        with psycopg.connect(d.dsn(), prepare_threshold=None) as conn:
            for n in range(20):
                with conn.transaction():
                    pid, value = one(conn.execute("SELECT pg_backend_pid(), %s::int * %s::int",
                                                  (i, n)))
                    assert value == i * n
                    with conn.pipeline():
                        a = conn.execute("SELECT pg_backend_pid(), %s::text", (f"c{i}",))
                        b = conn.execute("SELECT %s::int + 1", (n,))
                    assert one(a) == (pid, f"c{i}")
                    assert one(b) == (n + 1,)
                assert conn.execute("SELECT count(*) FROM pg_prepared_statements"
                                    " WHERE name LIKE '_pg3_%%'").fetchone() == (0,)
                conn.commit()

    run_concurrently(client, 8, timeout=60)


# --------------------------------------------------------------------------- session parameters


@pytest.mark.single_worker
def test_reported_settings_follow_each_client(pgcorral: DaemonFactory) -> None:
    """Client A starts with application_name, TimeZone and IntervalStyle and sets DateStyle
    with a plain SET; client B sets other values of all six reported parameters
    (application_name, DateStyle, TimeZone, IntervalStyle, client_encoding,
    standard_conforming_strings) on the one free backend right before A's transaction runs
    there. A always sees its own values (SHOW, formatted output, and its ParameterStatus view),
    on both backends; so does B; a later plain SET of A follows it too."""
    d = pgcorral(tx_conf(2))
    a = psycopg.connect(d.dsn(application_name="appA",
                              options="-c TimeZone=Asia/Tokyo -c IntervalStyle=postgres_verbose"),
                        autocommit=True)
    b = psycopg.connect(d.dsn(application_name="appB0"), autocommit=True)
    backends = Backends(d.dsn())
    names = ["application_name", "DateStyle", "TimeZone", "IntervalStyle", "client_encoding",
             "standard_conforming_strings"]
    show = "SELECT pg_backend_pid(), " + ", ".join(f"current_setting('{n}')" for n in names)
    want_a = {"application_name": "appA", "DateStyle": "German, DMY", "TimeZone": "Asia/Tokyo",
              "IntervalStyle": "postgres_verbose", "client_encoding": "UTF8",
              "standard_conforming_strings": "on"}
    want_b = {"application_name": "appB0", "DateStyle": "ISO, MDY",
              "IntervalStyle": "postgres", "client_encoding": "UTF8",
              "standard_conforming_strings": "on"}

    def check(conn: psycopg.Connection[Any], want: dict[str, str]) -> int:
        with conn.transaction():
            pid, *values = one(conn.execute(show))
            got = dict(zip(names, values, strict=True))
            assert {k: got[k] for k in want} == want
            assert {k: conn.info.parameter_status(k) for k in want} == want
            assert one(conn.execute("SELECT pg_backend_pid()"))[0] == pid
        return int(pid)

    try:
        a.execute("SET DateStyle = 'German'")
        check(a, want_a)
        b.execute("SET TimeZone = 'UTC'")
        want_b["TimeZone"] = "UTC"
        seen: list[int] = []
        for r in range(3):
            def round_(r: int = r) -> int:
                # B: its previous values survived whatever ran on this backend, then new ones
                check(b, want_b)
                new_b = {"application_name": f"appB{r + 1}", "DateStyle": "SQL, MDY",
                         "TimeZone": "America/New_York" if r % 2 else "UTC",
                         "IntervalStyle": "iso_8601", "client_encoding": "LATIN1",
                         "standard_conforming_strings": "off"}
                for name, value in new_b.items():
                    b.execute(f"SET {name} = '{value}'")
                want_b.update(new_b)
                pid = check(b, want_b)
                assert check(a, want_a) == pid, "A must run on the backend B just changed"
                row = one(a.execute(
                    "SELECT date '2024-03-01'::text, interval '1 day 2 hours'::text,"
                    " timestamptz '2024-01-01 00:00:00+00'::text, 'é'::text"))
                assert row[:2] == ("01.03.2024", "@ 1 day 2 hours")
                assert row[3] == "é"
                if want_a["TimeZone"] == "Asia/Tokyo":
                    assert row[2] == "01.01.2024 09:00:00 JST"
                if r == 1:  # a later plain SET of A follows A as well
                    a.execute("SET TimeZone = 'Europe/Helsinki'")
                    want_a["TimeZone"] = "Europe/Helsinki"
                    check(a, want_a)
                return pid

            seen += backends.each(round_)
        assert len(set(seen)) == 2
    finally:
        backends.close()
        a.close()
        b.close()


# --------------------------------------------------------------------------- COPY


def test_copy_in_and_out_from_concurrent_clients(pgcorral: DaemonFactory,
                                                  pg: PgCluster) -> None:
    """Six clients over max_connections = 3 each COPY rows in three ways: psycopg's
    cursor.copy() (simple protocol) inside a transaction, libpq's extended-protocol COPY FROM
    STDIN outside one (CopyDone then a second Sync for one ReadyForQuery), and psql's COPY FROM
    STDIN; a COPY aborted by the client (CopyFail) commits nothing and the connection goes on.
    COPY TO STDOUT (psycopg, extended libpq, psql) returns exactly the rows written."""
    table = new_table(pg, "client int, n int, payload text")
    d = pgcorral(tx_conf(3))
    per_way = 1500

    class Boom(Exception):
        pass

    def payload(i: int, n: int) -> str:
        return f"client {i} row {n} é"

    def client(i: int) -> None:
        expected = [(n, payload(i, n)) for n in range(2 * per_way + 300)]
        with psycopg.connect(d.dsn()) as conn:
            # 1. simple protocol, inside a transaction that keeps its backend
            with conn.transaction(), conn.cursor() as cur:
                pid = one(cur.execute("SELECT pg_backend_pid()"))[0]
                with cur.copy(f"COPY {table} (client, n, payload) FROM STDIN") as copy:
                    for n in range(per_way):
                        copy.write_row((i, n, payload(i, n)))
                assert cur.rowcount == per_way
                assert one(cur.execute("SELECT pg_backend_pid()"))[0] == pid
            # 2. the client aborts a COPY: CopyFail, nothing committed, connection usable
            conn.autocommit = True
            with pytest.raises(Boom), conn.cursor() as cur, cur.copy(
                    f"COPY {table} (client, n, payload) FROM STDIN") as copy:
                for _ in range(100):
                    copy.write_row((i, -1, "never"))
                raise Boom()
            assert one(conn.execute("SELECT 1")) == (1,)
        # 3. extended protocol through libpq, outside a transaction
        pgc = pq_connect(d.dsn())
        try:
            pgc.send_query_params(f"COPY {table} (client, n, payload) FROM STDIN".encode(), None)
            res = pgc.get_result()
            assert res is not None and res.status == pq.ExecStatus.COPY_IN
            lines = "".join(f"{i}\t{n}\t{payload(i, n)}\n"
                            for n in range(per_way, 2 * per_way))
            assert pgc.put_copy_data(lines.encode()) == 1
            assert pgc.put_copy_end() == 1
            res = pgc.get_result()
            assert res is not None
            assert pq_ok(res).command_status == f"COPY {per_way}".encode()
            assert pgc.get_result() is None
            assert pq_row(pgc.exec_(b"SELECT 42")) == ("42",)  # the stream is in step
        finally:
            pgc.finish()
        # 4. psql, simple protocol
        lines = "".join(f"{i}\t{n}\t{payload(i, n)}\n"
                        for n in range(2 * per_way, 2 * per_way + 300))
        out = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", d.dsn(),
             "-c", f"COPY {table} (client, n, payload) FROM STDIN"],
            input=lines, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr

        # COPY out three ways
        select = f"SELECT n, payload FROM {table} WHERE client = {i} ORDER BY n"
        with psycopg.connect(d.dsn()) as conn, conn.transaction(), conn.cursor() as cur, \
                cur.copy(f"COPY ({select}) TO STDOUT") as copy:
            got = [(int(n), text) for n, text in copy.rows()]
        assert got == expected
        pgc = pq_connect(d.dsn())
        try:
            pgc.send_query_params(f"COPY ({select}) TO STDOUT".encode(), None)
            res = pgc.get_result()
            assert res is not None and res.status == pq.ExecStatus.COPY_OUT
            chunks = []
            while True:
                nbytes, data = pgc.get_copy_data(0)
                if nbytes < 0:
                    break
                chunks.append(bytes(data))
            res = pgc.get_result()
            assert res is not None and pq_ok(res).command_status == f"COPY {len(expected)}".encode()
            assert pgc.get_result() is None
            assert b"".join(chunks).decode() == "".join(f"{n}\t{t}\n" for n, t in expected)
            assert pq_row(pgc.exec_(b"SELECT 43")) == ("43",)
        finally:
            pgc.finish()
        out = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", d.dsn(),
             "-c", f"COPY ({select}) TO STDOUT"],
            capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "".join(f"{n}\t{t}\n" for n, t in expected)

    run_in_processes(client, 6, timeout=90)
    with direct(pg) as conn:
        assert one(conn.execute(f"SELECT count(*) FROM {table} WHERE n < 0")) == (0,)


def test_large_copy_data_messages_stream_through(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    """CopyData messages of 1 MB (libpq sends each put_copy_data buffer as one message) pass
    through as their bytes arrive; a 1 MB CopyData sent outside COPY (PostgreSQL ignores it)
    does not let the connection go back to the pool in the middle of the message."""
    table = new_table(pg, "n int, payload text")
    d = pgcorral(tx_conf(1))
    row = "x" * 1000
    lines = "".join(f"{n}\t{row}\n" for n in range(1000)).encode()  # about 1 MB
    pgc = pq_connect(d.dsn())
    try:
        pgc.send_query_params(f"COPY {table} FROM STDIN".encode(), None)
        res = pgc.get_result()
        assert res is not None and res.status == pq.ExecStatus.COPY_IN
        for _ in range(3):
            assert pgc.put_copy_data(lines) == 1
        assert pgc.put_copy_end() == 1
        res = pgc.get_result()
        assert res is not None and pq_ok(res).command_status == b"COPY 3000"
        assert pgc.get_result() is None
    finally:
        pgc.finish()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": "trustuser", "database": TEST_DB}))
        def next_message() -> tuple[bytes, bytes]:
            message = read_message(sock)
            assert message is not None, "pgcorral closed the connection"
            return message

        while next_message()[0] != b"Z":
            pass
        big = b"d" + struct.pack("!I", len(lines) + 4) + lines
        sock.sendall(big[:1000])  # the server connection is linked for it...
        sock.sendall(big[1000:])  # ...until its last byte, then a query on the same stream
        sock.sendall(b"Q" + struct.pack("!I", 4 + 9) + b"SELECT 7\0")
        types = []
        while True:
            type_, body = next_message()
            types.append(type_)
            if type_ == b"D":
                assert body.endswith(b"7")
            if type_ == b"Z":
                break
        assert types == [b"T", b"D", b"C", b"Z"]
    with direct(pg) as conn:
        assert one(conn.execute(f"SELECT count(*) FROM {table}")) == (3000,)


# --------------------------------------------------------------------------- reset


@pytest.mark.single_worker
def test_server_reset_query_always_cleans_every_return(pgcorral: DaemonFactory) -> None:
    """server_reset_query_always = on, max_connections = 1: what client A leaves on the backend
    with session-level commands (SET work_mem, SQL PREPARE) is
    gone for client B's next transaction on the same backend, while A's own startup setting
    and its protocol-level prepared statements keep working across the resets."""
    d = pgcorral(tx_conf(1, server_reset_query_always="on"))
    a = psycopg.connect(d.dsn(application_name="resetA"), autocommit=True)
    b = psycopg.connect(d.dsn(), autocommit=True)
    try:
        a_pid = one(a.execute("SELECT pg_backend_pid()"))[0]
        a.execute("SET work_mem = '7MB'")
        a.execute("PREPARE leftover_stmt AS SELECT 1")
        # (a temp table or a session advisory lock would pin A to the only connection now:
        # tests/integration/test_session_state.py)
        pid, work_mem, temp, prepared, locks = one(b.execute(
            "SELECT pg_backend_pid(), current_setting('work_mem'),"
            " to_regclass('pg_temp.leftover'),"
            " (SELECT count(*) FROM pg_prepared_statements WHERE name = 'leftover_stmt'),"
            " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory')"))
        assert pid == a_pid, "max_connections = 1: B must run on A's backend"
        assert (work_mem, temp, prepared, locks) == ("4MB", None, 0, 0)
        for n in range(8):  # named after 5 runs by psycopg, then re-prepared after each reset
            assert one(a.execute("SELECT %s::int + 1, current_setting('application_name')",
                                 (n,), prepare=True)) == (n + 1, "resetA")
            assert one(b.execute("SELECT current_setting('application_name')")) == ("",)
    finally:
        a.close()
        b.close()
