"""SCRAM-SHA-256-PLUS (``tls-server-end-point`` channel binding, RFC 5802 + RFC 5929, as
PostgreSQL does it): the binding data of certificates, both state machines against scramp and
against each other, PostgreSQL's refusals (wrong binding, downgrade, mixed-up flags) with its
texts and SQLSTATEs, and libpq's choice of mechanism under each policy."""

from __future__ import annotations

import base64
import datetime
import hashlib
import struct
from collections.abc import Callable
from functools import cache, partial

import pytest
import scramp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.test_scram import frames, only_body

from pgcorral.errors import (
    AuthenticationError,
    ClientProtocolError,
    PasswordFailed,
    PgCorralError,
    ServerProtocolError,
)
from pgcorral.protocol import codes, scram
from pgcorral.protocol import messages as m
from pgcorral.protocol.scram import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    TLS_SERVER_END_POINT,
    ScramKeys,
    ScramVerifier,
    tls_server_end_point,
)
from pgcorral.protocol.scram_client import ScramClient, choose_mechanism, sasl_mechanisms
from pgcorral.protocol.scram_server import ScramServer

_I32 = struct.Struct("!i")
SALT = b"0123456789abcdef"
PASSWORD = "s3cret"
VERIFIER = ScramVerifier.from_password(PASSWORD, SALT, 4096)
BOTH = [SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
PLUS_HEADER = b"p=tls-server-end-point,,"

# --- certificates -----------------------------------------------------------------------------

_SHA256_WITH_RSA = bytes.fromhex("06092a864886f70d01010b")  # OID 1.2.840.113549.1.1.11
_SHA1_WITH_RSA = bytes.fromhex("06092a864886f70d010105")  # OID 1.2.840.113549.1.1.5
_MD5_WITH_RSA = bytes.fromhex("06092a864886f70d010104")  # OID 1.2.840.113549.1.1.4


@cache
def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_cert(kind: str) -> bytes:
    """A self-signed DER certificate: ``rsa-sha256``, ``rsa-sha512``, ``ecdsa-sha384``,
    ``rsa-sha1`` / ``rsa-md5`` (cryptography refuses to sign with those any more, so the
    algorithm OIDs of an rsa-sha256 certificate are rewritten: the binding never checks the
    signature), ``ed25519``, ``ed448``."""
    return _make_cert(kind)


@cache
def _make_cert(kind: str) -> bytes:
    if kind in ("rsa-sha1", "rsa-md5"):
        der = _make_cert("rsa-sha256")
        assert der.count(_SHA256_WITH_RSA) == 2  # TBSCertificate.signature, signatureAlgorithm
        return der.replace(_SHA256_WITH_RSA,
                           _SHA1_WITH_RSA if kind == "rsa-sha1" else _MD5_WITH_RSA)
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | \
        ed448.Ed448PrivateKey
    algorithm: hashes.HashAlgorithm | None
    if kind == "rsa-sha256":
        key, algorithm = _rsa_key(), hashes.SHA256()
    elif kind == "rsa-sha512":
        key, algorithm = _rsa_key(), hashes.SHA512()
    elif kind == "ecdsa-sha384":
        key, algorithm = ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()
    elif kind == "ed25519":
        key, algorithm = ed25519.Ed25519PrivateKey.generate(), None
    else:
        assert kind == "ed448"
        key, algorithm = ed448.Ed448PrivateKey.generate(), None
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgcorral test")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=30))
            .sign(key, algorithm))
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("kind, hash_name", [
    ("rsa-sha256", "sha256"),
    ("rsa-sha512", "sha512"),
    ("ecdsa-sha384", "sha384"),
    ("rsa-sha1", "sha256"),  # RFC 5929 4.1: MD5 and SHA-1 become SHA-256
    ("rsa-md5", "sha256"),
])
def test_tls_server_end_point(kind: str, hash_name: str) -> None:
    der = make_cert(kind)
    data = tls_server_end_point(der)
    assert data == hashlib.new(hash_name, der).digest()
    # asn1crypto (through scramp) reads the algorithm the same way
    assert data == bytes(scramp.core.CBindData.from_der(der))


