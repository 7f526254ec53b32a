"""``workers = N``: a supervisor and N worker processes that serve as one pooler.

Limits hold across workers at every instant (a sampler reads pg_stat_activity throughout), a
cancel reaches the right backend whichever worker it lands on, management sees one pooler, and
a worker killed with SIGKILL harms only its own clients.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from psycopg import errors
from tests.integration.test_management import cli, cli_json, poll

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory


def workers_of(d: Daemon) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = cli_json(d, "status")["workers"]
    return workers


class Sampler(threading.Thread):
    """Counts pgcorral's backends in pg_stat_activity, per (database, user), until stopped."""

    def __init__(self, pg: PgCluster) -> None:
        super().__init__(daemon=True)
        self.pg = pg
        self.stop_event = threading.Event()
        self.max_total = 0
        self.max_per: dict[tuple[str, str], int] = {}
        self.samples = 0

    def run(self) -> None:
        with psycopg.connect(self.pg.dsn(), autocommit=True) as conn:
            while not self.stop_event.is_set():
                rows = conn.execute(
                    "SELECT datname, usename, count(*) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
                    "AND usename = 'trustuser' GROUP BY 1, 2").fetchall()
                self.max_total = max(self.max_total, sum(r[2] for r in rows))
                for db, user, n in rows:
                    self.max_per[(db, user)] = max(self.max_per.get((db, user), 0), n)
                self.samples += 1
                time.sleep(0.005)

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.join(10)


def test_status_sees_every_worker(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"workers": "2"})
    workers = workers_of(d)
    assert sorted(w["worker"] for w in workers) == [0, 1]
    assert len({w["pid"] for w in workers} | {d.pid}) == 3  # two children of the supervisor
    conns = [psycopg.connect(d.dsn(), autocommit=True) for _ in range(6)]
    try:
        status = cli_json(d, "status")
        assert status["clients"] == 6 == sum(w["clients"] for w in status["workers"])
        assert status["active_connections"] == 6
        details = cli_json(d, "status", "details")
        pids = sorted(c.info.backend_pid for c in conns)
        assert sorted(s["pid"] for s in details["sessions"]) == pids
        assert sorted(c["pid"] for c in details["connections"]) == pids
    finally:
        for conn in conns:
            conn.close()


