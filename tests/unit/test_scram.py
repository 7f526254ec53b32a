"""SCRAM-SHA-256: RFC 7677's vector, both state machines against each other and against scramp,
logins from a recovered ClientKey, pass-through recovery, the PBKDF2 cache, and hostile input
from clients and servers (each must give PostgreSQL's error, never another exception)."""

from __future__ import annotations

import base64
import struct
import threading
from collections.abc import Callable

import pytest
import scramp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgcorral.errors import (
    AuthenticationError,
    ClientProtocolError,
    PasswordFailed,
    PgCorralError,
    ServerProtocolError,
)
from pgcorral.protocol import codes, scram
from pgcorral.protocol import messages as m
from pgcorral.protocol.auth_md5 import MAX_AUTH_TOKEN_LENGTH
from pgcorral.protocol.scram import (
    ScramKeys,
    ScramVerifier,
    is_scram_verifier,
    salted_password,
    saslprep,
    verify_plain_password,
)
from pgcorral.protocol.scram_client import ScramClient, ScramPassThrough, sasl_mechanisms
from pgcorral.protocol.scram_server import ScramServer

# RFC 7677 section 3
RFC_CLIENT_NONCE = b"rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

SALT = b"0123456789abcdef"
VERIFIER = ScramVerifier.from_password("s3cret", SALT, 4096)
_I32 = struct.Struct("!i")


def frames(wire: bytes) -> list[tuple[bytes, bytes]]:
    """Split wire messages into (type, body)."""
    out, pos = [], 0
    while pos < len(wire):
        type_, length = struct.unpack_from("!cI", wire, pos)
        out.append((type_, wire[pos + 5:pos + 1 + length]))
        pos += 1 + length
    assert pos == len(wire)
    return out


def only_body(wire: bytes) -> bytes:
    [(type_, body)] = frames(wire)
    assert type_ == b"R"
    return body


def initial_body(data: bytes | None, mechanism: bytes = b"SCRAM-SHA-256") -> bytes:
    if data is None:
        return mechanism + b"\0" + _I32.pack(-1)
    return mechanism + b"\0" + _I32.pack(len(data)) + data


def login(client: ScramClient, server: ScramServer) -> bytes:
    """Run a whole exchange; return what the server sends last."""
    assert frames(server.start()) == [(b"R", _I32.pack(codes.AUTH_SASL) + b"SCRAM-SHA-256\0\0")]
    challenge = server.handle_initial(client.initial())
    final = server.handle_final(client.handle_continue(only_body(challenge)))
    (t1, sasl_final), (t2, ok) = frames(final)
    assert (t1, t2, ok) == (b"R", b"R", _I32.pack(codes.AUTH_OK))
    client.handle_final(sasl_final)
    assert server.done
    return final


# --- RFC 7677 ---------------------------------------------------------------------------------

def test_rfc7677_vector_server_and_client() -> None:
    server = ScramServer.from_password("user", "pencil", salt=RFC_SALT,
                                       server_nonce=RFC_SERVER_NONCE)
    client = ScramClient.from_password("pencil", user="user", client_nonce=RFC_CLIENT_NONCE)
    first = client.initial()
    assert first == b"SCRAM-SHA-256\0" + _I32.pack(len(RFC_CLIENT_FIRST)) + RFC_CLIENT_FIRST
    challenge = server.handle_initial(first)
    assert challenge == m.authentication_sasl_continue(RFC_SERVER_FIRST)
    final = client.handle_continue(only_body(challenge))
    assert final == RFC_CLIENT_FINAL
    answer = server.handle_final(final)
    assert answer == m.authentication_sasl_final(RFC_SERVER_FINAL) + m.authentication_ok()
    client.handle_final(frames(answer)[0][1])
    assert server.done and server.client_key == client.keys.client_key  # type: ignore[union-attr]


def test_rfc7677_keys_match_scramp() -> None:
    salt, stored, server_key, iterations = scramp.ScramMechanism().make_auth_info(
        "pencil", iteration_count=4096, salt=RFC_SALT)
    ours = ScramVerifier.from_password("pencil", RFC_SALT, 4096)
    assert (ours.salt, ours.stored_key, ours.server_key, ours.iterations) == (
        salt, stored, server_key, iterations)


# --- verifiers, SASLprep, cache ---------------------------------------------------------------

