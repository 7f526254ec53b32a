"""devtools/certs.py: the test PKI verifies with openssl as intended, and fails where meant to."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from devtools.certs import CA_CN, WRONG_CA_CN, WRONG_HOST, Pki, make_test_pki

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="no openssl binary")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def verify(ca: Path, cert: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(ca), *args, str(cert)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    make_test_pki(tmp_path, client_names=("alice", "bob", "carol"))
    assert time.perf_counter() - t0 < 0.5


def test_names_and_issuers(pki: Pki) -> None:
    ca, wrong_ca = load(pki.ca.cert), load(pki.wrong_ca.cert)
    assert cn(ca.subject) == cn(ca.issuer) == CA_CN
    assert cn(wrong_ca.subject) == cn(wrong_ca.issuer) == WRONG_CA_CN
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert set(pki.clients) == {"alice", "bob"}
    for name, files in pki.clients.items():
        c = load(files.cert)
        assert (cn(c.subject), cn(c.issuer)) == (name, CA_CN)
    assert cn(load(pki.client_wrong_ca.cert).issuer) == WRONG_CA_CN
    assert cn(load(pki.client_expired.cert).issuer) == CA_CN
    assert pki.ca_file == pki.ca.cert


def test_server_alt_names(pki: Pki) -> None:
    san = load(pki.server.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.value.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    }  # fmt: skip
    wrong = load(pki.wrong_host.cert)
    assert cn(wrong.subject) == WRONG_HOST
    wsan = wrong.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert wsan.value.get_values_for_type(x509.DNSName) == [WRONG_HOST]
    assert wsan.value.get_values_for_type(x509.IPAddress) == []


def test_modes(pki: Pki) -> None:
    every = [pki.ca, pki.wrong_ca, pki.server, pki.wrong_host, *pki.clients.values(),
             pki.client_wrong_ca, pki.client_expired]  # fmt: skip
    for files in every:
        assert stat.S_IMODE(files.key.stat().st_mode) == 0o600, files.key
        assert stat.S_IMODE(files.cert.stat().st_mode) == 0o644, files.cert
        assert files.key.read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_expired_dates(pki: Pki) -> None:
    c = load(pki.client_expired.cert)
    now = dt.datetime.now(dt.UTC)
    assert c.not_valid_after_utc < now
    assert c.not_valid_before_utc < c.not_valid_after_utc
    good = load(pki.clients["alice"].cert)
    assert good.not_valid_before_utc < now < good.not_valid_after_utc


@needs_openssl
def test_openssl_accepts_the_chain(pki: Pki) -> None:
    for files in (pki.server, pki.wrong_host, *pki.clients.values()):
        res = verify(pki.ca.cert, files.cert)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.strip().endswith(": OK")
    res = verify(pki.ca.cert, pki.server.cert, "-purpose", "sslserver", "-verify_hostname",
                 "localhost", "-verify_ip", "127.0.0.1")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    res = verify(pki.ca.cert, pki.clients["bob"].cert, "-purpose", "sslclient")
    assert res.returncode == 0, res.stdout + res.stderr


@needs_openssl
def test_openssl_refuses_what_it_should(pki: Pki) -> None:
    assert verify(pki.ca.cert, pki.client_wrong_ca.cert).returncode != 0
    assert verify(pki.wrong_ca.cert, pki.server.cert).returncode != 0
    res = verify(pki.ca.cert, pki.client_expired.cert)
    assert res.returncode != 0
    assert "expired" in (res.stdout + res.stderr)
    res = verify(pki.ca.cert, pki.wrong_host.cert, "-verify_hostname", "localhost")
    assert res.returncode != 0
    res = verify(pki.ca.cert, pki.wrong_host.cert, "-verify_ip", "127.0.0.1")
    assert res.returncode != 0


def test_bad_client_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_test_pki(tmp_path, client_names=())
    with pytest.raises(ValueError):
        make_test_pki(tmp_path, client_names=("../x",))
