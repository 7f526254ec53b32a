"""TLS fixtures (a pytest plugin, registered by tests/conftest.py): a test PKI and PostgreSQL
clusters with ``ssl = on``.

* ``pki`` (session): devtools.certs.Pki in a temporary directory, client names alice and bob.
* ``ssl_pg`` (session): a second PostgreSQL 15 cluster with ssl = on (the pki's server
  certificate, ssl_ca_file = the pki's CA), the roles and data of the ``pg`` fixture
  (database pgcorral_test with pgbench tables at scale 1, and db2; trustuser, md5user,
  scramuser, pwuser with the same passwords and methods), each allowed over ``hostssl`` and
  plain ``host``; plus SSL_ONLY_USER (trust over TLS only), NO_SSL_USER (trust without TLS
  only) and one trust role per pki client name.
* ``ssl_pg_certonly`` (module): a cluster that accepts TCP clients only over TLS with a client
  certificate signed by the pki's CA whose CN is the user (``hostssl all all 127.0.0.1/32
  trust clientcert=verify-full``, no ``host`` line), roles = the pki client names, database
  pgcorral_test.  Its admin helpers (psql(..., unix_socket=True), reload) use the unix socket.

Both clusters are devtools.pgcluster.PgCluster objects; ``cluster.ssl`` holds the installed
files.  ``ssl_dsn()`` builds a libpq DSN for them.  This module starts no pgcorral.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
from devtools.certs import CertFiles, Pki, make_test_pki
from devtools.pgcluster import PgCluster

TEST_DB = "pgcorral_test"  # the same names, roles and passwords as tests/conftest.py's `pg`
PASSWORD_USERS: dict[str, tuple[str, str]] = {
    "md5user": ("md5pass", "md5"),
    "scramuser": ("scrampass", "scram-sha-256"),
    "pwuser": ("pwpass", "password"),
}
CLIENT_NAMES = ("alice", "bob")
SSL_ONLY_USER = "ssluser"  # ssl_pg: trust over TLS, refused without
NO_SSL_USER = "nossluser"  # ssl_pg: trust without TLS, refused over TLS
LOOPBACK = ("127.0.0.1/32", "::1/128")


def ssl_dsn(
    cluster: PgCluster,
    pki: Pki,
    *,
    user: str = "postgres",
    dbname: str = TEST_DB,
    sslmode: str = "verify-full",
    host: str = "localhost",
    client: CertFiles | None = None,
    **params: str,
) -> str:
    """A DSN for a TLS connection to cluster: sslrootcert = the pki's CA; with client, its
    certificate and key (sslcert/sslkey).  Without client, sslcert points at a file that does
    not exist, so that no ~/.postgresql/postgresql.crt is sent by accident."""
    extra = {"sslmode": sslmode, "sslrootcert": str(pki.ca_file), "host": host}
    if client is not None:
        extra.update(sslcert=str(client.cert), sslkey=str(client.key))
    else:
        extra.update(sslcert=str(pki.directory / "no-such-client.crt"))
    extra.update(params)
    return cluster.dsn(dbname=dbname, user=user, **extra)


def ssl_pg_hba_lines() -> list[str]:
    """ssl_pg's pg_hba.conf: the `pg` fixture's lines with a hostssl line before each host
    line, and the TLS-only / no-TLS roles."""
    lines: list[str] = []
    for net in LOOPBACK:
        lines += [
            f"hostssl all {SSL_ONLY_USER} {net} trust",
            f"hostnossl all {SSL_ONLY_USER} {net} reject",
            f"hostnossl all {NO_SSL_USER} {net} trust",
            f"hostssl all {NO_SSL_USER} {net} reject",
        ]
    for user, (_, method) in PASSWORD_USERS.items():
        lines.append(f"local all {user} {method}")
        for net in LOOPBACK:
            lines += [f"hostssl all {user} {net} {method}", f"host all {user} {net} {method}"]
    lines.append("local all all trust")
    for net in LOOPBACK:
        lines += [f"hostssl all all {net} trust", f"host all all {net} trust"]
    lines += ["local replication all trust"]
    for net in LOOPBACK:
        lines += [f"host replication all {net} trust"]
    return lines


CERTONLY_HBA = [
    "local all all trust",
    "hostssl all all 127.0.0.1/32 trust clientcert=verify-full",
]


def start_ssl_cluster(
    pki: Pki,
    hba_lines: list[str],
    *,
    server: CertFiles | None = None,
    with_ca: bool = True,
    prefix: str = "pgcorral-sslpg-",
) -> PgCluster:
    """init + enable_ssl (server: the pki's server certificate unless given, e.g.
    pki.wrong_host; with_ca: ssl_ca_file = the pki's CA) + start, in a new temp directory.
    The caller destroys it."""
    basedir = tempfile.mkdtemp(prefix=prefix)
    os.chmod(basedir, 0o755)
    cluster = PgCluster(basedir)
    try:
        cluster.init(settings={"log_min_messages": "warning"}, hba_lines=hba_lines)
        files = server or pki.server
        cluster.enable_ssl(files.cert, files.key, ca_file=pki.ca_file if with_ca else None)
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test PKI (devtools/certs.py) with client certificates for alice and bob."""
    return make_test_pki(tmp_path_factory.mktemp("pki"), client_names=CLIENT_NAMES)


@pytest.fixture(scope="session")
def ssl_pg(pki: Pki) -> Iterator[PgCluster]:
    """A running cluster with ssl = on; see the module docstring."""
    cluster = start_ssl_cluster(pki, ssl_pg_hba_lines())
    try:
        sql = f"""
            CREATE DATABASE {TEST_DB};
            CREATE DATABASE db2;
            CREATE ROLE trustuser LOGIN;
            CREATE ROLE {SSL_ONLY_USER} LOGIN;
            CREATE ROLE {NO_SSL_USER} LOGIN;
            SET password_encryption = 'md5';
            CREATE ROLE md5user LOGIN PASSWORD 'md5pass';
            SET password_encryption = 'scram-sha-256';
            CREATE ROLE scramuser LOGIN PASSWORD 'scrampass';
            CREATE ROLE pwuser LOGIN PASSWORD 'pwpass';
        """ + "".join(f"CREATE ROLE {name} LOGIN;" for name in pki.clients)
        cluster.psql(sql, unix_socket=True)
        for db in (TEST_DB, "db2"):
            cluster.psql("GRANT ALL ON SCHEMA public TO PUBLIC", dbname=db, unix_socket=True)
        cluster.pgbench("-i", "-s", "1", "-q", dbname=TEST_DB)
        cluster.psql(
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC;"
            "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO PUBLIC;",
            dbname=TEST_DB,
            unix_socket=True,
        )
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def ssl_pg_certonly(pki: Pki) -> Iterator[PgCluster]:
    """A running cluster whose only TCP line is ``hostssl all all 127.0.0.1/32 trust
    clientcert=verify-full`` (ssl_ca_file = the pki's CA); roles alice and bob."""
    cluster = start_ssl_cluster(pki, CERTONLY_HBA, prefix="pgcorral-sslcert-")
    try:
        roles = "".join(f"CREATE ROLE {name} LOGIN;" for name in pki.clients)
        cluster.psql(f"CREATE DATABASE {TEST_DB};" + roles, unix_socket=True)
        yield cluster
    finally:
        cluster.destroy()