def test_verifier_round_trip_and_repr_hides_keys() -> None:
    text = str(VERIFIER)
    assert text.startswith("SCRAM-SHA-256$4096:" + base64.b64encode(SALT).decode() + "$")
    assert ScramVerifier.parse(text) == VERIFIER
    assert is_scram_verifier(text)
    assert base64.b64encode(VERIFIER.stored_key).decode() not in repr(VERIFIER)


@pytest.mark.parametrize("text", [
    "", "md5abc", "SCRAM-SHA-256", "SCRAM-SHA-256$4096:abc",
    "SCRAM-SHA-1$4096:QUJD$" + "A" * 44 + ":" + "A" * 44,
    "SCRAM-SHA-256$x:QUJD$" + "A" * 43 + "=:" + "A" * 43 + "=",
    "SCRAM-SHA-256$0:QUJD$" + "A" * 43 + "=:" + "A" * 43 + "=",
    "SCRAM-SHA-256$4096:Q*JD$" + "A" * 43 + "=:" + "A" * 43 + "=",
    "SCRAM-SHA-256$4096:QUJD$QUJD:QUJD",
    "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
])
def test_bad_verifiers(text: str) -> None:
    with pytest.raises(ValueError):
        ScramVerifier.parse(text)
    assert not is_scram_verifier(text)


@pytest.mark.parametrize("password, prepared", [
    ("pencil", b"pencil"),
    ("I\u00adX", b"IX"),  # RFC 4013 examples
    ("\u00aa", b"a"),
    ("\u2168", b"IX"),
    ("a\u2003b", b"a b"),  # non-ASCII space mapped to space
    ("\u0007x\u00e9", "\u0007x\u00e9".encode()),  # prohibited: the raw bytes are used
    ("\u0627\u0031", "\u0627\u0031".encode()),  # bidi rule broken: raw
    ("\udcff\u00e9", b"\xff\xc3\xa9"),  # invalid UTF-8 kept by surrogateescape: raw bytes
])
def test_saslprep(password: str, prepared: bytes) -> None:
    assert saslprep(password) == prepared


def test_pbkdf2_runs_once_per_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = scram.hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append(iterations)
        return real(name, password, salt, iterations)

    monkeypatch.setattr(scram.hashlib, "pbkdf2_hmac", counting)
    scram.clear_cache()
    salt = b"cache-test-salt!"
    assert not scram.is_derived("pw", salt, 4096)
    v1 = ScramVerifier.from_password("pw", salt, 4096)
    v2 = ScramVerifier.from_password("pw", salt, 4096)
    ScramServer.from_password("u", "pw", salt=salt)
    client = ScramClient.from_password("pw")
    login(client, ScramServer("u", v1))
    assert v1 == v2 and calls == [4096] and scram.is_derived("pw", salt, 4096)
    ScramVerifier.from_password("pw", salt, 4097)
    ScramVerifier.from_password("pw2", salt, 4096)
    assert len(calls) == 3


def test_pbkdf2_cache_is_bounded_lru(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scram, "CACHE_SIZE", 3)
    scram.clear_cache()
    for i in range(3):
        salted_password(f"p{i}", b"s", 1)
    salted_password("p0", b"s", 1)  # p0 becomes the most recent
    salted_password("p3", b"s", 1)  # evicts p1
    assert [scram.is_derived(f"p{i}", b"s", 1) for i in range(4)] == [True, False, True, True]
    scram.clear_cache()


def test_pbkdf2_concurrent_requests_derive_once(monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[bytes] = []

    def slow(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append(password)
        started.set()
        release.wait(5)
        return b"k" * 32

    monkeypatch.setattr(scram.hashlib, "pbkdf2_hmac", slow)
    scram.clear_cache()
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(salted_password("x", b"s", 9)))
               for _ in range(6)]
    for t in threads:
        t.start()
    assert started.wait(5)
    release.set()
    for t in threads:
        t.join(5)
    assert calls == [b"x"] and results == [b"k" * 32] * 6
    scram.clear_cache()


def test_verify_plain_password() -> None:
    assert verify_plain_password("s3cret", VERIFIER)
    assert not verify_plain_password("s3cre", VERIFIER)


# --- client and server against each other and against scramp ----------------------------------

@given(password=st.text(max_size=30))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_passwords(password: str) -> None:
    verifier = ScramVerifier.from_password(password, b"random-salt", 64)
    client = ScramClient.from_password(password)
    server = ScramServer("u", verifier)
    login(client, server)
    assert server.keys == client.keys


