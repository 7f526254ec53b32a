"""The control API of one worker: what management commands ask of it and do to it.

Each function takes the worker's ``Context``. With one process the management layer calls them
directly; with several workers the supervisor sends the same call to every worker over its
control channel and merges the answers (``supervisor.multi``). Answers are plain dicts and lists
(they cross process boundaries).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from pgcorral.config import Config
from pgcorral.pool.pool import ACTIVE, IDLE, OPENING

if TYPE_CHECKING:
    from pgcorral.net.context import Context

log = logging.getLogger("pgcorral.context")

#: Database names that mean every database in flush/enable/disable.
ALL_DATABASES = ("all", "*")


def status(ctx: Context) -> dict[str, Any]:
    """Counts of the pool and the clients, servers, disabled databases, counters."""
    pool = ctx.pool
    current = ctx.server.name
    servers = [{"name": s.name, "host": s.host, "port": s.port,
                "state": "primary" if s.name == current else
                "failed" if s.name in ctx.failed_servers else "notinit"}
               for s in ctx.config.servers]
    return {
        "status": "graceful shutdown" if ctx.shutting_down else "running",
        "active_connections": pool.count(ACTIVE), "idle_connections": pool.count(IDLE),
        "opening_connections": pool.count(OPENING), "total_connections": pool.total,
        "max_connections": pool.max_connections, "clients": len(ctx.clients),
        "waiting_clients": pool.waiting, "server": current, "servers": servers,
        "disabled": sorted(ctx.disabled), "counters": dict(ctx.counters),
        "worker": ctx.worker, "pid": os.getpid(),
    }


def details(ctx: Context) -> dict[str, Any]:
    """``status`` plus one entry per server connection and per client."""
    now_mono, now = time.monotonic(), time.time()
    connections = []
    for slot in sorted(ctx.pool.slots(), key=lambda s: s.id):
        conn = slot.conn
        connections.append({
            "id": slot.id, "state": slot.state, "database": slot.key[0],
            "user": slot.key[1], "pid": getattr(conn, "pid", 0) if conn else 0,
            "started": round(now - (now_mono - slot.created_at), 3),
            "last_used": round(now - (now_mono - slot.last_used), 3),
            "tls": bool(getattr(conn, "tls", False)), "worker": ctx.worker})
    sessions = [{"user": c.user, "database": c.database, "address": c.address or "[local]",
                 "pid": c.server.pid if c.server is not None else 0,
                 "tls": c.tls.version() if c.tls is not None else "", "worker": ctx.worker}
                for c in ctx.clients]
    sessions.sort(key=lambda c: (str(c["database"]), str(c["user"]), str(c["address"])))
    return {**status(ctx), "connections": connections, "sessions": sessions}


def disable(ctx: Context, database: str) -> list[str]:
    ctx.disabled.add("*" if database in ALL_DATABASES else database)
    return sorted(ctx.disabled)


def enable(ctx: Context, database: str) -> list[str]:
    if database in ALL_DATABASES:
        ctx.disabled.clear()
    else:
        ctx.disabled.discard(database)
    return sorted(ctx.disabled)


def _matches(ctx: Context, database: str | None, name: str) -> bool:
    if database is None or database in ALL_DATABASES:
        return True
    return ctx.config.real_database(name) == ctx.config.real_database(database)


def flush(ctx: Context, mode: str, database: str | None = None) -> dict[str, int]:
    """idle: close idle server connections now; gracefully: also mark the ones in use to
    close when their client leaves; all: also abort the clients in session and close their
    server connections. Limited to ``database`` when given."""
    closed = marked = aborted = 0
    for slot in ctx.pool.idle_slots():
        if _matches(ctx, database, slot.key[0]):
            slot.conn.terminate()
            ctx.pool.discard(slot)
            closed += 1
    if mode in ("gracefully", "all"):
        for slot in ctx.pool.slots():
            if slot.state != IDLE and slot.conn is not None and _matches(
                    ctx, database, slot.key[0]):
                slot.conn.poolable = False  # release closes it instead of pooling it
                marked += 1
    if mode == "all":
        for client in list(ctx.clients):
            if _matches(ctx, database, client.database):
                client.abort()
                aborted += 1
    ctx.counters["flushed_connections"] += closed + marked
    ctx.prefill_initial = True  # the next maintenance tick prefills INITIAL_SIZE again
    log.info("flush %s (%s): %d idle closed, %d marked, %d clients aborted", mode,
             database or "all", closed, marked, aborted)
    return {"closed": closed, "marked": marked, "aborted": aborted}


def switch_to(ctx: Context, name: str) -> str:
    """Send new server connections to server ``name``; the previous one is marked failed.
    Existing connections are untouched. Returns the previous server's name."""
    names = [s.name for s in ctx.config.servers]
    if name not in names:
        raise KeyError(name)
    previous = ctx.server.name
    if previous != name:
        ctx.failed_servers.add(previous)
    ctx.failed_servers.discard(name)
    ctx.switched_to = name
    log.info("switched to server %s (was %s)", name, previous)
    return previous


def clear_server(ctx: Context, name: str) -> None:
    if name not in [s.name for s in ctx.config.servers]:
        raise KeyError(name)
    ctx.failed_servers.discard(name)


def clear_counters(ctx: Context) -> None:
    for name in ctx.counters:
        ctx.counters[name] = 0


def replace_main_key(config: Config, name: str, value: object) -> tuple[Config, object]:
    """``config`` with main key ``name`` set to ``value``; and the previous value."""
    old = getattr(config.main, name)
    changes: dict[str, Any] = {name: value}
    main = dataclasses.replace(config.main, **changes)
    return dataclasses.replace(config, main=main), old


def replace_server_key(config: Config, server: str, name: str,
                       value: object) -> tuple[Config, object]:
    """``config`` with key ``name`` of server section ``server`` set; and the previous value.
    KeyError if there is no such server."""
    servers = list(config.servers)
    for i, entry in enumerate(servers):
        if entry.name == server:
            old = getattr(entry, name)
            changes: dict[str, Any] = {name: value}
            servers[i] = dataclasses.replace(entry, **changes)
            return dataclasses.replace(config, servers=tuple(servers)), old
    raise KeyError(server)


def set_main_key(ctx: Context, name: str, value: object) -> object:
    """Apply a live key in memory (``conf set``); the previous value."""
    ctx.config, old = replace_main_key(ctx.config, name, value)
    return old


def set_server_key(ctx: Context, server: str, name: str, value: object) -> object:
    ctx.config, old = replace_server_key(ctx.config, server, name, value)
    return old


#: What the management layer may call, by name (the supervisor sends these names to workers).
OPERATIONS = {f.__name__: f for f in (status, details, disable, enable, flush, switch_to,
                                       clear_server, clear_counters, set_main_key,
                                       set_server_key)}
