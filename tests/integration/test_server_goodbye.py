"""When a client's backend goes away, the client sees exactly what PostgreSQL sent: its FATAL
and then the end of the connection, nothing more (issue 15: pgcorral used to add an 08006 of
its own after PostgreSQL's 57P01, and a driver whose error handler expects one error per
connection crashed on it). pgcorral sends 08006 only when the server closed without a FATAL
(here: a TCP proxy in front of PostgreSQL that cuts both sockets)."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import TYPE_CHECKING

import pytest
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


class CuttingProxy:
    """Forwards 127.0.0.1:port to PostgreSQL; ``cut()`` closes every connection at once,
    as a network failure or a crashed server would (no FATAL)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.socks += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def cut(self) -> None:
        with self.lock:
            for s in self.socks:
                with contextlib.suppress(OSError):  # (close alone does not wake a recv)
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
            self.socks = []

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_a_server_gone_without_a_word_gives_08006(pgcorral: DaemonFactory, pg: PgCluster,
                                                  pipeline: str) -> None:
    proxy = CuttingProxy(pg.port)
    try:
        d = pgcorral({"pipeline": pipeline}, servers=[("primary", "127.0.0.1", proxy.port)])
        sock = client(d.port)
        try:
            sock.sendall(query("BEGIN"))
            while (m := read_message(sock)) is not None and m[0] != b"Z":
                pass
            poll(lambda: len(proxy.socks) >= 2, "the proxied server connection")
            proxy.cut()
            got = messages_until_closed(sock)
            errors = [error_fields(body) for type_, body in got if type_ == b"E"]
            assert [e["C"] for e in errors] == ["08006"], got
        finally:
            sock.close()
    finally:
        proxy.close()
