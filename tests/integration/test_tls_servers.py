"""TLS from pgcorral to PostgreSQL (the server leg): each server section's ``tls`` with libpq's
sslmode meanings, its CA and client certificate, SCRAM-SHA-256-PLUS toward PostgreSQL, cancels
over TLS, prefill / validation / auth_query connections, several workers and reload.

What PostgreSQL saw is asked of PostgreSQL itself (``pg_stat_ssl``); what went over the wire is
watched by a small TCP relay (``_Tap``) that records the first bytes of every connection: an
SSLRequest or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import psycopg
import pytest
from devtools.certs import Pki
from devtools.pgcluster import PgCluster, find_free_port
from tests.conftest import PGCORRAL_PATH, wait_reset
from tests.pgwire import connect_error
from tests.tlsfixtures import TEST_DB, start_ssl_cluster
from tests.vaultfiles import write_vault as _vault

from pgcorral.protocol.messages import error_response

if TYPE_CHECKING:
    from tests.conftest import Daemon, DaemonFactory

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
MY_SSL = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
BOSS = ("boss", "bosspass")  # scram_pg's superuser with a password (auth_query's -S user)


# --------------------------------------------------------------------------- helpers


def _query(dsn: str, sql: str) -> object:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def _login_error(d: Daemon, user: str = "trustuser", database: str = TEST_DB
                 ) -> dict[str, str]:
    """The ErrorResponse of a login through ``d`` (which must fail)."""
    error = connect_error(d.host, d.port, {"user": user, "database": database})
    assert error is not None, "the login succeeded"
    return error


def _ssl_of(cluster: PgCluster, where: str) -> list[str]:
    """pg_stat_ssl.ssl of the backends of ``cluster`` matching ``where`` (over pg_stat_activity
    a), other than the asking one."""
    out = cluster.psql(f"SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                       f"WHERE a.pid <> pg_backend_pid() AND ({where}) ORDER BY a.pid",
                       unix_socket=True)
    return out.split()


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``check()`` until it is true."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class _Tap:
    """A TCP relay on loopback in front of ``port`` that records the first 8 bytes each client
    sent: ``starts`` (an SSLRequest, or the start of a plaintext startup/cancel packet)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.starts: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        with self._lock:
            self._socks += [client, server]
        first = b""
        while len(first) < 8:
            chunk = client.recv(8 - len(first))
            if not chunk:
                break
            first += chunk
        with self._lock:
            self.starts.append(first)
        server.sendall(first)
        threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()
        self._pipe(client, server)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._socks:
                sock.close()


@pytest.fixture(scope="module")
def wrong_host_pg(pki: Pki) -> Iterator[PgCluster]:
    """A cluster presenting pki.wrong_host (signed by the CA, named wrong.example)."""
    hba = ["local all all trust", "hostssl all all 127.0.0.1/32 trust",
           "host all all 127.0.0.1/32 trust"]
    cluster = start_ssl_cluster(pki, hba, server=pki.wrong_host, prefix="pgcorral-wronghost-")
    try:
        cluster.psql(f"CREATE DATABASE {TEST_DB}; CREATE ROLE trustuser LOGIN;",
                     unix_socket=True)
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def scram_pg(pki: Pki) -> Iterator[PgCluster]:
    """A cluster that takes TCP logins over TLS with SCRAM only: superuser BOSS and
    scramuser/scrampass."""
    hba = ["local all all trust", "hostssl all all 127.0.0.1/32 scram-sha-256"]
    cluster = start_ssl_cluster(pki, hba, prefix="pgcorral-scramssl-")
    try:
        cluster.psql(f"CREATE DATABASE {TEST_DB};"
                     "SET password_encryption = 'scram-sha-256';"
                     f"CREATE ROLE {BOSS[0]} LOGIN SUPERUSER PASSWORD '{BOSS[1]}';"
                     "CREATE ROLE scramuser LOGIN PASSWORD 'scrampass';", unix_socket=True)
        yield cluster
    finally:
        cluster.destroy()


def _tls_daemon(pgcorral: DaemonFactory, port: int, host: str = "127.0.0.1",
                conf: dict[str, str] | None = None, **server: str) -> Daemon:
    return pgcorral(conf or {}, servers=[("primary", host, port)], server_conf=server)