def test_rewritten_certificates_really_name_sha1_and_md5() -> None:
    for kind, name in (("rsa-sha1", "sha1"), ("rsa-md5", "md5")):
        algorithm = x509.load_der_x509_certificate(make_cert(kind)).signature_hash_algorithm
        assert algorithm is not None and algorithm.name == name


@pytest.mark.parametrize("kind", ["ed25519", "ed448"])
def test_tls_server_end_point_refuses_signatures_without_a_hash(kind: str) -> None:
    with pytest.raises(ValueError, match="uses no hash, so it has no tls-server-end-point"):
        tls_server_end_point(make_cert(kind))


def test_tls_server_end_point_refuses_what_is_not_a_certificate() -> None:
    with pytest.raises(ValueError):
        tls_server_end_point(b"not a certificate")
    assert TLS_SERVER_END_POINT == "tls-server-end-point"


# --- helpers ----------------------------------------------------------------------------------

CERT = make_cert("rsa-sha256")
BINDING = tls_server_end_point(CERT)
OTHER_BINDING = tls_server_end_point(make_cert("ecdsa-sha384"))  # a man in the middle's


def initial_body(data: bytes | None, mechanism: str = SCRAM_SHA_256_PLUS) -> bytes:
    if data is None:
        return mechanism.encode() + b"\0" + _I32.pack(-1)
    return mechanism.encode() + b"\0" + _I32.pack(len(data)) + data


def split_initial(body: bytes) -> tuple[str, bytes]:
    end = body.index(b"\0")
    (length,) = _I32.unpack_from(body, end + 1)
    data = body[end + 5:]
    assert len(data) == length
    return body[:end].decode(), data


def offered(server: ScramServer) -> list[str]:
    return sasl_mechanisms(only_body(server.start()))


def login(client: ScramClient, server: ScramServer) -> None:
    challenge = server.handle_initial(client.initial(offered(server)))
    final = server.handle_final(client.handle_continue(only_body(challenge)))
    (t1, sasl_final), (t2, ok) = frames(final)
    assert (t1, t2, ok) == (b"R", b"R", _I32.pack(codes.AUTH_OK))
    client.handle_final(sasl_final)
    client.check_ok()
    assert server.done


def client_final(first_bare: bytes, server_first: bytes, cbind_input: bytes,
                 keys: ScramKeys | None = None) -> bytes:
    """A client-final with any channel-binding input and a correct proof."""
    keys = keys or ScramKeys.from_password(PASSWORD, SALT, 4096)
    nonce = server_first.split(b",")[0][2:]
    without = b"c=" + base64.b64encode(cbind_input) + b",r=" + nonce
    signature = scram.hmac_sha256(keys.stored_key, scram.auth_message(first_bare, server_first,
                                                                       without))
    return without + b",p=" + base64.b64encode(scram.xor(keys.client_key, signature))


def expect_error(action: Callable[[], object], error: type[PgCorralError], message: str,
                 sqlstate: str, detail: str | None = None) -> PgCorralError:
    with pytest.raises(error) as info:
        action()
    assert info.value.message == message
    assert info.value.sqlstate == sqlstate
    assert info.value.detail == detail
    assert info.value.__cause__ is None  # a real check, not a masked bug
    return info.value


# --- the server's offer -----------------------------------------------------------------------

def test_offer_with_and_without_channel_binding() -> None:
    plain = ScramServer("u", VERIFIER)
    assert offered(plain) == [SCRAM_SHA_256] == plain.mechanisms
    tls = ScramServer("u", VERIFIER, channel_binding=BINDING)
    assert offered(tls) == BOTH  # PostgreSQL's order: the channel-binding variant first
    assert tls.start() == m.authentication_sasl(BOTH)
    assert tls.mechanism is None and not tls.channel_bound


