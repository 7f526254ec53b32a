"""The SQL admin console (issue 12 item 3, its part of 6 and 7): database ``pgcorral`` or
``pgbouncer``, PgBouncer's SHOW views and commands, driven with psql and psycopg.

The column lists are checked against a real PgBouncer (Debian's package) started here on the
same PostgreSQL: PgBouncer's columns (names and type OIDs) must be a prefix of pgcorral's.
Every test runs with one and with two workers (`make test` runs the suite both ways).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from devtools.pgcluster import PgCluster, find_free_port, unprivileged_user
from tests.conftest import Daemon, DaemonFactory
from tests.integration.test_management import cli_json, poll
from tests.pgwire import connect_error, error_fields, read_message, startup_packet
from tests.vaultfiles import write_vault

pytestmark = pytest.mark.integration

WORKERS = int(os.environ.get("PGCORRAL_TEST_WORKERS", "1"))
PGBOUNCER = "/usr/sbin/pgbouncer"
ADMIN, ADMIN_PW = "consoleadmin", "adminpw"
STATS, STATS_PW = "consolestats", "statspw"
PLAIN, PLAIN_PW = "plainuser", "plainpw"
VAULT_ADMIN, VAULT_ADMIN_PW = "vaultadmin", "vaultpw"
HBA = "host all all all all\nlocal all all trust\n"
#: The views PgBouncer 1.18 has (SHOW STATE came in 1.19).
VIEWS = ["POOLS", "STATS", "STATS_TOTALS", "STATS_AVERAGES", "TOTALS", "CLIENTS", "SERVERS",
         "DATABASES", "USERS", "CONFIG", "LISTS", "VERSION", "MEM", "SOCKETS", "FDS",
         "ACTIVE_SOCKETS", "DNS_HOSTS", "DNS_ZONES"]


def start(pgcorral: DaemonFactory, tmp_path: Path, listen: str = "", **conf: str) -> Daemon:
    users, env = write_vault(tmp_path, {ADMIN: ADMIN_PW, STATS: STATS_PW, PLAIN: PLAIN_PW})
    if listen:
        env["PGCORRAL_LISTEN"] = listen
    admins, _ = write_vault(tmp_path, {VAULT_ADMIN: VAULT_ADMIN_PW}, name="admins.conf")
    return pgcorral(conf_extra={"admin_users": f"{ADMIN}, other", "stats_users": STATS, **conf},
                    hba=HBA, env=env, args=["-u", users, "-A", admins])


@pytest.fixture
def daemon(pgcorral: DaemonFactory, tmp_path: Path) -> Daemon:
    return start(pgcorral, tmp_path)


def console(d: Daemon, user: str = ADMIN, password: str | None = ADMIN_PW,
            dbname: str = "pgcorral", **params: str) -> psycopg.Connection[Any]:
    """A console session; psycopg sends a statement without parameters as a simple Query."""
    return psycopg.connect(d.dsn(dbname=dbname, user=user, password=password, **params),
                           autocommit=True, prepare_threshold=None)


def show(conn: psycopg.Connection[Any], what: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SHOW {what}")
    assert cur.description is not None
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def columns(conn: psycopg.Connection[Any], what: str) -> list[tuple[str, int]]:
    cur = conn.execute(f"SHOW {what}")
    assert cur.description is not None, what
    return [(c.name, c.type_code) for c in cur.description]


def failure(conn: psycopg.Connection[Any], statement: str) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(statement)
    return caught.value


def psql(pg: PgCluster, dsn: str, *commands: str, password: str = ADMIN_PW,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    args = [pg.bin("psql"), "-X", "-A", "-F", ","]
    for command in commands:
        args += ["-c", command]
    env = {**os.environ, "PGPASSWORD": password}
    return subprocess.run([*args, dsn], input=stdin, capture_output=True, text=True, env=env,
                          timeout=30, check=False)


# --- who may connect ----------------------------------------------------------------------


@pytest.mark.parametrize("dbname", ["pgcorral", "pgbouncer"])
def test_admin_stats_and_admins_vault_users_log_in_with_scram(daemon: Daemon,
                                                              dbname: str) -> None:
    for user, password in ((ADMIN, ADMIN_PW), (STATS, STATS_PW),
                           (VAULT_ADMIN, VAULT_ADMIN_PW)):
        with console(daemon, user, password, dbname) as conn:
            assert show(conn, "VERSION")[0]["version"].startswith("pgcorral ")
            assert conn.info.parameter_status("server_version").endswith("/pgcorral")
            assert conn.info.parameter_status("client_encoding") == "UTF8"
            assert conn.info.parameter_status("standard_conforming_strings") == "on"
            assert conn.info.parameter_status("integer_datetimes") == "on"


@pytest.mark.parametrize("dbname", ["pgcorral", "pgbouncer"])
def test_a_user_not_listed_gets_28000(daemon: Daemon, dbname: str) -> None:
    error = connect_error(daemon.host, daemon.port, {"user": PLAIN, "database": dbname})
    assert error is not None and error["C"] == "28000", error
    assert "not allowed to connect to the admin console" in error["M"]
    # the same user may use other databases: only the console refuses
    with pytest.raises(psycopg.OperationalError, match="not allowed to connect to the admin"):
        console(daemon, PLAIN, PLAIN_PW, dbname)


def test_wrong_password_is_28p01(daemon: Daemon) -> None:
    with pytest.raises(psycopg.OperationalError,
                       match=f'password authentication failed for user "{ADMIN}"'):
        console(daemon, ADMIN, "wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        console(daemon, VAULT_ADMIN, ADMIN_PW)  # the admins vault password, not another


def test_hba_applies_trust_and_reject(pgcorral: DaemonFactory, tmp_path: Path) -> None:
    d = start(pgcorral, tmp_path)
    # unix socket: hba `local all all trust` lets a listed user in without a password, not
    # an unlisted one
    with console(d, ADMIN, None, host=d.socket_dir) as conn:
        assert show(conn, "VERSION")
    with pytest.raises(psycopg.OperationalError, match="not allowed to connect"):
        console(d, PLAIN, None, host=d.socket_dir)
    d.stop()
    users, env = write_vault(tmp_path, {ADMIN: ADMIN_PW})
    d = pgcorral(conf_extra={"admin_users": ADMIN}, env=env, args=["-u", users],
                 hba=f"host pgbouncer {ADMIN} all reject\nhost all all all all\n")
    error = connect_error(d.host, d.port, {"user": ADMIN, "database": "pgbouncer"})
    assert error is not None and error["C"] == "28000" and "rejects" in error["M"], error
    with console(d, dbname="pgcorral") as conn:
        assert show(conn, "VERSION")


def test_stats_user_may_show_but_not_command(daemon: Daemon) -> None:
    with console(daemon, STATS, STATS_PW) as conn:
        assert show(conn, "POOLS") is not None
        for statement in ("PAUSE", "RELOAD", "DISABLE pgcorral_test", "SET log_level = debug",
                          "SHUTDOWN", "KILL_CLIENT 1"):
            error = failure(conn, statement)
            assert error.sqlstate == "42501", (statement, error)
            assert "admin access needed" in str(error)
        cur = conn.execute("SHOW HELP")
        assert cur.statusmessage == "SHOW"
    assert cli_json(daemon, "status")["disabled"] == []


# --- statements and errors ------------------------------------------------------------------


def test_unknown_statements_get_errors_and_the_session_goes_on(daemon: Daemon) -> None:
    with console(daemon) as conn:
        for statement, text in [
                ("SELECT 1", "invalid command 'SELECT 1', use SHOW HELP;"),
                ("SHOW foo", "invalid command 'SHOW foo', use SHOW HELP;"),
                ("SHOW", "invalid command 'SHOW', use SHOW HELP;"),
                ("SHOW POOLS; SHOW USERS", "invalid command 'SHOW POOLS; SHOW USERS'"),
                ("DISABLE", "a database is required"),
                ("SET no_such_key = 1", "unknown configuration key 'no_such_key'"),
                ("SUSPEND", "SUSPEND is not supported by pgcorral"),
                ("KILL_CLIENT 999999", "no client with id 999999")]:
            error = failure(conn, statement)
            assert text in str(error), (statement, str(error))
            assert error.sqlstate in ("08P01", "0A000"), (statement, error.sqlstate)
        # case-insensitive, trailing semicolon
        assert show(conn, "version;")[0]["version"].startswith("pgcorral")
        assert conn.execute("show Pools;").statusmessage == "SHOW"


def test_extended_protocol_is_refused(daemon: Daemon) -> None:
    refused = (b"extended query protocol not supported by admin console; use the simple query "
               b"protocol")
    with console(daemon) as conn:
        # Parse/Bind/Describe/Execute/Sync, then Parse/Sync: each batch refused up to its Sync,
        # and the session goes on
        for result in (conn.pgconn.exec_params(b"SHOW VERSION", []),
                       conn.pgconn.prepare(b"s1", b"SHOW POOLS")):
            assert result.status == psycopg.pq.ExecStatus.FATAL_ERROR
            assert result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"08P01"
            assert result.error_field(psycopg.pq.DiagnosticField.SEVERITY) == b"ERROR"
            assert result.error_field(psycopg.pq.DiagnosticField.MESSAGE_PRIMARY) == refused
            assert show(conn, "VERSION")[0]["version"].startswith("pgcorral ")


def test_malformed_message_is_08p01(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX) as sock:  # hba: local trust
        sock.settimeout(10)
        sock.connect(os.path.join(daemon.socket_dir, f".s.PGSQL.{daemon.port}"))
        sock.sendall(startup_packet({"user": ADMIN, "database": "pgbouncer"}))
        while (message := read_message(sock)) is not None and message[0] != b"Z":
            pass
        sock.sendall(b"Q" + struct.pack("!i", 2))  # a length below 4
        message = read_message(sock)
        assert message is not None and message[0] == b"E", message
        assert error_fields(message[1])["C"] == "08P01"
        assert read_message(sock) is None  # and closed


def test_cli_pause_resume_and_kill_client(daemon: Daemon) -> None:
    answer = cli_json(daemon, "pause", "pgcorral_test")
    assert answer["paused"] == ["pgcorral_test"]
    with console(daemon) as conn:
        assert {r["name"]: r["paused"] for r in show(conn, "DATABASES")} == {
            "pgcorral_test": 1}
        assert cli_json(daemon, "resume", "all")["paused"] == []
        assert all(r["paused"] == 0 for r in show(conn, "DATABASES"))
        with psycopg.connect(daemon.dsn(application_name="cli-victim"),
                             autocommit=True) as victim:
            row = next(r for r in show(conn, "CLIENTS")
                       if r["application_name"] == "cli-victim")
            assert cli_json(daemon, "kill-client", str(row["id"]))["client"] == row["id"]
            with pytest.raises(psycopg.OperationalError):
                victim.execute("select 1")


def test_psql_views_and_help(daemon: Daemon, pg: PgCluster) -> None:
    with psycopg.connect(daemon.dsn(), autocommit=True) as client:
        for _ in range(5):
            client.execute("select 1")
        backend = client.info.backend_pid
        dsn = daemon.dsn(dbname="pgcorral", user=ADMIN)
        done = psql(pg, dsn, "SHOW POOLS", "SHOW SERVERS")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith("database,user,cl_active,cl_waiting,cl_active_cancel_req,")
        pools = [line.split(",") for line in lines[1:] if line.startswith("pgcorral_test,")]
        assert pools and pools[0][1] == "trustuser" and pools[0][2] == "1", lines
        assert pools[0][15] == "session"
        servers = [line for line in lines if line.startswith("S,trustuser,pgcorral_test,")]
        assert servers and f",{backend}," in servers[0], lines
    # interactive: statements on stdin, the HELP notice
    done = psql(pg, dsn, stdin="SHOW HELP;\nSHOW VERSION;\nfoo;\nSHOW LISTS;\n")
    assert "NOTICE:  Console usage" in done.stderr and "SHOW HELP|CONFIG|DATABASES" in (
        done.stderr)
    assert "invalid command 'foo;', use SHOW HELP;" in done.stderr
    assert "pgcorral " in done.stdout and "used_clients," in done.stdout


def test_counts_move_with_traffic(daemon: Daemon) -> None:
    with console(daemon) as conn, psycopg.connect(daemon.dsn(application_name="countme"),
                                                  autocommit=True) as client:
        before = {r["database"]: r for r in show(conn, "STATS_TOTALS")}.get(
            "pgcorral_test", {"query_count": 0, "xact_count": 0, "bytes_received": 0})
        for _ in range(7):
            client.execute("select 1")

        def moved() -> dict[str, Any] | None:
            rows = {r["database"]: r for r in show(conn, "STATS_TOTALS")}
            row = rows.get("pgcorral_test")
            return row if row and row["query_count"] >= before["query_count"] + 7 else None

        row = poll(moved, "SHOW STATS_TOTALS to count the queries")
        assert row["xact_count"] >= before["xact_count"] + 7
        assert row["bytes_received"] > before["bytes_received"]
        assert row["bytes_sent"] > 0
        stats = {r["database"]: r for r in show(conn, "STATS")}["pgcorral_test"]
        assert stats["total_query_count"] >= row["query_count"]
        assert stats["total_received"] >= row["bytes_received"]
        assert stats["avg_query_time"] > 0
        totals = {r["name"]: r["value"] for r in show(conn, "TOTALS")}
        assert totals["total_query_count"] >= 7
        mine = [r for r in show(conn, "CLIENTS") if r["application_name"] == "countme"]
        assert len(mine) == 1 and mine[0]["query_count"] >= 7, mine
        assert mine[0]["state"] == "active" and mine[0]["database"] == "pgcorral_test"
        assert mine[0]["hold_time_us"] > 0
        me = [r for r in show(conn, "CLIENTS") if r["database"] == "pgcorral"]
        assert me and me[0]["user"] == ADMIN and me[0]["state"] == "active"
        pools = {(r["database"], r["user"]): r for r in show(conn, "POOLS")}
        assert pools[("pgcorral_test", "trustuser")]["xact_p50_us"] > 0


def test_config_databases_users_state(daemon: Daemon) -> None:
    with console(daemon) as conn, psycopg.connect(daemon.dsn(), autocommit=True) as client:
        client.execute("select 1")
        config = {r["key"]: r for r in show(conn, "CONFIG")}
        assert config["admin_users"]["value"] == f"{ADMIN}, other"
        assert config["max_connections"]["value"] == "20"
        assert config["max_connections"]["default"] == "100"
        assert config["port"]["changeable"] == "no"
        dbs = {r["name"]: r for r in show(conn, "DATABASES")}
        assert dbs["pgcorral_test"]["current_connections"] >= 1
        assert dbs["pgcorral_test"]["disabled"] == 0
        users = {r["name"] for r in show(conn, "USERS")}
        assert {"trustuser", ADMIN, STATS} <= users
        assert {r["key"]: r["value"] for r in show(conn, "STATE")} == {
            "active": "yes", "paused": "no", "suspended": "no"}
        assert show(conn, "FDS") == []


# --- commands -------------------------------------------------------------------------------


def test_disable_enable_reconnect_kill(daemon: Daemon, pg: PgCluster) -> None:
    with console(daemon) as conn:
        assert conn.execute("DISABLE pgcorral_test").statusmessage == "DISABLE"
        error = connect_error(daemon.host, daemon.port,
                              {"user": "trustuser", "database": "pgcorral_test"})
        assert error is not None and error["C"] == "57P03", error
        assert {r["name"]: r["disabled"] for r in show(conn, "DATABASES")}.get(
            "pgcorral_test", 1) == 1
        assert conn.execute("ENABLE pgcorral_test").statusmessage == "ENABLE"
        with psycopg.connect(daemon.dsn(), autocommit=True) as client:
            pid = client.info.backend_pid
            assert conn.execute("RECONNECT pgcorral_test").statusmessage == "RECONNECT"
            client.execute("select 1")  # the session goes on
        # ...and its server connection is closed when the client leaves, not pooled
        poll(lambda: pg.psql(f"select count(*) from pg_stat_activity where pid = {pid}"
                             ).strip() == "0", "the reconnected backend to end")
        client = psycopg.connect(daemon.dsn(), autocommit=True)
        assert conn.execute("KILL pgcorral_test").statusmessage == "KILL"
        with pytest.raises(psycopg.OperationalError):
            client.execute("select 1")
        client.close()
        with psycopg.connect(daemon.dsn(), autocommit=True) as again:  # not disabled
            again.execute("select 1")


def test_kill_client(daemon: Daemon) -> None:
    with console(daemon) as conn:
        victim = psycopg.connect(daemon.dsn(application_name="victim"), autocommit=True)
        bystander = psycopg.connect(daemon.dsn(application_name="bystander"), autocommit=True)
        rows = poll(lambda: [r for r in show(conn, "CLIENTS")
                             if r["application_name"] == "victim"], "the victim's row")
        assert rows[0]["id"] // 1_000_000_000 == rows[0]["worker"]
        assert conn.execute(f"KILL_CLIENT {rows[0]['id']}").statusmessage == "KILL_CLIENT"
        with pytest.raises(psycopg.OperationalError):
            victim.execute("select 1")
        victim.close()
        bystander.execute("select 1")
        poll(lambda: not [r for r in show(conn, "CLIENTS") if r["application_name"] == "victim"],
             "the victim to leave SHOW CLIENTS")
        bystander.close()


def test_set_and_reload(daemon: Daemon) -> None:
    with console(daemon) as conn:
        assert conn.execute("SET disconnect_client = 100").statusmessage == (
            "SET disconnect_client=100")
        assert cli_json(daemon, "conf", "get", "disconnect_client")["value"] == 100
        assert conn.execute("set log_connections = 'on';").statusmessage == (
            "SET log_connections=on")
        assert cli_json(daemon, "conf", "get", "log_connections")["value"] is True
        assert {r["key"]: r["value"] for r in show(conn, "CONFIG")}["log_connections"] == "on"
        error = failure(conn, "SET port = 1")
        assert "restart required" in str(error)
        assert conn.execute("RELOAD").statusmessage == "RELOAD"


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_pause_waits_for_active_servers_and_holds_new_work(
        pgcorral: DaemonFactory, tmp_path: Path, pipeline: str) -> None:
    d = start(pgcorral, tmp_path, pipeline=pipeline)
    with console(d) as conn:
        busy = psycopg.connect(d.dsn(), autocommit=True)
        busy.execute("begin")
        busy.execute("select 1")  # a server connection active in a transaction
        paused = threading.Event()
        pauser = threading.Thread(target=lambda: (conn.execute("PAUSE pgcorral_test"),
                                                  paused.set()))
        pauser.start()
        if pipeline == "transaction":
            # PAUSE returns only once the transaction is over
            time.sleep(0.3)  # (a wait that must pass with nothing happening)
            assert not paused.is_set()
            busy.execute("commit")
        else:
            # in session pooling the session holds its server: PAUSE waits for it to end
            time.sleep(0.3)
            assert not paused.is_set()
            busy.execute("commit")
            busy.close()
        assert paused.wait(15), "PAUSE did not return"
        pauser.join()
        with console(d, STATS, STATS_PW) as watcher:
            dbs = {r["name"]: r for r in show(watcher, "DATABASES")}
            assert dbs["pgcorral_test"]["paused"] == 1
            # a new client's work waits while paused
            done = threading.Event()

            def work() -> None:
                with psycopg.connect(d.dsn(), autocommit=True) as c:
                    c.execute("select 1")
                done.set()

            worker = threading.Thread(target=work)
            worker.start()
            poll(lambda: sum(r["cl_waiting"] for r in show(watcher, "POOLS")
                             if r["database"] == "pgcorral_test") >= 1, "a waiting client")
            assert not done.is_set()
            assert conn.execute("RESUME pgcorral_test").statusmessage == "RESUME"
            assert done.wait(15), "the client was not served after RESUME"
            worker.join()
        if not busy.closed:
            busy.close()


def test_shutdown(pgcorral: DaemonFactory, tmp_path: Path) -> None:
    d = start(pgcorral, tmp_path)
    conn = console(d)
    try:
        conn.execute("SHUTDOWN")
    except psycopg.OperationalError:
        pass  # the connection may close before the answer
    d.proc.wait(15)
    conn.close()
    d = start(pgcorral, tmp_path)
    with console(d) as conn:
        client = psycopg.connect(d.dsn(), autocommit=True)
        assert conn.execute("SHUTDOWN WAIT_FOR_CLIENTS").statusmessage == "SHUTDOWN"
        assert show(conn, "STATE")[0] == {"key": "active", "value": "no"}
        time.sleep(0.2)
        assert d.running()  # waits for the client (the console session does not hold it)
        client.close()
        d.proc.wait(15)


def test_show_clients_covers_every_worker(pgcorral: DaemonFactory, tmp_path: Path) -> None:
    # transaction pooling: clients need no server connection of their own, so the test may
    # open more clients than max_connections until the kernel gave both workers some
    # (SO_REUSEPORT: the kernel spreads connections over the workers' own sockets by a hash;
    # one shared socket may give nearly all of them to one worker)
    daemon = start(pgcorral, tmp_path, listen="reuseport", pipeline="transaction")
    clients: list[psycopg.Connection[Any]] = []
    try:
        with console(daemon) as conn:
            deadline = time.monotonic() + 20
            while True:
                clients.append(psycopg.connect(daemon.dsn(application_name="many"),
                                               autocommit=True))
                rows = [r for r in show(conn, "CLIENTS") if r["application_name"] == "many"]
                workers = {r["worker"] for r in rows}
                if len(workers) == WORKERS and len(clients) >= 4:
                    break
                assert time.monotonic() < deadline and len(clients) < 60, workers
            assert len(rows) == len(clients)
            assert len({r["id"] for r in rows}) == len(rows)  # unique across workers
            assert workers == set(range(WORKERS))
            lists = {r["list"]: r["items"] for r in show(conn, "LISTS")}
            assert lists["used_clients"] >= len(clients) + 1
    finally:
        for c in clients:
            c.close()


# --- against a real PgBouncer ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pgbouncer(pg: PgCluster) -> Iterator[int]:
    """PgBouncer 1.18 (Debian's package) on a free port in front of the test cluster, with
    ``admin_users``; the port."""
    binary = shutil.which("pgbouncer") or PGBOUNCER
    if not os.path.exists(binary):
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("pgbouncer is missing (.ci/run installs Debian's pgbouncer package)")
        pytest.skip("pgbouncer is not installed")
    work = Path(tempfile.mkdtemp(prefix="pgcorral-pgbouncer-"))
    os.chmod(work, 0o755)
    port = find_free_port()
    (work / "userlist.txt").write_text(f'"{ADMIN}" "{ADMIN_PW}"\n"trustuser" ""\n')
    (work / "hba.conf").write_text(f"host pgbouncer {ADMIN} 127.0.0.1/32 md5\n"
                                   "host all all 127.0.0.1/32 trust\n")
    (work / "pgbouncer.ini").write_text(f"""[databases]
pgcorral_test = host=127.0.0.1 port={pg.port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {work}
auth_type = hba
auth_hba_file = {work / "hba.conf"}
auth_file = {work / "userlist.txt"}
admin_users = {ADMIN}
logfile = {work / "pgbouncer.log"}
pidfile = {work / "pgbouncer.pid"}
""")
    user = unprivileged_user()  # PgBouncer refuses to run as root
    extra: dict[str, Any] = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (work, *work.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        extra = {"user": user, "group": entry.pw_gid, "extra_groups": []}
    proc = subprocess.Popen([binary, str(work / "pgbouncer.ini")], cwd=work,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, **extra)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={port} dbname=pgbouncer user={ADMIN} "
                                f"password={ADMIN_PW}").close()
                break
            except psycopg.OperationalError:
                assert proc.poll() is None, (work / "pgbouncer.log").read_text()
                assert time.monotonic() < deadline, "pgbouncer did not start"
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def test_columns_match_pgbouncer(pgbouncer: int, daemon: Daemon) -> None:
    bouncer = psycopg.connect(f"host=127.0.0.1 port={pgbouncer} dbname=pgbouncer user={ADMIN} "
                              f"password={ADMIN_PW}", autocommit=True, prepare_threshold=None)
    ours = console(daemon, dbname="pgbouncer")
    # a client of a pool in each, so that the rows are not all empty
    theirs_client = psycopg.connect(f"host=127.0.0.1 port={pgbouncer} dbname=pgcorral_test "
                                    "user=trustuser", autocommit=True)
    our_client = psycopg.connect(daemon.dsn(), autocommit=True)
    try:
        theirs_client.execute("select 1")
        our_client.execute("select 1")
        for view in VIEWS:
            expected, got = columns(bouncer, view), columns(ours, view)
            assert got[:len(expected)] == expected, (view, expected, got)
        # views read by row name
        for view, key in (("TOTALS", "name"), ("LISTS", "list"), ("MEM", "name")):
            assert [r[key] for r in show(ours, view)] == [r[key] for r in show(bouncer, view)]
        # the same answer to the same bad input
        for statement in ("SHOW FOO", "SELECT 1", "DISABLE"):
            expected_error, got_error = failure(bouncer, statement), failure(ours, statement)
            assert (got_error.sqlstate, str(got_error)) == (
                expected_error.sqlstate, str(expected_error)), statement
        assert columns(ours, "STATE") == [("key", 25), ("value", 25)]  # PgBouncer 1.19's
    finally:
        for conn in (bouncer, ours, theirs_client, our_client):
            conn.close()
