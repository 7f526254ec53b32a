"""pgcorral as a SCRAM-SHA-256 CLIENT of PostgreSQL (``ScramClient``), and the observer of a
relayed client/server exchange (``ScramPassThrough``).

``ScramClient`` logs in with the password, or with ``ScramKeys`` (a ClientKey and ServerKey)
recovered from a client's proof by ``ScramServer`` or ``ScramPassThrough``. A ClientKey only
works against the verifier it was derived with: ``handle_continue`` checks that the server's salt
and iteration count are that verifier's and raises AuthenticationError otherwise, so the caller
can fall back to relaying the client's own exchange (the role's password may have changed).
A malicious or broken server gets ServerProtocolError for malformed messages (bad base64, a
nonce that does not extend ours, iteration counts < 1 or above ``max_iterations``, which bounds
the PBKDF2 work a server can make us do) and AuthenticationError for a wrong signature.

Channel binding (SCRAM-SHA-256-PLUS)
------------------------------------
Given ``channel_binding`` (``scram.tls_server_end_point`` of the certificate PostgreSQL showed,
only when pgcorral's connection to it is TLS) and the server's offer (``initial(mechanisms)``),
``choose_mechanism`` picks as libpq does under ``binding_policy`` (libpq's ``channel_binding``):
PLUS when offered and not ``disable``; SCRAM-SHA-256 with the ``y`` flag when it could bind but
PLUS was not offered (PostgreSQL fails that exchange if it does support binding: a downgrade);
``n`` otherwise; ``require`` refuses anything but PLUS, and, like libpq at AuthenticationOk,
``handle_final`` and ``check_ok`` refuse a login that did not complete a channel-bound exchange.
The binding is what authenticates the server under ``require``: a man in the middle relaying
the exchange over its own TLS connection shows another certificate, and PostgreSQL then fails
the exchange (``SCRAM channel binding check failed``).

A relayed exchange (``ScramPassThrough``) cannot be channel-bound end to end, see its docstring.

What pass-through can and cannot learn
--------------------------------------
An exchange relayed between a real client and PostgreSQL shows: the salt and iteration count,
both nonces, the ClientProof and the ServerSignature. It does not reveal the ClientKey:
``ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)`` with ``StoredKey = H(ClientKey)``
has two unknowns, and solving it means inverting SHA-256. That is SCRAM's purpose (RFC 5802
section 9: impersonation needs the stored verifier *and* an exchange; an eavesdropper alone can
only try passwords offline). It does not reveal the ServerKey either: the signature proves the
server holds it without disclosing it.

So ``ScramPassThrough.recover`` needs the user's verifier (StoredKey and ServerKey), which
pgcorral gets as PgBouncer does: from its own files (a verifier stored in the vault) or from
PostgreSQL through an auth query (``SCRAM-SHA-256$...`` of ``pg_authid.rolpassword``, read by a
dedicated role with a SECURITY DEFINER function). With it, the ClientKey falls out of the
client's proof, and ``recover`` checks everything that can be checked: the server's signature
matches the verifier's ServerKey (so the verifier is the one PostgreSQL used), the salt and
iteration count match, and ``H(ClientKey) == StoredKey``. Then:

* later clients of that user are checked by ``ScramServer(user, verifier)``, which also signs
  as the server with the ServerKey;
* pgcorral logs in to PostgreSQL again with ``ScramClient.from_keys(keys)``.

Without a verifier there is no sound way to check a later client from what was relayed: its
proof can only be checked by PostgreSQL. Such a client must then be authenticated by relaying its
own exchange to PostgreSQL on a new connection (which is then closed or kept), never by trusting
the pooled one. Downgrading the client to a cleartext password would allow checking it against a
recorded exchange (a recorded transcript verifies a candidate password), and is rejected: it
exposes the password and clients may refuse it.

Nothing here does I/O or keeps time.
"""

from __future__ import annotations

import hmac
import struct

from pgcorral.errors import AuthenticationError, ServerProtocolError
from pgcorral.protocol import codes
from pgcorral.protocol.scram import (
    GS2_HEADER_PLUS,
    KEY_LENGTH,
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    AttributeReader,
    ScramKeys,
    ScramVerifier,
    auth_message,
    b64decode,
    b64encode,
    hmac_sha256,
    is_printable,
    new_nonce,
    sha256,
    xor,
)

_I32 = struct.Struct("!i")

#: The largest iteration count pgcorral accepts from a server (PBKDF2 at 1M iterations takes
#: about a second here). PostgreSQL's default is 4096.
MAX_ITERATIONS = 1_000_000


