"""The SQL admin console's statements: PgBouncer's SHOW views and commands, for the whole pooler.

A client of the virtual database ``pgcorral`` (alias ``pgbouncer``) is authenticated and served
by ``net.console`` in the worker that accepted it; every Query it sends comes here as text
(``answer``) and goes back as protocol messages (RowDescription, DataRows, CommandComplete, or
an ErrorResponse; the caller adds ReadyForQuery). What is shown and done comes from the
management commands (``management.commands.dispatch``) through ``manage``: with one process the
daemon runs them directly, with several workers the worker asks the supervisor, so a view is
every worker's data merged and a command acts on every worker.

The views keep PgBouncer 1.18's column names, types and order; pgcorral's own columns, where a
view has any, come after them (exporters read columns by name). docs/OBSERVABILITY.md says per
column what pgcorral shows where it has no such thing. No I/O here besides ``manage``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pgcorral import __version__
from pgcorral.config.keys import MAIN_KEYS, SERVER_KEYS
from pgcorral.pool.stats import percentile
from pgcorral.protocol import messages as msg

log = logging.getLogger("pgcorral.console")

#: Runs one management request ({"command", "args"}); its answer object.
Manage = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

#: The databases whose clients get the console (net.console).
CONSOLE_DATABASES = ("pgcorral", "pgbouncer")
#: Client and server ids in the views: worker * ID_STRIDE + the worker's own id
#: (net.control.CLIENT_ID_STRIDE).
ID_STRIDE = 1_000_000_000
#: PAUSE waits for the active server connections of the paused databases; it polls this often.
PAUSE_POLL = 0.05

TEXT, INT4, INT8, NUMERIC, BYTEA = 25, 23, 20, 1700, 17
_TYPLEN = {TEXT: -1, INT4: 4, INT8: 8, NUMERIC: -1, BYTEA: -1}
Column = tuple[str, int]
Row = Sequence[object]


class ConsoleError(Exception):
    """A statement refused: an ErrorResponse with this SQLSTATE, and the session goes on."""

    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text


# --- messages -------------------------------------------------------------------------------

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD = struct.Struct("!ihihih")


def row_description(columns: Sequence[Column]) -> bytes:
    body = bytearray(_I16.pack(len(columns)))
    for name, oid in columns:
        body += name.encode() + b"\0" + _FIELD.pack(0, 0, oid, _TYPLEN[oid], -1, 0)
    return msg.message(b"T", bytes(body))


def data_row(values: Row) -> bytes:
    body = bytearray(_I16.pack(len(values)))
    for value in values:
        if value is None:
            body += _I32.pack(-1)
            continue
        data = _text(value).encode("utf-8", "surrogateescape")
        body += _I32.pack(len(data)) + data
    return msg.message(b"D", bytes(body))


def command_complete(tag: str) -> bytes:
    return msg.message(b"C", tag.encode() + b"\0")


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value == int(value) else repr(value)
    return str(value)


def result(columns: Sequence[Column], rows: Sequence[Row], tag: str = "SHOW") -> bytes:
    return b"".join([row_description(columns), *(data_row(r) for r in rows),
                     command_complete(tag)])


def error(sqlstate: str, text: str) -> bytes:
    return msg.error_response(sqlstate, text, severity="ERROR")


# --- timestamps and ids ---------------------------------------------------------------------


def timestamp(epoch: float) -> str:
    """PgBouncer's format: local time, second precision, zone abbreviation."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def global_id(row: dict[str, Any]) -> int:
    return int(row.get("worker", 0)) * ID_STRIDE + int(row["id"])


def _ptr(kind: str, gid: int) -> str:
    return f"{kind}{gid:x}"


# --- the views ------------------------------------------------------------------------------

