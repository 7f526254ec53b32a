"""TLS toward clients (``tls = on``): pgcorral is the TLS server in front of the plain ``pg``
cluster. psql, psycopg (libpq 17+: direct TLS) and asyncpg connect with verify-full against the
test PKI's CA; raw Python ssl sockets see the exact bytes (direct TLS with and without ALPN,
SQLSTATEs of refused logins); hba ``hostssl``/``hostnossl``/``cert``/``clientcert=``;
SCRAM-SHA-256-PLUS for vault users; hostile handshakes; renegotiation; reloading the
certificate; configuration errors at startup."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.conftest import PGCORRAL_PATH
from tests.pgwire import connect_error, error_fields, read_message, startup_packet
from tests.pgwire import login as pgwire_login
from tests.vaultfiles import write_vault as _vault

if TYPE_CHECKING:
    from devtools.certs import CertFiles, Pki
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory

TEST_DB = "pgcorral_test"
USER = {"user": "trustuser", "database": TEST_DB}
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)
ALL_HOSTS = "host all all all trust\nlocal all all trust\n"


# --------------------------------------------------------------------------------- helpers


def tls_conf(pki: Pki, cert: CertFiles | None = None, **extra: str) -> dict[str, str]:
    """Main-section keys turning TLS on with the pki's server certificate (or ``cert``); client
    certificates are verified against the pki's CA."""
    files = cert or pki.server
    conf = {"tls": "on", "tls_cert_file": str(files.cert), "tls_key_file": str(files.key),
            "tls_ca_file": str(pki.ca_file)}  # fmt: skip
    conf.update(extra)
    return conf


def tls_dsn(d: Daemon, pki: Pki, client: CertFiles | None = None, **params: str) -> str:
    """verify-full to ``localhost`` against the pki's CA; without ``client`` no certificate is
    sent (sslcert names a file that does not exist, so no ~/.postgresql/postgresql.crt)."""
    extra = {"host": "localhost", "sslmode": "verify-full", "sslrootcert": str(pki.ca_file),
             "connect_timeout": "10"}  # fmt: skip
    if client is None:
        extra["sslcert"] = str(pki.directory / "no-such-client.crt")
    else:
        extra.update(sslcert=str(client.cert), sslkey=str(client.key))
    extra.update(params)
    user = extra.pop("user", "trustuser")
    return d.dsn(user=user, **extra)


def plain_dsn(d: Daemon, **params: str) -> str:
    return d.dsn(**{"sslmode": "disable", "connect_timeout": "10", **params})


def one(dsn: str, sql: str = "SELECT current_user") -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return str(row[0])


def client_context(pki: Pki, client: CertFiles | None = None, alpn: bool = True,
                   **versions: ssl.TLSVersion) -> ssl.SSLContext:  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    if alpn:
        ctx.set_alpn_protocols(["postgresql"])
    for attr, version in versions.items():
        setattr(ctx, attr, version)
    return ctx


