"""Server connections of the transaction pipeline.

A ``TxServerConnection`` is a ``ServerConnection`` that also carries what transaction pooling
needs to know about it between clients: the protocol-level statements prepared on it
(``statements``, pooler names, LRU), the reply plan and router of the client linked now
(``router``), the settings pgcorral set on it that PostgreSQL does not report (``extra``), and
the cancel requests in flight against it (``cancels``: it is not handed to another client until
they are done, so a late cancel never hits the next client's query).

While linked, each chunk from PostgreSQL goes through the router: passed, dropped or completed
with fabricated replies, then written to the client; when the router says the connection is
free, the client unlinks it (``net.transaction``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pgcorral.net.server import ServerConnection
from pgcorral.protocol.framing import FramingError
from pgcorral.protocol.replyplan import ReplyPlan
from pgcorral.protocol.statements import ServerStatements
from pgcorral.protocol.txrelay import ReplyRouter

if TYPE_CHECKING:
    from pgcorral.net.transaction import TransactionClient
    from pgcorral.pool.pool import Slot

log: Final = logging.getLogger("pgcorral.server")


class TxServerConnection(ServerConnection):
    def __init__(self, slot: Slot, on_lost: Callable[[ServerConnection], None],
                 max_prepared: int, known: set[str] | None = None) -> None:
        super().__init__(slot, on_lost)
        self.statements = ServerStatements(max_prepared)
        self.router = ReplyRouter(ReplyPlan(self.statements, known))
        self.extra: dict[str, str] = {}  # lower-case name -> value pgcorral set, not reported
        #: SQL-level prepared statements on it (name -> PREPARE text), as the session-state
        #: probe found them (net.transaction ``_settle``)
        self.sql_prepared: dict[str, str] = {}
        self.cancels = 0  # cancel requests being forwarded to this backend
        self.after_cancels: Callable[[], None] | None = None  # release held for them
        #: ``peer`` with its type, set with it by the client (the hot path reads it)
        self.client: TransactionClient | None = None
        # the router's counters already counted (``count_readies``)
        self.readies_seen = 0
        self.idle_seen = 0

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            super().data_received(data)
            return
        router = self.router
        try:
            out, free_at = router.feed(data, client.forwarder.at_rest)
        except FramingError as exc:
            log.warning("server connection %d (pid %d): %s", self.slot.id, self.pid, exc)
            self.poolable = False
            client.end("server lost")
            self.abort()
            return
        if router.changes:
            self._set_params({**self.params, **router.changes})
            router.changes.clear()
        if router.readies != self.readies_seen:
            self.count_readies(router)
        if out:
            self.tally.bytes_sent += len(out)
            try:
                client.transport.write(out)
            except RuntimeError:  # the client's transport closed under us (uvloop raises)
                return
            if out[-1] == 0:  # maybe an ErrorResponse last: PostgreSQL's FATAL goodbye?
                self.note_fatal(out)
        if free_at >= 0:
            self.status = router.status
            client.server_free(self, data[free_at:])
        elif client.terminating and router.plan.idle and router.at_boundary:
            client.end("terminate")  # Terminate came in a transaction: its replies are out

    def count_readies(self, router: ReplyRouter) -> None:
        """ReadyForQuery messages passed: count the queries (the time from the first request
        to the last ReadyForQuery of the chunk goes to the first), the transactions that
        ended, and the errors the router saw."""
        readies, idle = router.readies, router.idle_readies
        self.answered(readies - self.readies_seen, idle - self.idle_seen)
        self.readies_seen, self.idle_seen = readies, idle
        errors = router.errors
        if errors:
            pstats = self.pstats
            for code in errors:
                pstats.error(code)
            errors.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        statements = self.statements
        pstats = self.pstats
        pstats.hits += statements.hits
        pstats.misses += statements.misses
        pstats.evictions += statements.evictions
        statements.hits = statements.misses = statements.evictions = 0
        super().connection_lost(exc)

    def cancel_done(self) -> None:
        """A forwarded cancel request finished; a release held for it may go on."""
        self.cancels -= 1
        if self.cancels <= 0 and self.after_cancels is not None:
            release, self.after_cancels = self.after_cancels, None
            release()
