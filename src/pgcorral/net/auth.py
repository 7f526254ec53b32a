"""Authentication driven over the network: pgcorral checking a client with a password it knows
(the vault), and pgcorral logging in to PostgreSQL with that password.

The exchanges themselves are the pure state machines of ``protocol.auth_md5``,
``protocol.scram_server`` and ``protocol.scram_client``; this module only moves their messages.
PBKDF2 for a password is computed once per (password, salt, iterations) in a worker thread, so a
first SCRAM login does not stall other clients' traffic; the salt pgcorral offers a user is
stable for the life of the process, so every later login of that user hits the cache. The
verifier built from it (StoredKey, ServerKey) is kept per (user, password) as well: a login
then costs the two HMACs of the proof and the signature, not SASLprep, PBKDF2 cache lookups and
two more HMACs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pgcorral.errors import AuthenticationError
from pgcorral.protocol import codes
from pgcorral.protocol import messages as msg
from pgcorral.protocol.auth_md5 import (
    check_cleartext,
    check_md5,
    is_md5_hash,
    md5_response,
    password_failed,
)
from pgcorral.protocol.scram import (
    DEFAULT_ITERATIONS,
    DEFAULT_SALT_LENGTH,
    ScramKeys,
    ScramVerifier,
    is_derived,
    is_scram_verifier,
    salted_password,
    sha256,
)
from pgcorral.protocol.scram_client import ScramClient, sasl_mechanisms
from pgcorral.protocol.scram_server import ScramServer

if TYPE_CHECKING:
    from pgcorral.net.client import ClientConnection

#: A per-process secret: the salts offered to clients and the mock salts of unknown users.
_PROCESS_SECRET = os.urandom(32)
_AUTH_OK = msg.authentication_ok()
#: Bound of the per-worker verifier cache (cleared when full; a miss costs no PBKDF2, only the
#: keys from the cached SaltedPassword).
VERIFIER_CACHE_LIMIT = 4096
#: (user, vault password) -> the verifier pgcorral checks that user's SCRAM logins against. The
#: password is part of the key, so a reload that changes it never meets a stale verifier.
_verifiers: dict[tuple[str, str], ScramVerifier] = {}

ReadAnswer = Callable[[], Awaitable[bytes]]


def user_salt(user: str) -> bytes:
    """The SCRAM salt pgcorral offers ``user``: stable in this process, unknown outside it."""
    return sha256(_PROCESS_SECRET + user.encode("utf-8", "surrogateescape"))[
        :DEFAULT_SALT_LENGTH]


async def authenticate_client(client: ClientConnection, method: str, user: str,
                              password: str | None) -> None:
    """Check ``client`` with ``method`` against ``password``; None means an unknown user, who
    goes through the same exchange and fails with the same 28P01 at the same step."""
    read: ReadAnswer = client.read_password
    if method == "password":
        client.write(msg.authentication_cleartext())
        body = await read()
        if password is None:
            raise password_failed(user)
        check_cleartext(user, password, body)
    elif method == "md5":
        salt = os.urandom(4)
        client.write(msg.authentication_md5(salt))
        body = await read()
        if password is None:
            raise password_failed(user)
        check_md5(user, password, salt, body)
    else:  # scram-sha-256
        await _scram(client, user, password)


async def _scram(client: ClientConnection, user: str, password: str | None) -> None:
    """SCRAM against a vault password (PBKDF2 in a worker thread the first time), or a mock
    exchange for an unknown user (``password`` None) that ends in 28P01."""
    cbind = client.cbind  # TLS: SCRAM-SHA-256-PLUS is offered too
    if password is None:
        server = ScramServer.mock(user, _PROCESS_SECRET, channel_binding=cbind)
    else:
        verifier = _verifiers.get((user, password))
        if verifier is None:
            verifier = await vault_verifier(user, password)
        server = ScramServer(user, verifier, channel_binding=cbind)
    await _run_scram(client, server)


async def vault_verifier(user: str, password: str) -> ScramVerifier:
    """The verifier of a vault password with the salt offered to ``user`` (PBKDF2 in a worker
    thread the first time), kept for the next login."""
    salt = user_salt(user)
    if not is_derived(password, salt, DEFAULT_ITERATIONS):
        await asyncio.to_thread(salted_password, password, salt, DEFAULT_ITERATIONS)
    verifier = ScramVerifier.from_password(password, salt, DEFAULT_ITERATIONS)
    if len(_verifiers) >= VERIFIER_CACHE_LIMIT:
        _verifiers.clear()
    _verifiers[(user, password)] = verifier
    return verifier


async def _run_scram(client: ClientConnection, server: ScramServer) -> None:
    """Drive ``server`` over ``client`` to the end (raises on a bad or failed exchange)."""
    read = _sasl_reader(client)
    client.write(server.start())
    client.write(server.handle_initial(await read()))
    final = server.handle_response(await read())
    while not server.done:  # the client sent an empty initial response: one more round
        client.write(final)
        final = server.handle_response(await read())
    if final.endswith(_AUTH_OK):  # the greeting sends AuthenticationOk itself
        final = final[:-len(_AUTH_OK)]
    client.hold(final)  # AuthenticationSASLFinal goes out with the greeting: one write


async def authenticate_with_verifier(client: ClientConnection, user: str, secret: str | None,
                                     method: str) -> VaultLogin:
    """auth_query: check ``client`` against the secret PostgreSQL stores for ``user`` (a SCRAM
    verifier or an md5 hash; None for an unknown user) and return how to log in as that user:
    with the ClientKey recovered from the client's proof, or with the md5 hash. As in
    PostgreSQL, a SCRAM verifier means SCRAM whatever ``method`` says, and an md5 hash cannot
    serve ``scram-sha-256``."""
    if secret is not None and is_scram_verifier(secret):
        server = ScramServer(user, ScramVerifier.parse(secret), channel_binding=client.cbind)
        await _run_scram(client, server)
        assert server.keys is not None
        return VaultLogin(user, keys=server.keys)
    if secret is not None and is_md5_hash(secret) and method != "scram-sha-256":
        salt = os.urandom(4)
        client.write(msg.authentication_md5(salt))
        check_md5(user, secret, salt, await client.read_password())
        return VaultLogin(user, secret)
    await _scram(client, user, None)  # unknown user (or no usable secret): 28P01
    raise password_failed(user)


def _sasl_reader(client: ClientConnection) -> ReadAnswer:
    async def read() -> bytes:
        return await client.read_password(sasl=True)

    return read


class VaultLogin:
    """Answers PostgreSQL's authentication requests with what pgcorral knows of a user: a
    password from the vault, an md5 hash (auth_query), or SCRAM keys recovered from a client's
    proof (auth_query). Never pass-through: connections logged in this way are pooled."""

    pass_through = False

    def __init__(self, user: str, password: str | None = None, *,
                 keys: ScramKeys | None = None) -> None:
        self.user = user
        self.password = password
        self.keys = keys
        self._scram: ScramClient | None = None
        # of the server connection logging in now (``bind``): SCRAM-SHA-256-PLUS over TLS
        self._cbind: bytes | None = None
        self._policy = "prefer"

    def bind(self, cbind: bytes | None, policy: str) -> None:
        """Before a login: the tls-server-end-point data of the server connection (None
        without TLS) and its section's ``channel_binding``."""
        self._cbind = cbind
        self._policy = policy
        self._scram = None

    def authenticated(self) -> None:
        """AuthenticationOk arrived: under ``channel_binding = require`` the server must have
        finished a channel-bound SCRAM exchange (libpq's check)."""
        if self._scram is not None:
            self._scram.check_ok()
        elif self._policy == "require":
            raise AuthenticationError("channel binding required, but server authenticated "
                                      "client without channel binding")

    async def __call__(self, request: bytes) -> bytes:
        code = msg.parse_auth_code(request)
        password = self.password
        if self._policy == "require" and code in (codes.AUTH_CLEARTEXT_PASSWORD,
                                                  codes.AUTH_MD5_PASSWORD):
            # libpq: no password (or hash of it) for a server that cannot prove it holds the
            # channel's certificate
            raise AuthenticationError("channel binding required but not supported by server's "
                                      "authentication request")
        if code == codes.AUTH_CLEARTEXT_PASSWORD and password is not None:
            return password.encode("utf-8") + b"\0"
        if code == codes.AUTH_MD5_PASSWORD and password is not None:
            return md5_response(self.user, password, request[4:8])
        if code == codes.AUTH_SASL and (password is not None or self.keys is not None):
            cbind, policy = self._cbind, self._policy
            self._scram = (
                ScramClient.from_keys(self.keys, channel_binding=cbind, binding_policy=policy)
                if self.keys is not None else
                ScramClient.from_password(password or "", channel_binding=cbind,
                                          binding_policy=policy))
            return self._scram.initial(sasl_mechanisms(request))
        if self._scram is not None and code == codes.AUTH_SASL_CONTINUE:
            return await asyncio.to_thread(self._scram.handle_continue, request)
        if self._scram is not None and code == codes.AUTH_SASL_FINAL:
            self._scram.handle_final(request)
            return b""
        raise AuthenticationError(f"authentication method {code} requested by the server is "
                                  "not supported by pgcorral")