def tls_socket(d: Daemon, pki: Pki, *, client: CertFiles | None = None, direct: bool = False,
               alpn: bool = True, ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    """A raw TLS connection to the daemon: SSLRequest then the handshake, or (direct) the
    handshake at once."""
    sock = socket.create_connection((d.host, d.port), timeout=10)
    try:
        if not direct:
            sock.sendall(SSL_REQUEST)
            assert sock.recv(1) == b"S"
        ctx = ctx or client_context(pki, client, alpn=alpn)
        return ctx.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise


def login(sock: socket.socket, params: dict[str, str] = USER) -> dict[str, str] | None:
    """pgwire.login, as USER by default."""
    return pgwire_login(sock, params)


def simple_query(sock: socket.socket, sql: str) -> list[bytes]:
    """The DataRow bodies of a simple query (raw sockets only)."""
    body = sql.encode() + b"\0"
    sock.sendall(b"Q" + struct.pack("!i", len(body) + 4) + body)
    rows: list[bytes] = []
    while True:
        message = read_message(sock)
        assert message is not None, "closed during a query"
        if message[0] == b"E":
            raise AssertionError(error_fields(message[1]))
        if message[0] == b"D":
            rows.append(message[1])
        if message[0] == b"Z":
            return rows


def tls_login_error(d: Daemon, pki: Pki, user: str, client: CertFiles | None = None
                    ) -> dict[str, str] | None:  # fmt: skip
    with tls_socket(d, pki, client=client) as sock:
        return login(sock, {"user": user, "database": TEST_DB})


def closed_within(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer closes ``sock`` (EOF or reset); fails after ``timeout``."""
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {timeout:g} s", pytrace=False)
    return time.monotonic() - start


def wait_for_count(d: Daemon, text: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while d.log().count(text) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not {count} times in the log after {timeout:g} s:\n"
                        f"{d.log()}", pytrace=False)
        time.sleep(0.02)


def server_cn(d: Daemon) -> str:
    """The CN of the certificate the daemon presents (no verification)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((d.host, d.port), timeout=10) as raw:
        raw.sendall(SSL_REQUEST)
        assert raw.recv(1) == b"S"
        with ctx.wrap_socket(raw) as sock:
            der = sock.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.fixture(scope="module")
def cert_roles(pg: PgCluster, pki: Pki) -> list[str]:
    """One login role in ``pg`` per pki client name (the CN of its certificate)."""
    for name in pki.clients:
        pg.psql(f"DO $$BEGIN CREATE ROLE {name} LOGIN; "
                f"EXCEPTION WHEN duplicate_object THEN NULL; END$$")
    return list(pki.clients)


# ------------------------------------------------------------------------- 1, 11: basics


@pytest.mark.parametrize("workers", ["1", "2"])
def test_psql_and_psycopg_verify_full(pgcorral: DaemonFactory, pki: Pki, pg: PgCluster,
                                      workers: str) -> None:  # fmt: skip
    d = pgcorral(tls_conf(pki, workers=workers))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    out = subprocess.run(
        [pg.bin("psql"), "-X", "-At", "-d", tls_dsn(d, pki), "-c", "\\conninfo",
         "-c", "SELECT current_user"],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "SSL connection (protocol: TLSv1.3" in out.stdout, out.stdout
    assert out.stdout.strip().endswith("trustuser"), out.stdout
    for _ in range(4):  # with 2 workers, likely to reach both
        with psycopg.connect(tls_dsn(d, pki)) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT count(*) FROM pgbench_branches").fetchone() == (1,)
    with psycopg.connect(plain_dsn(d)) as conn:  # TLS is offered, not required
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_tls_version_limits(pgcorral: DaemonFactory, pki: Pki) -> None:
    d = pgcorral(tls_conf(pki, tls_max_protocol_version="tlsv1.2"))
    with tls_socket(d, pki) as sock:
        assert sock.version() == "TLSv1.2"
        assert login(sock) is None
    assert one(tls_dsn(d, pki)) == "trustuser"
    with pytest.raises(psycopg.OperationalError, match="protocol version"):
        one(tls_dsn(d, pki, ssl_min_protocol_version="TLSv1.3"))


def test_tls_ciphers(pgcorral: DaemonFactory, pki: Pki) -> None:
    cipher = "ECDHE-ECDSA-CHACHA20-POLY1305"
    d = pgcorral(tls_conf(pki, tls_max_protocol_version="tlsv1.2", tls_ciphers=cipher))
    with tls_socket(d, pki) as sock:
        assert sock.cipher()[0] == cipher
        assert login(sock) is None


def test_tls_turned_on_and_off_by_reload(pgcorral: DaemonFactory, pki: Pki) -> None:
    d = pgcorral()
    conf = Path(d.dir, "pgcorral.conf")
    plain = conf.read_text()

    def answer() -> bytes:
        with socket.create_connection((d.host, d.port), timeout=10) as sock:
            sock.sendall(SSL_REQUEST)
            return sock.recv(1)

    assert answer() == b"N"
    keys = "".join(f"{k} = {v}\n" for k, v in tls_conf(pki).items())
    conf.write_text(plain.replace("[pgcorral]\n", "[pgcorral]\n" + keys, 1))
    d.signal(signal.SIGHUP)
    wait_for_count(d, "configuration reloaded", 1)
    assert answer() == b"S"
    with psycopg.connect(tls_dsn(d, pki)) as conn:
        assert conn.pgconn.ssl_in_use
        conf.write_text(plain)
        d.signal(signal.SIGHUP)
        wait_for_count(d, "configuration reloaded", 2)
        assert answer() == b"N"
        assert conn.execute("SELECT current_user").fetchone() == ("trustuser",)


# --------------------------------------------------------------------------- 2: direct TLS


def test_direct_tls(pgcorral: DaemonFactory, pki: Pki) -> None:
    if psycopg.pq.version() < 170000:
        pytest.skip(f"libpq {psycopg.pq.version()} has no sslnegotiation=direct")
    d = pgcorral(tls_conf(pki))
    with psycopg.connect(tls_dsn(d, pki, sslnegotiation="direct")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("trustuser",)
    with tls_socket(d, pki, direct=True) as sock:  # raw, with ALPN
        assert sock.selected_alpn_protocol() == "postgresql"
        assert login(sock) is None
        assert simple_query(sock, "SELECT 41 + 1")[0].endswith(b"42")


def test_direct_tls_when_tls_is_off(pgcorral: DaemonFactory, pki: Pki) -> None:
    """A ClientHello where a startup packet belongs, TLS off: closed, as PostgreSQL does."""
    d = pgcorral()
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.sendall(_client_hello())
        closed_within(sock, 5)
    assert one(plain_dsn(d)) == "trustuser"


def test_direct_tls_without_alpn_is_refused(pgcorral: DaemonFactory, pki: Pki) -> None:
    d = pgcorral(tls_conf(pki))
    with tls_socket(d, pki, direct=True, alpn=False) as sock:
        assert sock.selected_alpn_protocol() is None
        try:
            sock.sendall(startup_packet(USER))
        except OSError:
            pass  # already closed
        message = read_message(sock)
        if message is not None:  # PostgreSQL 17 sends an error, then closes
            assert message[0] == b"E", message
            fields = error_fields(message[1])
            assert fields["C"] == "08P01" and "ALPN" in fields["M"], fields
            assert read_message(sock) is None
    # the daemon is fine and has no session for it
    assert one(tls_dsn(d, pki)) == "trustuser"


@pytest.mark.parametrize("direct", [False, True])
def test_handshake_one_byte_at_a_time(pgcorral: DaemonFactory, pki: Pki, direct: bool) -> None:
    """The handshake records split at every byte (each its own segment with TCP_NODELAY)."""
    d = pgcorral(tls_conf(pki))
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not direct:
            sock.sendall(SSL_REQUEST)
            assert sock.recv(1) == b"S"
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context(pki).wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            for byte in outgoing.read():
                sock.send(bytes([byte]))
            if done:
                break
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
        assert tls.selected_alpn_protocol() == "postgresql"
        packet = startup_packet(USER)
        for i in range(len(packet)):
            tls.write(packet[i:i + 1])
            sock.send(outgoing.read())  # one TLS record per byte
        reply = b""
        while b"Z\0\0\0\5I" not in reply:
            data = sock.recv(65536)
            assert data, reply
            incoming.write(data)
            while True:
                try:
                    chunk = tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                reply += chunk
        assert reply[:9] == b"R\0\0\0\x08\0\0\0\0", reply[:20]  # AuthenticationOk


# ----------------------------------------------------------------------------- 3: asyncpg


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_asyncpg_with_flow_control(pgcorral: DaemonFactory, pki: Pki, pipeline: str) -> None:
    d = pgcorral(tls_conf(pki, pipeline=pipeline, max_connections="4"),
                 hba="hostssl all all all trust\n")  # TLS or nothing
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))

    async def client(i: int) -> None:
        conn = await asyncpg.connect(host="localhost", port=d.port, user="trustuser",
                                     database=TEST_DB, ssl=ctx, timeout=10)
        try:
            stmt = await conn.prepare("SELECT $1::int * 2")
            for n in range(20):
                assert await stmt.fetchval(n) == 2 * n
            big = await conn.fetchval("SELECT repeat('x', 1000000)")
            assert big == "x" * 1_000_000
            rows = await conn.fetch("SELECT generate_series(1, 100000)")
            assert len(rows) == 100_000 and rows[-1][0] == 100_000
            upload = "y" * 2_000_000  # the client-to-server direction
            assert await conn.fetchval("SELECT length($1::text)", upload) == 2_000_000
            async with conn.transaction():
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                await conn.fetchval("SELECT count(*) FROM generate_series(1, 1000)")
                assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        finally:
            await conn.close(timeout=5)

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(6))), 60)

    asyncio.run(run())


