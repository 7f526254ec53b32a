"""Issue 13 with real clusters: roles found by the health check, reads balanced over
replicas, a lagging or stopped replica skipped and taken back, read-your-writes, failover with
failover_script, and split brain refused. Each test gets a fresh primary + streaming replica
(tests/ha/fixtures.py) and runs with 1 and 2 workers (PGCORRAL_TEST_WORKERS)."""

from __future__ import annotations

import os
import shlex
import stat
import threading
from typing import Any

import psycopg
import pytest
from tests.conftest import Daemon, DaemonFactory
from tests.ha import fixtures
from tests.ha.fixtures import HEALTH_USER, TEST_DB, HaPair
from tests.integration.test_management import cli_json, poll

pytestmark = pytest.mark.integration  # (the 2-worker pass of `make test` runs it too)

ha_template = fixtures.ha_template
ha_pair_factory = fixtures.ha_pair_factory
ha_pair = fixtures.ha_pair
ha_pair_delayed = fixtures.ha_pair_delayed

HEALTH = {
    "health_check": "on",
    "health_check_period": "200ms",
    "health_check_timeout": "2s",
    "health_check_user": HEALTH_USER,
    "pipeline": "transaction",
}


def start(pgcorral: DaemonFactory, pair: HaPair, **extra: str) -> Daemon:
    conf = {**HEALTH, **extra}
    d = pgcorral(conf_extra=conf, servers=pair.servers())
    poll(lambda: states(d).get("replica1") == "replica" and states(d).get("primary") ==
         "primary", "the health check to find the roles", 20, lambda: (states(d), d.log()))
    return d


def status(d: Daemon) -> dict[str, Any]:
    answer: dict[str, Any] = cli_json(d, "status")
    return answer


def states(d: Daemon) -> dict[str, str]:
    return {s["name"]: s["state"] for s in status(d)["servers"]}


def in_recovery(conn: psycopg.Connection[Any], read_only: bool) -> bool:
    """Run one transaction (read-only or not) and say whether it ran on a replica."""
    begin = "BEGIN READ ONLY" if read_only else "BEGIN"
    with conn.cursor() as cur:
        cur.execute(begin)
        cur.execute("SELECT pg_is_in_recovery()")
        row = cur.fetchone()
        cur.execute("COMMIT")
    assert row is not None
    return bool(row[0])


def test_roles_found_and_reads_go_to_the_replica(pgcorral: DaemonFactory,
                                                 ha_pair: HaPair) -> None:
    d = start(pgcorral, ha_pair)
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        assert in_recovery(conn, read_only=True)  # BEGIN READ ONLY: the replica
        assert not in_recovery(conn, read_only=False)  # anything else: the primary
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        # psycopg's own read-only transactions (BEGIN READ ONLY)
    with psycopg.connect(d.dsn()) as conn:
        conn.read_only = True
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        conn.rollback()
    # target_session_attrs in options: every transaction of the client on a replica
    dsn = d.dsn(options="-c target_session_attrs=read-only")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(3):
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    with psycopg.connect(d.dsn(options="-c target_session_attrs=read-write"),
                         autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(d.dsn(options="-c target_session_attrs=sideways"))
    assert "invalid target_session_attrs" in str(err.value)
    answer = status(d)
    assert answer["reads_to_replica"] >= 4
    assert answer["writes_refused"] == ""


def test_read_only_suffix_in_session_mode(pgcorral: DaemonFactory, ha_pair: HaPair) -> None:
    d = start(pgcorral, ha_pair, pipeline="session", read_only_suffix="_ro")
    with psycopg.connect(d.dsn(dbname=TEST_DB + "_ro"), autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery(), current_database()").fetchone() == (
            True, TEST_DB)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TABLE nope (x int)")
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)


def test_reads_spread_over_two_replicas(pgcorral: DaemonFactory, ha_pair: HaPair) -> None:
    ha_pair.add_replica()
    for balance in ("round_robin", "least_busy"):
        d = start(pgcorral, ha_pair, replica_balance=balance)
        poll(lambda d=d: states(d).get("replica2") == "replica", "the second replica", 20)
        seen: dict[int, int] = {}
        with psycopg.connect(d.dsn(options="-c target_session_attrs=standby"),
                             autocommit=True) as conn:
            for _ in range(20):
                row = conn.execute("SELECT inet_server_port()").fetchone()
                assert row is not None
                seen[row[0]] = seen.get(row[0], 0) + 1
        ports = {ha_pair.replica.port, ha_pair.extra[0].port}
        assert set(seen) == ports, (balance, seen)
        d.stop()


