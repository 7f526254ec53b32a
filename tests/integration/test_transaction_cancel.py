"""Cancel under transaction pooling (``pipeline = transaction``), with real clients against a
real PostgreSQL 15.

The BackendKeyData a client sees carries a pooler-issued pid, not a backend's. A CancelRequest
with a client's key reaches the backend running that client's current query, never another
client's query, and does nothing while the client is between transactions (even though the
backend it used last may be running someone else's query by then).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
from psycopg import errors as pgerr
from psycopg import pq
from tests.pgwire import error_fields, read_message, startup_packet

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory

TEST_DB = "pgcorral_test"
USER = {"user": "trustuser", "database": TEST_DB}
CANCEL_CODE = 80877102


def tx_conf(max_connections: int) -> dict[str, str]:
    return {"pipeline": "transaction", "max_connections": str(max_connections),
            "blocking_timeout": "10"}


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}", pytrace=False)
        time.sleep(0.02)


def one(cur: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    row = cur.fetchone()
    assert row is not None
    return tuple(row)


class Background:
    """Run ``fn`` in a daemon thread; ``result()`` returns its value or raises its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:
            self._error = exc
        self.finished_at = time.monotonic()

    def result(self, timeout: float = 30.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still running after {timeout:g} s"
        if self._error is not None:
            raise self._error
        return self._value


def sleeping(pg_conn: psycopg.Connection[Any], count: int) -> Callable[[], bool]:
    """True once ``count`` backends are running a pg_sleep query."""
    def check() -> bool:
        (n,) = one(pg_conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state = 'active'"
            " AND query ILIKE 'select pg_sleep%%'", (TEST_DB,)))
        return bool(n == count)
    return check


def send_cancel(d: Daemon, pid: int, secret: int) -> None:
    """A raw CancelRequest; returns once pgcorral has closed the connection."""
    with socket.create_connection((d.host, d.port), timeout=10) as s:
        s.sendall(struct.pack("!iiii", 16, CANCEL_CODE, pid, secret))
        assert s.recv(1) == b""


class RawClient:
    """Just enough of a simple-protocol client to know its BackendKeyData secret."""

    def __init__(self, d: Daemon) -> None:
        self.sock = socket.create_connection((d.host, d.port), timeout=30)
        self.sock.sendall(startup_packet(USER))
        self.key: tuple[int, int] | None = None
        self.wait_ready()
        assert self.key is not None

    def send_query(self, sql: str) -> None:
        body = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", len(body) + 4) + body)

    def wait_ready(self) -> tuple[list[bytes], dict[str, str] | None, bytes]:
        """(first column of each DataRow, error fields or None, transaction status)."""
        rows: list[bytes] = []
        error = None
        while True:
            message = read_message(self.sock)
            assert message is not None, "pgcorral closed the connection"
            type_, body = message
            if type_ == b"K":
                pid, secret = struct.unpack("!ii", body)
                self.key = (pid, secret)
            elif type_ == b"D":
                (length,) = struct.unpack_from("!i", body, 2)
                rows.append(body[6:6 + length])
            elif type_ == b"E":
                error = error_fields(body)
            elif type_ == b"Z":
                return rows, error, body

    def close(self) -> None:
        self.sock.sendall(b"X\0\0\0\x04")
        self.sock.close()


@pytest.mark.single_worker
def test_backend_key_data_carries_a_pooler_issued_pid(pgcorral: DaemonFactory,
                                                      pg: PgCluster) -> None:
    """In transaction mode the pid in BackendKeyData is the pooler's: it is not the pid of the
    backend running the client's queries, not any backend's in pg_stat_activity, and it differs
    from client to client even when they share one backend."""
    d = pgcorral(tx_conf(1))
    conns = [psycopg.connect(d.dsn(), autocommit=True) for _ in range(4)]
    try:
        keys = [c.info.backend_pid for c in conns]
        real = {one(c.execute("SELECT pg_backend_pid()"))[0] for c in conns}
        assert len(real) == 1, "max_connections = 1: one backend serves all four"
        assert len(set(keys)) == 4, keys
        assert not set(keys) & real
        with psycopg.connect(pg.dsn(dbname=TEST_DB), autocommit=True) as direct:
            assert one(direct.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (keys,))) == (0,)
    finally:
        for c in conns:
            c.close()


