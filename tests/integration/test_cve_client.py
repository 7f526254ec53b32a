"""CVE classes on the client side (docs/SECURITY.md), against real PostgreSQL: long startup
values, auth_query (injection, unknown users, VALID UNTIL, client GUCs kept off its
connection), hostile SASL input for every way pgcorral checks a client, a pooled connection
never standing in for a password, the admin console's authorization, secrets in views and
logs, statements across roles, invalid UTF-8 names.

Every hostile case ends with ``assert_healthy``: pgcorral is alive and a fresh client runs
SELECT 1. A Traceback in the daemon log fails the test (conftest)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg
import pytest
from tests.pgwire import error_fields, read_message, startup_packet
from tests.vaultfiles import write_vault

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory

TEST_DB = "pgcorral_test"
ALL_HBA = "host all all all all\nlocal all all all\n"
#: auth_query daemons: trustuser (no password in pg_authid) is let in by trust, for
#: assert_healthy; everyone else proves the password PostgreSQL stores
AQ_HBA = "host all trustuser all trust\nhost all all all all\nlocal all all all\n"
PIPELINES = ["session", "transaction"]


def assert_healthy(d: Daemon) -> None:
    assert d.running(), f"pgcorral died; log:\n{d.log()}"
    with psycopg.connect(d.dsn(), connect_timeout=5) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def _auth_query_daemon(pgcorral: DaemonFactory, tmp_path: Path, pipeline: str = "session",
                       **conf: str) -> Daemon:
    """auth_query on, the cluster's superuser in the -S file, hba ``all``."""
    superuser, env = write_vault(tmp_path, {"postgres": "unused-trust"}, "superuser.conf")
    return pgcorral({"pipeline": pipeline, "auth_query": "on", "max_connections": "6", **conf},
                    hba=AQ_HBA, env=env, args=["-S", superuser])


def _read_until_close(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    try:
        while (got := read_message(sock)) is not None:
            out.append(got)
    except ConnectionResetError:
        pass
    return out


def _login_raw(d: Daemon, params: dict[str, str] | bytes,
               ) -> tuple[list[tuple[bytes, bytes]], dict[str, str] | None]:
    """A login with no password; every message up to ReadyForQuery or the close, and the
    fields of the first ErrorResponse (None: logged in)."""
    packet = params if isinstance(params, bytes) else startup_packet(params)
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.sendall(packet)
        out: list[tuple[bytes, bytes]] = []
        while (got := read_message(sock)) is not None:
            out.append(got)
            if got[0] == b"E":
                return out, error_fields(got[1])
            if got[0] == b"Z":
                return out, None
            if got[0] == b"R" and got[1][:4] != b"\0\0\0\0":
                return out, {"asked": "password"}
    return out, {"closed": "without an error"}


def _raw_startup(params: list[tuple[bytes, bytes]]) -> bytes:
    body = struct.pack("!i", 196608) + b"".join(k + b"\0" + v + b"\0" for k, v in params) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


# ------------------------------------------------- CVE-2012-4575: very long startup values


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("key", ["database", "application_name", "options", "search_path"])
def test_long_startup_value_is_an_error_or_works_never_a_crash(
        pgcorral: DaemonFactory, pipeline: str, key: str) -> None:
    """PgBouncer < 1.5.3 died on a long database name. A 9000-byte value (under the 10000
    bytes of a startup packet) gets an ErrorResponse with a SQLSTATE or a working session;
    a session already open keeps working."""
    d = pgcorral({"pipeline": pipeline})
    value = "x" * 9000
    params = {"user": "trustuser", "database": TEST_DB, key: value}
    if key == "options":
        params[key] = "-c application_name=" + value
    with psycopg.connect(d.dsn(), autocommit=True) as bystander:
        _, error = _login_raw(d, params)
        if error is not None:
            assert len(error.get("C", "")) == 5, error
        assert bystander.execute("select 1").fetchone() == (1,)
    assert_healthy(d)


# --------------------------------- CVE-2015-6817: an unknown user is not the auth_query user


def _sasl_start(d: Daemon, user: str) -> tuple[socket.socket, list[str]]:
    sock = socket.create_connection((d.host, d.port), timeout=10)
    sock.sendall(startup_packet({"user": user, "database": TEST_DB}))
    got = read_message(sock)
    assert got is not None and got[0] == b"R", got
    code = struct.unpack("!i", got[1][:4])[0]
    assert code == 10, f"{user}: expected AuthenticationSASL, got {code}"
    return sock, [m for m in got[1][4:].decode().split("\0") if m]


def _scram_with(d: Daemon, user: str, password: str) -> dict[str, str] | None:
    try:
        with psycopg.connect(d.dsn(user=user, password=password)) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)
            return None
    except psycopg.OperationalError as exc:
        return {"C": exc.sqlstate or "", "M": str(exc)}


