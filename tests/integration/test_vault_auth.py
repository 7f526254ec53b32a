"""Users in the vault: pgcorral checks the client itself with the hba method and logs in to
PostgreSQL with the vault password, whatever method PostgreSQL asks (trust, password, md5,
SCRAM). The two sides are independent, and every such connection is pooled."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import psycopg
import pytest
from tests.conftest import wait_reset
from tests.pgwire import read_message, startup_packet
from tests.vaultfiles import write_vault as _vault

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory

REPO = Path(__file__).resolve().parents[2]

#: server role -> the password PostgreSQL knows (trustuser: pg_hba says trust)
ROLES = {"md5user": "md5pass", "scramuser": "scrampass", "pwuser": "pwpass",
         "trustuser": "anything"}
FRONTEND = {"scramuser": "front-door"}  # a client password that differs from the backend one


def _daemon(pgcorral: DaemonFactory, tmp_path: Path, method: str, **conf: str) -> Daemon:
    users, env = _vault(tmp_path, ROLES, "users.conf")
    frontend, _ = _vault(tmp_path, FRONTEND, "frontend_users.conf")
    hba = f"host all all all {method}\nlocal all all {method}\n"
    return pgcorral({"max_connections": "8", **conf}, hba=hba, env=env,
                    args=["-u", users, "-F", frontend])


def _client_password(user: str) -> str:
    return FRONTEND.get(user, ROLES[user])


@pytest.mark.single_worker
@pytest.mark.parametrize("method", ["password", "md5", "scram-sha-256", "all"])
def test_every_client_method_against_every_server_method(
        pgcorral: DaemonFactory, tmp_path: Path, method: str, pg: PgCluster) -> None:
    d = _daemon(pgcorral, tmp_path, method)
    for user in ROLES:
        good = _client_password(user)
        with psycopg.connect(d.dsn(user=user, password=good)) as conn:
            pid = conn.info.backend_pid
            assert conn.execute("select current_user").fetchone() == (user,)
        wait_reset(pg, pid)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(d.dsn(user=user, password=good + "x"))
        with psycopg.connect(d.dsn(user=user, password=good)) as conn:
            assert conn.info.backend_pid == pid, f"{user} over {method} was not pooled"


def test_backend_password_is_refused_when_a_frontend_password_exists(
        pgcorral: DaemonFactory, tmp_path: Path) -> None:
    d = _daemon(pgcorral, tmp_path, "scram-sha-256")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(d.dsn(user="scramuser", password="scrampass"))


def test_trust_method_skips_the_client_check_but_logs_in_with_the_vault(
        pgcorral: DaemonFactory, tmp_path: Path) -> None:
    d = _daemon(pgcorral, tmp_path, "trust")
    with psycopg.connect(d.dsn(user="md5user")) as conn:  # no password from the client
        assert conn.execute("select current_user").fetchone() == ("md5user",)


def test_unknown_user_refused_like_a_wrong_password_without_allow_unknown_users(
        pgcorral: DaemonFactory, tmp_path: Path) -> None:
    d = _daemon(pgcorral, tmp_path, "md5", allow_unknown_users="off")
    with pytest.raises(psycopg.OperationalError) as unknown:
        psycopg.connect(d.dsn(user="nobody", password="x"))
    with pytest.raises(psycopg.OperationalError) as wrong:
        psycopg.connect(d.dsn(user="md5user", password="x"))
    assert "password authentication failed" in str(unknown.value)
    assert str(unknown.value).replace("nobody", "U") == str(wrong.value).replace("md5user", "U")


def test_asyncpg_scram_through_the_vault(pgcorral: DaemonFactory, tmp_path: Path) -> None:
    d = _daemon(pgcorral, tmp_path, "scram-sha-256")

    async def run() -> None:
        conn = await asyncpg.connect(host=d.host, port=d.port, user="md5user",
                                     password="md5pass", database="pgcorral_test")
        try:
            assert await conn.fetchval("select current_user") == "md5user"
        finally:
            await conn.close()

    asyncio.run(run())


def test_pgbench_reconnecting_through_a_scram_vault_user(pgcorral: DaemonFactory,
                                                         tmp_path: Path) -> None:
    d = _daemon(pgcorral, tmp_path, "scram-sha-256")
    out = subprocess.run(
        ["pgbench", "-h", d.host, "-p", str(d.port), "-U", "scramuser", "-n", "-c", "4",
         "-j", "4", "-t", "50", "-S", "-C", "pgcorral_test"],
        capture_output=True, text=True, timeout=120, env={"PGPASSWORD": "front-door"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "number of transactions actually processed: 200" in out.stdout


def test_wrong_password_sqlstate_is_28p01(pgcorral: DaemonFactory, tmp_path: Path) -> None:
    d = _daemon(pgcorral, tmp_path, "password")
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": "md5user", "database": "pgcorral_test"}))
        message = read_message(sock)
        assert message is not None and message[0] == b"R"
        sock.sendall(b"p\0\0\0\x0awrong\0")
        message = read_message(sock)
        assert message is not None and message[0] == b"E"
        assert b"C28P01" in message[1]


@pytest.mark.single_worker
def test_auth_query_pools_scram_users_without_any_password_in_pgcorral(
        pgcorral: DaemonFactory, pg: PgCluster, tmp_path: Path) -> None:
    """auth_query: pgcorral reads the verifier with the -S user, checks the client itself,
    recovers the ClientKey from its proof and logs in with it: SCRAM connections are pooled and
    every client is checked again."""
    superuser, env = _vault(tmp_path, {"postgres": "unused-trust"}, "superuser.conf")
    hba = "host all all all all\nlocal all all all\n"
    d = pgcorral({"max_connections": "4", "auth_query": "on"}, hba=hba, env=env,
                 args=["-S", superuser])
    with psycopg.connect(d.dsn(user="scramuser", password="scrampass")) as conn:
        pid = conn.info.backend_pid
        assert conn.execute("select current_user").fetchone() == ("scramuser",)
    wait_reset(pg, pid)  # the release ends after the client has gone
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(d.dsn(user="scramuser", password="wrong"))
    with psycopg.connect(d.dsn(user="scramuser", password="scrampass")) as conn:
        assert conn.info.backend_pid == pid  # the SCRAM connection was pooled
    with psycopg.connect(d.dsn(user="md5user", password="md5pass")) as conn:
        assert conn.execute("select current_user").fetchone() == ("md5user",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(d.dsn(user="nosuchrole", password="x"))


def _sasl_exchange(d: Daemon, payload: bytes) -> dict[str, str]:
    """Start a SCRAM login as a vault user and answer AuthenticationSASL with ``payload``
    (a complete message); the fields of the ErrorResponse that follows."""
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": "scramuser", "database": "pgcorral_test"}))
        message = read_message(sock)
        assert message is not None and message[0] == b"R" and message[1][:4] == b"\0\0\0\x0a"
        sock.sendall(payload)
        message = read_message(sock)
        assert message is not None and message[0] == b"E", message
        fields = dict((part[:1].decode(), part[1:].decode()) for part in
                      message[1].rstrip(b"\0").split(b"\0") if part)
        assert read_message(sock) is None  # and the connection is closed
        return fields


def _sasl_initial(mechanism: bytes, data: bytes, length: int | None = None) -> bytes:
    body = mechanism + b"\0" + struct.pack("!i", len(data) if length is None else length) + data
    return b"p" + struct.pack("!i", len(body) + 4) + body


@pytest.mark.parametrize(("payload", "sqlstate"), [
    (_sasl_initial(b"SCRAM-SHA-1", b"n,,n=,r=abc"), "08P01"),  # bad mechanism
    (_sasl_initial(b"SCRAM-SHA-256", b"garbage"), "08P01"),  # malformed client-first
    (_sasl_initial(b"SCRAM-SHA-256", b"n,,n=,r=abc", length=-5), "08P01"),  # negative length
    (b"p\x7f\xff\xff\xff" + b"x" * 64, "28P01"),  # message length 0x7fffffff
    (b"Q\0\0\0\x0dselect 1\0", "08P01"),  # a query instead of the SASL answer
], ids=["bad-mechanism", "garbage-client-first", "negative-length", "huge-length", "query"])
def test_hostile_sasl_input_gets_postgresqls_answer(pgcorral: DaemonFactory, tmp_path: Path,
                                                   payload: bytes, sqlstate: str) -> None:
    d = _daemon(pgcorral, tmp_path, "scram-sha-256")
    assert _sasl_exchange(d, payload)["C"] == sqlstate
    with psycopg.connect(d.dsn(user="scramuser", password="front-door")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_ten_kilobyte_password_is_just_a_wrong_password(pgcorral: DaemonFactory,
                                                        tmp_path: Path) -> None:
    d = _daemon(pgcorral, tmp_path, "password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(d.dsn(user="md5user", password="p" * 10_000))


def test_daemon_uses_the_files_pgcorral_admin_writes(pgcorral: DaemonFactory,
                                                      tmp_path: Path) -> None:
    import os
    import sys

    key = tmp_path / "home" / ".pgcorral" / "master.key"
    users = tmp_path / "users.conf"
    env = dict(os.environ, PGCORRAL_MASTER_KEY_FILE=str(key))

    def admin(*args: str, password: str) -> None:
        out = subprocess.run([sys.executable, "-m", "pgcorral.cli.admin", *args],
                             capture_output=True, text=True, timeout=60,
                             env={**env, "PGCORRAL_PASSWORD": password}, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr

    admin("master-key", password="Adm1n!Master")
    admin("-f", str(users), "user", "add", "-U", "scramuser", password="scrampass")
    admin("-f", str(users), "add-user", "-U", "md5user", password="md5pass")  # 0.5.0 name
    hba = "host all all all md5\nlocal all all md5\n"
    d = pgcorral({"max_connections": "4"}, hba=hba,
                 env={"PGCORRAL_MASTER_KEY_FILE": str(key)}, args=["-u", str(users)])
    for user, password in (("scramuser", "scrampass"), ("md5user", "md5pass")):
        out = subprocess.run(["psql", "-X", "-At", "-d", d.dsn(user=user, password=password),
                              "-c", "select current_user"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == user


def test_prefill_initial_size_then_min_size_after_a_flush(pgcorral: DaemonFactory,
                                                          tmp_path: Path, pg: PgCluster) -> None:
    users, env = _vault(tmp_path, ROLES, "users.conf")
    limits = "pgcorral_test md5user 4 3 2\nall all all\n"
    d = pgcorral({"max_connections": "8"}, env=env, args=["-u", users], limits=limits)
    count = ("select count(*) from pg_stat_activity where usename = 'md5user' "
             "and datname = 'pgcorral_test'")

    def wait_count(expected: int) -> None:
        deadline = time.monotonic() + 20
        while pg.psql(count).strip() != str(expected):
            assert time.monotonic() < deadline, f"expected {expected} prefilled connections"
            time.sleep(0.1)

    wait_count(3)  # INITIAL_SIZE at start, before any client came
    with psycopg.connect(d.dsn(user="md5user", password="md5pass")) as conn:
        assert conn.execute("select current_user").fetchone() == ("md5user",)
    cli = subprocess.run([sys.executable, "-m", "pgcorral.cli.cli", "-c",
                          str(Path(d.dir, "pgcorral.conf")), "flush", "idle"],
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert cli.returncode == 0, cli.stderr
    wait_count(3)  # after a flush, INITIAL_SIZE again (at least MIN_SIZE)


def test_auth_query_trouble_is_not_shown_to_the_client(pgcorral: DaemonFactory, tmp_path: Path,
                                                       pg: PgCluster) -> None:
    # the -S user names a role that does not exist: the lookup fails
    superuser, env = _vault(tmp_path, {"no_such_superuser": "x"}, "superuser.conf")
    d = pgcorral({"auth_query": "on"}, hba="host all all all all\nlocal all all all\n",
                 env=env, args=["-S", superuser])
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(d.dsn(user="scramuser", password="scrampass"))
    assert "authentication lookup failed" in str(info.value)
    assert "no_such_superuser" not in str(info.value)
    d.wait_for_log("auth_query for user 'scramuser' failed")
