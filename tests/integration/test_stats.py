"""The counters behind every view (issue 12 item 1), read through `pgcorral-cli stats`.

Real traffic through pgcorral in both pipelines, with one and two workers (`make test` runs
the integration suite both ways): transactions and queries, bytes, errors by SQLSTATE class,
logins by outcome, waits (a full pool), holds, client groups, prepared statements, the state
counts, `clear prometheus`, PAUSE/RESUME.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg
import pytest
from tests.conftest import Daemon, DaemonFactory
from tests.integration.test_management import cli, cli_json, poll

pytestmark = pytest.mark.integration

PIPELINES = ["session", "transaction"]


def stats(d: Daemon) -> dict[str, Any]:
    out = cli_json(d, "stats")
    assert out["outcome"] == "ok", out
    return out


def pool(d: Daemon, user: str = "trustuser", database: str = "pgcorral_test") -> dict[str, Any]:
    for entry in stats(d)["pools"]:
        if entry["user"] == user and entry["database"] == database:
            return entry
    raise AssertionError(f"no pool {user}@{database} in {stats(d)['pools']}")


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_transactions_queries_bytes_and_histograms(pgcorral: DaemonFactory,
                                                   pipeline: str) -> None:
    d = pgcorral({"pipeline": pipeline})
    n = 25
    with psycopg.connect(d.dsn(application_name="statstest"), autocommit=True,
                         prepare_threshold=None) as conn:  # one Sync per statement
        for i in range(n):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        with conn.transaction():  # one transaction of three statements
            conn.execute("select 1")
            conn.execute("select 2")
        live = pool(d)
        assert live["cl_active"] + live["cl_idle"] == 1
        client = next(c for c in stats(d)["clients"] if c["application_name"] == "statstest")
        assert client["xact_count"] >= n + 1
    after = poll(lambda: (p := pool(d))["cl_active"] + p["cl_idle"] == 0 and p, "the client gone")
    # n autocommit statements and one explicit transaction (BEGIN, 2 selects, COMMIT)
    assert after["xact_count"] == n + 1, after
    assert after["query_count"] == n + 4, after
    assert after["bytes_received"] > n * 20 and after["bytes_sent"] > n * 20
    hist = after["hist"]
    assert sum(hist["xact"]) == after["xact_count"]
    assert sum(hist["query"]) == after["query_count"]
    assert after["hist_sum_us"]["xact"] == after["xact_time_us"] > 0
    assert after["query_time_us"] > 0
    assert after["logins"]["success"] == 1
    assert after["wait_count"] >= 1 and sum(hist["wait"]) == after["wait_count"]
    groups = [g for g in stats(d)["client_groups"] if g["application_name"] == "statstest"]
    assert len(groups) == 1 and groups[0]["clients_total"] == 1
    assert groups[0]["xact_count"] == n + 1
    assert groups[0]["hold_time_us"] > 0


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_errors_by_sqlstate_class(pgcorral: DaemonFactory, pipeline: str) -> None:
    d = pgcorral({"pipeline": pipeline})
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        for sql in ("select 1/0", "select nosuchcolumn", "select 1/0"):
            with pytest.raises(psycopg.Error):
                conn.execute(sql)
    # inside a transaction: the error comes alone, its ReadyForQuery in the next chunk
    with psycopg.connect(d.dsn()) as conn, pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("select 1/0")
    assert pool(d)["errors"] == {"22": 3, "42": 1}


def test_logins_by_outcome(pgcorral: DaemonFactory) -> None:
    d = pgcorral(hba="host all md5user all all\nhost pgcorral_test all all all\n"
                     "host all all all reject\n")
    with psycopg.connect(d.dsn(user="md5user", password="md5pass")):
        pass
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(d.dsn(user="md5user", password="wrong"))
    with pytest.raises(psycopg.OperationalError, match="rejects connection"):
        psycopg.connect(d.dsn(dbname="db2"))
    out = stats(d)
    md5 = next(p for p in out["pools"] if p["user"] == "md5user")
    assert md5["logins"]["success"] == 1 and md5["logins"]["bad_password"] == 1
    counters = out["counters"]
    assert counters["logins_success"] == 1
    assert counters["logins_bad_password"] == 1
    assert counters["logins_refused"] == 1
    # the refused user/database made no pool of its own
    assert not any(p["database"] == "db2" for p in out["pools"])


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_waiting_client_is_seen_and_its_wait_counted(pgcorral: DaemonFactory,
                                                     pipeline: str) -> None:
    d = pgcorral({"pipeline": pipeline, "blocking_timeout": "30"},
                 limits="pgcorral_test trustuser 1 0 0\n")
    holder = psycopg.connect(d.dsn(), autocommit=True)
    holder.execute("begin")
    holder.execute("select 1")
    done = threading.Event()

    def waiter() -> None:
        with psycopg.connect(d.dsn(application_name="waiter"), autocommit=True) as conn:
            conn.execute("select 1")
        done.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        busy = poll(lambda: (p := pool(d))["cl_waiting"] == 1 and p, "a waiting client")
        assert busy["sv_active"] == 1
        time.sleep(0.3)  # (the wait to be measured, not a wait for a condition)
        assert pool(d)["maxwait_us"] >= 300_000
        clients = stats(d)["clients"]
        assert [c["state"] for c in clients if c["application_name"] == "waiter"] == ["waiting"]
    finally:
        holder.execute("commit")
        if pipeline == "session":
            holder.close()
        thread.join(30)
        holder.close()
    assert done.is_set()
    after = pool(d)
    assert after["cl_waiting"] == 0 and after["maxwait_us"] == 0
    assert after["wait_time_us"] >= 300_000
    # the waited-for connection's wait sits in a bucket of at least 256 ms
    assert sum(after["hist"]["wait"][14:]) >= 1, after["hist"]["wait"]


def test_prepared_statement_counters(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"pipeline": "transaction"})
    with psycopg.connect(d.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for i in range(10):
            conn.execute("select %s::int + 1", (i,))
    prepared = pool(d)["prepared"]
    assert prepared["misses"] >= 1
    assert prepared["hits"] >= 9
    assert prepared["evictions"] == 0


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_clear_prometheus_resets_counters_not_gauges(pgcorral: DaemonFactory,
                                                     pipeline: str) -> None:
    d = pgcorral({"pipeline": pipeline})
    with psycopg.connect(d.dsn(), autocommit=True, prepare_threshold=None) as conn:
        for _ in range(5):
            conn.execute("select 1")
        before = pool(d)
        assert before["xact_count"] >= 5
        assert cli(d, "clear", "prometheus").returncode == 0
        after = pool(d)
        assert after["xact_count"] == 0 and after["query_count"] == 0
        assert sum(after["hist"]["xact"]) == 0 and after["logins"]["success"] == 0
        assert after["cl_active"] + after["cl_idle"] == 1  # a gauge: the client is still here
        conn.execute("select 1")
        assert pool(d)["xact_count"] == 1


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_all_workers_are_counted(pgcorral: DaemonFactory, pipeline: str) -> None:
    """Many clients at once (with two workers the kernel spreads them): the pool totals are
    every client's."""
    d = pgcorral({"pipeline": pipeline})
    conns = [psycopg.connect(d.dsn(), autocommit=True) for _ in range(12)]
    try:
        for conn in conns:
            conn.execute("select 1")
            conn.execute("select 2")
        out = stats(d)
        assert len([c for c in out["clients"] if c["user"] == "trustuser"]) == 12
        assert len(out["workers"]) == int(os.environ.get("PGCORRAL_TEST_WORKERS", "1"))
        entry = next(p for p in out["pools"] if p["user"] == "trustuser")
        assert entry["xact_count"] == 24
        assert entry["cl_active"] + entry["cl_idle"] == 12
    finally:
        for conn in conns:
            conn.close()