def _bad_server(detail: str) -> ServerProtocolError:
    return ServerProtocolError(f"malformed SCRAM message from server ({detail})")


def sasl_mechanisms(body: bytes) -> list[str]:
    """The mechanisms of an AuthenticationSASL body (``Int32 10``, names, empty name)."""
    if len(body) < 5 or _I32.unpack_from(body, 0)[0] != codes.AUTH_SASL or body[-1:] != b"\0":
        raise ServerProtocolError("malformed AuthenticationSASL message")
    names = body[4:-1].split(b"\0")
    if names[-1] != b"" or any(not name for name in names[:-1]):
        raise ServerProtocolError("malformed AuthenticationSASL message")
    return [name.decode("ascii", "replace") for name in names[:-1]]


def without_channel_binding(body: bytes) -> bytes:
    """An AuthenticationSASL body with the -PLUS mechanisms left out (what a relayed exchange
    can use: a client cannot bind to a TLS connection it is not an end of)."""
    names = [name for name in sasl_mechanisms(body) if not name.endswith("-PLUS")]
    return _I32.pack(codes.AUTH_SASL) + b"".join(n.encode() + b"\0" for n in names) + b"\0"


def _sasl_data(body: bytes, code: int, what: str) -> bytes:
    if len(body) < 4 or _I32.unpack_from(body, 0)[0] != code:
        raise ServerProtocolError(f"expected {what}")
    return body[4:]


def _escape_user(user: str) -> bytes:
    return user.encode("utf-8", "surrogatepass").replace(b"=", b"=3D").replace(b",", b"=2C")


#: binding_policy values (libpq's channel_binding), with the config's spelling "disabled".
_POLICIES = {"disable": "disable", "disabled": "disable", "prefer": "prefer",
             "require": "require"}


def _normalize_policy(policy: str) -> str:
    """``disable``, ``prefer`` or ``require`` (``disabled`` is ``disable``); ValueError else."""
    try:
        return _POLICIES[policy]
    except KeyError:
        raise ValueError(f"invalid channel binding policy {policy!r} "
                         "(disable, prefer or require)") from None


def choose_mechanism(offered: list[str], channel_binding: bytes | None,
                     policy: str) -> tuple[str, bytes]:
    """The SASL mechanism and gs2-header to answer an AuthenticationSASL offer with, by
    libpq's rules (``pg_SASL_init`` and ``build_client_first_message``).

    ``channel_binding`` None means the connection is not TLS. Errors carry libpq's texts. The
    refusals of the policy are AuthenticationError (28000): PostgreSQL behaved correctly, it is
    pgcorral's configuration that forbids logging in this way (libpq has no SQLSTATE for them;
    08P01 would blame the server for a protocol violation it did not commit). An offer of PLUS
    on a connection without TLS is ServerProtocolError (08P01): no PostgreSQL server does that,
    so something in between stripped TLS (libpq fails it whatever the policy)."""
    policy = _normalize_policy(policy)
    if policy == "require" and channel_binding is None:
        raise AuthenticationError("channel binding required, but SSL not in use")
    selected: str | None = None
    for name in offered:
        if name == SCRAM_SHA_256_PLUS:
            if channel_binding is None:
                raise ServerProtocolError("server offered SCRAM-SHA-256-PLUS authentication "
                                          "over a non-SSL connection")
            if policy != "disable":
                selected = SCRAM_SHA_256_PLUS
        elif name == SCRAM_SHA_256 and selected is None:
            selected = SCRAM_SHA_256
    if selected is None:
        raise AuthenticationError("none of the server's SASL authentication mechanisms are "
                                  "supported")
    if policy == "require" and selected != SCRAM_SHA_256_PLUS:
        raise AuthenticationError("channel binding is required, but server did not offer an "
                                  "authentication method that supports channel binding")
    if selected == SCRAM_SHA_256_PLUS:
        return selected, GS2_HEADER_PLUS
    if channel_binding is not None and policy != "disable":
        return selected, b"y,,"  # we could bind, but the server does not offer it
    return selected, b"n,,"