def test_our_client_against_scramp_server() -> None:
    mech = scramp.ScramMechanism()
    info = mech.make_auth_info("pä ss", iteration_count=4096, salt=SALT)
    server = mech.make_server(lambda _user: info)
    client = ScramClient.from_password("pä ss", user="user")
    first = client.initial()
    server.set_client_first(first[first.index(b"n,,"):].decode())
    final = client.handle_continue(_I32.pack(11) + server.get_server_first().encode())
    server.set_client_final(final.decode())
    client.handle_final(_I32.pack(12) + server.get_server_final().encode())


def test_scramp_client_against_our_server() -> None:
    client = scramp.ScramClient(["SCRAM-SHA-256"], "user", "pä ss")
    server = ScramServer.from_password("user", "pä ss", salt=SALT)
    first = client.get_client_first().encode()
    challenge = server.handle_initial(initial_body(first))
    client.set_server_first(only_body(challenge)[4:].decode())
    answer = server.handle_final(client.get_client_final().encode())
    client.set_server_final(frames(answer)[0][1][4:].decode())
    assert server.done


def test_wrong_password_is_28P01() -> None:
    server = ScramServer("mallory", VERIFIER)
    client = ScramClient.from_password("guess")
    challenge = server.handle_initial(client.initial())
    with pytest.raises(PasswordFailed) as info:
        server.handle_final(client.handle_continue(only_body(challenge)))
    assert info.value.sqlstate == "28P01"
    assert info.value.message == 'password authentication failed for user "mallory"'
    assert not server.done and server.client_key is None and server.keys is None


@pytest.mark.parametrize("password", ["", "x" * 10240])
def test_empty_and_huge_passwords(password: str) -> None:
    with pytest.raises(PasswordFailed):
        server = ScramServer("u", VERIFIER)
        client = ScramClient.from_password(password)
        server.handle_final(client.handle_continue(only_body(server.handle_initial(
            client.initial()))))
    login(ScramClient.from_password(password),
          ScramServer("u", ScramVerifier.from_password(password, SALT, 4096)))


def test_mock_exchange_fails_like_a_wrong_password_with_a_stable_salt() -> None:
    a = ScramServer.mock("ghost", b"process-secret")
    b = ScramServer.mock("ghost", b"process-secret")
    assert a.verifier.salt == b.verifier.salt
    assert ScramServer.mock("other", b"process-secret").verifier.salt != a.verifier.salt
    client = ScramClient.from_password("anything")
    challenge = a.handle_initial(client.initial())
    with pytest.raises(PasswordFailed, match='for user "ghost"'):
        a.handle_final(client.handle_continue(only_body(challenge)))


def test_initial_response_without_data_gets_an_empty_challenge() -> None:
    server = ScramServer("u", VERIFIER)
    client = ScramClient.from_password("s3cret")
    assert server.handle_initial(initial_body(None)) == m.authentication_sasl_continue(b"")
    first = client.initial()
    challenge = server.handle_response(first[first.index(b"n,,"):])
    answer = server.handle_response(client.handle_continue(only_body(challenge)))
    client.handle_final(frames(answer)[0][1])
    assert server.done


def test_y_flag_is_accepted_and_must_be_repeated() -> None:
    for binding, ok in ((b"eSws", True), (b"biws", False)):
        server = ScramServer("u", VERIFIER, server_nonce=b"SN")
        server.handle_initial(initial_body(b"y,,n=,r=CN"))
        keys = ScramKeys.from_password("s3cret", SALT, 4096)
        without = b"c=" + binding + b",r=CNSN"
        message = b"n=,r=CN,r=CNSN,s=" + base64.b64encode(SALT) + b",i=4096," + without
        sig = scram.hmac_sha256(keys.stored_key, message)
        final = without + b",p=" + base64.b64encode(scram.xor(keys.client_key, sig))
        if ok:
            server.handle_final(final)
            assert server.done
        else:
            with pytest.raises(ClientProtocolError, match="unexpected SCRAM channel-binding"):
                server.handle_final(final)


# --- logging in with a recovered ClientKey ----------------------------------------------------

def test_login_with_recovered_client_key() -> None:
    first = ScramServer("app", VERIFIER)
    login(ScramClient.from_password("s3cret"), first)
    keys = first.keys
    assert keys is not None and keys.client_key == first.client_key
    assert keys.verifier == VERIFIER
    # later: pgcorral logs in to a server holding the same verifier, with no password
    client = ScramClient.from_keys(keys)
    login(client, ScramServer("app", VERIFIER))


