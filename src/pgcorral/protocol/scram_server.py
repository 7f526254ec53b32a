"""``ScramServer``: pgcorral checking a CLIENT's SCRAM-SHA-256 login, as PostgreSQL would.

Owns the server half of the SASL exchange (PostgreSQL's ``auth-sasl.c`` / ``auth-scram.c``):
the AuthenticationSASL offer (SCRAM-SHA-256 only: pgcorral offers no channel binding), parsing
SASLInitialResponse and SASLResponse bodies with PostgreSQL's checks and messages, the
proof check against a verifier's StoredKey, the server signature from its ServerKey, and, after a
good proof, the client's **ClientKey** (``ClientProof XOR ClientSignature``), which lets pgcorral
log in to PostgreSQL as that user with ``ScramClient`` without ever knowing the password
(PgBouncer's scheme; valid when PostgreSQL holds the same verifier).

Errors (each an ``errors`` type with PostgreSQL's SQLSTATE and message):

* malformed input: ClientProtocolError 08P01 (``malformed SCRAM message`` with a detail,
  ``client selected an invalid SASL authentication mechanism``, ``insufficient data left in
  message``, ``invalid message format``, ``invalid SCRAM response`` for a nonce that does not
  match, which is also what a replayed client-final gets), 0A000 for authzid or mandatory
  extensions;
* a wrong proof, or a ``mock`` exchange (unknown user): PasswordFailed 28P01
  ``password authentication failed for user "..."``.

A SASL message longer than ``auth_md5.MAX_AUTH_TOKEN_LENGTH`` gets 28P01, as in PostgreSQL (the
framing layer should call ``auth_md5.auth_message_length_error`` for the length field itself).
Once an error is raised the exchange is over: every later call raises ClientProtocolError.

Nothing here does I/O or keeps time.
"""

from __future__ import annotations

import hmac
import os
import struct
from enum import Enum

from pgcorral.errors import ClientProtocolError, PasswordFailed
from pgcorral.protocol import messages
from pgcorral.protocol.auth_md5 import MAX_AUTH_TOKEN_LENGTH, password_failed
from pgcorral.protocol.scram import (
    DEFAULT_ITERATIONS,
    DEFAULT_SALT_LENGTH,
    KEY_LENGTH,
    SCRAM_SHA_256,
    AttributeReader,
    ScramKeys,
    ScramVerifier,
    auth_message,
    b64decode,
    b64encode,
    hmac_sha256,
    is_printable,
    new_nonce,
    sanitize_char,
    sha256,
    xor,
)

_I32 = struct.Struct("!i")


class _State(Enum):
    INITIAL = "expects SASLInitialResponse"
    CLIENT_FIRST = "expects client-first-message in a SASLResponse"
    CLIENT_FINAL = "expects client-final-message"
    DONE = "succeeded"
    FAILED = "failed"


def _error(message: str, detail: str | None = None, sqlstate: str | None = None,
           ) -> ClientProtocolError:
    err = ClientProtocolError(message, sqlstate=sqlstate)
    err.detail = detail
    return err


def _malformed(detail: str) -> ClientProtocolError:
    return _error("malformed SCRAM message", detail)


