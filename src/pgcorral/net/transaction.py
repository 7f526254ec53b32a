"""The transaction pipeline: a server connection serves a client for one transaction at a time.

Login is the session pipeline's cold path (``ClientConnection``): startup, hba, authentication,
a server connection, the client's startup settings, the greeting. The greeting carries a
pooler-issued BackendKeyData (a virtual pid no Linux process has, ``CancelKeys.issue_virtual``)
and the login server connection goes back to the pool at once.

Then, per transaction:

1. Client bytes arrive with no server linked: they are kept until a whole message is there (a
   lone Terminate ends the client). An idle connection of the same database/user is taken
   synchronously (``Pool.take_idle``); otherwise the client waits for one in line (callbacks) or
   a task opens a new one (``_open_pending``), within blocking_timeout. Between transactions
   no task runs for the client.
2. ``_link``: the client's settings are brought over when the connection differs (reported
   parameters the client saw last, plus non-reported startup settings: one ``set_config``
   batch whose replies are dropped), then the client's messages are forwarded.
3. ``_forward``: the client's ``ClientForwarder`` (``protocol.txforward``) frames the bytes,
   maps prepared statements when that is on (Parse/Bind/Describe/Close renamed, re-Parse where
   the statement is missing, local answers planned) and puts each request's reply steps into
   the ``ReplyPlan``; ``_forward`` writes what it returns and acts on what it saw.
4. Replies go through the server's ``ReplyRouter`` (``net.txserver``); at a ReadyForQuery 'I'
   with nothing owed and no batch open the client is unlinked (``server_free``) and the server
   connection goes back to the pool, after ``server_reset_query`` with
   ``server_reset_query_always``, and never while a cancel request for it is being forwarded.

A client that leaves with a server linked: an open transaction is rolled back (the connection
is closed instead if replies were still due or the stream stopped mid-message).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import TYPE_CHECKING, Final, NamedTuple

from pgcorral.errors import (
    AuthenticationError,
    ClientProtocolError,
    PgCorralError,
    PoolExhausted,
)
from pgcorral.net.client import ClientConnection
from pgcorral.net.endpoint import FRAMED_BUFFER_LIMIT, ConnectionLost
from pgcorral.net.maintenance import VALIDATION_TIMEOUT
from pgcorral.net.notify import (  # LISTEN/NOTIFY (issue 14)
    MAX_QUEUED,
    MAX_QUEUED_BYTES,
    record_sender,
)
from pgcorral.pipelines.session import RESET_TIMEOUT
from pgcorral.pool.pool import Grant, Pool, Slot, Waiter
from pgcorral.protocol import codes
from pgcorral.protocol import messages as msg
from pgcorral.protocol.listen import (  # LISTEN/NOTIFY (issue 14)
    FIRST_BYTES,
    extended_batch,
    parse_listen,
)
from pgcorral.protocol.messages import fatal_ending_at
from pgcorral.protocol.readonly import LOOK as READ_ONLY_LOOK
from pgcorral.protocol.readonly import starts_read_only
from pgcorral.protocol.replyplan import own_query_step
from pgcorral.protocol.rewrite import CLOSE_COMPLETE, PARSE_COMPLETE, close_locally, parse_locally
from pgcorral.protocol.sessionsql import (
    PROBE,
    custom_setting_names,
    may_touch_state,
    names_array,
    pins,
    probe_result,
)
from pgcorral.protocol.statements import ClientStatements
from pgcorral.protocol.txforward import (
    DEALLOCATE_ALL,
    DISCARD_ALL,
    NAMED_PARSE,
    NO_NAMES,
    SESSION_STATE,
    SESSION_TYPES,
    TERMINATE,
    VIOLATION,
    ClientForwarder,
)

if TYPE_CHECKING:
    from pgcorral.config import HbaRule
    from pgcorral.net.context import Context
    from pgcorral.net.server import AuthRelay, ServerConnection
    from pgcorral.net.txserver import TxServerConnection

# Module constants are ``Final``: compiled with mypyc, reading one is a C static load, not a
# lookup in the module's dict.
log: Final = logging.getLogger("pgcorral.transaction")
_header_unpack_from: Final = struct.Struct("!BI").unpack_from

#: Reported parameters a client cannot set (set_config would fail).
READ_ONLY_PARAMS: Final = frozenset(["server_version", "server_encoding", "integer_datetimes",
                                     "is_superuser", "session_authorization", "in_hot_standby"])
_STATEMENT_RESETS: Final = ("DISCARD ALL", "DEALLOCATE ALL")
#: What ``_answer_locally`` may answer (a chunk starting with anything else needs a server).
_LOCAL_TYPES: Final = frozenset([codes.PARSE, codes.CLOSE, codes.SYNC, codes.FLUSH])
_READY_IDLE: Final = msg.ready_for_query(b"I")
_SESSION_TYPES: Final = SESSION_TYPES
_TERMINATE_TYPE: Final = codes.TERMINATE
_PARSE_TYPE: Final = codes.PARSE
_QUERY_TYPE: Final = codes.QUERY
_BIND_TYPE: Final = codes.BIND
_LISTEN_FIRST: Final = FIRST_BYTES  # the first bytes of a Query that may be only LISTENs
#: Shared by the clients that carry no SQL-level PREPARE (never changed in place).
_NO_PREPARED: Final[dict[str, str]] = {}
#: Shared by the clients that are not pinned and have no notification waiting (replaced,
#: never changed in place): an idle client owns no empty list (issue 15).
_NO_PINS: Final[list[str]] = []
_NO_NOTES: Final[list[bytes]] = []


class TxLogin(NamedTuple):
    """What a login for one database/user showed last time (``Context.tx_logins``)."""

    baseline: dict[str, str]  # reported parameters right after login
    names: dict[str, str]  # lower-case name -> reported spelling
    trusted: bool  # PostgreSQL asked no password


def _predict(baseline: dict[str, str], names: dict[str, str], settings: dict[str, str],
             learned: dict[tuple[str, str], str]) -> dict[str, str] | None:
    """The parameters a login with ``settings`` would report, or None if one is unknown.
    ``baseline`` itself when nothing differs: parameter dicts are replaced, never changed in
    place, so clients share it (a copy was 464 bytes per idle client; issue 15)."""
    params = baseline
    for name, value in settings.items():
        canon = names.get(name.lower())
        if canon is None:
            continue  # not reported: set when the client's first transaction is linked
        if canon in READ_ONLY_PARAMS:
            return None
        reported = learned.get((canon, value))
        if reported is None:
            if baseline.get(canon) != value:
                return None
            reported = value
        if params.get(canon) != reported:
            if params is baseline:
                params = dict(baseline)
            params[canon] = reported
    return params


def _extra(settings: dict[str, str], names: dict[str, str]) -> dict[str, str]:
    """The startup settings PostgreSQL does not report (lower-case names)."""
    return {k.lower(): v for k, v in settings.items() if k.lower() not in names}


def _give_back(ctx: Context, grant: Grant) -> None:
    """A grant the client can no longer use."""
    if grant.new:
        ctx.pool_of(grant.slot, ctx.pool).discard(grant.slot)
    else:
        ctx.release_server(grant.slot.conn, clean=True)


def release_free(ctx: Context, server: TxServerConnection, run_reset: bool = True) -> None:
    """A server connection with nothing owed: back to the pool, after the cancel requests in
    flight for it, and after the reset query when it runs always (``run_reset``)."""
    if server.cancels > 0:
        server.after_cancels = lambda: release_free(ctx, server, run_reset)
        return
    main = ctx.config.main
    if run_reset and main.server_reset_query_always and main.server_reset_query.strip():
        asyncio.get_running_loop().create_task(
            _reset_and_release(ctx, server, main.server_reset_query))
        return
    ctx.release_server(server, clean=True)


async def _reset_and_release(ctx: Context, server: TxServerConnection, query: str) -> None:
    if await reset(server, query):
        release_free(ctx, server, run_reset=False)
    else:
        ctx.release_server(server, clean=False)


async def reset(server: TxServerConnection, query: str) -> bool:
    """Roll back an open transaction and run ``query`` (may be empty); what it forgets is
    forgotten here too. False: close the connection instead."""
    server.requests = []  # nothing to re-apply after DISCARD ALL: the next client brings its own
    ok = await server.reset(query, RESET_TIMEOUT)
    if ok and query and any(r in query.upper() for r in _STATEMENT_RESETS):
        server.statements.clear()  # the server has none left
        server.sql_prepared = {}
        if "DISCARD ALL" in query.upper():
            server.extra.clear()
    return ok


class TransactionClient(ClientConnection):
    def __init__(self, ctx: Context, conn_type: str) -> None:
        super().__init__(ctx, conn_type)
        self.key = ("", "")
        self.params: dict[str, str] = {}  # reported parameters as this client last saw them
        self.extra: dict[str, str] = {}  # non-reported startup settings (lower-case names)
        self.statements = ClientStatements()
        self.cancel_pid = 0
        self.in_session = False  # greeted: bytes are requests now
        self._rest = b""  # client bytes not forwarded yet (no server, or a partial message)
        self._rest_paused = False
        self._opening = False  # the task ``_open_pending`` runs
        self._acquiring = False  # getting a server connection (waiting, opening, validating)
        self._waiter: Waiter | None = None  # our place in the pool's line
        self._wait_timeout = 0.0
        self._grant_pending: Grant | None = None  # for _open_pending: open or validate it
        self._cleartext: bytes | None = None  # pass-through cleartext password, for new logins
        self.forwarder = ClientForwarder(self.statements, ctx.registry, self.tracker.max_length)
        self.named_parse = False  # a named Parse went through unmapped in this transaction
        # --- the session-state ledger (docs/TRANSACTION.md "Session state") ---
        self.startup_extra: dict[str, str] = {}  # ``extra`` as the startup packet gave it
        #: a request of this transaction may have made or removed session state: the server
        #: connection is probed when the transaction ends (``_settle``)
        self.state_suspect = False
        self.deallocate_all = False  # a DEALLOCATE ALL went by (it drops SQL-level ones too)
        self.settling = False  # the probe runs: no server connection is taken meanwhile
        #: why the client keeps its server connection between transactions (empty: it does not)
        self.pinned: list[str] = _NO_PINS
        self.pinned_since = 0.0
        self._pin_timer: asyncio.TimerHandle | None = None
        # SQL-level PREPAREs carried: name -> source (replaced, never changed in place: the
        # empty one is shared)
        self.sql_prepared: dict[str, str] = _NO_PREPARED
        #: ``server`` with its type (the hot path reads it without a cast)
        self.linked: TxServerConnection | None = None
        # LISTEN/NOTIFY (net.notify): notifications kept until the transaction ends; the
        # client's prepared statements that are a LISTEN/UNLISTEN (answered by pgcorral)
        self._notes: list[bytes] = _NO_NOTES
        self._notes_bytes = 0
        self._listen_stmts: set[bytes] = NO_NAMES  # shared until the first (``_listen_extended``)
        # issue 13 (docs/HA.md): the pool of the transaction being served, and when this
        # client's last transaction on the primary ended (read-your-writes)
        self.tx_pool: Pool = ctx.pool
        self.tx_read = False  # it is a read (it cannot have written on the primary)
        self.wrote_at = 0.0

    # --- bytes from the client ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self.in_session:
            self.buffer(data)  # the cold path reads startup and authentication messages
            return
        self.activity += 1
        if self._pin_timer is not None:
            self._pin_timer.cancel()
            self._pin_timer = None
        rest = self._rest
        if rest:
            data = rest + data
            self._rest = b""
        server = self.linked
        if server is not None:
            self._forward(server, data)
        else:
            self._rest = data
            if len(data) > FRAMED_BUFFER_LIMIT and not self._rest_paused:
                self.transport.pause_reading()
                self._rest_paused = True
            self._want_server()

    def _want_server(self) -> None:
        """Unlinked with bytes waiting: get a server connection once a whole message is here."""
        if self._acquiring or self.closed or self.terminating or self.settling:
            return
        data = self._rest
        if len(data) < 5:
            return
        first = data[0]
        if first in _LOCAL_TYPES and (first != _PARSE_TYPE or len(data) < 6 or data[5] != 0) and (
                self.ctx.config.main.max_prepared_statements > 0):
            # (an unnamed Parse, the usual start of an extended-protocol batch, never is)
            self._answer_locally()
            data = self._rest
            if len(data) < 5:
                return
        type_: int
        length: int
        type_, length = _header_unpack_from(data, 0)
        if length < 4 or length - 4 > self.tracker.max_length:
            self._protocol_violation(f"invalid message length {length}")
            return
        if type_ == _TERMINATE_TYPE:
            self.end("terminate")
            return
        if type_ not in _SESSION_TYPES:
            self._protocol_violation(f"invalid frontend message type {type_}")
            return
        if len(data) < 1 + length:
            return
        ctx = self.ctx
        if ctx.shutting_down:
            self._shut_out()
            return
        if type_ in (_QUERY_TYPE, _PARSE_TYPE, _BIND_TYPE) and \
                self._answered_by_hub(data, type_, length):
            return
        if ctx.topology.replicas:  # issue 13: a read-only transaction may go to a replica
            pool = self._route(data, type_, length)
        else:
            pool = ctx.pool
            self.tx_read = False
        self.tx_pool = pool
        slot = pool.take_idle(self.key)
        if slot is not None:
            self._take(slot)
            return
        self._request_server(pool)

    def _answered_by_hub(self, data: bytes, type_: int, length: int) -> bool:
        """LISTEN/NOTIFY (net.notify): a Query of only LISTEN/UNLISTEN, or their extended
        form, is answered by the hub, without a server connection. True if it was."""
        if type_ == _QUERY_TYPE:
            if length > 5 and data[5] in _LISTEN_FIRST:
                ops = parse_listen(data[5:1 + length])
                if ops is not None:
                    self._rest = data[1 + length:]
                    self.ctx.notify.query(self, ops, b"")
                    return True
            return False
        return (type_ == _PARSE_TYPE or bool(self._listen_stmts)) and self._listen_extended(data)

    def _request_server(self, pool: Pool) -> None:
        """No idle connection: a new one, or a place in line. The wait is driven by callbacks
        (``_granted_tx``, ``_wait_expired``), not by the client's coroutine: a server
        connection freed by one client reaches the next without a task switch."""
        ctx = self.ctx
        main = ctx.config.main
        timeout = main.blocking_timeout
        if timeout <= 0:  # pgagroal: no blocking wait, max_retries tries spaced by the delay
            timeout = main.max_retries * main.connection_retry_delay
        self._acquiring = True
        self.wait_since_us = time.monotonic_ns() // 1000  # counted when linked (``_link``)
        # bound methods made per wait (rare: no idle connection), not kept on self: that
        # made every client a reference cycle, freed only by the cyclic collector (with the
        # OpenSSL memory of a TLS client, which it does not count)
        result = pool.request(self.key, timeout, self._granted_tx, self._wait_expired)
        if isinstance(result, Grant):
            self._use_grant(result)
            return
        self._waiter = result
        self._wait_timeout = timeout
        if timeout <= 0:
            self._wait_expired()
            return
        ctx.waits.watch()  # one timer for every waiting client (net.waits)

    def _route(self, data: bytes, type_: int, length: int) -> Pool:
        """Issue 13: the pool of this transaction, a replica's when it is read-only (the
        client's route, or its first Query: ``protocol.readonly``) and a healthy replica has
        replayed this client's last transaction on the primary (read-your-writes,
        ``Context.read_pool``); else the primary's."""
        declared = type_ == _QUERY_TYPE and starts_read_only(
            data[5:min(length, 5 + READ_ONLY_LOOK)])
        ctx = self.ctx
        if not (declared or self.read_only):
            self.tx_read = False
            return ctx.pool
        pool = ctx.read_pool(self.wrote_at if ctx.config.main.read_your_writes else 0.0)
        # a READ ONLY transaction cannot write, wherever it runs; a read-only client's
        # transaction sent to the primary (no replica qualified) is not stopped from writing
        self.tx_read = declared or pool is not ctx.pool
        return pool

    def _granted_tx(self, grant: Grant) -> None:
        """The pool serves our place in line: linked at once. (The pool calls this last in
        its bookkeeping; a transaction linked here cannot end before a server reply comes, so
        the pool is not re-entered from here.)"""
        self._waiter = None
        self._use_grant(grant)

    def _wait_expired(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or not self.tx_pool.cancel(waiter):
            return  # served meanwhile
        self._acquiring = False
        if self.tx_pool.held:  # waited for a new primary (issue 13) in vain
            self._fail(self.ctx.no_primary(self._wait_timeout))
            self.end("no primary")
            return
        self._fail(PoolExhausted(
            f'connection pool is full: no server connection for user "{self.user}", '
            f'database "{self.key[0]}" became free within {self._wait_timeout:g} s'))
        self.end("pool exhausted")

    def _use_grant(self, grant: Grant) -> None:
        """A slot from the pool for the client's next transaction: an idle one is linked now;
        a new one (or one to validate) is for the coroutine."""
        if grant.victim is not None and grant.victim.conn is not None:
            grant.victim.conn.terminate()
        if not grant.new:
            self._take(grant.slot)
            return
        self._acquiring = True
        if self._client_gone():
            self._acquiring = False
            _give_back(self.ctx, grant)
            return
        self._serve_in_coroutine(grant)

    def _take(self, slot: Slot) -> None:
        """An idle slot (its connection logged in) for the client's next transaction: linked
        now, unless it must be validated first (the coroutine does that)."""
        ctx = self.ctx
        server: TxServerConnection = slot.conn
        if self._client_gone():
            self._acquiring = False
            ctx.release_server(server, clean=True)
            return
        server.idle = False
        if server.closed:
            ctx.pool_of(slot, ctx.pool).discard(slot)
            self._acquiring = False
            self._want_server()
            return
        if ctx.config.main.validation != "foreground":
            server.router.reset()
            self._link(server)
            return
        self._acquiring = True
        self._serve_in_coroutine(Grant(slot, new=False))

    def _client_gone(self) -> bool:
        return self.closed or bool(self._ended)

    def _serve_in_coroutine(self, grant: Grant) -> None:
        """Open (or validate) the slot in a task (``_open_pending``), started if none runs."""
        self._grant_pending = grant
        if not self._opening:
            self._opening = True
            self._task = self.loop.create_task(self._open_pending())

    def _answer_locally(self) -> None:
        """Unlinked (so status 'I', no batch open): answer the leading Parse of statements a
        server accepted before, Close of mapped statements, Sync and Flush without a server."""
        data = self._rest
        registry = self.ctx.registry
        statements = self.statements
        out: list[bytes] = []
        pos, n = 0, len(data)
        try:
            while pos + 5 <= n:
                type_, length = _header_unpack_from(data, pos)
                end = pos + 1 + length
                if length < 4 or end > n:
                    break
                if type_ == codes.PARSE:
                    if length < 5 or data[pos + 5] == 0 or not parse_locally(
                            data[pos + 5:end], statements, registry):
                        break
                    name_end = data.find(b"\0", pos + 5, end)
                    if may_touch_state(data[name_end + 1:end]):
                        self.forwarder.add_stateful(data[pos + 5:name_end])
                        self.forwarder.add_custom(custom_setting_names(data[name_end + 1:end]))
                    out.append(PARSE_COMPLETE)
                elif type_ == codes.CLOSE:
                    if not close_locally(data[pos + 5:end], statements):
                        break
                    out.append(CLOSE_COMPLETE)
                elif type_ == codes.SYNC:
                    out.append(_READY_IDLE)
                elif type_ != codes.FLUSH:
                    break
                pos = end
        except ClientProtocolError:
            pass  # malformed: forwarded with the rest, where rewrite reports it
        if pos:
            self._rest = data[pos:]
            self.write(b"".join(out))

    def _forward(self, server: TxServerConnection, data: bytes) -> None:
        """Linked to ``server``: forward every whole message of ``data``, keep a partial one."""
        router = server.router
        plan = router.plan
        forwarder = self.forwarder
        send, self._rest, seen = forwarder.feed(data, plan, router.status)
        if send:
            server.sending(len(send))
            server.status = -1
            try:
                server.write_request(send)  # (issue 14, ddl: kept for a retry after DDL)
            except RuntimeError:  # the server's transport closed under us (uvloop raises)
                self.end("server lost")
        if seen:
            if seen & NAMED_PARSE:
                self.named_parse = True  # track_prepared_statements: DEALLOCATE ALL
            if seen & SESSION_STATE:
                self.state_suspect = True
            if seen & DEALLOCATE_ALL:
                self.deallocate_all = True
            if seen & DISCARD_ALL:
                self.extra = {}  # RESET ALL: non-reported settings back to defaults
                server.extra.clear()
                self.ctx.notify.leave(self)  # UNLISTEN * (net.notify)
            if seen & VIOLATION:
                self._protocol_violation(forwarder.violation)
                return
        if plan.out and router.at_boundary:  # replies pgcorral answered itself are due
            self.write(plan.fabricated_before_next())
        if seen & TERMINATE:
            self.terminating = True
            if plan.idle and router.at_boundary:
                self.end("terminate")
        elif not plan.steps and forwarder.at_rest and router.free and self.linked is server:
            self.server_free(server, b"")  # everything was answered here

    # --- linking -----------------------------------------------------------------------------

    def _link(self, server: TxServerConnection) -> None:
        self._acquiring = False
        record_sender(self.ctx.notify_senders, server, self.cancel_pid)  # NOTIFY pids
        self.server = self.peer = self.linked = server
        server.peer = server.client = self
        server.client_id = self.id
        server.mark()
        waited = 0
        since = self.wait_since_us
        if since:
            waited = time.monotonic_ns() // 1000 - since
            self.wait_since_us = 0
        tally = self.tally
        tally.wait_count += 1
        tally.wait_us += waited
        self.pstats.hist_wait.observe(waited)
        self.forwarder.link()
        if self.writing_paused:  # flow control follows the link
            server.transport.pause_reading()
        if server.writing_paused:
            self.transport.pause_reading()
        if self.params is not server.params or self.extra != server.extra:
            pairs = self._settings_for(server)
            if pairs:
                server.transport.write(msg.set_config_statement(pairs))
                server.router.plan.extend((own_query_step(),))
        if self.sql_prepared != server.sql_prepared:
            self._prepared_for(server)
        data, self._rest = self._rest, b""
        if self._rest_paused:
            self._rest_paused = False
            self.transport.resume_reading()
        self._forward(server, data)

    def _settings_for(self, server: TxServerConnection) -> list[tuple[str, str | None]]:
        """What to set on ``server`` so that it shows this client's settings."""
        pairs: list[tuple[str, str | None]] = []
        mine, theirs = self.params, server.params
        if mine is not theirs:
            if mine == theirs:
                # The same values: both keep the older dict (the lower id), so that equal
                # parameters end up in one dict everywhere and ``_link`` finds them equal by
                # identity. (Parameter dicts are replaced, never changed in place.)
                if id(theirs) < id(mine):
                    self.params = theirs
                else:
                    server.params = mine
            else:
                for name, value in mine.items():
                    now = theirs.get(name)
                    if now is not None and now != value and name not in READ_ONLY_PARAMS:
                        pairs.append((name, value))
        mine_extra, their_extra = self.extra, server.extra
        if mine_extra != their_extra:
            for name, value in mine_extra.items():
                if their_extra.get(name) != value:
                    pairs.append((name, value))
            for name in their_extra:
                if name not in mine_extra:
                    pairs.append((name, None))  # set_config(name, NULL) resets it
            server.extra = dict(mine_extra)
        return pairs

    def _prepared_for(self, server: TxServerConnection) -> None:
        """Make the SQL-level prepared statements on ``server`` the client's: the others'
        deallocated, the client's missing ones prepared again (one Query each, replies
        dropped: a PREPARE that fails now, its table gone, leaves the name unknown, 26000 on
        EXECUTE, as the client's own connection would after a DEALLOCATE)."""
        mine, theirs = self.sql_prepared, server.sql_prepared
        queries = [f'DEALLOCATE "{name}"' for name, text in theirs.items()
                   if mine.get(name) != text]
        queries += [text for name, text in mine.items() if theirs.get(name) != text]
        for query in queries:
            server.transport.write(msg.query(query))
            server.router.plan.extend((own_query_step(),))
        server.sql_prepared = mine

    def _unlink(self, server: TxServerConnection) -> None:
        self.server = self.peer = self.linked = None
        ctx = self.ctx
        if ctx.topology.known and server.slot.home is ctx.pool and not self.tx_read:
            # read-your-writes: when this client's last primary transaction ended (it may
            # have written; Context.read_pool compares with the health checker's rounds)
            self.wrote_at = time.monotonic()
        server.peer = server.client = None
        server.client_id = 0
        # what the transaction did is the client's; it held the connection for its length
        tally = self.tally
        tally.add_since(server.tally, server.at_link)
        tally.hold_us += server.tally.xact_us - server.at_link.xact_us
        self.params = server.params  # replaced, never changed in place: shared safely
        if server.writing_paused:
            self.transport.resume_reading()
        if self.writing_paused:
            server.transport.resume_reading()

    def server_free(self, server: TxServerConnection, extra: bytes) -> None:
        """The router found the end of the transaction: unlink and give the server back."""
        if extra:
            log.info("server connection %d (pid %d) sent %d bytes nobody asked for; closing it",
                     server.slot.id, server.pid, len(extra))
            server.poolable = False
        if self._notes:  # notifications that came during the transaction (net.notify): the
            self._flush_notes()  # client's stream stands after a ReadyForQuery 'I' now
        if self.pinned or self.state_suspect:
            if server.poolable:
                self._stay(server)
                return
            self.state_suspect = False
            if self.pinned:  # its state went with the connection: as if the server left
                self.server_lost()
                return
            # A transaction that may have made session state (a SET the client was told
            # succeeded), and the connection is unusable (its backend's FATAL came right
            # after): the state is gone, so is the session, as when a backend dies (found by
            # the mixing fuzzer). PostgreSQL's FATAL goes to the client if that is what came.
            self._unlink(server)
            self.ctx.release_server(server, clean=False)
            self.write(extra if extra and fatal_ending_at(extra, len(extra)) else
                       msg.error_response("08006", "server closed the connection unexpectedly"))
            self.end("server lost")
            return
        self._unlink(server)
        track = False
        if self.named_parse:
            track = self.ctx.config.main.track_prepared_statements
            self.named_parse = False
        if not server.poolable:
            self.ctx.release_server(server, clean=False)
        elif track:  # pgagroal's track_prepared_statements (mapping off)
            asyncio.get_running_loop().create_task(
                _reset_and_release(self.ctx, server, "DEALLOCATE ALL"))
        else:
            release_free(self.ctx, server)
        if self.terminating:
            self.end("terminate")
        elif self.ctx.shutting_down:
            self._shut_out()
        elif self._rest:
            self._want_server()

    # --- LISTEN/NOTIFY (net.notify) -----------------------------------------------------

    def notify(self, data: bytes) -> None:
        """A NotificationResponse for this client: written now between transactions (the
        stream stands on a message boundary), else kept until the transaction ends. A client
        that lets MAX_QUEUED notifications (or MAX_QUEUED_BYTES) pile up is closed."""
        if self.closed or not self.in_session:
            return
        notes = self._notes
        if not notes and (self.linked is None or self._idle_pinned()):
            self.write(data)
            if self.writing_paused and (
                    self.transport.get_write_buffer_size() > MAX_QUEUED_BYTES):
                self._notes_overflow()
            return
        if notes is _NO_NOTES:
            self._notes = notes = []
        notes.append(data)
        self._notes_bytes += len(data)
        if len(notes) > MAX_QUEUED or self._notes_bytes > MAX_QUEUED_BYTES:
            self._notes_overflow()

    def _idle_pinned(self) -> bool:
        """Pinned (linked between transactions) and nothing in flight: at a boundary."""
        server = self.linked
        if not self.pinned or server is None:
            return False
        router = server.router
        return router.plan.idle and router.at_boundary and self.forwarder.at_rest

    def _flush_notes(self) -> None:
        notes, self._notes = self._notes, _NO_NOTES
        self._notes_bytes = 0
        self.write(b"".join(notes))
        if self.writing_paused and self.transport.get_write_buffer_size() > MAX_QUEUED_BYTES:
            self._notes_overflow()

    def _notes_overflow(self) -> None:
        log.warning("closing client %s (user %r): it does not take its notifications (more "
                    "than %d or %d bytes waiting)", self.address or "[local]", self.user,
                    MAX_QUEUED, MAX_QUEUED_BYTES)
        self._notes = _NO_NOTES
        self._notes_bytes = 0
        if self.linked is None or self._idle_pinned():  # else maybe inside a reply: no message
            self.write(msg.error_response(
                "53400", "too many notifications waiting for this client: it does not read "
                "them, or its transaction lasts too long"))
        self.ctx.notify.leave(self)
        self.end("notification queue full")

    def _listen_extended(self, data: bytes) -> bool:
        """An extended-protocol batch of one LISTEN/UNLISTEN (``protocol.listen.
        extended_batch``), whole in ``data``: answered by the hub (or, a Parse only, here)."""
        if data[0] == _PARSE_TYPE:  # the first byte of its text, as for a Query
            at = data.find(b"\0", 5)
            if at < 0 or at + 1 >= len(data) or data[at + 1] not in _LISTEN_FIRST:
                return False
        batch = extended_batch(data, self.statements.names,
                               self.ctx.config.main.max_prepared_statements > 0)
        if batch is None:
            return False
        self._rest = data[batch.end:]
        prepared = batch.prepared
        if prepared is not None:
            names = self.statements.names
            listen_stmts = self._listen_stmts
            if listen_stmts is NO_NAMES or len(listen_stmts) >= 64:  # its own set; forget the
                # ones closed since (bounded by the client's)
                self._listen_stmts = listen_stmts = {n for n in listen_stmts if n in names}
            # (pooler name, identity), as the mapper keeps them (protocol.rewrite)
            names[prepared[0]] = (self.ctx.registry.fresh_for(prepared[1]), prepared[1])
            listen_stmts.add(prepared[0])
            self.forwarder.add_stateful(prepared[0])  # run on a server later: the ledger sees it
        if batch.ops:
            self.ctx.notify.query(self, batch.ops, batch.replies)
        else:
            self.listen_busy()
            self.loop.call_soon(self.listen_done,
                                batch.replies + _READY_IDLE if batch.synced else batch.replies)
        return True

    def listen_busy(self) -> None:
        """A LISTEN/UNLISTEN Query is being answered: later requests wait (``listen_done``)."""
        self._acquiring = True

    def listen_done(self, reply: bytes) -> None:
        """The answer to a LISTEN/UNLISTEN Query; then the requests that came after it. (Called
        from the loop, never from ``_want_server`` itself: a client pipelining thousands of
        LISTEN Queries must not recurse.)"""
        self._acquiring = False
        self.write(reply)
        if self._rest_paused and len(self._rest) <= FRAMED_BUFFER_LIMIT:
            self._rest_paused = False
            self.transport.resume_reading()
        if self.ctx.shutting_down and not self.closed:
            self._shut_out()  # (``shutdown_started`` passed it by while it was busy)
        elif self.linked is None:
            self._want_server()

    def login_relay(self) -> AuthRelay:
        """How a new server connection for this client logs in (the listening connection of
        net.notify too): the vault password, or what ``_relay_auth`` can answer."""
        vault = self.vault_login
        if vault is not None:
            return vault
        return self._relay_auth

    # --- the session-state ledger --------------------------------------------------------------

    def _stay(self, server: TxServerConnection) -> None:
        """The transaction ended on a server connection that may hold session state (or
        holds it: the client is pinned). It stays the client's for now: probed, or kept."""
        if self.state_suspect:
            self.state_suspect = False
            self._unlink(server)
            self.settling = True
            asyncio.get_running_loop().create_task(self._settle(server))
            return
        # pinned and nothing touched the state: keep the link
        if self.terminating:
            self.end("terminate")
        elif self.ctx.shutting_down:
            self._shut_out()
        else:
            self._arm_pin_timer()

    async def _settle(self, server: TxServerConnection) -> None:
        """Ask ``server`` what session state it holds (``sessionsql.PROBE``), then pin the
        client to it, or carry the settings and SQL-level PREPAREs and release it."""
        ctx = self.ctx
        try:
            async with asyncio.timeout(RESET_TIMEOUT):
                rows = await server.query_rows(PROBE, [names_array(self.forwarder.custom)])
                state = probe_result(rows[0])
                if self.deallocate_all and state.prepared:
                    for name in state.prepared:
                        await server.query_rows(f'DEALLOCATE "{name}"', [])
                    state = state._replace(prepared={})
        except Exception as exc:  # lost, refused or timed out: the state is unknown
            # The client was told its SET (or lock...) succeeded, and what it made is gone
            # with the connection: as when a backend dies, the session ends (found by the
            # mixing fuzzer: the next transaction ran with the old setting).
            log.info("server connection %d (pid %d): session state probe failed (%s); "
                     "closing it and its client %d", server.slot.id, server.pid, exc, self.id)
            self.settling = False
            self.deallocate_all = False
            self._unpin()
            ctx.release_server(server, clean=False)
            if not self._client_gone():  # (the probe read what the server said last)
                self.write(msg.error_response(
                    "08006", "server closed the connection unexpectedly"))
                self.end("server lost")
            return
        self.settling = False
        self.deallocate_all = False
        reasons = pins(state, server.slot.key[1])
        settings = {k: v for k, v in state.settings.items() if k not in server.names}
        if state.role != "none":
            settings["role"] = state.role
        settings.update(state.custom)
        server.extra = settings
        server.sql_prepared = state.prepared
        if self._client_gone():
            # a connection with state nobody owns any more: closed, not reused
            ctx.release_server(server, clean=not reasons)
            return
        self.extra = {**self.startup_extra, **settings}
        self.sql_prepared = state.prepared
        if reasons:
            if not self.pinned:
                limit = (ctx.config.main.max_pinned_connections
                         or max(1, ctx.pool.max_connections // 2))
                if ctx.pinned >= limit:
                    self._fail_pinned(server, reasons, limit)
                    return
                ctx.pinned += 1
                self.pinned_since = time.monotonic()
                log.info("client %d pinned to server connection %d (pid %d): %s",
                         self.id, server.slot.id, server.pid, ", ".join(reasons))
            self.pinned = reasons
            server.router.reset()
            self._relink(server)
            return
        if self.pinned:
            log.info("client %d unpinned from server connection %d (pid %d)",
                     self.id, server.slot.id, server.pid)
            self._unpin()
        release_free(ctx, server)
        if self.terminating:
            self.end("terminate")
        elif ctx.shutting_down:
            self._shut_out()
        elif self._rest:
            self._want_server()

    def _relink(self, server: TxServerConnection) -> None:
        """Linked again to the connection it is pinned to (no wait counted)."""
        self.server = self.peer = self.linked = server
        server.peer = server.client = self
        server.client_id = self.id
        server.mark()
        self.forwarder.link()
        if self.writing_paused:
            server.transport.pause_reading()
        if server.writing_paused:
            self.transport.pause_reading()
        data, self._rest = self._rest, b""
        if self._rest_paused:
            self._rest_paused = False
            self.transport.resume_reading()
        if self.terminating:
            self.end("terminate")
        elif self.ctx.shutting_down and not data:
            self._shut_out()
        elif data:
            self._forward(server, data)
        else:
            self._arm_pin_timer()

    def _unpin(self) -> None:
        if self.pinned:
            self.pinned = _NO_PINS
            self.ctx.pinned -= 1
        if self._pin_timer is not None:
            self._pin_timer.cancel()
            self._pin_timer = None

    def _arm_pin_timer(self) -> None:
        timeout = self.ctx.config.main.pin_timeout
        if timeout > 0 and self._pin_timer is None and not self.closed:
            self._pin_timer = asyncio.get_running_loop().call_later(timeout, self._pin_expired)

    def _pin_expired(self) -> None:
        self._pin_timer = None
        server = self.linked
        if server is None or not self.pinned or self.closed:
            return
        if not (server.router.plan.idle and server.router.at_boundary
                and self.forwarder.at_rest):
            return  # a request is in flight: the client is not idle
        timeout = self.ctx.config.main.pin_timeout
        log.warning("client %d: pinned to server connection %d (pid %d) for %s and idle "
                    "for %g s (pin_timeout); closing it", self.id, server.slot.id, server.pid,
                    ", ".join(self.pinned), timeout)
        self.write(msg.error_response(
            "57P05", f"terminating connection: it held a pooled server connection "
            f"({', '.join(self.pinned)}) and was idle for longer than pin_timeout "
            f"({timeout:g} s)", severity="FATAL"))
        self.end("pin timeout")

    def _fail_pinned(self, server: TxServerConnection, reasons: list[str],
                     limit: int) -> None:
        log.warning("client %d: %s would pin server connection %d (pid %d), but "
                    "max_pinned_connections (%d) are pinned already; closing both",
                    self.id, ", ".join(reasons), server.slot.id, server.pid, limit)
        self.ctx.release_server(server, clean=False)
        self.write(msg.error_response(
            "53300", f"too many pinned server connections: {', '.join(reasons)} would keep "
            f"one for this client, and max_pinned_connections ({limit}) are in use; use "
            "transaction-scoped state (pg_advisory_xact_lock, ON COMMIT DROP) or session "
            "pooling", severity="FATAL"))
        self.end("pinned connections exhausted")

    def shutdown_started(self) -> None:
        """Graceful shutdown: a client between transactions is told and closed now."""
        if self.in_session and self.pinned and self.linked is not None:
            router = self.linked.router
            if router.plan.idle and router.at_boundary and self.forwarder.at_rest:
                self._shut_out()
            return
        if self.in_session and self.server is None and not self._acquiring:
            self._shut_out()

    def _shut_out(self) -> None:
        self.write(msg.error_response("57P01", "terminating connection due to administrator "
                                      "command"))
        self.end("shutdown")

    def server_lost(self) -> None:
        self.end("server lost")

    def _end_session(self, reason: str) -> None:
        """The client leaves after its greeting (``end``): its server connection, if any, is
        cleaned (``_finish``), then it goes; after ``_open_pending`` if that runs."""
        if not self._ended:
            self._ended = reason
        if not self._opening:
            self._finish_and_go()

    # --- the coroutine -----------------------------------------------------------------------

    async def _login(self, settings: dict[str, str], rule: HbaRule) -> None:
        """Without a server connection when pgcorral can answer the login itself: the client is
        authenticated (vault, auth_query) or PostgreSQL trusted this user last time, and every
        reported setting it asks for has a known outcome (``Context.learned``). Else as in
        session mode, then the login's server connection goes back to the pool."""
        ctx = self.ctx
        key = (ctx.config.real_database(self.database), self.user)
        known = ctx.tx_logins.get(key)
        if known is not None and (self.vault_login is not None or known.trusted):
            params = _predict(known.baseline, known.names, settings, ctx.learned)
            if params is not None:
                self.key = key
                await self._greet_and_serve(params, _extra(settings, known.names))
                return
        await super()._login(settings, rule)

    async def _link_and_serve(self, server: ServerConnection) -> None:
        """The login went through a server connection: remember what it showed, give it back."""
        ctx = self.ctx
        tx_server: TxServerConnection = server  # type: ignore[assignment]
        self.key = server.slot.key
        memento = server.memento
        ctx.tx_logins[self.key] = TxLogin(server.baseline, server.names,
                                          memento is not None and memento[0] == "trust")
        extra = _extra(self.settings, server.names)
        tx_server.extra.update(extra)
        params = server.params
        if server.status == codes.TX_IDLE:
            server.requests = []
            release_free(ctx, tx_server)
        else:
            ctx.release_server(server, clean=False)
        await self._greet_and_serve(params, extra)

    async def _greet_and_serve(self, params: dict[str, str], extra: dict[str, str]) -> None:
        """Greet the client; from then on callbacks serve it: the coroutine ends here, an idle
        client holds no task (issue 15). A server connection to open or validate gets a task
        of its own (``_open_pending``), and so does the end when a reset must be awaited."""
        self.cancel_pid, secret = self.ctx.cancels.issue_virtual(self)
        self.params = params
        self.extra = extra
        self.startup_extra = extra  # (``extra`` is replaced, never changed in place)
        pipelined = self._greet(b"".join(msg.parameter_status(k, v) for k, v in params.items()),
                                self.cancel_pid, secret, codes.TX_IDLE)
        waited = self.login_wait_us
        if waited:  # the login waited for a server connection (a full pool)
            tally = self.tally
            tally.wait_us += waited
            tally.wait_count += 1
            self.pstats.hist_wait.observe(waited)
        self.in_session = True
        self._to_callbacks()
        if self._ended:  # the client left while the coroutine worked
            self.end(self._ended)
        elif pipelined:
            try:
                self.data_received(pipelined)
            except Exception as exc:  # as a callback's would: reported, the client ended
                self._report(exc)
                self.end("error")

    async def _open_pending(self) -> None:
        """Opens (or validates) the server connections the callbacks could not link at once
        (``_grant_pending``), until none is pending or the client left; then, if it left,
        its end (``_finish_and_go``)."""
        try:
            while not self._ended:
                grant = self._grant_pending
                if grant is None:
                    return
                self._grant_pending = None
                try:
                    server = await self._ready_server(grant)
                except (ConnectionLost, ConnectionError):
                    self.end("error")
                    return
                except PgCorralError as exc:
                    self._fail(exc)
                    self.end("error")
                    return
                if server is None:  # failed validation: try again
                    self._acquiring = False
                    self._want_server()
                    continue
                if self._ended:
                    release_free(self.ctx, server)
                    return
                server.router.reset()
                self._link(server)
        except Exception as exc:
            self._report(exc)
            self.end("error")
        finally:
            self._opening = False
            self._task = None
            if self._ended:
                self._finish_and_go()

    def _finish_and_go(self) -> None:
        """``_finish``, then the client goes (``_done``): in callbacks when no reset must be
        awaited (the usual end: no server connection linked), else in a task."""
        server = self._finish()
        if server is None:
            self._done()
        else:
            self._task = self.loop.create_task(self._reset_and_go(server))

    async def _reset_and_go(self, server: TxServerConnection) -> None:
        """The end of a client that left with a clean server connection linked: it is rolled
        back (and reset with ``server_reset_query_always``) before it goes back."""
        ctx = self.ctx
        try:
            main = ctx.config.main
            ok = await reset(server, main.server_reset_query
                             if main.server_reset_query_always else "")
        except Exception as exc:
            self._report(exc)
            ok = False
        try:
            if ok:
                release_free(ctx, server, run_reset=False)
            else:
                ctx.release_server(server, clean=False)
        finally:
            self._done()

    async def _ready_server(self, grant: Grant) -> TxServerConnection | None:
        ctx = self.ctx
        if grant.victim is not None and grant.victim.conn is not None:
            await grant.victim.conn.wait_gone()  # PostgreSQL never holds both at once
        if grant.new:
            server: TxServerConnection = await self._open(  # type: ignore[assignment]
                grant.slot, self.key)
            return server
        server = grant.slot.conn
        if await server.validate(VALIDATION_TIMEOUT):
            return server
        ctx.release_server(server, clean=False)
        return None

    def _finish(self) -> TxServerConnection | None:
        """The client left (or was ended): what it held is given back; a server connection
        to roll back first is returned (``_reset_and_go``)."""
        ctx = self.ctx
        ctx.cancels.drop(self, self.cancel_pid)
        ctx.notify.leave(self)  # LISTEN/NOTIFY: unsubscribed from everything (net.notify)
        if self._waiter is not None:
            self.tx_pool.cancel(self._waiter)
            self._waiter = None
        if self._grant_pending is not None:
            _give_back(ctx, self._grant_pending)
            self._grant_pending = None
        reason = self._ended or "error"
        server = self.linked
        pinned = bool(self.pinned)
        self._unpin()
        if server is None:
            return None
        if reason == "server lost" and not server.fatal_sent:  # one error, not two
            self.write(msg.error_response("08006", "server closed the connection unexpectedly"))
        if pinned:  # its advisory locks, temporary tables, cursors go with the backend
            self._unlink(server)
            ctx.release_server(server, clean=False)
            return None
        self._unlink(server)
        router = server.router
        if (not self.dirty and self.forwarder.at_rest and router.at_boundary
                and router.plan.idle and server.poolable and not server.closed
                and router.status in (codes.TX_IDLE, codes.TX_IN_BLOCK, codes.TX_FAILED)):
            server.status = router.status
            server.transport.resume_reading()
            return server
        ctx.release_server(server, clean=False)
        return None

    # --- authentication of later logins --------------------------------------------------

    async def _relay_auth(self, request: bytes) -> bytes:
        """Pass-through users: at login the client answers; a connection opened later for the
        same client can only be logged in with a cleartext password it gave (or trust)."""
        code = msg.parse_auth_code(request)
        if self.in_session:
            if code == codes.AUTH_CLEARTEXT_PASSWORD and self._cleartext is not None:
                return self._cleartext
            raise AuthenticationError(
                f'transaction pipeline: cannot open a new server connection for user '
                f'"{self.user}" (PostgreSQL asks for a password pgcorral does not know); '
                'add the user to the vault (-u) or use auth_query', sqlstate="08004")
        answer = await super()._relay_auth(request)
        if code == codes.AUTH_CLEARTEXT_PASSWORD:
            self._cleartext = answer
        return answer

    async def _check_reused(self, server: ServerConnection, rule: HbaRule) -> None:
        if self.in_session:
            return  # the client proved who it is at login
        await super()._check_reused(server, rule)
        memento = server.memento
        if memento is not None and memento[0] == "password":
            self._cleartext = memento[1]