def test_recovered_key_against_another_salt_asks_for_fallback() -> None:
    first = ScramServer("app", VERIFIER)
    login(ScramClient.from_password("s3cret"), first)
    assert first.keys is not None
    changed = ScramServer.from_password("app", "s3cret", salt=b"another salt....")
    client = ScramClient.from_keys(first.keys)
    with pytest.raises(AuthenticationError, match="salt or iteration count"):
        client.handle_continue(only_body(changed.handle_initial(client.initial())))


def test_wrong_server_key_is_detected() -> None:
    keys = ScramKeys.from_password("s3cret", SALT, 4096)
    forged = ScramVerifier(4096, SALT, VERIFIER.stored_key, b"\x01" * 32)
    client = ScramClient.from_keys(keys)
    server = ScramServer("app", forged)
    answer = server.handle_final(client.handle_continue(only_body(server.handle_initial(
        client.initial()))))
    with pytest.raises(AuthenticationError, match="incorrect server signature"):
        client.handle_final(frames(answer)[0][1])
    # without a ServerKey the signature is not checked
    blind = ScramClient.from_keys(ScramKeys(keys.client_key, None, SALT, 4096))
    login(blind, ScramServer("app", forged))


# --- pass-through -----------------------------------------------------------------------------

def relay(client: ScramClient, server: ScramServer, watch: ScramPassThrough) -> None:
    first = client.initial()
    watch.client_initial(first)
    challenge = only_body(server.handle_initial(first))
    watch.server_continue(challenge)
    final = client.handle_continue(challenge)
    watch.client_response(final)
    sasl_final = frames(server.handle_final(final))[0][1]
    watch.server_final(sasl_final)
    client.handle_final(sasl_final)


def test_pass_through_recovers_keys_with_the_verifier() -> None:
    watch = ScramPassThrough()
    client = ScramClient.from_password("s3cret")
    relay(client, ScramServer("app", VERIFIER), watch)
    assert watch.error is None and watch.parameters == (SALT, 4096)
    keys = watch.recover(VERIFIER)
    assert keys == client.keys
    login(ScramClient.from_keys(keys), ScramServer("app", VERIFIER))


def test_pass_through_without_data_in_initial_response() -> None:
    watch = ScramPassThrough()
    server = ScramServer("app", VERIFIER)
    client = ScramClient.from_password("s3cret")
    watch.client_initial(initial_body(None))
    watch.server_continue(only_body(server.handle_initial(initial_body(None))))
    first = client.initial()
    first = first[first.index(b"n,,"):]
    watch.client_response(first)
    challenge = only_body(server.handle_response(first))
    watch.server_continue(challenge)
    final = client.handle_continue(challenge)
    watch.client_response(final)
    watch.server_final(frames(server.handle_final(final))[0][1])
    assert watch.recover(VERIFIER) == client.keys


@pytest.mark.parametrize("other", [
    ScramVerifier.from_password("other password", SALT, 4096),  # same salt, other ServerKey
    ScramVerifier.from_password("s3cret", b"different salt..", 4096),
    ScramVerifier.from_password("s3cret", SALT, 8192),
])
def test_pass_through_refuses_a_verifier_that_is_not_the_servers(other: ScramVerifier) -> None:
    watch = ScramPassThrough()
    relay(ScramClient.from_password("s3cret"), ScramServer("app", VERIFIER), watch)
    with pytest.raises(AuthenticationError):
        watch.recover(other)


def test_pass_through_incomplete_or_odd_exchanges() -> None:
    watch = ScramPassThrough()
    with pytest.raises(AuthenticationError, match="incomplete"):
        watch.recover(VERIFIER)
    assert watch.parameters is None
    watch.client_initial(initial_body(b"n,,n=,r=abc", mechanism=b"OTHER"))
    watch.server_continue(b"junk")
    watch.client_response(b"junk")
    watch.server_final(b"")
    with pytest.raises(AuthenticationError, match="not usable"):
        watch.recover(VERIFIER)


# --- hostile clients --------------------------------------------------------------------------