def test_unknown_user_fails_like_a_wrong_password_with_auth_query(
        pgcorral: DaemonFactory, tmp_path: Path, pg: PgCluster) -> None:
    """PgBouncer 1.6.0 logged a client asking for a non-existent user in as auth_user. Here an
    unknown role, a role without a password and the -S superuser itself all go through the
    same SCRAM exchange as a wrong password and end with the same 28P01."""
    pg.psql("DROP ROLE IF EXISTS cve_nopass; CREATE ROLE cve_nopass LOGIN")
    d = _auth_query_daemon(pgcorral, tmp_path)
    assert _scram_with(d, "scramuser", "scrampass") is None
    wrong = _scram_with(d, "scramuser", "wrong")
    assert wrong is not None and "password authentication failed" in wrong["M"], wrong
    for user in ("no_such_role_cve", "cve_nopass", "postgres"):
        sock, mechanisms = _sasl_start(d, user)  # the same first step as a real role
        sock.close()
        assert "SCRAM-SHA-256" in mechanisms
        error = _scram_with(d, user, "wrong")
        assert error is not None, f"{user} logged in"
        assert error["M"].replace(user, "scramuser") == wrong["M"], (user, error, wrong)
    assert_healthy(d)


# ------------------------------------------ Odyssey 2021: SQL injection through auth_query


HOSTILE_NAMES = ["a'b", "x'; select pg_sleep(5);--", "x\"; select pg_sleep(5);--",
                 "$1", "\\'; select pg_sleep(5);--", "é' OR '1'='1"]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_auth_query_is_parameterised(pgcorral: DaemonFactory, tmp_path: Path, pg: PgCluster,
                                     pipeline: str) -> None:
    d = _auth_query_daemon(pgcorral, tmp_path, pipeline)
    for name in HOSTILE_NAMES:
        started = time.monotonic()
        error = _scram_with(d, name, "x")
        assert error is not None, f"{name!r} logged in"
        assert "password authentication failed" in error["M"], (name, error)
        assert time.monotonic() - started < 3, f"{name!r}: the login took too long"
    # invalid UTF-8 in the user name (CVE-2025-1094 class): refused like any unknown user,
    # at the same step (AuthenticationSASL first), never sent to PostgreSQL
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.sendall(_raw_startup([(b"user", b"\xff\xfe'--"), (b"database", TEST_DB.encode())]))
        got = read_message(sock)
        assert got is not None and got[0] == b"R" and got[1][:4] == b"\0\0\0\x0a", got
    assert "auth_query for user" not in d.log()
    assert pg.psql("select count(*) from pg_stat_activity where query like '%pg_sleep(5)%' "
                   "and pid <> pg_backend_pid()").strip() == "0"
    assert _scram_with(d, "scramuser", "scrampass") is None  # the lookup still works
    assert_healthy(d)


# --------------------------------------------------- CVE-2025-2291: VALID UNTIL is honoured


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_auth_query_refuses_an_expired_password(pgcorral: DaemonFactory, tmp_path: Path,
                                                pg: PgCluster, pipeline: str) -> None:
    role = f"cve_expiring_{pipeline}"
    pg.psql(f"DROP ROLE IF EXISTS {role}; SET password_encryption = 'scram-sha-256'; "
            f"CREATE ROLE {role} LOGIN PASSWORD 'expiring-pw' VALID UNTIL 'infinity'")
    d = _auth_query_daemon(pgcorral, tmp_path, pipeline)
    assert _scram_with(d, role, "expiring-pw") is None
    # the connection is pooled now; the password expires
    pg.psql(f"ALTER ROLE {role} VALID UNTIL 'yesterday'")
    error = _scram_with(d, role, "expiring-pw")
    assert error is not None and "password authentication failed" in error["M"], error
    assert_healthy(d)


