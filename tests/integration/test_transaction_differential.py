"""Differential test of the transaction pipeline's statement mapping: random batches of
Parse/Bind/Describe/Execute/Close/Sync and simple queries (named and unnamed statements,
duplicate names, bad SQL, unknown names, DEALLOCATE, transactions) get the same answers
through pgcorral as from PostgreSQL itself: the same message types, SQLSTATEs, rows and
command tags. Between batches another client holds the connection the test client used last,
so its batches keep moving between the two server connections.

DDL (issue 14): the batches also drop and make again a table the statements read, and add and
drop a column they do not read, each side its own table (``dd`` through pgcorral, ``de`` on
PostgreSQL: the batches are the same but for that name). pgcorral bumps its schema epoch,
statements are prepared anew, stale ones fail with 42P01 or are repaired, with PostgreSQL's
answers. DDL that changes a statement's result type (0A000) or drops a type it uses (XX000) is
not here: outside a transaction pgcorral answers those with rows where PostgreSQL answers with
the error, by design; test_ddl_prepared.py covers them."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.integration.test_transaction import TEST_DB, tx_conf
from tests.pgwire import error_fields, read_message, startup_packet

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory

USER = "trustuser"
NAMES = [b"", b"a", b"b"]
QUERIES = [b"SELECT 1", b"SELECT $1::int + 1", b"SELECT nosuchcolumn", b"SELECT 'x'::text",
           b"SELECT 1/0", b"SELECT x FROM dd", b"SELECT x + $1::int FROM dd"]


def on_direct(data: bytes) -> bytes:
    """A batch for the direct connection: its own table (a name of the same length)."""
    return data.replace(b"dd", b"de")


DDL = [b"DROP TABLE IF EXISTS dd", b"CREATE TABLE IF NOT EXISTS dd (x int)",
       b"ALTER TABLE IF EXISTS dd ADD COLUMN IF NOT EXISTS y int",
       b"ALTER TABLE IF EXISTS dd DROP COLUMN IF EXISTS y",
       b"INSERT INTO dd VALUES (1)"]


def message(type_: bytes, body: bytes = b"") -> bytes:
    return type_ + struct.pack("!I", len(body) + 4) + body


def parse(name: bytes, query: bytes) -> bytes:
    return message(b"P", name + b"\0" + query + b"\0" + b"\0\0")


def bind(name: bytes, params: int) -> bytes:
    values = b"".join(struct.pack("!I", 1) + b"7" for _ in range(params))
    return message(b"B", b"\0" + name + b"\0" + b"\0\0" + struct.pack("!H", params) + values
                   + b"\0\0")


def describe(kind: bytes, name: bytes) -> bytes:
    return message(b"D", kind + name + b"\0")


def close(name: bytes) -> bytes:
    return message(b"C", b"S" + name + b"\0")


EXECUTE = message(b"E", b"\0\0\0\0\0")
SYNC = message(b"S")


def query(sql: bytes) -> bytes:
    return message(b"Q", sql + b"\0")


# The unnamed statement is only parsed: using it after its Sync is a documented caveat of
# transaction pooling (it lives on one backend), not something to compare.
USED = [b"a", b"b", b"zz"]
extended_step = st.one_of(
    st.builds(parse, st.sampled_from(NAMES), st.sampled_from(QUERIES)),
    st.builds(lambda n, p: bind(n, p) + EXECUTE, st.sampled_from(USED), st.integers(0, 1)),
    st.builds(describe, st.just(b"S"), st.sampled_from(USED)),
    st.just(describe(b"P", b"")),
    st.builds(close, st.sampled_from(USED)),
    st.just(message(b"H")),  # Flush
)
batch = st.one_of(
    st.lists(extended_step, min_size=1, max_size=5).map(lambda steps: b"".join(steps) + SYNC),
    st.sampled_from([b"DEALLOCATE a", b"DEALLOCATE ALL", b"BEGIN", b"COMMIT", b"ROLLBACK",
                     b"SELECT 2", b"SELECT 1/0", b"DISCARD ALL", b"DEALLOCATE zz",
                     *DDL]).map(query),
)


# Batches about the table of the DDL only: statements on ``dd`` prepared, run and prepared
# again while it is dropped, made again, and changed beside them.
DDL_QUERIES = [b"SELECT x FROM dd", b"SELECT x + $1::int FROM dd"]
ddl_parse = st.builds(parse, st.sampled_from(NAMES[1:]), st.sampled_from(DDL_QUERIES))
ddl_step = st.one_of(
    ddl_parse,
    st.builds(lambda n, p: bind(n, p) + EXECUTE, st.sampled_from(NAMES[1:]), st.integers(0, 1)),
    st.builds(describe, st.just(b"S"), st.sampled_from(NAMES[1:])),
    st.builds(close, st.sampled_from(NAMES[1:])),
)
ddl_batch = st.one_of(
    # a batch that starts with a Parse (with no transaction open, the one pgcorral may answer
    # without a server)
    st.tuples(ddl_parse, st.lists(ddl_step, max_size=3)).map(
        lambda t: t[0] + b"".join(t[1]) + SYNC),
    st.lists(ddl_step, min_size=1, max_size=4).map(lambda steps: b"".join(steps) + SYNC),
    st.sampled_from([*DDL, b"BEGIN", b"COMMIT", b"ROLLBACK", b"DEALLOCATE ALL"]).map(query),
)


class Conn:
    """A raw protocol connection: send a batch, read until its ReadyForQuery."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.sendall(startup_packet({"user": USER, "database": TEST_DB}))
        self.until_ready()

    def until_ready(self) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            got = read_message(self.sock)
            assert got is not None, "connection closed"
            out.append(got)
            if got[0] == b"Z":
                return out

    def run(self, data: bytes) -> list[tuple[bytes, ...]]:
        """The replies, reduced to what must be equal: types, SQLSTATEs, rows, tags."""
        self.sock.sendall(data)
        replies: list[tuple[bytes, ...]] = []
        for type_, body in self.until_ready():
            if type_ in (b"S", b"N", b"K"):
                continue  # ParameterStatus, notices: not compared
            if type_ == b"E":
                replies.append((type_, error_fields(body)["C"].encode()))
            elif type_ in (b"D", b"C", b"Z", b"T"):
                replies.append((type_, body if type_ != b"T" else body[:2]))
            else:
                replies.append((type_,))
        return replies

    def close(self) -> None:
        self.sock.sendall(message(b"X"))
        self.sock.close()


