"""Throwaway TLS certificates for the tests and the benchmark (EC P-256, PEM).

``make_test_pki(directory)`` writes a small PKI into ``directory`` and returns a frozen
:class:`Pki` of the file paths:

* ``ca`` ("pgcorral test CA", self-signed) and ``wrong_ca`` ("wrong CA", unrelated);
* ``server``: signed by ``ca``, CN localhost, SAN DNS:localhost, IP 127.0.0.1, IP ::1;
* ``wrong_host``: signed by ``ca``, CN and SAN DNS wrong.example, no IP SAN;
* ``clients[name]``: one client certificate per name (CN = name, for PostgreSQL's
  ``clientcert=verify-full`` the CN is the user name), signed by ``ca``;
* ``client_wrong_ca``: CN the first client name, signed by ``wrong_ca``;
* ``client_expired``: CN the first client name, signed by ``ca``, expired a day ago.

Each certificate is a :class:`CertFiles` (``cert``, ``key``); key files are mode 0600,
certificates 0644. Generation takes a few milliseconds (EC keys). This module only writes
files: it starts nothing and never touches anything outside ``directory``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA_CN", "WRONG_CA_CN", "WRONG_HOST", "CertFiles", "Pki", "make_test_pki"]

CA_CN = "pgcorral test CA"
WRONG_CA_CN = "wrong CA"
WRONG_HOST = "wrong.example"
SERVER_CN = "localhost"
VALID_DAYS = 365

_Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """The files make_test_pki() wrote (see the module docstring)."""

    directory: Path
    ca: CertFiles
    wrong_ca: CertFiles
    server: CertFiles
    wrong_host: CertFiles
    clients: dict[str, CertFiles]
    client_wrong_ca: CertFiles
    client_expired: CertFiles

    @property
    def ca_file(self) -> Path:
        """The CA certificate (sslrootcert, ssl_ca_file, tls_ca_file)."""
        return self.ca.cert

    def client(self, name: str) -> CertFiles:
        return self.clients[name]


@dataclass(frozen=True)
class _Issuer:
    name: x509.Name
    key: _Key


def _new_key() -> _Key:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: _Key) -> CertFiles:
    """stem.crt (0644) and stem.key (0600, created with that mode: never readable by others)."""
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(cert_path, 0o644)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(key_path, 0o600)  # also when the file existed with another mode
    return CertFiles(cert_path, key_path)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: _Key, not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:  # fmt: skip
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _make_ca(directory: Path, stem: str, cn: str, now: dt.datetime) -> tuple[CertFiles, _Issuer]:
    key = _new_key()
    name = _name(cn)
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    cert = (
        _builder(name, name, key, now - dt.timedelta(days=1), now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, stem, cert, key), _Issuer(name, key)


def _make_leaf(
    directory: Path, stem: str, cn: str, issuer: _Issuer, *, server: bool,
    sans: list[x509.GeneralName] | None = None,
    not_before: dt.datetime, not_after: dt.datetime,
) -> CertFiles:  # fmt: skip
    key = _new_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (
        _builder(_name(cn), issuer.name, key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _write(directory, stem, b.sign(issuer.key, hashes.SHA256()), key)


def make_test_pki(
    directory: str | os.PathLike[str], client_names: tuple[str, ...] = ("alice", "bob")
) -> Pki:
    """Write the test PKI into directory (created if missing; existing files are replaced)."""
    if not client_names:
        raise ValueError("make_test_pki needs at least one client name")
    if bad := [n for n in client_names if not n or "/" in n or n.startswith(".")]:
        raise ValueError(f"client names must be usable as file names: {bad!r}")
    d = Path(directory).absolute()
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=VALID_DAYS)
    ca, issuer = _make_ca(d, "ca", CA_CN, now)
    wrong_ca, wrong_issuer = _make_ca(d, "wrong-ca", WRONG_CA_CN, now)
    server = _make_leaf(
        d, "server", SERVER_CN, issuer, server=True, not_before=start, not_after=end,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
              x509.IPAddress(ipaddress.ip_address("::1"))],
    )  # fmt: skip
    wrong_host = _make_leaf(
        d, "wrong-host", WRONG_HOST, issuer, server=True, not_before=start, not_after=end,
        sans=[x509.DNSName(WRONG_HOST)],
    )  # fmt: skip
    clients = {
        name: _make_leaf(d, f"client-{name}", name, issuer, server=False,
                         not_before=start, not_after=end)
        for name in client_names
    }  # fmt: skip
    first = client_names[0]
    client_wrong_ca = _make_leaf(
        d, "client-wrong-ca", first, wrong_issuer, server=False, not_before=start, not_after=end
    )
    client_expired = _make_leaf(
        d, "client-expired", first, issuer, server=False,
        not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1),
    )  # fmt: skip
    return Pki(
        directory=d, ca=ca, wrong_ca=wrong_ca, server=server, wrong_host=wrong_host,
        clients=clients, client_wrong_ca=client_wrong_ca, client_expired=client_expired,
    )  # fmt: skip
