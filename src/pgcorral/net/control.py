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
from pgcorral.net.console import is_console
from pgcorral.pool.pool import ACTIVE, IDLE, OPENING
from pgcorral.pool.stats import BUCKETS_US, PoolStats, Tally
from pgcorral.pool.topology import Snapshot

if TYPE_CHECKING:
    from pgcorral.net.context import Context

log = logging.getLogger("pgcorral.context")

#: Database names that mean every database in flush/enable/disable.
ALL_DATABASES = ("all", "*")


def status(ctx: Context) -> dict[str, Any]:
    """Counts of the pool and the clients, servers, disabled databases, counters."""
    pool = ctx.pool
    pools = ctx.pools()
    current = ctx.server.name
    topology = ctx.topology
    busy = {p.server: p.count(ACTIVE) for p in pools if p.server}
    servers = [{"name": s.name, "host": s.host, "port": s.port,
                "state": _section_state(ctx, s.name, current),
                "lsn": topology.lsn_of(s.name), "reads_active": busy.get(s.name, 0),
                "errors": ctx.server_errors.get(s.name, 0)}
               for s in ctx.config.servers]
    return {
        "status": "graceful shutdown" if ctx.shutting_down or ctx.draining else "running",
        "active_connections": sum(p.count(ACTIVE) for p in pools),
        "idle_connections": sum(p.count(IDLE) for p in pools),
        "opening_connections": sum(p.count(OPENING) for p in pools),
        "total_connections": sum(p.total for p in pools),
        "max_connections": pool.max_connections, "clients": len(ctx.clients),
        "waiting_clients": sum(p.waiting for p in pools), "pinned_clients": ctx.pinned,
        "writes_refused": topology.refusal if topology.primary is None else "",
        "reads_to_replica": ctx.reads_to_replica, "reads_to_primary": ctx.reads_to_primary,
        "server": current, "servers": servers,
        "disabled": sorted(ctx.disabled), "counters": dict(ctx.counters),
        "worker": ctx.worker, "pid": os.getpid(),
    }


def _section_state(ctx: Context, name: str, current: str) -> str:
    """primary, replica, lagging, down (health_check on); else as pgagroal: primary, failed,
    notinit."""
    topology = ctx.topology
    if topology.known:
        state = topology.state_of(name)
        if state == "primary" and topology.primary is None:
            return "primary (split brain)" if topology.refusal.startswith("split") else state
        return state
    return "primary" if name == current else \
        "failed" if name in ctx.failed_servers else "notinit"


def set_topology(ctx: Context, snapshot: Snapshot) -> None:
    """The health checker's decision (``supervisor.health``): route by it."""
    ctx.set_topology(snapshot)


def details(ctx: Context) -> dict[str, Any]:
    """``status`` plus one entry per server connection and per client."""
    now_mono, now = time.monotonic(), time.time()
    connections = []
    for slot in sorted((s for p in ctx.pools() for s in p.slots()), key=lambda s: s.id):
        conn = slot.conn
        connections.append({
            "id": slot.id, "state": slot.state, "database": slot.key[0],
            "user": slot.key[1], "pid": getattr(conn, "pid", 0) if conn else 0,
            "started": round(now - (now_mono - slot.created_at), 3),
            "last_used": round(now - (now_mono - slot.last_used), 3),
            "tls": bool(getattr(conn, "tls", False)), "worker": ctx.worker})
    sessions = [{"user": c.user, "database": c.database, "address": c.address or "[local]",
                 "pid": c.server.pid if c.server is not None else 0,
                 "tls": c.tls.version() if c.tls is not None else "", "worker": ctx.worker,
                 "pinned": ", ".join(getattr(c, "pinned", ()))}
                for c in ctx.clients]
    sessions.sort(key=lambda c: (str(c["database"]), str(c["user"]), str(c["address"])))
    return {**status(ctx), "connections": connections, "sessions": sessions}


def _now_us() -> int:
    return time.monotonic_ns() // 1000


