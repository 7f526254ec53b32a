"""The statement mapper of transaction mode (protocol/rewrite.py): exact bytes per case."""

from __future__ import annotations

import struct

import pytest
from tests.unit.txhelpers import EXECUTE, SYNC, Side, bind, close, describe, msg, parse, query

from pgcorral.errors import ClientProtocolError
from pgcorral.protocol.replyplan import DROP, PASS
from pgcorral.protocol.rewrite import (
    CLOSE_COMPLETE,
    EMPTY_QUERY,
    PARSE_COMPLETE,
    bind_fast,
    close_locally,
    is_discard_all,
    parse_bind,
    parse_locally,
    parse_parse,
    parse_target,
    rewrite,
)
from pgcorral.protocol.statements import ClientStatements, StatementRegistry


def test_named_parse_server_lacks_it_sends_parse_under_pooler_name() -> None:
    s = Side()
    assert s.send(parse(b"s1", b"SELECT 1")) == parse(b"pgc_1", b"SELECT 1")
    assert s.client.identities() == {b"s1": b"SELECT 1\0\0\0"}
    assert "pgc_1" in s.server
    assert s.reply(PARSE_COMPLETE) == [PASS]
    assert s.to_client == PARSE_COMPLETE and s.plan.idle


def test_named_parse_server_has_it_fabricates_parse_complete() -> None:
    s = Side()
    s.send(parse(b"a", b"SELECT 1"))
    s.reply(PARSE_COMPLETE)
    s.to_client = b""
    assert s.send(parse(b"b", b"SELECT 1")) == b""
    assert s.to_client == PARSE_COMPLETE and s.plan.idle


def test_unnamed_parse_and_unknown_names_pass_unchanged() -> None:
    s = Side()
    for m in (parse(b"", b"SELECT 1", (23,)), bind(b"nope"), bind(b""), describe(b"S", b"nope"),
              describe(b"P", b""), close(b"S", b"nope"), close(b"P", b"p1"), EXECUTE, SYNC,
              query(b"SELECT 1"), query(b"DEALLOCATE nope")):
        assert s.send(m) == m
    assert len(s.registry) == 0


def test_identity_is_query_and_types() -> None:
    s = Side()
    s.send(parse(b"a", b"SELECT $1", (23,)), parse(b"b", b"SELECT $1", (25,)),
           parse(b"c", b"SELECT $1", (23,)))
    assert s.server.names() == ["pgc_2", "pgc_1"]  # c touched pgc_1 last
    assert parse_parse(parse(b"a", b"Q", (23, 25))[5:]) == (
        b"a", b"Q\0" + struct.pack("!hII", 2, 23, 25))


def test_bind_and_describe_rewrite_the_name() -> None:
    s = Side()
    s.send(parse(b"s1", b"SELECT 1"))
    assert s.send(bind(b"s1", b"portal")) == bind(b"pgc_1", b"portal")
    assert s.send(describe(b"S", b"s1")) == describe(b"S", b"pgc_1")
    assert s.send(describe(b"P", b"portal")) == describe(b"P", b"portal")


def test_bind_on_server_without_statement_reparses_and_drops_parse_complete() -> None:
    registry = StatementRegistry()
    a, b = Side(), Side()
    b.registry = a.registry = registry
    a.send(parse(b"s1", b"SELECT 1"))
    b.client = a.client  # the same client, linked to another server connection
    sent = b.send(bind(b"s1"), EXECUTE, SYNC)
    assert sent == parse(b"pgc_1", b"SELECT 1") + bind(b"pgc_1") + EXECUTE + SYNC
    replies = [PARSE_COMPLETE, msg(b"2"), msg(b"C", b"SELECT 1\0"), msg(b"Z", b"I")]
    assert b.reply(*replies) == [DROP, PASS, PASS, PASS]
    assert b.to_client == b"".join(replies[1:]) and b.plan.idle
    # described on yet another server: Parse first as well
    c = Side()
    c.registry, c.client = registry, a.client
    assert c.send(describe(b"S", b"s1")) == parse(b"pgc_1", b"SELECT 1") + describe(b"S",
                                                                                   b"pgc_1")
    assert c.reply(PARSE_COMPLETE, msg(b"t", b"\0\0"), msg(b"n")) == [DROP, PASS, PASS]


def test_same_query_from_two_clients_on_two_servers_shares_one_name() -> None:
    registry = StatementRegistry()
    one, two = Side(), Side()
    one.registry = two.registry = registry
    assert one.send(parse(b"S_1", b"SELECT now()")) == parse(b"pgc_1", b"SELECT now()")
    assert two.send(parse(b"_pg3_0", b"SELECT now()")) == parse(b"pgc_1", b"SELECT now()")
    assert len(registry) == 1