def test_lagging_replica_is_skipped(pgcorral: DaemonFactory,
                                    ha_pair_delayed: HaPair) -> None:
    pair = ha_pair_delayed  # replays 2 s late
    d = start(pgcorral, pair, max_replica_lag="500ms")
    pair.primary.psql("CREATE TABLE IF NOT EXISTS lag (x int)", dbname=TEST_DB)
    stop = threading.Event()

    def write() -> None:  # commits keep coming: the replica stays 2 s behind
        with psycopg.connect(pair.primary.dsn(dbname=TEST_DB), autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO lag VALUES (1)")
                stop.wait(0.05)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        poll(lambda: states(d).get("replica1") == "lagging", "the replica to lag", 20,
             lambda: states(d))
        with psycopg.connect(d.dsn(), autocommit=True) as conn:
            assert not in_recovery(conn, read_only=True)  # to the primary instead
    finally:
        stop.set()
        writer.join()
    poll(lambda: states(d).get("replica1") == "replica", "the replica to catch up", 20)


def test_a_stopped_replica_is_skipped_then_used_again(pgcorral: DaemonFactory,
                                                      ha_pair: HaPair) -> None:
    d = start(pgcorral, ha_pair)
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        assert in_recovery(conn, read_only=True)
        ha_pair.replica.stop("fast")
        poll(lambda: states(d).get("replica1") == "down", "the replica to be down", 20)
        assert not in_recovery(conn, read_only=True)  # every replica down: the primary
        ha_pair.replica.start()
        poll(lambda: states(d).get("replica1") == "replica", "the replica back", 30)
        poll(lambda: in_recovery(conn, read_only=True), "a read on the replica again", 10,
             lambda: (status(d)["servers"], d.log()[-3000:]))
    assert "replica1 at" in d.log() and "is down" in d.log()


def _read_after_write(d: Daemon, rounds: int, first: int = 0) -> int:
    """Insert a row, then read it in a read-only transaction; how many reads missed it."""
    missed = 0
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ryw (id int)")
        for i in range(first, first + rounds):
            conn.execute("INSERT INTO ryw VALUES (%s)", (i,))
            with conn.cursor() as cur:
                cur.execute("BEGIN READ ONLY")
                cur.execute("SELECT count(*) FROM ryw WHERE id = %s", (i,))
                row = cur.fetchone()
                cur.execute("COMMIT")
            assert row is not None
            missed += row[0] == 0
    return missed


def test_read_your_writes(pgcorral: DaemonFactory, ha_pair_delayed: HaPair) -> None:
    pair = ha_pair_delayed  # every commit replays 2 s late on the replica
    d = start(pgcorral, pair)
    assert _read_after_write(d, 10) == 0
    pair.sync()  # the replica has the table now
    # the reads did not all go to the primary for nothing: a client that wrote nothing
    # reads from the replica
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        assert in_recovery(conn, read_only=True)
    d.stop()
    # without the feature the same reads miss the rows: the test can fail
    d = start(pgcorral, pair, read_your_writes="off")
    assert _read_after_write(d, 5, first=100) > 0


def _promote_script(directory: str, replica_cmd: list[str]) -> tuple[str, str]:
    """A failover_script that records its arguments, waits for the test's go (a file named
    ``go``), and promotes the replica."""
    args_file = os.path.join(directory, "failover.args")
    go = os.path.join(directory, "go")
    path = os.path.join(directory, "failover.sh")
    with open(path, "w", encoding="utf-8") as f:
        f.write("#!/bin/sh\n")
        f.write(f'echo "$@" > {shlex.quote(args_file)}\n')
        f.write(f"while [ ! -e {shlex.quote(go)} ]; do sleep 0.05; done\n")
        f.write(f"exec {shlex.join(replica_cmd)}\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path, args_file


def test_failover_runs_the_script_and_moves_writes(pgcorral: DaemonFactory,
                                                   ha_pair: HaPair) -> None:
    pair = ha_pair
    replica = pair.replica
    script, args_file = _promote_script(
        pair.basedir, replica._as_server_user(
            [replica.bin("pg_ctl"), "promote", "-w", "-D", replica.datadir]))
    d = start(pgcorral, pair, failover="on", failover_script=script)
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE fo (x int)")
        conn.execute("INSERT INTO fo VALUES (1)")
        session = psycopg.connect(d.dsn(), autocommit=True)
        session.execute("BEGIN")
        session.execute("SELECT 1")  # in a transaction on the primary when it dies
        pair.primary.kill_postmaster()
        poll(lambda: os.path.exists(args_file), "the failover script to run", 30,
             lambda: (states(d), d.log()))
        assert "no primary server" in status(d)["writes_refused"]
        # no primary yet: a new transaction waits for one (blocking_timeout) ...
        waited: list[Any] = []
        writer = threading.Thread(target=lambda: waited.append(
            conn.execute("INSERT INTO fo VALUES (3) RETURNING pg_is_in_recovery()").fetchone()))
        writer.start()
        poll(lambda: status(d)["waiting_clients"] >= 1, "the transaction to wait", 10)
        assert writer.is_alive()
        with open(os.path.join(pair.basedir, "go"), "w", encoding="utf-8"):
            pass  # ... and runs once the script promoted the replica
        writer.join(30)
        assert waited == [(False,)]
        poll(lambda: states(d).get("replica1") == "primary", "the replica to be promoted",
             30, lambda: (states(d), d.log()))
        with open(args_file, encoding="utf-8") as f:
            assert f.read().split() == [pair.primary.host, str(pair.primary.port),
                                        replica.host, str(replica.port)]
        # the client mid-transaction on the dead primary got an error ...
        with pytest.raises(psycopg.OperationalError) as err:
            session.execute("SELECT 1")
        assert err.value.sqlstate in (None, "08006", "57P01", "57P02")
        session.close()
        # ... the next transaction of a client between transactions goes to the new primary
        conn.execute("INSERT INTO fo VALUES (2)")
        assert conn.execute("SELECT pg_is_in_recovery(), count(*) FROM fo").fetchone() == (
            False, 3)
    log = d.log()
    assert "failover: primary primary is down; promoting replica1" in log
    assert "failover: writes go to replica1" in log
    assert status(d)["servers"][0]["state"] == "down"


def test_a_transaction_that_finds_the_primary_gone_waits_for_the_new_one(
        pgcorral: DaemonFactory, ha_pair: HaPair) -> None:
    """The primary dies between two health rounds (the period is long here): the first
    transaction after its death cannot connect to it. It does not fail with 08006: pgcorral
    asks the health checker for a round now, which finds the primary down and runs the
    failover script, and the transaction runs on the promoted replica."""
    pair = ha_pair
    replica = pair.replica
    script, args_file = _promote_script(
        pair.basedir, replica._as_server_user(
            [replica.bin("pg_ctl"), "promote", "-w", "-D", replica.datadir]))
    with open(os.path.join(pair.basedir, "go"), "w", encoding="utf-8"):
        pass  # the script promotes at once
    d = start(pgcorral, pair, failover="on", failover_script=script,
              health_check_period="60s")
    pair.primary.kill_postmaster()
    with psycopg.connect(d.dsn(), autocommit=True, connect_timeout=30) as conn:
        conn.execute("CREATE TABLE gone (x int)")  # the first transaction after the death
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    assert row == (False,)
    assert os.path.exists(args_file)
    assert states(d).get("replica1") == "primary"
    log = d.log()
    assert "failover: primary primary is down; promoting replica1" in log
    assert "refused a connection; writes go to the new primary replica1" in log


def test_split_brain_refuses_writes(pgcorral: DaemonFactory, ha_pair: HaPair) -> None:
    pair = ha_pair
    d = start(pgcorral, pair)
    conn = psycopg.connect(d.dsn(), autocommit=True)
    conn.execute("SELECT 1")
    pair.replica.promote()  # two servers out of recovery now
    poll(lambda: "split brain" in status(d)["writes_refused"], "split brain to be seen", 20,
         lambda: (states(d), d.log()))
    # refused at login (a worker with no login of this user cached needs a server connection
    # for it: psycopg then raises a plain OperationalError) or at the statement (57P03)
    with pytest.raises(psycopg.OperationalError) as err, psycopg.connect(
            d.dsn(), autocommit=True) as other:
        other.execute("INSERT INTO nothing VALUES (1)")
    assert err.value.sqlstate in (None, "57P03")
    assert "split brain" in str(err.value)
    conn.close()
    assert "both claim to be primary" in d.log()
    # an operator decides: switch-to the old primary ends the refusal
    cli_json(d, "switch-to", "primary")
    poll(lambda: status(d)["writes_refused"] == "", "writes accepted again", 20,
         lambda: status(d))
    with psycopg.connect(d.dsn(), autocommit=True) as other:
        assert other.execute("SELECT inet_server_port()").fetchone() == (pair.primary.port,)