def _client_state(client: Any) -> str:
    if is_console(client.database):
        return "console"  # a session of the SQL admin console (net.console)
    if client.wait_since_us:
        return "waiting"
    if client.server is not None:
        return "active"
    return "idle" if client.linked_once else "login"


def _request_time(server: Any, now: float, now_us: int, otherwise: float) -> float:
    """Epoch seconds of the latest request on ``server`` (running, else answered)."""
    if server is None:
        return otherwise
    at = server.request_us or server.last_ready_us
    return now - (now_us - at) / 1e6 if at else otherwise


def _server_state(slot: Any) -> str:
    if slot.state == OPENING:
        return "login"
    if slot.state == IDLE:
        return "idle"
    conn = slot.conn
    return "active" if conn is not None and conn.peer is not None else "tested"


def _new_pool_entry(ctx: Context, key: tuple[str, str]) -> dict[str, Any]:
    rule = ctx.pool.rule_for(key)
    return {
        "database": key[0], "user": key[1],
        "pool_mode": "transaction" if ctx.config.main.pipeline == "transaction" else "session",
        "cl_active": 0, "cl_waiting": 0, "cl_idle": 0, "cl_login": 0,
        "cl_pinned": 0,  # transaction pipeline: clients pinned to a server connection
        "sv_active": 0, "sv_idle": 0, "sv_used": 0, "sv_tested": 0, "sv_login": 0,
        "maxwait_us": 0, "paused": ctx.pool.is_paused(key),
        "pool_size": rule.max_size if rule is not None and rule.max_size > 0
        else ctx.pool.max_connections,
        "min_pool_size": rule.min_size if rule is not None else 0,
        "_tally": Tally()}


def _client_row(ctx: Context, client: Any, tally: Tally, state: str, now: float,
                now_us: int) -> dict[str, Any]:
    server = client.server
    return {
        "id": client.id, "worker": ctx.worker, "database": client.database,
        "user": client.user, "address": client.address or "[local]", "port": client.port,
        "application_name": client.settings.get("application_name", ""),
        "state": state, "tls": client.tls.version() if client.tls is not None else "",
        "connect_time": client.connect_time,
        "request_time": _request_time(server, now, now_us, client.connect_time),
        "wait_us": tally.wait_us + (now_us - client.wait_since_us if client.wait_since_us
                                    else 0),
        "hold_us": tally.hold_us + (now_us - client.hold_since_us if client.hold_since_us
                                    else 0),
        "wait_current_us": now_us - client.wait_since_us if client.wait_since_us else 0,
        "server_pid": server.pid if server is not None else 0,
        "server_id": server.slot.id if server is not None else 0,
        # transaction pipeline: why it keeps its server connection between transactions
        "pinned": ", ".join(getattr(client, "pinned", ())),
        **{k: v for k, v in tally.as_dict().items()
           if k not in ("wait_time_us", "hold_time_us")}}


def _server_row(ctx: Context, slot: Any, state: str, now: float,
                now_mono: float) -> dict[str, Any]:
    conn = slot.conn
    section = ctx.config.server_named(conn.server_name) if conn is not None and \
        conn.server_name else None
    return {
        "id": slot.id, "worker": ctx.worker, "database": slot.key[0], "user": slot.key[1],
        "state": state, "pid": conn.pid if conn is not None else 0,
        "server": conn.server_name if conn is not None else "",
        "host": section.host if section is not None else "",
        "port": section.port if section is not None else 0,
        "tls": bool(conn.tls) if conn is not None else False,
        "connect_time": round(now - (now_mono - slot.created_at), 3),
        "request_time": round(now - (now_mono - slot.last_used), 3),
        "client_id": conn.client_id if conn is not None else 0,
        **(conn.tally if conn is not None else Tally()).as_dict()}