# ------------------- CVE-2025-12819: client GUCs never reach pgcorral's own auth connection


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_client_search_path_never_reaches_the_auth_query(pgcorral: DaemonFactory,
                                                         tmp_path: Path, pg: PgCluster,
                                                         pipeline: str) -> None:
    """A schema ``cve_evil`` holds a ``now()`` that says "far future" and records each call.
    A client asks for ``search_path=cve_evil,pg_catalog`` (startup parameter and options)
    while logging in as a role whose password expired: if the auth_query ran with that
    search_path, the expired password would pass and the call would be recorded."""
    role = f"cve_expired_{pipeline}"
    pg.psql(f"""
        DROP ROLE IF EXISTS {role};
        SET password_encryption = 'scram-sha-256';
        CREATE ROLE {role} LOGIN PASSWORD 'expired-pw' VALID UNTIL '2000-01-01';
    """)
    pg.psql("""
        CREATE SCHEMA IF NOT EXISTS cve_evil;
        CREATE TABLE IF NOT EXISTS cve_evil.calls (at timestamptz DEFAULT clock_timestamp());
        GRANT USAGE ON SCHEMA cve_evil TO PUBLIC;
        GRANT INSERT ON cve_evil.calls TO PUBLIC;
        CREATE OR REPLACE FUNCTION cve_evil.now() RETURNS timestamptz LANGUAGE plpgsql AS
            $$ BEGIN INSERT INTO cve_evil.calls DEFAULT VALUES; RETURN 'infinity'; END $$;
        TRUNCATE cve_evil.calls;
    """, dbname=TEST_DB)
    d = _auth_query_daemon(pgcorral, tmp_path, pipeline)
    evil = "cve_evil,pg_catalog"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(d.dsn(user=role, password="expired-pw", options=f"-c search_path={evil}"))

    async def as_startup_parameter() -> None:  # asyncpg sends server_settings in the startup
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(host=d.host, port=d.port, user=role, password="expired-pw",
                                  database=TEST_DB, server_settings={"search_path": evil})

    asyncio.run(as_startup_parameter())
    # a client of its own with that search_path, then another login
    with psycopg.connect(d.dsn(user="scramuser", password="scrampass",
                               options=f"-c search_path={evil}")) as conn:
        assert conn.execute("show search_path").fetchone() == (evil,)
    assert _scram_with(d, "scramuser", "scrampass") is None
    assert pg.psql("select count(*) from cve_evil.calls", dbname=TEST_DB).strip() == "0"
    assert_healthy(d)


# ------------------------------------------- CVE-2026-6664: hostile SASL input from clients


def _sasl_initial(mechanism: bytes, data: bytes, length: int | None = None) -> bytes:
    body = mechanism + b"\0" + struct.pack("!i", len(data) if length is None else length) + data
    return b"p" + struct.pack("!i", len(body) + 4) + body


def _p(body: bytes) -> bytes:
    return b"p" + struct.pack("!i", len(body) + 4) + body


