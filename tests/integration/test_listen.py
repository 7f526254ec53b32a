"""LISTEN/NOTIFY in transaction pooling (net.notify, issue 14), real clients and PostgreSQL 15.

A client's LISTEN is answered by pgcorral: one listening connection per database/user and
worker (the "hub") LISTENs for everyone and fans the notifications out. Checked here: delivery
to psycopg and asyncpg listeners from pgcorral and direct senders, the sender's pid (virtual
for a client of the same worker, real otherwise), 50 listeners over 5 server connections in
order, UNLISTEN, DISCARD ALL and leaving, the hub killed and re-established, 10,000 channels,
and the per-client bounds. Every test holds with one and with two workers: a client's worker
is told by its virtual pid (each worker hands pids from a range of its own).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tests.integration.test_management import cli_json
from tests.integration.test_session_state import pinned_clients
from tests.pgwire import login, read_message

from pgcorral.protocol.listen import LISTEN, parse_listen, quote

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory

TEST_DB = "pgcorral_test"
VIRTUAL_BASE = 2**22  # net.cancels: worker i hands virtual pids from 2**22 + i * 2**21
VIRTUAL_SPAN = 2**21
HUB_QUERY = """select pid from pg_stat_activity where datname = 'pgcorral_test'
               and usename = 'trustuser' and query ~ '^(UN)?LISTEN "'"""


def tx_conf(max_connections: int = 5) -> dict[str, str]:
    return {"pipeline": "transaction", "max_connections": str(max_connections),
            "blocking_timeout": "20"}


def wait_until(cond: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}", pytrace=False)
        time.sleep(0.02)


def worker_of(virtual_pid: int) -> int:
    assert virtual_pid >= VIRTUAL_BASE, "not a virtual pid"
    return (virtual_pid - VIRTUAL_BASE) // VIRTUAL_SPAN


def expected_pid(listener: int, sender: int, sender_real: int) -> int:
    """The pid a notification must carry: the sender's virtual pid when it is a client of the
    listener's worker, else the real pid of the backend that sent it."""
    return sender if worker_of(listener) == worker_of(sender) else sender_real


@contextmanager
def connect(dsn: str, n: int = 1) -> Iterator[list[psycopg.Connection[Any]]]:
    conns: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(n):
            conns.append(psycopg.connect(dsn, autocommit=True))
        yield conns
    finally:
        for conn in conns:
            conn.close()


def notify(conn: psycopg.Connection[Any], channel: str, payload: str) -> int:
    """NOTIFY through ``conn``; the real pid of the backend that sent it."""
    row = conn.execute("select pg_backend_pid(), pg_notify(%s, %s)", (channel, payload)
                       ).fetchone()
    assert row is not None
    return int(row[0])


def received(conn: psycopg.Connection[Any], n: int, timeout: float = 10.0
             ) -> list[psycopg.Notify]:
    got = list(conn.notifies(timeout=timeout, stop_after=n))
    assert len(got) >= n, f"got {len(got)} notification(s) of {n}: {got}"
    return got


def nothing_for(conn: psycopg.Connection[Any], seconds: float) -> list[psycopg.Notify]:
    return list(conn.notifies(timeout=seconds))


def hub_pids(pg: PgCluster) -> list[int]:
    return [int(p) for p in pg.psql(HUB_QUERY).split()]


def direct_dsn(pg: PgCluster) -> str:
    return f"host={pg.host} port={pg.port} dbname={TEST_DB} user=trustuser"


def counters(d: Daemon) -> dict[str, int]:
    result: dict[str, int] = cli_json(d, "status")["counters"]
    return result


# --------------------------------------------------------------------------- the tests


