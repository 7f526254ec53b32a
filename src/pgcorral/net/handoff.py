"""Handing an idle server connection to another worker (session pooling).

When a worker has a client waiting and no room for a new connection, while another worker
holds an idle connection for the same database and user, closing that connection and opening a
new one costs PostgreSQL a backend start. Instead the idle connection changes hands: its socket
travels with SCM_RIGHTS through the supervisor, its state (backend key, parameters, login
memento) as a dict. The giving worker keeps counting it in the shared budget until the
receiving worker has adopted it (``handed``), so the count is briefly one high, never low.

Only the session pipeline hands connections over: in transaction pooling a connection carries
prepared statements named by the giving worker's registry.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from pgcorral.net.context import session_server
from pgcorral.protocol import codes

if TYPE_CHECKING:
    from pgcorral.net.context import Context
    from pgcorral.net.server import ServerConnection
    from pgcorral.pool.pool import Slot

#: What a server connection's new owner must know about it.
STATE = ("pid", "secret", "params", "baseline", "names", "memento", "requests",
         "tls_generation", "server_name")


def _ignore(_: ServerConnection) -> None:
    pass


def hands_over(ctx: Context) -> bool:
    """Does this worker's pipeline hand connections over? Not over TLS: the session keys
    live in this process, only the socket could travel."""
    tls = ctx.server_tls.get(ctx.server.name)
    return ctx.new_server is session_server and (tls is None or tls.context is None)


def detach(ctx: Context, key: tuple[str, str],
           handing: dict[int, Slot]) -> tuple[int, dict[str, Any]] | None:
    """Take an idle connection for ``key`` out of this worker: a duplicate of its socket and
    its state; None if there is none (or this pipeline does not hand connections over)."""
    if not hands_over(ctx):
        return None
    slot = ctx.pool.take_idle(key)
    if slot is None:
        return None
    server: ServerConnection = slot.conn
    sock = server.transport.get_extra_info("socket")
    if sock is None or server.closed or server.status != codes.TX_IDLE:
        # a TLS connection (no socket to pass: its keys live here, e.g. after switch-to from
        # a TLS server) is closed, not kept: kept, it would be offered again and again, and
        # closed it frees the capacity the other worker waits for
        ctx.release_server(server, clean=not server.closed and not server.tls)
        return None
    fd = os.dup(sock.fileno())
    state = {name: getattr(server, name) for name in STATE}
    state.update(key=key, slot=slot.id, age=time.monotonic() - slot.created_at)
    server.idle = False
    server._on_lost = _ignore
    server.draining = True  # the budget keeps counting it until handed()
    ctx.pool.discard(slot)
    handing[slot.id] = slot
    server.closed = True
    server.transport.abort()  # closes this worker's descriptor only; the duplicate lives on
    return fd, state


def handed(ctx: Context, slot_id: int, handing: dict[int, Slot]) -> None:
    """The other worker has it (or gave up and closed it): stop counting it here."""
    slot = handing.pop(slot_id, None)
    if slot is not None:
        ctx.pool.gone(slot)


async def adopt(ctx: Context, fd: int, state: dict[str, Any]) -> bool:
    """Make the handed-over connection one of this worker's, and give it to a waiter."""
    key = (state["key"][0], state["key"][1])
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    slot = ctx.pool.adopt(key)
    slot.created_at -= state["age"]
    try:
        _, server = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: ctx.new_server(ctx, slot, ctx.server_lost), sock)
    except OSError:
        sock.close()
        ctx.pool.discard(slot)
        return False
    slot.conn = server
    for name in STATE:
        setattr(server, name, state[name])
    server.status = codes.TX_IDLE
    ctx.counters["server_connections_adopted"] += 1
    ctx.release_server(server, clean=True)
    return True
