"""Connections from pgcorral to PostgreSQL: open, log in, reset, apply a client's settings.

A ``ServerConnection`` is linked to at most one client at a time. While linked (relay mode) each
chunk from PostgreSQL is written to the client as is; the only look at it is whether the chunk
ends with a ReadyForQuery, which gives the transaction status pgcorral needs when the client
leaves (``status``, -1 when unknown). Everything else here runs outside the data path.

The reset after a session client left usually runs in callbacks (``reset_then``): the same
request in the same state gets the same reply bytes as at the last checked reset, so the bytes
are compared as they arrive, without a task; anything else is checked message by message in a
coroutine (``reset``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from pgcorral.errors import AuthenticationError, ServerError, ServerProtocolError
from pgcorral.net.endpoint import ConnectionLost, Endpoint
from pgcorral.pipelines.settings import Pairs, canonical_names
from pgcorral.pool.stats import PoolStats, Tally
from pgcorral.protocol import codes
from pgcorral.protocol import messages as msg
from pgcorral.protocol.framing import MessageReader
from pgcorral.protocol.messages import error_sqlstate_ending_at, fatal_ending_at
from pgcorral.protocol.replies import EXTENDED_ROW_REPLIES, Replies
from pgcorral.protocol.scram import tls_server_end_point
from pgcorral.protocol.scram_client import without_channel_binding

if TYPE_CHECKING:
    from pgcorral.pool.pool import Slot

log = logging.getLogger("pgcorral.server")

_READY_TAIL = b"\0\0\0\x05"
_TX_IDLE = codes.TX_IDLE
#: the pool counters of a server connection no pool gave any (tests, pgcorral's own probes)
NO_POOL_STATS = PoolStats()
#: Seconds a terminated connection may wait for PostgreSQL to close it before it is aborted.
DRAIN_TIMEOUT = 2.0

#: Called with an Authentication request body from the server; returns the client's answer.
AuthRelay = Callable[[bytes], Awaitable[bytes]]
#: Called when a reset is over: (the connection, clean).
Release = Callable[["ServerConnection", bool], None]
T = TypeVar("T")
_AUTH_OK = msg.authentication_ok()


class ResetPlan(NamedTuple):
    """What a reset sends and which replies it must get, built once per (rollback, reset
    query, settings to re-apply) and kept by the connection."""

    rollback: bool  # the connection was in a transaction block
    reset_query: str
    requests: Pairs  # the last client's reported startup settings (re-applied after DISCARD ALL)
    payload: bytes
    expected_ready: int
    tags: list[str] | None  # the command tags DISCARD ALL must give; None: not checked


def plan_reset(rollback: bool, reset_query: str, requests: Pairs) -> ResetPlan:
    queries = ["ROLLBACK"] if rollback else []
    if reset_query:
        queries.append(reset_query)
    discard_all = reset_query.strip().upper().rstrip(";") == "DISCARD ALL"
    reapply = requests if discard_all else []
    payload = b"".join(msg.query(q) for q in queries)
    if reapply:
        payload += msg.set_config_statement(reapply)
    tags = [q.upper() for q in queries] + (["SELECT 1"] if reapply else []) if discard_all \
        else None
    return ResetPlan(rollback, reset_query, requests, payload,
                     len(queries) + (1 if reapply else 0), tags)


class _Expected(NamedTuple):
    """A reset in callbacks: the reply bytes it waits for and what to do next."""

    plan: ResetPlan
    replies: bytes  # exactly what the last checked reset got
    before: dict[str, str]  # the parameters when it was sent
    release: Release
    timer: asyncio.TimerHandle


class ServerConnection(Endpoint):
    side = "server"

    def __init__(self, slot: Slot, on_lost: Callable[[ServerConnection], None]) -> None:
        super().__init__(MessageReader(codes.LARGE_MESSAGE_LIMIT))
        self.slot = slot
        self._on_lost = on_lost
        self.idle = False  # True while it sits in the pool
        self.status = -1  # last known transaction status byte, -1 when unknown
        self.params: dict[str, str] = {}  # what PostgreSQL reports now
        self.baseline: dict[str, str] = {}  # what it reported at login (= after RESET ALL)
        self.pid = 0
        self.secret = 0
        # How the server authenticated us, for checking the next client of a pass-through login:
        # ("trust", b""), ("password", cleartext), ("md5", salt + response).
        self.memento: tuple[str, bytes] | None = None
        self.poolable = True
        self.names: dict[str, str] = {}  # lower-case setting name -> reported spelling
        self.requests: Pairs = []  # the linked client's startup requests for reported settings
        self._greeting: bytes | None = None  # AuthenticationOk + ParameterStatus of params
        self._reset_plan: ResetPlan | None = None  # the last one (the next is usually the same)
        # (reset payload, params before, exact reply bytes) of the last checked reset that left
        # the parameters as they were: the same request in the same state gets the same bytes.
        self._known_replies: tuple[bytes, dict[str, str], bytes] | None = None
        self._expected: _Expected | None = None  # a reset running in callbacks
        self.draining = False  # terminated; waiting for PostgreSQL to close its end
        self._drain_timer: asyncio.TimerHandle | None = None
        self._gone: asyncio.Future[None] | None = None
        self._lost = False
        self.tls = False  # the connection to PostgreSQL is TLS
        self.cbind: bytes | None = None  # its tls-server-end-point data (SCRAM-SHA-256-PLUS)
        self.binding_policy = "prefer"  # the server section's channel_binding
        self.tls_generation = 0  # Context.tls_generation when it was opened
        self.server_name = ""  # the server section it is connected to (cancels go there)
        # counters (pool.stats): what its clients did through it; ``connect_time`` is epoch
        self.tally = Tally()
        self.at_link = Tally()  # ``tally`` when the current client was linked (``mark``)
        self.connect_time = time.time()
        self.client_id = 0  # the linked client's id (views), 0 when none
        self.pstats: PoolStats = NO_POOL_STATS  # its pool's, set by the factory (context)
        # monotonic microseconds: the request being answered began (0: none), its
        # transaction began (0: none), the last ReadyForQuery came
        self.request_us = 0
        self.xact_start_us = 0
        self.last_ready_us = 0
        #: query_timeout: the ``request_us`` of the request a cancel was sent for
        self.timeout_cancelled = 0
        #: the last bytes passed to a client ended with a FATAL ErrorResponse (PostgreSQL's
        #: goodbye): a client whose server then closes gets no 08006 of pgcorral's on top
        self.fatal_sent = False

    def data_received(self, data: bytes) -> None:
        client = self.peer
        if client is not None:
            try:
                client.transport.write(data)
            except RuntimeError:  # the client's transport closed under us (uvloop raises)
                return
            self.tally.bytes_sent += len(data)
            if len(data) >= 6 and data[-6] == 90 and data[-5:-1] == _READY_TAIL:
                status = self.status = data[-1]
                self.ready(data, status)
                if client.terminating:
                    client.end("terminate")
            else:
                self.status = -1
                n = len(data)
                if data[-1] == 0 and n >= 8 and data[-2] == 0 and data[-3] != 0:
                    self.count_error(data, n)  # maybe an ErrorResponse, its ReadyForQuery next
            return
        if self.draining:
            return  # a FATAL or notice after our Terminate
        if self.idle:
            # An idle server speaks only to say goodbye (FATAL on shutdown or termination).
            log.info("server connection %d (pid %d) sent data while idle; closing it",
                     self.slot.id, self.pid)
            self.poolable = False
            self.close()
            return
        self.buffer(data)

    def mark(self) -> None:
        """A client is linked: what it does from now on is its own (``at_link``)."""
        self.at_link.copy_from(self.tally)
        self.request_us = self.xact_start_us = 0

    def sending(self, n: int) -> None:
        """``n`` bytes of the linked client's requests go to PostgreSQL: unless a request is
        being answered, one begins now (and, outside a transaction, a transaction)."""
        self.tally.bytes_received += n
        if not self.request_us:
            now = time.monotonic_ns() // 1000
            self.request_us = now
            if not self.xact_start_us:
                self.xact_start_us = now

    def answered(self, queries: int, xacts: int) -> None:
        """ReadyForQuery came: ``queries`` requests answered (the time since the first went
        to PostgreSQL is counted once) and ``xacts`` transactions ended."""
        now = time.monotonic_ns() // 1000
        self.last_ready_us = now
        tally = self.tally
        pstats = self.pstats
        tally.query_count += queries
        start = self.request_us
        if start:
            took = now - start
            tally.query_us += took
            pstats.hist_query.observe(took)
            self.request_us = 0
        if xacts:
            tally.xact_count += xacts
            start = self.xact_start_us
            if start:
                took = now - start
                tally.xact_us += took
                pstats.hist_xact.observe(took)
                self.xact_start_us = 0

    def ready(self, data: bytes, status: int) -> None:
        """Session pooling: ``data`` ended with a ReadyForQuery of ``status``: count the query
        (one per chunk, however many ReadyForQuery it holds) and, at 'I', the transaction;
        an ErrorResponse right before it counts under its SQLSTATE class."""
        self.answered(1, 1 if status == _TX_IDLE else 0)
        n = len(data)
        if n >= 14 and data[-7] == 0 and data[-8] == 0 and data[-9] != 0:
            self.count_error(data, n - 6)

    def count_error(self, data: bytes, end: int) -> None:
        """Session pooling: count the ErrorResponse that may end at ``end`` in ``data``; at
        the chunk's end, a FATAL one is the server's goodbye (``fatal_sent``)."""
        code = error_sqlstate_ending_at(data, end)
        if code:
            self.pstats.error(code)
            if end == len(data):
                self.fatal_sent = fatal_ending_at(data, end)

    def note_fatal(self, data: bytes) -> None:
        """``data`` went to the client: if it ends with a FATAL ErrorResponse, PostgreSQL
        said goodbye itself, and the client gets no 08006 of pgcorral's after it."""
        n = len(data)
        if n >= 8 and data[-1] == 0 and data[-2] == 0 and data[-3] != 0:
            self.fatal_sent = fatal_ending_at(data, n)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.loop = asyncio.get_running_loop()
        ssl_object = transport.get_extra_info("ssl_object")  # net.tls.TlsLink
        if ssl_object is not None:
            self.tls = True
            try:
                self.cbind = tls_server_end_point(ssl_object.getpeercert(True))
            except ValueError:  # e.g. an Ed25519 certificate: no SCRAM-SHA-256-PLUS
                self.cbind = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.poolable = False
        self._lost = True
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        self._on_lost(self)

    async def wait_gone(self) -> None:
        """Until the connection is closed (after ``terminate``: PostgreSQL closed it)."""
        if self._lost:
            return
        if self._gone is None:
            self._gone = self.loop.create_future()
        await self._gone

    # --- login -------------------------------------------------------------------------------

    async def login(self, user: str, database: str, relay: AuthRelay) -> None:
        """Log in as ``user``; authentication requests are answered through ``relay``."""
        self.write(msg.startup_message({"user": user, "database": database}))
        bind = getattr(relay, "bind", None)  # VaultLogin: pgcorral answers with SCRAM itself
        if bind is not None:
            bind(self.cbind, self.binding_policy)
        while True:
            type_, body = await self.read_message()
            if type_ == codes.AUTHENTICATION:
                await self._authenticate(body, relay)
            elif type_ == codes.PARAMETER_STATUS:
                name, value = _parse(msg.parse_parameter_status, body)
                self.params[name] = value
            elif type_ == codes.BACKEND_KEY_DATA:
                self.pid, self.secret = _parse(msg.parse_backend_key_data, body)
            elif type_ == codes.READY_FOR_QUERY:
                self.status = body[0] if body else -1
                self.baseline = dict(self.params)
                self.names = canonical_names(self.baseline)
                return
            elif type_ == codes.ERROR_RESPONSE:
                raise ServerError(_parse(msg.parse_fields, body))
            elif type_ in (codes.NOTICE_RESPONSE, codes.NEGOTIATE_PROTOCOL_VERSION):
                continue
            else:
                raise ServerProtocolError(f"unexpected message {chr(type_)!r} during login")

    async def _authenticate(self, body: bytes, relay: AuthRelay) -> None:
        code = _parse(msg.parse_auth_code, body)
        if code == codes.AUTH_OK:
            if self.memento is None:
                self.memento = ("trust", b"")
            authenticated = getattr(relay, "authenticated", None)
            if authenticated is not None:
                authenticated()
            return
        if not getattr(relay, "pass_through", True):  # pgcorral answers with the vault password
            self.memento = ("vault", b"")
            answer = await relay(body)
            if code != codes.AUTH_SASL_FINAL:
                self.write(msg.password_message(answer))
            return
        if code == codes.AUTH_CLEARTEXT_PASSWORD:
            answer = await relay(body)
            self.memento = ("password", answer)
        elif code == codes.AUTH_MD5_PASSWORD:
            answer = await relay(body)
            self.memento = ("md5", body[4:8] + answer)
        elif code in (codes.AUTH_SASL, codes.AUTH_SASL_CONTINUE, codes.AUTH_SASL_FINAL):
            # SCRAM cannot be replayed to check a later client: never pooled (for now).
            self.poolable = False
            self.memento = ("scram", b"")
            if code == codes.AUTH_SASL:
                # a relayed exchange cannot be bound to this connection's TLS: the client
                # would bind to pgcorral's certificate (docs/TLS.md, pass-through)
                body = without_channel_binding(body)
            if code == codes.AUTH_SASL_FINAL:
                await relay(body)  # the client checks the server signature; no answer comes
                return
            answer = await relay(body)
        else:
            raise AuthenticationError(f"authentication method {code} requested by the server "
                                      "is not supported by pgcorral")
        self.write(msg.password_message(answer))

    # --- work pgcorral does itself -----------------------------------------------------------

    async def _exchange(self, payload: bytes, replies: Replies,
                        record: list[bytes] | None = None) -> Replies:
        """Send ``payload`` and read replies until ``replies`` has every ReadyForQuery.
        ``record`` collects the replies as they came on the wire."""
        if payload:
            self.write(payload)
        while replies.ready < replies.expected_ready:
            type_, body = await self.read_message()
            replies.feed(type_, body)
            if record is not None:
                record.append(msg.message(bytes([type_]), body))
        self.status = replies.status
        if replies.params:
            self._set_params({**self.params, **replies.params})
        return replies

    def _set_params(self, params: dict[str, str]) -> None:
        if params != self.params:
            self.params = params
            self._greeting = None

    def _plan_reset(self, reset_query: str) -> ResetPlan | None:
        """The reset for the connection's state; None when there is nothing to send."""
        rollback = self.status in (codes.TX_IN_BLOCK, codes.TX_FAILED)
        if not rollback and not reset_query:
            return None
        plan = self._reset_plan
        if (plan is None or plan.rollback != rollback or plan.reset_query != reset_query
                or plan.requests != self.requests):
            plan = self._reset_plan = plan_reset(rollback, reset_query, self.requests)
        return plan

    def _knows_replies(self, plan: ResetPlan) -> bool:
        """Did the last checked reset send this request in this state (same reply bytes)?"""
        known = self._known_replies
        return (known is not None and known[0] == plan.payload
                and (known[1] is self.params or known[1] == self.params))

    async def reset(self, reset_query: str, timeout: float) -> bool:
        """Make the connection clean for the next client. False if it must be closed instead.

        After ``DISCARD ALL`` the reported settings the last client asked for at startup are
        applied again in the same round trip: the next client of the same application then
        finds the connection ready (see ``pipelines.settings``).
        """
        plan = self._plan_reset(reset_query)
        if plan is None:
            return self.status == codes.TX_IDLE
        timer = self.loop.call_later(timeout, self.abort)
        try:
            before = self.params
            known = self._known_replies
            if known is None or not self._knows_replies(plan):
                return await self._check_reset(plan, before, sent=False)
            try:
                if await self._expect_exactly(plan.payload, known[2]):
                    return True  # byte for byte the replies checked below last time
            except Exception as exc:  # closed or timed out (abort): not reusable
                log.info("reset of server connection %d failed: %s", self.slot.id, exc)
                return False
            return await self._check_reset(plan, before, sent=True)  # already sent
        finally:
            timer.cancel()

    def reset_then(self, reset_query: str, timeout: float, release: Release) -> None:
        """``reset``, then ``release(self, clean)``. The usual case (the replies known byte for
        byte) runs in callbacks: the bytes are compared in ``_wake`` as they arrive. Else, and
        from the first differing byte on, the replies are checked in a task."""
        plan = self._plan_reset(reset_query)
        if plan is None:
            release(self, self.status == codes.TX_IDLE)
            return
        known = self._known_replies
        if known is None or not self._knows_replies(plan) or len(self._rx) or self.closed:
            self.loop.create_task(self._reset_task(reset_query, timeout, release))
            return
        try:
            self.transport.write(plan.payload)
        except RuntimeError:  # the transport closed under us (uvloop raises)
            release(self, False)
            return
        timer = self.loop.call_later(timeout, self.abort)
        self._expected = _Expected(plan, known[2], self.params, release, timer)

    async def _reset_task(self, reset_query: str, timeout: float, release: Release) -> None:
        release(self, await self.reset(reset_query, timeout))

    def _wake(self, exc: Exception | None) -> None:
        super()._wake(exc)
        expected = self._expected
        if expected is None:
            return
        rx = self._rx
        assert isinstance(rx, MessageReader)
        replies = expected.replies
        if exc is None and rx.matches_prefix(replies):
            if len(rx) < len(replies):
                return  # more to come
            rx.consume(len(replies))
            self._expected = None
            self.status = codes.TX_IDLE
            expected.timer.cancel()
            expected.release(self, True)
            return
        self._expected = None
        if exc is not None or self.closed:  # lost, closed, or aborted by the timer
            expected.timer.cancel()
            log.info("reset of server connection %d failed: %s", self.slot.id, exc)
            expected.release(self, False)
            return
        # other bytes than last time: check them message by message
        self.loop.create_task(self._finish_reset(expected))

    async def _finish_reset(self, expected: _Expected) -> None:
        try:
            clean = await self._check_reset(expected.plan, expected.before, sent=True)
        finally:
            expected.timer.cancel()
        expected.release(self, clean)

    async def _check_reset(self, plan: ResetPlan, before: dict[str, str], sent: bool) -> bool:
        """Send the reset (unless ``sent``) and check every reply; remember the exact bytes
        when they left the parameters as they were."""
        replies = Replies(plan.expected_ready, EXTENDED_ROW_REPLIES)
        raw: list[bytes] = []
        try:
            await self._exchange(b"" if sent else plan.payload, replies, raw)
        except Exception as exc:  # broken stream, closed or timed out (abort): not reusable
            log.info("reset of server connection %d failed: %s", self.slot.id, exc)
            return False
        if replies.error is not None or replies.status != codes.TX_IDLE or len(self._rx):
            return False
        if plan.tags is not None:  # DISCARD ALL
            if replies.tags != plan.tags:
                return False
            # DISCARD ALL ran RESET ALL: every setting is back at its login value, then the
            # re-applied ones reported their new values.
            self._set_params({**self.baseline, **replies.params})
            if self.params == before:
                self._known_replies = (plan.payload, before, b"".join(raw))
        return True

    async def _expect_exactly(self, payload: bytes, expected: bytes) -> bool:
        """Fast path of a reset: send ``payload``; True if the replies are exactly ``expected``.
        On the first differing byte, False with the bytes left for the message-by-message
        check."""
        rx = self._rx
        assert isinstance(rx, MessageReader)
        self.write(payload)
        while len(rx) < len(expected):
            if not rx.matches_prefix(expected):
                return False
            await self._wait_data()
        if len(rx) != len(expected) or not rx.matches_prefix(expected):
            return False
        rx.consume(len(expected))
        self.status = codes.TX_IDLE
        return True

    async def apply_settings(self, pairs: Pairs) -> dict[str, str] | None:
        """``set_config`` each pair in order; the server's ErrorResponse fields if refused."""
        replies = await self._exchange(msg.set_config_statement(pairs),
                                       Replies(1, EXTENDED_ROW_REPLIES))
        return replies.error

    async def query_rows(self, sql: str, params: list[str | None]) -> list[list[bytes | None]]:
        """Run one parameterised query pgcorral needs itself; its rows (errors raise)."""
        self.write(msg.extended_query(sql, params))
        rows: list[list[bytes | None]] = []
        error: dict[str, str] | None = None
        while True:
            type_, body = await self.read_message()
            if type_ == codes.DATA_ROW:
                rows.append(_parse(msg.parse_data_row, body))
            elif type_ == codes.ERROR_RESPONSE:
                error = _parse(msg.parse_fields, body)
            elif type_ == codes.READY_FOR_QUERY:
                self.status = body[0] if body else -1
                break
        if error is not None:
            raise ServerError(error)
        return rows

    async def validate(self, timeout: float) -> bool:
        """Is the connection alive and idle? An empty query must come back clean."""
        timer = self.loop.call_later(timeout, self.abort)
        try:
            replies = await self._exchange(msg.query(""), Replies(1))
        except Exception as exc:  # broken stream, closed or timed out (abort)
            log.info("validation of server connection %d failed: %s", self.slot.id, exc)
            return False
        finally:
            timer.cancel()
        return replies.error is None and replies.status == codes.TX_IDLE and not len(self._rx)

    def greeting(self) -> bytes:
        """The start of a client's greeting on this connection: AuthenticationOk and a
        ParameterStatus message for every reported setting. Built once per change of
        ``params`` (``_set_params``); the client adds BackendKeyData and ReadyForQuery."""
        greeting = self._greeting
        if greeting is None:
            greeting = _AUTH_OK + msg.parameter_statuses(self.params)
            self._greeting = greeting
        return greeting

    def check_memento(self, answer: bytes) -> bool:
        """Does a later client's answer match what the server accepted at login?"""
        assert self.memento is not None
        kind, data = self.memento
        if kind == "password":
            return hmac.compare_digest(answer, data)
        if kind == "md5":
            return hmac.compare_digest(answer, data[4:])
        return False

    def terminate(self) -> None:
        """Say Terminate and close. The connection stays *draining* until PostgreSQL closes
        its end (its backend is gone by then): the pool's budget counts it until then
        (``Pool.discard`` / ``Pool.gone``), so PostgreSQL never sees more connections than
        the limits allow, not even for the moment a replacement is opening."""
        if not self.closed:
            self.draining = True
            self.closed = True
            transport = self.transport
            transport.write(msg.terminate())
            if transport.can_write_eof():
                transport.write_eof()
                self._drain_timer = self.loop.call_later(
                    DRAIN_TIMEOUT, transport.abort)
            else:  # pragma: no cover - TCP and unix sockets both can
                transport.close()
        self._wake(ConnectionLost("connection closed"))


def _parse(parser: Callable[[bytes], T], body: bytes) -> T:
    try:
        return parser(body)
    except ValueError as exc:
        raise ServerProtocolError(f"malformed message from server: {exc}") from None
