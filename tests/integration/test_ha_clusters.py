"""The HA clusters of tests/ha/fixtures.py work: the pair replicates, the delayed replica lags
and then catches up, promotion makes a writable primary, a killed replica comes back, and
synchronous replication keeps every acknowledged commit across a kill of the primary."""

from __future__ import annotations

import time

import psycopg
import pytest
from devtools.pgcluster import PgClusterError
from tests.ha import fixtures
from tests.ha.fixtures import HEALTH_USER, TEST_DB, HaPair, HaPairFactory

# the fixtures of tests/ha (that conftest.py does not reach this directory)
ha_template = fixtures.ha_template
ha_pair_factory = fixtures.ha_pair_factory
ha_pair = fixtures.ha_pair
ha_pair_delayed = fixtures.ha_pair_delayed


def count(cluster_dsn: str) -> int:
    with psycopg.connect(cluster_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM t").fetchone()
        assert row is not None
        return int(row[0])


def test_pair_replicates(ha_pair: HaPair) -> None:
    p, r = ha_pair.primary, ha_pair.replica
    assert not p.is_in_recovery()
    assert r.is_in_recovery()
    rep = p.psql("SELECT application_name, state FROM pg_stat_replication").split()
    assert rep == ["replica1|streaming"]
    p.psql("CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 100)", dbname=TEST_DB)
    ha_pair.sync()
    assert count(r.dsn(dbname=TEST_DB)) == 100
    # a replica refuses writes (25006 read_only_sql_transaction)
    with psycopg.connect(r.dsn(dbname=TEST_DB), autocommit=True) as conn, pytest.raises(
        psycopg.errors.ReadOnlySqlTransaction
    ):
        conn.execute("INSERT INTO t VALUES (1)")
    # the health user logs in to its own database on both, without a password
    for c in (p, r):
        assert c.psql("SELECT pg_is_in_recovery()", dbname=HEALTH_USER,
                      user=HEALTH_USER).strip() in ("t", "f")
        assert c.psql("SELECT current_user", user="trustuser", dbname=TEST_DB).strip() == (
            "trustuser")


def test_delayed_replica_lags_then_catches_up(ha_pair_delayed: HaPair) -> None:
    p, r = ha_pair_delayed.primary, ha_pair_delayed.replica
    p.psql("CREATE TABLE t (x int)", dbname=TEST_DB)
    ha_pair_delayed.sync()
    for attempt in range(1, 4):
        t0 = time.monotonic()
        p.psql(f"INSERT INTO t VALUES ({attempt})", dbname=TEST_DB)
        lsn = p.current_lsn()
        # received at once, not replayed: the read on the replica misses the committed row
        seen = count(r.dsn(dbname=TEST_DB))
        if time.monotonic() - t0 < 1.5:
            break
        r.wait_replayed(lsn, timeout=10)  # the read came too late to show the lag: again
    else:
        pytest.fail("no read within 1.5 s of a commit in 3 attempts: the lag was not tested")
    assert seen == attempt - 1
    r.wait_replayed(lsn, timeout=10)
    caught_up = time.monotonic() - t0
    assert count(r.dsn(dbname=TEST_DB)) == attempt
    assert 1.8 <= caught_up < 6, caught_up
    # the lag shows in the replica's view too (what a health check measures)
    assert r.replay_lsn() is not None


def test_promote_after_primary_killed(ha_pair_factory: HaPairFactory) -> None:
    pair = ha_pair_factory(synchronous=True)
    p, r = pair.primary, pair.replica
    p.psql("CREATE TABLE t (x int)", dbname=TEST_DB)
    with psycopg.connect(p.dsn(dbname=TEST_DB), autocommit=True) as conn:
        for i in range(200):
            conn.execute("INSERT INTO t VALUES (%s)", (i,))  # each acknowledged by the replica
    assert p.psql("SELECT sync_state FROM pg_stat_replication").strip() == "sync"
    assert p.kill_postmaster() is not None
    with pytest.raises(PgClusterError):
        p.psql("SELECT 1")
    r.promote()
    assert not r.is_in_recovery()
    assert count(r.dsn(dbname=TEST_DB)) == 200  # synchronous: no acknowledged commit lost
    with psycopg.connect(r.dsn(dbname=TEST_DB), autocommit=True) as conn:
        conn.execute("INSERT INTO t VALUES (-1)")
    assert count(r.dsn(dbname=TEST_DB)) == 201


def test_killed_replica_comes_back(ha_pair: HaPair) -> None:
    p, r = ha_pair.primary, ha_pair.replica
    p.psql("CREATE TABLE t (x int)", dbname=TEST_DB)
    r.kill_postmaster()
    p.psql("INSERT INTO t SELECT generate_series(1, 50)", dbname=TEST_DB)  # kept for it by the slot
    r.start()
    r.wait_streaming()
    ha_pair.sync()
    assert count(r.dsn(dbname=TEST_DB)) == 50


def test_old_primary_rejoins_as_replica(ha_pair: HaPair) -> None:
    p, r = ha_pair.primary, ha_pair.replica
    p.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)", dbname=TEST_DB)
    ha_pair.sync()
    p.kill_postmaster()
    r.promote()
    r.psql("INSERT INTO t VALUES (2)", dbname=TEST_DB)
    p.rejoin(r, name="old_primary", slot="old_primary")  # pg_rewind, then a standby of r
    assert p.is_in_recovery()
    p.wait_replayed(r.current_lsn())
    assert count(p.dsn(dbname=TEST_DB)) == 2
    assert r.psql("SELECT application_name FROM pg_stat_replication").split() == ["old_primary"]
