"""Statements and schema changes in the transaction pipeline (issue 14, part 3), without a
server: the reply router's DDL tag check and schema epoch (protocol/txrelay.py), new Parses
after a change (protocol/rewrite.py, protocol/statements.py), and the error-driven repair of
stale statements (protocol/repair.py) driven as ``net.txserver`` drives it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.unit.txhelpers import (
    EXECUTE,
    SYNC,
    bind,
    describe,
    msg,
    parse,
    query,
    ready,
    split,
)

from pgcorral.protocol.repair import repair, stale_error
from pgcorral.protocol.replyplan import CAPTURE_ON, CAPTURE_SUSPENDED, ReplyPlan
from pgcorral.protocol.rewrite import parse_locally
from pgcorral.protocol.statements import ClientStatements, ServerStatements, StatementRegistry
from pgcorral.protocol.txforward import ClientForwarder
from pgcorral.protocol.txrelay import ReplyRouter, is_ddl_tag

PARSE_OK = msg(b"1")
BIND_OK = msg(b"2")
CLOSE_OK = msg(b"3")
ROW_DESC = msg(b"T", b"\0\x01x\0" + b"\0" * 6 + b"\0\x19\xff\xff\xff\xff\xff\xff\0\0")
ROW = msg(b"D", b"\0\x01\0\0\0\x01a")
SELECT_1 = msg(b"C", b"SELECT 1\0")
STALE = msg(b"E", b"SERROR\0C0A000\0Mcached plan must not change result type\0\0")
LOOKUP = msg(b"E", b"SERROR\0CXX000\0Mcache lookup failed for type 16412\0\0")
OTHER_XX = msg(b"E", b"SERROR\0CXX000\0Msomething else\0\0")
Q = b"SELECT * FROM t\0\0\0"  # the identity of parse(b"a", b"SELECT * FROM t")


def tag(text: bytes) -> bytes:
    return msg(b"C", text + b"\0")


@pytest.mark.parametrize(("text", "ddl"), [
    (b"CREATE TABLE", True), (b"ALTER TABLE", True), (b"DROP TYPE", True), (b"DO", True),
    (b"CREATE INDEX", True), (b"ALTER DOMAIN", True), (b"SELECT 1", False),
    (b"COMMIT", False), (b"COPY 3", False), (b"DELETE 1", False), (b"INSERT 0 1", False),
    (b"BEGIN", False), (b"DISCARD ALL", False), (b"D", False), (b"", False),
])
def test_ddl_tags(text: bytes, ddl: bool) -> None:
    assert is_ddl_tag(text + b"\0") is ddl


class Link:
    """One client on one server connection, with the worker's registry, wired as
    ``net.txserver`` wires it: requests go through the forwarder and are kept in the plan
    (``write``), replies through the router, whose ``on_bind_error`` runs the repair."""

    def __init__(self, registry: StatementRegistry | None = None, capacity: int = 10) -> None:
        self.registry = registry if registry is not None else StatementRegistry()
        self.client = ClientStatements()
        self.server = ServerStatements(capacity)
        self.plan = ReplyPlan(self.server, self.registry.known)
        self.router = ReplyRouter(self.plan, registry=self.registry)
        self.router.on_bind_error = self._bind_failed
        self.forwarder = ClientForwarder(self.client, self.registry)
        self.forwarder.link()
        self.retries: list[bytes] = []

    def send(self, *messages: bytes) -> bytes:
        out, rest, _ = self.forwarder.feed(b"".join(messages), self.plan, self.router.status)
        assert rest == b""
        if out:
            self.write(out)
        return out

    def write(self, data: bytes) -> None:
        plan = self.plan
        if plan.capture == CAPTURE_ON:
            if not plan.sent:
                plan.sent_from = self.router.readies
            plan.sent.append(data)

    def _bind_failed(self, body: bytes) -> bool:
        retry = repair(self.plan, self.registry, self.client, body, self.router.status,
                       self.router.readies - self.plan.sent_from)
        if retry is not None:
            self.retries.append(retry)
        return retry is not None

    def feed(self, data: bytes) -> bytes:
        out, _ = self.router.feed(data, self.forwarder.at_rest)
        if not self.plan.steps:
            self.plan.idle_again()
        return out

    def prepared(self, name: bytes = b"a", sql: bytes = b"SELECT * FROM t") -> str:
        """``name`` parsed, and prepared on this server connection: its pooler name."""
        self.send(parse(name, sql), SYNC)
        assert self.feed(PARSE_OK + ready(b"I")) == PARSE_OK + ready(b"I")
        return self.client.names[name][0]


# ------------------------------------------------------------------------ the epoch

def test_the_router_bumps_the_epoch_on_ddl_tags_and_again_when_the_transaction_ends() -> None:
    link = Link()
    registry = link.registry
    link.send(query(b"BEGIN"))
    link.feed(tag(b"BEGIN") + ready(b"T"))
    assert registry.epoch == 0
    link.send(query(b"ALTER TABLE t ADD COLUMN y int"))
    link.feed(tag(b"ALTER TABLE") + ready(b"T"))
    assert registry.epoch == 1  # for the transaction's own new Parses
    link.send(query(b"SELECT 1"), query(b"COMMIT"))
    link.feed(tag(b"SELECT 1") + ready(b"T") + tag(b"COMMIT") + ready(b"I"))
    assert registry.epoch == 2  # committed: others see it now
    link.send(query(b"DELETE FROM t"))
    link.feed(tag(b"DELETE 3") + ready(b"I"))
    assert registry.epoch == 2


@given(st.lists(st.integers(1, 40), max_size=6))
def test_the_epoch_is_bumped_whatever_the_chunking(cuts: list[int]) -> None:
    """Extended protocol (CommandComplete ends an Execute step), a simple query (it passes
    quietly) and a split message: each DDL tag bumps once, each Ready 'I' after one once."""
    link = Link()
    link.send(parse(b"", b"DROP TABLE t"), bind(b""), EXECUTE, SYNC, query(b"DO $$ $$"),
              query(b"SELECT 1"))
    stream = (PARSE_OK + BIND_OK + tag(b"DROP TABLE") + ready(b"I") + tag(b"DO") + ready(b"I")
              + msg(b"T", b"\0\0") + ROW + tag(b"SELECT 1") + ready(b"I"))
    start = 0
    for end in [*sorted({c for c in cuts if c < len(stream)}), len(stream)]:
        link.feed(stream[start:end])
        start = end
    assert link.registry.epoch == 4


def test_a_new_parse_after_ddl_is_prepared_anew_and_old_names_keep_theirs() -> None:
    link = Link()
    first = link.prepared(b"a")
    assert parse_locally(parse(b"other", b"SELECT * FROM t")[5:], ClientStatements(),
                         link.registry)
    link.send(query(b"DROP TABLE t"))
    link.feed(tag(b"DROP TABLE") + ready(b"I"))
    assert not parse_locally(parse(b"other", b"SELECT * FROM t")[5:], ClientStatements(),
                             link.registry)  # needs a server now
    sent = link.send(parse(b"b", b"SELECT * FROM t"), SYNC)
    second = link.client.names[b"b"][0]
    assert second != first and sent.startswith(b"P") and second.encode() in sent
    link.feed(PARSE_OK + ready(b"I"))
    # ``a`` still reaches the statement prepared before (PostgreSQL says what it thinks)
    assert first.encode() in link.send(bind(b"a"), EXECUTE, SYNC)


# ----------------------------------------------------------------------------- repair

def test_stale_errors() -> None:
    assert stale_error(STALE[5:]) == "0A000"
    assert stale_error(LOOKUP[5:]) == "XX000"
    assert stale_error(OTHER_XX[5:]) == ""
    assert stale_error(msg(b"E", b"SERROR\0C42P01\0Mrelation \"t\" does not exist\0\0")[5:])
    assert stale_error(msg(b"E", b"SERROR\0C22012\0Mdivision by zero\0\0")[5:]) == ""


def test_outside_a_transaction_a_stale_statement_is_prepared_anew_and_retried() -> None:
    """libpq's PQexecPrepared (Bind, Describe portal, Execute, Sync): the client gets the
    rows, never the error; the old statement is closed there."""
    link = Link()
    old = link.prepared()
    link.send(bind(b"a"), describe(b"P", b""), EXECUTE, SYNC)
    assert link.feed(STALE + ready(b"I")) == b""  # held back: a retry went out
    (retry,) = link.retries
    new = link.client.names[b"a"][0]
    assert new != old and link.registry.names[Q] == new
    assert retry == (msg(b"C", b"S" + old.encode() + b"\0")
                     + msg(b"P", new.encode() + b"\0" + Q)
                     + msg(b"B", b"\0" + new.encode() + b"\0" + b"\0\0\0\0\0\0")
                     + describe(b"P", b"") + EXECUTE + SYNC)
    replies = BIND_OK + ROW_DESC + ROW + SELECT_1 + ready(b"I")
    assert link.feed(CLOSE_OK + PARSE_OK + replies) == replies
    assert link.plan.idle and new in link.server and old not in link.server
    assert new in link.registry.known
    # the next execution uses the new statement, as it is
    assert new.encode() in link.send(bind(b"a"), describe(b"P", b""), EXECUTE, SYNC)


def test_a_lookup_error_is_retried_without_a_describe() -> None:
    link = Link()
    link.prepared()
    link.send(bind(b"a"), EXECUTE, SYNC)
    assert link.feed(LOOKUP + ready(b"I")) == b""
    assert len(link.retries) == 1
    assert link.feed(CLOSE_OK + PARSE_OK + BIND_OK + ROW + SELECT_1 + ready(b"I")) == (
        BIND_OK + ROW + SELECT_1 + ready(b"I"))


def test_a_retry_that_fails_again_gives_the_error() -> None:
    link = Link()
    link.prepared()
    link.send(bind(b"a"), EXECUTE, SYNC)
    link.feed(LOOKUP)
    gone = msg(b"E", b"SERROR\0C42P01\0Mrelation \"t\" does not exist\0\0")
    assert link.feed(ready(b"I") + CLOSE_OK + gone + ready(b"I")) == gone + ready(b"I")
    assert len(link.retries) == 1 and link.plan.idle
    assert link.plan.capture == CAPTURE_ON  # once per batch: capturing again after it


def _passes(link: Link, error: bytes, status: bytes = b"I", name: bytes = b"a") -> None:
    """The error reaches the client; the statement is retired (a new Parse of its text gets
    a new name) and closed here; after 0A000 the client's statement keeps failing, as in
    PostgreSQL (its driver caches the old row description), after a lookup error it moves to
    the new name."""
    old = link.client.names[name][0]
    assert link.feed(error + ready(status)) == error + ready(status)
    assert not link.retries
    assert old not in link.server and old in link.server.pending_close
    new = link.registry.names[link.client.names[name][1]]
    assert new != old
    assert link.client.names[name][0] == (old if error == STALE else new)
    assert (old in link.registry.reshaped) is (error == STALE)


def test_0a000_without_a_describe_passes_and_stays() -> None:
    """asyncpg's Bind/Execute/Sync: the rows of a new type would be decoded with the old
    description; the error passes (asyncpg prepares again), the statement is retired. Its
    next Bind, where the statement is gone, gets 0A000 too (the server's 26000 replaced), and
    one with a Describe is prepared anew and retried."""
    link = Link()
    old = link.prepared()
    link.send(bind(b"a"), EXECUTE, SYNC)
    _passes(link, STALE)
    sent = link.send(bind(b"a"), EXECUTE, SYNC)  # the Close first, no Parse
    assert [t for t, _ in split(sent)] == [ord(c) for c in "CBES"]
    assert sent.startswith(msg(b"C", b"S" + old.encode() + b"\0"))
    assert split(sent)[1][1] == b"\0" + old.encode() + b"\0" + b"\0" * 6
    missing = msg(b"E", b"SERROR\0C26000\0Mprepared statement does not exist\0\0")
    out = link.feed(CLOSE_OK + missing + ready(b"I"))
    assert out.startswith(b"E") and stale_error(out[5:-6]) == "0A000"
    assert out.endswith(ready(b"I")) and link.client.names[b"a"][0] == old
    link.send(bind(b"a"), describe(b"P", b""), EXECUTE, SYNC)
    assert link.feed(missing + ready(b"I")) == b""
    (retry,) = link.retries
    assert retry.startswith(b"P") and link.client.names[b"a"][0] != old
    replies = BIND_OK + ROW_DESC + ROW + SELECT_1 + ready(b"I")
    assert link.feed(PARSE_OK + replies) == replies


def test_a_parse_of_a_reshaped_statement_meets_a_new_name() -> None:
    link = Link()
    old = link.prepared()
    link.send(bind(b"a"), EXECUTE, SYNC)
    link.feed(STALE + ready(b"I"))
    link.send(parse(b"b", b"SELECT * FROM t"), SYNC)
    assert link.client.names[b"b"][0] not in (old, "") and old in link.registry.reshaped


def test_inside_a_transaction_the_error_passes() -> None:
    link = Link()
    link.prepared()
    link.send(query(b"BEGIN"))
    link.feed(tag(b"BEGIN") + ready(b"T"))
    link.send(bind(b"a"), describe(b"P", b""), EXECUTE, SYNC)
    _passes(link, STALE, b"E")
    # closed at the next batch start (the client's ROLLBACK)
    sent = link.send(query(b"ROLLBACK"))
    assert sent.startswith(b"C") and sent.endswith(query(b"ROLLBACK"))


def test_after_something_ran_in_the_batch_the_error_passes() -> None:
    """An Execute before the stale Bind, in the same implicit transaction: retrying only
    the rest would lose what the error rolled back."""
    link = Link()
    link.prepared()
    link.send(parse(b"", b"INSERT INTO t VALUES (1)"), bind(b""), EXECUTE,
              bind(b"a"), describe(b"P", b""), EXECUTE, SYNC)
    assert link.feed(PARSE_OK + BIND_OK + tag(b"INSERT 0 1")) == (
        PARSE_OK + BIND_OK + tag(b"INSERT 0 1"))
    _passes(link, STALE)


def test_pipelined_batches_behind_it_are_not_retried() -> None:
    link = Link()
    link.prepared()
    link.send(bind(b"a"), describe(b"P", b""), EXECUTE, SYNC, query(b"SELECT 1"))
    old = link.client.names[b"a"][0]
    assert link.feed(STALE + ready(b"I")) == STALE + ready(b"I")
    assert not link.retries and old in link.server.pending_close


def test_other_errors_are_left_alone() -> None:
    link = Link()
    old = link.prepared()
    link.send(bind(b"a"), describe(b"P", b""), EXECUTE, SYNC)
    assert link.feed(OTHER_XX + ready(b"I")) == OTHER_XX + ready(b"I")
    assert link.client.names[b"a"][0] == old and old in link.server
    assert link.plan.capture == CAPTURE_ON


def test_the_failing_bind_is_told_by_the_plan() -> None:
    """Two Binds in a batch, the second fails: not the first statement's fault (and not
    retried: the first one ran)."""
    link = Link()
    first = link.prepared(b"a")
    second = link.prepared(b"b", b"SELECT 2")
    link.send(bind(b"a"), EXECUTE, bind(b"b"), EXECUTE, SYNC)
    link.feed(BIND_OK + ROW + SELECT_1)
    link.feed(LOOKUP + ready(b"I"))
    assert link.client.names[b"a"][0] == first
    assert link.client.names[b"b"][0] != second and second in link.server.pending_close


def test_another_connection_finds_a_retired_statement_stale() -> None:
    """Two server connections had the statement; the first retired it. The second's client
    still reaches the old one there: repaired too, onto a name that connection lacks."""
    registry = StatementRegistry()
    one, two = Link(registry), Link(registry)
    old = one.prepared()
    assert two.prepared() == old
    one.send(bind(b"a"), describe(b"P", b""), EXECUTE, SYNC)
    one.feed(STALE + ready(b"I"))
    new = one.client.names[b"a"][0]
    two.send(bind(b"a"), describe(b"P", b""), EXECUTE, SYNC)
    assert two.feed(STALE + ready(b"I")) == b""
    assert two.client.names[b"a"][0] == new != old and two.retries
    assert two.plan.capture == CAPTURE_SUSPENDED
    assert registry.names[Q] == new