# --------------------------------------------------------------- 1. tls = require


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_require_gives_postgresql_a_tls_connection(pgcorral: DaemonFactory, ssl_pg: PgCluster,
                                                   pipeline: str) -> None:
    d = _tls_daemon(pgcorral, ssl_pg.port, conf={"pipeline": pipeline}, tls="require")
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        assert conn.execute(MY_SSL).fetchone() == (True,)
        # a large result (about 20 MB) through the TLS leg: flow control on both sides
        rows = conn.execute("SELECT i, repeat('x', 1000) FROM generate_series(1, 20000) i"
                            ).fetchall()
        assert len(rows) == 20000 and rows[-1][0] == 20000 and len(rows[-1][1]) == 1000
        big = conn.execute("SELECT repeat('y', 8000000)").fetchone()
        assert big is not None and len(big[0]) == 8000000
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE t (v text) ON COMMIT DROP")
            with conn.cursor().copy("COPY t FROM STDIN") as copy:
                for i in range(20000):  # about 20 MB toward PostgreSQL
                    copy.write_row((f"row {i} " + "z" * 1000,))
            assert conn.execute("SELECT count(*), sum(length(v)) > 20000000 FROM t"
                                ).fetchone() == (20000, True)
        assert conn.execute(MY_SSL).fetchone() == (True,)


# ---------------------------------------------------- 2. verify-ca and verify-full


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])  # a DNS and an IP SAN
def test_verify_full_with_the_ca(pgcorral: DaemonFactory, ssl_pg: PgCluster, pki: Pki,
                                 host: str) -> None:
    d = _tls_daemon(pgcorral, ssl_pg.port, host=host, tls="verify-full",
                    tls_ca_file=str(pki.ca_file))
    assert _query(d.dsn(), MY_SSL) is True


def test_a_unix_socket_server_is_reached_without_tls(pgcorral: DaemonFactory,
                                                     ssl_pg: PgCluster, pki: Pki) -> None:
    """As libpq ignores sslmode over a Unix socket, so does pgcorral (even verify-full)."""
    d = _tls_daemon(pgcorral, ssl_pg.port, host=ssl_pg.socket_dir, tls="verify-full",
                    tls_ca_file=str(pki.ca_file))
    assert _query(d.dsn(), "SELECT ssl IS NULL OR NOT ssl FROM pg_stat_ssl "
                           "WHERE pid = pg_backend_pid()") is True


@pytest.mark.single_worker
def test_a_tls_backend_that_ends_while_idle_is_replaced(pgcorral: DaemonFactory,
                                                        ssl_pg: PgCluster) -> None:
    """PostgreSQL's FATAL and close over TLS on an idle pooled connection: pgcorral drops it
    and the next client gets a new TLS connection."""
    d = _tls_daemon(pgcorral, ssl_pg.port, tls="require")
    pid = _query(d.dsn(), "SELECT pg_backend_pid()")
    wait_reset(ssl_pg, int(str(pid)))
    ssl_pg.psql(f"SELECT pg_terminate_backend({pid})", unix_socket=True)
    d.wait_for_log("sent data while idle")
    with psycopg.connect(d.dsn()) as conn:
        assert conn.info.backend_pid != pid
        assert conn.execute(MY_SSL).fetchone() == (True,)


def test_verify_full_refuses_a_certificate_for_another_host(
        pgcorral: DaemonFactory, wrong_host_pg: PgCluster, pki: Pki) -> None:
    d = _tls_daemon(pgcorral, wrong_host_pg.port, host="localhost", tls="verify-full",
                    tls_ca_file=str(pki.ca_file))
    error = _login_error(d)
    assert error["C"] == "08006", error
    assert error["M"].startswith(
        f'could not connect to server "primary" at localhost:{wrong_host_pg.port}: SSL error: ')
    assert "certificate verify failed: Hostname mismatch" in error["M"], error
    assert "'localhost'" in error["M"], error
    # verify-ca checks the signature only: the same certificate is fine
    d2 = _tls_daemon(pgcorral, wrong_host_pg.port, host="localhost", tls="verify-ca",
                     tls_ca_file=str(pki.ca_file))
    assert _query(d2.dsn(), MY_SSL) is True


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full", "require"])
def test_a_wrong_ca_fails_certificate_verification(pgcorral: DaemonFactory, ssl_pg: PgCluster,
                                                   pki: Pki, mode: str) -> None:
    """``require`` with a tls_ca_file verifies too, as libpq's sslmode=require with a root
    certificate does."""
    d = _tls_daemon(pgcorral, ssl_pg.port, host="localhost", tls=mode,
                    tls_ca_file=str(pki.wrong_ca.cert))
    error = _login_error(d)
    assert error["C"] == "08006", error
    assert "SSL error: certificate verify failed" in error["M"], error