FIRST = b"n,,n=,r=cvecvecvecvecvecvecvecve"
#: id -> (the SASLInitialResponse, or None for a good one; then a client-final builder)
SASL_CASES: dict[str, tuple[bytes | None, Any]] = {
    "data-length-0x7fffffff": (_sasl_initial(b"SCRAM-SHA-256", FIRST, 0x7FFFFFFF), None),
    "data-length-minus-5": (_sasl_initial(b"SCRAM-SHA-256", FIRST, -5), None),
    "data-length-beyond-packet": (_sasl_initial(b"SCRAM-SHA-256", FIRST, len(FIRST) + 50),
                                  None),
    "truncated-header": (b"p\0\0\0\x07SCR", None),
    "no-mechanism-terminator": (_p(b"SCRAM-SHA-256"), None),
    "bad-mechanism": (_sasl_initial(b"SCRAM-SHA-1", FIRST), None),
    "garbage-client-first": (_sasl_initial(b"SCRAM-SHA-256", b"\xff\x00garbage"), None),
    "binding-flag-p-without-tls": (_sasl_initial(b"SCRAM-SHA-256",
                                                 b"p=tls-server-end-point,,n=,r=abc"), None),
    "message-length-0x7fffffff": (b"p\x7f\xff\xff\xff" + b"x" * 64, None),
    "final-garbage": (None, lambda nonce: b"\xff garbage"),
    "final-wrong-nonce": (None, lambda nonce: b"c=biws,r=not-the-nonce,p="
                          + b"A" * 43 + b"="),
    "final-bad-base64-proof": (None, lambda nonce: b"c=biws,r=" + nonce + b",p=!!!"),
    "final-short-proof": (None, lambda nonce: b"c=biws,r=" + nonce + b",p=AAAA"),
    "final-wrong-proof": (None, lambda nonce: b"c=biws,r=" + nonce + b",p=" + b"A" * 43 + b"="),
    "final-bad-binding": (None, lambda nonce: b"c=eSws,r=" + nonce + b",p=" + b"A" * 43 + b"="),
    "final-huge": (None, lambda nonce: b"c=biws,r=" + nonce + b",p=" + b"A" * 70000),
    "final-empty": (None, lambda nonce: b""),
}


def _sasl_case(d: Daemon, user: str, initial: bytes | None, final: Any) -> dict[str, str]:
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": user, "database": TEST_DB}))
        got = read_message(sock)
        assert got is not None and got[0] == b"R" and got[1][:4] == b"\0\0\0\x0a", got
        if initial is not None:
            sock.sendall(initial)
        else:
            sock.sendall(_sasl_initial(b"SCRAM-SHA-256", FIRST))
            got = read_message(sock)
            assert got is not None and got[0] == b"R" and got[1][:4] == b"\0\0\0\x0b", got
            nonce = got[1][4:].split(b"r=", 1)[1].split(b",", 1)[0]
            sock.sendall(_p(final(nonce)))
        messages = _read_until_close(sock)  # and the connection is closed
    errors = [error_fields(body) for t, body in messages if t == b"E"]
    assert [t for t, _ in messages] in ([], [b"E"]), messages
    return errors[0] if errors else {}


@pytest.mark.parametrize("source", ["vault", "auth_query", "pass-through"])
def test_hostile_sasl_input_every_source(pgcorral: DaemonFactory, tmp_path: Path,
                                         source: str) -> None:
    """Extends test_vault_auth.py::test_hostile_sasl_input_gets_postgresqls_answer to the
    three places a SCRAM client is checked: pgcorral with the vault password, pgcorral with
    the verifier read by auth_query, and PostgreSQL itself (pass-through, relayed). Every
    case ends with 08P01 or 28P01 (or a silent close) and the connection closed."""
    if source == "vault":
        users, env = write_vault(tmp_path, {"scramuser": "scrampass"})
        d = pgcorral({"max_connections": "4"}, hba="host all all all scram-sha-256\n",
                     env=env, args=["-u", users])
    elif source == "auth_query":
        d = _auth_query_daemon(pgcorral, tmp_path)
    else:
        d = pgcorral({"max_connections": "4"})
    failures = []
    for case, (initial, final) in SASL_CASES.items():
        error = _sasl_case(d, "scramuser", initial, final)
        if error and error.get("C") not in ("08P01", "28P01"):
            failures.append(f"{case}: {error}")
        assert d.running(), f"{case}: pgcorral died"
    assert not failures, failures
    assert _scram_with(d, "scramuser", "scrampass") is None
    assert_healthy(d)


# --------------- CVE-2025-46801: a pooled server connection never stands in for a password


def _backends(pg: PgCluster, user: str) -> int:
    return int(pg.psql(f"select count(*) from pg_stat_activity where usename = '{user}' "
                       "and backend_type = 'client backend'").strip())


