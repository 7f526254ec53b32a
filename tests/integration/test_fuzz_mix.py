"""The mixing fuzzer's short run (issue 15, item 2; the long run is `make fuzz`, the fuzzer
is tests/fuzz/mixer.py) and minimal reproductions of what it found.

FUZZ_CI_TRANSACTIONS (default 12000) and FUZZ_CI_SECONDS (default 45, 0 = none; whichever comes
first) size the short run (its pytest timeout follows); FUZZ_SEED replays a seed (every
failure message and the summary name it). Workers: as the rest of the suite,
PGCORRAL_TEST_WORKERS."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from typing import TYPE_CHECKING

import psycopg
import pytest
from tests.fuzz.mixer import Client, Config, Mixed, Run, Stale, Target, direct, fuzz, setup, verify
from tests.integration.test_transaction import TEST_DB, tx_conf

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import DaemonFactory

USER = "trustuser"
CI_TRANSACTIONS = int(os.environ.get("FUZZ_CI_TRANSACTIONS") or 12_000)
CI_SECONDS = float(os.environ.get("FUZZ_CI_SECONDS") or 45)  # 0: no time limit
# pytest-timeout's 120 s would cut a bigger run: the budget plus a margin, or 30 min
CI_TIMEOUT = CI_SECONDS + 90 if CI_SECONDS > 0 else 1800


@pytest.mark.timeout(CI_TIMEOUT)
def test_fuzz_mix(pg: PgCluster, pgcorral: DaemonFactory) -> None:
    """Random mixes of transactions from 16 clients over 4 server connections, with cancels,
    disconnects, RSTs and pg_terminate_backend: no transaction sees another's backend, txid,
    settings or replies, and each client's rows are exactly its committed ones."""
    seed = int(os.environ.get("FUZZ_SEED") or random.randrange(1 << 32))
    config = Config(
        seed=seed,
        transactions=CI_TRANSACTIONS,
        seconds=CI_SECONDS,
        clients=16,
        kill_interval=0.25,
    )
    d = pgcorral(conf_extra=tx_conf(4, blocking_timeout="30"))
    target = Target(host=d.host, port=d.port, database=TEST_DB, user=USER,
                    direct_host=pg.host, direct_port=pg.port, direct_user="postgres",
                    table="public.fuzz_mix_rows")
    result = asyncio.run(fuzz(target, config))
    print(result.summary())
    assert result.transactions >= 1000, result.summary()  # it ran, and with every kind of op
    assert all(result.ops[n] for n in ("pg_copy", "ps_pipeline", "pg_cancel", "ps_disconnect",
                                        "ps_simple", "pg_savepoint")), result.summary()
    assert result.kills > 0 and result.committed > 0, result.summary()
    assert not result.failures, result.summary()
    assert result.mixed + result.leaked == 0, result.summary()


# ------------------------------------------------------------------ what the fuzzer found


def test_custom_setting_does_not_leak(pgcorral: DaemonFactory) -> None:
    """Found by the fuzzer (FUZZ_OWNER_GUC=fuzz.owner): a custom setting is not listed in
    pg_settings, so the ledger's probe missed it, and the next client of the connection read
    it. The ledger now follows custom names the client's SQL shows."""
    d = pgcorral(conf_extra=tx_conf(1, workers="1"))  # (both clients in one pool)
    with psycopg.connect(d.dsn(), autocommit=True) as a, \
            psycopg.connect(d.dsn(), autocommit=True) as b:
        a.execute("SET fuzz.owner = 'a'")
        assert a.execute("SELECT current_setting('fuzz.owner', true)").fetchone() == ("a",)
        # one server connection: b's statement runs on the backend a's SET ran on
        got = b.execute("SELECT current_setting('fuzz.owner', true)").fetchone()
        assert got in ((None,), ("",)), f"b reads a's setting: {got}"
        assert a.execute("SELECT current_setting('fuzz.owner', true)").fetchone() == ("a",)