def _rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and its children (the workers), KiB."""
    total, pids = 0, [pid]
    for p in pids:
        for task in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{task}/children") as f:
                pids += [int(c) for c in f.read().split()]
        with open(f"/proc/{p}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total


def test_slow_tls_reader_keeps_pgcorral_memory_bounded(pgcorral: DaemonFactory, pki: Pki,
                                                       pg: PgCluster) -> None:  # fmt: skip
    """A TLS client that reads nothing: pgcorral stops reading from PostgreSQL (its backend
    waits in ClientWrite) instead of piling the result up, decrypted or encrypted."""
    d = pgcorral(tls_conf(pki))
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.settimeout(30)
    raw.connect((d.host, d.port))
    raw.sendall(SSL_REQUEST)
    assert raw.recv(1) == b"S"
    with client_context(pki).wrap_socket(raw, server_hostname="localhost") as sock:
        assert login(sock) is None
        pid = int(simple_query(sock, "SELECT pg_backend_pid()")[0][6:])
        before = _rss_kib(d.pid)
        sql = b"SELECT repeat('x', 10000) FROM generate_series(1, 10000)\0"  # ~100 MB
        sock.sendall(b"Q" + struct.pack("!i", len(sql) + 4) + sql)
        deadline = time.monotonic() + 15
        check = f"SELECT wait_event FROM pg_stat_activity WHERE pid = {pid}"
        waiting = 0  # PostgreSQL seen blocked on its socket to pgcorral so many times in a row
        while waiting < 5:
            waiting = waiting + 1 if pg.psql(check).strip() == "ClientWrite" else 0
            assert time.monotonic() < deadline, "PostgreSQL never had to wait for pgcorral"
        grew = _rss_kib(d.pid) - before
        assert grew < 32 * 1024, f"pgcorral grew by {grew // 1024} MiB"
        rows = 0
        while (message := read_message(sock)) is not None and message[0] != b"Z":
            if message[0] == b"D":
                rows += 1
                assert len(message[1]) == 2 + 4 + 10000
        assert rows == 10000


def test_graceful_shutdown_with_tls_clients(pgcorral: DaemonFactory, pki: Pki,
                                           pg: PgCluster) -> None:  # fmt: skip
    """SIGTERM in the transaction pipeline: an idle TLS client gets 57P01 through TLS at once,
    one inside a transaction finishes it, one in its handshake is dropped (at
    authentication_timeout: a client in its startup may still log in if the shutdown is
    cancelled); the daemon exits 0."""
    d = pgcorral(tls_conf(pki, pipeline="transaction", max_connections="3",
                          authentication_timeout="1"))
    idle = psycopg.connect(tls_dsn(d, pki), autocommit=True)
    busy = psycopg.connect(tls_dsn(d, pki, application_name="tls-busy"))
    half = socket.create_connection((d.host, d.port), timeout=10)
    try:
        idle.execute("SELECT 1")
        busy.execute("SELECT 1")
        half.sendall(SSL_REQUEST)
        assert half.recv(1) == b"S"
        deadline = time.monotonic() + 10
        sql = "SELECT state FROM pg_stat_activity WHERE application_name = 'tls-busy'"
        while pg.psql(sql).strip() != "idle in transaction":
            assert time.monotonic() < deadline, "the busy client's transaction did not start"
            time.sleep(0.02)
        d.signal(signal.SIGTERM)
        # every worker has begun (with two, the supervisor's own "graceful shutdown of 2
        # worker(s)" line comes first, before the workers have told their clients)
        wait_for_count(d, "graceful shutdown: waiting for",
                       int(os.environ.get("PGCORRAL_TEST_WORKERS", "1")))
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            idle.execute("SELECT 1")
        assert busy.execute("SELECT 2").fetchone() == (2,)
        busy.commit()
        d.proc.wait(10)
        assert d.proc.returncode == 0, d.log()
        closed_within(half, 5)
    finally:
        idle.close()
        busy.close()
        half.close()


def test_both_legs_over_tls(pgcorral: DaemonFactory, pki: Pki, ssl_pg: PgCluster) -> None:
    """Client TLS in front, ``tls = verify-full`` toward ``ssl_pg`` behind (the server section's
    keys ride on its host line: the factory writes ``host = <value>``)."""
    server = f"127.0.0.1\ntls = verify-full\ntls_ca_file = {pki.ca_file}"
    d = pgcorral(tls_conf(pki, max_connections="2"), hba="hostssl all all all trust\n",
                 servers=[("primary", server, ssl_pg.port)])

    async def client(i: int) -> None:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        conn = await asyncpg.connect(host="localhost", port=d.port, user="trustuser",
                                     database=TEST_DB, ssl=ctx, timeout=10)
        try:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl "
                                       "WHERE pid = pg_backend_pid()") is True
            rows = await conn.fetch("SELECT repeat('x', 1000) FROM generate_series(1, 20000)")
            assert len(rows) == 20000
        finally:
            await conn.close(timeout=5)

    async def run() -> None:
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(4))), 60)

    asyncio.run(run())


# ---------------------------------------------------------------- 4: SCRAM-SHA-256-PLUS


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_channel_binding_for_a_vault_user(pgcorral: DaemonFactory, pki: Pki, tmp_path: Path,
                                          pipeline: str) -> None:  # fmt: skip
    users, env = _vault(tmp_path, {"scramuser": "scrampass"})
    d = pgcorral(tls_conf(pki, pipeline=pipeline), hba="host all all all scram-sha-256\n", env=env,
                 args=["-u", users])
    cb = {"user": "scramuser", "password": "scrampass", "channel_binding": "require"}
    with psycopg.connect(tls_dsn(d, pki, **cb)) as conn:  # only SCRAM-SHA-256-PLUS passes
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("scramuser",)
    with pytest.raises(psycopg.OperationalError, match="channel binding required"):
        one(plain_dsn(d, **cb))
    assert one(plain_dsn(d, user="scramuser", password="scrampass")) == "scramuser"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        one(tls_dsn(d, pki, user="scramuser", password="wrong", channel_binding="require"))


def _mechanisms(sock: socket.socket, user: str) -> list[str]:
    """The SASL mechanisms of the AuthenticationSASL that answers a StartupMessage."""
    sock.sendall(startup_packet({"user": user, "database": TEST_DB}))
    message = read_message(sock)
    assert message is not None and message[0] == b"R", message
    assert struct.unpack("!i", message[1][:4])[0] == 10, message  # AuthenticationSASL
    return [m.decode() for m in message[1][4:].split(b"\0") if m]


@pytest.mark.parametrize("source", ["vault", "auth_query"])
def test_plus_is_offered_over_tls_only(pgcorral: DaemonFactory, pki: Pki, tmp_path: Path,
                                       source: str) -> None:  # fmt: skip
    if source == "vault":
        users, env = _vault(tmp_path, {"scramuser": "scrampass"})
        conf, args = tls_conf(pki), ["-u", users]
    else:  # the verifier PostgreSQL stores, read with the -S superuser
        users, env = _vault(tmp_path, {"postgres": "unused-trust"})
        conf, args = tls_conf(pki, auth_query="on"), ["-S", users]
    d = pgcorral(conf, hba="host all all all scram-sha-256\n", env=env, args=args)
    with tls_socket(d, pki) as sock:
        assert _mechanisms(sock, "scramuser") == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        assert _mechanisms(sock, "scramuser") == ["SCRAM-SHA-256"]
    cb = {"user": "scramuser", "password": "scrampass", "channel_binding": "require"}
    for _ in range(2):  # a new server connection, then (pooled) a reused one
        assert one(tls_dsn(d, pki, **cb)) == "scramuser"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        one(tls_dsn(d, pki, **{**cb, "password": "wrong"}))
    assert one(plain_dsn(d, user="scramuser", password="scrampass")) == "scramuser"


# ------------------------------------------------------------------ 5: hostssl, hostnossl


def test_hostssl_refuses_plaintext(pgcorral: DaemonFactory, pki: Pki) -> None:
    d = pgcorral(tls_conf(pki), hba="hostssl all all all trust\n")
    assert one(tls_dsn(d, pki)) == "trustuser"
    fields = connect_error(d.host, d.port, USER)
    assert fields is not None
    assert fields["C"] == "28000"
    assert fields["M"] == ('no pgcorral_hba.conf entry for host "127.0.0.1", user "trustuser", '
                           'database "pgcorral_test", no encryption')


def test_hostnossl_refuses_tls(pgcorral: DaemonFactory, pki: Pki) -> None:
    d = pgcorral(tls_conf(pki), hba="hostnossl all all all trust\n")
    assert one(plain_dsn(d)) == "trustuser"
    fields = tls_login_error(d, pki, "trustuser")
    assert fields is not None
    assert fields["C"] == "28000"
    assert fields["M"] == ('no pgcorral_hba.conf entry for host "127.0.0.1", user "trustuser", '
                           'database "pgcorral_test", SSL encryption')
    with pytest.raises(psycopg.OperationalError, match="SSL encryption"):
        one(tls_dsn(d, pki))


# ------------------------------------------------------------------- 6: cert, clientcert=

CERT_HBA = """\
hostssl all alice all cert
hostssl all trustuser all trust clientcert=verify-ca
hostssl all bob all trust clientcert=verify-full
"""


@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_cert_method(pgcorral: DaemonFactory, pki: Pki, cert_roles: list[str],
                     pipeline: str) -> None:  # fmt: skip
    d = pgcorral(tls_conf(pki, pipeline=pipeline), hba=CERT_HBA)
    alice, bob = pki.client("alice"), pki.client("bob")
    assert one(tls_dsn(d, pki, alice, user="alice")) == "alice"
    assert tls_login_error(d, pki, "alice", alice) is None
    fields = tls_login_error(d, pki, "alice", bob)
    assert fields is not None
    assert (fields["S"], fields["C"], fields["M"]) == (
        "FATAL", "28000", 'certificate authentication failed for user "alice"')
    fields = tls_login_error(d, pki, "alice")
    assert fields is not None
    assert (fields["C"], fields["M"]) == ("28000",
                                          "connection requires a valid client certificate")
    with pytest.raises(psycopg.OperationalError, match="requires a valid client certificate"):
        one(tls_dsn(d, pki, user="alice"))


def test_clientcert_options(pgcorral: DaemonFactory, pki: Pki, cert_roles: list[str]) -> None:
    d = pgcorral(tls_conf(pki), hba=CERT_HBA)
    alice, bob = pki.client("alice"), pki.client("bob")
    # verify-ca: any certificate of the CA
    assert one(tls_dsn(d, pki, bob)) == "trustuser"
    assert one(tls_dsn(d, pki, alice)) == "trustuser"
    fields = tls_login_error(d, pki, "trustuser")
    assert fields is not None and fields["M"] == "connection requires a valid client certificate"
    # verify-full: the CN must be the user
    assert one(tls_dsn(d, pki, bob, user="bob")) == "bob"
    fields = tls_login_error(d, pki, "bob", alice)
    assert fields is not None
    assert (fields["C"], fields["M"]) == ("28000", 'certificate validation '
                                          '(clientcert=verify-full) failed for user "bob": '
                                          "CN mismatch")  # fmt: skip


def test_cert_without_tls_ca_file_is_refused(pgcorral: DaemonFactory, pki: Pki,
                                             cert_roles: list[str]) -> None:  # fmt: skip
    """Without tls_ca_file pgcorral asks for no certificate, so no client proves anything."""
    conf = tls_conf(pki)
    del conf["tls_ca_file"]
    d = pgcorral(conf, hba=CERT_HBA)
    fields = tls_login_error(d, pki, "alice", pki.client("alice"))
    assert fields is not None and fields["M"] == "connection requires a valid client certificate"


def test_revoked_client_certificate(pgcorral: DaemonFactory, pki: Pki, tmp_path: Path,
                                    cert_roles: list[str]) -> None:  # fmt: skip
    crl = tmp_path / "ca.crl"
    write_crl(pki, crl, revoke=pki.client("bob").cert)
    d = pgcorral(tls_conf(pki, tls_crl_file=str(crl)), hba=CERT_HBA)
    assert one(tls_dsn(d, pki, pki.client("alice"), user="alice")) == "alice"
    with pytest.raises(psycopg.OperationalError, match="certificate revoked"):
        one(tls_dsn(d, pki, pki.client("bob"), user="bob"))
    with pytest.raises(psycopg.OperationalError, match="certificate revoked"):
        one(tls_dsn(d, pki, pki.client("bob")))
    assert one(tls_dsn(d, pki, pki.client("alice"))) == "trustuser"
    d.wait_for_log("TLS handshake with client 127.0.0.1 failed: certificate revoked")


def write_crl(pki: Pki, path: Path, revoke: Path) -> None:
    """A CRL of the pki's CA revoking the certificate in ``revoke``."""
    ca_key = serialization.load_pem_private_key(pki.ca.key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    issuer = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes()).subject
    serial = x509.load_pem_x509_certificate(revoke.read_bytes()).serial_number
    now = dt.datetime.now(dt.UTC)
    revoked = (x509.RevokedCertificateBuilder().serial_number(serial)
               .revocation_date(now - dt.timedelta(minutes=1)).build())
    crl = (x509.CertificateRevocationListBuilder().issuer_name(issuer)
           .last_update(now - dt.timedelta(minutes=1)).next_update(now + dt.timedelta(days=1))
           .add_revoked_certificate(revoked).sign(ca_key, hashes.SHA256()))
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def test_cancel_over_tls(pgcorral: DaemonFactory, pki: Pki, pg: PgCluster) -> None:
    """libpq 17+ sends the CancelRequest over TLS too (PQcancelCreate)."""
    d = pgcorral(tls_conf(pki))
    with psycopg.connect(tls_dsn(d, pki, application_name="tls-cancel"),
                         autocommit=True) as conn:
        result: list[BaseException] = []

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(30)")
            except BaseException as exc:
                result.append(exc)

        thread = threading.Thread(target=sleep)
        thread.start()
        deadline = time.monotonic() + 10
        sql = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tls-cancel' "
               "AND state = 'active'")
        while pg.psql(sql).strip() != "1":
            assert time.monotonic() < deadline, "the query did not start"
            time.sleep(0.02)
        conn.cancel_safe(timeout=10)
        thread.join(10)
        assert not thread.is_alive()
        assert len(result) == 1 and isinstance(result[0], psycopg.errors.QueryCanceled), result
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------- 7: hostile


