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

Stale statements (issue 14): with mapping on, what the client side writes goes through
``write_request``, which keeps it in the plan until the plan is idle again (``ReplyPlan.sent``);
when a client's Bind fails because its statement was prepared before a schema change, the
router asks ``_bind_failed``, which lets ``protocol.repair`` decide and writes the retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pgcorral.net.server import ServerConnection
from pgcorral.protocol.framing import FramingError
from pgcorral.protocol.repair import repair
from pgcorral.protocol.replyplan import (
    CAPTURE_LIMIT,
    CAPTURE_ON,
    CAPTURE_SUSPENDED,
    ReplyPlan,
)
from pgcorral.protocol.statements import ServerStatements, StatementRegistry
from pgcorral.protocol.txrelay import ReplyRouter

if TYPE_CHECKING:
    from pgcorral.net.transaction import TransactionClient
    from pgcorral.pool.pool import Slot

log: Final = logging.getLogger("pgcorral.server")


class TxServerConnection(ServerConnection):
    def __init__(self, slot: Slot, on_lost: Callable[[ServerConnection], None],
                 max_prepared: int, registry: StatementRegistry | None = None) -> None:
        super().__init__(slot, on_lost)
        self.statements = ServerStatements(max_prepared)
        self.registry = registry
        self.router = ReplyRouter(ReplyPlan(self.statements,
                                            None if registry is None else registry.known),
                                  registry=registry)
        if registry is not None and max_prepared > 0:
            self.router.on_bind_error = self._bind_failed
        self.extra: dict[str, str] = {}  # lower-case name -> value pgcorral set, not reported
        #: SQL-level prepared statements on it (name -> PREPARE text), as the session-state
        #: probe found them (net.transaction ``_settle``)
        self.sql_prepared: dict[str, str] = {}
        self.cancels = 0  # cancel requests being forwarded to this backend
        self.after_cancels: Callable[[], None] | None = None  # release held for them
        #: a cancel waits on it while pgcorral's own request is answered (``own_step_done``)
        self._own_step_waiter: asyncio.Future[None] | None = None
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
        plan = router.plan
        if not plan.steps and (plan.sent or plan.capture == CAPTURE_SUSPENDED):
            plan.idle_again()
        if self._own_step_waiter is not None and not self.own_step_running():
            self._own_step_answered()
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

    def write_request(self, data: bytes) -> None:
        """Write the client's (mapped) requests; kept while replies are due, for a retry."""
        self.transport.write(data)
        plan = self.router.plan
        if plan.capture == CAPTURE_ON:
            sent = plan.sent
            if not sent:
                plan.sent_from = self.router.readies
            sent.append(data)
            plan.sent_size += len(data)
            if plan.sent_size > CAPTURE_LIMIT:
                plan.capture = CAPTURE_SUSPENDED
                sent.clear()
                plan.sent_size = 0

    def _bind_failed(self, body: bytes) -> bool:
        """A client's Bind failed (``ReplyRouter.on_bind_error``): retried if its statement
        was stale and the batch can be sent again (``protocol.repair``)."""
        registry = self.registry
        router = self.router
        if registry is None:
            return False
        client = self.client
        retry = repair(router.plan, registry, None if client is None else client.statements,
                       body, router.status, router.readies - router.plan.sent_from)
        if retry is None:
            return False
        log.debug("server connection %d (pid %d): a statement prepared before a schema change "
                  "failed; prepared again and retried", self.slot.id, self.pid)
        self.transport.write(retry)
        return True

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

    def own_step_running(self) -> bool:
        """Is the reply due first that of pgcorral's own request (a ``drop`` step: the
        client's settings, prepared statements, the session-state probe)?"""
        steps = self.router.plan.steps
        return bool(steps) and steps[0].drop

    def own_step_done(self) -> asyncio.Future[None]:
        """Resolved once pgcorral's own request at the head of the plan is answered, or the
        connection is lost (a cancel waits for it: ``Context.cancel_backend``)."""
        waiter = self._own_step_waiter
        if waiter is None:
            waiter = self._own_step_waiter = self.loop.create_future()
            if self.closed or not self.own_step_running():
                self._own_step_answered()
        return waiter

    def _own_step_answered(self) -> None:
        waiter, self._own_step_waiter = self._own_step_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._own_step_answered()
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