def test_unknown_users_are_offered_what_known_users_are() -> None:
    for binding in (None, BINDING):
        real = ScramServer.from_password("u", PASSWORD, salt=SALT, channel_binding=binding)
        mock = ScramServer.mock("ghost", b"secret", channel_binding=binding)
        assert real.start() == mock.start() == ScramServer(
            "u", VERIFIER, channel_binding=binding).start()


def test_empty_binding_data_is_refused() -> None:
    with pytest.raises(ValueError):
        ScramServer("u", VERIFIER, channel_binding=b"")
    with pytest.raises(ValueError):
        ScramClient.from_password("pw", channel_binding=b"")


# --- interop ----------------------------------------------------------------------------------

def test_scramp_plus_client_against_our_server() -> None:
    client = scramp.ScramClient(BOTH, "user", PASSWORD,
                                channel_binding=("tls-server-end-point", BINDING))
    assert client.mechanism_name == SCRAM_SHA_256_PLUS
    server = ScramServer("user", VERIFIER, channel_binding=BINDING)
    first = client.get_client_first().encode()
    assert first.startswith(PLUS_HEADER)
    challenge = server.handle_initial(initial_body(first, client.mechanism_name))
    assert server.mechanism == SCRAM_SHA_256_PLUS and not server.channel_bound
    client.set_server_first(only_body(challenge)[4:].decode())
    answer = server.handle_final(client.get_client_final().encode())
    client.set_server_final(frames(answer)[0][1][4:].decode())
    assert server.done and server.channel_bound
    assert server.keys == ScramKeys.from_password(PASSWORD, SALT, 4096)


@pytest.mark.parametrize("use_keys", [False, True])
def test_our_client_against_scramp_plus_server(use_keys: bool) -> None:
    mech = scramp.ScramMechanism(SCRAM_SHA_256_PLUS)
    info = mech.make_auth_info(PASSWORD, iteration_count=4096, salt=SALT)
    server = mech.make_server(lambda _user: info,
                              channel_binding=("tls-server-end-point", BINDING))
    # scramp wants a user name in the exchange (libpq's is empty: PostgreSQL ignores it)
    if use_keys:
        client = ScramClient.from_keys(ScramKeys.from_password(PASSWORD, SALT, 4096),
                                       user="user", channel_binding=BINDING,
                                       binding_policy="require")
    else:
        client = ScramClient.from_password(PASSWORD, user="user", channel_binding=BINDING)
    name, first = split_initial(client.initial(BOTH))
    assert (name, client.mechanism) == (SCRAM_SHA_256_PLUS, SCRAM_SHA_256_PLUS)
    assert first.startswith(PLUS_HEADER + b"n=user,r=")
    server.set_client_first(first.decode())
    final = client.handle_continue(_I32.pack(11) + server.get_server_first().encode())
    assert final.startswith(b"c=" + base64.b64encode(PLUS_HEADER + BINDING) + b",r=")
    server.set_client_final(final.decode())
    assert not client.channel_bound
    client.handle_final(_I32.pack(12) + server.get_server_final().encode())
    assert client.channel_bound
    client.check_ok()


def test_our_client_against_our_server_both_ways() -> None:
    for policy in ("prefer", "require"):
        server = ScramServer("u", VERIFIER, channel_binding=BINDING)
        client = ScramClient.from_password(PASSWORD, channel_binding=BINDING,
                                           binding_policy=policy)
        login(client, server)
        assert server.channel_bound and client.channel_bound
        # and from the recovered keys, as pgcorral logs in to PostgreSQL afterwards
        assert server.keys is not None
        again = ScramServer("u", VERIFIER, channel_binding=OTHER_BINDING)
        client = ScramClient.from_keys(server.keys, channel_binding=OTHER_BINDING,
                                       binding_policy=policy)
        login(client, again)
        assert again.channel_bound and client.channel_bound


