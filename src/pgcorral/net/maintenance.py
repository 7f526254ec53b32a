"""Maintenance of one worker's pool: prefill, expiry, background validation, disconnect_client.

Driven by the periodic tick of the worker runtime (``supervisor.runtime``). Prefill and
MIN_SIZE count the whole pool: a worker opens a connection only while the rule holds fewer than
the target in every worker together (``Pool.reserve_new`` claims against the shared budget).
Idle timeout, max age and validation apply to every connection, each in the worker that owns it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from pgcorral.net.auth import VaultLogin
from pgcorral.protocol import codes
from pgcorral.protocol import messages as msg

if TYPE_CHECKING:
    from pgcorral.net.context import Context
    from pgcorral.net.server import ServerConnection

log = logging.getLogger("pgcorral.context")

#: Seconds an empty validation query may take before the connection is closed.
VALIDATION_TIMEOUT = 5.0


async def prefill(ctx: Context, initial: bool) -> int:
    """Open connections ahead of clients for the limit rules naming a database and a vault
    user: up to INITIAL_SIZE at start and after a flush, up to MIN_SIZE on every tick.
    Returns how many were opened; a failure is logged and stops that rule's round."""
    opened = 0
    for rule in ctx.config.limits:
        target = rule.initial_size if initial else rule.min_size
        password = ctx.secrets.backend_password(rule.user)
        if target <= 0 or "all" in (rule.database, rule.user) or password is None:
            continue
        key = (rule.database, rule.user)
        while not ctx.shutting_down:
            slot = ctx.pool.reserve_new(key, target)
            if slot is None:
                break
            try:
                server = await ctx.open_server(slot)
                async with asyncio.timeout(ctx.config.main.authentication_timeout or None):
                    await server.login(rule.user, rule.database,
                                       VaultLogin(rule.user, password))
            except Exception as exc:
                log.warning("prefill of %s@%s failed: %s", rule.user, rule.database, exc)
                if slot.conn is not None:
                    slot.conn.close()
                ctx.pool.discard(slot)
                break
            ctx.pool.opened(slot)
            ctx.release_server(server, clean=True)
            opened += 1
    return opened


def close_expired(ctx: Context) -> int:
    """Close idle connections past idle_timeout or max_connection_age; how many."""
    main = ctx.config.main
    now = time.monotonic()
    closed = 0
    for pool in ctx.pools():  # the primary's and each replica's
        expired = pool.expired_idle(now, main.idle_timeout, main.max_connection_age)
        for slot in expired:
            log.debug("closing idle server connection %d (%s@%s)", slot.id, slot.key[1],
                      slot.key[0])
            slot.conn.terminate()
            pool.discard(slot)
        closed += len(expired)
    return closed


def disconnect_idle_clients(ctx: Context) -> int:
    """disconnect_client: end sessions whose client sent nothing for that long while their
    server connection sat idle (any state with disconnect_client_force). The server
    connection goes back to the pool as usual."""
    main = ctx.config.main
    if main.disconnect_client <= 0:
        return 0
    now = time.monotonic()
    ended = 0
    for client in list(ctx.clients):
        server = client.server
        if server is None and not getattr(client, "in_session", False):
            continue
        if client.activity != client.seen_activity[0]:
            client.seen_activity = (client.activity, now)
            continue
        idle_for = now - client.seen_activity[1]
        if idle_for < main.disconnect_client:
            continue
        status = server.status if server is not None else codes.TX_IDLE
        if status != codes.TX_IDLE and not main.disconnect_client_force:
            continue
        log.info("disconnecting client %s (user %s, database %s): idle for %.0f s",
                 client.address or "[local]", client.user, client.database, idle_for)
        client.write(msg.error_response(
            "57P05", "terminating connection due to idle-session timeout (disconnect_client)"))
        client.end("disconnect_client")
        ended += 1
    return ended


_cancels: set[asyncio.Task[None]] = set()  # query_timeout cancels in flight (referenced)


def enforce_timeouts(ctx: Context) -> int:
    """query_timeout, idle_transaction_timeout, transaction_timeout, from the request and
    transaction start times the data path keeps anyway (``ServerConnection.sending`` and
    ``answered``); run by the maintenance tick, at half the shortest timeout. How many
    clients were ended."""
    main = ctx.config.main
    query, idle_tx, xact = (main.query_timeout, main.idle_transaction_timeout,
                            main.transaction_timeout)
    if query <= 0 and idle_tx <= 0 and xact <= 0:
        return 0
    now_us = time.monotonic_ns() // 1000
    ended = 0
    for client in list(ctx.clients):
        server = client.server
        if server is None or server.closed or client.terminating:
            continue
        request, started = server.request_us, server.xact_start_us
        reason = ""
        if query > 0 and request and now_us - request > query * 1e6:
            if now_us - request > 2 * query * 1e6:
                reason = "query_timeout"
                sqlstate = "57014"
                text = "canceling statement due to query timeout (query_timeout); closing"
            elif server.timeout_cancelled != request:  # once per request
                server.timeout_cancelled = request
                log.info("query of client %s (user %s, database %s) running for more than "
                         "%g s (query_timeout): cancelling it", client.address or "[local]",
                         client.user, client.database, query)
                task = ctx.loop.create_task(ctx.cancel_backend(server))
                _cancels.add(task)
                task.add_done_callback(_cancels.discard)
                continue
        if not reason and xact > 0 and started and now_us - started > xact * 1e6:
            reason, sqlstate = "transaction_timeout", "25P04"
            text = "terminating connection due to transaction timeout (transaction_timeout)"
        if (not reason and idle_tx > 0 and started and not request
                and now_us - server.last_ready_us > idle_tx * 1e6):
            reason, sqlstate = "idle_transaction_timeout", "25P03"
            text = ("terminating connection due to idle-in-transaction timeout "
                    "(idle_transaction_timeout)")
        if not reason:
            continue
        log.info("closing client %s (user %s, database %s): %s", client.address or "[local]",
                 client.user, client.database, reason)
        client.write(msg.error_response(sqlstate, text))
        client.end(reason)
        ended += 1
    return ended


async def validate_idle(ctx: Context) -> None:
    """Background validation: check every idle connection; close the broken ones."""
    for slot in [s for pool in ctx.pools() for s in pool.idle_slots()]:
        if slot.state != "idle":  # taken meanwhile
            continue
        server: ServerConnection = slot.conn
        ctx.pool_of(slot, ctx.pool).checkout_idle(slot)
        server.idle = False
        ctx.release_server(server, await server.validate(VALIDATION_TIMEOUT))
