"""The session-state pre-check and the probe's reading (protocol/sessionsql.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcorral.protocol.sessionsql import (
    PIN_AUTHORIZATION,
    PIN_CURSOR,
    PIN_LISTEN,
    PIN_LOCK,
    PIN_PREPARE,
    PIN_TEMP,
    may_touch_state,
    pins,
    probe_result,
    single_prepare,
    vpid_refusal,
)

STATEFUL = [
    "SET work_mem = '8MB'", "set search_path to x", "SET SESSION statement_timeout = 5",
    "RESET ALL", "reset work_mem", "PREPARE p AS SELECT 1", "DEALLOCATE p",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "CLOSE c", "DISCARD TEMP", "DISCARD ALL",
    "LISTEN ch", "UNLISTEN *", "CREATE TEMP TABLE t (x int)",
    "CREATE TEMPORARY TABLE t AS SELECT 1", "create local temp view v as select 1",
    "DROP TABLE t", "SELECT pg_advisory_lock(1)", "select PG_ADVISORY_UNLOCK_ALL()",
    "SELECT pg_try_advisory_lock(1, 2)", "SELECT set_config('a.b', 'c', false)",
    "  /* a comment */ SET x.y = 1", "-- line comment\nSET x.y = 1", "\n\tSET x.y = 1",
    "SET\nwork_mem = 1", "set;",
]

STATELESS = [
    "SELECT 1", "select abalance from pgbench_accounts where aid = 1;",
    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1;",
    "INSERT INTO settings VALUES ('x')", "BEGIN", "COMMIT", "END;",
    "SELECT * FROM reset_log", "SELECT setting FROM pg_settings", "SELECT 'close'",
    "WITH x AS (SELECT 1) SELECT * FROM x", "DELETE FROM t WHERE id = 1",
    "CREATE TABLE permanent (x int)", "COPY t FROM STDIN", "SELECT listener FROM t",
    "", "  ",
]


@pytest.mark.parametrize("sql", STATEFUL)
def test_statements_that_touch_session_state_are_seen(sql: str) -> None:
    assert may_touch_state(sql.encode() + b"\0")
    assert may_touch_state(sql.encode())


@pytest.mark.parametrize("sql", STATELESS)
def test_common_statements_are_not(sql: str) -> None:
    assert not may_touch_state(sql.encode() + b"\0")


@given(st.sampled_from(STATELESS), st.sampled_from(STATEFUL),
       st.text(alphabet=" \t\n", max_size=3))
def test_a_stateful_statement_after_others_is_seen(before: str, stateful: str,
                                                   blank: str) -> None:
    assert may_touch_state(f"{before};{blank}{stateful}".encode())


@given(st.lists(st.sampled_from(STATELESS), max_size=4))
def test_stateless_batches_stay_unseen(statements: list[str]) -> None:
    assert not may_touch_state(";".join(statements).encode())


def row(locks: int = 0, temps: int = 0, cursors: int = 0, channels: int = 0,
        settings: bytes | None = None, prepared: bytes | None = None,
        role: bytes = b"none", user: bytes = b"app") -> list[bytes | None]:
    return [str(locks).encode(), str(temps).encode(), str(cursors).encode(),
            str(channels).encode(), settings, prepared, role, user]


def test_probe_result_and_pins() -> None:
    state = probe_result(row(settings=b'{"Work_Mem": "8MB"}',
                             prepared=b'{"p": "PREPARE p AS SELECT 1"}'))
    assert state.settings == {"work_mem": "8MB"}
    assert state.prepared == {"p": "PREPARE p AS SELECT 1"}
    assert pins(state, "app") == []
    assert pins(probe_result(row(locks=2, temps=1, cursors=1, channels=3)), "app") == [
        PIN_LOCK, PIN_TEMP, PIN_CURSOR, PIN_LISTEN]
    assert pins(probe_result(row(user=b"other")), "app") == [PIN_AUTHORIZATION]
    multi = probe_result(row(prepared=b'{"a": "PREPARE a AS SELECT 1; SELECT 2"}'))
    assert pins(multi, "app") == [PIN_PREPARE]


def test_single_prepare() -> None:
    assert single_prepare("PREPARE a AS SELECT 1;")
    assert single_prepare("  prepare a (int) AS SELECT $1\n;")
    assert not single_prepare("PREPARE a AS SELECT 1; PREPARE b AS SELECT 2")
    assert not single_prepare("SELECT 1; PREPARE a AS SELECT 1")


def test_vpid_refusal() -> None:
    from pgcorral.net.cancels import VIRTUAL_PID_BASE
    from pgcorral.protocol.sessionsql import _VIRTUAL_PID_BASE
    assert VIRTUAL_PID_BASE == _VIRTUAL_PID_BASE
    refused = vpid_refusal(b"SELECT pg_cancel_backend(4194305)\0")
    assert refused.startswith(b"Q") and b"0A000" in refused and b"4194305" in refused
    assert vpid_refusal(b"select PG_TERMINATE_BACKEND ( 4194999 , 100)\0")
    assert vpid_refusal(b"SELECT 1; SELECT pg_terminate_backend((4194305))\0")
    assert vpid_refusal(b"SELECT pg_cancel_backend(12345)\0") == b""  # a real pid: PostgreSQL's
    assert vpid_refusal(b"SELECT pg_cancel_backend(pid) FROM pg_stat_activity\0") == b""
    assert may_touch_state(b"SELECT pg_cancel_backend(4194305)")


@pytest.mark.parametrize("capacity", [0, 10])  # mapping off and on
def test_the_forwarder_flags_requests_that_may_touch_state(capacity: int) -> None:
    """Queries and Parses whose text hits, and the Binds of named statements whose text hit
    (a prepared lock statement bound again), set SESSION_STATE; other requests do not, on the
    fast paths as on the general one."""
    from tests.unit.txhelpers import EXECUTE, SYNC, bind, parse, query

    from pgcorral.protocol import codes
    from pgcorral.protocol.replyplan import ReplyPlan
    from pgcorral.protocol.statements import ClientStatements, ServerStatements, StatementRegistry
    from pgcorral.protocol.txforward import SESSION_STATE, ClientForwarder

    registry = StatementRegistry()
    forwarder = ClientForwarder(ClientStatements(), registry)
    plan = ReplyPlan(ServerStatements(capacity), registry.known)
    forwarder.link()

    def seen(*messages: bytes) -> int:
        _, rest, flags = forwarder.feed(b"".join(messages), plan, codes.TX_IDLE)
        assert rest == b""
        return flags & SESSION_STATE

    assert not seen(query(b"SELECT 1"))
    assert seen(query(b"SET work_mem = '8MB'"))
    assert seen(query(b"SELECT 1"), query(b"SELECT pg_advisory_lock(1)"))
    assert not seen(parse(b"", b"SELECT $1::int"), bind(b""), EXECUTE, SYNC)
    assert seen(parse(b"", b"SELECT pg_advisory_lock($1)"), bind(b""), EXECUTE, SYNC)
    assert seen(parse(b"lock", b"SELECT pg_advisory_lock($1)"), bind(b"lock"), EXECUTE, SYNC)
    assert not seen(parse(b"plain", b"SELECT 2"), bind(b"plain"), EXECUTE, SYNC)
    assert seen(bind(b"lock"), EXECUTE, SYNC)  # bound again, no Parse: still seen
    assert not seen(bind(b"plain"), EXECUTE, SYNC)


def test_fatal_ending_at() -> None:
    """PostgreSQL's goodbye (a FATAL or PANIC ErrorResponse last) is told from an ERROR."""
    from pgcorral.protocol.messages import error_response, fatal_ending_at, ready_for_query
    fatal = error_response("57P01", "terminating connection", severity="FATAL")
    error = error_response("42P01", "no such table", severity="ERROR")
    panic = error_response("XX000", "bad", severity="PANIC")
    rows = b"D\0\0\0\x0b\0\x01\0\0\0\x01x"
    for data, expected in ((fatal, True), (rows + fatal, True), (panic, True),
                           (error, False), (rows + error, False)):
        assert fatal_ending_at(data, len(data)) is expected
    data = fatal + ready_for_query(b"I")
    assert not fatal_ending_at(data, len(data))