class ScramClient:
    """One SCRAM-SHA-256(-PLUS) login to PostgreSQL.

    ``initial(mechanisms)`` gives the SASLInitialResponse body (``mechanisms``: the server's
    offer, ``sasl_mechanisms(body)``), ``handle_continue(body)`` takes the body of
    AuthenticationSASLContinue (``Int32 11`` + server-first) and gives the SASLResponse body,
    ``handle_final(body)`` takes the body of AuthenticationSASLFinal (``Int32 12`` +
    server-final); ``check_ok()`` when AuthenticationOk arrives. Frame the bodies with
    ``messages.message(b"p", ...)``.

    ``channel_binding``: ``scram.tls_server_end_point`` of PostgreSQL's certificate, given
    exactly when the connection is TLS; ``binding_policy``: ``disable``, ``prefer`` (default) or
    ``require`` (see the module docstring).
    """

    __slots__ = ("_auth_message", "_binding", "_client_first_bare", "_finished", "_gs2",
                 "_keys", "_mechanism", "_nonce", "_password", "_policy", "_step",
                 "max_iterations")

    def __init__(self, password: str | None = None, *, keys: ScramKeys | None = None,
                 user: str = "", client_nonce: bytes | None = None,
                 max_iterations: int = MAX_ITERATIONS, channel_binding: bytes | None = None,
                 binding_policy: str = "prefer") -> None:
        if (password is None) == (keys is None):
            raise ValueError("give either a password or keys")
        if client_nonce is not None and (not client_nonce or not is_printable(client_nonce)):
            raise ValueError("the client nonce must be printable and contain no comma")
        if channel_binding is not None and not channel_binding:
            raise ValueError("channel binding data must not be empty")
        self._policy = _normalize_policy(binding_policy)
        self._binding = channel_binding
        self._mechanism: str | None = None
        self._gs2 = b"n,,"
        self._finished = False
        self._password = password
        self._keys = keys
        self._nonce = client_nonce if client_nonce is not None else new_nonce()
        # libpq sends an empty user name: PostgreSQL takes the user from the startup packet
        self._client_first_bare = b"n=" + _escape_user(user) + b",r=" + self._nonce
        self._auth_message = b""
        self._step = 0
        self.max_iterations = max_iterations

    @classmethod
    def from_password(cls, password: str, *, user: str = "", client_nonce: bytes | None = None,
                      max_iterations: int = MAX_ITERATIONS, channel_binding: bytes | None = None,
                      binding_policy: str = "prefer") -> ScramClient:
        return cls(password, user=user, client_nonce=client_nonce, max_iterations=max_iterations,
                   channel_binding=channel_binding, binding_policy=binding_policy)

    @classmethod
    def from_keys(cls, keys: ScramKeys, *, user: str = "", client_nonce: bytes | None = None,
                  channel_binding: bytes | None = None, binding_policy: str = "prefer",
                  ) -> ScramClient:
        """Log in with a ClientKey recovered earlier. ``keys.server_key`` None skips the check
        of the server's signature (the server is then not authenticated, except by the channel
        binding under ``require``)."""
        return cls(keys=keys, user=user, client_nonce=client_nonce,
                   channel_binding=channel_binding, binding_policy=binding_policy)

    @property
    def keys(self) -> ScramKeys | None:
        """The keys used (derived from the password once the salt is known)."""
        return self._keys

    @property
    def mechanism(self) -> str | None:
        """The mechanism chosen by ``initial``."""
        return self._mechanism

    @property
    def channel_bound(self) -> bool:
        """A SCRAM-SHA-256-PLUS exchange completed and the server's signature was checked
        (libpq's ``scram_channel_bound``; keys without a ServerKey never get there)."""
        return self._finished and self._mechanism == SCRAM_SHA_256_PLUS

    def initial(self, mechanisms: list[str] | None = None) -> bytes:
        """SASLInitialResponse body: mechanism, Int32 length, client-first-message.

        ``mechanisms``: the server's offer (``sasl_mechanisms`` of AuthenticationSASL). Without
        it, SCRAM-SHA-256 is assumed to be offered, which is only right without TLS: with
        ``channel_binding`` it is required (ValueError), since sending ``y`` to a server that
        offered PLUS fails the login. Raises choose_mechanism's errors."""
        if mechanisms is None:
            if self._binding is not None:
                raise ValueError("with channel binding data, pass the server's mechanisms")
            mechanisms = [SCRAM_SHA_256]
        self._advance(0)
        self._mechanism, self._gs2 = choose_mechanism(mechanisms, self._binding, self._policy)
        first = self._gs2 + self._client_first_bare
        return self._mechanism.encode() + b"\0" + _I32.pack(len(first)) + first

    def handle_continue(self, body: bytes) -> bytes:
        """AuthenticationSASLContinue body in, SASLResponse body (client-final) out."""
        self._advance(1)
        server_first = _sasl_data(body, codes.AUTH_SASL_CONTINUE, "AuthenticationSASLContinue")
        reader = AttributeReader(server_first, _bad_server)
        nonce = reader.expect("r")
        if (len(nonce) <= len(self._nonce) or not nonce.startswith(self._nonce)
                or not is_printable(nonce)):
            raise ServerProtocolError("invalid SCRAM response (nonce mismatch)")
        salt = b64decode(reader.expect("s"))
        if not salt:
            raise _bad_server("invalid salt")
        text = reader.expect("i")
        if not text.isdigit() or len(text) > 10 or not 1 <= int(text) <= self.max_iterations:
            raise _bad_server(f"invalid iteration count {text[:12]!r}")
        iterations = int(text)
        if not reader.at_end:
            raise _bad_server("garbage at end of server-first-message")
        keys = self._keys
        if keys is None:
            assert self._password is not None
            keys = self._keys = ScramKeys.from_password(self._password, salt, iterations)
        elif keys.salt != salt or keys.iterations != iterations:
            raise AuthenticationError(
                "the server's SCRAM salt or iteration count differ from the verifier the "
                "client key was recovered with (the password may have changed)")
        cbind_input = self._gs2
        if self._mechanism == SCRAM_SHA_256_PLUS:
            assert self._binding is not None
            cbind_input += self._binding
        without_proof = b"c=" + b64encode(cbind_input) + b",r=" + nonce
        self._auth_message = auth_message(self._client_first_bare, server_first, without_proof)
        signature = hmac_sha256(sha256(keys.client_key), self._auth_message)
        return without_proof + b",p=" + b64encode(xor(keys.client_key, signature))

    def handle_final(self, body: bytes) -> None:
        """Check AuthenticationSASLFinal's server signature (AuthenticationOk follows it)."""
        self._advance(2)
        data = _sasl_data(body, codes.AUTH_SASL_FINAL, "AuthenticationSASLFinal")
        if data.startswith(b"e="):
            raise ServerProtocolError("error received from server in SCRAM exchange: "
                                      + data[2:200].decode("ascii", "replace"))
        reader = AttributeReader(data, _bad_server)
        signature = b64decode(reader.expect("v"))
        if signature is None or len(signature) != KEY_LENGTH:
            raise _bad_server("malformed server signature")
        assert self._keys is not None
        server_key = self._keys.server_key
        if server_key is not None and not hmac.compare_digest(
                signature, hmac_sha256(server_key, self._auth_message)):
            raise AuthenticationError("incorrect server signature in SCRAM exchange")
        # without a ServerKey the server did not prove anything: not finished for check_ok
        self._finished = server_key is not None
        self.check_ok()

    def check_ok(self) -> None:
        """Call when AuthenticationOk arrives: under ``require``, raise AuthenticationError
        unless a channel-bound exchange completed (libpq's check: a server, or a man in the
        middle, may send AuthenticationOk without finishing the exchange)."""
        if self._policy == "require" and not self.channel_bound:
            raise AuthenticationError("channel binding required, but server authenticated "
                                      "client without channel binding")

    def _advance(self, step: int) -> None:
        if self._step != step:
            raise ServerProtocolError("unexpected SASL message from server")
        self._step = step + 1