def test_psycopg_listener_gets_pgcorral_and_direct_notifications(
        pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = pgcorral(tx_conf())
    with connect(d.dsn(), 2) as (listener, sender), \
            psycopg.connect(direct_dsn(pg), autocommit=True) as direct:
        listener.execute('LISTEN ch; LISTEN "Mixed Case"')
        real = notify(sender, "ch", "from pgcorral")
        (note,) = received(listener, 1)
        assert (note.channel, note.payload) == ("ch", "from pgcorral")
        assert note.pid == expected_pid(listener.info.backend_pid, sender.info.backend_pid,
                                        real)
        real = notify(direct, "Mixed Case", "direct")
        (note,) = received(listener, 1)
        assert (note.channel, note.payload, note.pid) == ("Mixed Case", "direct", real)
        assert note.pid == direct.info.backend_pid
        # the listener's session works as before between notifications
        assert listener.execute("select 41 + 1").fetchone() == (42,)
        assert counters(d)["notifications_delivered"] >= 2


@contextmanager
def same_worker(d: Daemon, listener: psycopg.Connection[Any],
                n: int = 1) -> Iterator[list[psycopg.Connection[Any]]]:
    """``n`` clients on the listener's worker: connections are opened until that many are
    (with one worker, the first ``n``); the others are closed at the end too."""
    mine = worker_of(listener.info.backend_pid)
    opened: list[psycopg.Connection[Any]] = []
    try:
        while len([c for c in opened if worker_of(c.info.backend_pid) == mine]) < n:
            assert len(opened) < 60 + n, "no client reached the listener's worker"
            opened.append(psycopg.connect(d.dsn(), autocommit=True))
        yield [c for c in opened if worker_of(c.info.backend_pid) == mine]
    finally:
        for conn in opened:
            conn.close()


def test_pid_of_a_sender_on_the_same_worker_is_virtual(pgcorral: DaemonFactory) -> None:
    d = pgcorral(tx_conf(), env={"PGCORRAL_LISTEN": "reuseport"})
    with connect(d.dsn()) as (listener,):
        listener.execute("LISTEN same")
        with same_worker(d, listener) as (sender,):
            for i in range(3):
                notify(sender, "same", str(i))
            notes = received(listener, 3)
            assert [n.payload for n in notes] == ["0", "1", "2"]
            assert {n.pid for n in notes} == {sender.info.backend_pid}


def test_a_notification_never_carries_another_clients_pid(pgcorral: DaemonFactory) -> None:
    """Eight senders take turns on one server connection: a backend handed from client to
    client cannot tell whose transaction a notification that arrives now came from, so it
    keeps the real pid; it never carries another client's virtual pid. Once a backend has
    served one client alone for a while (net.notify.SENDER_WINDOW_US), the pid is virtual."""
    d = pgcorral(tx_conf(1), env={"PGCORRAL_LISTEN": "reuseport"})
    with connect(d.dsn()) as (listener,), same_worker(d, listener, 8) as senders:
        listener.execute("LISTEN turns")

        def run(sender: psycopg.Connection[Any]) -> None:
            for _ in range(60):
                notify(sender, "turns", str(sender.info.backend_pid))

        threads = [threading.Thread(target=run, args=(s,)) for s in senders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        notes = received(listener, 480)
        wrong = [n for n in notes if n.pid >= VIRTUAL_BASE and n.pid != int(n.payload)]
        assert wrong == []
        # one client alone on the backend, after the window: its virtual pid
        time.sleep(0.15)  # longer than SENDER_WINDOW_US (the rule being tested is timed)
        sender = senders[0]
        for _ in range(3):
            notify(sender, "turns", "alone")
        assert {n.pid for n in received(listener, 3)} == {sender.info.backend_pid}


def test_asyncpg_add_listener_and_remove_listener(pgcorral: DaemonFactory) -> None:
    """asyncpg LISTENs with a prepared statement (Parse/Describe/Sync, Bind/Execute/Sync)."""
    d = pgcorral(tx_conf())

    async def main() -> None:
        listener = await asyncpg.connect(host=d.host, port=d.port, user="trustuser",
                                         database=TEST_DB)
        sender = await asyncpg.connect(host=d.host, port=d.port, user="trustuser",
                                       database=TEST_DB)
        try:
            got: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()

            def on_note(_conn: Any, pid: int, channel: str, payload: str) -> None:
                got.put_nowait((pid, channel, payload))

            await listener.add_listener("achan", on_note)
            await listener.add_listener("other", on_note)
            for i in range(5):
                real = await sender.fetchval("select pg_backend_pid() from pg_notify($1, $2)",
                                             "achan", f"n{i}")
                pid, channel, payload = await asyncio.wait_for(got.get(), 10)
                assert (channel, payload) == ("achan", f"n{i}")
                assert pid == expected_pid(listener.get_server_pid(),
                                           sender.get_server_pid(), real)
            await listener.remove_listener("achan", on_note)
            await sender.execute("NOTIFY achan, 'after'; NOTIFY other, 'marker'")
            pid, channel, payload = await asyncio.wait_for(got.get(), 10)
            assert (channel, payload) == ("other", "marker")  # not 'after': UNLISTENed
            assert await listener.fetchval("select 1") == 1
        finally:
            await listener.close()
            await sender.close()

    asyncio.run(main())


def test_extended_protocol_unnamed_listen(pgcorral: DaemonFactory) -> None:
    """psycopg with binary results sends Parse/Bind/Describe/Execute/Sync, unnamed."""
    d = pgcorral(tx_conf())
    with connect(d.dsn(), 2) as (listener, sender):
        cur = listener.cursor(binary=True)
        cur.execute("LISTEN ext")
        assert cur.statusmessage == "LISTEN"
        notify(sender, "ext", "x")
        (note,) = received(listener, 1)
        assert (note.channel, note.payload) == ("ext", "x")
        cur.execute("UNLISTEN ext")
        assert cur.statusmessage == "UNLISTEN"


def test_pipelined_requests_after_a_listen_keep_their_order(pgcorral: DaemonFactory) -> None:
    """LISTEN (the listening connection still to open), a SELECT and an UNLISTEN in one
    write: the answers come in order, each request after the one before it is answered."""
    d = pgcorral(tx_conf())

    def query(sql: str) -> bytes:
        return b"Q" + struct.pack("!I", len(sql) + 5) + sql.encode() + b"\0"

    with socket.create_connection((d.host, d.port), timeout=20) as sock:
        assert login(sock, {"user": "trustuser", "database": TEST_DB}) is None
        sock.sendall(query("LISTEN piped") + query("select 7") + query("UNLISTEN piped")
                     + query("listen a; listen B; unlisten a"))
        seen: list[tuple[bytes, bytes]] = []
        while len([m for m in seen if m[0] == b"Z"]) < 4:
            message = read_message(sock)
            assert message is not None
            if message[0] not in (b"T", b"A"):
                seen.append(message)
        assert seen == [(b"C", b"LISTEN\0"), (b"Z", b"I"),
                        (b"D", b"\0\x01\0\0\0\x017"), (b"C", b"SELECT 1\0"), (b"Z", b"I"),
                        (b"C", b"UNLISTEN\0"), (b"Z", b"I"),
                        (b"C", b"LISTEN\0"), (b"C", b"LISTEN\0"), (b"C", b"UNLISTEN\0"),
                        (b"Z", b"I")]


def test_fifty_listeners_over_five_server_connections(pgcorral: DaemonFactory,
                                                      pg: PgCluster) -> None:
    d = pgcorral(tx_conf(5))
    with connect(d.dsn(), 50) as listeners, connect(d.dsn()) as (sender,):
        for conn in listeners:
            conn.execute("LISTEN fan")
        for i in range(20):
            notify(sender, "fan", str(i))
        for conn in listeners:
            notes = received(conn, 20)
            assert [n.payload for n in notes] == [str(i) for i in range(20)]
            assert {n.channel for n in notes} == {"fan"}
        # the pool stayed within max_connections; the hubs (one per worker) are outside it
        hubs = hub_pids(pg)
        assert 1 <= len(hubs) <= int(os.environ.get("PGCORRAL_TEST_WORKERS", "1"))
        total = int(pg.psql("select count(*) from pg_stat_activity where datname = "
                            "'pgcorral_test' and usename = 'trustuser'"))
        assert total <= 5 + len(hubs)


def test_listener_in_a_transaction_gets_notifications_after_it(pgcorral: DaemonFactory
                                                              ) -> None:
    d = pgcorral(tx_conf())
    with connect(d.dsn(), 2) as (listener, sender):
        listener.execute("LISTEN later")
        listener.execute("BEGIN")
        listener.execute("select 1")  # linked to a server connection now
        before = counters(d)["notifications_delivered"]
        for i in range(3):
            notify(sender, "later", str(i))
        wait_until(lambda: counters(d)["notifications_delivered"] >= before + 3,
                   "the notifications to reach pgcorral")
        assert nothing_for(listener, 0.3) == []  # held: the listener is in a transaction
        listener.execute("COMMIT")
        notes = received(listener, 3)
        assert [n.payload for n in notes] == ["0", "1", "2"]


def test_a_pinned_listener_gets_its_notifications(pgcorral: DaemonFactory) -> None:
    """A listener the session-state ledger pins to a server connection (an advisory lock)
    stays linked between transactions: notifications reach it there at once, and during a
    transaction after it."""
    d = pgcorral(tx_conf())
    with connect(d.dsn(), 2) as (listener, sender):
        listener.execute("LISTEN pinned_chan")
        listener.execute("select pg_advisory_lock(4343)")
        assert pinned_clients(d) == ["advisory lock"]
        notify(sender, "pinned_chan", "idle")
        assert [n.payload for n in received(listener, 1)] == ["idle"]
        listener.execute("BEGIN")
        listener.execute("select 1")
        notify(sender, "pinned_chan", "in a transaction")
        listener.execute("COMMIT")
        assert [n.payload for n in received(listener, 1)] == ["in a transaction"]
        listener.execute("select pg_advisory_unlock(4343)")
        assert pinned_clients(d) == []
        notify(sender, "pinned_chan", "unpinned")
        assert [n.payload for n in received(listener, 1)] == ["unpinned"]


def test_unlisten_discard_all_and_leaving(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = pgcorral(tx_conf())
    with connect(d.dsn(), 3) as (a, b, sender):
        a.execute("LISTEN one; LISTEN two")
        b.execute("LISTEN one")
        a.execute("UNLISTEN one")
        notify(sender, "one", "1")
        notify(sender, "two", "2")
        assert [n.payload for n in received(b, 1)] == ["1"]
        assert [(n.channel, n.payload) for n in received(a, 1)] == [("two", "2")]
        assert nothing_for(a, 0.3) == []
        a.execute("DISCARD ALL")
        notify(sender, "one", "3")
        notify(sender, "two", "4")
        assert [n.payload for n in received(b, 1)] == ["3"]
        assert nothing_for(a, 0.3) == []  # b got "3" from the same hub: a would have "4"
        a.execute("LISTEN one; UNLISTEN *")
        assert wait_until(lambda: hub_pids(pg), "a hub")  # b still listens
        b.close()  # b leaves without UNLISTEN: the hub has nobody left and goes
        wait_until(lambda: not hub_pids(pg), "the hub to close")


def test_hub_killed_is_opened_again(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = pgcorral(tx_conf())
    with connect(d.dsn(), 2) as (listener, sender):
        listener.execute("LISTEN k1; LISTEN k2")
        (hub,) = wait_until(lambda: hub_pids(pg), "the hub")
        pg.psql(f"select pg_terminate_backend({hub})")
        d.wait_for_log("open again")
        assert "listening connection for trustuser@pgcorral_test" in d.log()
        new = wait_until(lambda: [p for p in hub_pids(pg) if p != hub], "a new hub")
        assert hub not in new
        seen = counters(d)
        assert seen["notify_reconnects"] == 1
        assert seen["notify_maybe_missed"] == 2  # two channels were listened on
        notify(sender, "k2", "again")
        (note,) = received(listener, 1)
        assert (note.channel, note.payload) == ("k2", "again")


def test_ten_thousand_channels_and_the_limit(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = pgcorral(tx_conf())
    n = 10_000
    with connect(d.dsn(), 2) as (listener, sender):
        listener.execute(";".join(f"LISTEN c{i}" for i in range(n)))
        for i in (0, 4999, n - 1):
            notify(sender, f"c{i}", str(i))
        assert [x.payload for x in received(listener, 3)] == ["0", "4999", str(n - 1)]
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="too many LISTEN"):
            listener.execute("LISTEN one_too_many")
        listener.execute("LISTEN c1")  # already listening: no more channels
        (hub,) = hub_pids(pg)
        listened = pg.psql("select count(*) from pg_listening_channels()")  # (its own: 0)
        assert listened.strip() == "0"
        listener.execute("UNLISTEN *")
        wait_until(lambda: hub not in hub_pids(pg), "the hub to close")


def test_a_client_that_does_not_take_its_notifications_is_closed(pgcorral: DaemonFactory
                                                                 ) -> None:
    d = pgcorral(tx_conf())
    with connect(d.dsn(), 2) as (listener, sender):
        listener.execute("LISTEN flood")
        listener.execute("BEGIN")
        listener.execute("select 1")  # in a transaction: notifications are held for it
        sender.execute("select pg_notify('flood', g::text) from generate_series(1, 10001) g")
        d.wait_for_log("does not take its notifications")
        with pytest.raises(psycopg.OperationalError):
            listener.execute("select 1")


def test_pass_through_user_without_credentials_gets_08004(pgcorral: DaemonFactory) -> None:
    d = pgcorral(tx_conf())
    with psycopg.connect(d.dsn(user="md5user", password="md5pass"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.OperationalError) as info:
            conn.execute("LISTEN nope")
        assert info.value.sqlstate == "08004"
        assert "cannot open a new server connection" in str(info.value)
        assert conn.execute("select 1").fetchone() == (1,)  # the session goes on


# --------------------------------------------------------------------------- the parser


_WORDS = ["listen", "unlisten", "LISTEN", "UnListen", "select", "user", "notify", "a", "B",
          "_x1", "x$y", "verbose", "listen_", "c" * 70, "*", ";", ";;", ",", "(", "-"]
_NAMES = st.one_of(
    st.sampled_from(_WORDS),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=70).map(quote))
_STATEMENT = st.tuples(
    st.sampled_from(["LISTEN", "unlisten", "Listen", "UNLISTEN"]),
    st.sampled_from([" ", "\n", "/**/", "  -- c\n"]), _NAMES,
    st.sampled_from([";", " ;", "--c\n;", ""])).map("".join)
_NOISE = st.sampled_from([" ", "\n", "\t", "/* c */", "/* a /* b */ */", "-- x\n", "U&", '""',
                          "*", ";", "select", "a", "'x'", "/*"])
_PIECES = st.one_of(_STATEMENT, _STATEMENT, _STATEMENT, _NOISE)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES, min_size=1, max_size=6).map("".join))
def test_parser_agrees_with_postgresql(pg: PgCluster, text: str) -> None:
    """Whatever ``protocol.listen`` answers itself, PostgreSQL accepts, with the same
    channels listened on afterwards (checked on a direct connection)."""
    ops = parse_listen(text.encode() + b"\0")
    event("answered by pgcorral" if ops is not None else "goes to PostgreSQL")
    if ops is None:
        return  # goes to PostgreSQL, which decides
    with psycopg.connect(direct_dsn(pg), autocommit=True) as conn:
        conn.execute("UNLISTEN *")
        conn.execute(text.encode())  # raises if PostgreSQL refuses what pgcorral accepted
        channels: set[str] = set()
        for op, channel in ops:
            if op == LISTEN:
                assert channel is not None
                channels.add(channel)
            elif channel is None:
                channels.clear()
            else:
                channels.discard(channel)
        rows = conn.execute("select pg_listening_channels()").fetchall()
        assert {r[0] for r in rows} == channels