def test_server_connection_rows(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        pid = conn.info.backend_pid
        out = stats(d)
        row = next(s for s in out["servers"] if s["pid"] == pid)
        client = next(c for c in out["clients"] if c["server_pid"] == pid)
        assert row["state"] == "active" and row["client_id"] == client["id"]
        assert row["server"] == "primary" and row["database"] == "pgcorral_test"
    idle = poll(lambda: next((s for s in stats(d)["servers"]
                              if s["pid"] == pid and s["state"] == "idle"), None),
                "the server connection idle")
    assert idle["xact_count"] >= 1 and idle["client_id"] == 0


def test_connect_errors_per_server_section(pgcorral: DaemonFactory) -> None:
    """A server that refuses connections: each failed open counts under its section (what
    pgagroal_server_error shows), and the client's login under error."""
    from devtools.pgcluster import find_free_port

    d = pgcorral(servers=[("primary", "127.0.0.1", find_free_port())])
    for _ in range(2):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(d.dsn(), connect_timeout=10)
    out = stats(d)
    assert [(s["name"], s["errors"]) for s in out["server_sections"]] == [("primary", 2)]
    assert out["counters"]["logins_error"] == 2
    assert cli(d, "clear", "prometheus").returncode == 0
    assert stats(d)["server_sections"][0]["errors"] == 0