class ScramPassThrough:
    """Watches a SCRAM exchange relayed between a client and PostgreSQL, without changing it.

    Feed it each message body as it is relayed: ``client_initial`` (SASLInitialResponse),
    ``server_continue`` (AuthenticationSASLContinue, ``Int32 11`` included),
    ``client_response`` (SASLResponse), ``server_final`` (AuthenticationSASLFinal). The feeding
    methods never raise: the relay goes on and PostgreSQL judges the client. Once the server has
    sent AuthenticationOk, ``recover(verifier)`` gives the client's ``ScramKeys`` (see the
    module docstring for why the verifier is needed).

    A relayed exchange cannot be channel-bound end to end: the client binds to the certificate
    it sees (pgcorral's), PostgreSQL checks the binding against its own, so a relayed
    SCRAM-SHA-256-PLUS exchange fails (``recover`` refuses one too). Only SCRAM-SHA-256 can be
    relayed, and to a PostgreSQL reached over TLS only with the ``n`` flag: PostgreSQL rejects
    ``y`` (what a TLS client that was not offered PLUS sends) as a downgrade.
    """

    __slots__ = ("_client_final", "_client_first", "_initial_seen", "_server_final",
                 "_server_first", "error")

    def __init__(self) -> None:
        self._initial_seen = False
        self._client_first: bytes | None = None
        self._server_first: bytes | None = None
        self._client_final: bytes | None = None
        self._server_final: bytes | None = None
        self.error: str | None = None

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    def client_initial(self, body: bytes) -> None:
        end = body.find(b"\0")
        if self._initial_seen or end < 0 or len(body) < end + 5:
            return self._fail("unexpected or malformed SASLInitialResponse")
        self._initial_seen = True
        if body[:end] != SCRAM_SHA_256.encode():
            return self._fail("the client chose another mechanism")
        (length,) = _I32.unpack_from(body, end + 1)
        if length != -1:
            self._client_first = body[end + 5:]

    def server_continue(self, body: bytes) -> None:
        if len(body) < 4 or _I32.unpack_from(body, 0)[0] != codes.AUTH_SASL_CONTINUE:
            return self._fail("malformed AuthenticationSASLContinue")
        if self._client_first is None and body == _I32.pack(codes.AUTH_SASL_CONTINUE):
            return None  # the empty challenge after an initial response without data
        if self._server_first is not None:
            return self._fail("a second server-first-message")
        self._server_first = body[4:]

    def client_response(self, body: bytes) -> None:
        if self._client_first is None and self._initial_seen:
            self._client_first = body
        elif self._server_first is not None and self._client_final is None:
            self._client_final = body
        else:
            self._fail("unexpected SASLResponse")

    def server_final(self, body: bytes) -> None:
        if len(body) < 4 or _I32.unpack_from(body, 0)[0] != codes.AUTH_SASL_FINAL:
            return self._fail("malformed AuthenticationSASLFinal")
        self._server_final = body[4:]

    @property
    def parameters(self) -> tuple[bytes, int] | None:
        """The server's (salt, iterations), once its first message was seen and parsed."""
        try:
            return self._parse_server_first()[1:]
        except AuthenticationError:
            return None

    def _parse_server_first(self) -> tuple[bytes, bytes, int]:
        if self._server_first is None:
            raise AuthenticationError("no server-first-message was relayed")
        reader = AttributeReader(self._server_first, _not_usable)
        nonce = reader.expect("r")
        salt = b64decode(reader.expect("s"))
        text = reader.expect("i")
        if not salt or not text.isdigit() or len(text) > 10:
            raise _not_usable("bad salt or iteration count")
        return nonce, salt, int(text)

    def recover(self, verifier: ScramVerifier) -> ScramKeys:
        """The client's keys, given the verifier PostgreSQL checked it against.

        Raises AuthenticationError when the exchange is incomplete or malformed, or when
        ``verifier`` is not the one PostgreSQL used (salt, iteration count or ServerKey
        differ)."""
        if self.error is not None:
            raise AuthenticationError(f"SCRAM exchange not usable: {self.error}")
        first, final, server_final = self._client_first, self._client_final, self._server_final
        if first is None or final is None or server_final is None:
            raise AuthenticationError("SCRAM exchange incomplete")
        nonce, salt, iterations = self._parse_server_first()
        if salt != verifier.salt or iterations != verifier.iterations:
            raise AuthenticationError("the verifier's salt or iteration count differ from "
                                      "the server's")
        parts = first.split(b",", 2)
        if len(parts) != 3:
            raise _not_usable("malformed client-first-message")
        bare = parts[2]
        reader = AttributeReader(bare, _not_usable)
        reader.expect("n")
        if not nonce.startswith(reader.expect("r")):
            raise _not_usable("nonce mismatch")
        cut = final.rfind(b",p=")
        proof = b64decode(final[cut + 3:]) if cut > 0 else None
        if proof is None or len(proof) != KEY_LENGTH:
            raise _not_usable("malformed client proof")
        reader = AttributeReader(final, _not_usable)
        reader.expect("c")
        if reader.expect("r") != nonce:
            raise _not_usable("nonce mismatch")
        signature = b64decode(AttributeReader(server_final, _not_usable).expect("v"))
        message = auth_message(bare, self._server_first or b"", final[:cut])
        if signature is None or not hmac.compare_digest(
                signature, hmac_sha256(verifier.server_key, message)):
            raise AuthenticationError("the server's signature does not match the verifier's "
                                      "ServerKey: PostgreSQL holds another verifier")
        client_key = xor(proof, hmac_sha256(verifier.stored_key, message))
        if not hmac.compare_digest(sha256(client_key), verifier.stored_key):
            raise AuthenticationError("the client's proof does not match the verifier")
        return ScramKeys(client_key, verifier.server_key, salt, iterations)


def _not_usable(detail: str) -> AuthenticationError:
    return AuthenticationError(f"SCRAM exchange not usable: {detail}")