POOLS: list[Column] = [
    ("database", TEXT), ("user", TEXT), ("cl_active", INT4), ("cl_waiting", INT4),
    ("cl_active_cancel_req", INT4), ("cl_waiting_cancel_req", INT4), ("sv_active", INT4),
    ("sv_active_cancel", INT4), ("sv_being_canceled", INT4), ("sv_idle", INT4),
    ("sv_used", INT4), ("sv_tested", INT4), ("sv_login", INT4), ("maxwait", INT4),
    ("maxwait_us", INT4), ("pool_mode", TEXT),
    # pgcorral's
    ("cl_idle", INT4), ("cl_login", INT4), ("paused", INT4), ("wait_p50_us", INT8),
    ("wait_p99_us", INT8), ("xact_p50_us", INT8), ("xact_p95_us", INT8),
    ("xact_p99_us", INT8), ("query_p50_us", INT8), ("query_p99_us", INT8)]

_TOTALS = ["xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time",
           "query_time", "wait_time"]
STATS: list[Column] = [("database", TEXT)] + [
    (name, NUMERIC) for name in (
        "total_xact_count", "total_query_count", "total_received", "total_sent",
        "total_xact_time", "total_query_time", "total_wait_time", "avg_xact_count",
        "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time",
        "avg_wait_time")]
STATS_TOTALS: list[Column] = [("database", TEXT)] + [(n, NUMERIC) for n in _TOTALS]
STATS_AVERAGES = STATS_TOTALS
TOTALS: list[Column] = [("name", TEXT), ("value", NUMERIC)]
_TOTALS_NAMES = ("xact_count", "query_count", "client_bytes", "server_bytes", "xact_time",
                 "query_time", "wait_time")

_SOCKET_HEAD: list[Column] = [
    ("type", TEXT), ("user", TEXT), ("database", TEXT), ("state", TEXT), ("addr", TEXT),
    ("port", INT4), ("local_addr", TEXT), ("local_port", INT4), ("connect_time", TEXT),
    ("request_time", TEXT), ("wait", INT4), ("wait_us", INT4), ("close_needed", INT4),
    ("ptr", TEXT), ("link", TEXT), ("remote_pid", INT4), ("tls", TEXT),
    ("application_name", TEXT)]
_SOCKET_BUFFERS: list[Column] = [
    (n, INT4) for n in ("recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain",
                        "pkt_avail", "send_avail")]
_TALLY_COLUMNS: list[Column] = [
    ("xact_count", INT8), ("query_count", INT8), ("bytes_received", INT8),
    ("bytes_sent", INT8), ("xact_time_us", INT8), ("query_time_us", INT8)]
CLIENTS: list[Column] = [*_SOCKET_HEAD, ("id", INT8), ("worker", INT4), *_TALLY_COLUMNS,
                         ("wait_time_us", INT8), ("wait_count", INT8), ("hold_time_us", INT8),
                         ("pinned", TEXT)]
SERVERS: list[Column] = [*_SOCKET_HEAD, ("id", INT8), ("worker", INT4), *_TALLY_COLUMNS]
SOCKETS: list[Column] = _SOCKET_HEAD + _SOCKET_BUFFERS
DATABASES: list[Column] = [
    ("name", TEXT), ("host", TEXT), ("port", INT4), ("database", TEXT),
    ("force_user", TEXT), ("pool_size", INT4), ("min_pool_size", INT4),
    ("reserve_pool", INT4), ("pool_mode", TEXT), ("max_connections", INT4),
    ("current_connections", INT4), ("paused", INT4), ("disabled", INT4)]
USERS: list[Column] = [("name", TEXT), ("pool_mode", TEXT)]
CONFIG: list[Column] = [("key", TEXT), ("value", TEXT), ("default", TEXT),
                        ("changeable", TEXT)]
LISTS: list[Column] = [("list", TEXT), ("items", INT4)]
VERSION: list[Column] = [("version", TEXT)]
STATE: list[Column] = [("key", TEXT), ("value", TEXT)]
MEM: list[Column] = [("name", TEXT), ("size", INT4), ("used", INT4), ("free", INT4),
                     ("memtotal", INT4)]