def _pool_counters(entry: dict[str, Any], pstats: PoolStats, live: list[int]) -> None:
    """The pool's totals (its ``_tally``), errors, logins, prepared statements (``live``:
    those of its open server connections) and histograms, into its entry."""
    entry.update(entry.pop("_tally").as_dict())
    entry["errors"] = dict(pstats.errors)
    entry["logins"] = dict(pstats.logins)
    entry["prepared"] = {"hits": pstats.hits + live[0], "misses": pstats.misses + live[1],
                         "evictions": pstats.evictions + live[2]}
    hists = {"wait": pstats.hist_wait, "xact": pstats.hist_xact, "query": pstats.hist_query}
    entry["hist"] = {name: list(h.counts) for name, h in hists.items()}
    entry["hist_sum_us"] = {name: h.sum_us for name, h in hists.items()}


def _client_groups(ctx: Context, clients: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (address, application_name, user): the departed clients' group plus the live."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {
        gkey: {"clients": 0, "clients_total": group.clients, **group.tally.as_dict()}
        for gkey, group in ctx.groups.items()}
    for c in clients:
        gkey = (str(c["address"]), str(c["application_name"]), str(c["user"]))
        g = groups.get(gkey)
        if g is None:
            g = groups[gkey] = {"clients": 0, "clients_total": 0, **Tally().as_dict()}
        g["clients"] += 1
        g["clients_total"] += 1
        for name in ("xact_count", "query_count", "bytes_received", "bytes_sent",
                     "xact_time_us", "query_time_us"):
            g[name] += c[name]
        g["wait_time_us"] += c["wait_us"]
        g["hold_time_us"] += c["hold_us"]
    return [{"address": k[0], "application_name": k[1], "user": k[2], **v}
            for k, v in sorted(groups.items())]


def stats(ctx: Context) -> dict[str, Any]:
    """Everything the views show, for this worker: pools with their state counts, totals and
    histograms; every client and server connection with its counters; client groups. Plain
    data (it crosses processes); ``supervisor.multi.merge_stats`` adds workers up. Times:
    ``*_time`` epoch seconds, ``*_us`` microseconds."""
    now_us, now, now_mono = _now_us(), time.time(), time.monotonic()
    pools: dict[tuple[str, str], dict[str, Any]] = {}

    def pool_entry(key: tuple[str, str]) -> dict[str, Any]:
        entry = pools.get(key)
        if entry is None:
            entry = pools[key] = _new_pool_entry(ctx, key)
        return entry

    for key, pstats in ctx.stats.items():
        pool_entry(key)["_tally"].add(pstats.retired)
    clients = []
    for client in ctx.clients:
        state = _client_state(client)
        tally = Tally()
        tally.add(client.tally)
        server = client.server
        if server is not None and (client.hold_since_us or getattr(server, "client", None)
                                   is client):  # linked: what it did through it so far
            tally.add_since(server.tally, server.at_link)
        if client.linked_once or state == "waiting":
            entry = pool_entry(server.slot.key if server is not None else (
                ctx.config.real_database(client.database), client.user))
            entry["cl_" + state] += 1
            if getattr(client, "pinned", None):
                entry["cl_pinned"] += 1
            entry["_tally"].add(tally)
        clients.append(_client_row(ctx, client, tally, state, now, now_us))
    for key, (_count, since) in ctx.pool.waiting_by_key().items():
        entry = pool_entry(key)
        entry["maxwait_us"] = max(entry["maxwait_us"], int((now_mono - since) * 1e6))
    servers = []
    prepared: dict[tuple[str, str], list[int]] = {}
    for slot in sorted((s for p in ctx.pools() for s in p.slots()), key=lambda s: s.id):
        state = _server_state(slot)
        pool_entry(slot.key)["sv_" + state] += 1
        servers.append(_server_row(ctx, slot, state, now, now_mono))
        statements = getattr(slot.conn, "statements", None)
        if statements is not None:
            counts = prepared.setdefault(slot.key, [0, 0, 0])
            counts[0] += statements.hits
            counts[1] += statements.misses
            counts[2] += statements.evictions
    for key, entry in pools.items():
        _pool_counters(entry, ctx.stats.get(key) or PoolStats(), prepared.get(key, [0, 0, 0]))
    return {
        "time": now, "started": ctx.started_at, "status": "graceful shutdown"
        if ctx.shutting_down or ctx.draining else "running",
        "pipeline": ctx.config.main.pipeline,
        "max_connections": ctx.pool.max_connections, "worker": ctx.worker,
        "pid": os.getpid(), "buckets_us": list(BUCKETS_US),
        "pools": [pools[k] for k in sorted(pools)], "clients": clients, "servers": servers,
        "client_groups": _client_groups(ctx, clients),
        "counters": dict(ctx.counters), "disabled": sorted(ctx.disabled),
        "paused": sorted(ctx.pool.paused),
        "workers": [{"worker": ctx.worker, "pid": os.getpid(), "clients": len(clients),
                     "servers": len(servers)}],
        "server_sections": status(ctx)["servers"]}