def test_require_without_a_ca_does_not_verify(pgcorral: DaemonFactory,
                                              wrong_host_pg: PgCluster) -> None:
    d = _tls_daemon(pgcorral, wrong_host_pg.port, host="localhost", tls="require")
    assert _query(d.dsn(), MY_SSL) is True


# --------------------------------------------- 3. a server without TLS; prefer


def test_require_against_a_server_without_ssl(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = _tls_daemon(pgcorral, pg.port, tls="require")
    error = _login_error(d)
    assert error["C"] == "08006", error
    assert error["M"] == (f'could not connect to server "primary" at 127.0.0.1:{pg.port}: '
                          "server does not support SSL, but SSL was required")
    # and the client after it gets the same answer (nothing half-open was pooled)
    assert _login_error(d)["M"] == error["M"]


def test_prefer_uses_plaintext_when_the_server_has_no_ssl(pgcorral: DaemonFactory,
                                                          pg: PgCluster) -> None:
    d = _tls_daemon(pgcorral, pg.port, tls="prefer")
    assert _query(d.dsn(), MY_SSL) is False


def test_prefer_uses_tls_when_the_server_has_it(pgcorral: DaemonFactory,
                                                ssl_pg: PgCluster) -> None:
    d = _tls_daemon(pgcorral, ssl_pg.port, tls="prefer")
    assert _query(d.dsn(), MY_SSL) is True


def test_prefer_falls_back_to_plaintext_when_the_handshake_fails(
        pgcorral: DaemonFactory, ssl_pg: PgCluster, pki: Pki) -> None:
    """libpq's prefer: a failed handshake (here: the wrong CA) is tried again without TLS."""
    d = _tls_daemon(pgcorral, ssl_pg.port, tls="prefer", tls_ca_file=str(pki.wrong_ca.cert))
    # with prefer a tls_ca_file is not used to verify (libpq verifies only under
    # verify-ca/verify-full, or require with a root certificate)
    assert _query(d.dsn(), MY_SSL) is True


# ------------------------------------------------------------------ 4. tls = on


@pytest.mark.parametrize(("spelling", "ssl"), [("on", True), ("off", False)])
def test_pgagroal_spellings(pgcorral: DaemonFactory, ssl_pg: PgCluster, pg: PgCluster,
                            spelling: str, ssl: bool) -> None:
    d = _tls_daemon(pgcorral, ssl_pg.port, tls=spelling)
    assert _query(d.dsn(), MY_SSL) is ssl
    if spelling == "on":  # = require: refused by a server without TLS
        plain = _tls_daemon(pgcorral, pg.port, tls=spelling)
        assert "SSL was required" in _login_error(plain)["M"]


# ------------------------------------------------- 5. a client certificate toward PostgreSQL


def test_client_certificate_toward_postgresql(pgcorral: DaemonFactory,
                                              ssl_pg_certonly: PgCluster, pki: Pki) -> None:
    alice = pki.client("alice")
    d = _tls_daemon(pgcorral, ssl_pg_certonly.port, host="localhost", tls="verify-full",
                    tls_ca_file=str(pki.ca_file), tls_cert_file=str(alice.cert),
                    tls_key_file=str(alice.key))
    with psycopg.connect(d.dsn(user="alice")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("alice",)
        assert conn.execute("SELECT ssl, client_dn FROM pg_stat_ssl "
                            "WHERE pid = pg_backend_pid()").fetchone() == (True, "/CN=alice")
    # the certificate's CN must be the user (clientcert=verify-full): bob is refused by
    # PostgreSQL, and its error reaches the client as PostgreSQL sent it
    error = _login_error(d, user="bob")
    assert error["C"] == "28000", error
    assert error["M"] == '"trust" authentication failed for user "bob"', error


def test_without_a_client_certificate_postgresql_refuses(pgcorral: DaemonFactory,
                                                         ssl_pg_certonly: PgCluster,
                                                         pki: Pki) -> None:
    d = _tls_daemon(pgcorral, ssl_pg_certonly.port, host="localhost", tls="verify-full",
                    tls_ca_file=str(pki.ca_file))
    error = _login_error(d, user="alice")
    assert error["C"] == "28000", error
    assert "connection requires a valid client certificate" in error["M"], error


# -------------------------------------------------- 6. SCRAM-SHA-256-PLUS toward PostgreSQL


def _vault_daemon(pgcorral: DaemonFactory, tmp_path: Path, port: int, **server: str) -> Daemon:
    users, env = _vault(tmp_path, {"scramuser": "scrampass"}, "users.conf")
    return pgcorral({"max_connections": "4"}, hba="host all all all scram-sha-256\n",
                    env=env, args=["-u", users], servers=[("primary", "127.0.0.1", port)],
                    server_conf=server)


def test_vault_user_logs_in_with_channel_binding(pgcorral: DaemonFactory, tmp_path: Path,
                                                 scram_pg: PgCluster, pg: PgCluster) -> None:
    """``channel_binding = require`` refuses any exchange that is not SCRAM-SHA-256-PLUS
    (libpq's rule): a login that works under it was channel-bound. The same vault user
    against a server without TLS is refused by pgcorral's own check."""
    d = _vault_daemon(pgcorral, tmp_path, scram_pg.port, tls="require",
                      channel_binding="require")
    dsn = d.dsn(user="scramuser", password="scrampass")
    assert _query(dsn, MY_SSL) is True
    assert _query(dsn, "SELECT current_user") == "scramuser"  # a pooled connection this time

    plain = _vault_daemon(pgcorral, tmp_path, pg.port, tls="prefer",
                          channel_binding="require")
    with pytest.raises(psycopg.OperationalError,
                       match="channel binding required, but SSL not in use"):
        psycopg.connect(plain.dsn(user="scramuser", password="scrampass"), connect_timeout=10)
    # without require, the same daemon setup logs in (without binding: no TLS)
    prefer = _vault_daemon(pgcorral, tmp_path, pg.port, tls="prefer")
    assert _query(prefer.dsn(user="scramuser", password="scrampass"), MY_SSL) is False


@pytest.mark.parametrize(("user", "message"), [
    ("trustuser", "channel binding required, but server authenticated client without channel "
                  "binding"),
    ("md5user", "channel binding required but not supported by server's authentication "
                "request"),
    ("pwuser", "channel binding required but not supported by server's authentication "
               "request"),
])
def test_channel_binding_require_refuses_other_methods(pgcorral: DaemonFactory, tmp_path: Path,
                                                       ssl_pg: PgCluster, user: str,
                                                       message: str) -> None:
    """libpq's downgrade protection: under require, PostgreSQL asking for no password, an md5
    or a cleartext password over TLS is refused by pgcorral (28000), in libpq's words; the
    password (or its md5 hash) is never sent."""
    users, env = _vault(tmp_path, {user: user.replace("user", "pass")}, "users.conf")
    d = pgcorral({}, hba="host all all all trust\n", env=env, args=["-u", users],
                 servers=[("primary", "127.0.0.1", ssl_pg.port)],
                 server_conf={"tls": "require", "channel_binding": "require"})
    error = _login_error(d, user=user)
    assert error["C"] == "28000", error
    assert error["M"] == message, error


def test_channel_binding_disable_logs_in_without_plus(pgcorral: DaemonFactory, tmp_path: Path,
                                                      scram_pg: PgCluster) -> None:
    d = _vault_daemon(pgcorral, tmp_path, scram_pg.port, tls="require",
                      channel_binding="disable")
    assert _query(d.dsn(user="scramuser", password="scrampass"), MY_SSL) is True


def test_auth_query_over_tls_with_channel_binding(pgcorral: DaemonFactory, tmp_path: Path,
                                                  scram_pg: PgCluster) -> None:
    """auth_query: the -S superuser's connection and the users' logins with the recovered
    ClientKey both go over TLS with SCRAM-SHA-256-PLUS (channel_binding = require)."""
    superuser, env = _vault(tmp_path, {BOSS[0]: BOSS[1]}, "superuser.conf")
    d = pgcorral({"max_connections": "4", "auth_query": "on"}, hba="host all all all all\n",
                 env=env, args=["-S", superuser], servers=[("primary", "127.0.0.1",
                                                            scram_pg.port)],
                 server_conf={"tls": "require", "channel_binding": "require"})
    dsn = d.dsn(user="scramuser", password="scrampass")
    assert _query(dsn, MY_SSL) is True
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(d.dsn(user="scramuser", password="wrong"), connect_timeout=10)
    # the auth_query connection: one per worker that looked a user up (1 or 2 with 2 workers)
    found = _ssl_of(scram_pg, "a.query LIKE '%pg_authid%'")
    assert found and set(found) == {"t"}, found
    assert _query(dsn, "SELECT current_user") == "scramuser"


# --------------------------------------------- 7. pass-through SCRAM over a TLS server leg


def test_pass_through_scram_over_a_tls_server_leg(pgcorral: DaemonFactory,
                                                  ssl_pg: PgCluster) -> None:
    """A user pgcorral has no password for: PostgreSQL's SCRAM exchange is relayed, offered
    to the client without SCRAM-SHA-256-PLUS (the client could only bind to pgcorral's
    certificate, not to the server leg's)."""
    d = _tls_daemon(pgcorral, ssl_pg.port, tls="require")
    for binding in ("disable", "prefer"):  # over a plaintext client leg libpq sends 'n'
        dsn = d.dsn(user="scramuser", password="scrampass", channel_binding=binding)
        assert _query(dsn, MY_SSL) is True
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(d.dsn(user="scramuser", password="scrampass",
                              channel_binding="require"), connect_timeout=10)


def test_pass_through_scram_with_tls_on_both_legs(pgcorral: DaemonFactory, ssl_pg: PgCluster,
                                                  pg: PgCluster, pki: Pki) -> None:
    """The client reaches pgcorral over TLS too (docs/TLS.md, the pass-through table).
    With channel_binding=disable it logs in. With libpq's default channel_binding=prefer it sees
    a TLS connection and an offer without -PLUS, so it answers with the gs2 flag 'y' ("I could
    bind, but you did not offer it"). PostgreSQL, whose own leg is TLS and which did offer
    -PLUS, must treat that as a downgrade attack and refuse it (RFC 5802); pgcorral cannot
    rewrite the flag, as the client's proof covers it. So that client gets PostgreSQL's FATAL,
    promptly, and the next client is fine. Over a plaintext server leg PostgreSQL offered no
    -PLUS, and 'y' is fine. (A vault user or auth_query avoids all this: pgcorral then answers
    PostgreSQL itself, with SCRAM-SHA-256-PLUS.)"""
    conf = {"tls": "on", "tls_cert_file": str(pki.server.cert),
            "tls_key_file": str(pki.server.key)}
    d = _tls_daemon(pgcorral, ssl_pg.port, conf=conf, tls="require")
    client = {"sslmode": "require", "password": "scrampass"}
    dsn = d.dsn(user="scramuser", channel_binding="disable", **client)
    assert _query(dsn, MY_SSL) is True
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(d.dsn(user="scramuser", channel_binding="prefer", **client),
                        connect_timeout=10)
    assert "SCRAM channel binding negotiation error" in str(refused.value), refused.value
    assert _query(dsn, "SELECT current_user") == "scramuser"
    # require: the client itself refuses an offer without -PLUS
    with pytest.raises(psycopg.OperationalError, match="did not offer an authentication "
                       "method that supports channel binding"):
        psycopg.connect(d.dsn(user="scramuser", channel_binding="require", **client),
                        connect_timeout=10)
    plain_leg = _tls_daemon(pgcorral, pg.port, conf=conf, tls="prefer")
    dsn = plain_leg.dsn(user="scramuser", channel_binding="prefer", **client)
    assert _query(dsn, MY_SSL) is False


# ------------------------------------------------------------------ 8. cancel over TLS


@pytest.mark.parametrize(("pipeline", "workers"), [("session", "1"), ("transaction", "1"),
                                                    ("session", "2")])
def test_cancel_goes_over_tls(pgcorral: DaemonFactory, ssl_pg: PgCluster, pipeline: str,
                              workers: str) -> None:
    """PostgreSQL reads a CancelRequest before any pg_hba check, so only the wire tells
    whether it came over TLS: every connection pgcorral opened, the cancel's included, began
    with an SSLRequest. (With two workers the cancel may reach the other one.)"""
    tap = _Tap(ssl_pg.port)
    try:
        d = _tls_daemon(pgcorral, tap.port, conf={"pipeline": pipeline, "workers": workers},
                        tls="require")
        with psycopg.connect(d.dsn()) as conn:
            assert conn.execute(MY_SSL).fetchone() == (True,)
            # cancel_safe: libpq's blocking PQcancel would keep the GIL (psycopg binary) while
            # pgcorral forwards the cancel through the tap's threads, which need it
            timer = threading.Timer(0.3, conn.cancel_safe)
            timer.start()
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
            assert time.monotonic() - started < 10
            timer.join()
        assert len(tap.starts) == 2, tap.starts  # the session's connection and the cancel
        assert all(start == SSL_REQUEST for start in tap.starts), tap.starts
        assert "could not forward cancel" not in d.log()
    finally:
        tap.close()


def test_cancel_of_a_plaintext_section_is_plaintext(pgcorral: DaemonFactory,
                                                    pg: PgCluster) -> None:
    """The tap itself: without TLS the connections start with the packet lengths."""
    tap = _Tap(pg.port)
    try:
        d = _tls_daemon(pgcorral, tap.port, tls="disable")
        with psycopg.connect(d.dsn()) as conn:
            timer = threading.Timer(0.3, conn.cancel_safe)
            timer.start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
            timer.join()
        assert len(tap.starts) == 2 and SSL_REQUEST not in tap.starts, tap.starts
    finally:
        tap.close()


# ------------------------------------- 9. prefill, validation and auth_query connections


def test_prefill_and_background_validation_over_tls(pgcorral: DaemonFactory, tmp_path: Path,
                                                    ssl_pg: PgCluster) -> None:
    users, env = _vault(tmp_path, {"md5user": "md5pass"}, "users.conf")
    d = pgcorral({"max_connections": "4", "validation": "background",
                  "background_interval": "1"}, env=env, args=["-u", users],
                 limits=f"{TEST_DB} md5user 4 2 0\nall all all\n",
                 servers=[("primary", "127.0.0.1", ssl_pg.port)],
                 server_conf={"tls": "require"})
    mine = "a.usename = 'md5user'"
    _wait_for("two prefilled connections", lambda: len(_ssl_of(ssl_pg, mine)) == 2)
    assert _ssl_of(ssl_pg, mine) == ["t", "t"]
    # background validation sends an empty query over the TLS connections, which stay
    _wait_for("validation", lambda: _ssl_of(ssl_pg, f"{mine} AND a.query = ''") == ["t", "t"])
    with psycopg.connect(d.dsn(user="md5user", password="md5pass")) as conn:
        assert conn.execute(MY_SSL).fetchone() == (True,)
    # the client got a prefilled one (with two workers, maybe a new one of its worker's)
    assert set(_ssl_of(ssl_pg, mine)) == {"t"}


@pytest.mark.single_worker
def test_foreground_validation_over_tls(pgcorral: DaemonFactory, ssl_pg: PgCluster) -> None:
    d = _tls_daemon(pgcorral, ssl_pg.port, conf={"validation": "foreground",
                                                 "max_connections": "1"}, tls="require")
    pids = {_query(d.dsn(), "SELECT pg_backend_pid()") for _ in range(3)}
    assert len(pids) == 1  # validated (an empty query over TLS) and reused each time
    assert _ssl_of(ssl_pg, f"a.pid = {pids.pop()}") == ["t"]


def test_auth_query_connection_over_tls(pgcorral: DaemonFactory, tmp_path: Path,
                                        ssl_pg: PgCluster) -> None:
    superuser, env = _vault(tmp_path, {"postgres": "unused-trust"}, "superuser.conf")
    d = pgcorral({"max_connections": "4", "auth_query": "on"}, hba="host all all all all\n",
                 env=env, args=["-S", superuser],
                 servers=[("primary", "127.0.0.1", ssl_pg.port)],
                 server_conf={"tls": "require"})
    assert _query(d.dsn(user="scramuser", password="scrampass"), MY_SSL) is True
    assert _query(d.dsn(user="md5user", password="md5pass"), MY_SSL) is True
    where = f"a.query LIKE '%pg_authid%' AND a.client_port IS NOT NULL AND a.datname = '{TEST_DB}'"
    assert set(_ssl_of(ssl_pg, where)) == {"t"}


# ------------------------------------------------------------------- 10. two workers


def test_two_workers_with_tls_servers_under_starvation(pgcorral: DaemonFactory,
                                                       ssl_pg: PgCluster) -> None:
    """TLS server connections never change workers (their TLS state lives in one process):
    a starved worker gets room by the other closing one. 40 clients of two users over 3
    connections, all served."""
    d = _tls_daemon(pgcorral, ssl_pg.port, conf={"workers": "2", "max_connections": "3",
                                                 "blocking_timeout": "30"}, tls="require")

    async def client(i: int) -> bool:
        user = ("trustuser", "md5user")[i % 2]
        conn = await asyncpg.connect(host=d.host, port=d.port, user=user, password="md5pass",
                                     database=TEST_DB, ssl=False, timeout=30)
        try:
            ssl = await conn.fetchval(MY_SSL)
            await conn.execute("SELECT pg_sleep(0.02)")
            return bool(ssl)
        finally:
            await conn.close()

    async def run() -> list[bool]:
        return list(await asyncio.gather(*(client(i) for i in range(40))))

    assert asyncio.run(run()) == [True] * 40
    assert "Traceback" not in d.log()


# ----------------------------------------------------------------------- 11. reload


@pytest.mark.single_worker
def test_reload_changes_tls_for_new_server_connections(pgcorral: DaemonFactory,
                                                       ssl_pg: PgCluster) -> None:
    d = _tls_daemon(pgcorral, ssl_pg.port, conf={"max_connections": "4"}, tls="require")
    conf = Path(d.dir, "pgcorral.conf")
    with psycopg.connect(d.dsn(), autocommit=True) as before:
        assert before.execute(MY_SSL).fetchone() == (True,)
        conf.write_text(conf.read_text().replace("tls = require", "tls = disable"))
        d.signal(signal.SIGHUP)
        d.wait_for_log("configuration reloaded")
        with psycopg.connect(d.dsn()) as after:  # a new server connection
            assert after.execute(MY_SSL).fetchone() == (False,)
        # the session that began before the reload keeps its TLS connection
        assert before.execute(MY_SSL).fetchone() == (True,)
        assert before.execute("SELECT count(*) FROM pgbench_accounts").fetchone() == (100000,)


@pytest.mark.single_worker
@pytest.mark.parametrize("pipeline", ["session", "transaction"])
@pytest.mark.parametrize(("before", "after"), [("disable", "require"), ("require", "disable")])
def test_reload_does_not_reuse_connections_opened_with_the_old_tls(
        pgcorral: DaemonFactory, ssl_pg: PgCluster, before: str, after: str,
        pipeline: str) -> None:
    """A reload that changes a server's TLS settings closes its idle connections, and the ones
    in use when their clients leave: after ``disable`` -> ``require`` no plaintext connection
    opened before serves a client again (and the other way round)."""
    d = _tls_daemon(pgcorral, ssl_pg.port, conf={"max_connections": "4", "pipeline": pipeline},
                    tls=before)
    conf = Path(d.dir, "pgcorral.conf")
    with psycopg.connect(d.dsn(), autocommit=True) as busy:
        busy.execute("BEGIN")  # holds its server connection in both pipelines
        busy_pid = busy.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        idle_pid = int(str(_query(d.dsn(), "SELECT pg_backend_pid()")))  # back to the pool
        if pipeline == "session":
            wait_reset(ssl_pg, idle_pid)
        conf.write_text(conf.read_text().replace(f"tls = {before}", f"tls = {after}"))
        d.signal(signal.SIGHUP)
        d.wait_for_log("configuration reloaded")
        _wait_for("the idle connection closed",
                  lambda: _ssl_of(ssl_pg, f"a.pid = {idle_pid}") == [])
        assert busy.execute(MY_SSL).fetchone() == (before != "disable",)  # kept meanwhile
        busy.execute("COMMIT")  # transaction pooling: released here, and closed
        if pipeline == "transaction":
            _wait_for("the busy connection closed",
                      lambda: _ssl_of(ssl_pg, f"a.pid = {busy_pid}") == [])
    _wait_for("the busy connection closed", lambda: _ssl_of(ssl_pg, f"a.pid = {busy_pid}") == [])
    with psycopg.connect(d.dsn()) as conn:
        assert conn.execute(MY_SSL).fetchone() == (after != "disable",)


# ------------------------------------------- a server that misbehaves during SSL negotiation


class _FakeServer:
    """Loopback server that answers every SSLRequest with ``reply`` and then, with ``then``,
    sends those bytes (instead of a TLS ServerHello); afterwards it holds the connection open
    until closed (``hold``) or closes it."""

    def __init__(self, reply: bytes, then: bytes = b"", hold: bool = False) -> None:
        self.reply, self.then, self.hold = reply, then, hold
        self.requests: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError):
                self.requests.append(conn.recv(8))
                conn.sendall(self.reply)
                if self.then:
                    conn.recv(4096)  # the ClientHello
                    conn.sendall(self.then)
            if self.hold:
                self._open.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        self._listener.close()
        for conn in self._open:
            conn.close()


@pytest.mark.parametrize(("reply", "then", "mode", "message"), [
    # CVE-2021-23222: bytes after 'S' would be read as if they came over TLS
    (b"Sinjected", b"", "require", "received unencrypted data after SSL response"),
    (b"Sinjected", b"", "prefer", "received unencrypted data after SSL response"),
    (b"", b"", "require", "server closed the connection during SSL negotiation"),
    (b"X", b"", "require", "received invalid response to SSL negotiation: b'X'"),
    # what a postmaster that cannot fork a backend sends, whatever the client said
    # (its text was not authenticated: logged, never shown to the client, CVE-2024-10977)
    (error_response("53300", "could not fork new process for connection: Cannot allocate "
                    "memory"), b"", "prefer", "server sent an error response during SSL "
     "exchange"),
    (b"S", b"HTTP/1.0 400 Bad Request\r\n\r\n", "require", "SSL error: "),
], ids=["injected-require", "injected-prefer", "closed", "invalid-answer", "fork-failed",
        "not-tls"])
def test_bad_ssl_negotiation_is_refused(pgcorral: DaemonFactory, reply: bytes, then: bytes,
                                        mode: str, message: str) -> None:
    fake = _FakeServer(reply, then)
    try:
        d = _tls_daemon(pgcorral, fake.port, tls=mode)
        error = _login_error(d)
        assert error["C"] == "08006", error
        assert error["M"].startswith(
            f'could not connect to server "primary" at 127.0.0.1:{fake.port}: {message}'), error
        assert fake.requests[0] == SSL_REQUEST
    finally:
        fake.close()


def test_a_stalled_handshake_ends_at_server_connect_timeout(pgcorral: DaemonFactory) -> None:
    fake = _FakeServer(b"S", hold=True)
    try:
        d = _tls_daemon(pgcorral, fake.port, conf={"server_connect_timeout": "1"},
                        tls="require")
        started = time.monotonic()
        error = _login_error(d)
        assert error["C"] == "08006", error
        assert error["M"].endswith(": timeout expired"), error
        assert time.monotonic() - started < 5
    finally:
        fake.close()


@pytest.mark.parametrize("mode", ["disable", "require"])
def test_a_server_that_is_down(pgcorral: DaemonFactory, mode: str) -> None:
    """Connection refused, with or without TLS: 08006 naming the server (not XX000)."""
    port = find_free_port()
    d = _tls_daemon(pgcorral, port, tls=mode)
    error = _login_error(d)
    assert error["C"] == "08006", error
    assert error["M"].startswith(f'could not connect to server "primary" at 127.0.0.1:{port}: '
                                 ), error


@pytest.mark.single_worker
def test_reload_replaces_the_auth_query_connection(pgcorral: DaemonFactory, tmp_path: Path,
                                                   ssl_pg: PgCluster) -> None:
    """The -S superuser's kept connection follows a change of the server's TLS too."""
    superuser, env = _vault(tmp_path, {"postgres": "unused-trust"}, "superuser.conf")
    d = pgcorral({"max_connections": "4", "auth_query": "on"}, hba="host all all all all\n",
                 env=env, args=["-S", superuser],
                 servers=[("primary", "127.0.0.1", ssl_pg.port)],
                 server_conf={"tls": "disable"})
    where = f"a.query LIKE '%pg_authid%' AND a.client_port IS NOT NULL AND a.datname = '{TEST_DB}'"
    dsn = d.dsn(user="scramuser", password="scrampass")
    assert _query(dsn, MY_SSL) is False
    assert _ssl_of(ssl_pg, where) == ["f"]
    conf = Path(d.dir, "pgcorral.conf")
    conf.write_text(conf.read_text().replace("tls = disable", "tls = require"))
    d.signal(signal.SIGHUP)
    d.wait_for_log("configuration reloaded")
    _wait_for("the old auth_query connection closed", lambda: _ssl_of(ssl_pg, where) == [])
    assert _query(dsn, MY_SSL) is True
    assert _ssl_of(ssl_pg, where) == ["t"]


def test_cancel_after_switch_to_reaches_the_sessions_server(pgcorral: DaemonFactory,
                                                            pg: PgCluster,
                                                            ssl_pg: PgCluster) -> None:
    """A cancel goes to the server the session's connection is on (with that section's TLS),
    not to the one ``switch-to`` sends new connections to."""
    d = pgcorral({}, servers=[("primary", "127.0.0.1", pg.port),
                              ("other", "127.0.0.1", ssl_pg.port)],
                 server_conf={"tls": "prefer"})
    with psycopg.connect(d.dsn()) as conn:
        assert conn.execute(MY_SSL).fetchone() == (False,)  # primary: pg, without TLS
        switched = subprocess.run(
            [sys.executable, "-m", "pgcorral.cli.cli", "-c", str(Path(d.dir, "pgcorral.conf")),
             "switch-to", "other"], capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PYTHONPATH": PGCORRAL_PATH})
        assert switched.returncode == 0, switched.stderr
        with psycopg.connect(d.dsn()) as new:
            assert new.execute(MY_SSL).fetchone() == (True,)  # other: ssl_pg, over TLS
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - started < 10
        timer.join()