def test_plus_with_an_initial_response_without_data() -> None:
    server = ScramServer("u", VERIFIER, channel_binding=BINDING)
    client = ScramClient.from_password(PASSWORD, channel_binding=BINDING)
    name, first = split_initial(client.initial(BOTH))
    assert server.handle_initial(initial_body(None, name)) == m.authentication_sasl_continue(b"")
    challenge = server.handle_response(first)
    answer = server.handle_response(client.handle_continue(only_body(challenge)))
    client.handle_final(frames(answer)[0][1])
    assert server.channel_bound and client.channel_bound


def test_n_flag_is_still_accepted_when_binding_is_offered() -> None:
    # PostgreSQL accepts a client that does not support channel binding at all
    server = ScramServer("u", VERIFIER, channel_binding=BINDING)
    client = ScramClient.from_password(PASSWORD, binding_policy="disabled",
                                       channel_binding=BINDING)
    login(client, server)
    assert server.mechanism == SCRAM_SHA_256 and not server.channel_bound
    assert client.mechanism == SCRAM_SHA_256 and not client.channel_bound
    scramp_client = scramp.ScramClient([SCRAM_SHA_256], "user", PASSWORD)  # sends n,,
    server = ScramServer("u", VERIFIER, channel_binding=BINDING)
    challenge = server.handle_initial(initial_body(scramp_client.get_client_first().encode(),
                                                   SCRAM_SHA_256))
    scramp_client.set_server_first(only_body(challenge)[4:].decode())
    server.handle_final(scramp_client.get_client_final().encode())
    assert server.done and not server.channel_bound


# --- wrong binding data -----------------------------------------------------------------------

CHECK_FAILED = ("SCRAM channel binding check failed", "28000")


def test_scramp_client_with_another_certificate_fails_the_check() -> None:
    # a man in the middle terminates the client's TLS with its own certificate
    client = scramp.ScramClient(BOTH, "user", PASSWORD,
                                channel_binding=("tls-server-end-point", OTHER_BINDING))
    server = ScramServer("user", VERIFIER, channel_binding=BINDING)
    challenge = server.handle_initial(initial_body(client.get_client_first().encode()))
    client.set_server_first(only_body(challenge)[4:].decode())
    final = client.get_client_final().encode()
    expect_error(lambda: server.handle_final(final), AuthenticationError, *CHECK_FAILED)
    assert not server.done and not server.channel_bound and server.keys is None
    with pytest.raises(ClientProtocolError, match="unexpected SASL message"):
        server.handle_final(final)  # no second try


def test_our_client_with_another_certificate_fails_against_scramp() -> None:
    mech = scramp.ScramMechanism(SCRAM_SHA_256_PLUS)
    info = mech.make_auth_info(PASSWORD, iteration_count=4096, salt=SALT)
    server = mech.make_server(lambda _user: info,
                              channel_binding=("tls-server-end-point", BINDING))
    client = ScramClient.from_password(PASSWORD, user="user", channel_binding=OTHER_BINDING)
    server.set_client_first(split_initial(client.initial(BOTH))[1].decode())
    final = client.handle_continue(_I32.pack(11) + server.get_server_first().encode())
    with pytest.raises(scramp.ScramException):
        server.set_client_final(final.decode())


@pytest.mark.parametrize("cbind_input", [
    PLUS_HEADER + BINDING[:-1],
    PLUS_HEADER + BINDING + b"x",
    PLUS_HEADER,
    b"n,," + BINDING,
    b"y,,",
    b"p=tls-unique,," + BINDING,
    b"",
])
def test_binding_must_be_exactly_the_header_and_our_data(cbind_input: bytes) -> None:
    server = ScramServer("u", VERIFIER, server_nonce=b"SN", channel_binding=BINDING)
    first = PLUS_HEADER + b"n=,r=CN"
    challenge = only_body(server.handle_initial(initial_body(first)))[4:]
    final = client_final(b"n=,r=CN", challenge, cbind_input)
    expect_error(lambda: server.handle_final(final), AuthenticationError, *CHECK_FAILED)