@pytest.mark.single_worker  # the second login must meet the first one's pooled connection
@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("source", ["pass-through-md5", "pass-through-password", "vault-md5",
                                    "vault-scram", "auth_query"])
def test_wrong_password_fails_while_a_connection_is_pooled(
        pgcorral: DaemonFactory, tmp_path: Path, pg: PgCluster, pipeline: str,
        source: str) -> None:
    user, password = {"pass-through-md5": ("md5user", "md5pass"),
                      "pass-through-password": ("pwuser", "pwpass"),
                      "vault-md5": ("md5user", "md5pass"),
                      "vault-scram": ("scramuser", "scrampass"),
                      "auth_query": ("scramuser", "scrampass")}[source]
    conf = {"pipeline": pipeline, "max_connections": "4"}
    if source.startswith("vault"):
        users, env = write_vault(tmp_path, {user: password})
        method = source.split("-")[1].replace("scram", "scram-sha-256")
        d = pgcorral(conf, hba=f"host all all all {method}\n", env=env, args=["-u", users])
    elif source == "auth_query":
        d = _auth_query_daemon(pgcorral, tmp_path, pipeline)
    else:
        d = pgcorral(conf)
    with psycopg.connect(d.dsn(user=user, password=password)) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    deadline = time.monotonic() + 10
    while _backends(pg, user) < 1:  # pooled and idle
        assert time.monotonic() < deadline, "no pooled connection"
        time.sleep(0.05)
    for wrong in (password + "x", password.upper()):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(d.dsn(user=user, password=wrong))
    with psycopg.connect(d.dsn(user=user, password=password)) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    assert_healthy(d)


# -------------------------------- CVE-2026-6667: the console's commands need an admin user


ADMIN, ADMIN_PW = "cveadmin", "cve-admin-pw"
STATS, STATS_PW = "cvestats", "cve-stats-pw"
CONSOLE_VIEWS = ["CONFIG", "USERS", "DATABASES", "POOLS", "CLIENTS", "SERVERS", "STATS",
                 "STATS_TOTALS", "STATS_AVERAGES", "TOTALS", "LISTS", "FDS", "STATE", "VERSION",
                 "MEM", "DNS_HOSTS", "DNS_ZONES", "SOCKETS", "ACTIVE_SOCKETS", "PEERS",
                 "PEER_POOLS", "USED_SERVERS", "SERVERS"]
MUTATING = ["PAUSE", "PAUSE pgcorral_test", "RESUME", "RESUME pgcorral_test",
            "DISABLE pgcorral_test", "ENABLE pgcorral_test", "RECONNECT", "RECONNECT pgcorral_test",
            "KILL pgcorral_test", "KILL_CLIENT 1", "SHUTDOWN", "SHUTDOWN WAIT_FOR_CLIENTS",
            "RELOAD", "SET log_level = debug", "set log_level to 'debug'", "SUSPEND",
            "WAIT_CLOSE", "  kill_client 1 ;", "Shutdown;"]


def _console_daemon(pgcorral: DaemonFactory, tmp_path: Path) -> Daemon:
    users, env = write_vault(tmp_path, {ADMIN: ADMIN_PW, STATS: STATS_PW})
    return pgcorral({"admin_users": ADMIN, "stats_users": STATS}, env=env, args=["-u", users])


def test_stats_user_cannot_run_any_mutating_console_command(pgcorral: DaemonFactory,
                                                            tmp_path: Path) -> None:
    """PgBouncer < 1.25.2 let every console user KILL_CLIENT. A stats user gets 42501 for
    every command that changes anything (extends test_sqlconsole.py::
    test_stats_user_may_show_but_not_command), and nothing changed afterwards."""
    d = _console_daemon(pgcorral, tmp_path)
    with psycopg.connect(d.dsn(), autocommit=True) as victim, psycopg.connect(
            d.dsn(dbname="pgcorral", user=STATS, password=STATS_PW), autocommit=True,
            prepare_threshold=None) as console:
        for statement in MUTATING:
            with pytest.raises(psycopg.Error) as caught:
                console.execute(statement)
            assert caught.value.sqlstate == "42501", (statement, caught.value)
        assert console.execute("SHOW POOLS").fetchall()
        assert victim.execute("select 1").fetchone() == (1,)
        assert d.running()
        rows = console.execute("SHOW DATABASES").fetchall()
        assert rows
    # a pooled user is not a console user at all
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(d.dsn(dbname="pgcorral"), connect_timeout=10)
    assert_healthy(d)


