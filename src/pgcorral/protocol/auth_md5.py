"""Password authentication messages: cleartext and md5, and the limits every auth message shares.

Owns: the md5 hashing PostgreSQL uses (``"md5" + md5(password + user)``, then salted with the
4-byte salt of AuthenticationMD5Password), parsing a PasswordMessage the way PostgreSQL's
``recv_password_packet`` does, checking a client's answer against a stored secret (plaintext or
md5 hash) in constant time, and the errors PostgreSQL gives for bad authentication messages.

SCRAM lives in ``scram.py`` / ``scram_server.py`` / ``scram_client.py``. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import hmac

from pgcorral.errors import ClientProtocolError, PasswordFailed, PgCorralError

#: PostgreSQL's ``PG_MAX_AUTH_TOKEN_LENGTH``: the largest PasswordMessage / SASL message body it
#: reads during authentication. A longer SASL message fails as a wrong password (28P01); a longer
#: password message closes the connection silently (``recv_password_packet`` returns EOF).
MAX_AUTH_TOKEN_LENGTH = 65535

_MD5_PREFIX = "md5"
_MD5_HEX = frozenset("0123456789abcdef")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that surrogateescape did not produce
        return text.encode("utf-8", "surrogatepass")


def password_failed(user: str) -> PasswordFailed:
    """PostgreSQL's answer to any wrong password, whatever the method (28P01)."""
    return PasswordFailed(f'password authentication failed for user "{user}"')


def auth_message_length_error(user: str, *, sasl: bool) -> PgCorralError:
    """What PostgreSQL does with an auth message whose length field is < 4 or above
    ``MAX_AUTH_TOKEN_LENGTH``: 28P01 during SASL (``CheckSASLAuth`` returns STATUS_ERROR), a
    silent close for a password message (STATUS_EOF)."""
    if sasl:
        return password_failed(user)
    return ClientProtocolError("invalid message length during password authentication",
                               silent=True)


def unexpected_auth_message(type_: int, *, sasl: bool) -> ClientProtocolError:
    """A message other than 'p' where an authentication response was expected (08P01)."""
    what = "SASL" if sasl else "password"
    return ClientProtocolError(f"expected {what} response, got message type {type_}")


# --- md5 --------------------------------------------------------------------------------------

def is_md5_hash(secret: str) -> bool:
    """Is ``secret`` an md5 password hash as PostgreSQL stores it (``md5`` + 32 hex digits)?"""
    return (len(secret) == 35 and secret.startswith(_MD5_PREFIX)
            and _MD5_HEX.issuperset(secret[3:]))


def md5_password_hash(user: str, password: str) -> str:
    """``"md5" + hex(md5(password + user))``, what ``pg_authid.rolpassword`` holds for md5."""
    digest = hashlib.md5(_utf8(password) + _utf8(user), usedforsecurity=False).hexdigest()
    return _MD5_PREFIX + digest


def _salted(md5_hash: str, salt: bytes) -> bytes:
    digest = hashlib.md5(md5_hash[3:].encode("ascii") + salt, usedforsecurity=False)
    return b"md5" + digest.hexdigest().encode("ascii")


def md5_response(user: str, password_or_hash: str, salt: bytes) -> bytes:
    """The PasswordMessage payload (NUL included) answering AuthenticationMD5Password.

    ``password_or_hash`` may be the plaintext password or its md5 hash (as PostgreSQL, a
    password that looks like an md5 hash is taken as one)."""
    if len(salt) != 4:
        raise ValueError("md5 salt must be 4 bytes")
    stored = password_or_hash if is_md5_hash(password_or_hash) else md5_password_hash(
        user, password_or_hash)
    return _salted(stored, salt) + b"\0"


def parse_password_message(body: bytes) -> bytes:
    """The password of a PasswordMessage body, without its NUL, checked as PostgreSQL does.

    08P01 ``invalid password packet size`` when the body is not exactly one NUL-terminated
    string; 28P01 ``empty password returned by client`` for an empty one."""
    if not body or body.find(b"\0") != len(body) - 1:
        raise ClientProtocolError("invalid password packet size")
    if len(body) == 1:
        raise PasswordFailed("empty password returned by client")
    return body[:-1]


def md5_verify(user: str, secret: str, salt: bytes, response: bytes) -> bool:
    """Does ``response`` (the client's answer without its NUL) match ``secret`` (plaintext or
    md5 hash) for this ``salt``? Constant time in the compared bytes."""
    stored = secret if is_md5_hash(secret) else md5_password_hash(user, secret)
    return hmac.compare_digest(_salted(stored, salt), response)


def check_md5(user: str, secret: str, salt: bytes, body: bytes) -> None:
    """Check the PasswordMessage ``body`` answering AuthenticationMD5Password(``salt``).

    Raises ClientProtocolError (08P01) for a malformed message, PasswordFailed (28P01) for an
    empty or wrong password."""
    response = parse_password_message(body)
    if not md5_verify(user, secret, salt, response):
        raise password_failed(user)


def check_cleartext(user: str, secret: str, body: bytes) -> None:
    """Check the PasswordMessage ``body`` answering AuthenticationCleartextPassword against a
    plaintext or md5 ``secret`` (for a SCRAM verifier use ``scram.verify_plain_password``)."""
    given = parse_password_message(body)
    if is_md5_hash(secret):
        given_hash = md5_password_hash(user, given.decode("utf-8", "surrogateescape"))
        ok = hmac.compare_digest(given_hash.encode("ascii"), secret.encode("ascii"))
    else:
        ok = hmac.compare_digest(given, _utf8(secret))
    if not ok:
        raise password_failed(user)
