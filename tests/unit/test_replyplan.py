"""The reply plan of transaction mode (protocol/replyplan.py): what reaches the client, in what
order, after errors and during COPY; and a model test of the client side (forwarder, mapper and
plan together) over simulated servers (a fake PostgreSQL that keeps its statements and skips
after errors)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.txhelpers import (
    EXECUTE,
    SYNC,
    FakePostgres,
    Side,
    bind,
    close,
    msg,
    parse,
    query,
    split,
)

from pgcorral.protocol import codes
from pgcorral.protocol.replyplan import PASS, ReplyPlan
from pgcorral.protocol.rewrite import CLOSE_COMPLETE, PARSE_COMPLETE
from pgcorral.protocol.statements import ClientStatements, ServerStatements, StatementRegistry
from pgcorral.protocol.txforward import DEALLOCATE_ALL, DISCARD_ALL, SESSION_STATE, ClientForwarder


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


def test_syncs_ignored_during_copy_in_get_no_step() -> None:
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


# --- model test: several clients over simulated servers ---------------------------------------

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
    forwarders = [ClientForwarder(client, registry) for client in clients]
    models: list[dict[bytes, bytes]] = [{} for _ in range(nclients)]

    for _ in range(data.draw(st.integers(1, 12))):
        c = data.draw(st.integers(0, nclients - 1))
        k = data.draw(st.integers(0, nservers - 1))
        fake, _ = servers[k]
        plan, model, client = plans[k], models[c], clients[c]
        forwarder = forwarders[c]
        forwarder.link()
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
            send, rest, flags = forwarder.feed(m, plan, codes.TX_IDLE)
            assert rest == b"" and flags & ~(DISCARD_ALL | SESSION_STATE | DEALLOCATE_ALL) == 0
            seen += plan.fabricated_before_next()
            pending += fake.feed(send)
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

        assert [t for t, _ in split(seen)] == expected
        assert fake.bound == expected_binds
        assert plan.idle
        assert client.names == model
        # the mapper's view of each server is exact
        for other_fake, other in servers:
            on_server = set(other_fake.statements) - {b""}
            tracked = {n.encode() for n in [*other.names(), *other.pending_close]}
            assert tracked == on_server  # nothing missing, nothing leaked
            assert len(other) <= capacity
