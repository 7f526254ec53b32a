"""Rolling restarts without downtime (issue 15, item 5; docs/RELIABILITY.md): with
``so_reuseport = on`` a second pgcorral starts on the port of the running one; the old one,
told to stop when its clients are gone (SIGTERM with so_reuseport, or ``shutdown
wait_for_clients``), stops listening at once and exits when its last client has left. Clients
under load see no error; cancel requests reach the process that serves their client."""

from __future__ import annotations

import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import errors
from tests.integration.test_management import cli, poll

if TYPE_CHECKING:
    from tests.conftest import Daemon, DaemonFactory


def conf(pipeline: str, **extra: str) -> dict[str, str]:
    return {"so_reuseport": "on", "pipeline": pipeline, "max_connections": "10", **extra}


class Load:
    """Persistent clients running queries, and a stream of new connections, counting every
    failure."""

    def __init__(self, d: Daemon, persistent: int = 6) -> None:
        self.d = d
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.queries = 0
        self.connects = 0
        self.conns = [psycopg.connect(d.dsn(), autocommit=True) for _ in range(persistent)]
        self.threads = [threading.Thread(target=self._query, args=(c,)) for c in self.conns]
        self.threads.append(threading.Thread(target=self._connect))
        for t in self.threads:
            t.start()

    def _query(self, conn: psycopg.Connection[Any]) -> None:
        while not self.stop.is_set():
            try:
                with conn.transaction():
                    conn.execute("SELECT 1").fetchone()
                    conn.execute("SELECT pg_sleep(0.001)")
                self.queries += 1
            except psycopg.Error as exc:
                self.failures.append(f"query: {exc}")
                return

    def _connect(self) -> None:
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.d.dsn(), autocommit=True, connect_timeout=10) as c:
                    c.execute("SELECT 1").fetchone()
                self.connects += 1
            except psycopg.Error as exc:
                self.failures.append(f"connect: {exc}")

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_rolling_restart_under_load_loses_nothing(pgcorral: DaemonFactory,
                                                  pipeline: str) -> None:
    old = pgcorral(conf(pipeline))
    load = Load(old)
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