def same(got: list[tuple[bytes, ...]], expected: list[tuple[bytes, ...]]) -> bool:
    """Equal, except known differences (documented in protocol/rewrite.py), all where a Bind
    or Describe's statement must be prepared again on the connection and cannot be, so the
    client gets that error where PostgreSQL first reports something else of the same
    message: inside an aborted transaction 25P02 (PostgreSQL: a wrong parameter count,
    08P01, or another error); after its table was dropped 42P01 at once (PostgreSQL: 08P01,
    or a Describe's ParameterDescription before the 42P01)."""
    if got == expected:
        return True
    # a ParameterDescription PostgreSQL sent before the 42P01 of a Describe
    expected = [e for i, e in enumerate(expected)
                if not (e == (b"t",) and expected[i + 1:i + 2] == [(b"E", b"42P01")]
                        and (b"t",) not in got)]
    if len(got) != len(expected):
        return False
    for g, e in zip(got, expected, strict=True):
        if g == e:
            continue
        if g == (b"E", b"25P02") and e[0] == b"E" and expected[-1] == (b"Z", b"E"):
            continue
        if g == (b"E", b"42P01") and e == (b"E", b"08P01"):
            continue
        return False
    return True


@contextmanager
def connected(host: str, port: int) -> Iterator[Conn]:
    conn = Conn(host, port)
    try:
        yield conn
    finally:
        conn.close()


@pytest.mark.parametrize("capacity", ["1", "3"])
def test_statement_mapping_answers_as_postgresql_does(pgcorral: DaemonFactory, pg: PgCluster,
                                                      capacity: str) -> None:
    """max_prepared_statements 1 (every other statement evicted and prepared again) and 3."""
    _differential(pgcorral, pg, capacity, st.lists(batch, min_size=1, max_size=6), 50)


def test_statement_mapping_with_ddl_answers_as_postgresql_does(pgcorral: DaemonFactory,
                                                               pg: PgCluster) -> None:
    """Batches about a table that DDL drops, makes again and changes: a Parse after a DROP
    TABLE gets 42P01 from the server, as from PostgreSQL (a statement a server accepted
    before the change is not answered locally), a statement made stale gets PostgreSQL's
    error, and one on a table made again with the same columns works."""
    _differential(pgcorral, pg, "3", st.lists(ddl_batch, min_size=2, max_size=10), 80)


def _differential(pgcorral: DaemonFactory, pg: PgCluster, capacity: str,
                  batches_strategy: st.SearchStrategy[list[bytes]], examples: int) -> None:
    d: Daemon = pgcorral(tx_conf(2, max_prepared_statements=capacity))

    @settings(max_examples=examples, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(batches_strategy)
    def check(batches: list[bytes]) -> None:
        with connected(pg.host, pg.port) as direct, connected(d.host, d.port) as pooled, \
                connected(d.host, d.port) as hog:
            # the same table on both sides, whatever ran before
            reset = query(b"DROP TABLE IF EXISTS dd; CREATE TABLE dd (x int)")
            assert direct.run(on_direct(reset)) == pooled.run(reset)
            for data in batches:
                expected = direct.run(on_direct(data))
                got = pooled.run(data)
                assert same(got, expected), (data, got, expected)
                # the other client takes the connection the test client used last, for one
                # transaction: the next batch runs on the other server connection
                hog.run(query(b"BEGIN") + query(b"SELECT 1"))
                hog.run(query(b"COMMIT"))
            direct.run(query(b"ROLLBACK"))
            pooled.run(query(b"ROLLBACK"))

    check()

