"""LISTEN/NOTIFY in the transaction pipeline: one listening connection per database/user.

A client's Query of nothing but LISTEN/UNLISTEN statements, between transactions
(``TransactionClient._want_server``, parsed by ``protocol.listen``), is answered here instead
of by a server connection of the pool: the worker's ``Hub`` for the client's (database, user)
subscribes the client, and its one server connection LISTENs on every channel some client of
that pair listens on. Each NotificationResponse it receives goes to every client subscribed to
the channel, in arrival order (``TransactionClient.notify``: at once between transactions,
else queued until the client's transaction ends).

* The hub's connection is outside the pool (like auth_query's): it does not count against
  ``max_connections`` or the limits, one per (database, user) with listeners and worker. It is
  logged in with the credentials of a subscribed client, the way the transaction pipeline logs
  in its new connections (vault, auth_query, trust, a cleartext password; else 08004).
* The hub LISTENs on a channel when its first client subscribes (the client's answer waits for
  PostgreSQL's acknowledgement, so a NOTIFY sent after LISTEN returned is never missed),
  UNLISTENs when the last one leaves, and closes when nobody listens any more. New channels of
  one request go to PostgreSQL as one Query.
* Pids: the sender's real backend pid is replaced by the virtual pid of the client of this
  worker whose transaction sent it, when that is certain (``sender_pid``: which client has
  each backend, since when, is recorded at each link, ``record_sender``); other senders, and
  notifications of a backend that changed hands less than SENDER_WINDOW_US before, keep the
  real pid.
* A lost connection is opened again and every channel LISTENed again (a warning, counters
  ``notify_reconnects`` and ``notify_maybe_missed``: notifications sent while it was away
  are lost: at most once).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Final

from pgcorral.errors import PgCorralError, ServerError
from pgcorral.net.endpoint import ConnectionLost
from pgcorral.pool.pool import Slot
from pgcorral.protocol import codes
from pgcorral.protocol import messages as msg
from pgcorral.protocol.listen import LISTEN, UNLISTEN, Ops, statements

if TYPE_CHECKING:
    from pgcorral.net.context import Context
    from pgcorral.net.server import ServerConnection
    from pgcorral.net.transaction import TransactionClient
    from pgcorral.net.txserver import TxServerConnection

log: Final = logging.getLogger("pgcorral.notify")

#: Channels one client may listen on.
MAX_LISTEN_CHANNELS: Final = 10_000
#: Notifications (and their bytes) kept for one client that cannot take them now (in a
#: transaction, or not reading); beyond either, the client is closed (53400).
MAX_QUEUED: Final = 10_000
MAX_QUEUED_BYTES: Final = 8 << 20
#: Microseconds during which a backend's notifications may still be on their way through the
#: listening connection after the backend went to another client: a notification of that
#: backend arriving then keeps its real pid (it may be either client's).
SENDER_WINDOW_US: Final = 100_000
#: Channels per LISTEN Query sent to PostgreSQL.
BATCH: Final = 1000
#: Seconds between attempts to open a lost listening connection (doubling up to the maximum).
RETRY_FIRST: Final = 0.05
RETRY_MAX: Final = 2.0

_pid_pack_into: Final = struct.Struct("!i").pack_into
_pid_unpack_from: Final = struct.Struct("!i").unpack_from
_READY_IDLE: Final = msg.ready_for_query(b"I")
_LISTEN_DONE: Final = msg.message(b"C", b"LISTEN\0")
_UNLISTEN_DONE: Final = msg.message(b"C", b"UNLISTEN\0")
#: What ends a listening connection (then opened again while anyone listens).
_FAILURES: Final = (ConnectionLost, ConnectionError, OSError, TimeoutError, PgCorralError)


class Sender:
    """Which client has a backend now, since when (``Context.notify_senders``)."""

    __slots__ = ("server", "since_us", "vpid")

    def __init__(self, server: TxServerConnection, vpid: int) -> None:
        self.server = server
        self.vpid = vpid  # the virtual pid of the client linked last
        # the end of the transaction before its first (the ReadyForQuery before the link;
        # 0: none): a transaction before that may have been another client's
        self.since_us = server.last_ready_us


def record_sender(senders: dict[int, Sender], server: TxServerConnection, vpid: int) -> None:
    """The client ``vpid`` is linked to ``server`` (``_link``): one lookup, and a store when
    the backend changes hands."""
    sender = senders.get(server.pid)
    if sender is None:
        senders[server.pid] = Sender(server, vpid)
    elif sender.vpid != vpid:
        sender.vpid = vpid
        sender.since_us = server.last_ready_us
        sender.server = server


def sender_pid(senders: dict[int, Sender], pid: int) -> int:
    """The pid a notification from backend ``pid`` carries: the virtual pid of the client whose
    transaction sent it, when that is certain, else ``pid``. Certain: the backend's
    transactions since SENDER_WINDOW_US ago are all one client's (the notifications of the
    client before have arrived by then)."""
    sender = senders.get(pid)
    if sender is None:
        return pid
    if time.monotonic_ns() // 1000 - sender.since_us < SENDER_WINDOW_US:
        return pid
    now = sender.server.client
    if now is not None and now.cancel_pid != sender.vpid:
        return pid
    return sender.vpid


class Hub:
    """The listening connection of one (database, user) in one worker, and who listens."""

    def __init__(self, hubs: Hubs, key: tuple[str, str]) -> None:
        self.hubs = hubs
        self.key = key
        #: channel -> its subscribers (a dict as an ordered set)
        self.channels: dict[str, dict[TransactionClient, None]] = {}
        self.acked: set[str] = set()  # channels the connection LISTENs on now
        #: channel -> the acknowledgement of the LISTEN sent (or to be sent) for it
        self.waiting: dict[str, asyncio.Future[None]] = {}
        #: Queries sent and not yet answered: (op, channels); ReadyForQuery answers the first
        self.inflight: deque[tuple[int, list[str]]] = deque()
        self.error: dict[str, str] | None = None  # ErrorResponse of the Query answered next
        self.conn: ServerConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.closing = False

    # --- subscriptions -----------------------------------------------------------------------

    def add(self, client: TransactionClient, channels: list[str]) -> list[asyncio.Future[None]]:
        """Subscribe ``client``; the acknowledgements to wait for (none: already listening)."""
        waits: list[asyncio.Future[None]] = []
        fresh: list[str] = []
        loop = self.hubs.ctx.loop
        for channel in channels:
            subscribers = self.channels.get(channel)
            if subscribers is None:
                subscribers = self.channels[channel] = {}
            subscribers[client] = None
            if channel in self.acked:
                continue
            future = self.waiting.get(channel)
            if future is None:
                future = self.waiting[channel] = loop.create_future()
                fresh.append(channel)
            waits.append(future)
        if fresh:
            conn = self.conn
            if conn is not None and not conn.closed:
                self._send(conn, LISTEN, fresh)
            elif self.task is None:  # else the connecting task LISTENs on every channel
                self.task = loop.create_task(self._run())
        return waits

    def remove(self, client: TransactionClient, channels: list[str]) -> None:
        """Unsubscribe ``client``; channels nobody listens on any more are UNLISTENed."""
        gone: list[str] = []
        for channel in channels:
            subscribers = self.channels.get(channel)
            if subscribers is None or client not in subscribers:
                continue
            del subscribers[client]
            if not subscribers:
                del self.channels[channel]
                if channel in self.acked:
                    self.acked.discard(channel)
                    gone.append(channel)
        if not self.channels:
            self.close()
            return
        conn = self.conn
        if gone and conn is not None and not conn.closed:
            self._send(conn, UNLISTEN, gone)

    def close(self) -> None:
        """Nobody listens: the connection goes."""
        self.closing = True
        self.hubs.hubs.pop(self.key, None)
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.terminate()
        task, self.task = self.task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._fail_waiting(PgCorralError("listening connection closed", sqlstate="08006"))

    def _send(self, conn: ServerConnection, op: int, channels: list[str]) -> None:
        for i in range(0, len(channels), BATCH):
            part = channels[i:i + BATCH]
            self.inflight.append((op, part))
            conn.write(msg.message(b"Q", statements(op, part) + b"\0"))

    def _fail_waiting(self, exc: Exception) -> None:
        waiting, self.waiting = self.waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: nobody may be left to await it

    # --- the connection ----------------------------------------------------------------------

    async def _run(self) -> None:
        """Open the connection, LISTEN on every channel, deliver until nobody listens; open it
        again when it breaks (at once, then after RETRY_FIRST seconds, doubling)."""
        ctx = self.hubs.ctx
        delay = 0.0
        lost = False  # a connection was up before: this is a reconnect
        while self.channels and not self.closing:
            if delay:
                await asyncio.sleep(delay)
                if not self.channels or self.closing:
                    break
            try:
                conn = await self._open()
            except Exception as exc:
                if not isinstance(exc, _FAILURES):
                    log.error("opening a listening connection failed", exc_info=exc)
                if lost:
                    log.warning("listening connection for %s@%s: cannot open it again: %s",
                                self.key[1], self.key[0], exc)
                self._fail_waiting(exc)  # the clients waiting for their LISTEN are told
                delay = min(max(delay * 2, RETRY_FIRST), RETRY_MAX)
                continue
            self.conn = conn
            self.inflight.clear()
            self.error = None
            self.acked.clear()
            channels = list(self.channels)
            for channel in channels:
                if channel not in self.waiting:
                    self.waiting[channel] = ctx.loop.create_future()
            self._send(conn, LISTEN, channels)
            if lost:
                ctx.counters["notify_reconnects"] += 1
                log.warning("listening connection for %s@%s open again (backend pid %d): "
                            "listening on %d channel(s) again", self.key[1], self.key[0],
                            conn.pid, len(channels))
            delay = 0.0
            try:
                await self._read(conn)
            except Exception as exc:
                if not isinstance(exc, _FAILURES):
                    log.error("listening connection: internal error", exc_info=exc)
                if not self._lost(conn, exc):
                    break
                lost = True
        if self.task is asyncio.current_task():
            self.task = None

    def _lost(self, conn: ServerConnection, exc: BaseException) -> bool:
        """The connection broke: counted and logged. False: nobody listens any more."""
        conn.close()
        if self.conn is conn:
            self.conn = None
        if self.closing or not self.channels:
            return False
        missed = len(self.acked)
        self.hubs.ctx.counters["notify_maybe_missed"] += missed
        log.warning("listening connection for %s@%s (backend pid %d) lost: %s; opening it "
                    "again: notifications on its %d channel(s) until then may be lost",
                    self.key[1], self.key[0], conn.pid, exc, missed)
        self.acked.clear()
        return True

    async def _open(self) -> ServerConnection:
        """A new connection logged in with the credentials of a subscribed client."""
        ctx = self.hubs.ctx
        subscribers = next(iter(self.channels.values()))
        client = next(iter(subscribers))
        database, user = self.key
        slot = Slot(0, self.key, None, time.monotonic())
        conn = await ctx.open_server(slot, on_lost=_ignore)
        try:
            async with asyncio.timeout(ctx.config.main.authentication_timeout or None):
                await conn.login(user, database, client.login_relay())
        except BaseException:
            conn.close()
            raise
        return conn

    async def _read(self, conn: ServerConnection) -> None:
        ctx = self.hubs.ctx
        while True:
            type_, body = await conn.read_message()
            if type_ == codes.NOTIFICATION_RESPONSE:
                self._deliver(ctx, body)
            elif type_ == codes.READY_FOR_QUERY:
                self._answered()
            elif type_ == codes.ERROR_RESPONSE:
                fields = msg.parse_fields(body)
                if self.inflight:
                    self.error = fields
                else:  # FATAL before a close (pg_terminate_backend, shutdown)
                    raise ConnectionLost(fields.get("M", "error"))

    def _answered(self) -> None:
        if not self.inflight:
            return
        op, channels = self.inflight.popleft()
        error, self.error = self.error, None
        if op != LISTEN:
            return
        exc = ServerError(error) if error is not None else None
        conn = self.conn
        again: list[str] = []
        for channel in channels:
            future = self.waiting.pop(channel, None)
            if exc is None:
                if channel in self.channels:
                    self.acked.add(channel)
                else:
                    again.append(channel)  # everyone left meanwhile
            if future is not None and not future.done():
                if exc is None:
                    future.set_result(None)
                else:
                    future.set_exception(exc)
                    future.exception()
        if again and conn is not None and not conn.closed:
            self._send(conn, UNLISTEN, again)

    def _deliver(self, ctx: Context, body: bytes) -> None:
        """A NotificationResponse: to every subscriber of its channel, the pid replaced by the
        virtual pid of the pgcorral client that sent it."""
        end = body.find(b"\0", 4)
        if end < 0:
            return
        subscribers = self.channels.get(body[4:end].decode("utf-8", "surrogateescape"))
        if not subscribers:
            return
        data = msg.message(b"A", body)
        pid: int = _pid_unpack_from(data, 5)[0]
        virtual = sender_pid(ctx.notify_senders, pid)
        if virtual != pid:
            copy = bytearray(data)
            _pid_pack_into(copy, 5, virtual)
            data = bytes(copy)
        for client in list(subscribers):
            try:
                client.notify(data)
            except Exception:  # one client's trouble must not stop the others' delivery
                log.exception("delivering a notification to client %s", client.address)
        ctx.counters["notifications_delivered"] += len(subscribers)


def _ignore(server: ServerConnection) -> None:
    pass


class Hubs:
    """The hubs of one worker (``Context.notify``) and what each client listens on."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.hubs: dict[tuple[str, str], Hub] = {}
        self.by_client: dict[TransactionClient, set[str]] = {}

    def query(self, client: TransactionClient, ops: Ops, head: bytes) -> None:
        """A Query of LISTEN/UNLISTEN statements from ``client`` (unlinked, status 'I'), or an
        extended-protocol batch of one (its replies before CommandComplete in ``head``): the
        subscriptions change, then the client gets ``head``, CommandComplete per statement
        and ReadyForQuery, or ``head``, one ErrorResponse and ReadyForQuery (nothing
        changed). The client is busy (``listen_busy``) until ``client.listen_done``."""
        before = self.by_client.get(client) or set()
        after = set(before)
        answer: list[bytes] = [head]
        for op, channel in ops:
            if op == LISTEN:
                assert channel is not None
                after.add(channel)
                answer.append(_LISTEN_DONE)
            else:
                if channel is None:
                    after.clear()
                else:
                    after.discard(channel)
                answer.append(_UNLISTEN_DONE)
        answer.append(_READY_IDLE)
        reply = b"".join(answer)
        client.listen_busy()
        if len(after) > MAX_LISTEN_CHANNELS:
            self.ctx.loop.call_soon(client.listen_done, head + msg.error_response(
                "54000", f"too many LISTEN channels: at most {MAX_LISTEN_CHANNELS} per client "
                "in transaction pooling", severity="ERROR") + _READY_IDLE)
            return
        added = [c for c in after if c not in before]
        removed = [c for c in before if c not in after]
        self._set(client, after)
        hub = self.hubs.get(client.key)
        waits: list[asyncio.Future[None]] = []
        if added:  # before the removals: a hub left with no channel would close
            if hub is None:
                hub = self.hubs[client.key] = Hub(self, client.key)
            waits = hub.add(client, added)
        if removed and hub is not None:
            hub.remove(client, removed)
        if not waits:
            self.ctx.loop.call_soon(client.listen_done, reply)  # not recursively: see there
            return
        self.ctx.loop.create_task(self._acknowledged(client, waits, added, head, reply))

    async def _acknowledged(self, client: TransactionClient, waits: list[asyncio.Future[None]],
                            added: list[str], head: bytes, reply: bytes) -> None:
        try:
            for future in waits:
                await future
        except Exception as exc:
            channels = self.by_client.get(client)
            if channels is not None:  # the statement failed: as if it never ran
                channels.difference_update(added)
                self._set(client, channels)
            hub = self.hubs.get(client.key)
            if hub is not None:
                hub.remove(client, added)
            if isinstance(exc, ServerError):
                error = msg.error_response_from_fields(exc.fields)
            else:
                text = exc.message if isinstance(exc, PgCorralError) else str(exc)
                code = exc.sqlstate if isinstance(exc, PgCorralError) else "08006"
                error = msg.error_response(code, text, severity="ERROR")
            reply = head + error + _READY_IDLE
        if client.closed:
            self.leave(client)
        client.listen_done(reply)

    def _set(self, client: TransactionClient, channels: set[str]) -> None:
        if channels:
            self.by_client[client] = channels
        else:
            self.by_client.pop(client, None)

    def leave(self, client: TransactionClient) -> None:
        """The client leaves (or ran DISCARD ALL): unsubscribed from everything."""
        channels = self.by_client.pop(client, None)
        if channels:
            hub = self.hubs.get(client.key)
            if hub is not None:
                hub.remove(client, list(channels))

    def close(self) -> None:
        for hub in list(self.hubs.values()):
            hub.close()
        self.by_client.clear()
