"""``ScramServer``: pgcorral checking a CLIENT's SCRAM-SHA-256 login, as PostgreSQL would.

Owns the server half of the SASL exchange (PostgreSQL's ``auth-sasl.c`` / ``auth-scram.c``):
the AuthenticationSASL offer, parsing SASLInitialResponse and SASLResponse bodies with
PostgreSQL's checks and messages, the proof check against a verifier's StoredKey, the server
signature from its ServerKey, and, after a good proof, the client's **ClientKey**
(``ClientProof XOR ClientSignature``), which lets pgcorral log in to PostgreSQL as that user
with ``ScramClient`` without ever knowing the password (PgBouncer's scheme; valid when
PostgreSQL holds the same verifier).

Channel binding (SCRAM-SHA-256-PLUS, ``tls-server-end-point``): given ``channel_binding``, the
``scram.tls_server_end_point`` data of pgcorral's own certificate (only on a TLS client
connection), the offer is SCRAM-SHA-256-PLUS then SCRAM-SHA-256, as PostgreSQL's. A client that
selects PLUS must send ``p=tls-server-end-point`` and, in client-final, ``c=`` = base64 of that
gs2-header and the binding data; one that selects SCRAM-SHA-256 may send ``n`` but not ``y``
(it could bind but believes the server cannot: a downgrade). Without ``channel_binding`` only
SCRAM-SHA-256 is offered and selecting PLUS is an invalid mechanism, as on a plain PostgreSQL
connection.

Errors (each an ``errors`` type with PostgreSQL's SQLSTATE and message):

* malformed input: ClientProtocolError 08P01 (``malformed SCRAM message`` with a detail,
  ``client selected an invalid SASL authentication mechanism``, ``insufficient data left in
  message``, ``invalid message format``, ``invalid SCRAM response`` for a nonce that does not
  match, which is also what a replayed client-final gets), 0A000 for authzid or mandatory
  extensions; for channel binding: ``malformed SCRAM message`` (PLUS without ``p``, ``p``
  without PLUS) and ``unsupported SCRAM channel-binding type "..."``;
* a downgrade (``y`` while PLUS was offered: ``SCRAM channel binding negotiation error``) or
  binding data that is not our certificate's (``SCRAM channel binding check failed``):
  AuthenticationError 28000 (ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION in PostgreSQL);
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

from pgcorral.errors import AuthenticationError, ClientProtocolError
from pgcorral.protocol import messages
from pgcorral.protocol.auth_md5 import MAX_AUTH_TOKEN_LENGTH, password_failed
from pgcorral.protocol.scram import (
    DEFAULT_ITERATIONS,
    DEFAULT_SALT_LENGTH,
    GS2_HEADER_PLUS,
    KEY_LENGTH,
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    TLS_SERVER_END_POINT,
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
    sanitize_str,
    sha256,
    xor,
)

_I32 = struct.Struct("!i")
_PLAIN_NAME = SCRAM_SHA_256.encode()
_PLUS_NAME = SCRAM_SHA_256_PLUS.encode()


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


_PLUS_WITHOUT_DATA = ("The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not "
                      "include channel binding data.")


class ScramServer:
    """One client's SCRAM-SHA-256 exchange, checked against a verifier.

    Drive it with ``start()``, ``handle_initial(body)``, then ``handle_response(body)`` for each
    SASLResponse until ``done``: each returns the complete wire messages to send. The usual
    exchange is start / handle_initial / handle_final (``handle_final`` is ``handle_response``
    that insists on the last step); a client that sends SASLInitialResponse without data
    (length -1) gets an empty challenge and sends its client-first in a SASLResponse.

    ``channel_binding``: the ``tls_server_end_point`` data of the certificate pgcorral showed
    this client; give it exactly when the client connection is TLS (see the module docstring).
    """

    __slots__ = ("_auth_message", "_binding", "_cbind", "_client_first_bare", "_client_key",
                 "_client_nonce", "_doomed", "_mechanism", "_plus", "_server_first",
                 "_server_nonce", "_state", "user", "verifier")

    def __init__(self, user: str, verifier: ScramVerifier, *, server_nonce: bytes | None = None,
                 doomed: bool = False, channel_binding: bytes | None = None) -> None:
        if server_nonce is not None and (not server_nonce or not is_printable(server_nonce)):
            raise ValueError("the server nonce must be printable and contain no comma")
        if channel_binding is not None and not channel_binding:
            raise ValueError("channel binding data must not be empty")
        self.user = user
        self.verifier = verifier
        self._server_nonce = server_nonce
        self._doomed = doomed
        self._binding = channel_binding
        self._mechanism: str | None = None
        self._plus = False  # the client selected SCRAM-SHA-256-PLUS
        self._state = _State.INITIAL
        self._cbind = b"n"
        self._client_nonce = b""
        self._client_first_bare = b""
        self._server_first = b""
        self._auth_message = b""
        self._client_key: bytes | None = None

    @classmethod
    def from_password(cls, user: str, password: str, *, salt: bytes | None = None,
                      iterations: int = DEFAULT_ITERATIONS, server_nonce: bytes | None = None,
                      channel_binding: bytes | None = None) -> ScramServer:
        """For a password pgcorral knows (the vault). Keep ``salt`` stable per user so the
        PBKDF2 cache serves every login after the first."""
        verifier = ScramVerifier.from_password(password, salt, iterations)
        return cls(user, verifier, server_nonce=server_nonce, channel_binding=channel_binding)

    @classmethod
    def mock(cls, user: str, secret: bytes, *, iterations: int = DEFAULT_ITERATIONS,
             server_nonce: bytes | None = None,
             channel_binding: bytes | None = None) -> ScramServer:
        """An exchange for a user pgcorral does not know: it looks like a real one (the salt
        is stable per user, derived from ``secret``, as PostgreSQL's ``scram_mock_salt``; the
        same mechanisms are offered and the channel binding is checked the same way) and ends
        with the same 28P01 as a wrong password, after the same work."""
        salt = sha256(secret + user.encode("utf-8", "surrogatepass"))[:DEFAULT_SALT_LENGTH]
        keys = os.urandom(2 * KEY_LENGTH)
        verifier = ScramVerifier(iterations, salt, keys[:KEY_LENGTH], keys[KEY_LENGTH:])
        return cls(user, verifier, server_nonce=server_nonce, doomed=True,
                   channel_binding=channel_binding)

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

    @property
    def mechanisms(self) -> list[str]:
        """What ``start`` offers, best first (PostgreSQL's order)."""
        if self._binding is not None:
            return [SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        return [SCRAM_SHA_256]

    @property
    def mechanism(self) -> str | None:
        """The mechanism the client selected, once ``handle_initial`` accepted its choice."""
        return self._mechanism

    @property
    def channel_bound(self) -> bool:
        """The client proved its password in a SCRAM-SHA-256-PLUS exchange whose binding data
        matched our certificate (``done`` with PLUS)."""
        return self._plus and self._state is _State.DONE

    # --- the exchange ---

    def start(self) -> bytes:
        """AuthenticationSASL offering ``mechanisms``."""
        return messages.authentication_sasl(self.mechanisms)

    def handle_initial(self, body: bytes) -> bytes:
        """Consume a SASLInitialResponse body; return AuthenticationSASLContinue."""
        self._expect(_State.INITIAL)
        with self._failing():
            self._check_length(body)
            end = body.find(b"\0")
            if end < 0:
                raise _error("invalid string in message")
            mechanism = body[:end]
            if mechanism == _PLUS_NAME and self._binding is not None:
                self._plus = True
            elif mechanism != _PLAIN_NAME:
                # PLUS without TLS was not offered: as any other unknown mechanism
                raise _error("client selected an invalid SASL authentication mechanism")
            self._mechanism = SCRAM_SHA_256_PLUS if self._plus else SCRAM_SHA_256
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

    def _gs2_flag(self, data: bytes) -> int:
        """Check the gs2-cbind-flag as PostgreSQL's ``read_client_first_message`` does, in its
        order; return the position after it and its comma."""
        flag = data[:1]
        if flag in (b"n", b"y"):
            if self._plus:
                raise _malformed(_PLUS_WITHOUT_DATA)
            if flag == b"y" and self._binding is not None:
                raise AuthenticationError(
                    "SCRAM channel binding negotiation error",
                    detail="The client supports SCRAM channel binding but thinks the server "
                           "does not.  However, this server does support channel binding.")
            if data[1:2] != b",":
                c = data[1] if len(data) > 1 else None
                raise _malformed(f"Comma expected, but found character {sanitize_char(c)}.")
            return 2
        if flag == b"p":
            if not self._plus:
                raise _malformed("The client selected SCRAM-SHA-256 without channel binding, "
                                 "but the SCRAM message includes channel binding data.")
            reader = AttributeReader(data, _malformed)
            name = reader.expect("p")
            if name != TLS_SERVER_END_POINT.encode():
                raise _error(f'unsupported SCRAM channel-binding type "{sanitize_str(name)}"')
            return reader.pos
        raise _malformed(f"Unexpected channel-binding flag {sanitize_char(data[0])}.")

    def _client_first(self, data: bytes) -> bytes:
        self._check_text(data)
        pos = self._gs2_flag(data)
        if data[pos:pos + 1] == b"a":
            raise _error("client uses authorization identity, but it is not supported",
                         sqlstate="0A000")
        if data[pos:pos + 1] != b",":
            c = data[pos] if len(data) > pos else None
            raise _malformed(f"Unexpected attribute {sanitize_char(c)} in "
                             "client-first-message.")
        bare = data[pos + 1:]
        reader = AttributeReader(bare, _malformed)
        if reader.peek() == ord("m"):
            raise _error("client requires an unsupported SCRAM extension", sqlstate="0A000")
        reader.expect("n")  # ignored, as PostgreSQL does: the startup user is the user
        nonce = reader.expect("r")
        if not is_printable(nonce):
            raise _error("non-printable characters in SCRAM nonce")
        while not reader.at_end:  # optional extensions, ignored
            reader.any()
        self._cbind = data[:1]
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
        if self._plus:
            assert self._binding is not None
            # the base64 text is compared, as PostgreSQL does (so only the canonical encoding
            # of exactly the gs2-header and our certificate's hash passes)
            if binding != b64encode(GS2_HEADER_PLUS + self._binding):
                raise AuthenticationError("SCRAM channel binding check failed")
        elif binding != (b"biws" if self._cbind == b"n" else b"eSws"):  # "n,," / "y,,"
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
            if not isinstance(exc, ClientProtocolError | AuthenticationError):
                # a parsing bug must not surface as anything but a protocol error
                raise _error("malformed SCRAM message") from exc