# ----------------------------- CVE-2023-22332: no secret in any view, answer or log line


def _cli(d: Daemon, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pgcorral.cli.cli", "-c",
                          str(Path(d.dir, "pgcorral.conf")), "-F", "json", *args],
                         capture_output=True, text=True, timeout=30)
    return out.stdout + out.stderr


def test_no_secret_in_views_answers_or_logs(pgcorral: DaemonFactory, tmp_path: Path) -> None:
    secrets = {"scramuser": "scram-Secret-1", "md5user": "md5-Secret-2",
               ADMIN: "admin-Secret-3", STATS: "stats-Secret-4"}
    users, env = write_vault(tmp_path, {**secrets, "scramuser": "scrampass",
                                        "md5user": "md5pass"})
    frontend, _ = write_vault(tmp_path, {"scramuser": secrets["scramuser"]}, "frontend.conf")
    superuser, _ = write_vault(tmp_path, {"postgres": "super-Secret-5"}, "superuser.conf")
    secrets["postgres"] = "super-Secret-5"
    key = Path(env["PGCORRAL_MASTER_KEY_FILE"])
    d = pgcorral({"admin_users": ADMIN, "stats_users": STATS, "auth_query": "on",
                  "log_level": "debug"},
                 hba="host all trustuser all trust\nhost all all all password\n", env=env,
                 args=["-u", users, "-F", frontend, "-S", superuser])
    with psycopg.connect(d.dsn(user="scramuser", password=secrets["scramuser"])) as conn:
        conn.execute("select 1")
    for wrong in ("wrong-Secret-6", "md5-Secret-2x"):  # cleartext wrong passwords
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(d.dsn(user="md5user", password=wrong), connect_timeout=10)
    secrets["wrong"] = "wrong-Secret-6"
    seen = []
    for user, password in ((ADMIN, secrets[ADMIN]), (STATS, secrets[STATS])):
        with psycopg.connect(d.dsn(dbname="pgcorral", user=user, password=password),
                             autocommit=True, prepare_threshold=None) as console:
            for view in CONSOLE_VIEWS:
                try:  # (some are PgBouncer's only: an error is fine)
                    cur = console.execute(f"SHOW {view}")
                    seen.append(json.dumps(cur.fetchall() if cur.description else [],
                                           default=str))
                except psycopg.Error:
                    pass
    for args in (["status", "details"], ["conf", "ls"], ["conf", "get"], ["ping"]):
        seen.append(_cli(d, *args))
    seen.append(d.log())
    blob = "\n".join(seen)
    for what, secret in secrets.items():
        assert secret not in blob, f"the secret of {what} shows up"
    assert "Str0ng!Passphrase" not in blob  # the master key's (tests/vaultfiles.py)
    assert key.read_text().strip().rsplit(":", 1)[-1] not in blob
    # the views were really read: users and configuration are in them
    assert "scramuser" in blob and "auth_query" in blob and "md5user" in blob
    assert_healthy(d)


