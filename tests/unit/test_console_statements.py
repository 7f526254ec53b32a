"""The SQL console's statements without a network: what each statement asks of the management
layer, and the rows built from a stats snapshot (management.sqlconsole)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from pgcorral.management import sqlconsole


class Recorder:
    """A ``manage`` callable: records requests, answers ``stats`` with a snapshot."""

    def __init__(self, stats: dict[str, Any] | None = None,
                 fail: dict[str, str] | None = None) -> None:
        self.requests: list[list[str]] = []
        self.stats = stats or snapshot()
        self.fail = fail or {}

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append([request["command"], *request["args"]])
        if request["command"] in self.fail:
            return {"outcome": "error", "reason": self.fail[request["command"]]}
        if request["command"] == "stats":
            return {"outcome": "ok", **self.stats}
        if request["command"] == "conf" and request["args"] == ["get"]:
            return {"outcome": "ok", "values": {"host": "127.0.0.1", "port": 6432,
                                                "admin_users": "a, b", "stats_users": "s",
                                                "max_connections": 20, "tls": False}}
        if request["command"] == "conf" and request["args"] == ["alias"]:
            return {"outcome": "ok", "databases": []}
        return {"outcome": "ok"}


def pool(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "database": "db", "user": "u", "pool_mode": "session", "cl_active": 2, "cl_idle": 3,
        "cl_waiting": 1, "cl_login": 0, "sv_active": 2, "sv_idle": 1, "sv_used": 0,
        "sv_tested": 0, "sv_login": 0, "maxwait_us": 2_500_000, "pool_size": 20,
        "min_pool_size": 0, "xact_count": 100, "query_count": 200, "bytes_received": 1000,
        "bytes_sent": 5000, "xact_time_us": 10_000, "query_time_us": 8_000,
        "wait_time_us": 600, "wait_count": 3, "paused": False,
        "hist": {"wait": [0], "xact": [0], "query": [0]}}
    base.update(fields)
    return base


def snapshot(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "time": 1100.0, "started": 1000.0, "status": "running", "pipeline": "session",
        "max_connections": 20, "pools": [pool()], "clients": [], "servers": [],
        "disabled": [], "paused": [],
        "server_sections": [{"name": "primary", "host": "pg", "port": 5432,
                             "state": "primary"}]}
    base.update(fields)
    return base


def run(statement: str, manage: Recorder, admin: bool = True) -> bytes:
    return asyncio.run(sqlconsole.answer(statement, admin, manage))


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        type_ = data[pos:pos + 1]
        (length,) = struct.unpack_from("!i", data, pos + 1)
        out.append((type_, data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def error_of(data: bytes) -> dict[str, str]:
    [(type_, body)] = messages(data)
    assert type_ == b"E"
    return {chr(p[0]): p[1:].decode() for p in body.rstrip(b"\0").split(b"\0") if p}


def rows_of(data: bytes) -> tuple[list[str], list[list[str | None]], str]:
    names: list[str] = []
    rows: list[list[str | None]] = []
    tag = ""
    for type_, body in messages(data):
        if type_ == b"T":
            (n,) = struct.unpack_from("!h", body)
            pos = 2
            for _ in range(n):
                end = body.index(b"\0", pos)
                names.append(body[pos:end].decode())
                pos = end + 1 + 18
        elif type_ == b"D":
            (n,) = struct.unpack_from("!h", body)
            pos, row = 2, []
            for _ in range(n):
                (size,) = struct.unpack_from("!i", body, pos)
                pos += 4
                row.append(None if size < 0 else body[pos:pos + size].decode())
                pos += max(size, 0)
            rows.append(row)
        elif type_ == b"C":
            tag = body.rstrip(b"\0").decode()
    return names, rows, tag


@pytest.mark.parametrize(("statement", "request_", "tag"), [
    ("PAUSE", ["pause"], "PAUSE"),
    ("pause db;", ["pause", "db"], "PAUSE"),
    ("RESUME db", ["resume", "db"], "RESUME"),
    ("DISABLE db", ["disable", "db"], "DISABLE"),
    ("ENABLE db", ["enable", "db"], "ENABLE"),
    ("RECONNECT", ["flush", "gracefully", "all"], "RECONNECT"),
    ("RECONNECT db", ["flush", "gracefully", "db"], "RECONNECT"),
    ("KILL db", ["flush", "all", "db"], "KILL"),
    ("KILL_CLIENT 1000000007", ["kill-client", "1000000007"], "KILL_CLIENT"),
    ("SHUTDOWN", ["shutdown", "immediate"], "SHUTDOWN"),
    ("shutdown wait_for_clients;", ["shutdown", "wait_for_clients"], "SHUTDOWN"),
    ("RELOAD", ["conf", "reload"], "RELOAD"),
    ("SET log_level = debug", ["conf", "set", "log_level", "debug"], "SET log_level=debug"),
    ("set server_reset_query TO 'SELECT ''x'''",
     ["conf", "set", "server_reset_query", "SELECT 'x'"], "SET server_reset_query=SELECT 'x'"),
])
def test_commands_map_onto_management_commands(statement: str, request_: list[str],
                                               tag: str) -> None:
    manage = Recorder(snapshot(pools=[pool(sv_active=0)]))
    names, _, got = rows_of(run(statement, manage))
    assert manage.requests[0] == request_
    assert got == tag and names == []


@pytest.mark.parametrize("statement", ["", "SELECT 1", "SHOW", "SHOW nothing",
                                       "SHOW POOLS; SHOW USERS", "RELOAD now",
                                       "SHUTDOWN NOW", "FOO BAR BAZ"])
def test_invalid_statements_get_pgbouncers_error(statement: str) -> None:
    manage = Recorder()
    error = error_of(run(statement, manage))
    assert (error["S"], error["C"]) == ("ERROR", "08P01")
    assert error["M"] == f"invalid command '{statement.strip()}', use SHOW HELP;"
    assert manage.requests == []


def test_stats_users_may_only_show() -> None:
    manage = Recorder()
    for statement in ("PAUSE", "SET a = b", "KILL db", "SHUTDOWN WAIT_FOR_CLIENTS",
                      "RELOAD", "SUSPEND"):
        assert error_of(run(statement, manage, admin=False))["C"] == "42501"
    assert manage.requests == []
    assert rows_of(run("SHOW POOLS", manage, admin=False))[2] == "SHOW"


def test_a_refused_command_gives_its_reason() -> None:
    manage = Recorder(fail={"conf": "restart required"})
    error = error_of(run("SET port = 1", manage))
    assert (error["C"], error["M"]) == ("08P01", "restart required")
    assert error_of(run("DISABLE", manage))["M"] == "a database is required"
    assert error_of(run("WAIT_CLOSE", manage))["C"] == "0A000"


def test_pause_waits_until_no_server_connection_is_active() -> None:
    busy = {"n": 3}

    class Busy(Recorder):
        async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
            if request["command"] == "stats":
                busy["n"] -= 1
                self.stats = snapshot(pools=[pool(sv_active=max(busy["n"], 0)),
                                             pool(database="other", sv_active=5)])
            return await super().__call__(request)

    manage = Busy()
    assert rows_of(run("PAUSE db", manage))[2] == "PAUSE"
    assert [r[0] for r in manage.requests] == ["pause", "stats", "stats", "stats"]


def test_pools_in_pgbouncers_terms() -> None:
    names, rows, _ = rows_of(run("SHOW POOLS", Recorder()))
    row = dict(zip(names, rows[0], strict=True))
    assert row["cl_active"] == "5"  # linked and idle clients, as PgBouncer counts them
    assert row["cl_idle"] == "3"
    assert (row["maxwait"], row["maxwait_us"]) == ("2", "500000")
    assert names[:16] == [c for c, _ in sqlconsole.POOLS[:16]]


def test_stats_totals_and_averages() -> None:
    names, rows, _ = rows_of(run("SHOW STATS", Recorder()))
    row = dict(zip(names, rows[0], strict=True))
    assert (row["total_xact_count"], row["total_received"], row["total_sent"]) == (
        "100", "1000", "5000")
    # per second over 100 s of uptime; times per transaction, query and wait
    assert (row["avg_xact_count"], row["avg_query_count"], row["avg_recv"]) == ("1", "2", "10")
    assert (row["avg_xact_time"], row["avg_query_time"], row["avg_wait_time"]) == (
        "100", "40", "200")
    names, rows, _ = rows_of(run("SHOW TOTALS", Recorder()))
    totals = {r[0]: r[1] for r in rows}
    assert totals["total_client_bytes"] == "1000" and totals["avg_server_bytes"] == "50"


def test_clients_and_servers_carry_global_ids_and_links() -> None:
    client = {"id": 7, "worker": 1, "database": "db", "user": "u", "address": "10.0.0.1",
              "port": 4000, "application_name": "app", "state": "idle", "tls": "",
              "connect_time": 0.0, "request_time": 0.0, "wait_us": 5, "hold_us": 9,
              "wait_current_us": 1_000_002, "server_pid": 123, "server_id": 4,
              "xact_count": 3, "query_count": 4, "wait_count": 1}
    server = {"id": 4, "worker": 1, "database": "db", "user": "u", "state": "login",
              "pid": 123, "host": "pg", "port": 5432, "tls": True, "connect_time": 0.0,
              "request_time": 0.0, "client_id": 7}
    manage = Recorder(snapshot(clients=[client], servers=[server]))
    names, rows, _ = rows_of(run("SHOW CLIENTS", manage))
    row = dict(zip(names, rows[0], strict=True))
    assert row["id"] == "1000000007" and row["state"] == "active"
    assert (row["wait"], row["wait_us"]) == ("1", "2")
    assert (row["local_addr"], row["local_port"]) == ("127.0.0.1", "6432")
    assert row["link"] == f"s{1_000_000_004:x}" and row["ptr"] == f"c{1_000_000_007:x}"
    assert (row["hold_time_us"], row["wait_time_us"]) == ("9", "5")
    names, rows, _ = rows_of(run("SHOW SERVERS", manage))
    row = dict(zip(names, rows[0], strict=True))
    assert (row["state"], row["remote_pid"], row["tls"]) == ("new", "123", "TLS")
    assert row["link"] == f"c{1_000_000_007:x}"
    names, rows, _ = rows_of(run("SHOW SOCKETS", manage))
    assert [r[3] for r in rows] == ["cl_active", "sv_new"]


def test_databases_state_and_help() -> None:
    manage = Recorder(snapshot(paused=["*"], disabled=["gone"]))
    names, rows, _ = rows_of(run("SHOW DATABASES", manage))
    by_name = {r[0]: dict(zip(names, r, strict=True)) for r in rows}
    assert by_name["db"]["paused"] == "1" and by_name["db"]["host"] == "pg"
    assert by_name["gone"]["disabled"] == "1"
    assert {r[0]: r[1] for r in rows_of(run("SHOW STATE", manage))[1]}["paused"] == "yes"
    [(notice, body), (complete, tag)] = messages(run("show help", manage))
    assert notice == b"N" and b"Console usage" in body
    assert (complete, tag) == (b"C", b"SHOW\0")
