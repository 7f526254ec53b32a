"""The prepared-statement mapper of transaction mode: exact bytes per case, and a model test over
simulated servers (a fake PostgreSQL that keeps its statements and skips after errors)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcorral.errors import ClientProtocolError
from pgcorral.protocol.prepared import (
    CLOSE_COMPLETE,
    DROP,
    EMPTY_QUERY,
    PARSE_COMPLETE,
    PASS,
    ClientStatements,
    ReplyPlan,
    ServerStatements,
    StatementRegistry,
    parse_bind,
    parse_parse,
    parse_target,
    rewrite,
)


def msg(type_: bytes, body: bytes = b"") -> bytes:
    return type_ + struct.pack("!I", len(body) + 4) + body


def parse(name: bytes, query: bytes, oids: tuple[int, ...] = ()) -> bytes:
    types = struct.pack("!h", len(oids)) + b"".join(struct.pack("!I", o) for o in oids)
    return msg(b"P", name + b"\0" + query + b"\0" + types)


BIND_REST = b"\0\0\0\0\0\0"  # no formats, no parameters, no result formats


def bind(stmt: bytes, portal: bytes = b"") -> bytes:
    return msg(b"B", portal + b"\0" + stmt + b"\0" + BIND_REST)


def describe(kind: bytes, name: bytes) -> bytes:
    return msg(b"D", kind + name + b"\0")


def close(kind: bytes, name: bytes) -> bytes:
    return msg(b"C", kind + name + b"\0")


def query(sql: bytes) -> bytes:
    return msg(b"Q", sql + b"\0")


EXECUTE = msg(b"E", b"\0\0\0\0\0")
SYNC = msg(b"S")


class Side:
    """One client on one server connection: feeds messages, collects what each side gets."""

    def __init__(self, capacity: int = 10) -> None:
        self.registry = StatementRegistry()
        self.client = ClientStatements()
        self.server = ServerStatements(capacity)
        self.plan = ReplyPlan(self.server)
        self.to_client = b""

    def send(self, *messages: bytes) -> bytes:
        out = b""
        for m in messages:
            rw = rewrite(m[0], m[5:], self.client, self.server, self.registry)
            out += rw.send
            self.plan.extend(rw.slots)
            self.to_client += self.plan.fabricated_before_next()
        return out

    def reply(self, *messages: bytes) -> list[str]:
        verdicts = []
        for m in messages:
            verdict = self.plan.on_server_reply(m[0])
            verdicts.append(verdict)
            if verdict == PASS:
                self.to_client += m
            self.to_client += self.plan.fabricated_before_next()
        return verdicts


def test_named_parse_server_lacks_it_sends_parse_under_pooler_name() -> None:
    s = Side()
    assert s.send(parse(b"s1", b"SELECT 1")) == parse(b"pgc_1", b"SELECT 1")
    assert s.client.names == {b"s1": b"SELECT 1\0\0\0"}
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


def test_fabricated_replies_keep_request_order() -> None:
    s = Side()
    s.send(parse(b"a", b"SELECT 1"), SYNC)
    s.reply(PARSE_COMPLETE, msg(b"Z", b"I"))
    s.to_client = b""
    sent = s.send(bind(b"a"), EXECUTE, parse(b"b", b"SELECT 1"), close(b"S", b"a"),
                  bind(b"b"), EXECUTE, SYNC)
    assert sent == bind(b"pgc_1") + EXECUTE + bind(b"pgc_1") + EXECUTE + SYNC
    assert s.to_client == b""  # nothing answered yet: the fabricated replies must wait
    done = msg(b"C", b"SELECT 1\0")
    s.reply(msg(b"2"), msg(b"N", b"\0"), done)
    assert s.to_client == msg(b"2") + msg(b"N", b"\0") + done + PARSE_COMPLETE + CLOSE_COMPLETE
    s.reply(msg(b"2"), done, msg(b"Z", b"I"))
    assert s.plan.idle


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


def test_failed_discard_all_closes_the_statements_later() -> None:
    s = Side()
    s.send(parse(b"a", b"SELECT 1"), SYNC)
    s.reply(PARSE_COMPLETE, msg(b"Z", b"I"))
    s.send(query(b"DISCARD ALL"))
    s.reply(msg(b"E", b"\0"), msg(b"Z", b"T"))  # cannot run inside a transaction block
    assert s.server.names() == ["pgc_1"] and not s.server.pending_close
    assert b"a" in s.client  # as on its own connection: the statement is still there
    s.send(SYNC)
    assert s.send(bind(b"a")) == bind(b"pgc_1")  # still on the server: no re-Parse
    assert "pgc_1" in s.server


def test_error_skips_to_sync_and_forgets_skipped_parse() -> None:
    registry = StatementRegistry()
    a, b = Side(), Side()
    a.registry = b.registry = registry
    a.send(parse(b"ok", b"SELECT 1"))
    b.client = a.client
    sent = b.send(parse(b"bad", b"SELEC"), bind(b"ok"), EXECUTE, parse(b"x", b"SELECT 1"), SYNC)
    assert sent == (parse(b"pgc_2", b"SELEC") + parse(b"pgc_1", b"SELECT 1") + bind(b"pgc_1")
                    + EXECUTE + SYNC)
    err = msg(b"E", b"C42601\0\0")
    assert b.reply(err) == [PASS]
    assert len(b.server) == 0  # neither Parse happened
    assert b.reply(msg(b"Z", b"I")) == [PASS]
    assert b.to_client == err + msg(b"Z", b"I") and b.plan.idle
    b.send(bind(b"ok"))  # prepared again
    assert "pgc_1" in b.server


def test_failed_reparse_error_reaches_the_client() -> None:
    registry = StatementRegistry()
    a, b = Side(), Side()
    a.registry = b.registry = registry
    a.send(parse(b"s", b"SELECT * FROM dropped"))
    b.client = a.client
    b.send(bind(b"s"), EXECUTE, SYNC)
    err = msg(b"E", b"C42P01\0\0")
    assert b.reply(err, msg(b"Z", b"I")) == [PASS, PASS]
    assert b.to_client == err + msg(b"Z", b"I") and b.plan.idle and len(b.server) == 0


def test_syncs_ignored_during_copy_in_get_no_slot() -> None:
    s = Side()
    s.send(parse(b"", b"COPY t FROM STDIN"), bind(b""), EXECUTE, SYNC,
           msg(b"d", b"1\n"), msg(b"c"), SYNC)
    replies = [msg(b"1"), msg(b"2"), msg(b"G", b"\0\0\0"), msg(b"C", b"COPY 1\0"),
               msg(b"Z", b"I")]
    assert s.reply(*replies) == [PASS] * 5
    assert s.plan.idle
    # CopyInResponse before the client's CopyDone was sent
    s.send(query(b"COPY t FROM STDIN"))
    s.reply(msg(b"G", b"\0\0\0"))
    s.send(SYNC, msg(b"d", b"1\n"), msg(b"c"))
    s.reply(msg(b"C", b"COPY 1\0"), msg(b"Z", b"I"))
    assert s.plan.idle


@pytest.mark.parametrize("type_, body", [
    (b"P", b"name"), (b"P", b"n\0SELECT 1\0"), (b"P", b"n\0q\0\0\1"), (b"P", b"n\0q\0\xff\xff"),
    (b"P", b"n\0q\0\0\0x"), (b"B", b"portal"), (b"B", b"\0stmt"), (b"D", b""), (b"D", b"X\0"),
    (b"D", b"Sname"), (b"C", b"S\0\0"), (b"Q", b"DEALLOCATE a"),
])
def test_malformed_bodies_raise_client_protocol_error(type_: bytes, body: bytes) -> None:
    s = Side()
    s.client.names[b"n"] = b"q\0\0\0"
    with pytest.raises(ClientProtocolError) as info:
        rewrite(type_[0], body, s.client, s.server, s.registry)
    assert info.value.sqlstate == "08P01"


def test_body_helpers() -> None:
    assert parse_bind(b"p\0s\0rest") == (b"p", b"s", b"rest")
    assert parse_target(b"Sname\0") == (ord("S"), b"name")


# --- model test: several clients over simulated servers ---------------------------------------

def _split(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("!I", data, pos + 1)
        out.append((data[pos], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


class FakePostgres:
    """Named statements, error skipping until Sync, and the few replies the model needs."""

    def __init__(self) -> None:
        self.statements: dict[bytes, bytes] = {}
        self.skipping = False
        self.bound: list[bytes] = []  # identity of every successful Bind

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        for type_, body in _split(data):
            if self.skipping and type_ != ord("S"):
                continue
            out += self._one(chr(type_), body)
        return out

    def _error(self) -> list[bytes]:
        self.skipping = True
        return [msg(b"E", b"\0")]

    def _one(self, kind: str, body: bytes) -> list[bytes]:
        if kind == "P":
            name, identity = parse_parse(body)
            if name and name in self.statements:
                return self._error()  # 42P05 (the mapper causes it for a client's second Parse)
            if identity.startswith(b"BAD"):
                return self._error()  # a statement PostgreSQL refuses
            self.statements[name] = identity
            return [msg(b"1")]
        if kind == "B":
            _, stmt, _ = parse_bind(body)
            if stmt not in self.statements:
                return self._error()
            self.bound.append(self.statements[stmt])
            return [msg(b"2")]
        if kind == "E":
            return [msg(b"C", b"SELECT 1\0")]
        if kind == "C":
            self.statements.pop(parse_target(body, "Close")[1], None)
            return [msg(b"3")]
        if kind == "S":
            self.skipping = False
            return [msg(b"Z", b"I")]
        sql = body[:-1]
        if sql == b"":
            return [msg(b"I"), msg(b"Z", b"I")]
        if sql == b"DISCARD ALL":
            self.statements.clear()
            return [msg(b"C", b"DISCARD ALL\0"), msg(b"Z", b"I")]
        if sql == b"DEALLOCATE ALL":
            self.statements.clear()
            return [msg(b"C", b"DEALLOCATE ALL\0"), msg(b"Z", b"I")]
        name = sql.split()[-1]
        if name in self.statements:
            del self.statements[name]
            return [msg(b"C", b"DEALLOCATE\0"), msg(b"Z", b"I")]
        return [msg(b"E", b"\0"), msg(b"Z", b"I")]


QUERIES = [b"SELECT 1", b"SELECT 2", b"SELECT 3", b"SELECT 4"]
NAMES = [b"s1", b"s2", b"s3"]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_model_several_clients_over_simulated_servers(data: st.DataObject) -> None:
    registry = StatementRegistry()
    nservers = data.draw(st.integers(2, 3))
    capacity = data.draw(st.integers(1, 3))
    servers = [(FakePostgres(), ServerStatements(capacity)) for _ in range(nservers)]
    plans = [ReplyPlan(s) for _, s in servers]
    nclients = data.draw(st.integers(1, 3))
    clients = [ClientStatements() for _ in range(nclients)]
    models: list[dict[bytes, bytes]] = [{} for _ in range(nclients)]

    for _ in range(data.draw(st.integers(1, 12))):
        c = data.draw(st.integers(0, nclients - 1))
        k = data.draw(st.integers(0, nservers - 1))
        fake, server = servers[k]
        plan, model, client = plans[k], models[c], clients[c]
        server.at_sync = True  # linked
        requests: list[bytes] = []
        expected: list[int] = []
        expected_binds: list[bytes] = []
        if data.draw(st.integers(0, 5)) == 0:
            sql = data.draw(st.sampled_from(
                [b"DEALLOCATE ALL", b"DISCARD ALL"] + [b"DEALLOCATE " + n for n in NAMES]))
            name = sql.split()[-1]
            if name in (b"ALL",):
                model.clear()
            elif name not in model:
                expected.append(ord("E"))
            else:
                del model[name]
            requests.append(query(sql))
            expected += [ord("C")] * (not expected) + [ord("Z")]
        else:
            failed = False  # after an error every server skips to the Sync: no effect
            for _ in range(data.draw(st.integers(1, 5))):
                op = data.draw(st.sampled_from(["prepare", "bind", "close"]))
                name = data.draw(st.sampled_from(NAMES))
                if op == "prepare":
                    q = data.draw(st.sampled_from([*QUERIES, b"BAD"]))
                    requests.append(parse(name, q))
                    if failed:
                        continue
                    if name in model or q == b"BAD":  # 42P05, or refused: nothing changes
                        expected.append(ord("E"))
                        failed = True
                        continue
                    model[name] = q + b"\0\0\0"
                    expected.append(ord("1"))
                elif op == "bind":
                    requests += [bind(name), EXECUTE]
                    if failed:
                        continue
                    if name not in model:
                        expected.append(ord("E"))
                        failed = True
                        continue
                    expected += [ord("2"), ord("C")]
                    expected_binds.append(model[name])
                elif op == "close":
                    requests.append(close(b"S", name))
                    if failed:
                        continue
                    model.pop(name, None)
                    expected.append(ord("3"))
            requests.append(SYNC)
            expected.append(ord("Z"))

        seen = b""
        pending: list[bytes] = []
        fake.bound.clear()
        for m in requests:
            rw = rewrite(m[0], m[5:], client, server, registry)
            plan.extend(rw.slots)
            seen += plan.fabricated_before_next()
            pending += fake.feed(rw.send)
            take = data.draw(st.integers(0, len(pending)))  # replies arrive whenever
            for reply in pending[:take]:
                if plan.on_server_reply(reply[0]) == PASS:
                    seen += reply
                seen += plan.fabricated_before_next()
            del pending[:take]
        for reply in pending:
            if plan.on_server_reply(reply[0]) == PASS:
                seen += reply
            seen += plan.fabricated_before_next()

        assert [t for t, _ in _split(seen)] == expected
        assert fake.bound == expected_binds
        assert plan.idle
        assert client.names == model
        # the mapper's view of each server is exact
        for other_fake, other in servers:
            on_server = set(other_fake.statements) - {b""}
            tracked = {n.encode() for n in [*other.names(), *other.pending_close]}
            assert tracked == on_server  # nothing missing, nothing leaked
            assert len(other) <= capacity


def test_bind_fast_renames_only_a_statement_the_server_has() -> None:
    from pgcorral.protocol.prepared import bind_fast

    side = Side()
    side.send(parse(b"a", b"SELECT 1"), SYNC)
    side.plan.on_server_reply(ord("1"))
    side.plan.on_server_reply(ord("Z"))
    body = bind(b"a", b"portal")[5:]
    renamed = bind_fast(body, side.client, side.server, side.registry)
    assert renamed is not None and renamed == bind(b"pgc_1", b"portal")
    assert bind_fast(bind(b"")[5:], side.client, side.server, side.registry) is None
    assert bind_fast(bind(b"nope")[5:], side.client, side.server, side.registry) is None
    side.server.discard("pgc_1")  # not on this server: rewrite() must re-Parse it
    assert bind_fast(body, side.client, side.server, side.registry) is None
    assert bind_fast(b"\0", side.client, side.server, side.registry) is None  # malformed


def test_parse_and_close_answered_locally() -> None:
    from pgcorral.protocol.prepared import close_locally, is_discard_all, parse_locally

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
