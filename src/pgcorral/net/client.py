"""Client connections: startup, hba, getting a server connection, the session, the release.

The cold path runs in callbacks as far as nothing must be waited for, and in one coroutine per
client (``run``) from the first wait on:

* callbacks (``_advance``, ``_begin``, ``_login_now``): the startup packets as they arrive, the
  hba rule, and, for the usual session login (nothing to ask the client: hba ``trust`` or a
  user PostgreSQL checks itself, and an idle server connection of the database/user that
  already shows the client's settings), the greeting, from the ``data_received`` that brought
  the StartupMessage. No task, no futures, no loop iteration between the steps.
* the coroutine (``_start``): a password exchange, a wait in line, a new server connection
  (relaying the server's authentication requests to the client), the check of a reused one,
  settings to apply, a cancel to forward, and the transaction pipeline's login (its
  ``_login`` / ``_link_and_serve`` overrides run there, as before).

Linked, ``data_received`` on both sides relays bytes without a task switch until the client
leaves (``end``); the server connection is then reset and released through
``pipelines.session`` in callbacks too (``ServerConnection.reset_then``).

Every PgCorralError that ends a client becomes one ErrorResponse here (``_fail``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import struct
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

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
from pgcorral.net import console
from pgcorral.net.auth import VaultLogin, authenticate_client, authenticate_with_verifier
from pgcorral.net.endpoint import ConnectionLost, Endpoint
from pgcorral.net.maintenance import VALIDATION_TIMEOUT
from pgcorral.net.server import NO_POOL_STATS
from pgcorral.net.tls import TlsLink
from pgcorral.pipelines import session
from pgcorral.pipelines.settings import learn, reported_requests
from pgcorral.pipelines.settings import plan as settings_plan
from pgcorral.pool.pool import Grant, Pool, Slot, Waiter
from pgcorral.pool.stats import PoolStats, Tally
from pgcorral.protocol import codes
from pgcorral.protocol import messages as msg
from pgcorral.protocol.auth_md5 import MAX_AUTH_TOKEN_LENGTH, auth_message_length_error
from pgcorral.protocol.framing import TERMINATE_SPLIT, BoundaryTracker, FramingError, MessageReader
from pgcorral.protocol.readonly import session_attrs
from pgcorral.protocol.startup import (
    NEWEST_MINOR,
    CancelRequest,
    SSLRequest,
    Startup,
    StartupReader,
    parse_options,
)
from pgcorral.security.hba import match_hba
from pgcorral.security.tls import ALPN, peer_common_name

if TYPE_CHECKING:
    import ssl

    from pgcorral.config import HbaRule
    from pgcorral.net.context import Context
    from pgcorral.net.server import ServerConnection
    from pgcorral.security.tls import ClientSideTls

log = logging.getLogger("pgcorral.client")
_header_unpack_from = struct.Struct("!BI").unpack_from
_client_ids = itertools.count(1)  # client ids, unique in a worker (views add the worker)
#: SQLSTATEs of a login refused by policy (counted as "refused", not "error")
_REFUSALS = frozenset(["28000", "57P01", "57P03", "53300", "08P01", "0A000", "3D000"])

#: Bound of the per-worker cache of hba decisions (cleared on reload and when full).
HBA_CACHE_LIMIT = 4096

#: Startup parameters that are not settings to apply on the server connection.
_NOT_SETTINGS = frozenset(["user", "database", "options", "replication"])
_NOT_REPLICATION = frozenset(["false", "off", "no", "0"])
_AUTH_OK = msg.authentication_ok()
#: The first byte of a TLS handshake record: a ClientHello where a startup packet belongs.
_TLS_HANDSHAKE_RECORD = 0x16
#: hba methods after which pgcorral asks the client no password (``cert``: the certificate
#: was the proof, checked in ``_check_client_cert``).
_ASKS_NOTHING = frozenset(["trust", "cert"])

#: ``_startup_rx`` once the startup is over: one empty reader for all (never fed).
_STARTUP_OVER = StartupReader()

# Who drives the client (``ClientConnection._phase``).
_STARTUP = 0  # callbacks: startup packets (``_advance``)
_TASK = 1  # the coroutine ``run``: the rest of the cold path, or the whole client
_LINKED = 2  # a session linked in callbacks; ``end`` calls ``_end_session``
_ENDING = 3  # in ``_end_session``
_DONE = 4  # gone (``_done``)


class ClientConnection(Endpoint):
    side = "client"

    def __init__(self, ctx: Context, conn_type: str) -> None:
        startup = StartupReader()
        super().__init__(startup)
        self._startup_rx = startup  # the reader until the StartupMessage (``_advance``)
        self.over_limit = False  # came beyond max_client_conn: refused at its StartupMessage
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
        # activity, and when, at the last sample that saw a change (two fields, not a tuple:
        # a tuple and a float were 80 bytes of every idle client)
        self.seen_activity = 0
        self.seen_activity_at = 0.0
        self.settings: dict[str, str] = {}  # asked for at startup (options included)
        #: issue 13: the client asked for a replica (``read_only_suffix`` database name, or
        #: ``target_session_attrs``); its session (transaction pipeline: every transaction)
        #: goes to a replica's pool (``home_pool``, chosen at login) when one is healthy
        self.read_only = False
        self.home_pool: Pool | None = None
        self.hba_rule: HbaRule | None = None
        self.tls: ssl.SSLObject | None = None  # set once a TLS handshake finished
        self._direct_tls = False  # the handshake began without an SSLRequest
        self._client_tls: ClientSideTls | None = None  # the contexts the handshake used
        self._phase = _STARTUP
        self._held = b""  # sent with the next write (``hold``)
        self._encryption_requests = 0  # SSLRequest/GSSENCRequest answered with N
        self._timer: asyncio.TimerHandle | None = None  # authentication_timeout of the startup
        # why the client ended ("": it did not): ``end`` sets it, the coroutine checks it (a
        # string, not a future: nothing awaits it, and a future is 144 bytes; issue 15)
        self._ended = ""
        # a place in line (``_acquire``): the grant, or None when the client left
        self._grant: asyncio.Future[Grant | None] | None = None
        self._task: asyncio.Task[None] | None = None
        # --- counters (pool.stats; read by control.stats, folded into the pool at the end)
        self.id = next(_client_ids)
        self.port = 0
        self.connect_time = 0.0  # epoch seconds
        self.tally = Tally()
        self.pstats: PoolStats = NO_POOL_STATS  # the pool's counters, once logged in
        # monotonic microseconds: waiting for a server connection since (0: not waiting),
        # holding one since (session pooling; 0: not holding); the login's wait in all
        self.wait_since_us = 0
        self.hold_since_us = 0
        self.login_wait_us = 0

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        ctx = self.ctx
        self.loop = ctx.loop
        main = ctx.config.main
        if self.conn_type == "host":
            peer = transport.get_extra_info("peername")  # uvloop got it at accept
            if peer:
                # interned: the clients of one host share the string (issue 15)
                self.address, self.port = sys.intern(peer[0]), peer[1]
            if not main.nodelay:  # uvloop and asyncio set TCP_NODELAY
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        # max_client_conn: refused at its StartupMessage (as PostgreSQL does: an SSLRequest is
        # answered first, and libpq shows no error text received before that)
        self.over_limit = len(ctx.clients) >= ctx.client_limit()
        ctx.clients.add(self)
        self.connect_time = time.time()
        if main.authentication_timeout > 0:
            self._timer = self.loop.call_later(main.authentication_timeout,
                                               self._startup_timed_out)

    def _refuse_too_many(self) -> None:
        """max_client_conn (or the descriptor limit) reached: FATAL 53300, as PostgreSQL says
        it at max_connections; clients already connected are not touched."""
        ctx = self.ctx
        ctx.counters["clients_refused_too_many"] += 1
        now = time.monotonic()
        if now - ctx.too_many_logged >= 1.0:  # one line a second at most, with the count
            ctx.too_many_logged = now
            log.warning("refusing client %s: %d clients connected (max_client_conn or the "
                        "file-descriptor limit); %d refused so far", self.address or "[local]",
                        len(ctx.clients), ctx.counters["clients_refused_too_many"])
        self.write(msg.error_response("53300", "sorry, too many clients already"))
        self._done()

    def data_received(self, data: bytes) -> None:
        server = self.server
        if server is not None:
            self.activity += 1  # for disconnect_client
            server.sending(len(data))
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

    def buffer(self, data: bytes) -> None:
        """Bytes while unlinked: startup packets are answered here; later ones are kept for
        the coroutine (or, pipelined behind the StartupMessage, for the session)."""
        if self._phase == _STARTUP:
            if (data[0] == _TLS_HANDSHAKE_RECORD and not self._encryption_requests
                    and self.tls is None and not len(self._startup_rx)
                    and self.ctx.client_tls is not None and self.conn_type == "host"):
                self._start_tls(data, direct=True)  # direct TLS: a ClientHello came first
                return
            self._startup_rx.feed(data)
            self._advance()
        else:
            super().buffer(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.tls = None  # its OpenSSL memory goes now, not when a GC finds this client
        self.end("client lost")

    def write(self, data: bytes) -> None:
        held = self._held
        if held:
            self._held = b""
            data = held + data
        super().write(data)

    def hold(self, data: bytes) -> None:
        """Send ``data`` with the next write: the end of an authentication exchange goes out
        with the greeting (or the error) in one segment."""
        self._held += data

    def shutdown_started(self) -> None:
        """Graceful shutdown began (the transaction pipeline closes clients between
        transactions; a session runs on until its client leaves)."""

    def server_lost(self) -> None:
        """The linked server connection broke or closed."""
        self.end("server lost")

    def end(self, reason: str) -> None:
        """End the client: a linked session at once (``_end_session``: every caller returns
        right after ``end``, and a call_soon would cost a loop iteration, an epoll_wait more),
        a client in its startup at once, a coroutine through ``_ended`` (and ``_grant`` when it
        waits in line)."""
        phase = self._phase
        if phase == _LINKED:
            self._phase = _ENDING
            self._end_session(reason)
        elif phase == _STARTUP:
            self._done()
        if not self._ended:
            self._ended = reason
        granted = self._grant
        if granted is not None and not granted.done():  # waiting in line (``_acquire``)
            granted.set_result(None)

    # --- the cold path in callbacks ----------------------------------------------------------

    def _advance(self) -> None:
        """Answer the startup packets received so far, up to the StartupMessage."""
        rx = self._startup_rx
        try:
            while self._phase == _STARTUP:
                packet = rx.next_packet()
                if packet is None:
                    return
                if isinstance(packet, Startup):
                    self._stop_timer()
                    if self.over_limit:
                        self._refuse_too_many()
                        return
                    self._begin(packet)
                elif isinstance(packet, CancelRequest):
                    self._stop_timer()
                    self._start(self.ctx.forward_cancel(packet.pid, packet.secret))
                else:  # SSLRequest, GSSENCRequest
                    self._encryption_requests += 1
                    if self._encryption_requests > 2:
                        raise ClientProtocolError("too many encryption requests")
                    if self.tls is not None:  # no 'N' inside TLS either: PostgreSQL refuses
                        which = "SSLRequest" if isinstance(packet, SSLRequest) else (
                            "GSSENCRequest")
                        raise ClientProtocolError(f"{which} over a TLS connection")
                    if (isinstance(packet, SSLRequest) and self.ctx.client_tls is not None
                            and self.conn_type == "host"):
                        self.write(b"S")  # no bytes followed it (StartupReader checked)
                        self._start_tls(b"", direct=False)
                        return
                    self.write(b"N")  # GSSENCRequest, or TLS is off
        except Exception as exc:
            self._report(exc)
            if self._phase == _LINKED:  # a bug after the greeting: the server is not reused
                self.dirty = True
                self.end("internal error")
            elif self._phase == _STARTUP:
                self._done()

    # --- TLS -------------------------------------------------------------------------------

    @property
    def cbind(self) -> bytes | None:
        """tls-server-end-point data of the certificate this client's handshake used
        (SCRAM-SHA-256-PLUS); None for a plain client."""
        tls = self._client_tls
        return tls.cbind if tls is not None else None

    def _start_tls(self, received: bytes, direct: bool) -> None:
        """The TLS handshake, under ``authentication_timeout`` like the rest of the startup;
        its plaintext then comes to ``data_received`` as before."""
        tls = self._client_tls = self.ctx.client_tls  # a reload does not change it under us
        assert tls is not None
        self._direct_tls = direct
        link = TlsLink(self.transport, tls.context, server_side=True, app=self,
                       on_ready=self._tls_ready, on_failed=self._tls_failed)
        self.transport = cast(asyncio.Transport, link)  # TlsLink quacks like one
        link.start(received)

    def _tls_ready(self, link: TlsLink) -> None:
        self.tls = link.ssl
        if self._direct_tls and link.ssl.selected_alpn_protocol() != ALPN:
            # PostgreSQL 17 refuses direct TLS without ALPN (no cross-protocol confusion)
            self._fail(ClientProtocolError("received direct SSL connection request without "
                                           "ALPN protocol negotiation extension"))
            self._done()

    def _tls_failed(self, link: TlsLink, exc: Exception) -> None:
        if self._phase == _DONE:
            return
        # the verification error says which ("certificate revoked", "certificate has
        # expired"); its reason alone is only CERTIFICATE_VERIFY_FAILED
        why = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
        if not self.closed:  # else pgcorral closed it and said why (authentication_timeout)
            log.info("TLS handshake with client %s failed: %s", self.address or "[local]",
                     why)
        self.closed = True
        self._done()

    def _check_client_cert(self, rule: HbaRule) -> None:
        """hba ``cert`` and ``clientcert=``: a verified certificate (``verify-ca``) whose CN
        is the user name (``verify-full``), with PostgreSQL's messages."""
        tls = self.tls
        verified = self._client_tls is not None and self._client_tls.verifies
        cert = tls.getpeercert() if tls is not None and verified else None
        if not cert:
            raise AuthenticationError("connection requires a valid client certificate")
        if rule.clientcert != "verify-full":
            return
        name = peer_common_name(tls) if tls is not None else None
        if name == self.user:
            return
        log.info('certificate CN "%s" is not user "%s" (hba line %d)', name, self.user,
                 rule.line)
        if rule.method == "cert":
            raise AuthenticationError(f'certificate authentication failed for user '
                                      f'"{self.user}"')
        raise AuthenticationError(f'certificate validation (clientcert=verify-full) failed '
                                  f'for user "{self.user}": CN mismatch')

    def _stop_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None

    def _startup_timed_out(self) -> None:
        self._timer = None
        log.info("client %s did not finish startup in time", self.address or "[local]")
        self.abort()

    def _begin(self, startup: Startup) -> None:
        """The StartupMessage: the checks, then the login, here when nothing must be waited
        for, else in the coroutine."""
        ctx = self.ctx
        if startup.needs_negotiation:
            self.write(msg.negotiate_protocol_version(NEWEST_MINOR, startup.unrecognized))
        params = startup.params
        # interned: the clients of one database/user share the strings (issue 15)
        self.user, self.database = sys.intern(startup.user), sys.intern(startup.database)
        replication = params.get("replication")
        if replication is not None and replication.lower() not in _NOT_REPLICATION:
            raise StartupRejected("replication connections are not supported by pgcorral",
                                  sqlstate="0A000")
        settings = self.settings = _client_settings(params)
        self._choose_route(settings)
        rule = self.hba_rule = self._hba_rule()
        if rule.clientcert:
            self._check_client_cert(rule)
        if console.is_console(self.database):  # the SQL admin console (net.console)
            self._start(console.serve(self, rule))
            return
        if ctx.shutting_down:
            raise ShuttingDown("pgcorral is shutting down")
        ctx.check_enabled(self.database)  # a disabled database: DatabaseDisabled 57P03
        if not self._asks_nothing(rule):
            self._start(self._authenticate_and_login(settings, rule))
        elif not self._login_now(settings, rule):
            self._start(self._login(settings, rule))

    def _choose_route(self, settings: dict[str, str]) -> None:
        """A read-only client (docs/HA.md): database ``<name><read_only_suffix>``, or
        ``target_session_attrs`` given as a setting (``options=-c target_session_attrs=...``;
        never sent on to PostgreSQL, which does not know it)."""
        suffix = self.ctx.config.main.read_only_suffix
        database = self.database
        if suffix and database.endswith(suffix) and len(database) > len(suffix) and \
                not console.is_console(database):
            self.database = database[:-len(suffix)]
            self.read_only = True
        attrs = settings.pop("target_session_attrs", None)
        if attrs is not None:
            route = session_attrs(attrs)
            if route is None:
                raise StartupRejected(f'invalid target_session_attrs value: "{attrs}"',
                                      sqlstate="22023")
            self.read_only = self.read_only or route

    def _pool(self) -> Pool:
        """The pool this session's server connection comes from (chosen once, at login)."""
        pool = self.home_pool
        if pool is None:
            ctx = self.ctx
            pool = self.home_pool = ctx.read_pool(0) if self.read_only else ctx.pool
        return pool

    def _asks_nothing(self, rule: HbaRule) -> bool:
        """Does pgcorral let the client in without a message exchange (``_authenticate``
        otherwise)? hba ``trust``, and users PostgreSQL checks itself (pass-through, when
        ``allow_unknown_users``). Users in the vault log in to PostgreSQL with the vault
        password (``vault_login``), checked by pgcorral with the hba method (``all``: SCRAM)."""
        ctx = self.ctx
        password = ctx.secrets.backend_password(self.user)
        trust = rule.method in _ASKS_NOTHING
        if password is not None:
            self.vault_login = VaultLogin(self.user, password)
            return trust
        if trust:
            return True
        main = ctx.config.main
        if main.auth_query and ctx.secrets.superuser_login() is not None:
            return False  # checked against the verifier PostgreSQL stores
        return main.allow_unknown_users  # else the mock exchange that ends in 28P01

    def _login_now(self, settings: dict[str, str], rule: HbaRule) -> bool:
        """The usual session login, without a task: an idle server connection of the client's
        database/user that nobody waits for, which asks the client nothing (``_check_reused``)
        and already shows its settings. False: nothing was taken, the coroutine logs in.
        Subclasses log in through their own ``_login`` (they may override this)."""
        if type(self) is not ClientConnection:
            return False
        ctx = self.ctx
        if ctx.config.main.validation == "foreground":
            return False
        pool = self._pool()
        slot = pool.take_idle((ctx.config.real_database(self.database), self.user))
        if slot is None:
            return False
        server: ServerConnection = slot.conn
        server.idle = False
        if server.closed:
            pool.discard(slot)
            return False
        if not self._reuse_asks_nothing(server, rule):
            self._start(self._check_and_use(server, settings, rule))
        elif settings_plan(settings, server.params, server.baseline, server.names,
                           ctx.learned):
            self._start(self._use_server(server, settings))  # settings to apply first
        else:
            # re-applied after the reset for the next client (ServerConnection.reset_then)
            server.requests = reported_requests(settings, server.names)
            self._link_session(server)
        return True

    def _start(self, work: Coroutine[Any, Any, object]) -> None:
        """The rest of the cold path waits for something: the client's coroutine takes it."""
        # it reads authentication messages: PostgreSQL reads up to PG_MAX_AUTH_TOKEN_LENGTH
        # bytes (pipelined bytes move over; a login in callbacks takes them from the startup
        # reader, ``take_buffered``)
        self.use_reader(MessageReader(MAX_AUTH_TOKEN_LENGTH))
        self._startup_rx = _STARTUP_OVER  # its buffer goes (read only in _STARTUP)
        self._phase = _TASK
        self._task = self.loop.create_task(self.run(work))

    def _done(self) -> None:
        """The client is gone: out of the worker's clients, its connection closed."""
        if self._phase == _DONE:
            return
        self._phase = _DONE
        self._task = None  # no cycle client -> task -> coroutine -> client after the end
        self._stop_timer()
        ctx = self.ctx
        ctx.clients.discard(self)
        ctx.retire(self)
        if self._held:
            self.write(b"")
        self.close()
        if not ctx.clients:
            ctx.all_idle.set()
        if self.linked_once and ctx.config.main.log_disconnections:
            log.info("disconnection: user=%s database=%s host=%s", self.user,
                     self.database, self.address or "[local]")

    def _report(self, exc: Exception) -> None:
        """What ends a client becomes one ErrorResponse (a lost connection, nothing)."""
        if isinstance(exc, PgCorralError):
            self._fail(exc)
        elif not isinstance(exc, (ConnectionLost, ConnectionError)):
            log.error("internal error serving client %s", self.address or "[local]",
                      exc_info=exc)
            self._fail(PgCorralError("internal error in pgcorral"))

    # --- the cold path in the coroutine ------------------------------------------------------

    async def run(self, work: Coroutine[Any, Any, object]) -> None:
        try:
            await work
        except Exception as exc:
            self._report(exc)
        finally:
            if self._phase == _TASK:  # not handed on to callbacks (a linked session)
                self._done()

    async def _authenticate_and_login(self, settings: dict[str, str], rule: HbaRule) -> None:
        await self._authenticate(rule)
        await self._login(settings, rule)

    async def _login(self, settings: dict[str, str], rule: HbaRule) -> None:
        """A server connection for the client, its startup settings applied, then the session."""
        real_db = self.ctx.config.real_database(self.database)
        server = await self._get_server((real_db, self.user), rule)
        await self._use_server(server, settings)

    async def _use_server(self, server: ServerConnection, settings: dict[str, str]) -> None:
        """The client's startup settings applied on ``server``, then the session."""
        ctx = self.ctx
        try:
            pairs = settings_plan(settings, server.params, server.baseline, server.names,
                                  ctx.learned)
            if pairs:
                error = await server.apply_settings(pairs)
                if error is not None:
                    error["S"] = error["V"] = "FATAL"
                    raise ServerError(error)
                learn(ctx.learned, pairs, server.params)
            # re-applied after the reset for the next client (ServerConnection.reset_then)
            server.requests = reported_requests(settings, server.names)
        except BaseException:
            self.release(server, clean=not server.closed)
            raise
        await self._link_and_serve(server)

    async def _authenticate(self, rule: HbaRule) -> None:
        """pgcorral asks the client (``_asks_nothing`` said so): users in the vault prove their
        vault password with the hba method; with ``auth_query``, others prove the password
        PostgreSQL stores for them; unknown users (not ``allow_unknown_users``) go through the
        same exchange as a known user, ending in the same 28P01."""
        ctx = self.ctx
        secrets = ctx.secrets
        method = "scram-sha-256" if rule.method == "all" else rule.method
        if self.vault_login is not None:
            await authenticate_client(self, method, self.user,
                                      secrets.client_password(self.user))
        elif ctx.config.main.auth_query and secrets.superuser_login() is not None:
            try:
                secret = await ctx.auth_query.fetch_secret(
                    ctx, ctx.config.real_database(self.database), self.user)
            except (ServerError, ServerUnavailable, ServerProtocolError, ConnectionLost,
                    TimeoutError, AuthenticationError) as exc:
                # the superuser's own trouble is for the log, not for the client
                log.error("auth_query for user %r failed: %s", self.user, exc)
                raise ServerUnavailable("authentication lookup failed") from None
            self.vault_login = await authenticate_with_verifier(self, self.user, secret,
                                                                rule.method)
        else:
            await authenticate_client(self, method, self.user, None)

    def _hba_rule(self) -> HbaRule:
        ctx = self.ctx
        tls = self.tls is not None
        key = (self.conn_type, self.database, self.user, self.address, tls)
        try:
            rule = ctx.hba_cache[key]
        except KeyError:
            rule = match_hba(ctx.config.hba, conn_type=self.conn_type, database=self.database,
                             user=self.user, address=self.address, aliases=ctx.aliases,
                             tls=tls)
            if len(ctx.hba_cache) >= HBA_CACHE_LIMIT:
                ctx.hba_cache.clear()
            ctx.hba_cache[key] = rule
        if rule is not None and rule.method != "reject":
            return rule
        where = (f'host "{self.address or "[local]"}", user "{self.user}", '
                 f'database "{self.database}"')
        if self.conn_type == "host":  # as PostgreSQL 14 and later say it
            where += ", SSL encryption" if tls else ", no encryption"
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
                ctx.pool_of(slot, ctx.pool).discard(slot)
                continue
            if ctx.config.main.validation == "foreground" and not await server.validate(
                    VALIDATION_TIMEOUT):
                ctx.release_server(server, clean=False)
                continue
            await self._checked(server, rule)
            return server

    async def _checked(self, server: ServerConnection, rule: HbaRule) -> None:
        """``_check_reused``; a refused client gives the connection back."""
        try:
            await self._check_reused(server, rule)
        except BaseException:
            self.ctx.release_server(server, clean=not server.closed)
            raise

    async def _check_and_use(self, server: ServerConnection, settings: dict[str, str],
                             rule: HbaRule) -> None:
        await self._checked(server, rule)
        await self._use_server(server, settings)

    async def _acquire(self, key: tuple[str, str]) -> Grant:
        ctx = self.ctx
        pool = self._pool()
        main = ctx.config.main
        timeout = main.blocking_timeout
        if timeout <= 0:  # pgagroal: no blocking wait, max_retries tries spaced by the delay
            timeout = main.max_retries * main.connection_retry_delay
        # One future, completed by whichever comes first: the pool's grant (``_granted``),
        # blocking_timeout (``expire``: PoolExhausted), the client's end (``end``: None).
        # Not asyncio.wait on two futures: that cost a waiting client about 1.5 KiB more
        # (two coroutines, a future, a set, a closure, contexts; issue 15). Not an exception
        # set by ``end`` either: when every waiting client left at once, that raised the
        # peak by about 4.4 KiB per client (bench/idle_breakdown.py, "after_close").
        granted: asyncio.Future[Grant | None] = self.loop.create_future()
        self._grant = granted

        def expire() -> None:  # called by the worker's WaitTimer (net.waits)
            if isinstance(result, Waiter) and pool.cancel(result) and not granted.done():
                granted.set_exception(_exhausted(ctx, pool, key, timeout))

        result = pool.request(key, timeout, self._granted, expire)
        if isinstance(result, Grant):
            return result
        log.debug("client %s waits for a server connection for %s@%s (%d waiting)",
                  self.address or "[local]", key[1], key[0], pool.waiting)
        if timeout <= 0:
            self._grant = None  # nobody awaits it: ``end`` must not fail it
            if not granted.done() and pool.cancel(result):
                raise _exhausted(ctx, pool, key, timeout)
        else:
            ctx.waits.watch()
            since = self.wait_since_us = time.monotonic_ns() // 1000
            try:
                await granted
            finally:
                self.wait_since_us = 0
                self.login_wait_us += time.monotonic_ns() // 1000 - since
        grant = granted.result()
        if grant is None:  # the client left while waiting (``end``)
            pool.cancel(result)
            raise ConnectionLost("client left while waiting")
        if self._ended:  # served just as the client left: give it back untouched
            if grant.new:
                pool.discard(grant.slot)
            else:
                ctx.release_server(grant.slot.conn, clean=True)
            raise ConnectionLost("client left while waiting")
        return grant

    def _granted(self, grant: Grant) -> None:
        """The pool serves this client's Waiter (called synchronously by the pool)."""
        granted = self._grant
        assert granted is not None
        if not granted.done():
            granted.set_result(grant)

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
            ctx.pool_of(slot, ctx.pool).discard(slot)
            if isinstance(exc, TimeoutError):
                raise ServerUnavailable("timeout while logging in to the server") from None
            if isinstance(exc, ConnectionLost) and self.closed:
                raise
            if isinstance(exc, ConnectionLost):
                raise ServerUnavailable("server closed the connection during login") from None
            raise
        ctx.pool_of(slot, ctx.pool).opened(slot)
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
        timeout = self.ctx.config.main.authentication_timeout
        # a timer that wakes the read with TimeoutError (asyncio.timeout costs several times
        # as much: a Timeout object, the current task, its cancellation)
        timer = (self.loop.call_later(timeout, self._wake, TimeoutError())
                 if timeout > 0 else None)
        try:
            type_, body = await self.read_message()
        except TimeoutError:
            raise AuthenticationError("canceling authentication due to timeout",
                                      sqlstate="08006") from None
        except ClientProtocolError:  # a length out of range
            raise auth_message_length_error(self.user, sasl=sasl) from None
        finally:
            if timer is not None:
                timer.cancel()
        if type_ != codes.PASSWORD:
            raise ClientProtocolError(
                f"expected password response, got message type {type_}")
        return body

    def _reuse_asks_nothing(self, server: ServerConnection, rule: HbaRule) -> bool:
        """Need a client prove nothing to use ``server`` (see ``_check_reused``)?"""
        memento = server.memento
        return (self.vault_login is not None or rule.method in _ASKS_NOTHING or memento is None
                or memento[0] == "trust")

    async def _check_reused(self, server: ServerConnection, rule: HbaRule) -> None:
        """A reused pass-through connection: the client proves the password it logged in with."""
        if self._reuse_asks_nothing(server, rule):
            return
        memento = server.memento
        assert memento is not None
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
        return self._send_greeting(_AUTH_OK + params, pid, secret, status)

    def _send_greeting(self, head: bytes, pid: int, secret: int, status: int) -> bytes:
        """``_greet`` with AuthenticationOk and the ParameterStatus messages in ``head``."""
        self.linked_once = True
        self.seen_activity = self.activity
        self.seen_activity_at = time.monotonic()
        ctx = self.ctx
        pstats = self.pstats = ctx.pool_stats((ctx.config.real_database(self.database),
                                               self.user))
        pstats.login("success")
        ctx.counters["logins_success"] += 1
        if self.ctx.config.main.log_connections:
            log.info("connection authorized: user=%s database=%s host=%s", self.user,
                     self.database, self.address or "[local]")
        pipelined = self.take_buffered()
        self.write(head + msg.key_and_ready(pid, secret, status))  # one write, one segment
        return pipelined

    async def _link_and_serve(self, server: ServerConnection) -> None:
        """Session pooling: greet and link; the session goes on in callbacks (``end``)."""
        self._link_session(server)

    def _link_session(self, server: ServerConnection) -> None:
        secret = self.ctx.cancels.issue(self, server.pid)
        status = server.status if server.status > 0 else codes.TX_IDLE
        pipelined = self._send_greeting(server.greeting(), server.pid, secret, status)
        self.server = server
        self.peer = server
        server.peer = self
        server.client_id = self.id
        server.mark()
        now = time.monotonic_ns() // 1000
        self.hold_since_us = now
        tally = self.tally
        tally.wait_count += 1
        tally.wait_us += self.login_wait_us
        self.pstats.hist_wait.observe(self.login_wait_us)
        self._to_callbacks()
        if self._ended:  # the client left while the coroutine worked
            self.end(self._ended)
        elif pipelined:
            self.data_received(pipelined)

    def _to_callbacks(self) -> None:
        """From here on callbacks drive the client: ``end`` calls ``_end_session``. The
        coroutine that did the cold path (if one did) ends now and is not kept: an idle
        client holds no task (issue 15)."""
        self._phase = _LINKED
        self._task = None
        self._grant = None  # (done: the wait in line, if any, is over)

    def _end_session(self, reason: str) -> None:
        """The session is over (``end``): the server connection goes back (reset in the
        background), the client goes."""
        server = self.server
        if server is not None:
            self.ctx.cancels.drop(self, server.pid)
            if reason == "server lost" and not server.fatal_sent:  # one error, not two
                self.write(msg.error_response("08006",
                                              "server closed the connection unexpectedly"))
            self.release(server, clean=True)
        self._done()

    def release(self, server: ServerConnection, clean: bool) -> None:
        """Unlink ``server`` and give it back to the pool: after its reset (in callbacks, see
        ``ServerConnection.reset_then``), or closed."""
        if self.hold_since_us:  # linked: what the session did through it is the client's
            tally = self.tally
            tally.add_since(server.tally, server.at_link)
            tally.hold_us += time.monotonic_ns() // 1000 - self.hold_since_us
            self.hold_since_us = 0
            server.client_id = 0
        self.server = None
        self.peer = None
        server.peer = None
        ctx = self.ctx
        if session.reusable(clean, self.dirty, self.tracker.at_boundary, server.status,
                            server.poolable, server.closed):
            server.transport.resume_reading()  # the client may have left it paused
            server.reset_then(ctx.config.main.server_reset_query, session.RESET_TIMEOUT,
                              ctx.release_server)
        else:
            ctx.release_server(server, False)

    # --- errors ------------------------------------------------------------------------------

    def _protocol_violation(self, text: str) -> None:
        log.warning("protocol violation from client %s: %s", self.address or "[local]", text)
        self.write(msg.error_response("08P01", text))
        self.dirty = True
        self.end("protocol violation")

    def _count_failed_login(self, exc: PgCorralError) -> None:
        """A client that never got in: its outcome counted (globally, and under its pool when
        that pool exists: made-up names must not grow the table)."""
        code = exc.sqlstate
        outcome = "bad_password" if code == "28P01" else "refused" if code in _REFUSALS \
            else "error"
        ctx = self.ctx
        ctx.counters["logins_" + outcome] += 1
        pstats = ctx.stats.get((ctx.config.real_database(self.database), self.user))
        if pstats is not None:
            pstats.login(outcome)

    def _fail(self, exc: PgCorralError) -> None:
        if not self.linked_once and self.user:
            self._count_failed_login(exc)
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


def _exhausted(ctx: Context, pool: Pool, key: tuple[str, str],
               timeout: float) -> PgCorralError:
    """Why a wait in line ended without a server connection (``_acquire``)."""
    if pool.held:  # waited for a new primary (issue 13) in vain
        return ctx.no_primary(timeout)
    return PoolExhausted(
        f'connection pool is full: no server connection for user "{key[1]}", '
        f'database "{key[0]}" became free within {timeout:g} s')


def _client_settings(params: dict[str, str]) -> dict[str, str]:
    """The settings a client asked for at startup, ``options`` included."""
    settings = {k: v for k, v in params.items() if k not in _NOT_SETTINGS}
    options = params.get("options")
    if options:
        settings.update(parse_options(options))
    return settings