def test_close_statement_is_answered_locally() -> None:
    s = Side()
    s.send(parse(b"s1", b"SELECT 1"))
    s.reply(PARSE_COMPLETE)
    assert s.send(close(b"S", b"s1")) == b""
    assert s.to_client == PARSE_COMPLETE + CLOSE_COMPLETE
    assert s.client.names == {} and "pgc_1" in s.server  # kept for other clients
    assert s.send(bind(b"s1")) == bind(b"s1")  # now unknown: the server answers 26000


def test_lru_eviction_closes_at_next_batch_start_and_drops_close_complete() -> None:
    s = Side(capacity=1)
    s.send(parse(b"a", b"SELECT 1"))
    assert s.send(parse(b"b", b"SELECT 2")) == parse(b"pgc_2", b"SELECT 2")
    assert s.server.names() == ["pgc_2"] and list(s.server.pending_close) == ["pgc_1"]
    assert s.send(EXECUTE) == EXECUTE  # not at a batch start: the Close waits
    s.send(SYNC)
    assert s.send(bind(b"b")) == close(b"S", b"pgc_1") + bind(b"pgc_2")
    assert not s.server.pending_close
    s.reply(PARSE_COMPLETE, PARSE_COMPLETE, msg(b"C", b"SELECT 1\0"), msg(b"Z", b"I"))
    s.to_client = b""
    assert s.reply(CLOSE_COMPLETE, msg(b"2")) == [DROP, PASS]
    assert s.to_client == msg(b"2") and s.plan.idle


def test_evicted_statement_reused_before_its_close_is_not_parsed_again() -> None:
    s = Side(capacity=1)
    s.send(parse(b"a", b"SELECT 1"), parse(b"b", b"SELECT 2"))
    assert s.send(bind(b"a")) == bind(b"pgc_1")  # still on the server
    assert s.server.names() == ["pgc_1"] and list(s.server.pending_close) == ["pgc_2"]


def test_capacity_zero_turns_mapping_off() -> None:
    s = Side(capacity=0)
    for m in (parse(b"a", b"SELECT 1"), bind(b"a"), describe(b"S", b"a"), close(b"S", b"a"),
              query(b"DEALLOCATE a"), query(b"DISCARD ALL"), SYNC):
        assert s.send(m) == m
    assert not s.client.names and len(s.registry) == 0


@pytest.mark.parametrize("sql, tag", [
    (b"DEALLOCATE a", b"DEALLOCATE"), (b"  deallocate prepare A ;  ", b"DEALLOCATE"),
    (b'DEALLOCATE "a"', b"DEALLOCATE"), (b"DEALLOCATE ALL", b"DEALLOCATE ALL"),
    (b"Deallocate Prepare all;", b"DEALLOCATE ALL"),
])
def test_deallocate_is_answered_with_an_empty_query(sql: bytes, tag: bytes) -> None:
    s = Side()
    s.send(parse(b"a", b"SELECT 1"), parse(b"b", b"SELECT 2"), SYNC)
    s.reply(PARSE_COMPLETE, PARSE_COMPLETE, msg(b"Z", b"I"))
    s.to_client = b""
    assert s.send(query(sql)) == EMPTY_QUERY == b"Q\0\0\0\x05\0"
    assert s.reply(msg(b"I"), msg(b"Z", b"T")) == [DROP, PASS]
    assert s.to_client == msg(b"C", tag + b"\0") + msg(b"Z", b"T")
    assert list(s.client.names) == ([] if tag.endswith(b"ALL") else [b"b"])
    assert s.server.names() == ["pgc_1", "pgc_2"]  # shared statements stay


def test_deallocate_of_quoted_name_is_case_sensitive() -> None:
    s = Side()
    s.send(parse(b"A", b"SELECT 1"))
    assert s.send(query(b"DEALLOCATE A")) == query(b"DEALLOCATE A")  # folds to "a"
    assert s.send(query(b'DEALLOCATE "A"')) == EMPTY_QUERY


def test_discard_all_forgets_client_and_server_statements() -> None:
    s = Side(capacity=1)
    s.send(parse(b"a", b"SELECT 1"), parse(b"b", b"SELECT 2"), SYNC)
    s.reply(PARSE_COMPLETE, PARSE_COMPLETE, msg(b"Z", b"I"))
    assert s.send(query(b"discard all;")) == close(b"S", b"pgc_1") + query(b"discard all;")
    assert not s.client.names and len(s.server) == 0 and not s.server.pending_close
    s.reply(CLOSE_COMPLETE, msg(b"C", b"DISCARD ALL\0"), msg(b"Z", b"I"))
    assert s.plan.idle and len(s.server) == 0