def pause(ctx: Context, database: str) -> list[str]:
    """PAUSE: clients of ``database`` ("all"/"*": every one) get no server connection until
    ``resume``; transactions and sessions running now go on. The paused databases."""
    for pool in ctx.pools():
        pool.pause("*" if database in ALL_DATABASES else ctx.config.real_database(database))
    log.info("paused %s", database)
    return sorted(ctx.pool.paused)


def resume(ctx: Context, database: str) -> list[str]:
    for pool in ctx.pools():
        pool.resume("*" if database in ALL_DATABASES else ctx.config.real_database(database))
    log.info("resumed %s", database)
    return sorted(ctx.pool.paused)


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
    for slot in [s for p in ctx.pools() for s in p.idle_slots()]:
        if _matches(ctx, database, slot.key[0]):
            slot.conn.terminate()
            ctx.pool_of(slot, ctx.pool).discard(slot)
            closed += 1
    if mode in ("gracefully", "all"):
        for slot in [s for p in ctx.pools() for s in p.slots()]:
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
    """``clear prometheus``: every counter and histogram back to 0, the live clients' and
    server connections' tallies too (gauges such as pool state counts are not counters)."""
    for name in ctx.counters:
        ctx.counters[name] = 0
    ctx.server_errors.clear()
    for pstats in ctx.stats.values():
        pstats.clear()
    ctx.groups.clear()
    now_us = _now_us()
    for client in ctx.clients:
        client.tally = Tally()
        # a hold or wait in progress counts from now on
        if client.hold_since_us:
            client.hold_since_us = now_us
        if client.wait_since_us:
            client.wait_since_us = now_us
        client.login_wait_us = 0
    for slot in ctx.pool.slots():
        if slot.conn is not None:
            slot.conn.tally = Tally()
            slot.conn.at_link = Tally()  # a linked client's share so far: 0 too


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


#: Client ids the SQL admin console shows are unique across workers:
#: ``worker * CLIENT_ID_STRIDE + id`` (``id`` counts per worker).
CLIENT_ID_STRIDE = 1_000_000_000


def kill_client(ctx: Context, client_id: int) -> bool:
    """Abort the client ``client_id`` (a console id, see CLIENT_ID_STRIDE) if it is one of this
    worker's; True if it was (every worker is asked, only the owner finds it)."""
    worker, local = divmod(client_id, CLIENT_ID_STRIDE)
    if worker != ctx.worker:
        return False
    for client in list(ctx.clients):
        if client.id == local:
            log.info("killing client %d (%s, user %r, database %r)", client_id,
                     client.address or "[local]", client.user, client.database)
            client.abort()
            return True
    return False


#: What the management layer may call, by name (the supervisor sends these names to workers).
OPERATIONS = {f.__name__: f for f in (status, details, stats, pause, resume, disable, enable,
                                       flush, switch_to, clear_server, clear_counters,
                                       set_main_key, set_server_key, kill_client,
                                       set_topology)}