def test_binding_compared_as_postgresql_does_in_its_canonical_base64() -> None:
    good = base64.b64encode(PLUS_HEADER + BINDING)
    assert good.endswith(b"=")  # 56 bytes: one padding character, two spare bits
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    spare_bit_set = alphabet[alphabet.index(good[-2]) ^ 1]
    noncanonical = good[:-2] + bytes([spare_bit_set]) + b"="
    assert base64.b64decode(noncanonical) == base64.b64decode(good)
    server = ScramServer("u", VERIFIER, server_nonce=b"SN", channel_binding=BINDING)
    challenge = only_body(server.handle_initial(initial_body(PLUS_HEADER + b"n=,r=CN")))[4:]
    final = client_final(b"n=,r=CN", challenge, PLUS_HEADER + BINDING).replace(good,
                                                                                noncanonical)
    expect_error(lambda: server.handle_final(final), AuthenticationError, *CHECK_FAILED)


def test_unknown_user_fails_the_binding_check_as_a_known_one_would() -> None:
    # wrong binding: the same 28000 for both; right binding: the mock ends in 28P01
    for binding, error, message in ((OTHER_BINDING, AuthenticationError, CHECK_FAILED[0]),
                                    (BINDING, PasswordFailed, None)):
        for server in (ScramServer("ghost", VERIFIER, channel_binding=BINDING),
                       ScramServer.mock("ghost", b"secret", channel_binding=BINDING)):
            client = ScramClient.from_password("guess", channel_binding=binding)
            challenge = server.handle_initial(client.initial(offered(server)))
            with pytest.raises(error) as info:
                server.handle_final(client.handle_continue(only_body(challenge)))
            if message is not None:
                assert info.value.message == message and type(info.value) is error


# --- downgrade and mixed-up flags ---------------------------------------------------------------

NEGOTIATION = ("SCRAM channel binding negotiation error", "28000",
               "The client supports SCRAM channel binding but thinks the server does not.  "
               "However, this server does support channel binding.")


def test_y_flag_is_a_downgrade_when_binding_is_offered() -> None:
    # scramp could bind but was told only SCRAM-SHA-256 is offered (what a man in the middle
    # that strips PLUS from the offer would do): it sends y,, and PostgreSQL refuses
    client = scramp.ScramClient([SCRAM_SHA_256], "user", PASSWORD,
                                channel_binding=("tls-server-end-point", BINDING))
    first = client.get_client_first().encode()
    assert first.startswith(b"y,,")
    for server in (ScramServer("u", VERIFIER, channel_binding=BINDING),
                   ScramServer.mock("u", b"secret", channel_binding=BINDING)):
        body = initial_body(first, SCRAM_SHA_256)
        expect_error(partial(server.handle_initial, body), AuthenticationError, *NEGOTIATION)
    # our client does the same when PLUS is not offered to it
    ours = ScramClient.from_password(PASSWORD, channel_binding=BINDING)
    body = ours.initial([SCRAM_SHA_256])
    assert split_initial(body)[1].startswith(b"y,,")
    server = ScramServer("u", VERIFIER, channel_binding=BINDING)
    expect_error(lambda: server.handle_initial(body), AuthenticationError, *NEGOTIATION)


def test_y_flag_is_fine_without_binding() -> None:
    server = ScramServer("u", VERIFIER)  # a plain connection: we cannot bind
    client = ScramClient.from_password(PASSWORD, channel_binding=BINDING)
    login(client, server)
    assert client.mechanism == SCRAM_SHA_256 and not client.channel_bound