@pytest.mark.parametrize("type_, body", [
    (b"P", b"name"), (b"P", b"n\0SELECT 1\0"), (b"P", b"n\0q\0\0\1"), (b"P", b"n\0q\0\xff\xff"),
    (b"P", b"n\0q\0\0\0x"), (b"B", b"portal"), (b"B", b"\0stmt"), (b"D", b""), (b"D", b"X\0"),
    (b"D", b"Sname"), (b"C", b"S\0\0"), (b"Q", b"DEALLOCATE a"),
])
def test_malformed_bodies_raise_client_protocol_error(type_: bytes, body: bytes) -> None:
    s = Side()
    s.client.names[b"n"] = ("pgc_9", b"q\0\0\0")
    with pytest.raises(ClientProtocolError) as info:
        rewrite(type_[0], body, s.client, s.server, s.registry, at_sync=True, tx_failed=False)
    assert info.value.sqlstate == "08P01"


def test_in_an_aborted_transaction_parse_and_deallocate_go_to_postgresql() -> None:
    s = Side()
    s.send(parse(b"a", b"SELECT 1"), SYNC)
    s.tx_failed = True
    assert s.send(parse(b"b", b"SELECT 1")) == parse(b"pgc_1", b"SELECT 1")  # 25P02 there
    for sql in (b"DEALLOCATE a", b"DEALLOCATE ALL", b"DISCARD ALL"):
        assert s.send(query(sql)) == query(sql)
    assert set(s.client.names) == {b"a", b"b"}  # until PostgreSQL refuses the Parse


def test_evicted_names_are_closed_only_at_a_batch_start() -> None:
    s = Side(capacity=1)
    s.send(parse(b"a", b"SELECT 1"), parse(b"b", b"SELECT 2"))
    assert s.server.pending_close
    s.at_sync = False
    assert s.send(EXECUTE) == EXECUTE
    s.at_sync = True  # as when linked
    assert s.send(EXECUTE) == close(b"S", b"pgc_1") + EXECUTE


def test_body_helpers() -> None:
    assert parse_bind(b"p\0s\0rest") == (b"p", b"s", b"rest")
    assert parse_target(b"Sname\0") == (ord("S"), b"name")


def _bind_fast(side: Side, message: bytes, before: bytes = b"Q\0\0\0\x05\0",
               after: bytes = b"S\0\0\0\x04") -> bytes | None:
    """``bind_fast`` of ``message`` read in place inside a chunk, between other messages."""
    data = before + message + after
    pos, end = len(before), len(before) + len(message)
    name_at = data.index(b"\0", pos + 5) + 1
    return bind_fast(data, pos, name_at, end, side.client, side.server, side.registry)


def test_bind_fast_renames_only_a_statement_the_server_has() -> None:
    side = Side()
    side.send(parse(b"a", b"SELECT 1"), SYNC)
    side.plan.on_server_reply(ord("1"))
    side.plan.on_server_reply(ord("Z"))
    message = bind(b"a", b"portal")
    assert _bind_fast(side, message) == bind(b"pgc_1", b"portal")
    assert _bind_fast(side, message, b"", b"") == bind(b"pgc_1", b"portal")
    assert _bind_fast(side, bind(b"nope")) is None
    side.server.discard("pgc_1")  # not on this server: rewrite() must re-Parse it
    assert _bind_fast(side, message) is None
    assert _bind_fast(side, msg(b"B", b"\0a"), b"", b"") is None  # malformed: no end of name


def test_parse_and_close_answered_locally() -> None:
    registry = StatementRegistry()
    client = ClientStatements()
    assert not parse_locally(parse(b"a", b"SELECT 1")[5:], client, registry)  # never seen
    registry.known.add(registry.name_for(parse(b"x", b"SELECT 1")[5:][2:]))
    assert parse_locally(parse(b"a", b"SELECT 1")[5:], client, registry)
    assert b"a" in client
    assert not parse_locally(parse(b"", b"SELECT 1")[5:], client, registry)  # unnamed
    assert not close_locally(close(b"P", b"a")[5:], client)  # a portal needs the server
    assert not close_locally(close(b"S", b"b")[5:], client)  # not ours
    assert close_locally(close(b"S", b"a")[5:], client)
    assert b"a" not in client
    assert is_discard_all(b"  discard ALL ;\0") and not is_discard_all(b"DISCARD PLANS\0")
