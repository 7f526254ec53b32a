"""When a client's backend goes away, the client sees exactly what PostgreSQL sent: its FATAL
and then the end of the connection, nothing more (issue 15: pgcorral used to add an 08006 of
its own after PostgreSQL's 57P01, and a driver whose error handler expects one error per
connection crashed on it). pgcorral sends 08006 only when the server closed without a FATAL
(here: a TCP proxy in front of PostgreSQL that cuts both sockets)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest
from tests.faultproxy import FaultProxy
from tests.integration.test_management import poll
from tests.integration.test_transaction import TEST_DB
from tests.pgwire import error_fields, login, read_message

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import DaemonFactory


def query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + (len(body) + 4).to_bytes(4, "big") + body


def messages_until_closed(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    out = []
    while True:
        try:
            message = read_message(sock)
        except ConnectionResetError:
            break
        if message is None:
            break
        out.append(message)
    return out


def backend_pid(sock: socket.socket) -> int:
    sock.sendall(query("SELECT pg_backend_pid()"))
    pid = 0
    while True:
        message = read_message(sock)
        assert message is not None
        type_, body = message
        if type_ == b"D":
            pid = int(body[6:].decode())
        if type_ == b"Z":
            return pid


def client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert login(sock, {"user": "trustuser", "database": TEST_DB}) is None
    return sock


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_a_terminated_backend_gives_one_error(pgcorral: DaemonFactory, pg: PgCluster,
                                              pipeline: str) -> None:
    d = pgcorral({"pipeline": pipeline})
    sock = client(d.port)
    try:
        sock.sendall(query("BEGIN"))  # transaction mode: keep the backend linked
        while (m := read_message(sock)) is not None and m[0] != b"Z":
            pass
        pid = backend_pid(sock)
        pg.psql(f"SELECT pg_terminate_backend({pid})")
        got = messages_until_closed(sock)
        errors = [error_fields(body) for type_, body in got if type_ == b"E"]
        assert [e["C"] for e in errors] == ["57P01"], got
        assert errors[0]["S"] == "FATAL"
    finally:
        sock.close()


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_a_server_gone_without_a_word_gives_08006(pgcorral: DaemonFactory, pg: PgCluster,
                                                  pipeline: str) -> None:
    proxy = FaultProxy(pg.port)
    try:
        d = pgcorral({"pipeline": pipeline}, servers=[("primary", "127.0.0.1", proxy.port)])
        sock = client(d.port)
        try:
            sock.sendall(query("BEGIN"))
            while (m := read_message(sock)) is not None and m[0] != b"Z":
                pass
            poll(lambda: proxy.connections() >= 1, "the proxied server connection")
            proxy.cut()
            got = messages_until_closed(sock)
            errors = [error_fields(body) for type_, body in got if type_ == b"E"]
            assert [e["C"] for e in errors] == ["08006"], got
        finally:
            sock.close()
    finally:
        proxy.close()