class ScramServer:
    """One client's SCRAM-SHA-256 exchange, checked against a verifier.

    Drive it with ``start()``, ``handle_initial(body)``, then ``handle_response(body)`` for each
    SASLResponse until ``done``: each returns the complete wire messages to send. The usual
    exchange is start / handle_initial / handle_final (``handle_final`` is ``handle_response``
    that insists on the last step); a client that sends SASLInitialResponse without data
    (length -1) gets an empty challenge and sends its client-first in a SASLResponse.
    """

    __slots__ = ("_auth_message", "_cbind", "_client_first_bare", "_client_key",
                 "_client_nonce", "_doomed", "_server_first", "_server_nonce", "_state",
                 "user", "verifier")

    def __init__(self, user: str, verifier: ScramVerifier, *, server_nonce: bytes | None = None,
                 doomed: bool = False) -> None:
        if server_nonce is not None and (not server_nonce or not is_printable(server_nonce)):
            raise ValueError("the server nonce must be printable and contain no comma")
        self.user = user
        self.verifier = verifier
        self._server_nonce = server_nonce
        self._doomed = doomed
        self._state = _State.INITIAL
        self._cbind = b"n"
        self._client_nonce = b""
        self._client_first_bare = b""
        self._server_first = b""
        self._auth_message = b""
        self._client_key: bytes | None = None

    @classmethod
    def from_password(cls, user: str, password: str, *, salt: bytes | None = None,
                      iterations: int = DEFAULT_ITERATIONS,
                      server_nonce: bytes | None = None) -> ScramServer:
        """For a password pgcorral knows (the vault). Keep ``salt`` stable per user so the
        PBKDF2 cache serves every login after the first."""
        verifier = ScramVerifier.from_password(password, salt, iterations)
        return cls(user, verifier, server_nonce=server_nonce)

    @classmethod
    def mock(cls, user: str, secret: bytes, *, iterations: int = DEFAULT_ITERATIONS,
             server_nonce: bytes | None = None) -> ScramServer:
        """An exchange for a user pgcorral does not know: it looks like a real one (the salt
        is stable per user, derived from ``secret``, as PostgreSQL's ``scram_mock_salt``) and
        ends with the same 28P01 as a wrong password, after the same work."""
        salt = sha256(secret + user.encode("utf-8", "surrogatepass"))[:DEFAULT_SALT_LENGTH]
        keys = os.urandom(2 * KEY_LENGTH)
        verifier = ScramVerifier(iterations, salt, keys[:KEY_LENGTH], keys[KEY_LENGTH:])
        return cls(user, verifier, server_nonce=server_nonce, doomed=True)

    # --- results ---

    @property
    def done(self) -> bool:
        """The client proved it knows the password."""
        return self._state is _State.DONE

    @property
    def client_key(self) -> bytes | None:
        """The ClientKey recovered from the client's proof, once ``done``."""
        return self._client_key

    @property
    def keys(self) -> ScramKeys | None:
        """What ``ScramClient.from_keys`` needs to log in as this user, once ``done``."""
        if self._client_key is None:
            return None
        v = self.verifier
        return ScramKeys(self._client_key, v.server_key, v.salt, v.iterations)

    # --- the exchange ---

    def start(self) -> bytes:
        """AuthenticationSASL offering SCRAM-SHA-256."""
        return messages.authentication_sasl([SCRAM_SHA_256])

    def handle_initial(self, body: bytes) -> bytes:
        """Consume a SASLInitialResponse body; return AuthenticationSASLContinue."""
        self._expect(_State.INITIAL)
        with self._failing():
            self._check_length(body)
            end = body.find(b"\0")
            if end < 0:
                raise _error("invalid string in message")
            if body[:end] != SCRAM_SHA_256.encode():
                raise _error("client selected an invalid SASL authentication mechanism")
            pos = end + 1
            if len(body) - pos < 4:
                raise _error("insufficient data left in message")
            (length,) = _I32.unpack_from(body, pos)
            pos += 4
            if length == -1:
                data = None
            elif length < 0 or length > len(body) - pos:
                raise _error("insufficient data left in message")
            else:
                data = body[pos:pos + length]
                pos += length
            if pos != len(body):
                raise _error("invalid message format")
            if data is None:
                self._state = _State.CLIENT_FIRST
                return messages.authentication_sasl_continue(b"")
            return self._client_first(data)

    def handle_response(self, body: bytes) -> bytes:
        """Consume a SASLResponse body; return AuthenticationSASLContinue, or on success
        AuthenticationSASLFinal + AuthenticationOk."""
        if self._state is _State.CLIENT_FIRST:
            with self._failing():
                self._check_length(body)
                return self._client_first(body)
        return self.handle_final(body)

    def handle_final(self, body: bytes) -> bytes:
        """Consume the client-final SASLResponse body; return AuthenticationSASLFinal +
        AuthenticationOk, or raise PasswordFailed."""
        self._expect(_State.CLIENT_FINAL)
        with self._failing():
            self._check_length(body)
            self._check_text(body)
            proof = self._parse_client_final(body)
            signature = hmac_sha256(self.verifier.stored_key, self._auth_message)
            client_key = xor(proof, signature)
            good = hmac.compare_digest(sha256(client_key), self.verifier.stored_key)
            if not good or self._doomed:
                raise password_failed(self.user)
            self._client_key = client_key
            server_signature = hmac_sha256(self.verifier.server_key, self._auth_message)
            self._state = _State.DONE
            return (messages.authentication_sasl_final(b"v=" + b64encode(server_signature))
                    + messages.authentication_ok())

    # --- parsing ---

    def _client_first(self, data: bytes) -> bytes:
        self._check_text(data)
        flag = data[:1]
        if flag == b"p":
            raise _malformed("The client selected SCRAM-SHA-256 without channel binding, but "
                             "the SCRAM message includes channel binding data.")
        if flag not in (b"n", b"y"):
            raise _malformed(f"Unexpected channel-binding flag {sanitize_char(data[0])}.")
        if data[1:2] != b",":
            c = data[1] if len(data) > 1 else None
            raise _malformed(f"Comma expected, but found character {sanitize_char(c)}.")
        if data[2:3] == b"a":
            raise _error("client uses authorization identity, but it is not supported",
                         sqlstate="0A000")
        if data[2:3] != b",":
            c = data[2] if len(data) > 2 else None
            raise _malformed(f"Unexpected attribute {sanitize_char(c)} in "
                             "client-first-message.")
        bare = data[3:]
        reader = AttributeReader(bare, _malformed)
        if reader.peek() == ord("m"):
            raise _error("client requires an unsupported SCRAM extension", sqlstate="0A000")
        reader.expect("n")  # ignored, as PostgreSQL does: the startup user is the user
        nonce = reader.expect("r")
        if not is_printable(nonce):
            raise _error("non-printable characters in SCRAM nonce")
        while not reader.at_end:  # optional extensions, ignored
            reader.any()
        self._cbind = flag
        self._client_nonce = nonce
        self._client_first_bare = bare
        server_nonce = self._server_nonce if self._server_nonce is not None else new_nonce()
        v = self.verifier
        self._server_first = (b"r=" + nonce + server_nonce + b",s=" + b64encode(v.salt)
                              + b",i=" + str(v.iterations).encode())
        self._server_nonce = server_nonce
        self._state = _State.CLIENT_FINAL
        return messages.authentication_sasl_continue(self._server_first)

    def _parse_client_final(self, data: bytes) -> bytes:
        reader = AttributeReader(data, _malformed)
        binding = reader.expect("c")
        expected = b"biws" if self._cbind == b"n" else b"eSws"  # base64 of "n,," / "y,,"
        if binding != expected:
            raise _error("unexpected SCRAM channel-binding attribute in client-final-message")
        nonce = reader.expect("r")
        while True:
            start = reader.pos
            attr, value = reader.any()
            if attr == "p":
                break
        proof = b64decode(value)
        if proof is None or len(proof) != KEY_LENGTH:
            raise _malformed("Malformed proof in client-final-message.")
        if not reader.at_end:
            raise _malformed("Garbage found at the end of client-final-message.")
        if not hmac.compare_digest(nonce, self._client_nonce + (self._server_nonce or b"")):
            raise _error("invalid SCRAM response", "Nonce does not match.")
        self._auth_message = auth_message(self._client_first_bare, self._server_first,
                                          data[:start - 1])
        return proof

    def _check_length(self, body: bytes) -> None:
        if len(body) > MAX_AUTH_TOKEN_LENGTH:
            raise password_failed(self.user)

    @staticmethod
    def _check_text(data: bytes) -> None:
        if not data:
            raise _malformed("The message is empty.")
        if b"\0" in data:
            raise _malformed("Message length does not match input length.")

    def _expect(self, state: _State) -> None:
        if self._state is not state:
            current = self._state
            if current is not _State.DONE:
                self._state = _State.FAILED
            raise _error("unexpected SASL message", f"the exchange {current.value}")

    def _failing(self) -> _FailOnError:
        return _FailOnError(self)


class _FailOnError:
    """Marks the exchange failed when a step raises, so nothing can be retried on it."""

    __slots__ = ("server",)

    def __init__(self, server: ScramServer) -> None:
        self.server = server

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if isinstance(exc, Exception):
            self.server._state = _State.FAILED
            if not isinstance(exc, ClientProtocolError | PasswordFailed):
                # a parsing bug must not surface as anything but a protocol error
                raise _error("malformed SCRAM message") from exc
