"""md5 and cleartext password authentication: hashes, answers, PostgreSQL's checks and errors."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcorral.errors import ClientProtocolError, PasswordFailed
from pgcorral.protocol import auth_md5
from pgcorral.protocol.auth_md5 import (
    MAX_AUTH_TOKEN_LENGTH,
    auth_message_length_error,
    check_cleartext,
    check_md5,
    is_md5_hash,
    md5_password_hash,
    md5_response,
    md5_verify,
    parse_password_message,
    unexpected_auth_message,
)

SALT = b"\x01\x02\x03\x04"


def reference_response(user: str, password: str, salt: bytes) -> bytes:
    """The formula of the protocol docs, written out independently."""
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"


def test_password_hash_known_value() -> None:
    # what CREATE ROLE postgres PASSWORD 'postgres' stores with password_encryption = md5
    assert md5_password_hash("postgres", "postgres") == "md53175bce1d3201d16594cebf9d7eb3f9d"


def test_is_md5_hash() -> None:
    assert is_md5_hash(md5_password_hash("u", "p"))
    assert not is_md5_hash("md5" + "g" * 32)
    assert not is_md5_hash("md5" + "A" * 32)  # PostgreSQL only writes lower case
    assert not is_md5_hash("md5abc")
    assert not is_md5_hash("secret")


@given(user=st.text(min_size=1, max_size=20), password=st.text(max_size=40),
       salt=st.binary(min_size=4, max_size=4))
@settings(max_examples=50)
def test_response_matches_the_formula_and_verifies(user: str, password: str,
                                                   salt: bytes) -> None:
    expected = reference_response(user, password, salt)
    assert md5_response(user, password, salt) == expected
    # the stored hash gives the same answer as the password
    assert md5_response(user, md5_password_hash(user, password), salt) == expected
    assert md5_verify(user, password, salt, expected[:-1])
    assert md5_verify(user, md5_password_hash(user, password), salt, expected[:-1])
    check_md5(user, password, salt, expected)


def test_response_needs_a_four_byte_salt() -> None:
    with pytest.raises(ValueError):
        md5_response("u", "p", b"abc")


def test_verify_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth_md5.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_md5.hmac, "compare_digest", spy)
    assert not md5_verify("u", "p", SALT, b"md5" + b"0" * 32)
    assert len(calls) == 1


@pytest.mark.parametrize("body, error, sqlstate, message", [
    (b"", ClientProtocolError, "08P01", "invalid password packet size"),
    (b"secret", ClientProtocolError, "08P01", "invalid password packet size"),
    (b"sec\0ret\0", ClientProtocolError, "08P01", "invalid password packet size"),
    (b"\0", PasswordFailed, "28P01", "empty password returned by client"),
])
def test_malformed_password_messages(body: bytes, error: type[Exception], sqlstate: str,
                                     message: str) -> None:
    with pytest.raises(error) as info:
        parse_password_message(body)
    assert info.value.sqlstate == sqlstate  # type: ignore[attr-defined]
    assert info.value.message == message  # type: ignore[attr-defined]


def test_wrong_md5_answer_is_28P01_with_postgresql_message() -> None:
    wrong = md5_response("alice", "wrong", SALT)
    with pytest.raises(PasswordFailed) as info:
        check_md5("alice", "right", SALT, wrong)
    assert info.value.sqlstate == "28P01"
    assert info.value.message == 'password authentication failed for user "alice"'


def test_md5_answer_for_another_salt_fails() -> None:
    with pytest.raises(PasswordFailed):
        check_md5("alice", "pw", b"zzzz", md5_response("alice", "pw", SALT))


def test_empty_md5_password_message() -> None:
    with pytest.raises(PasswordFailed, match="empty password returned by client"):
        check_md5("alice", "pw", SALT, b"\0")


def test_ten_kilobyte_passwords() -> None:
    big = "x" * 10240
    check_md5("alice", big, SALT, md5_response("alice", big, SALT))
    check_cleartext("alice", big, big.encode() + b"\0")
    with pytest.raises(PasswordFailed):
        check_md5("alice", "pw", SALT, md5_response("alice", big, SALT))
    with pytest.raises(PasswordFailed):
        check_cleartext("alice", "pw", big.encode() + b"\0")
    # still below PostgreSQL's limit for an authentication message
    assert len(big) + 1 < MAX_AUTH_TOKEN_LENGTH


def test_cleartext_against_plaintext_and_md5_secrets() -> None:
    check_cleartext("bob", "s3cret", b"s3cret\0")
    check_cleartext("bob", md5_password_hash("bob", "s3cret"), b"s3cret\0")
    check_cleartext("bob", "pässword", "pässword".encode() + b"\0")
    for secret in ("s3cret", md5_password_hash("bob", "s3cret")):
        with pytest.raises(PasswordFailed):
            check_cleartext("bob", secret, b"s3cre\0")
    with pytest.raises(PasswordFailed, match="empty password"):
        check_cleartext("bob", "s3cret", b"\0")


def test_length_errors_match_postgresql() -> None:
    sasl = auth_message_length_error("carol", sasl=True)
    assert isinstance(sasl, PasswordFailed) and sasl.sqlstate == "28P01"
    assert sasl.message == 'password authentication failed for user "carol"'
    password = auth_message_length_error("carol", sasl=False)
    assert isinstance(password, ClientProtocolError) and password.silent


def test_unexpected_message_type() -> None:
    err = unexpected_auth_message(ord("Q"), sasl=True)
    assert err.sqlstate == "08P01"
    assert err.message == "expected SASL response, got message type 81"
    assert unexpected_auth_message(81, sasl=False).message == (
        "expected password response, got message type 81")