FDS: list[Column] = [
    ("fd", INT4), ("task", TEXT), ("user", TEXT), ("database", TEXT), ("addr", TEXT),
    ("port", INT4), ("cancel", INT8), ("link", INT4), ("client_encoding", TEXT),
    ("std_strings", TEXT), ("datestyle", TEXT), ("timezone", TEXT), ("password", TEXT),
    ("scram_client_key", BYTEA), ("scram_server_key", BYTEA)]
DNS_HOSTS: list[Column] = [("hostname", TEXT), ("ttl", INT8), ("addrs", TEXT)]
DNS_ZONES: list[Column] = [("zonename", TEXT), ("serial", INT8), ("count", INT4)]

HELP = """
\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION
\tSHOW FDS|SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE
\tSHOW DNS_HOSTS|DNS_ZONES
\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS
\tSET key = arg
\tRELOAD
\tPAUSE [<db>]
\tRESUME [<db>]
\tDISABLE <db>
\tENABLE <db>
\tRECONNECT [<db>]
\tKILL <db>
\tKILL_CLIENT <id>
\tSUSPEND
\tSHUTDOWN
\tSHUTDOWN WAIT_FOR_CLIENTS
\tWAIT_CLOSE [<db>]"""


class Snapshot:
    """One ``stats`` answer (and, for views that need it, the configuration values)."""

    def __init__(self, stats: dict[str, Any], values: dict[str, Any] | None = None) -> None:
        self.stats = stats
        self.values = values or {}

    @property
    def uptime(self) -> float:
        return max(1.0, float(self.stats.get("time", 0)) - float(self.stats.get("started", 0)))

    def pools(self) -> list[dict[str, Any]]:
        return list(self.stats.get("pools", []))

    def by_database(self) -> dict[str, dict[str, int]]:
        """Pool totals added up per database (PgBouncer's STATS are per database)."""
        out: dict[str, dict[str, int]] = {}
        for pool in self.pools():
            entry = out.setdefault(pool["database"], dict.fromkeys(
                ("xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time_us",
                 "query_time_us", "wait_time_us", "wait_count"), 0))
            for name in entry:
                entry[name] += int(pool.get(name, 0))
        return out

    def current_server(self) -> dict[str, Any]:
        sections = self.stats.get("server_sections", [])
        for section in sections:
            if section.get("state") == "primary":
                return dict(section)
        return dict(sections[0]) if sections else {"host": "", "port": 0}

    def paused(self, database: str) -> bool:
        paused = self.stats.get("paused", [])
        return "*" in paused or database in paused

    def disabled(self, database: str) -> bool:
        disabled = self.stats.get("disabled", [])
        return "*" in disabled or database in disabled


def _totals(entry: dict[str, int]) -> list[int]:
    return [entry["xact_count"], entry["query_count"], entry["bytes_received"],
            entry["bytes_sent"], entry["xact_time_us"], entry["query_time_us"],
            entry["wait_time_us"]]