MALFORMED = "malformed SCRAM message"
P_WITHOUT_PLUS = ("The client selected SCRAM-SHA-256 without channel binding, but the SCRAM "
                  "message includes channel binding data.")
PLUS_WITHOUT_P = ("The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not "
                  "include channel binding data.")


@pytest.mark.parametrize("binding", [None, BINDING])
def test_p_flag_with_the_plain_mechanism(binding: bytes | None) -> None:
    server = ScramServer("u", VERIFIER, channel_binding=binding)
    body = initial_body(PLUS_HEADER + b"n=,r=CN", SCRAM_SHA_256)
    expect_error(lambda: server.handle_initial(body), ClientProtocolError, MALFORMED, "08P01",
                 P_WITHOUT_PLUS)


@pytest.mark.parametrize("data", [b"n,,n=,r=CN", b"y,,n=,r=CN"])
def test_plus_without_the_p_flag(data: bytes) -> None:
    server = ScramServer("u", VERIFIER, channel_binding=BINDING)
    expect_error(lambda: server.handle_initial(initial_body(data)), ClientProtocolError,
                 MALFORMED, "08P01", PLUS_WITHOUT_P)


def test_plus_is_an_invalid_mechanism_without_binding() -> None:
    server = ScramServer("u", VERIFIER)
    expect_error(lambda: server.handle_initial(initial_body(PLUS_HEADER + b"n=,r=CN")),
                 ClientProtocolError, "client selected an invalid SASL authentication mechanism",
                 "08P01")


@pytest.mark.parametrize("data, error, message, sqlstate, detail", [
    (b"p=tls-unique,,n=,r=CN", ClientProtocolError,
     'unsupported SCRAM channel-binding type "tls-unique"', "08P01", None),
    (b"p=tls-exporter,,n=,r=CN", ClientProtocolError,
     'unsupported SCRAM channel-binding type "tls-exporter"', "08P01", None),
    (b"p=" + b"\x01x\xff" * 20 + b",,n=,r=CN", ClientProtocolError,
     'unsupported SCRAM channel-binding type "' + "?x?" * 10 + '"', "08P01", None),
    (b"p=,,n=,r=CN", ClientProtocolError, 'unsupported SCRAM channel-binding type ""', "08P01",
     None),
    (b"p", ClientProtocolError, MALFORMED, "08P01", 'Expected character "=" for attribute "p".'),
    (b"px", ClientProtocolError, MALFORMED, "08P01",
     'Expected character "=" for attribute "p".'),
    (b"p=tls-server-end-point", ClientProtocolError, MALFORMED, "08P01",
     'Unexpected attribute "0x00" in client-first-message.'),
    (b"p=tls-server-end-point,x,n=,r=CN", ClientProtocolError, MALFORMED, "08P01",
     "Unexpected attribute \"'x'\" in client-first-message."),
    (b"p=tls-server-end-point,a=admin,n=,r=CN", ClientProtocolError,
     "client uses authorization identity, but it is not supported", "0A000", None),
    (b"p=tls-server-end-point,,m=ext,n=,r=CN", ClientProtocolError,
     "client requires an unsupported SCRAM extension", "0A000", None),
    (b"p=tls-server-end-point,,n=,r=C\x7fN", ClientProtocolError,
     "non-printable characters in SCRAM nonce", "08P01", None),
    (b"q=x,,n=,r=CN", ClientProtocolError, MALFORMED, "08P01",
     "Unexpected channel-binding flag \"'q'\"."),
])
def test_bad_plus_client_first(data: bytes, error: type[PgCorralError], message: str,
                               sqlstate: str, detail: str | None) -> None:
    server = ScramServer("u", VERIFIER, channel_binding=BINDING)
    expect_error(lambda: server.handle_initial(initial_body(data)), error, message, sqlstate,
                 detail)


