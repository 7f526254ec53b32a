"""--tls: the run's throwaway PKI (devtools/certs.py), what each side of each target gets from
it, and the check that both legs of a target really run TLS.

With --tls every connection is TLS: pgbench and the harness's psql use ``sslmode=require``
(PGSSLMODE); PostgreSQL has ``ssl = on`` with the PKI's server certificate and only
``hostssl`` lines for TCP, so a pooler whose server leg is plain is refused; PgBouncer gets
``client_tls_sslmode = require`` and ``server_tls_sslmode = require``; pgcorral gets ``tls = on``
in its main section and ``tls = require`` in its server section.  This module starts nothing.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devtools.certs import Pki, make_test_pki

from .common import DBNAME, DBUSER
from .procs import clean_env

SSLMODE = "require"  # what every client (pgbench, psql) asks for
SERVER_TLS = "require"  # PgBouncer server_tls_sslmode, pgcorral's server-section tls
SSL_REQUEST = struct.pack("!ii", 8, 80877103)


class TlsCheckError(RuntimeError):
    """A target does not run TLS where --tls says it must."""


@dataclass(frozen=True)
class Tls:
    """The run's PKI and what the targets' configurations say about TLS."""

    pki: Pki

    def client_env(self) -> dict[str, str]:
        """libpq environment for every client the harness runs (pgbench, psql)."""
        return {"PGSSLMODE": SSLMODE}

    def describe(self) -> str:
        return (
            f"TLS on both legs of every target: clients sslmode={SSLMODE}; PostgreSQL ssl = on, "
            f"hostssl only; PgBouncer client_tls_sslmode = require, server_tls_sslmode = "
            f"{SERVER_TLS}; pgcorral tls = on, server tls = {SERVER_TLS}; "
            f"certificates EC P-256 (devtools/certs.py)"
        )

    def install_pgbouncer_files(self, workdir: Path) -> None:
        """Copy the server certificate, its key and the CA into workdir (which the caller hands
        to the unprivileged user PgBouncer runs as)."""
        files = {"tls-server.crt": self.pki.server.cert, "tls-server.key": self.pki.server.key,
                 "tls-ca.crt": self.pki.ca_file}  # fmt: skip
        for name, src in files.items():
            shutil.copyfile(src, workdir / name)
            (workdir / name).chmod(0o600)

    def pgbouncer_settings(self, workdir: Path) -> str:
        """PgBouncer's TLS lines (the files: install_pgbouncer_files())."""
        return (
            "client_tls_sslmode = require\n"
            f"client_tls_key_file = {workdir / 'tls-server.key'}\n"
            f"client_tls_cert_file = {workdir / 'tls-server.crt'}\n"
            f"client_tls_ca_file = {workdir / 'tls-ca.crt'}\n"
            f"server_tls_sslmode = {SERVER_TLS}\n"
        )

    def pgcorral_main(self) -> str:
        """pgcorral's main-section TLS lines (the client leg)."""
        return (
            "tls = on\n"
            f"tls_cert_file = {self.pki.server.cert}\n"
            f"tls_key_file = {self.pki.server.key}\n"
            f"tls_ca_file = {self.pki.ca_file}\n"
        )

    def pgcorral_server(self) -> str:
        """pgcorral's server-section TLS line (the server leg)."""
        return f"tls = {SERVER_TLS}\n"


def make_tls(directory: Path) -> Tls:
    """Write the run's PKI into directory."""
    return Tls(make_test_pki(directory, client_names=(DBUSER,)))


def hostssl(lines: list[str]) -> list[str]:
    """pg_hba lines with every ``host`` line made ``hostssl`` (TCP without TLS is refused)."""
    return ["hostssl" + ln[4:] if ln.split()[:1] == ["host"] else ln for ln in lines]


def start_tls(sock: socket.socket, host: str) -> ssl.SSLSocket:
    """Negotiate TLS on a fresh connection the way libpq does with sslmode=require
    (SSLRequest, then the handshake, no verification); raise TlsCheckError on an 'N'."""
    sock.sendall(SSL_REQUEST)
    answer = sock.recv(1)
    if answer != b"S":
        raise TlsCheckError(f"answered {answer!r} to SSLRequest: no TLS on the client leg")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(sock, server_hostname=host)


def client_leg(host: str, port: int, timeout: float = 10) -> str:
    """"<version> <cipher>" of a TLS handshake with the target."""
    with (socket.create_connection((host, port), timeout=timeout) as sock,
          start_tls(sock, host) as tls):  # fmt: skip
        cipher = tls.cipher()
        return f"{tls.version()} {cipher[0] if cipher else '?'}"


def check_tls(name: str, port: int, psql: str) -> dict[str, str]:
    """Both legs of a target: the client leg by a handshake of our own; the server leg by
    asking, through the target, pg_stat_ssl about the backend serving us; and a plain
    (sslmode=disable) login must be refused."""

    def login(sslmode: str, sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [psql, "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", DBUSER, "-d", DBNAME,
             "-c", sql],
            capture_output=True, text=True, timeout=30, check=False,
            env=clean_env(PGCONNECT_TIMEOUT="10", PGSSLMODE=sslmode),
        )  # fmt: skip

    try:
        client = client_leg("127.0.0.1", port)
    except (OSError, TlsCheckError) as e:
        raise TlsCheckError(f"{name}: client leg: {e}") from None
    res = login(SSLMODE, "SELECT ssl::text || ' ' || coalesce(version, '-') || ' ' || "
                "coalesce(cipher, '-') FROM pg_stat_ssl WHERE pid = pg_backend_pid()")  # fmt: skip
    server = res.stdout.strip()
    if res.returncode != 0 or not server.startswith("true "):
        raise TlsCheckError(
            f"{name}: server leg: {(res.stderr.strip() or server or 'no answer')!r}"
        )  # fmt: skip
    plain = login("disable", "SELECT 1")
    if plain.returncode == 0:
        raise TlsCheckError(f"{name}: a plain (sslmode=disable) login was accepted")
    said = (plain.stderr or plain.stdout).strip().splitlines()
    return {
        "client_leg": client,
        "server_leg": server.removeprefix("true "),
        "plain_login": said[-1] if said else f"refused (exit {plain.returncode})",
    }