def test_cancel_stops_only_the_cancelled_clients_query(pgcorral: DaemonFactory,
                                                        pg: PgCluster) -> None:
    """Four clients run pg_sleep at once on four backends; the one whose key is used (inside an
    explicit transaction) gets 57014 at once and can roll back and go on; the other three
    complete normally."""
    d = pgcorral(tx_conf(5))
    victim = psycopg.connect(d.dsn())  # not autocommit: the sleep runs inside a transaction
    others = [psycopg.connect(d.dsn(), autocommit=True) for _ in range(3)]
    try:
        with psycopg.connect(pg.dsn(dbname=TEST_DB), autocommit=True) as direct:
            assert direct.execute("SELECT 1").fetchone() == (1,)
            victim.execute("SELECT pg_backend_pid()")
            started = time.monotonic()
            cancelled = Background(lambda: victim.execute("SELECT pg_sleep(30)"))

            def sleep_two(c: psycopg.Connection[Any], i: int) -> Callable[[], Any]:
                return lambda: one(c.execute("SELECT pg_sleep(2), %s::int", (i,)))

            runs = [Background(sleep_two(c, i)) for i, c in enumerate(others)]
            wait_until(sleeping(direct, 4), "four clients sleeping")
            victim.cancel()
            with pytest.raises(pgerr.QueryCanceled):
                cancelled.result()
            assert cancelled.finished_at - started < 10
            assert [r.result() for r in runs] == [("", i) for i in range(3)]
        assert victim.info.transaction_status == pq.TransactionStatus.INERROR
        victim.rollback()
        with victim.transaction():
            assert one(victim.execute("SELECT 7")) == (7,)
    finally:
        victim.close()
        for c in others:
            c.close()


@pytest.mark.single_worker
def test_cancel_between_transactions_does_nothing(pgcorral: DaemonFactory,
                                                  pg: PgCluster) -> None:
    """max_connections = 1: client X ran its queries on the only backend and is now idle;
    client Y's pg_sleep runs there. X's cancel key (while X is connected, and again after X
    left), and Y's pooler pid with a wrong secret, all leave Y's query alone. Control: X's key
    does cancel X's own running query."""
    d = pgcorral(tx_conf(1))
    x = RawClient(d)
    y = psycopg.connect(d.dsn(), autocommit=True)
    key = x.key
    assert key is not None
    try:
        with psycopg.connect(pg.dsn(dbname=TEST_DB), autocommit=True) as direct:
            # control: the raw cancel path works for X's own query
            x.send_query("SELECT pg_sleep(30)")
            wait_until(sleeping(direct, 1), "X sleeping")
            send_cancel(d, *key)
            _, error, status = x.wait_ready()
            assert error is not None and error["C"] == "57014"
            assert status == b"I"
            x.send_query("SELECT pg_backend_pid()")
            rows, error, _ = x.wait_ready()
            assert error is None
            backend = int(rows[0])

            def y_sleeps_while(cancel: Callable[[], None]) -> None:
                run = Background(lambda: one(y.execute(
                    "SELECT pg_sleep(1.5), pg_backend_pid()")))
                wait_until(sleeping(direct, 1), "Y sleeping")
                cancel()
                assert run.result() == ("", backend), "Y's query must complete on X's backend"

            y_sleeps_while(lambda: send_cancel(d, *x.key))  # type: ignore[misc]
            y_sleeps_while(lambda: send_cancel(d, y.info.backend_pid, 12345))
            x.close()
            y_sleeps_while(lambda: send_cancel(d, *x.key))  # type: ignore[misc]
    finally:
        y.close()


def test_asyncpg_timeout_cancels_only_its_own_query(pgcorral: DaemonFactory) -> None:
    """asyncpg's ``timeout=`` sends a CancelRequest with its key: its query stops and the
    connection goes on, while two other clients' concurrent queries complete."""
    d = pgcorral(tx_conf(3))

    async def run() -> None:
        conns = [await asyncpg.connect(host=d.host, port=d.port, user="trustuser",
                                       database=TEST_DB, timeout=30) for _ in range(3)]
        victim, others = conns[0], conns[1:]
        try:
            async def cancelled() -> None:
                started = time.monotonic()
                with pytest.raises(asyncio.TimeoutError):
                    await victim.fetchval("SELECT pg_sleep(30)", timeout=0.5)
                assert time.monotonic() - started < 10

            results = await asyncio.wait_for(asyncio.gather(
                cancelled(),
                *(c.fetchval("SELECT $1::int FROM pg_sleep(2)", i)
                  for i, c in enumerate(others))), 30)
            assert results[1:] == [0, 1]
            assert await victim.fetchval("SELECT 1") == 1
        finally:
            for c in conns:
                await c.close(timeout=5)

    asyncio.run(run())
