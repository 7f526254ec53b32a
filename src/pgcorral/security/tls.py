"""TLS contexts built from the configuration: one toward clients (pgcorral is the TLS server)
and one per server section toward PostgreSQL (pgcorral is the TLS client).

Owns the OpenSSL settings and the certificate files: which versions and ciphers, which CA
verifies whom, renegotiation off, ALPN ``postgresql``, and the channel-binding data of
pgcorral's own certificate. It opens no socket; the TLS records themselves are
``net.tls``'s. A file that does not load raises ``TlsFileError`` naming the key and the
file: at startup that is a configuration error (``config.parse``), at a reload the running
contexts stay (``net.context``).
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from pgcorral.config.model import MainConfig, ServerConfig
from pgcorral.protocol.scram import tls_server_end_point

#: The ALPN protocol of PostgreSQL 17 (required for direct TLS).
ALPN = "postgresql"

_VERSIONS = {
    "tlsv1": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}

#: libpq's sslmode values that verify the server certificate.
VERIFYING = ("verify-ca", "verify-full")


class TlsFileError(Exception):
    """A TLS setting or file that does not load: ``key`` names the configuration key."""

    def __init__(self, key: str, path: str, what: str) -> None:
        self.key = key
        self.path = path
        super().__init__(f'{key}: "{path}": {what}' if path else f"{key}: {what}")


@dataclass(frozen=True, slots=True)
class ClientSideTls:
    """What serves TLS clients."""

    context: ssl.SSLContext
    #: tls-server-end-point data of pgcorral's certificate (SCRAM-SHA-256-PLUS); None when the
    #: certificate's signature has no hash (Ed25519): then no -PLUS is offered
    cbind: bytes | None
    #: tls_ca_file is set: a client may present a certificate, and a presented one is verified
    verifies: bool


@dataclass(frozen=True, slots=True)
class ServerSideTls:
    """How to reach one server: libpq's sslmode, and the context when it may use TLS."""

    mode: str  # disable, prefer, require, verify-ca, verify-full
    context: ssl.SSLContext | None
    hostname: str | None  # the name checked under verify-full (and sent as SNI)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    # "[SSL] PEM lib (_ssl.c:3926)": neither the library tag nor CPython's source line
    return _SSL_NOISE.sub("", str(exc)).lower() or type(exc).__name__


#: The library tag and CPython's source position around an ssl.SSLError's text.
_SSL_NOISE = re.compile(r"^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$")


def _key_problem(path: str) -> str | None:
    """Why the private key in ``path`` does not load, None when it loads (then the problem
    was elsewhere, in the certificate chain). OpenSSL's own error says only "PEM lib"."""
    try:
        with open(path, "rb") as handle:
            load_pem_private_key(handle.read(), password=None)
    except OSError as exc:
        return f"cannot read: {_reason(exc)}"
    except TypeError:
        return "the private key is encrypted (a passphrase is not supported)"
    except (ValueError, UnsupportedAlgorithm):
        return "no PEM private key in the file"
    return None