# --------------------------------- CVE-2024-45624 class: nothing cached across roles


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_statements_and_results_do_not_cross_roles(pgcorral: DaemonFactory, pg: PgCluster,
                                                   pipeline: str) -> None:
    """pgcorral caches no results. What it keeps per server connection (prepared statement
    names, transaction pooling) belongs to one database/user pool: the same statement, by
    name and by text, from another role finds nothing and has no privilege."""
    pg.psql("DROP TABLE IF EXISTS cve_private; CREATE TABLE cve_private(secret text);"
            "INSERT INTO cve_private VALUES ('for md5user only');"
            "REVOKE ALL ON cve_private FROM PUBLIC; GRANT SELECT ON cve_private TO md5user",
            dbname=TEST_DB)
    d = pgcorral({"pipeline": pipeline, "max_connections": "4"})
    sql = "select secret from cve_private"
    with psycopg.connect(d.dsn(user="md5user", password="md5pass"), autocommit=True,
                         prepare_threshold=0) as owner, psycopg.connect(
            d.dsn(), autocommit=True, prepare_threshold=0) as other:
        for _ in range(3):
            assert owner.execute(sql).fetchone() == ("for md5user only",)
        owner.execute(f"prepare cve_named as {sql}")
        assert owner.execute("execute cve_named").fetchone() == ("for md5user only",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            other.execute(sql)
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            other.execute("execute cve_named")
        assert other.execute("select current_user").fetchone() == ("trustuser",)
    assert_healthy(d)


# ----------------------- CVE-2025-1094 class: names that are not UTF-8, or carry NUL tricks


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("params", [
    [(b"user", b"\xff\xfe"), (b"database", TEST_DB.encode())],
    [(b"user", b"trustuser"), (b"database", b"caf\xe9")],
    [(b"user", b"trust\xc0\x80user"), (b"database", TEST_DB.encode())],
    [(b"user", b"trustuser"), (b"database", TEST_DB.encode()), (b"application_name", b"\xff")],
    [(b"user", b"trustuser"), (b"database", TEST_DB.encode()), (b"options", b"-c x=\xff")],
], ids=["user", "database", "overlong-nul", "application_name", "options"])
def test_names_that_are_not_utf8(pgcorral: DaemonFactory, pipeline: str,
                                 params: list[tuple[bytes, bytes]]) -> None:
    d = pgcorral({"pipeline": pipeline})
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.sendall(_raw_startup(params))
        messages = []
        while (got := read_message(sock)) is not None:
            messages.append(got)
            if got[0] in (b"E", b"Z"):
                break
    types = [t for t, _ in messages]
    assert types and types[-1] in (b"E", b"Z"), messages
    if types[-1] == b"E":
        assert len(error_fields(messages[-1][1]).get("C", "")) == 5, messages
    assert_healthy(d)


@pytest.mark.single_worker  # both clients must meet the same server connection
@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_a_clients_search_path_never_resolves_pgcorrals_own_sql(
        pgcorral: DaemonFactory, pg: PgCluster, pipeline: str) -> None:
    """CVE-2025-12819 on pooled connections: pgcorral's own statements on a server connection
    (applying the next client's settings with set_config, resets) must not resolve to functions
    of a schema an earlier client of that connection put first in its search_path."""
    pg.psql("""
        CREATE SCHEMA IF NOT EXISTS cve_evil2;
        CREATE TABLE IF NOT EXISTS cve_evil2.calls (args text);
        GRANT USAGE ON SCHEMA cve_evil2 TO PUBLIC;
        GRANT INSERT ON cve_evil2.calls TO PUBLIC;
        CREATE OR REPLACE FUNCTION cve_evil2.set_config(text, text, boolean) RETURNS text
            LANGUAGE plpgsql AS $$ BEGIN
                INSERT INTO cve_evil2.calls VALUES ($1 || '=' || coalesce($2, 'NULL'));
                RETURN pg_catalog.set_config($1, $2, $3); END $$;
        TRUNCATE cve_evil2.calls;
    """, dbname=TEST_DB)
    d = pgcorral({"pipeline": pipeline, "max_connections": "1"})
    evil = "cve_evil2,pg_catalog"
    with psycopg.connect(d.dsn(options=f"-c search_path={evil}"), autocommit=True) as first:
        assert first.execute("show search_path").fetchone() == (evil,)
    for name in ("victim-1", "victim-2"):
        with psycopg.connect(d.dsn(application_name=name), autocommit=True) as victim:
            assert victim.execute("show application_name").fetchone() == (name,)
            assert victim.execute("show search_path").fetchone() != (evil,)
        with psycopg.connect(d.dsn(options=f"-c search_path={evil}"), autocommit=True) as other:
            assert other.execute("select 1").fetchone() == (1,)
    calls = pg.psql("select string_agg(args, ' ') from cve_evil2.calls", dbname=TEST_DB).strip()
    assert calls == "", f"pgcorral's set_config ran the schema's function: {calls}"
    assert_healthy(d)
