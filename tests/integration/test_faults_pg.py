"""Faults of PostgreSQL under load (issue 15, item 3; docs/RELIABILITY.md "Faults"): a restart
(``-m fast`` and ``-m immediate``) and backend kills while clients run transactions. Each test
states what the clients saw, waits for the service to come back, and checks that nothing
leaked: pgcorral's server connections stay within the pool size and its descriptors (those of
the supervisor and its workers) return to the baseline once the clients have left.

The restarts are done on a private cluster of this module, so the session's ``pg`` stays up
for the other tests.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from devtools.pgcluster import PgCluster
from tests.integration.test_management import cli, cli_json, poll
from tests.load import Load, tree_fds

if TYPE_CHECKING:
    from tests.conftest import Daemon, DaemonFactory

POOL = 4


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PgCluster]:
    """A PostgreSQL of this module's own (restarted by its tests), with the database and the
    role the daemons' DSNs name."""
    basedir = tempfile.mkdtemp(prefix="pgcorral-pg-faults-")
    os.chmod(basedir, 0o755)
    cluster = PgCluster(basedir)
    try:
        cluster.init(settings={"log_min_messages": "warning"},
                     hba_lines=["local all all trust", "host all all 127.0.0.1/32 trust"])
        cluster.start()
        cluster.psql("CREATE DATABASE pgcorral_test")
        cluster.psql("CREATE ROLE trustuser LOGIN")
        yield cluster
    finally:
        cluster.destroy()


def start(pgcorral: DaemonFactory, pg: PgCluster, pipeline: str) -> Daemon:
    return pgcorral({"pipeline": pipeline, "max_connections": str(POOL),
                     "blocking_timeout": "30"},
                    servers=[("primary", "127.0.0.1", pg.port)])


def own_fds(d: Daemon) -> int:
    """pgcorral's descriptors less its client and server connections (what must not grow)."""
    status = cli_json(d, "status")
    return tree_fds(d.pid) - int(status["total_connections"]) - int(status["clients"])


def baseline(d: Daemon) -> int:
    """Descriptors of the pooler with its pool warmed up and no client."""
    load = Load(d, clients=POOL)
    try:
        load.progress(50)
    finally:
        load.finish()
    poll(lambda: cli_json(d, "status")["clients"] == 0, "the warm-up clients to leave")
    return own_fds(d)


def check_no_leak(d: Daemon, load: Load, fds_before: int) -> None:
    load.finish()
    poll(lambda: cli_json(d, "status")["clients"] == 0, "the clients to leave",
         more=lambda: cli(d, "-F", "json", "status", "details").stdout[-5000:])
    assert cli_json(d, "status")["total_connections"] <= POOL
    poll(lambda: abs(own_fds(d) - fds_before) <= 3, "the descriptors back to the baseline",
         more=lambda: f"{own_fds(d)} now, {fds_before} before")
    assert d.running()


#: What a client may see when PostgreSQL goes away under it: the FATAL PostgreSQL sent
#: (57P01 admin shutdown; immediate mode sends it too), 57P03 (cannot connect now: PostgreSQL
#: starting or stopping, passed on at a login), 08006 from pgcorral when the server closed
#: without a word or cannot be reached, and a connection closed at once by pgcorral at login
#: (psycopg's OperationalError without a SQLSTATE).
RESTART_ERRORS = {"57P01", "57P03", "08006", "OperationalError"}


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_postgresql_restart_under_load(pgcorral: DaemonFactory, private_pg: PgCluster,
                                       pipeline: str, mode: str) -> None:
    """Clients see the FATAL of their backend (or 08006 while PostgreSQL is away), no hang;
    once PostgreSQL is back every client is served again within seconds; nothing leaked."""
    d = start(pgcorral, private_pg, pipeline)
    fds_before = baseline(d)
    load = Load(d, clients=POOL, connectors=1, reconnect=True, connect_timeout=5)
    try:
        load.progress(50)
        private_pg.stop(mode)
        poll(lambda: load.errors, "the clients to notice")
        private_pg.start()
        started = time.monotonic()
        load.progress(100, timeout=20)
        recovery = time.monotonic() - started
        errors = dict(load.errors)
        assert set(errors) <= RESTART_ERRORS, load.failures[:10]
        assert recovery < 10
        print(f"restart {mode} {pipeline}: errors {errors}, recovered in {recovery:.2f} s")
    finally:
        load.finish()
    check_no_leak(d, load, fds_before)


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_backend_kills_under_load(pgcorral: DaemonFactory, private_pg: PgCluster,
                                  pipeline: str) -> None:
    """pg_terminate_backend of random backends of the pool, 30 times, while clients run
    transactions: a client whose backend was killed under it sees PostgreSQL's FATAL 57P01
    and nothing else (no 08006 on top: docs/RELIABILITY.md "One error per connection"); a
    backend killed while idle in the pool is replaced unseen; nothing leaked."""
    d = start(pgcorral, private_pg, pipeline)
    fds_before = baseline(d)
    load = Load(d, clients=POOL, reconnect=True)
    kill = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ("
            "SELECT pid FROM pg_stat_activity WHERE usename = 'trustuser' "
            "AND backend_type = 'client backend' ORDER BY random() LIMIT 1)")
    try:
        load.progress(50)
        kills = 0
        for _ in range(30):
            kills += private_pg.psql(kill).strip() == "t"
            load.progress(5)
        assert kills >= 20
        load.progress(50)
        errors = dict(load.errors)
        # 57P01, or (the FATAL came while the client was idle between two statements)
        # libpq's "server closed the connection unexpectedly", with or without the FATAL's
        # text: the same mix as with PostgreSQL directly. Never pgcorral's 08006.
        # Known limit (session pooling): a reconnect's login may be given an idle pooled
        # connection whose backend was killed a moment before pgcorral read the FATAL, and
        # then fails with 08006 (docs/RELIABILITY.md, Faults). Only logins may see that.
        if pipeline == "session":
            logins_08006 = load.connect_errors.get("08006", 0)
            assert errors.get("08006", 0) <= logins_08006, (load.failures[:10],
                                                            dict(load.connect_errors))
            errors.pop("08006", None)
        assert set(errors) <= {"57P01", "OperationalError"}, load.failures[:10]
        assert sum(errors.values()) <= kills
        print(f"backend kills {pipeline}: {kills} kills, errors {errors}")
    finally:
        load.finish()
    check_no_leak(d, load, fds_before)