def _first_certificate(key: str, path: str) -> x509.Certificate:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise TlsFileError(key, path, f"cannot read: {_reason(exc)}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise TlsFileError(key, path, "no PEM certificate in the file") from None


def _load_chain(context: ssl.SSLContext, cert_key: str, cert: str, key_key: str,
                key: str) -> x509.Certificate:
    certificate = _first_certificate(cert_key, cert)
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TlsFileError(key_key, key, f"cannot read: {_reason(exc)}") from None
    except PermissionError as exc:
        raise TlsFileError(key_key, key, f"cannot read: {_reason(exc)}") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsFileError(key_key, key, f'does not match the certificate in "{cert}"'
                               ) from None
        problem = _key_problem(key)
        if problem is None:  # the key is fine: the rest of the chain is not
            raise TlsFileError(cert_key, cert, f"cannot load the certificate chain: "
                               f"{_reason(exc)}") from None
        raise TlsFileError(key_key, key, problem) from None
    return certificate


def _load_ca(context: ssl.SSLContext, key: str, path: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(key, path, f"cannot load: {_reason(exc)}") from None


def client_side(main: MainConfig, wants_certificates: bool = True) -> ClientSideTls | None:
    """The context for TLS clients, None when ``tls`` is off; TlsFileError when a file or
    setting does not load. ``wants_certificates``: some hba line uses client certificates
    (``cert``, ``clientcert=``); without one, no certificate is asked for even with
    ``tls_ca_file`` set: the request and the client's empty answer cost about a third more
    CPU per handshake (measured: 463 against 645 us for both ends of a TLS 1.3 handshake)
    for a certificate nothing would look at."""
    if not main.tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[main.tls_min_protocol_version]
    if main.tls_max_protocol_version:
        context.maximum_version = _VERSIONS[main.tls_max_protocol_version]
    # as PostgreSQL: no renegotiation, no compression, the server's cipher order
    context.options |= (ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
                        | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET)
    # no session tickets (PostgreSQL sends none either; libpq never resumes): a TLS 1.3
    # handshake would otherwise end with two tickets, each encrypted and sent for nothing
    context.num_tickets = 0
    try:
        context.set_ciphers(main.tls_ciphers)
    except ssl.SSLError:
        raise TlsFileError("tls_ciphers", "", f"{main.tls_ciphers!r} selects no cipher"
                           ) from None
    certificate = _load_chain(context, "tls_cert_file", main.tls_cert_file, "tls_key_file",
                              main.tls_key_file)
    verifies = bool(main.tls_ca_file) and wants_certificates
    if main.tls_ca_file:
        _load_ca(context, "tls_ca_file", main.tls_ca_file)
    if verifies:
        # a certificate is asked for and checked when given, not required: the hba rule
        # decides who needs one (``cert``, ``clientcert=``), as in PostgreSQL
        context.verify_mode = ssl.CERT_OPTIONAL
    if main.tls_crl_file:
        _load_ca(context, "tls_crl_file", main.tls_crl_file)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.set_alpn_protocols([ALPN])
    try:
        cbind: bytes | None = tls_server_end_point(
            certificate.public_bytes(Encoding.DER))
    except ValueError:
        cbind = None
    return ClientSideTls(context, cbind, verifies)


def server_side(server: ServerConfig) -> ServerSideTls:
    """How to reach ``server``; TlsFileError when one of its files does not load. Over a Unix
    socket TLS is never used (libpq ignores sslmode there too)."""
    mode = server.tls
    if mode == "disable" or server.host.startswith("/"):
        return ServerSideTls("disable", None, None)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    if mode == "require" and server.tls_ca_file:
        mode = "verify-ca"  # libpq: require with a root certificate verifies it
    if mode in VERIFYING:
        if server.tls_ca_file:
            _load_ca(context, "tls_ca_file", server.tls_ca_file)
        else:
            context.load_default_certs()
        context.check_hostname = mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if server.tls_cert_file or server.tls_key_file:
        _load_chain(context, "tls_cert_file", server.tls_cert_file, "tls_key_file",
                    server.tls_key_file or server.tls_cert_file)
    context.set_alpn_protocols([ALPN])
    return ServerSideTls(mode, context, server.host)


def http_side(main: MainConfig) -> ssl.SSLContext | None:
    """HTTPS for the metrics and console ports: None unless ``metrics_cert_file`` and
    ``metrics_key_file`` are set; with ``metrics_ca_file`` every client must present a
    certificate that CA signed. TLS 1.2 or later. TlsFileError when a file does not load or
    only some of the three are set."""
    cert, key, ca = main.metrics_cert_file, main.metrics_key_file, main.metrics_ca_file
    if not (cert or key or ca):
        return None
    if not cert or not key:
        have, missing = (("metrics_cert_file", "metrics_key_file") if cert else
                         ("metrics_key_file", "metrics_cert_file") if key else
                         ("metrics_ca_file", "metrics_cert_file"))
        raise TlsFileError(have, "", f"{missing} is not set (HTTPS needs "
                           "metrics_cert_file and metrics_key_file)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    _load_chain(context, "metrics_cert_file", cert, "metrics_key_file", key)
    if ca:
        _load_ca(context, "metrics_ca_file", ca)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context


def peer_common_name(ssl_object: ssl.SSLObject) -> str | None:
    """The CN of the verified client certificate, None without one (PostgreSQL maps the CN to
    the user name: hba ``cert`` and ``clientcert=verify-full``)."""
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    subject: Any = cert.get("subject", ())  # ((("commonName", "alice"),), ...)
    for rdn in subject:
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None
