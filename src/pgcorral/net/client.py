"""Client connections: startup, hba, getting a server connection, the session, the release.

One coroutine (``ClientConnection.run``) per client walks the cold path: the startup packets,
the hba rule, a slot from the pool, the login of a new server connection (relaying the server's
authentication requests to the client) or the check of a reused one, the client's settings, the
greeting. Then the client and server are linked and ``data_received`` on both sides relays bytes
without a task switch until the client leaves; the coroutine then releases the server connection
through ``pipelines.session``.

Every PgCorralError that ends a client becomes one ErrorResponse here (``_fail``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from pgcorral.errors import (
    AuthenticationError,
    ClientProtocolError,
    NoHbaEntry,
    PasswordFailed,
    PgCorralError,
    PoolExhausted,
    ServerError,
    ServerProtocolError,
    ServerUnavailable,
    ShuttingDown,
    StartupRejected,
)
from pgcorral.net.auth import VaultLogin, authenticate_client, authenticate_with_verifier
from pgcorral.net.endpoint import ConnectionLost, Endpoint
from pgcorral.net.maintenance import VALIDATION_TIMEOUT
from pgcorral.pipelines import session
from pgcorral.pipelines.settings import learn, reported_requests
from pgcorral.pipelines.settings import plan as settings_plan
from pgcorral.pool.pool import Grant, Slot, Waiter
from pgcorral.protocol import codes
from pgcorral.protocol import messages as msg
from pgcorral.protocol.auth_md5 import MAX_AUTH_TOKEN_LENGTH, auth_message_length_error
from pgcorral.protocol.framing import TERMINATE_SPLIT, BoundaryTracker, FramingError, MessageReader
from pgcorral.protocol.startup import (
    NEWEST_MINOR,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    Startup,
    StartupReader,
    parse_options,
)
from pgcorral.security.hba import match_hba

if TYPE_CHECKING:
    from pgcorral.config import HbaRule
    from pgcorral.net.context import Context
    from pgcorral.net.server import ServerConnection

log = logging.getLogger("pgcorral.client")
_header_unpack_from = struct.Struct("!BI").unpack_from

#: Bound of the per-worker cache of hba decisions (cleared on reload and when full).
HBA_CACHE_LIMIT = 4096

#: Startup parameters that are not settings to apply on the server connection.
_NOT_SETTINGS = frozenset(["user", "database", "options", "replication"])
_AUTH_OK = msg.authentication_ok()


class ClientConnection(Endpoint):
    side = "client"

    def __init__(self, ctx: Context, conn_type: str) -> None:
        super().__init__()
        self.ctx = ctx
        self.conn_type = conn_type  # "host" (TCP) or "local" (unix socket)
        self.server: ServerConnection | None = None
        self.tracker = BoundaryTracker(ctx.config.main.max_packet_size)
        self.address: str | None = None
        self.user = ""
        self.database = ""
        self.dirty = False  # the server saw bytes that left it mid-message
        self.terminating = False  # Terminate received; waiting for the server to finish
        self.vault_login: VaultLogin | None = None  # set for users in the vault
        self.linked_once = False  # got a server connection (for log_disconnections)
        self.activity = 0  # chunks relayed from the client (disconnect_client samples it)
        self.seen_activity = (0, 0.0)  # (activity, when) at the last sample that saw a change
        self.settings: dict[str, str] = {}  # asked for at startup (options included)
        self.hba_rule: HbaRule | None = None
        self._rx = StartupReader()
        self._ended: asyncio.Future[str] | None = None
        self._grant: asyncio.Future[Grant] | None = None
        self._task: asyncio.Task[None] | None = None

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.conn_type == "host":
            peer = transport.get_extra_info("peername")
            self.address = peer[0] if peer else None
            if not self.ctx.config.main.nodelay:  # uvloop and asyncio set TCP_NODELAY
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        self.ctx.clients.add(self)
        self._task = loop.create_task(self.run())

    def data_received(self, data: bytes) -> None:
        server = self.server
        if server is not None:
            self.activity += 1  # for disconnect_client
            # Fast path: the chunk starts on a message boundary and holds whole messages, none
            # of them a Terminate (the usual case: one request). The tracker's state is then
            # unchanged; anything else goes through BoundaryTracker.feed.
            tracker = self.tracker
            if tracker.at_boundary:
                pos, n, limit = 0, len(data), tracker.max_length + 4
                while pos + 5 <= n:
                    type_, length = _header_unpack_from(data, pos)
                    if type_ == codes.TERMINATE or length < 4 or length > limit:
                        break
                    pos += 1 + length
                if pos == n:
                    server.status = -1
                    try:
                        server.transport.write(data)
                    except RuntimeError:  # the server's transport closed under us (uvloop)
                        self.end("server lost")
                    return
            try:
                at = tracker.feed(data)
            except FramingError as exc:
                self._protocol_violation(str(exc))
                return
            try:
                if at == -1:
                    server.status = -1
                    server.transport.write(data)
                    return
                if at > 0:
                    server.status = -1
                    server.transport.write(data[:at])
            except RuntimeError:  # the server's transport closed under us (uvloop raises)
                self.end("server lost")
                return
            if at == TERMINATE_SPLIT:
                self.dirty = True
            elif server.status == -1:
                # Requests sent just before the Terminate are still running: relay their
                # replies as PostgreSQL would, and release the server at its ReadyForQuery.
                self.terminating = True
                return
            self.end("terminate")
            return
        self.buffer(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.end("client lost")

    def shutdown_started(self) -> None:
        """Graceful shutdown began (the transaction pipeline closes clients between
        transactions; a session runs on until its client leaves)."""

    def server_lost(self) -> None:
        """The linked server connection broke or closed."""
        self.end("server lost")

    def end(self, reason: str) -> None:
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_result(reason)

    # --- the cold path -----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            startup = await self._startup()
            if startup is not None:
                await self._session(startup)
        except PgCorralError as exc:
            self._fail(exc)
        except (ConnectionLost, ConnectionError):
            pass
        except Exception:
            log.exception("internal error serving client %s", self.address or "[local]")
            self._fail(PgCorralError("internal error in pgcorral"))
        finally:
            self.ctx.clients.discard(self)
            self.close()
            if not self.ctx.clients:
                self.ctx.all_idle.set()
            if self.linked_once and self.ctx.config.main.log_disconnections:
                log.info("disconnection: user=%s database=%s host=%s", self.user,
                         self.database, self.address or "[local]")

    async def _startup(self) -> Startup | None:
        """Read startup packets until a StartupMessage, within authentication_timeout."""
        timeout = self.ctx.config.main.authentication_timeout
        timer = (asyncio.get_running_loop().call_later(timeout, self._startup_timed_out)
                 if timeout > 0 else None)
        encryption_requests = 0
        try:
            while True:
                packet = await self.read_packet()
                if isinstance(packet, (SSLRequest, GSSENCRequest)):
                    encryption_requests += 1
                    if encryption_requests > 2:
                        raise ClientProtocolError("too many encryption requests")
                    self.write(b"N")
                elif isinstance(packet, CancelRequest):
                    await self.ctx.forward_cancel(packet.pid, packet.secret)
                    return None
                else:
                    return packet
        finally:
            if timer is not None:
                timer.cancel()

    def _startup_timed_out(self) -> None:
        log.info("client %s did not finish startup in time", self.address or "[local]")
        self.abort()

    async def _session(self, startup: Startup) -> None:
        ctx = self.ctx
        if startup.needs_negotiation:
            self.write(msg.negotiate_protocol_version(NEWEST_MINOR, startup.unrecognized))
        # authentication messages: PostgreSQL reads up to PG_MAX_AUTH_TOKEN_LENGTH bytes
        self.use_reader(MessageReader(MAX_AUTH_TOKEN_LENGTH))
        self.user, self.database = startup.user, startup.database
        replication = startup.params.get("replication", "false").lower()
        if replication not in ("false", "off", "no", "0"):
            raise StartupRejected("replication connections are not supported by pgcorral",
                                  sqlstate="0A000")
        settings = self.settings = _client_settings(startup.params)
        rule = self.hba_rule = self._hba_rule()
        if ctx.shutting_down:
            raise ShuttingDown("pgcorral is shutting down")
        ctx.check_enabled(self.database)  # a disabled database: DatabaseDisabled 57P03
        await self._authenticate(rule)
        await self._login(settings, rule)

    async def _login(self, settings: dict[str, str], rule: HbaRule) -> None:
        """A server connection for the client, its startup settings applied, then the session."""
        ctx = self.ctx
        real_db = ctx.config.real_database(self.database)
        server = await self._get_server((real_db, self.user), rule)
        try:
            pairs = settings_plan(settings, server.params, server.baseline, server.names,
                                  ctx.learned)
            if pairs:
                error = await server.apply_settings(pairs)
                if error is not None:
                    error["S"] = error["V"] = "FATAL"
                    raise ServerError(error)
                learn(ctx.learned, pairs, server.params)
            # re-applied after the reset for the next client (ServerConnection.reset)
            server.requests = reported_requests(settings, server.names)
        except BaseException:
            await self.release(server, clean=not server.closed)
            raise
        await self._link_and_serve(server)

    async def _authenticate(self, rule: HbaRule) -> None:
        """Users in the vault are checked by pgcorral itself (and logged in to PostgreSQL with
        the vault password); others go through to PostgreSQL, if allow_unknown_users."""
        secrets = self.ctx.secrets
        password = secrets.backend_password(self.user)
        method = "scram-sha-256" if rule.method == "all" else rule.method
        if password is not None:
            self.vault_login = VaultLogin(self.user, password)
            if method != "trust":
                await authenticate_client(self, method, self.user,
                                          secrets.client_password(self.user))
        elif (self.ctx.config.main.auth_query and secrets.superuser_login() is not None
              and method != "trust"):
            try:
                secret = await self.ctx.auth_query.fetch_secret(
                    self.ctx, self.ctx.config.real_database(self.database), self.user)
            except (ServerError, ServerUnavailable, ServerProtocolError, ConnectionLost,
                    TimeoutError, AuthenticationError) as exc:
                # the superuser's own trouble is for the log, not for the client
                log.error("auth_query for user %r failed: %s", self.user, exc)
                raise ServerUnavailable("authentication lookup failed") from None
            self.vault_login = await authenticate_with_verifier(self, self.user, secret,
                                                                rule.method)
        elif not self.ctx.config.main.allow_unknown_users and method != "trust":
            # the same exchange as for a known user, ending in the same 28P01
            await authenticate_client(self, method, self.user, None)

    def _hba_rule(self) -> HbaRule:
        ctx = self.ctx
        key = (self.conn_type, self.database, self.user, self.address)
        try:
            rule = ctx.hba_cache[key]
        except KeyError:
            rule = match_hba(ctx.config.hba, conn_type=self.conn_type, database=self.database,
                             user=self.user, address=self.address, aliases=ctx.aliases)
            if len(ctx.hba_cache) >= HBA_CACHE_LIMIT:
                ctx.hba_cache.clear()
            ctx.hba_cache[key] = rule
        if rule is not None and rule.method != "reject":
            return rule
        where = (f'host "{self.address or "[local]"}", user "{self.user}", '
                 f'database "{self.database}"')
        if rule is None:
            raise NoHbaEntry(f"no pgcorral_hba.conf entry for {where}")
        raise NoHbaEntry(f"pgcorral_hba.conf rejects connection for {where}")

    async def _get_server(self, key: tuple[str, str], rule: HbaRule) -> ServerConnection:
        """A logged-in server connection for ``key``: reused (client checked) or new."""
        ctx = self.ctx
        while True:
            grant = await self._acquire(key)
            if grant.victim is not None and grant.victim.conn is not None:
                victim = grant.victim.conn
                victim.terminate()
                await victim.wait_gone()  # PostgreSQL never holds both at once
            slot = grant.slot
            if grant.new:
                return await self._open(slot, key)
            server: ServerConnection = slot.conn
            server.idle = False
            if server.closed:
                ctx.pool.discard(slot)
                continue
            if ctx.config.main.validation == "foreground" and not await server.validate(
                    VALIDATION_TIMEOUT):
                ctx.release_server(server, clean=False)
                continue
            try:
                await self._check_reused(server, rule)
            except BaseException:
                ctx.release_server(server, clean=not server.closed)
                raise
            return server

    async def _acquire(self, key: tuple[str, str]) -> Grant:
        ctx = self.ctx
        main = ctx.config.main
        timeout = main.blocking_timeout
        if timeout <= 0:  # pgagroal: no blocking wait, max_retries tries spaced by the delay
            timeout = main.max_retries * main.connection_retry_delay
        granted: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self._grant = granted

        def exhausted() -> PoolExhausted:
            return PoolExhausted(
                f'connection pool is full: no server connection for user "{key[1]}", '
                f'database "{key[0]}" became free within {timeout:g} s')

        def expire() -> None:  # called by the worker's WaitTimer (net.waits)
            if isinstance(result, Waiter) and ctx.pool.cancel(result) and not granted.done():
                granted.set_exception(exhausted())

        result = ctx.pool.request(key, timeout, self._granted, expire)
        if isinstance(result, Grant):
            return result
        assert self._ended is not None
        log.debug("client %s waits for a server connection for %s@%s (%d waiting)",
                  self.address or "[local]", key[1], key[0], ctx.pool.waiting)
        if timeout > 0:
            ctx.waits.watch()
            waits: list[asyncio.Future[Any]] = [granted, self._ended]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not granted.done() and ctx.pool.cancel(result):
            if self._ended.done():
                raise ConnectionLost("client left while waiting")
            raise exhausted()
        grant = granted.result()
        if self._ended.done():  # served just as the client left: give it back untouched
            if grant.new:
                ctx.pool.discard(grant.slot)
            else:
                ctx.release_server(grant.slot.conn, clean=True)
            raise ConnectionLost("client left while waiting")
        return grant

    def _granted(self, grant: Grant) -> None:
        """The pool serves this client's Waiter (called synchronously by the pool)."""
        assert self._grant is not None
        self._grant.set_result(grant)

    async def _open(self, slot: Slot, key: tuple[str, str]) -> ServerConnection:
        ctx = self.ctx
        server: ServerConnection | None = None
        try:
            server = await ctx.open_server(slot)
            timeout = ctx.config.main.authentication_timeout or None
            async with asyncio.timeout(timeout):
                await server.login(key[1], key[0], self.vault_login or self._relay_auth)
        except BaseException as exc:
            if server is not None:
                server.poolable = False
                server.close()
            ctx.pool.discard(slot)
            if isinstance(exc, TimeoutError):
                raise ServerUnavailable("timeout while logging in to the server") from None
            if isinstance(exc, ConnectionLost) and self.closed:
                raise
            if isinstance(exc, ConnectionLost):
                raise ServerUnavailable("server closed the connection during login") from None
            raise
        ctx.pool.opened(slot)
        return server

    async def _relay_auth(self, request: bytes) -> bytes:
        """Pass-through: the server's Authentication request to the client, its answer back."""
        self.write(msg.message(b"R", request))
        code = msg.parse_auth_code(request)
        if code == codes.AUTH_SASL_FINAL:
            return b""
        return await self.read_password(sasl=code in (codes.AUTH_SASL, codes.AUTH_SASL_CONTINUE))

    async def read_password(self, sasl: bool = False) -> bytes:
        """The client's next authentication message ('p'), with PostgreSQL's answers to a bad
        length (28P01 in SASL, a silent close otherwise) and to any other message (08P01)."""
        timeout = self.ctx.config.main.authentication_timeout or None
        try:
            async with asyncio.timeout(timeout):
                type_, body = await self.read_message()
        except TimeoutError:
            raise AuthenticationError("canceling authentication due to timeout",
                                      sqlstate="08006") from None
        except ClientProtocolError:  # a length out of range
            raise auth_message_length_error(self.user, sasl=sasl) from None
        if type_ != codes.PASSWORD:
            raise ClientProtocolError(
                f"expected password response, got message type {type_}")
        return body

    async def _check_reused(self, server: ServerConnection, rule: HbaRule) -> None:
        """A reused pass-through connection: the client proves the password it logged in with."""
        memento = server.memento
        if (self.vault_login is not None or rule.method == "trust" or memento is None
                or memento[0] == "trust"):
            return
        if memento[0] == "password":
            self.write(msg.authentication_cleartext())
        elif memento[0] == "md5":
            self.write(msg.authentication_md5(memento[1][:4]))
        else:
            raise PasswordFailed(f'password authentication failed for user "{self.user}"')
        answer = await self.read_password()
        if not server.check_memento(answer):
            raise PasswordFailed(f'password authentication failed for user "{self.user}"')

    def _greet(self, params: bytes, pid: int, secret: int, status: int) -> bytes:
        """The login succeeded: log it, send AuthenticationOk, the ParameterStatus messages
        ``params``, BackendKeyData and ReadyForQuery. Returns what the client pipelined."""
        self.linked_once = True
        self.seen_activity = (self.activity, time.monotonic())
        if self.ctx.config.main.log_connections:
            log.info("connection authorized: user=%s database=%s host=%s", self.user,
                     self.database, self.address or "[local]")
        pipelined = self.take_buffered()
        self.write(_AUTH_OK + params + msg.backend_key_data(pid, secret)
                   + msg.ready_for_query(bytes([status])))
        return pipelined

    async def _link_and_serve(self, server: ServerConnection) -> None:
        ctx = self.ctx
        secret = ctx.cancels.issue(self, server.pid)
        status = server.status if server.status > 0 else codes.TX_IDLE
        pipelined = self._greet(server.greeting_params(), server.pid, secret, status)
        self.server = server
        self.peer = server
        server.peer = self
        if pipelined:
            self.data_received(pipelined)
        assert self._ended is not None
        reason = await self._ended
        ctx.cancels.drop(self, server.pid)
        if reason == "server lost":
            self.write(msg.error_response("08006", "server closed the connection unexpectedly"))
        await self.release(server, clean=True)

    async def release(self, server: ServerConnection, clean: bool) -> None:
        """Unlink ``server`` and return it to the pool (reset first), or close it."""
        self.server = None
        self.peer = None
        server.peer = None
        if session.reusable(clean, self.dirty, self.tracker.at_boundary, server.status,
                            server.poolable, server.closed):
            server.transport.resume_reading()  # the client may have left it paused
            clean = await server.reset(self.ctx.config.main.server_reset_query,
                                       session.RESET_TIMEOUT)
        else:
            clean = False
        self.ctx.release_server(server, clean)

    # --- errors ------------------------------------------------------------------------------

    def _protocol_violation(self, text: str) -> None:
        log.warning("protocol violation from client %s: %s", self.address or "[local]", text)
        self.write(msg.error_response("08P01", text))
        self.dirty = True
        self.end("protocol violation")

    def _fail(self, exc: PgCorralError) -> None:
        if isinstance(exc, ClientProtocolError) and exc.silent:
            log.info("closing client %s: %s", self.address or "[local]", exc.message)
            return
        if isinstance(exc, ServerError):
            fields = dict(exc.fields)
            log.info("server refused client %s: %s", self.address or "[local]", exc.message)
            self.write(msg.error_response_from_fields(fields))
            return
        log.info("refusing client %s (user %r, database %r): %s %s", self.address or "[local]",
                 self.user, self.database, exc.sqlstate, exc.message)
        self.write(msg.error_response(exc.sqlstate, exc.message, severity=exc.severity,
                                      detail=exc.detail))


def _client_settings(params: dict[str, str]) -> dict[str, str]:
    """The settings a client asked for at startup, ``options`` included."""
    settings = {k: v for k, v in params.items() if k not in _NOT_SETTINGS}
    options = params.get("options")
    if options:
        settings.update(parse_options(options))
    return settings