@given(data=st.binary(max_size=200))
@settings(max_examples=200)
def test_fuzz_plus_exchange(data: bytes) -> None:
    for mechanism, body in ((SCRAM_SHA_256_PLUS, PLUS_HEADER + data),
                            (SCRAM_SHA_256_PLUS, data), (SCRAM_SHA_256, b"y,," + data),
                            (SCRAM_SHA_256_PLUS, PLUS_HEADER + b"n=,r=" + data)):
        server = ScramServer("u", VERIFIER, channel_binding=BINDING)
        try:
            server.handle_initial(initial_body(body, mechanism))
        except (ClientProtocolError, AuthenticationError) as err:
            assert err.__cause__ is None
    server = ScramServer("u", VERIFIER, server_nonce=b"SN", channel_binding=BINDING)
    server.handle_initial(initial_body(PLUS_HEADER + b"n=,r=CN"))
    try:
        server.handle_final(b"c=" + data + b",r=CNSN,p=" + base64.b64encode(b"x" * 32))
    except (ClientProtocolError, AuthenticationError) as err:
        assert err.__cause__ is None


# --- the client's choice (libpq's pg_SASL_init) -------------------------------------------------

N, Y, P = b"n,,", b"y,,", PLUS_HEADER
NO_PLUS = ("channel binding is required, but server did not offer an authentication method "
           "that supports channel binding")
NO_SSL = "channel binding required, but SSL not in use"
NONE_SUPPORTED = "none of the server's SASL authentication mechanisms are supported"
STRIPPED = "server offered SCRAM-SHA-256-PLUS authentication over a non-SSL connection"

Choice = tuple[str, bytes] | tuple[type[PgCorralError], str]


@pytest.mark.parametrize("policy, offer, binding, expected", [
    # TLS, both offered
    ("prefer", BOTH, BINDING, (SCRAM_SHA_256_PLUS, P)),
    ("require", BOTH, BINDING, (SCRAM_SHA_256_PLUS, P)),
    ("disable", BOTH, BINDING, (SCRAM_SHA_256, N)),
    ("disabled", BOTH, BINDING, (SCRAM_SHA_256, N)),
    # TLS, offered in the other order: the best is still picked
    ("prefer", BOTH[::-1], BINDING, (SCRAM_SHA_256_PLUS, P)),
    # TLS, PLUS not offered
    ("prefer", [SCRAM_SHA_256], BINDING, (SCRAM_SHA_256, Y)),
    ("require", [SCRAM_SHA_256], BINDING, (AuthenticationError, NO_PLUS)),
    ("disable", [SCRAM_SHA_256], BINDING, (SCRAM_SHA_256, N)),
    ("disabled", [SCRAM_SHA_256], BINDING, (SCRAM_SHA_256, N)),
    # TLS, only PLUS offered
    ("prefer", [SCRAM_SHA_256_PLUS], BINDING, (SCRAM_SHA_256_PLUS, P)),
    ("disable", [SCRAM_SHA_256_PLUS], BINDING, (AuthenticationError, NONE_SUPPORTED)),
    # no TLS
    ("prefer", [SCRAM_SHA_256], None, (SCRAM_SHA_256, N)),
    ("disable", [SCRAM_SHA_256], None, (SCRAM_SHA_256, N)),
    ("require", [SCRAM_SHA_256], None, (AuthenticationError, NO_SSL)),
    ("require", BOTH, None, (AuthenticationError, NO_SSL)),
    ("prefer", BOTH, None, (ServerProtocolError, STRIPPED)),
    ("disable", BOTH, None, (ServerProtocolError, STRIPPED)),
    # nothing usable
    ("prefer", [], BINDING, (AuthenticationError, NONE_SUPPORTED)),
    ("prefer", ["SCRAM-SHA-1", "OAUTHBEARER"], None, (AuthenticationError, NONE_SUPPORTED)),
    ("require", ["OAUTHBEARER"], BINDING, (AuthenticationError, NONE_SUPPORTED)),
    ("prefer", ["OAUTHBEARER", SCRAM_SHA_256], None, (SCRAM_SHA_256, N)),
])
def test_choose_mechanism(policy: str, offer: list[str], binding: bytes | None,
                          expected: Choice) -> None:
    first, second = expected
    if isinstance(first, str):
        assert isinstance(second, bytes)
        assert choose_mechanism(offer, binding, policy) == expected
        client = ScramClient.from_password("pw", channel_binding=binding,
                                           binding_policy=policy)
        name, data = split_initial(client.initial(offer))
        assert name == first and data.startswith(second + b"n=,r=")
    else:
        with pytest.raises(first) as info:
            choose_mechanism(offer, binding, policy)
        assert info.value.message == second
        assert info.value.sqlstate == ("08P01" if first is ServerProtocolError else "28000")
        client = ScramClient.from_password("pw", channel_binding=binding,
                                           binding_policy=policy)
        with pytest.raises(first):
            client.initial(offer)