def expect_client_error(action: Callable[[], object], message: str,
                        sqlstate: str = "08P01", error: type[PgCorralError] = ClientProtocolError,
                        ) -> PgCorralError:
    with pytest.raises(error) as info:
        action()
    assert info.value.sqlstate == sqlstate
    assert info.value.message == message
    assert info.value.__cause__ is None  # a real check, not a masked bug
    return info.value


def test_data_length_0x7fffffff() -> None:
    server = ScramServer("u", VERIFIER)
    body = b"SCRAM-SHA-256\0" + _I32.pack(0x7FFFFFFF) + b"n,,n=,r=abc"
    expect_client_error(lambda: server.handle_initial(body), "insufficient data left in message")


def test_message_longer_than_postgresql_reads_is_28P01() -> None:
    server = ScramServer("u", VERIFIER)
    data = b"n,,n=,r=" + b"a" * MAX_AUTH_TOKEN_LENGTH
    expect_client_error(lambda: server.handle_initial(initial_body(data)),
                        'password authentication failed for user "u"', "28P01", PasswordFailed)


@pytest.mark.parametrize("length", [-5, -2, -0x80000000, 12, 1000])
def test_bad_data_lengths(length: int) -> None:
    server = ScramServer("u", VERIFIER)
    body = b"SCRAM-SHA-256\0" + _I32.pack(length) + b"n,,n=,r=abc"
    expect_client_error(lambda: server.handle_initial(body), "insufficient data left in message")


@pytest.mark.parametrize("body, message", [
    (initial_body(b"n,,n=,r=abc", b"SCRAM-SHA-1"),
     "client selected an invalid SASL authentication mechanism"),
    (initial_body(b"p=tls-server-end-point,,n=,r=abc", b"SCRAM-SHA-256-PLUS"),
     "client selected an invalid SASL authentication mechanism"),
    (initial_body(b"n,,n=,r=abc", b""),
     "client selected an invalid SASL authentication mechanism"),
    (b"SCRAM-SHA-256", "invalid string in message"),
    (b"", "invalid string in message"),
    (b"SCRAM-SHA-256\0\0\0", "insufficient data left in message"),
    (initial_body(b"n,,n=,r=abc") + b"extra", "invalid message format"),
])
def test_bad_initial_responses(body: bytes, message: str) -> None:
    server = ScramServer("u", VERIFIER)
    expect_client_error(lambda: server.handle_initial(body), message)


@pytest.mark.parametrize("data, detail", [
    (b"", "The message is empty."),
    (b"garbage", 'Unexpected channel-binding flag "\'g\'".'),
    (b"\x01\x02", 'Unexpected channel-binding flag "0x01".'),
    (b"n", 'Comma expected, but found character "0x00".'),
    (b"n,", 'Unexpected attribute "0x00" in client-first-message.'),
    (b"nx,n=,r=a", 'Comma expected, but found character "\'x\'".'),
    (b"n,,n=,r=a\0b", "Message length does not match input length."),
    (b"p=tls-server-end-point,,n=,r=abc",
     "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message "
     "includes channel binding data."),
    (b"n,,", 'Expected attribute "n" but found "0x00".'),
    (b"n,,x=,r=a", 'Expected attribute "n" but found "\'x\'".'),
    (b"n,,n", 'Expected character "=" for attribute "n".'),
    (b"n,,n=user", 'Expected attribute "r" but found "0x00".'),
    (b"n,,n=,r=abc,1", 'Attribute expected, but found invalid character "\'1\'".'),
    (b"n,,n=,r=abc,x", 'Expected character "=" for attribute "x".'),
])
def test_garbage_client_first(data: bytes, detail: str) -> None:
    server = ScramServer("u", VERIFIER)
    err = expect_client_error(lambda: server.handle_initial(initial_body(data)),
                              "malformed SCRAM message")
    assert err.detail == detail


@pytest.mark.parametrize("data, message, sqlstate", [
    (b"n,a=admin,n=,r=abc", "client uses authorization identity, but it is not supported",
     "0A000"),
    (b"n,,m=ext,n=,r=abc", "client requires an unsupported SCRAM extension", "0A000"),
    (b"n,,n=,r=a\x7fb", "non-printable characters in SCRAM nonce", "08P01"),
])
def test_refused_client_first(data: bytes, message: str, sqlstate: str) -> None:
    server = ScramServer("u", VERIFIER)
    expect_client_error(lambda: server.handle_initial(initial_body(data)), message, sqlstate)