def test_prepared_rollback_in_aborted_transaction(pgcorral: DaemonFactory) -> None:
    """Found by the fuzzer: a named Parse of ROLLBACK in an aborted transaction succeeds on
    PostgreSQL (a transaction-exit statement); pgcorral sent it again to make the server
    refuse it, and got 42P05 "prepared statement pgc_N already exists"."""
    d = pgcorral(conf_extra=tx_conf(1, workers="1"))  # (both clients in one pool)
    with psycopg.connect(d.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for _ in range(3):
            conn.execute("BEGIN")
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1/0")
            conn.execute("ROLLBACK")  # the second time: 42P05 through pgcorral
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_set_survives_a_failed_probe(pg: PgCluster, pgcorral: DaemonFactory) -> None:
    """Found by the fuzzer: the server connection dies during the session-state probe after
    a SET the client was told succeeded. The client's session then ends (08006), as when its
    backend dies, rather than going on silently without the setting."""
    d = pgcorral(conf_extra=tx_conf(2, workers="1"))
    locker = psycopg.connect(pg.dsn(dbname=TEST_DB))
    outcome: list[object] = []
    with psycopg.connect(d.dsn(), autocommit=True) as a:
        try:
            # the probe reads pg_settings: with the view locked, it waits, and is killed there
            locker.execute("LOCK TABLE pg_catalog.pg_settings IN ACCESS EXCLUSIVE MODE")

            def set_it() -> None:
                try:
                    a.execute("SET search_path = a_s1")
                    outcome.append("ok")
                except psycopg.Error as e:
                    outcome.append(e)

            t = threading.Thread(target=set_it)
            t.start()
            deadline = time.monotonic() + 10
            while True:
                row = locker.execute(
                    "SELECT pid FROM pg_stat_activity WHERE usename = %s AND "
                    "wait_event_type = 'Lock'", (USER,)).fetchone()
                if row:
                    break
                assert time.monotonic() < deadline, "the probe never waited for the lock"
                time.sleep(0.01)
            locker.execute("SELECT pg_terminate_backend(%s)", row)
        finally:
            locker.rollback()
            locker.close()
        t.join(10)
        assert outcome, "SET did not return"
        if outcome[0] == "ok":
            # the client was told SET succeeded, and its server connection died before
            # pgcorral learnt the state: the session ends (08006), as when a backend dies;
            # it never goes on silently without its setting
            with pytest.raises(psycopg.OperationalError):
                a.execute("SHOW search_path")


def test_fuzzer_checks_fire(pg: PgCluster) -> None:
    """The checks are not vacuous: a probe with another backend, txid, owner or tag, and rows
    that are not exactly the committed ones, are each caught."""
    target = Target(host=pg.host, port=pg.port, database=TEST_DB, user=USER,
                    direct_host=pg.host, direct_port=pg.port, direct_user="postgres",
                    table="public.fuzz_check_rows")
    run = Run(target, Config(seed=7))
    client = Client(run, 3)
    client.owner = "c3_s1"
    client.begin_txn()
    good = [100, "5", "c3_s1", None, "c3", client.tag(0)]
    client.check_probe(good, 0)
    for i, wrong in ((0, 101), (1, "6"), (2, "c4_s1"), (3, "x"), (4, "c4"), (5, "c4:1:x:0")):
        row = list(good)
        row[i] = wrong
        with pytest.raises(Mixed):
            client.check_probe(row, 0)
    with pytest.raises(Mixed):  # its own earlier value: a lost SET counts as mixed
        client.check_probe([100, "5", "c3_s0", None, "c3", client.tag(0)], 0)
    stale = Client(Run(target, Config(seed=7, known_bugs=False)), 3)  # the old rule, apart
    stale.owner = "c3_s1"
    stale.begin_txn()
    with pytest.raises(Stale):
        stale.check_probe([100, "5", "c3_s0", None, "c3", stale.tag(0)], 0)

    async def rows() -> None:
        await setup(target)
        conn = await direct(target)
        await conn.execute(f"INSERT INTO {target.table} VALUES ('c3', 1, ''), ('c3', 2, ''),"
                           " ('c9', 1, '')")
        await conn.close()
        client.committed = {1, 3}  # 3 missing, 2 never committed, c9 unknown
        await verify(run, [client])

    asyncio.run(rows())
    assert run.result.leaked == 3, run.result.failures