def hammer_sessions(d: Daemon, dbname: str, clients: int, seconds: float) -> list[str]:
    """``clients`` threads, each connecting, running one query and leaving, again and again
    (pgbench -C cannot: its threads connect synchronously, so with fewer server connections
    than clients a thread waits for a login behind sessions it opened itself)."""
    problems: list[str] = []
    deadline = time.monotonic() + seconds

    def one() -> None:
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(d.dsn(dbname=dbname), autocommit=True) as conn:
                    conn.execute("SELECT 1")
            except psycopg.Error as exc:
                problems.append(str(exc))
                return

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return problems


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_limits_hold_across_workers(pgcorral: DaemonFactory, pg: PgCluster, workers: int,
                                    pipeline: str) -> None:
    """Hundreds of clients on two databases; max_connections 6, pgcorral_test at most 3."""
    d = pgcorral({"workers": str(workers), "max_connections": "6", "pipeline": pipeline,
                  "blocking_timeout": "60"},
                 limits="pgcorral_test trustuser 3 0 0\n")
    script = os.path.join(d.dir, "select.sql")
    with open(script, "w", encoding="utf-8") as f:
        f.write("SELECT 1;\n")
    with Sampler(pg) as sampler:
        if pipeline == "session":
            results: list[list[str]] = []
            runs = [threading.Thread(target=lambda db=db: results.append(
                hammer_sessions(d, db, 50, 4))) for db in ("pgcorral_test", "db2")]
            for run in runs:
                run.start()
            for run in runs:
                run.join(180)
            assert results == [[], []]
        else:
            procs = [subprocess.Popen(
                [pg.bin("pgbench"), "-n", "-f", script, "-c", "100", "-j", "2", "-T", "4",
                 "-h", d.host, "-p", str(d.port), "-U", "trustuser", db],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for db in ("pgcorral_test", "db2")]
            for proc in procs:
                out = proc.communicate(timeout=120)[0]
                assert proc.returncode == 0, out
    assert sampler.samples > 50
    assert sampler.max_total <= 6, sampler.max_per
    assert sampler.max_per.get(("pgcorral_test", "trustuser"), 0) <= 3, sampler.max_per
    assert sampler.max_per.get(("db2", "trustuser"), 0) >= 1


def test_idle_connection_of_another_worker_makes_room(pgcorral: DaemonFactory) -> None:
    """max_connections = 1: each new client needs the one connection, idle in whichever worker
    served the previous client; it must never wait out blocking_timeout for it."""
    d = pgcorral({"workers": "2", "max_connections": "1", "blocking_timeout": "20"})
    started = time.monotonic()
    for db in ["pgcorral_test", "db2"] * 8:
        with psycopg.connect(d.dsn(dbname=db), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert time.monotonic() - started < 15
    status = cli_json(d, "status")
    assert status["total_connections"] <= 1


def test_idle_connection_changes_worker_with_its_backend(pgcorral: DaemonFactory) -> None:
    """Session pooling, max_connections = 1, one database/user: a client reaching the worker
    without the connection gets it handed over (same backend), not closed and opened again."""
    d = pgcorral({"workers": "2", "max_connections": "1", "blocking_timeout": "20"})
    pids = set()
    # which worker accepts is the kernel's choice, and runs of the same worker are common:
    # enough clients that two changes of worker are all but certain (the loop ends at two)
    for _ in range(150):
        with psycopg.connect(d.dsn(), autocommit=True) as conn:
            pids.add(conn.info.backend_pid)
        if cli_json(d, "status")["counters"]["server_connections_adopted"] >= 2:
            break
    assert cli_json(d, "status")["counters"]["server_connections_adopted"] >= 2
    assert len(pids) == 1, "the backend changed: the connection was not handed over"


def test_cancel_through_another_worker(pgcorral: DaemonFactory) -> None:
    # SO_REUSEPORT sockets: the kernel hashes each connection to a worker, so a cancel
    # request (a connection of its own) lands on the other worker about half the time
    d = pgcorral({"workers": "2"}, env={"PGCORRAL_LISTEN": "reuseport"})
    crossed = 0
    for _ in range(60):
        with psycopg.connect(d.dsn(), autocommit=True) as conn:
            timer = threading.Timer(0.3, conn.cancel)
            timer.start()
            with pytest.raises(errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            timer.join()
        crossed = d.log().count("reached another worker")
        if crossed >= 2:
            break
    assert crossed >= 2, "no cancel request landed on a worker other than its client's"
    with psycopg.connect(d.dsn(), autocommit=True) as conn:  # a bogus key cancels nothing
        info = conn.pgconn
        assert info.backend_pid
        with psycopg.connect(d.dsn(), autocommit=True) as other:
            other.execute("SELECT 1")


def test_kill_9_of_a_worker_harms_only_its_clients(pgcorral: DaemonFactory,
                                                   pg: PgCluster) -> None:
    # each worker its own listening socket (SO_REUSEPORT): on one shared socket the kernel
    # may give one worker nearly every connection (CI saw 48 of 50), and that worker's share
    # of max_connections then runs out before the other has three clients
    d = pgcorral({"workers": "2", "max_connections": "70"},
                 env={"PGCORRAL_LISTEN": "reuseport"})
    conns: list[psycopg.Connection[Any]] = []
    try:
        _kill_9_of_a_worker(d, pg, conns)
    finally:
        for conn in conns:
            conn.close()


def _kill_9_of_a_worker(d: Daemon, pg: PgCluster, conns: list[psycopg.Connection[Any]]) -> None:
    details = None
    for _ in range(60):  # until each worker serves a few (the kernel picks the worker)
        conns.append(psycopg.connect(d.dsn(), autocommit=True))
        details = cli_json(d, "status", "details") if len(conns) >= 6 else None
        if details is not None and min(w["clients"] for w in details["workers"]) >= 3:
            break
    assert details is not None
    worker_of = {s["pid"]: s["worker"] for s in details["sessions"]}
    victims = [c for c in conns if worker_of[c.info.backend_pid] == 0]
    survivors = [c for c in conns if worker_of[c.info.backend_pid] == 1]
    assert len(victims) >= 3 and len(survivors) >= 3
    victim_pid = next(w["pid"] for w in details["workers"] if w["worker"] == 0)
    errors_seen = []
    stop = threading.Event()

    def hammer(conn: psycopg.Connection[Any]) -> None:
        while not stop.is_set():
            try:
                conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                errors_seen.append((conn, exc))
                return

    threads = [threading.Thread(target=hammer, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    time.sleep(0.3)
    os.kill(victim_pid, signal.SIGKILL)
    d.wait_for_log(f"worker 0 (pid {victim_pid}) died")
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    failed = {id(c) for c, _ in errors_seen}
    assert failed == {id(c) for c in victims}
    for conn in survivors:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    poll(lambda: len(workers_of(d)) == 2 and victim_pid not in
         [w["pid"] for w in workers_of(d)], "a new worker 0")
    victim_backends = [c.info.backend_pid for c in victims]
    pids = ",".join(map(str, victim_backends))
    poll(lambda: pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid IN ({pids})"
                         ).strip() == "0",
         "the dead worker's backends to end")
    assert cli_json(d, "status")["total_connections"] == len(survivors)
    with psycopg.connect(d.dsn(), autocommit=True) as conn:  # service goes on
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_reload_flush_and_graceful_shutdown_with_workers(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"workers": "2"})
    conf = os.path.join(d.dir, "pgcorral.conf")
    with open(conf, "a", encoding="utf-8") as f:
        f.write("")
    text = Path(conf).read_text(encoding="utf-8").replace("[pgcorral]\n",
                                                        "[pgcorral]\nblocking_timeout = 7\n")
    with open(conf, "w", encoding="utf-8") as f:
        f.write(text)
    d.wait_for_log("2 workers")
    d.signal(signal.SIGHUP)
    d.wait_for_log("configuration reloaded")
    assert cli_json(d, "conf", "get", "blocking_timeout")["value"] == 7
    assert cli(d, "disable", "db2").returncode == 0
    for _ in range(4):  # every worker refuses it
        with pytest.raises(psycopg.OperationalError, match="disabled"):
            psycopg.connect(d.dsn(dbname="db2"))
    assert cli(d, "enable", "db2").returncode == 0
    with psycopg.connect(d.dsn(dbname="db2")) as conn:
        conn.execute("SELECT 1")
    flushed = cli_json(d, "flush", "idle")
    assert flushed["closed"] >= 1
    conn = psycopg.connect(d.dsn())
    conn.execute("SELECT 1")  # in a transaction
    d.signal(signal.SIGTERM)
    d.wait_for_log("graceful shutdown")
    for _ in range(4):
        with pytest.raises(psycopg.OperationalError, match="shutting down"):
            psycopg.connect(d.dsn())
    conn.execute("SELECT 2")
    conn.commit()
    conn.close()
    d.proc.wait(15)
    assert d.proc.returncode == 0


def test_workers_stop_when_the_supervisor_is_killed(pgcorral: DaemonFactory) -> None:
    """No orphans: a worker whose control channel ends stops at once (it ignores SIGTERM and
    SIGINT, which are the supervisor's to handle)."""
    d = pgcorral({"workers": "2"})
    pids = [w["pid"] for w in workers_of(d)]
    assert len(pids) == 2
    d.signal(signal.SIGKILL)
    d.proc.wait(10)
    poll(lambda: not any(running(pid) for pid in pids), "the workers to exit")


def running(pid: int) -> bool:
    """Is ``pid`` a live process (a zombie nobody reaped yet counts as gone)?"""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