def started(server_nonce: bytes | None = None) -> tuple[ScramServer, ScramClient, bytes]:
    server = ScramServer("u", VERIFIER, server_nonce=server_nonce)
    client = ScramClient.from_password("s3cret")
    challenge = only_body(server.handle_initial(client.initial()))
    return server, client, challenge


def test_wrong_nonce() -> None:
    server, client, challenge = started()
    final = client.handle_continue(challenge)
    nonce = final.split(b",")[1]
    tampered = final.replace(nonce, nonce[:-1] + (b"A" if nonce[-1:] != b"A" else b"B"))
    err = expect_client_error(lambda: server.handle_final(tampered), "invalid SCRAM response")
    assert err.detail == "Nonce does not match."


def test_replayed_client_final() -> None:
    first = ScramServer("u", VERIFIER, server_nonce=b"first-server-nonce")
    client = ScramClient.from_password("s3cret")
    initial = client.initial()
    final = client.handle_continue(only_body(first.handle_initial(initial)))
    first.handle_final(final)
    # an eavesdropper replays the same client-first and client-final to a new exchange
    second = ScramServer("u", VERIFIER, server_nonce=b"second-server-nonce")
    second.handle_initial(initial)
    expect_client_error(lambda: second.handle_final(final), "invalid SCRAM response")
    assert not second.done


@pytest.mark.parametrize("mutate, message", [
    (lambda f: b"", "malformed SCRAM message"),
    (lambda f: f.replace(b"c=biws", b"c=eSws"),
     "unexpected SCRAM channel-binding attribute in client-final-message"),
    (lambda f: f.replace(b"c=biws", b"x=biws"), "malformed SCRAM message"),
    (lambda f: f[:f.index(b",p=")], "malformed SCRAM message"),
    (lambda f: f + b",x=1", "malformed SCRAM message"),
    (lambda f: f[:-4] + b"!!!=", "malformed SCRAM message"),
    (lambda f: f[:-8] + b"=", "malformed SCRAM message"),
    (lambda f: f + b"\0", "malformed SCRAM message"),
])
def test_garbage_client_final(mutate: Callable[[bytes], bytes], message: str) -> None:
    server, client, challenge = started()
    final = mutate(client.handle_continue(challenge))
    expect_client_error(lambda: server.handle_final(final), message)


def test_extensions_before_the_proof_are_ignored() -> None:
    server, client, challenge = started()
    final = client.handle_continue(challenge)
    # an extension changes the AuthMessage, so the proof no longer matches: 28P01, not 08P01
    cut = final.index(b",p=")
    with pytest.raises(PasswordFailed):
        server.handle_final(final[:cut] + b",x=ext" + final[cut:])


def test_out_of_order_calls_and_no_retry_after_failure() -> None:
    server = ScramServer("u", VERIFIER)
    expect_client_error(lambda: server.handle_final(b"c=biws"), "unexpected SASL message")
    server = ScramServer("u", VERIFIER)
    with pytest.raises(ClientProtocolError):
        server.handle_initial(initial_body(b"garbage"))
    client = ScramClient.from_password("s3cret")
    expect_client_error(lambda: server.handle_initial(client.initial()),
                        "unexpected SASL message")
    server, client, challenge = started()
    server.handle_final(client.handle_continue(challenge))
    expect_client_error(lambda: server.handle_final(b"c=biws"), "unexpected SASL message")
    assert server.done


@given(data=st.binary(max_size=200))
@settings(max_examples=200)
def test_fuzz_initial_response(data: bytes) -> None:
    for body in (data, initial_body(data), initial_body(b"n,," + data),
                 initial_body(b"n,,n=,r=" + data)):
        server = ScramServer("u", VERIFIER)
        try:
            server.handle_initial(body)
        except (ClientProtocolError, PasswordFailed) as err:
            assert err.__cause__ is None


@given(data=st.binary(max_size=200))
@settings(max_examples=200)
def test_fuzz_final_response(data: bytes) -> None:
    server, _client, challenge = started(server_nonce=b"SN")
    nonce = challenge[6:].split(b",")[0]
    for body in (data, b"c=biws,r=" + nonce + b"," + data, b"c=biws," + data):
        server, _client, _ = started(server_nonce=b"SN")
        try:
            server.handle_final(body)
        except (ClientProtocolError, PasswordFailed) as err:
            assert err.__cause__ is None


# --- hostile servers --------------------------------------------------------------------------

