"""Session pooling with real clients against a real PostgreSQL 15: connect, reuse, reset,
parameters, limits, cancel."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import threading
import time
from typing import TYPE_CHECKING

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerr
from tests.pgwire import connect_error

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import DaemonFactory


USER = {"user": "trustuser", "database": "pgcorral_test"}


def _psql(dsn: str, sql: str) -> str:
    out = subprocess.run(["psql", "-X", "-At", "-d", dsn, "-c", sql], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_psql_over_tcp_and_unix_socket(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    assert _psql(d.dsn(), "select 40 + 2") == "42"
    assert _psql(d.dsn(host=d.socket_dir), "select current_user") == "trustuser"


def test_psycopg_over_tcp_and_unix_socket(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    for dsn in (d.dsn(), d.dsn(host=d.socket_dir)):
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select %s::int + 1", (41,)).fetchone() == (42,)
            # extended protocol with a named prepared statement
            for _ in range(6):
                row = conn.execute("select %s::text", ("x",), prepare=True).fetchone()
            assert row == ("x",)


def test_asyncpg_over_tcp_and_unix_socket(pgcorral: DaemonFactory) -> None:
    d = pgcorral()

    async def run() -> None:
        for host in (d.host, d.socket_dir):
            conn = await asyncpg.connect(host=host, port=d.port, user="trustuser",
                                         database="pgcorral_test")
            try:
                assert await conn.fetchval("select $1::int * 2", 21) == 42
                stmt = await conn.prepare("select generate_series(1, $1::int)")
                assert len(await stmt.fetch(100)) == 100
            finally:
                await conn.close()

    asyncio.run(run())


@pytest.mark.single_worker
def test_next_client_reuses_backend_without_previous_state(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"max_connections": "1"})
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()
        conn.execute("set work_mem = '7MB'")
        conn.execute("create temp table leftover(x int)")
        conn.execute("prepare leftover_stmt as select 1")
        conn.execute("select pg_advisory_lock(4242)")
        conn.execute("begin")
        conn.execute("insert into leftover values (1)")
        # the client leaves inside an open transaction
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        assert conn.execute("select pg_backend_pid()").fetchone() == pid
        assert conn.execute("show work_mem").fetchone() == ("4MB",)
        assert conn.execute("select to_regclass('pg_temp.leftover')").fetchone() == (None,)
        assert conn.execute("select count(*) from pg_prepared_statements").fetchone() == (0,)
        assert conn.execute(
            "select count(*) from pg_locks where locktype = 'advisory'").fetchone() == (0,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("select now() = statement_timestamp()").fetchone() is not None


def test_terminate_inside_transaction_rolls_back(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = pgcorral({"max_connections": "1"})
    pg.psql("create table if not exists rollback_check(x int)", dbname="pgcorral_test")
    pg.psql("grant all on rollback_check to public", dbname="pgcorral_test")
    with psycopg.connect(d.dsn()) as conn:
        conn.execute("insert into rollback_check values (1)")
        conn.close()  # Terminate while the transaction is open
    with psycopg.connect(d.dsn()) as conn:
        assert conn.execute("select count(*) from rollback_check").fetchone() == (0,)


def test_application_name_reaches_pg_stat_activity(pgcorral: DaemonFactory,
                                                   pg: PgCluster) -> None:
    d = pgcorral()
    with psycopg.connect(d.dsn(application_name="corral-app")) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert conn.info.parameter_status("application_name") == "corral-app"
        seen = pg.psql(f"select application_name from pg_stat_activity where pid = {pid}")
        assert seen.strip() == "corral-app"


@pytest.mark.single_worker
def test_startup_parameters_apply_and_do_not_leak(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"max_connections": "1"})
    options = "-c search_path=pg_catalog -c geqo=off -c TimeZone=Asia/Tokyo"
    with psycopg.connect(d.dsn(options=options)) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()
        assert conn.execute("show search_path").fetchone() == ("pg_catalog",)
        assert conn.execute("show geqo").fetchone() == ("off",)
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert conn.execute("show timezone").fetchone() == ("Asia/Tokyo",)
    with psycopg.connect(d.dsn()) as conn:
        assert conn.execute("select pg_backend_pid()").fetchone() == pid
        assert conn.execute("show geqo").fetchone() == ("on",)
        assert conn.info.parameter_status("TimeZone") != "Asia/Tokyo"
        assert conn.info.parameter_status("TimeZone") == conn.execute(
            "show timezone").fetchone()[0]  # type: ignore[index]


def test_parameter_status_values_are_the_servers(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with psycopg.connect(d.dsn() + " options='-c DateStyle=sql,dmy'") as conn:
        # PostgreSQL normalises the value; the client must see the server's spelling
        assert conn.info.parameter_status("DateStyle") == "SQL, DMY"
        assert conn.info.parameter_status("server_version", ) is not None


def test_bad_startup_setting_is_refused_like_postgresql(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"max_connections": "1"})
    with pytest.raises(psycopg.OperationalError, match="invalid value for parameter"):
        psycopg.connect(d.dsn(options="-c DateStyle=nonsense"))
    # the server connection stayed usable for the next client
    with psycopg.connect(d.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_full_pool_gives_53300_after_blocking_timeout(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"max_connections": "1", "blocking_timeout": "1"})
    with psycopg.connect(d.dsn()) as holder:
        holder.execute("select 1")
        started = time.monotonic()
        error = connect_error(d.host, d.port, USER)
        assert time.monotonic() - started >= 0.9
        assert error is not None and error["C"] == "53300"
        assert "trustuser" in error["M"] and "pgcorral_test" in error["M"]
    with psycopg.connect(d.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.single_worker
def test_waiter_gets_the_released_connection(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"max_connections": "1", "blocking_timeout": "20", "log_level": "debug"})
    holder = psycopg.connect(d.dsn())
    pid = holder.execute("select pg_backend_pid()").fetchone()
    got: list[object] = []

    def waiter() -> None:
        with psycopg.connect(d.dsn()) as conn:
            got.append(conn.execute("select pg_backend_pid()").fetchone())

    t = threading.Thread(target=waiter)
    t.start()
    d.wait_for_log("waits for a server connection")
    holder.close()
    t.join(10)
    assert got == [pid]


def test_limits_file_caps_a_user_and_routes_aliases(pgcorral: DaemonFactory) -> None:
    limits = "pgcorral_test=appdb trustuser 1\nall all all\n"
    d = pgcorral({"max_connections": "4", "blocking_timeout": "1"}, limits=limits)
    with psycopg.connect(d.dsn(dbname="appdb")) as conn:
        assert conn.execute("select current_database()").fetchone() == ("pgcorral_test",)
        error = connect_error(d.host, d.port, USER)
        assert error is not None and error["C"] == "53300"
        # another user is not limited by trustuser's rule
        with psycopg.connect(d.dsn(user="postgres")) as other:
            assert other.execute("select 1").fetchone() == (1,)


def test_cancel_reaches_the_running_query(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with psycopg.connect(d.dsn()) as conn:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(pgerr.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        assert time.monotonic() - started < 10
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)


def test_cancel_with_a_bogus_key_does_nothing(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with psycopg.connect(d.dsn()) as conn:
        pid = conn.info.backend_pid
        assert conn.execute("select pg_backend_pid()").fetchone() == (pid,)

        def bogus_cancel() -> None:
            with socket.create_connection((d.host, d.port)) as s:
                s.sendall(struct.pack("!iiii", 16, 80877102, pid, 12345))
                s.recv(1)

        timer = threading.Timer(0.3, bogus_cancel)
        timer.start()
        assert conn.execute("select pg_sleep(1.5), 7").fetchone() == ("", 7)
        timer.join()


def test_unknown_database_is_3d000(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    error = connect_error(d.host, d.port, {"user": "trustuser", "database": "no_such_db"})
    assert error is not None and error["C"] == "3D000"


def test_no_hba_entry_is_28000(pgcorral: DaemonFactory) -> None:
    d = pgcorral(hba="host pgcorral_test postgres all trust\n")
    error = connect_error(d.host, d.port, USER)
    assert error is not None and error["C"] == "28000"
    assert "no pgcorral_hba.conf entry" in error["M"]
    with pytest.raises(psycopg.OperationalError, match=r"no pgcorral_hba\.conf entry"):
        psycopg.connect(d.dsn(host=d.socket_dir, user="postgres"))


def test_hba_reject_is_28000(pgcorral: DaemonFactory) -> None:
    d = pgcorral(hba="host all trustuser all reject\nhost all all all trust\n")
    error = connect_error(d.host, d.port, USER)
    assert error is not None and error["C"] == "28000"
    with psycopg.connect(d.dsn(user="postgres")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_unreachable_server_is_08006(pgcorral: DaemonFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    d = pgcorral(servers=[("primary", "127.0.0.1", dead_port)])
    error = connect_error(d.host, d.port, USER)
    assert error is not None and error["C"] == "08006"


def test_server_over_unix_socket(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = pgcorral(servers=[("primary", pg.socket_dir, pg.port)])
    assert _psql(d.dsn(), "select 1") == "1"


def test_backend_killed_while_idle_is_not_handed_out(pgcorral: DaemonFactory,
                                                      pg: PgCluster) -> None:
    d = pgcorral({"max_connections": "1"})
    with psycopg.connect(d.dsn()) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    pg.psql(f"select pg_terminate_backend({pid})")
    deadline = time.monotonic() + 10
    while pg.psql(f"select count(*) from pg_stat_activity where pid = {pid}").strip() != "0":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with psycopg.connect(d.dsn()) as conn:
        assert conn.execute("select pg_backend_pid()").fetchone() != (pid,)


def test_backend_killed_mid_session_gives_client_an_error(pgcorral: DaemonFactory,
                                                           pg: PgCluster) -> None:
    d = pgcorral({"max_connections": "2"})
    conn = psycopg.connect(d.dsn(), autocommit=True)
    try:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        pg.psql(f"select pg_terminate_backend({pid})")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    finally:
        conn.close()  # not `with`: its exit would try a COMMIT on the broken connection
    with psycopg.connect(d.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.single_worker
def test_settings_follow_each_client_on_a_reused_connection(pgcorral: DaemonFactory) -> None:
    """Each client sees what a fresh connection with its own startup parameters would show,
    whatever the previous client of the same backend asked for."""
    d = pgcorral({"max_connections": "1"})

    def session(**params: str) -> tuple[object, ...]:
        with psycopg.connect(d.dsn(**params)) as conn:
            row = conn.execute(
                "select pg_backend_pid(), current_setting('application_name'),"
                " current_setting('DateStyle'), current_setting('TimeZone')").fetchone()
            assert row is not None
            assert conn.info.parameter_status("DateStyle") == row[2]
            assert conn.info.parameter_status("application_name") == row[1]
            return tuple(row)

    first = session(application_name="one", options="-c DateStyle=sql,dmy")
    second = session()
    third = session(options="-c DateStyle=dmy")
    fourth = session(application_name="one", options="-c DateStyle=sql,dmy")
    assert first[0] == second[0] == third[0] == fourth[0]  # one backend throughout
    assert first[1:3] == ("one", "SQL, DMY")
    assert second[1:3] == ("", "ISO, MDY")
    assert third[1:3] == ("", "ISO, DMY")  # relative to the default, not to the previous client
    assert fourth[1:3] == ("one", "SQL, DMY")
    assert first[3] == second[3] == third[3]


def _query_msg(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


@pytest.mark.single_worker
def test_terminate_in_the_same_chunk_as_a_query_keeps_the_backend(
        pgcorral: DaemonFactory) -> None:
    """Query and Terminate in one write: the query runs, the Terminate stays with pgcorral, and
    the backend serves the next client."""
    from tests.pgwire import read_message, startup_packet

    d = pgcorral({"max_connections": "1"})
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.sendall(startup_packet(USER))
        while (message := read_message(sock)) is not None and message[0] != b"Z":
            pass
        sock.sendall(_query_msg("select pg_backend_pid()") + b"X\0\0\0\x04")
        pid = None
        while (message := read_message(sock)) is not None:
            if message[0] == b"D":
                pid = int(message[1][6:].decode())
    assert pid is not None
    with psycopg.connect(d.dsn()) as conn:
        assert conn.info.backend_pid == pid


@pytest.mark.single_worker
def test_large_messages_split_across_chunks(pgcorral: DaemonFactory) -> None:
    """A 5 MB query and COPY data cross many reads; the stream stays in step."""
    d = pgcorral({"max_connections": "1"})
    big = "x" * 5_000_000
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        pid = conn.info.backend_pid
        assert conn.execute("select length(%s::text)", (big,)).fetchone() == (5_000_000,)
        conn.execute("create temp table t(x text)")
        with conn.cursor().copy("copy t from stdin") as copy:
            for _ in range(50):
                copy.write_row((big[:100_000],))
        assert conn.execute("select count(*) from t").fetchone() == (50,)
    with psycopg.connect(d.dsn()) as conn:
        assert conn.info.backend_pid == pid


@pytest.mark.single_worker
def test_refused_setting_does_not_cost_the_backend(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"max_connections": "1"})
    with psycopg.connect(d.dsn()) as conn:
        pid = conn.info.backend_pid
    with pytest.raises(psycopg.OperationalError, match="invalid value for parameter"):
        psycopg.connect(d.dsn(options="-c DateStyle=nonsense"))
    with psycopg.connect(d.dsn()) as conn:
        assert conn.info.backend_pid == pid


def test_blocking_timeout_zero_uses_max_retries(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"max_connections": "1", "blocking_timeout": "0", "max_retries": "4",
                  "connection_retry_delay": "100"})  # 4 x 100 ms
    with psycopg.connect(d.dsn()):
        started = time.monotonic()
        error = connect_error(d.host, d.port, USER)
        waited = time.monotonic() - started
    assert error is not None and error["C"] == "53300"
    assert 0.35 <= waited < 5