def _averages(entry: dict[str, int], uptime: float) -> list[int]:
    """Counts and bytes per second over the uptime; times per transaction, query and wait."""
    xacts, queries, waits = entry["xact_count"], entry["query_count"], entry["wait_count"]
    return [round(xacts / uptime), round(queries / uptime),
            round(entry["bytes_received"] / uptime), round(entry["bytes_sent"] / uptime),
            entry["xact_time_us"] // xacts if xacts else 0,
            entry["query_time_us"] // queries if queries else 0,
            entry["wait_time_us"] // waits if waits else 0]


def show_pools(s: Snapshot) -> Sequence[Row]:
    rows: list[Row] = []
    for p in s.pools():
        hist = p.get("hist", {})
        wait, xact, query = hist.get("wait", []), hist.get("xact", []), hist.get("query", [])
        maxwait = int(p.get("maxwait_us", 0))
        rows.append([
            p["database"], p["user"], p["cl_active"] + p["cl_idle"], p["cl_waiting"], 0, 0,
            p["sv_active"], 0, 0, p["sv_idle"], p["sv_used"], p["sv_tested"], p["sv_login"],
            maxwait // 1_000_000, maxwait % 1_000_000, p["pool_mode"],
            p["cl_idle"], p["cl_login"], int(bool(p.get("paused", False))),
            round(percentile(wait, 0.5)), round(percentile(wait, 0.99)),
            round(percentile(xact, 0.5)), round(percentile(xact, 0.95)),
            round(percentile(xact, 0.99)), round(percentile(query, 0.5)),
            round(percentile(query, 0.99))])
    return rows


def show_stats(s: Snapshot) -> Sequence[Row]:
    return [[db, *_totals(e), *_averages(e, s.uptime)]
            for db, e in sorted(s.by_database().items())]


def show_stats_totals(s: Snapshot) -> Sequence[Row]:
    return [[db, *_totals(e)] for db, e in sorted(s.by_database().items())]


def show_stats_averages(s: Snapshot) -> Sequence[Row]:
    return [[db, *_averages(e, s.uptime)] for db, e in sorted(s.by_database().items())]


def show_totals(s: Snapshot) -> Sequence[Row]:
    every = dict.fromkeys(("xact_count", "query_count", "bytes_received", "bytes_sent",
                           "xact_time_us", "query_time_us", "wait_time_us", "wait_count"), 0)
    for entry in s.by_database().values():
        for name in every:
            every[name] += entry[name]
    return ([[f"total_{n}", v] for n, v in zip(_TOTALS_NAMES, _totals(every), strict=True)]
            + [[f"avg_{n}", v] for n, v in zip(_TOTALS_NAMES, _averages(every, s.uptime),
                                                strict=True)])


def _local(s: Snapshot) -> tuple[str, int]:
    return str(s.values.get("host", "")), int(s.values.get("port", 0) or 0)


def _client_state(c: dict[str, Any]) -> str:
    """PgBouncer's client states: an idle client counts as active (cl_active); the console's
    own clients are active."""
    state = str(c["state"])
    if c["database"] in CONSOLE_DATABASES or state == "idle":
        return "active"
    return state


def _client_head(s: Snapshot, c: dict[str, Any], prefix: str = "") -> list[object]:
    local_addr, local_port = _local(s)
    wait = int(c.get("wait_current_us", 0))
    gid = global_id(c)
    server = int(c.get("server_id", 0))
    link = _ptr("s", int(c.get("worker", 0)) * ID_STRIDE + server) if server else ""
    return ["C", c["user"], c["database"], prefix + _client_state(c), c["address"],
            c.get("port", 0), local_addr, local_port, timestamp(c["connect_time"]),
            timestamp(c["request_time"]), wait // 1_000_000, wait % 1_000_000, 0,
            _ptr("c", gid), link, 0, c.get("tls", ""), c.get("application_name", "")]


def _server_state(state: str) -> str:
    return "new" if state == "login" else state


def _server_head(s: Snapshot, v: dict[str, Any], prefix: str = "") -> list[object]:
    gid = global_id(v)
    client = int(v.get("client_id", 0))
    link = _ptr("c", int(v.get("worker", 0)) * ID_STRIDE + client) if client else ""
    return ["S", v["user"], v["database"], prefix + _server_state(str(v["state"])),
            v.get("host", ""), v.get("port", 0), "", 0, timestamp(v["connect_time"]),
            timestamp(v["request_time"]), 0, 0, 0, _ptr("s", gid), link, v.get("pid", 0),
            "TLS" if v.get("tls") else "", ""]


def _tally(row: dict[str, Any]) -> list[object]:
    return [row.get(n, 0) for n, _ in _TALLY_COLUMNS]


def show_clients(s: Snapshot) -> Sequence[Row]:
    rows: list[Row] = []
    for c in sorted(s.stats.get("clients", []), key=global_id):
        rows.append([*_client_head(s, c), global_id(c), c.get("worker", 0), *_tally(c),
                     c.get("wait_us", 0), c.get("wait_count", 0), c.get("hold_us", 0),
                     c.get("pinned", "")])
    return rows


def show_servers(s: Snapshot) -> Sequence[Row]:
    return [[*_server_head(s, v), global_id(v), v.get("worker", 0), *_tally(v)]
            for v in sorted(s.stats.get("servers", []), key=global_id)]


def show_sockets(s: Snapshot, active_only: bool = False) -> Sequence[Row]:
    rows: list[Row] = []
    zeros = [0] * len(_SOCKET_BUFFERS)
    for c in sorted(s.stats.get("clients", []), key=global_id):
        if not active_only or _client_state(c) == "active":
            rows.append([*_client_head(s, c, "cl_"), *zeros])
    for v in sorted(s.stats.get("servers", []), key=global_id):
        if not active_only or v["state"] == "active":
            rows.append([*_server_head(s, v, "sv_"), *zeros])
    return rows


def _limits(s: Snapshot) -> dict[str, dict[str, Any]]:
    return {str(r["database"]): r for r in s.values.get("_limits", [])}


def show_databases(s: Snapshot) -> Sequence[Row]:
    server = s.current_server()
    limits = _limits(s)
    pools: dict[str, list[dict[str, Any]]] = {}
    for pool in s.pools():
        pools.setdefault(pool["database"], []).append(pool)
    named = {*limits, *s.stats.get("paused", []), *s.stats.get("disabled", [])}
    names = sorted(set(pools) | (named - {"all", "*"}))
    mode = "transaction" if s.stats.get("pipeline") == "transaction" else "session"
    rows: list[Row] = []
    for name in names:
        mine = pools.get(name, [])
        limit = limits.get(name)
        pool_size = max([int(p["pool_size"]) for p in mine], default=int(
            limit["max_size"]) if limit and int(limit["max_size"]) > 0 else int(
            s.stats.get("max_connections", 0)))
        min_size = max([int(p["min_pool_size"]) for p in mine], default=int(
            limit["min_size"]) if limit else 0)
        current = sum(int(p[k]) for p in mine for k in (
            "sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))
        paused = s.paused(name) or (bool(mine) and all(p.get("paused") for p in mine))
        rows.append([name, server.get("host", ""), server.get("port", 0), name, None,
                     pool_size, min_size, 0, mode, 0, current, int(paused),
                     int(s.disabled(name))])
    return rows


def _names(text: object) -> list[str]:
    return [n.strip() for n in str(text or "").split(",") if n.strip()]


def show_users(s: Snapshot) -> Sequence[Row]:
    users = {p["user"] for p in s.pools()}
    users.update(_names(s.values.get("admin_users")))
    users.update(_names(s.values.get("stats_users")))
    rows: list[Row] = [[u, None] for u in sorted(users)]
    return rows


def _value_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return _text(value)


def show_config(s: Snapshot) -> Sequence[Row]:
    rows: list[Row] = []
    for name, value in s.values.items():
        if name.startswith("_"):
            continue
        key = MAIN_KEYS.get(name) if not name.startswith("server.") else SERVER_KEYS.get(
            name.rsplit(".", 1)[-1])
        if key is None:
            continue
        rows.append([name, _value_text(value), _value_text(key.default),
                     "yes" if key.reloadable else "no"])
    return rows


def show_lists(s: Snapshot) -> Sequence[Row]:
    clients = s.stats.get("clients", [])
    pools = s.pools()
    return [["databases", len({p["database"] for p in pools})],
            ["users", len({p["user"] for p in pools})], ["pools", len(pools)],
            ["free_clients", 0], ["used_clients", len(clients)],
            ["login_clients", sum(1 for c in clients if _client_state(c) == "login")],
            ["free_servers", 0], ["used_servers", len(s.stats.get("servers", []))],
            ["dns_names", 0], ["dns_zones", 0], ["dns_queries", 0], ["dns_pending", 0]]


def show_state(s: Snapshot) -> Sequence[Row]:
    paused = "*" in s.stats.get("paused", [])
    active = s.stats.get("status", "running") == "running"
    return [["active", "yes" if active else "no"], ["paused", "yes" if paused else "no"],
            ["suspended", "no"]]


def show_mem(s: Snapshot) -> Sequence[Row]:
    pools = s.pools()
    used = {"user_cache": len({p["user"] for p in pools}),
            "db_cache": len({p["database"] for p in pools}), "pool_cache": len(pools),
            "server_cache": len(s.stats.get("servers", [])),
            "client_cache": len(s.stats.get("clients", [])), "iobuf_cache": 0}
    return [[name, 0, n, 0, 0] for name, n in used.items()]


def show_version(s: Snapshot) -> Sequence[Row]:
    return [[f"pgcorral {__version__}"]]


def _empty(s: Snapshot) -> Sequence[Row]:
    return []


#: SHOW name -> (columns, rows from a snapshot, needs the configuration values)
VIEWS: dict[str, tuple[list[Column], Callable[[Snapshot], Sequence[Row]], bool]] = {
    "POOLS": (POOLS, show_pools, False),
    "STATS": (STATS, show_stats, False),
    "STATS_TOTALS": (STATS_TOTALS, show_stats_totals, False),
    "STATS_AVERAGES": (STATS_AVERAGES, show_stats_averages, False),
    "TOTALS": (TOTALS, show_totals, False),
    "CLIENTS": (CLIENTS, show_clients, True),
    "SERVERS": (SERVERS, show_servers, False),
    "SOCKETS": (SOCKETS, show_sockets, True),
    "ACTIVE_SOCKETS": (SOCKETS, lambda s: show_sockets(s, active_only=True), True),
    "DATABASES": (DATABASES, show_databases, True),
    "USERS": (USERS, show_users, True),
    "CONFIG": (CONFIG, show_config, True),
    "LISTS": (LISTS, show_lists, False),
    "VERSION": (VERSION, show_version, False),
    "STATE": (STATE, show_state, False),
    "MEM": (MEM, show_mem, False),
    "FDS": (FDS, _empty, False),
    "DNS_HOSTS": (DNS_HOSTS, _empty, False),
    "DNS_ZONES": (DNS_ZONES, _empty, False),
}


# --- statements -----------------------------------------------------------------------------

_WORDS = re.compile(r"^\s*([A-Za-z_]+)(?:\s+([A-Za-z0-9_.*\-]+|\"[^\"]+\"))?\s*$")
_SET = re.compile(r"^\s*SET\s+([A-Za-z_][A-Za-z0-9_.]*)\s*(?:=|\s+TO\s+)\s*(.*?)\s*$",
                  re.IGNORECASE | re.DOTALL)
_SHUTDOWN_WAIT = re.compile(r"^\s*SHUTDOWN\s+WAIT_FOR_CLIENTS\s*$", re.IGNORECASE)


def invalid(statement: str) -> ConsoleError:
    return ConsoleError("08P01", f"invalid command '{statement}', use SHOW HELP;")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'")
    return value


async def _call(manage: Manage, command: str, *args: str) -> dict[str, Any]:
    answer = await manage({"command": command, "args": list(args)})
    if answer.get("outcome") != "ok":
        raise ConsoleError("08P01", str(answer.get("reason", f"{command} failed")))
    return answer


async def _snapshot(manage: Manage, values: bool) -> Snapshot:
    stats = await _call(manage, "stats")
    conf: dict[str, Any] = {}
    if values:
        conf = dict((await _call(manage, "conf", "get"))["values"])
        conf["_limits"] = (await _call(manage, "conf", "alias"))["databases"]
    return Snapshot(stats, conf)


async def _show(manage: Manage, what: str, statement: str) -> bytes:
    if what == "HELP":
        fields = (b"SNOTICE\0VNOTICE\0C00000\0MConsole usage\0D" + HELP.encode() + b"\0\0")
        return msg.message(b"N", fields) + command_complete("SHOW")
    view = VIEWS.get(what)
    if view is None:
        raise invalid(statement)
    columns, rows, values = view
    return result(columns, rows(await _snapshot(manage, values)))


async def _pause(manage: Manage, database: str | None) -> None:
    """PAUSE: new transactions of the database wait; returns once none of its server
    connections is active (PgBouncer's PAUSE blocks the same way)."""
    await _call(manage, "pause", *([database] if database else []))
    every = database in (None, "all", "*")
    while True:
        stats = await _call(manage, "stats")
        if not any(p["sv_active"] for p in stats.get("pools", [])
                   if every or p["database"] == database):
            return
        await asyncio.sleep(PAUSE_POLL)


async def _command(manage: Manage, verb: str, arg: str | None, statement: str) -> str:
    """Run an admin command; its command tag."""
    if verb in ("DISABLE", "ENABLE", "KILL") and arg is None:
        raise ConsoleError("08P01", "a database is required")
    if verb == "PAUSE":
        await _pause(manage, arg)
    elif verb == "RESUME":
        await _call(manage, "resume", *([arg] if arg else []))
    elif verb in ("DISABLE", "ENABLE"):
        assert arg is not None
        await _call(manage, verb.lower(), arg)
    elif verb == "RECONNECT":
        await _call(manage, "flush", "gracefully", arg or "all")
    elif verb == "KILL":
        assert arg is not None
        await _call(manage, "flush", "all", arg)
    elif verb == "KILL_CLIENT":
        if arg is None or not arg.isdigit():
            raise ConsoleError("08P01", "KILL_CLIENT needs a client id (SHOW CLIENTS, id)")
        await _call(manage, "kill-client", arg)
    elif verb == "SHUTDOWN":
        if arg is not None:
            raise invalid(statement)
        await _call(manage, "shutdown", "immediate")
    elif verb == "RELOAD":
        if arg is not None:
            raise invalid(statement)
        await _call(manage, "conf", "reload")
    elif verb in ("SUSPEND", "WAIT_CLOSE"):
        raise ConsoleError("0A000", f"{verb} is not supported by pgcorral (it has no online "
                           "restart); RECONNECT and PAUSE/RESUME are")
    else:
        raise invalid(statement)
    return verb


async def answer(statement: str, admin: bool, manage: Manage) -> bytes:
    """The protocol messages answering one Query of the console (ReadyForQuery not included).
    ``admin``: False for ``stats_users``, who may only SHOW."""
    try:
        return await _answer(statement, admin, manage)
    except ConsoleError as exc:
        return error(exc.sqlstate, exc.text)
    except Exception:
        log.exception("admin console statement %r failed", statement)
        return error("XX000", "internal error in pgcorral")


async def _answer(statement: str, admin: bool, manage: Manage) -> bytes:
    text = statement.strip()
    if text.endswith(";"):
        text = text[:-1].rstrip()
    words = _WORDS.match(text)
    verb = words.group(1).upper() if words else text.split(None, 1)[0].upper() if text else ""
    if verb == "SHOW" and words is not None:
        what = (words.group(2) or "").upper()
        if not what:
            raise invalid(statement.strip())
        return await _show(manage, what, statement.strip())
    if not admin and verb in ("SET", "PAUSE", "RESUME", "DISABLE", "ENABLE", "RECONNECT",
                              "KILL", "KILL_CLIENT", "SHUTDOWN", "RELOAD", "SUSPEND",
                              "WAIT_CLOSE"):
        raise ConsoleError("42501", "admin access needed")
    if verb == "SET":
        match = _SET.match(text)
        if match is None:
            raise invalid(statement.strip())
        key, value = match.group(1), _unquote(match.group(2))
        await _call(manage, "conf", "set", key, value)
        return command_complete(f"SET {key}={value}")
    if _SHUTDOWN_WAIT.match(text):
        await _call(manage, "shutdown", "wait_for_clients")
        return command_complete("SHUTDOWN")
    if words is None:
        raise invalid(statement.strip())
    arg = words.group(2)
    if arg is not None and arg.startswith('"'):
        arg = arg[1:-1]
    return command_complete(await _command(manage, verb, arg, statement.strip()))
