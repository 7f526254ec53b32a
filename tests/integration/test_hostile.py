"""Hostile and malformed client input (reliability.md section 3): the daemon must close cleanly
or answer with an ErrorResponse, never hang or crash, and keep serving healthy clients.

Every test ends with ``assert_healthy``: a fresh psycopg client runs SELECT 1 through the same
daemon, and the daemon process is still alive. A Traceback in the daemon log fails the test
(conftest). Every test runs twice: session pooling and transaction pooling."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from tests.pgwire import connect_error, error_fields, read_message, startup_packet

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory

USER = {"user": "trustuser", "database": "pgcorral_test"}
SOCK_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)
CANCEL_CODE = 80877102

Message = tuple[bytes, bytes]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(params=["session", "transaction"])
def pgcorral(pgcorral: DaemonFactory, request: pytest.FixtureRequest) -> DaemonFactory:
    """The conftest factory with ``pipeline`` set: every hostile input meets both pipelines."""

    def start(conf_extra: dict[str, str] | None = None, **kwargs: Any) -> Daemon:
        return pgcorral({"pipeline": request.param, **(conf_extra or {})}, **kwargs)

    return start  # type: ignore[return-value]


@contextmanager
def raw(d: Daemon, timeout: float = SOCK_TIMEOUT) -> Iterator[socket.socket]:
    sock = socket.create_connection((d.host, d.port), timeout=timeout)
    sock.settimeout(timeout)
    try:
        yield sock
    finally:
        sock.close()


def send(sock: socket.socket, data: bytes) -> None:
    """sendall, tolerating a peer that already hung up on us."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def read_until_close(sock: socket.socket, timeout: float = CLOSE_TIMEOUT) -> bytes:
    """Everything the peer sends until it closes (EOF or RST). Fails if it stays open."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"connection still open after {timeout:g} s (received {data[:200]!r})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            continue
        if not chunk:
            return data
        data += chunk


def split_messages(data: bytes) -> list[Message]:
    """Typed messages in ``data``; fails on a trailing partial message."""
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 5, f"truncated message header in {data!r}"
        (length,) = struct.unpack_from("!i", data, pos + 1)
        assert length >= 4 and pos + 1 + length <= len(data), f"truncated message in {data!r}"
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def assert_clean_close(data: bytes) -> None:
    """A silent close, or ErrorResponse(s) then close: never a login or other chatter."""
    for type_, body in split_messages(data):
        assert type_ == b"E", f"unexpected {type_!r} message before close: {body!r}"
        assert "C" in error_fields(body)


def read_until_ready(sock: socket.socket) -> list[Message]:
    """Messages up to and including ReadyForQuery; fails on an error or a close."""
    out: list[Message] = []
    while True:
        message = read_message(sock)
        assert message is not None, f"closed before ReadyForQuery; got {out!r}"
        out.append(message)
        type_, body = message
        assert type_ != b"E", f"ErrorResponse: {error_fields(body)}"
        if type_ == b"R":
            assert struct.unpack("!i", body[:4])[0] == 0, "the server asked for a password"
        if type_ == b"Z":
            return out


def login(d: Daemon, timeout: float = SOCK_TIMEOUT) -> socket.socket:
    """A raw socket past ReadyForQuery, as trustuser."""
    sock = socket.create_connection((d.host, d.port), timeout=timeout)
    sock.settimeout(timeout)
    try:
        sock.sendall(startup_packet(USER))
        read_until_ready(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def query(text: str) -> bytes:
    body = text.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


def assert_healthy(d: Daemon) -> None:
    """A well-behaved client still gets served, quickly, and the daemon is alive."""
    assert d.running(), f"pgcorral died; log:\n{d.log()}"
    with psycopg.connect(d.dsn(), connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert d.running(), f"pgcorral died; log:\n{d.log()}"


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------- before the startup packet


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(struct.pack("!i", 0) + b"\0" * 8, id="length-0"),
        pytest.param(struct.pack("!i", 3) + b"\0" * 8, id="length-3"),
        pytest.param(struct.pack("!i", -1) + b"\0" * 8, id="length-minus-1"),
        pytest.param(struct.pack("!ii", 100000, 196608) + b"x" * 2000, id="length-100000"),
    ],
)
def test_bad_startup_length_closes(pgcorral: DaemonFactory, header: bytes) -> None:
    d = pgcorral()
    with raw(d) as sock:
        send(sock, header)
        assert_clean_close(read_until_close(sock))
    assert_healthy(d)


@pytest.mark.parametrize("sent", [b"", struct.pack("!ii", 50, 196608) + b"u" * 12],
                         ids=["connect-then-nothing", "claims-50-sends-20"])
def test_incomplete_startup_closed_after_authentication_timeout(
        pgcorral: DaemonFactory, sent: bytes) -> None:
    d = pgcorral({"authentication_timeout": "1"})
    with raw(d) as sock:
        started = time.monotonic()
        if sent:
            assert len(sent) == 20
            sock.sendall(sent)
        data = read_until_close(sock, timeout=6)
        elapsed = time.monotonic() - started
    assert_clean_close(data)
    assert elapsed >= 0.9, f"closed after {elapsed:.2f} s, before authentication_timeout"
    assert elapsed < 4, f"closed only after {elapsed:.2f} s"
    assert_healthy(d)


def test_startup_packet_over_10000_bytes_closes(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    packet = startup_packet({"user": "u" * 10000, "database": "pgcorral_test"})
    assert len(packet) > 10000
    with raw(d) as sock:
        send(sock, packet)
        assert_clean_close(read_until_close(sock))
    assert_healthy(d)


@pytest.mark.parametrize("params", [{"database": "pgcorral_test"}, {}],
                         ids=["with-database", "database-defaults-to-user"])
def test_user_name_of_9000_bytes_gets_an_error(pgcorral: DaemonFactory,
                                               params: dict[str, str]) -> None:
    d = pgcorral()
    packet = startup_packet({"user": "u" * 9000, **params})
    assert len(packet) < 10000
    with raw(d) as sock:
        sock.sendall(packet)
        messages = split_messages(read_until_close(sock, timeout=SOCK_TIMEOUT))
    types = [t for t, _ in messages]
    assert b"Z" not in types
    errors = [error_fields(body) for t, body in messages if t == b"E"]
    assert errors, f"no ErrorResponse, got {messages!r}"
    assert len(errors[0].get("C", "")) == 5, errors[0]
    assert_healthy(d)


def test_http_request_closes(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with raw(d) as sock:
        send(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert_clean_close(read_until_close(sock))
    assert_healthy(d)


def _random_bytes(seed: int, valid_length: bool) -> bytes:
    data = random.Random(seed).randbytes(4096)
    if valid_length:  # get past the length check so the body itself is parsed
        data = struct.pack("!i", 4096) + data[4:]
    return data


@pytest.mark.parametrize(
    "data",
    [pytest.param(_random_bytes(seed, False), id=f"seed-{seed}") for seed in (1, 2)]
    + [pytest.param(_random_bytes(3, True), id="seed-3-valid-length")],
)
def test_random_bytes_close(pgcorral: DaemonFactory, data: bytes) -> None:
    d = pgcorral()
    with raw(d) as sock:
        send(sock, data)
        assert_clean_close(read_until_close(sock))
    assert_healthy(d)


def test_password_message_before_startup_closes(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    body = b"secret\0"
    with raw(d) as sock:
        send(sock, b"p" + struct.pack("!i", len(body) + 4) + body)
        assert_clean_close(read_until_close(sock))
    assert_healthy(d)


# ------------------------------------------------------------------ encryption requests


@pytest.mark.parametrize("request_", [SSL_REQUEST, GSSENC_REQUEST], ids=["ssl", "gssenc"])
def test_encryption_request_refused_then_startup_works(pgcorral: DaemonFactory,
                                                       request_: bytes) -> None:
    d = pgcorral()
    with raw(d) as sock:
        sock.sendall(request_)
        assert sock.recv(1) == b"N"
        sock.sendall(startup_packet(USER))
        read_until_ready(sock)
        sock.sendall(query("select 7"))
        messages = read_until_ready(sock)
        assert (b"D", struct.pack("!hi", 1, 1) + b"7") in messages
    assert_healthy(d)


@pytest.mark.parametrize("request_,which", [(SSL_REQUEST, "SSL"),
                                            (GSSENC_REQUEST, "GSSAPI encryption")],
                         ids=["ssl", "gssenc"])
def test_encryption_request_with_pipelined_bytes_is_refused(
        pgcorral: DaemonFactory, request_: bytes, which: str) -> None:
    d = pgcorral()
    with raw(d) as sock:
        sock.sendall(request_ + startup_packet(USER) + query("select 1"))
        data = read_until_close(sock)
    if data.startswith(b"N"):  # PostgreSQL answers N first, then refuses
        data = data[1:]
    messages = split_messages(data)
    assert [t for t, _ in messages] == [b"E"], messages
    fields = error_fields(messages[0][1])
    assert fields["C"] == "08P01", fields
    assert f"received unencrypted data after {which} request" in fields["M"], fields
    assert_healthy(d)


# ------------------------------------------------------------------ protocol versions


@pytest.mark.parametrize("major,minor", [(2, 0), (4, 0)])
def test_unsupported_protocol_major(pgcorral: DaemonFactory, major: int, minor: int) -> None:
    d = pgcorral()
    with raw(d) as sock:
        send(sock, startup_packet(USER, version=(major << 16) | minor))
        data = read_until_close(sock)
    messages = split_messages(data)
    assert b"Z" not in [t for t, _ in messages]
    assert_clean_close(data)
    for _, body in messages:
        assert error_fields(body)["C"] == "0A000"
    assert_healthy(d)


@pytest.mark.parametrize("minor", [2, 9999], ids=["3.2", "3.9999"])
def test_newer_protocol_minor_gets_negotiate_protocol_version(
        pgcorral: DaemonFactory, minor: int) -> None:
    d = pgcorral()
    with raw(d) as sock:
        sock.sendall(startup_packet({**USER, "_pq_.foo": "1"}, version=(3 << 16) | minor))
        messages = read_until_ready(sock)
        type_, body = messages[0]
        assert type_ == b"v", messages
        assert body == struct.pack("!ii", 0x00030000, 1) + b"_pq_.foo\0"
        assert [t for t, _ in messages if t == b"v"] == [b"v"]
        sock.sendall(query("select 1"))
        assert read_until_ready(sock)[-1] == (b"Z", b"I")
    assert_healthy(d)


# -------------------------------------------------------------- bad startup contents


def test_startup_without_user_gets_28000(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    fields = connect_error(d.host, d.port, {"database": "pgcorral_test"}, timeout=SOCK_TIMEOUT)
    assert fields is not None and fields["C"] == "28000", fields
    assert "no PostgreSQL user name specified" in fields["M"]
    assert_healthy(d)


def test_startup_missing_final_terminator_gets_08P01(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    body = struct.pack("!i", 196608) + b"user\0trustuser\0database\0pgcorral_test\0"
    with raw(d) as sock:
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        messages = split_messages(read_until_close(sock))
    assert [t for t, _ in messages] == [b"E"], messages
    fields = error_fields(messages[0][1])
    assert fields["C"] == "08P01", fields
    assert "expected terminator as last byte" in fields["M"]
    assert_healthy(d)


# ----------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("real_pid", [False, True], ids=["bogus-pid", "real-pid-wrong-key"])
def test_bogus_cancel_request_cancels_nothing(pgcorral: DaemonFactory, pg: PgCluster,
                                              real_pid: bool) -> None:
    d = pgcorral()
    outcome: dict[str, object] = {}
    with psycopg.connect(d.dsn(), autocommit=True) as victim:
        pid = victim.info.backend_pid
        key = victim.pgconn.backend_key if hasattr(victim.pgconn, "backend_key") else None

        def run() -> None:
            started = time.monotonic()
            try:
                victim.execute("select pg_sleep(1)")
                outcome["ok"] = time.monotonic() - started
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        wait_for(lambda: pg.psql(
            "select count(*) from pg_stat_activity where state = 'active' "
            "and query = 'select pg_sleep(1)'").strip() == "1",
            what="pg_sleep(1) to start")
        target = pid if real_pid else 987654
        secret = 12345 if key != 12345 else 54321
        with raw(d) as sock:
            send(sock, struct.pack("!iiii", 16, CANCEL_CODE, target, secret))
            assert read_until_close(sock) == b""
        thread.join(SOCK_TIMEOUT)
        assert not thread.is_alive(), "the query did not finish"
        assert "error" not in outcome, f"the query was cancelled: {outcome['error']!r}"
        assert outcome["ok"] >= 0.9  # type: ignore[operator]
        assert victim.execute("select 2").fetchone() == (2,)
    assert_healthy(d)


def test_cancel_request_with_wrong_length_closes(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with raw(d) as sock:
        send(sock, struct.pack("!iii", 12, CANCEL_CODE, 4242))
        assert read_until_close(sock) == b""
    assert_healthy(d)


# ------------------------------------------------------- pipelining during the startup


def test_query_pipelined_after_startup_packet(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with raw(d) as sock:
        sock.sendall(startup_packet(USER) + query("select 42"))
        messages: list[Message] = []
        while True:
            message = read_message(sock)
            if message is None:
                break
            messages.append(message)
            if message[0] == b"E" or [t for t, _ in messages].count(b"Z") == 2:
                break
    types = [t for t, _ in messages]
    if b"E" in types:  # refusing it like PostgreSQL does is acceptable too
        assert error_fields(messages[-1][1])["C"] == "08P01", messages
    else:
        assert types.count(b"Z") == 2, messages
        assert (b"D", struct.pack("!hi", 1, 2) + b"42") in messages
    assert_healthy(d)


# --------------------------------------------------------------------- after the login


@pytest.mark.parametrize("length", [2, -1], ids=["length-2", "length-minus-1"])
def test_bad_message_length_after_login(pgcorral: DaemonFactory, length: int) -> None:
    d = pgcorral()
    sock = login(d)
    with sock:
        send(sock, b"Q" + struct.pack("!i", length) + b"select 1\0")
        data = read_until_close(sock)
    assert_clean_close(data)
    for _, body in split_messages(data):
        assert error_fields(body)["C"] == "08P01"
    assert_healthy(d)


def test_unknown_message_type_after_login(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    sock = login(d)
    with sock:
        send(sock, b"z" + struct.pack("!i", 4))
        data = read_until_close(sock)
    messages = split_messages(data)
    assert messages and messages[0][0] == b"E", messages
    assert_clean_close(data)
    fields = error_fields(messages[0][1])
    assert fields["C"] == "08P01", fields
    assert "invalid frontend message type" in fields["M"], fields
    assert_healthy(d)


def _count_rows(pg: PgCluster, table: str) -> int:
    return int(pg.psql(f"select count(*) from {table}", dbname="pgcorral_test").strip())


def _idle_in_transaction(pg: PgCluster) -> int:
    return int(pg.psql(
        "select count(*) from pg_stat_activity where usename = 'trustuser' "
        "and state like 'idle in transaction%'").strip())


@pytest.mark.parametrize("how", ["terminate", "rst"])
def test_client_leaving_mid_transaction_leaves_nothing(pgcorral: DaemonFactory, pg: PgCluster,
                                                       how: str) -> None:
    table = f"hostile_leave_{how}"
    pg.psql(f"drop table if exists {table}; create table {table}(x int);"
            f"grant all on {table} to public", dbname="pgcorral_test")
    d = pgcorral({"max_connections": "1"})
    sock = login(d)
    try:
        sock.sendall(query(f"begin; insert into {table} values (1)"))
        assert read_until_ready(sock)[-1] == (b"Z", b"T")
        assert _idle_in_transaction(pg) == 1
        if how == "terminate":
            sock.sendall(b"X" + struct.pack("!i", 4))
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    with psycopg.connect(d.dsn(), connect_timeout=5, autocommit=True) as conn:
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute(f"select count(*) from {table}").fetchone() == (0,)
        assert conn.execute("select now() = statement_timestamp()").fetchone() == (True,)
    wait_for(lambda: _idle_in_transaction(pg) == 0, what="no session idle in transaction")
    assert _count_rows(pg, table) == 0
    assert_healthy(d)


def test_client_leaving_while_large_result_streams(pgcorral: DaemonFactory,
                                                   pg: PgCluster) -> None:
    d = pgcorral({"max_connections": "1"})
    sock = login(d)
    try:
        sock.sendall(query("select repeat('x', 1000) from generate_series(1, 200000)"))
        got = 0
        while got < 100_000:
            chunk = sock.recv(65536)
            assert chunk, "closed while streaming"
            got += len(chunk)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    assert_healthy(d)
    wait_for(lambda: pg.psql(
        "select count(*) from pg_stat_activity where query like 'select repeat%' "
        "and state = 'active'").strip() == "0", what="the streaming query to end")
    assert_healthy(d)


def test_a_thousand_slow_startups_neither_block_nor_leak(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"authentication_timeout": "12", "max_connections": "2"})
    partial = struct.pack("!ii", 50, 196608) + b"u" * 12
    fds_before = len(os.listdir(f"/proc/{d.pid}/fd"))

    def slow_client(_: int) -> socket.socket:
        sock = socket.create_connection((d.host, d.port), timeout=SOCK_TIMEOUT)
        sock.sendall(partial)
        sock.setblocking(False)  # for _open_count
        return sock

    slow: list[socket.socket] = []
    try:
        # in parallel, so that all of them hang at once well within authentication_timeout
        with ThreadPoolExecutor(100) as pool:
            slow = list(pool.map(slow_client, range(1000)))
        assert _open_count(slow) == 1000, "slow clients were closed before the timeout"
        started = time.monotonic()
        with psycopg.connect(d.dsn(), connect_timeout=3) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        elapsed = time.monotonic() - started
        assert elapsed < 3, f"a healthy client needed {elapsed:.2f} s"
        assert _open_count(slow) == 1000, "slow clients were closed before the timeout"
        # and authentication_timeout frees them all
        wait_for(lambda: _open_count(slow) == 0, timeout=30,
                 what="the slow clients to be closed by authentication_timeout")
    finally:
        for sock in slow:
            sock.close()
    assert_healthy(d)
    # nothing kept: the daemon holds no more descriptors than before (+ the pooled server one)
    wait_for(lambda: len(os.listdir(f"/proc/{d.pid}/fd")) <= fds_before + 2, timeout=10,
             what="the daemon's file descriptors to return to their number before the test")


def _open_count(socks: list[socket.socket]) -> int:
    """How many of the non-blocking ``socks`` the peer has not closed (nothing to read, no
    EOF)."""
    count = 0
    for sock in socks:
        if sock.fileno() == -1:
            continue
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            count += 1
            continue
        except ConnectionResetError:
            continue
        assert data == b"", f"a slow client was sent {data!r}"
    return count


def test_a_connected_client_keeps_working_through_every_hostile_input(
        pgcorral: DaemonFactory) -> None:
    """One session stays open (in a transaction) while the hostile inputs above hit the same
    daemon; afterwards it commits and queries as if nothing happened."""
    d = pgcorral({"authentication_timeout": "1"})
    with psycopg.connect(d.dsn()) as healthy:
        pid = healthy.info.backend_pid
        healthy.execute("create temp table survivor(x int)")
        healthy.execute("insert into survivor values (1)")
        inputs = [
            struct.pack("!i", 0), struct.pack("!i", -1), struct.pack("!ii", 100000, 196608),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", _random_bytes(7, False),
            struct.pack("!ii", 8, 80877103) + b"pipelined", b"p\0\0\0\x08abc\0",
            struct.pack("!iiii", 16, 80877102, pid, 12345),  # a cancel with a wrong key
        ]
        for data in inputs:
            with raw(d) as sock:
                send(sock, data)
                read_until_close(sock)
        healthy.execute("insert into survivor values (2)")
        healthy.commit()
        assert healthy.execute("select count(*) from survivor").fetchone() == (2,)
        assert healthy.info.backend_pid == pid