def continue_body(data: bytes) -> bytes:
    return _I32.pack(codes.AUTH_SASL_CONTINUE) + data


@pytest.mark.parametrize("server_first, error", [
    (b"r=someone-elses-nonce,s=QUJD,i=4096", ServerProtocolError),
    (b"r=CN,s=QUJD,i=4096", ServerProtocolError),  # does not extend our nonce
    (b"r=CN" + b"x" * 5000 + b",s=QUJD,i=4096", None),  # a huge nonce is only long
    (b"r=CNx,s=Q*JD,i=4096", ServerProtocolError),
    (b"r=CNx,s=,i=4096", ServerProtocolError),
    (b"r=CNx,s=QUJD,i=0", ServerProtocolError),
    (b"r=CNx,s=QUJD,i=-1", ServerProtocolError),
    (b"r=CNx,s=QUJD,i=2147483648", ServerProtocolError),
    (b"r=CNx,s=QUJD,i=1000001", ServerProtocolError),
    (b"r=CNx,s=QUJD,i=4096,x=1", ServerProtocolError),
    (b"r=CNx,s=QUJD", ServerProtocolError),
    (b"", ServerProtocolError),
])
def test_client_against_bad_server_first(server_first: bytes,
                                         error: type[Exception] | None) -> None:
    client = ScramClient.from_password("pw", client_nonce=b"CN")
    client.initial()
    if error is None:
        assert client.handle_continue(continue_body(server_first)).startswith(b"c=biws,r=CNx")
    else:
        with pytest.raises(error):
            client.handle_continue(continue_body(server_first))


def test_client_checks_message_codes_and_order() -> None:
    client = ScramClient.from_password("pw", client_nonce=b"CN")
    with pytest.raises(ServerProtocolError):
        client.handle_continue(continue_body(b"r=CNx,s=QUJD,i=1"))  # before initial()
    client = ScramClient.from_password("pw", client_nonce=b"CN")
    client.initial()
    with pytest.raises(ServerProtocolError, match="expected AuthenticationSASLContinue"):
        client.handle_continue(_I32.pack(codes.AUTH_SASL_FINAL) + b"r=CNx,s=QUJD,i=1")


@pytest.mark.parametrize("server_final, error, match", [
    (b"e=invalid-proof", ServerProtocolError, "error received from server"),
    (b"v=", ServerProtocolError, "malformed server signature"),
    (b"v=QUJD", ServerProtocolError, "malformed server signature"),
    (b"x=abc", ServerProtocolError, "malformed SCRAM message"),
    (b"v=" + base64.b64encode(b"\0" * 32), AuthenticationError, "incorrect server signature"),
])
def test_client_against_bad_server_final(server_final: bytes, error: type[Exception],
                                         match: str) -> None:
    client = ScramClient.from_password("pw", client_nonce=b"CN")
    client.initial()
    client.handle_continue(continue_body(b"r=CNx,s=QUJD,i=1"))
    with pytest.raises(error, match=match):
        client.handle_final(_I32.pack(codes.AUTH_SASL_FINAL) + server_final)


@given(data=st.binary(max_size=120))
@settings(max_examples=150)
def test_fuzz_server_messages(data: bytes) -> None:
    client = ScramClient.from_password("pw", client_nonce=b"CN")
    client.initial()
    try:
        client.handle_continue(continue_body(b"r=CN" + data))
        client.handle_final(_I32.pack(codes.AUTH_SASL_FINAL) + data)
    except (ServerProtocolError, AuthenticationError):
        pass


def test_sasl_mechanisms() -> None:
    body = only_body(m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]))
    assert sasl_mechanisms(body) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    for bad in (b"", _I32.pack(10), _I32.pack(11) + b"SCRAM-SHA-256\0\0",
                _I32.pack(10) + b"SCRAM-SHA-256\0", _I32.pack(10) + b"\0\0"):
        with pytest.raises(ServerProtocolError):
            sasl_mechanisms(bad)


def test_client_needs_exactly_one_secret() -> None:
    with pytest.raises(ValueError):
        ScramClient()
    with pytest.raises(ValueError):
        ScramClient("pw", keys=ScramKeys.from_password("pw", SALT, 1))
    with pytest.raises(ValueError):
        ScramClient("pw", client_nonce=b"a,b")
    with pytest.raises(ValueError):
        ScramServer("u", VERIFIER, server_nonce=b"")