def test_invalid_policy() -> None:
    with pytest.raises(ValueError, match="invalid channel binding policy"):
        choose_mechanism(BOTH, BINDING, "allow")
    with pytest.raises(ValueError, match="invalid channel binding policy"):
        ScramClient.from_password("pw", binding_policy="")


def test_initial_without_the_offer() -> None:
    # the existing call sites: no TLS, no offer given, the same message as before
    client = ScramClient.from_password("pw", client_nonce=b"CN")
    assert client.initial() == initial_body(b"n,,n=,r=CN", SCRAM_SHA_256)
    # with binding data the offer is needed: y,, to a server offering PLUS would fail
    client = ScramClient.from_password("pw", channel_binding=BINDING)
    with pytest.raises(ValueError, match="pass the server's mechanisms"):
        client.initial()
    client = ScramClient.from_password("pw", binding_policy="require")
    with pytest.raises(AuthenticationError, match=NO_SSL):
        client.initial()


def test_require_checks_that_the_exchange_was_channel_bound() -> None:
    message = "channel binding required, but server authenticated client without channel binding"
    # AuthenticationOk before any SASL final (a server that skips the exchange)
    client = ScramClient.from_password(PASSWORD, channel_binding=BINDING,
                                       binding_policy="require")
    client.initial(BOTH)
    with pytest.raises(AuthenticationError, match=message):
        client.check_ok()
    # keys without a ServerKey cannot check the server's signature: nothing was proven
    keys = ScramKeys(ScramKeys.from_password(PASSWORD, SALT, 4096).client_key, None, SALT, 4096)
    client = ScramClient.from_keys(keys, channel_binding=BINDING, binding_policy="require")
    server = ScramServer("u", VERIFIER, channel_binding=BINDING)
    challenge = server.handle_initial(client.initial(offered(server)))
    answer = server.handle_final(client.handle_continue(only_body(challenge)))
    with pytest.raises(AuthenticationError, match=message):
        client.handle_final(frames(answer)[0][1])
    # prefer: the same is accepted, as libpq does
    client = ScramClient.from_keys(keys, channel_binding=BINDING)
    server = ScramServer("u", VERIFIER, channel_binding=BINDING)
    login(client, server)
    assert not client.channel_bound and server.channel_bound


def test_server_signature_is_still_checked_with_plus() -> None:
    server = ScramServer("u", VERIFIER, channel_binding=BINDING)
    client = ScramClient.from_password(PASSWORD, channel_binding=BINDING)
    challenge = server.handle_initial(client.initial(offered(server)))
    server.handle_final(client.handle_continue(only_body(challenge)))
    forged = _I32.pack(codes.AUTH_SASL_FINAL) + b"v=" + base64.b64encode(b"\0" * 32)
    with pytest.raises(AuthenticationError, match="incorrect server signature"):
        client.handle_final(forged)
    assert not client.channel_bound
