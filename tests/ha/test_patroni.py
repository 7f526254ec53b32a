"""Patroni end to end (issue 13 part 5): two Patroni nodes on etcd, synchronous replication,
a write load whose every acknowledged commit is remembered, the leader's postmaster killed
with SIGKILL; then every acknowledged row must be on the new primary (lost = 0), and the
figures are reported: write unavailability (first failed write to the first successful write
after it), errors by SQLSTATE, counts.

Two ways in: ``direct`` (libpq's own failover: both nodes in the DSN with
``target_session_attrs=read-write``), the baseline; ``pgcorral`` (pgcorral in front, transaction
pooling, health checks following the role Patroni gives each node, failover = off).

- ``test_failover_short``: one kill, a few clients; part of `make test` (skipped when patroni or
  etcd is missing, failed instead under CI=true).
- ``test_failover_full``: several kills back and forth under more clients; only under
  `make ha-test` (PGCORRAL_HA_TEST=full).

The figures are printed at the end of the run (tests/ha/conftest.py) and written as JSON to
$PGCORRAL_HA_REPORT when it is set.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from tests.ha import report
from tests.ha.daemon import Pgcorral
from tests.ha.fixtures import HEALTH_USER, TEST_DB
from tests.ha.load import CREATE_TABLE, TABLE, WriteLoad
from tests.ha.patroni import HOST, PatroniCluster, PatroniNode, tools_missing

FULL = os.environ.get("PGCORRAL_HA_TEST", "") == "full"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = [pytest.mark.patroni]


@pytest.fixture(scope="module")
def patroni() -> Iterator[PatroniCluster]:
    missing = tools_missing()
    if missing:
        msg = (f"{', '.join(missing)} not installed (apt-get install patroni etcd-server; "
               ".ci/run installs them)")
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    basedir = tempfile.mkdtemp(prefix="pgcorral-patroni-")
    cluster = PatroniCluster.start(basedir)
    try:
        leader = cluster.wait_healthy()
        with psycopg.connect(leader.dsn(), autocommit=True) as conn:
            for sql in (
                f"CREATE ROLE {HEALTH_USER} LOGIN",
                f"CREATE DATABASE {HEALTH_USER} OWNER {HEALTH_USER}",
                "CREATE ROLE trustuser LOGIN",
                f"CREATE DATABASE {TEST_DB}",
            ):
                conn.execute(sql)
        with psycopg.connect(leader.dsn(dbname=TEST_DB), autocommit=True) as conn:
            conn.execute("GRANT ALL ON SCHEMA public TO PUBLIC")
            conn.execute(CREATE_TABLE)
            conn.execute(f"GRANT ALL ON {TABLE} TO PUBLIC")
        yield cluster
    finally:
        cluster.destroy()


def direct_dsn(cluster: PatroniCluster) -> str:
    hosts = ",".join(HOST for _ in cluster.nodes)
    ports = ",".join(str(n.pg_port) for n in cluster.nodes)
    return (f"host={hosts} port={ports} dbname={TEST_DB} user=trustuser "
            "target_session_attrs=read-write")


def health_sessions(node: PatroniNode) -> int:
    with psycopg.connect(node.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT coalesce(sum(sessions), 0) FROM pg_stat_database "
                           "WHERE datname = %s", (HEALTH_USER,)).fetchone()
    return int(row[0]) if row else 0


def wait_for(what: str, timeout: float, check: Any, on_fail: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            extra = on_fail() if on_fail is not None else ""
            pytest.fail(f"no {what} after {timeout:g} s\n{extra}", pytrace=False)
        time.sleep(0.05)


_run_ids = iter(range(1, 1_000_000))


def run_failovers(
    cluster: PatroniCluster, mode: str, *, clients: int, failovers: int, settle: float,
    workdir: str,
) -> dict[str, Any]:
    """The scenario: load on, kill the leader's postmaster ``failovers`` times (waiting for the
    old leader to rejoin as synchronous standby between kills), load off, check, report."""
    leader = cluster.wait_healthy()
    daemon: Pgcorral | None = None
    load: WriteLoad | None = None
    windows: list[dict[str, Any]] = []
    kills: list[float] = []
    stuck: list[int] = []
    t_setup = time.monotonic()
    try:
        if mode == "pgcorral":
            before = health_sessions(leader)
            daemon = Pgcorral(
                os.path.join(workdir, "pgcorral"),
                [(n.name, n.pg_port, n is leader) for n in cluster.nodes],
                None,
            )
            daemon.wait_started()
            # the health check runs (it logs in as pgcorral_health to its database)
            wait_for("health check session from pgcorral", 15,
                     lambda: health_sessions(leader) > before, daemon.log)
            dsn = daemon.dsn()
        else:
            dsn = direct_dsn(cluster)

        def diag() -> str:
            own = f"--- pgcorral ---\n{daemon.log()[-8000:]}\n" if daemon is not None else ""
            return own + cluster.logs()

        load = WriteLoad(dsn, clients, next(_run_ids))
        load.start()
        wait_for("acknowledged write from every client", 30,
                 lambda: all(c.acked for c in load.clients), diag)
        for i in range(failovers):
            if i:
                leader = cluster.wait_healthy(timeout=120)  # the old leader is back, in sync
            t_kill = time.monotonic()
            kills.append(t_kill)
            killed = leader
            killed.kill_postmaster()
            new = cluster.wait_leader(timeout=60, other_than=killed)
            t_new = time.monotonic()
            wait_for("successful write after the new leader", 60,
                     lambda t=t_new: load.first_success_after(t), diag)
            # every client writes again (new transactions go to the new primary)
            wait_for("successful write from every client after the failover", 60,
                     lambda t=t_new: load.all_succeeded_since(t), diag)
            time.sleep(settle)  # the load keeps running a few seconds on the new primary
            windows.append({"killed": killed.name, "new_leader": new.name,
                            "leader_switch_s": round(t_new - t_kill, 3)})
    finally:
        if load is not None:
            stuck = load.stop()
        if daemon is not None:
            daemon.stop()
    t_end = time.monotonic()
    if daemon is not None and "Traceback" in daemon.log():
        pytest.fail(f"pgcorral logged a Traceback:\n{daemon.log()[-8000:]}", pytrace=False)
    for i, w in enumerate(windows):
        w.update(load.window(kills[i], kills[i + 1] if i + 1 < len(kills) else t_end))
    primary = cluster.wait_leader()
    result: dict[str, Any] = {
        "mode": mode,
        "workers": int(os.environ.get("PGCORRAL_TEST_WORKERS", "1")) if daemon else None,
        "failovers": windows,
        **load.totals(),
        **load.check(primary.dsn(dbname=TEST_DB)),
        "stuck_clients": len(stuck),
        "duration_s": round(t_end - t_setup, 1),
    }
    report.add(result)
    return result


def check_result(result: dict[str, Any]) -> None:
    assert result["lost"] == 0, f"acknowledged commits lost: {result}"
    assert result["stuck_clients"] == 0, result
    assert result["unexpected_rows"] == 0, result
    assert result["sync_rep_cancel_warnings"] == 0, result
    for w in result["failovers"]:
        assert w["kill_to_recovery_s"] is not None, w
        assert w["clients_recovered"] == result["clients"], w
        if w["unavailable_s"] is not None:
            assert w["unavailable_s"] < 45, w


MODES = ["direct", "pgcorral"]


@pytest.mark.skipif(FULL, reason="the full variant runs instead")
@pytest.mark.timeout(300)  # the Patroni cluster starts in its first test: 10 to 60 s
@pytest.mark.parametrize("mode", MODES)
def test_failover_short(patroni: PatroniCluster, mode: str, tmp_path: Any) -> None:
    result = run_failovers(patroni, mode, clients=6, failovers=1, settle=2.0,
                           workdir=str(tmp_path))
    check_result(result)


@pytest.mark.skipif(not FULL, reason="long: `make ha-test` (PGCORRAL_HA_TEST=full)")
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", MODES)
def test_failover_full(patroni: PatroniCluster, mode: str, tmp_path: Any) -> None:
    result = run_failovers(patroni, mode, clients=16, failovers=3, settle=5.0,
                           workdir=str(tmp_path))
    check_result(result)


def test_report_json_is_written(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's JSON goes where PGCORRAL_HA_REPORT says (no cluster needed)."""
    path = tmp_path / "ha.json"
    monkeypatch.setenv("PGCORRAL_HA_REPORT", str(path))
    report.write_json([{"mode": "x", "lost": 0}])
    assert json.loads(path.read_text())["runs"][0]["lost"] == 0
    shutil.rmtree(tmp_path, ignore_errors=True)
