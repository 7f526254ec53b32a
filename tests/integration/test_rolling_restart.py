"""Rolling restarts without downtime (issue 15, item 5; docs/RELIABILITY.md): with
``so_reuseport = on`` a second pgcorral starts on the port of the running one; the old one,
told to stop when its clients are gone (SIGTERM with so_reuseport, or ``shutdown
wait_for_clients``), stops listening at once and exits when its last client has left. Clients
under load see no error; cancel requests reach the process that serves their client."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import errors
from tests.integration.test_management import cli, poll
from tests.load import Load, tree_pids

if TYPE_CHECKING:
    from tests.conftest import DaemonFactory


def conf(pipeline: str, **extra: str) -> dict[str, str]:
    return {"so_reuseport": "on", "pipeline": pipeline, "max_connections": "10", **extra}


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_rolling_restart_under_load_loses_nothing(pgcorral: DaemonFactory,
                                                  pipeline: str) -> None:
    old = pgcorral(conf(pipeline))
    load = Load(old, connectors=1, sleep=True)
    try:
        poll(lambda: load.queries > 20 and load.connects > 5, "load through the old pgcorral")
        new = pgcorral({**conf(pipeline), "port": str(old.port),
                        "unix_socket_dir": old.socket_dir})
        new.wait_for_log("pgcorral: started")
        old.signal(signal.SIGTERM)  # so_reuseport: stop when the clients are gone
        old.wait_for_log("listeners closed")
        connects = load.connects
        poll(lambda: load.connects > connects + 10, "new connections served by the new one")
        assert old.running()  # its persistent clients are still there
        queries = load.queries
        poll(lambda: load.queries > queries + 20, "the old one's clients to go on")
        load.finish()
        old.proc.wait(20)  # its last client left: it exits by itself
        assert load.failures == []
        with psycopg.connect(new.dsn(), autocommit=True) as conn:  # the port lives on
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(new.dsn(host=old.socket_dir), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)  # the unix socket too
        assert cli(new, "status").returncode == 0  # the management socket is the new one's
    finally:
        load.finish()


def _startup(user: str, database: str) -> bytes:
    body = struct.pack("!I", 196608) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in (
            ("user", user), ("database", database))) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def test_connections_queued_at_the_old_one_are_served(pgcorral: DaemonFactory) -> None:
    """The old pgcorral is frozen (SIGSTOP) so that new connections pile up in its accept
    queue; it is then told to stop and thawed. Before it closes its listeners it steers new
    connections to the new one and accepts what is queued (supervisor.handover): every
    connection gets its login answer, none is reset."""
    room = {"max_connections": "50"}  # a session each: none waits for a server connection
    old = pgcorral(conf("session", **room))
    new = pgcorral({**conf("session", **room), "port": str(old.port),
                    "unix_socket_dir": old.socket_dir})
    new.wait_for_log("pgcorral: started")
    frozen = tree_pids(old.pid)
    clients: list[socket.socket] = []
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        for _ in range(40):
            c = socket.create_connection(("127.0.0.1", old.port), timeout=10)
            c.sendall(_startup("trustuser", "pgcorral_test"))
            clients.append(c)
        ready, _, _ = select.select(clients, [], [], 1.0)  # the new one answers its share
        assert len(ready) < len(clients), "no connection waits in the old one's queue"
        os.kill(old.pid, signal.SIGTERM)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    try:
        for i, c in enumerate(clients):
            try:
                answer = c.recv(1)  # AuthenticationOk or a password request: not a reset
            except OSError as exc:
                answer = repr(exc).encode()
            assert answer == b"R", (i, answer, old.log()[-3000:], new.log()[-1500:])
    finally:
        for c in clients:
            c.close()
    old.proc.wait(20)  # its clients left: it exits
    assert "listeners closed" in old.log()


def test_cancel_reaches_the_process_of_its_client(pgcorral: DaemonFactory) -> None:
    """Two processes on the port: cancel requests (new connections, spread by the kernel)
    land on either; each one reaches the query it names."""
    old = pgcorral(conf("session"))
    new = pgcorral({**conf("session"), "port": str(old.port),
                    "unix_socket_dir": old.socket_dir})
    new.wait_for_log("pgcorral: started")
    for _ in range(40):
        with psycopg.connect(old.dsn(), autocommit=True) as conn:
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            with pytest.raises(errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            timer.join()
        if "forwarded to 1 other pgcorral" in old.log() + new.log():
            break
    assert "forwarded to 1 other pgcorral" in old.log() + new.log(), \
        "no cancel request landed on the other process"


def test_shutdown_wait_for_clients_by_command(pgcorral: DaemonFactory) -> None:
    d = pgcorral(conf("transaction"))
    conn = psycopg.connect(d.dsn(), autocommit=True)
    try:
        assert cli(d, "shutdown", "wait_for_clients").returncode == 0
        d.wait_for_log("listeners closed")
        for _ in range(3):  # an idle transaction-mode client is not told to go
            assert conn.execute("SELECT 1").fetchone() == (1,)
            time.sleep(0.1)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(d.dsn(), connect_timeout=3)
        assert d.running()
    finally:
        conn.close()
    d.proc.wait(20)