def test_garbage_instead_of_a_client_hello(pgcorral: DaemonFactory, pki: Pki) -> None:
    d = pgcorral(tls_conf(pki))
    before = psycopg.connect(tls_dsn(d, pki))
    try:
        with socket.create_connection((d.host, d.port), timeout=10) as sock:
            sock.sendall(SSL_REQUEST)
            assert sock.recv(1) == b"S"
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
            closed_within(sock, 5)
        d.wait_for_log("TLS handshake with client 127.0.0.1 failed")
        lines = [line for line in d.log().splitlines() if "client 127.0.0.1" in line]
        assert len(lines) == 1, lines
        assert before.execute("SELECT 1").fetchone() == (1,)
        assert one(tls_dsn(d, pki)) == "trustuser"
    finally:
        before.close()


def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and len(hello) > 100
    return hello


@pytest.mark.parametrize("sent", ["nothing", "half a ClientHello", "direct half"])
def test_stalled_handshake_times_out(pgcorral: DaemonFactory, pki: Pki, sent: str) -> None:
    d = pgcorral(tls_conf(pki, authentication_timeout="1"))
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        if sent != "direct half":
            sock.sendall(SSL_REQUEST)
            assert sock.recv(1) == b"S"
        if sent != "nothing":
            hello = _client_hello()
            sock.sendall(hello[: len(hello) // 2])
        took = closed_within(sock, 5)
    assert 0.5 < took < 4, took
    d.wait_for_log("did not finish startup in time")
    assert one(tls_dsn(d, pki)) == "trustuser"
    lines = [line for line in d.log().splitlines() if "client 127.0.0.1" in line]
    assert len(lines) == 1, lines


@pytest.mark.parametrize(("which", "error"), [("client_wrong_ca", "unknown ca"),
                                              ("client_expired", "certificate expired")])
def test_bad_client_certificate_is_refused_at_the_handshake(
        pgcorral: DaemonFactory, pki: Pki, which: str, error: str) -> None:
    # a line that uses certificates: pgcorral asks every TLS client for one (as PostgreSQL
    # with ssl_ca_file) and checks what it gets during the handshake
    d = pgcorral(tls_conf(pki), hba="hostssl all alice all trust clientcert=verify-full\n"
                                    "hostssl all all all trust\n")
    client: CertFiles = getattr(pki, which)
    with pytest.raises(psycopg.OperationalError, match=error):
        one(tls_dsn(d, pki, client))
    d.wait_for_log("TLS handshake with client 127.0.0.1 failed")
    assert one(tls_dsn(d, pki)) == "trustuser"


def test_no_certificate_is_asked_for_without_a_line_using_one(
        pgcorral: DaemonFactory, pki: Pki) -> None:
    """tls_ca_file set but no hba line with cert or clientcert=: no CertificateRequest (it costs
    a third more CPU per handshake), so even a certificate from another CA is not looked at."""
    d = pgcorral(tls_conf(pki), hba="hostssl all all all trust\n")
    assert one(tls_dsn(d, pki, pki.client_wrong_ca)) == "trustuser"  # asked, it would fail


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("request_", [SSL_REQUEST, GSSENC_REQUEST], ids=["ssl", "gssenc"])
def test_encryption_request_inside_tls(pgcorral: DaemonFactory, pki: Pki, direct: bool,
                                       request_: bytes) -> None:  # fmt: skip
    d = pgcorral(tls_conf(pki))
    with tls_socket(d, pki, direct=direct) as sock:
        sock.sendall(request_)
        message = read_message(sock)
        assert message is not None and message[0] == b"E", message
        fields = error_fields(message[1])
        assert fields["C"] == "08P01" and "over a TLS connection" in fields["M"], fields
        assert read_message(sock) is None


def test_gssenc_request_gets_n(pgcorral: DaemonFactory, pki: Pki) -> None:
    d = pgcorral(tls_conf(pki))
    with socket.create_connection((d.host, d.port), timeout=10) as sock:  # as gssencmode=prefer
        sock.sendall(GSSENC_REQUEST)
        assert sock.recv(1) == b"N"
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S"
        with client_context(pki).wrap_socket(sock, server_hostname="localhost") as tls:
            assert login(tls) is None
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.sendall(GSSENC_REQUEST)
        assert sock.recv(1) == b"N"
        assert login(sock) is None  # then plain


@pytest.mark.parametrize("request_", [SSL_REQUEST, GSSENC_REQUEST], ids=["ssl", "gssenc"])
def test_bytes_pipelined_after_an_encryption_request(pgcorral: DaemonFactory, pki: Pki,
                                                     request_: bytes) -> None:  # fmt: skip
    d = pgcorral(tls_conf(pki))
    with socket.create_connection((d.host, d.port), timeout=10) as sock:
        sock.sendall(request_ + startup_packet(USER))
        message = read_message(sock)
        assert message is not None and message[0] == b"E", message
        fields = error_fields(message[1])
        assert fields["C"] == "08P01" and "unencrypted data after" in fields["M"], fields
        assert read_message(sock) is None


def test_unix_socket_answers_n(pgcorral: DaemonFactory, pki: Pki) -> None:
    d = pgcorral(tls_conf(pki))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(os.path.join(d.socket_dir, f".s.PGSQL.{d.port}"))
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"N"
        assert login(sock) is None


# ---------------------------------------------------------------------- 8: renegotiation


def test_renegotiation_is_refused(pgcorral: DaemonFactory, pki: Pki) -> None:
    d = pgcorral(tls_conf(pki))
    other = psycopg.connect(tls_dsn(d, pki))
    try:
        proc = subprocess.run(
            ["openssl", "s_client", "-starttls", "postgres", "-tls1_2", "-connect",
             f"127.0.0.1:{d.port}", "-CAfile", str(pki.ca_file), "-no_ign_eof"],
            input="R\n", capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        out = proc.stdout + proc.stderr
        assert "Verify return code: 0 (ok)" in out, out  # the first handshake worked
        assert "RENEGOTIATING" in out, out
        assert "no renegotiation" in out, out
        assert other.execute("SELECT 1").fetchone() == (1,)
        assert one(tls_dsn(d, pki)) == "trustuser"
    finally:
        other.close()


def test_tls13_key_update(pgcorral: DaemonFactory, pki: Pki) -> None:
    """A client's KeyUpdate asking for ours (s_client's "K"): pgcorral answers it and the
    connection goes on (TlsLink flushes what OpenSSL wrote while reading)."""
    d = pgcorral(tls_conf(pki))
    proc = subprocess.Popen(
        ["openssl", "s_client", "-starttls", "postgres", "-tls1_3", "-connect",
         f"127.0.0.1:{d.port}", "-CAfile", str(pki.ca_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        out = b""
        while b"Verify return code" not in out:  # the handshake is done
            line = proc.stdout.readline()
            assert line, out
            out += line
        proc.stdin.write(b"K\n")
        proc.stdin.flush()
        while b"KEYUPDATE" not in out:
            line = proc.stdout.readline()
            assert line, out
            out += line
        proc.stdin.write(startup_packet(USER))
        proc.stdin.flush()
        while b"server_version" not in out:  # ParameterStatus, after the login
            chunk = proc.stdout.read1(65536)
            assert chunk, out
            out += chunk
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    assert one(tls_dsn(d, pki)) == "trustuser"


# ----------------------------------------------------------------------------- 9: reload


def _reloadable(pgcorral: DaemonFactory, pki: Pki, tmp: Path, hba: str = ALL_HOSTS,
                env: dict[str, str] | None = None, args: list[str] | None = None,
                ) -> tuple[Daemon, Path, Path]:  # fmt: skip
    """A daemon whose certificate and key are copies of the pki's server files in ``tmp``."""
    cert, key = tmp / "server.crt", tmp / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    conf = {"tls": "on", "tls_cert_file": str(cert), "tls_key_file": str(key)}
    return pgcorral(conf, hba=hba, env=env, args=args), cert, key


def _swap_certificate(d: Daemon, pki: Pki, cert: Path, key: Path, reloads: int = 1) -> None:
    """The pki's wrong-host certificate in place of the one in use, and a reload."""
    shutil.copy(pki.wrong_host.cert, cert)
    shutil.copy(pki.wrong_host.key, key)
    d.signal(signal.SIGHUP)
    wait_for_count(d, "configuration reloaded", reloads)


def test_reload_replaces_the_certificate(pgcorral: DaemonFactory, pki: Pki,
                                         tmp_path: Path) -> None:  # fmt: skip
    d, cert, key = _reloadable(pgcorral, pki, tmp_path)
    assert server_cn(d) == "localhost"
    before = psycopg.connect(tls_dsn(d, pki))
    try:
        _swap_certificate(d, pki, cert, key)
        assert server_cn(d) == "wrong.example"
        with pytest.raises(psycopg.OperationalError, match="does not match host name"):
            one(tls_dsn(d, pki))
        assert one(tls_dsn(d, pki, sslmode="verify-ca")) == "trustuser"
        assert before.execute("SELECT current_user").fetchone() == ("trustuser",)

        key.write_text("garbage\n")
        d.signal(signal.SIGHUP)
        wait_for_count(d, "keeping the", 1)
        problems = [line for line in d.log().splitlines() if " E " in line]
        assert len(problems) == 1, problems
        assert f'tls_key_file: "{key}": no PEM private key in the file' in problems[0], problems
        assert server_cn(d) == "wrong.example"  # the certificate in use stays
        assert one(tls_dsn(d, pki, sslmode="verify-ca")) == "trustuser"
        assert before.execute("SELECT 1").fetchone() == (1,)
    finally:
        before.close()


def test_channel_binding_follows_a_reloaded_certificate(pgcorral: DaemonFactory, pki: Pki,
                                                        tmp_path: Path) -> None:  # fmt: skip
    """SCRAM-SHA-256-PLUS binds to the certificate the client saw: after a reload, the new one."""
    users, env = _vault(tmp_path, {"scramuser": "scrampass"})
    d, cert, key = _reloadable(pgcorral, pki, tmp_path, hba="host all all all scram-sha-256\n",
                               env=env, args=["-u", users])
    cb = {"user": "scramuser", "password": "scrampass", "channel_binding": "require",
          "sslmode": "verify-ca"}  # fmt: skip
    before = psycopg.connect(tls_dsn(d, pki, **cb))
    try:
        _swap_certificate(d, pki, cert, key)
        assert server_cn(d) == "wrong.example"
        assert one(tls_dsn(d, pki, **cb)) == "scramuser"
        assert before.execute("SELECT current_user").fetchone() == ("scramuser",)
    finally:
        before.close()


def test_reload_with_a_broken_key_applies_the_rest(pgcorral: DaemonFactory, pki: Pki,
                                                   tmp_path: Path) -> None:  # fmt: skip
    d, _, key = _reloadable(pgcorral, pki, tmp_path)
    key.write_text("garbage\n")
    Path(d.dir, "pgcorral_hba.conf").write_text("hostssl all all all trust\n")
    d.signal(signal.SIGHUP)
    wait_for_count(d, "keeping the", 1)
    problems = [line for line in d.log().splitlines() if "keeping the" in line]
    assert len(problems) == 1, problems
    assert str(key) in problems[0] and "keeping the TLS settings in use" in problems[0], problems
    assert server_cn(d) == "localhost"
    fields = connect_error(d.host, d.port, USER)  # the new hba: TLS only
    assert fields is not None and fields["C"] == "28000", fields


# ------------------------------------------------------------------- 10: startup errors


def _run_daemon(tmp: Path, pki: Pki, cert: str, key: str) -> tuple[subprocess.CompletedProcess[str],
                                                                   Path]:  # fmt: skip
    conf = tmp / "pgcorral.conf"
    conf.write_text(f"[pgcorral]\nhost = 127.0.0.1\nport = 1\ntls = on\ntls_cert_file = {cert}\n"
                    f"tls_key_file = {key}\n\n[primary]\nhost = 127.0.0.1\nport = 5432\n")
    hba = tmp / "hba.conf"
    hba.write_text(ALL_HOSTS)
    env = dict(os.environ, PYTHONPATH=PGCORRAL_PATH)  # the pgcorral the tests import
    out = subprocess.run([sys.executable, "-m", "pgcorral", "-c", str(conf), "-a", str(hba)],
                         capture_output=True, text=True, timeout=20, env=env, check=False)
    return out, conf


@pytest.mark.parametrize("broken", ["missing cert", "garbage cert", "garbage key"])
def test_broken_tls_file_at_startup(tmp_path: Path, pki: Pki, broken: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")
    cert, key = str(pki.server.cert), str(pki.server.key)
    if broken == "missing cert":
        cert = str(tmp_path / "missing.crt")
    elif broken == "garbage cert":
        cert = str(garbage)
    else:
        key = str(garbage)
    out, conf = _run_daemon(tmp_path, pki, cert, key)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line_no, name, path = (5, "tls_cert_file", cert) if "cert" in broken else (
        6, "tls_key_file", key)
    assert lines[0].startswith(f"pgcorral: {conf}:{line_no}: {name}: "), lines
    assert path in lines[0], lines
    if broken == "garbage key":  # not OpenSSL's "[SSL] PEM lib (_ssl.c:3926)"
        assert lines[0].endswith(": no PEM private key in the file"), lines
