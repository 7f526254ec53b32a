"""Faults under load (issue 15, item 3; docs/RELIABILITY.md "Faults"): each case states what
the clients saw, and that no file descriptors or server connections leaked.

Covered elsewhere: PostgreSQL restarts (fast, immediate) and backend kills under load
(test_faults_pg.py), the log's disk full (test_faults_log.py), `kill -9` of a worker
(test_workers.py), a backend killed with and without a FATAL (test_server_goodbye.py)."""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import errors
from tests.faultproxy import FaultProxy
from tests.integration.test_management import cli_json, poll
from tests.load import Load, tree_fds

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import DaemonFactory


def peer_closed(sock: socket.socket) -> bool:
    """Has the other end closed ``sock`` (what it sent is read and dropped)?"""
    sock.setblocking(False)
    try:
        while data := sock.recv(65536):
            del data
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_sighup_a_hundred_times_under_load(pgcorral: DaemonFactory, pipeline: str) -> None:
    """100 reloads while clients run transactions: no client sees an error, and afterwards
    the pooler holds the same descriptors and server connections as before."""
    d = pgcorral({"pipeline": pipeline, "max_connections": "10"})
    load = Load(d)
    try:
        poll(lambda: load.done > 50, "load")
        fds_before = tree_fds(d.pid)
        for _ in range(100):  # each one lands before the next (signals would coalesce)
            before = d.log().count("configuration reloaded")
            d.signal(signal.SIGHUP)
            poll(lambda b=before: d.log().count("configuration reloaded") > b,  # type: ignore[misc]
                 "the reload")
        done = load.done
        poll(lambda: load.done > done + 50, "load after the reloads")
        assert load.failures == []
        total = cli_json(d, "status")["total_connections"]
        assert total <= 10
        assert abs(tree_fds(d.pid) - fds_before) <= 4  # (a management connection or two)
    finally:
        load.finish()


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_a_server_that_stops_answering_mid_query(pgcorral: DaemonFactory, pg: PgCluster,
                                                 pipeline: str) -> None:
    """The server's network goes silent in the middle of a query (a black-holed TCP proxy):
    with query_timeout the client gets a cancel attempt, then, at twice the timeout, FATAL
    57014 and its connection closed; the pooler stays responsive and keeps nothing of it."""
    proxy = FaultProxy(pg.port)
    try:
        d = pgcorral({"pipeline": pipeline, "query_timeout": "1"},
                     servers=[("primary", "127.0.0.1", proxy.port)])
        conn = psycopg.connect(d.dsn(), autocommit=True)
        try:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            proxy.black_hole()
            start = time.monotonic()
            with pytest.raises(errors.QueryCanceled, match="query timeout"):
                conn.execute("SELECT 1")
            assert time.monotonic() - start < 10
        finally:
            conn.close()
        status = cli_json(d, "status")  # the pooler answers
        poll(lambda: cli_json(d, "status")["active_connections"] == 0,
             "the silent server connection to be dropped")
        assert status["clients"] <= 1
    finally:
        proxy.close()


def test_a_cancel_the_server_never_closes(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    """Odyssey's cancel-leak case: the server accepts a cancel request and never closes that
    connection. The client's query finishes as usual, the server connection is given back
    once the cancel gives up (it is held while a cancel for it is in flight, so that a late
    cancel never hits the next client), and the cancel connection does not stay open."""
    proxy = FaultProxy(pg.port, leak_cancels=True)
    try:
        d = pgcorral({"pipeline": "transaction", "max_connections": "1"},
                     servers=[("primary", "127.0.0.1", proxy.port)])
        conn = psycopg.connect(d.dsn(), autocommit=True)
        try:
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            assert conn.execute("SELECT pg_sleep(1)").fetchone() == ("",)  # not cancelled
            timer.join()
            poll(lambda: len(proxy.leaked) == 1, "the swallowed cancel request")
            with psycopg.connect(d.dsn(), autocommit=True) as other:  # waits, then served
                assert other.execute("SELECT 2").fetchone() == (2,)
            poll(lambda: "could not forward a cancel request" in d.log(),
                 "the cancel to give up")
            poll(lambda: peer_closed(proxy.leaked[0]), "pgcorral to close the cancel connection")
            assert conn.execute("SELECT 3").fetchone() == (3,)
        finally:
            conn.close()
    finally:
        proxy.close()


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_pause_and_resume_under_load(pgcorral: DaemonFactory, pipeline: str) -> None:
    """PgBouncer's test_pause_resume: queries keep coming while the pool is paused and resumed
    five times; they wait, none fails."""
    from tests.integration.test_management import cli

    d = pgcorral({"pipeline": pipeline, "max_connections": "10"})
    failures: list[str] = []
    done: list[int] = []

    def worker() -> None:
        for _ in range(50 if pipeline == "transaction" else 1):
            try:
                with psycopg.connect(d.dsn(), autocommit=True, connect_timeout=30) as conn:
                    for _ in range(1 if pipeline == "transaction" else 50):
                        conn.execute("SELECT pg_sleep(0.01)")
                        done.append(1)
            except psycopg.Error as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for _ in range(5):
        assert cli(d, "pause").returncode == 0
        time.sleep(0.2)
        assert cli(d, "resume").returncode == 0
        count = len(done)
        poll(lambda c=count: len(done) > c or len(done) == 250,  # type: ignore[misc]
              "queries to go on after RESUME")
    for t in threads:
        t.join(60)
    assert failures == []
    assert len(done) == 250
