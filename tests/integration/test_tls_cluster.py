"""Checks of the TLS test harness itself (tests/tlsfixtures.py), with psql and psycopg straight
at PostgreSQL (no pgcorral): the server certificate verifies, TLS-only and no-TLS roles behave,
and the certificate-only cluster wants a client certificate whose CN is the user."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psycopg
import pytest
from devtools.certs import Pki
from devtools.pgcluster import PgCluster
from tests.tlsfixtures import NO_SSL_USER, SSL_ONLY_USER, TEST_DB, ssl_dsn


def _query(dsn: str, sql: str = "SELECT current_user") -> str:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return str(row[0])


def _my_ssl(dsn: str) -> str:
    """'<ssl> <version>' of this connection's own backend, from pg_stat_ssl."""
    return _query(
        dsn, "SELECT ssl::text || ' ' || coalesce(version, '-') FROM pg_stat_ssl "
        "WHERE pid = pg_backend_pid()"
    )  # fmt: skip


def _psql(cluster: PgCluster, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        [cluster.bin("psql"), "-X", "-At", "-p", str(cluster.port), "-d", TEST_DB, *args],
        capture_output=True, text=True, timeout=30, check=False,
        env={**base, "PGCONNECT_TIMEOUT": "10", **env},
    )  # fmt: skip


# ------------------------------------------------------------------------------------ ssl_pg


def test_verify_full_to_localhost(ssl_pg: PgCluster, pki: Pki) -> None:
    dsn = ssl_dsn(ssl_pg, pki, user="trustuser")
    assert _query(dsn) == "trustuser"
    assert _my_ssl(dsn).startswith("true TLSv1.")


def test_verify_full_to_the_ip_address(ssl_pg: PgCluster, pki: Pki) -> None:
    assert _query(ssl_dsn(ssl_pg, pki, user="trustuser", host="127.0.0.1")) == "trustuser"


def test_psql_verify_full(ssl_pg: PgCluster, pki: Pki) -> None:
    env = {"PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(pki.ca_file), "PGHOST": "localhost",
           "PGUSER": "trustuser"}  # fmt: skip
    res = _psql(ssl_pg, env, "-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "t"


def test_wrong_root_certificate_is_refused(ssl_pg: PgCluster, pki: Pki) -> None:
    dsn = ssl_dsn(ssl_pg, pki, user="trustuser", sslrootcert=str(pki.wrong_ca.cert))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        _query(dsn)


def test_plain_connections_still_work(ssl_pg: PgCluster) -> None:
    dsn = ssl_pg.dsn(dbname=TEST_DB, user="trustuser", sslmode="disable")
    assert _my_ssl(dsn) == "false -"


@pytest.mark.parametrize(("user", "password"), [("md5user", "md5pass"),
                                                 ("scramuser", "scrampass"),
                                                 ("pwuser", "pwpass")])  # fmt: skip
@pytest.mark.parametrize("sslmode", ["disable", "verify-full"])
def test_password_roles(ssl_pg: PgCluster, pki: Pki, user: str, password: str,
                        sslmode: str) -> None:  # fmt: skip
    dsn = ssl_dsn(ssl_pg, pki, user=user, password=password, sslmode=sslmode)
    assert _query(dsn) == user
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _query(ssl_dsn(ssl_pg, pki, user=user, password="wrong", sslmode=sslmode))


def test_scram_channel_binding_over_tls(ssl_pg: PgCluster, pki: Pki) -> None:
    dsn = ssl_dsn(ssl_pg, pki, user="scramuser", password="scrampass", channel_binding="require")
    assert _query(dsn) == "scramuser"


def test_tls_only_and_no_tls_roles(ssl_pg: PgCluster, pki: Pki) -> None:
    assert _query(ssl_dsn(ssl_pg, pki, user=SSL_ONLY_USER)) == SSL_ONLY_USER
    with pytest.raises(psycopg.OperationalError, match="rejects connection"):
        _query(ssl_pg.dsn(dbname=TEST_DB, user=SSL_ONLY_USER, sslmode="disable"))
    assert _query(ssl_pg.dsn(dbname=TEST_DB, user=NO_SSL_USER, sslmode="disable")) == NO_SSL_USER
    with pytest.raises(psycopg.OperationalError, match="rejects connection"):
        _query(ssl_dsn(ssl_pg, pki, user=NO_SSL_USER, sslmode="require"))


def test_ssl_pg_data(ssl_pg: PgCluster) -> None:
    assert ssl_pg.ssl is not None and ssl_pg.ssl.ca_file is not None
    for path in (ssl_pg.ssl.cert_file, ssl_pg.ssl.key_file, ssl_pg.ssl.ca_file):
        assert Path(path).parent == Path(ssl_pg.datadir)
        assert os.stat(path).st_mode & 0o777 == 0o600
    assert ssl_pg.psql("SHOW ssl").strip() == "on"
    assert ssl_pg.psql("SELECT count(*) FROM pgbench_branches", dbname=TEST_DB).strip() == "1"


# --------------------------------------------------------------------------- ssl_pg_certonly


def test_certonly_refuses_a_client_without_certificate(ssl_pg_certonly: PgCluster,
                                                       pki: Pki) -> None:  # fmt: skip
    with pytest.raises(psycopg.OperationalError, match="requires a valid client certificate"):
        _query(ssl_dsn(ssl_pg_certonly, pki, user="alice"))


def test_certonly_refuses_plain_tcp(ssl_pg_certonly: PgCluster) -> None:
    with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry"):
        _query(ssl_pg_certonly.dsn(dbname=TEST_DB, user="alice", sslmode="disable"))


@pytest.mark.parametrize("user", ["alice", "bob"])
def test_certonly_accepts_the_users_certificate(ssl_pg_certonly: PgCluster, pki: Pki,
                                                user: str) -> None:  # fmt: skip
    dsn = ssl_dsn(ssl_pg_certonly, pki, user=user, client=pki.clients[user])
    assert _query(dsn) == user
    row = _query(dsn, "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert row == f"/CN={user}"


def test_certonly_psql_with_certificate(ssl_pg_certonly: PgCluster, pki: Pki) -> None:
    alice = pki.clients["alice"]
    env = {"PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(pki.ca_file), "PGHOST": "localhost",
           "PGUSER": "alice", "PGSSLCERT": str(alice.cert), "PGSSLKEY": str(alice.key)}  # fmt: skip
    res = _psql(ssl_pg_certonly, env, "-c", "SELECT current_user")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "alice"
    del env["PGSSLKEY"]
    env["PGSSLCERT"] = str(pki.directory / "no-such-client.crt")
    res = _psql(ssl_pg_certonly, env, "-c", "SELECT current_user")
    assert res.returncode != 0
    assert "requires a valid client certificate" in res.stderr


@pytest.mark.parametrize(
    ("which", "said"),
    [
        ("other user's", '"trust" authentication failed for user "alice"'),  # CN bob
        ("wrong CA", "unknown ca"),
        ("expired", "certificate expired"),
    ],
)
def test_certonly_refuses_bad_certificates(ssl_pg_certonly: PgCluster, pki: Pki, which: str,
                                           said: str) -> None:  # fmt: skip
    files = {"other user's": pki.clients["bob"], "wrong CA": pki.client_wrong_ca,
             "expired": pki.client_expired}[which]  # fmt: skip
    with pytest.raises(psycopg.OperationalError, match=said):
        _query(ssl_dsn(ssl_pg_certonly, pki, user="alice", client=files))
