"""The transaction pipeline's server -> client router (protocol/txrelay.py): exact bytes per
case, and the same answer whatever the chunking (every split point, byte by byte). Requests
reach the plan through a ``ClientForwarder``, as in the pipeline."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.txhelpers import (
    EXECUTE,
    FLUSH,
    SYNC,
    FakePostgres,
    bind,
    close,
    describe,
    msg,
    parse,
    query,
    ready,
    split,
)

from pgcorral.protocol import codes
from pgcorral.protocol.framing import FramingError
from pgcorral.protocol.replyplan import PASS, ReplyPlan, own_query_step
from pgcorral.protocol.rewrite import PARSE_COMPLETE, parse_locally
from pgcorral.protocol.statements import ClientStatements, ServerStatements, StatementRegistry
from pgcorral.protocol.txforward import SESSION_STATE, STREAM_FROM, ClientForwarder
from pgcorral.protocol.txrelay import ReplyRouter

PARSE_OK = msg(b"1")
BIND_OK = msg(b"2")
NO_DATA = msg(b"n")
ROW = msg(b"D", b"\0\x01\0\0\0\x011")
SELECT_1 = msg(b"C", b"SELECT 1\0")
ERROR = msg(b"E", b"SERROR\0C42P01\0Mno\0\0")
NOTICE = msg(b"N", b"SNOTICE\0Mhi\0\0")


def param(name: bytes, value: bytes) -> bytes:
    return msg(b"S", name + b"\0" + value + b"\0")


class Link:
    """A client linked to one server connection: requests go through the client's forwarder
    into the plan, replies through the router."""

    def __init__(self, capacity: int = 10) -> None:
        self.registry = StatementRegistry()
        self.client = ClientStatements()
        self.server = ServerStatements(capacity)
        self.router = ReplyRouter(ReplyPlan(self.server, self.registry.known))
        self.forwarder = ClientForwarder(self.client, self.registry)
        self.forwarder.link()

    def send(self, *messages: bytes) -> bytes:
        out, rest, seen = self.forwarder.feed(b"".join(messages), self.router.plan,
                                              self.router.status)
        assert rest == b"" and seen & ~SESSION_STATE == 0  # (a SET is session state)
        return out

    def feed(self, data: bytes) -> tuple[bytes, int]:
        return self.router.feed(data, self.forwarder.at_rest)

    @property
    def free(self) -> bool:
        return self.forwarder.at_rest and self.router.free


def feed_chunks(link: Link, stream: bytes, cuts: list[int]) -> tuple[bytes, int]:
    """Feed ``stream`` cut at ``cuts``; (bytes for the client, free offset in the stream)."""
    out = b""
    start = 0
    for end in [*sorted(set(cuts)), len(stream)]:
        if end <= start:
            continue
        got, free_at = link.feed(stream[start:end])
        out += got
        if free_at >= 0:
            return out, start + free_at
        start = end
    return out, -1


def test_everything_passes_untouched_and_frees_at_ready_idle() -> None:
    link = Link()
    link.send(msg(b"Q", b"SELECT 1\0"))
    stream = ROW + SELECT_1 + ready(b"I")
    out, free_at = link.feed(stream)
    assert out == stream and free_at == len(stream)
    assert link.free


def test_in_transaction_keeps_the_link() -> None:
    link = Link()
    link.send(msg(b"Q", b"BEGIN\0"))
    _, free_at = link.feed(msg(b"C", b"BEGIN\0") + ready(b"T"))
    assert free_at == -1 and link.router.status == ord("T")
    assert not link.free


def test_failed_transaction_keeps_the_link() -> None:
    link = Link()
    link.send(msg(b"Q", b"SELECT x\0"))
    _, free_at = link.feed(ERROR + ready(b"E"))
    assert free_at == -1


def test_pipelined_queries_free_only_after_the_last_ready() -> None:
    link = Link()
    link.send(msg(b"Q", b"SELECT 1\0"), msg(b"Q", b"SELECT 1\0"))
    first = ROW + SELECT_1 + ready(b"I")
    out, free_at = link.feed(first)
    assert (out, free_at) == (first, -1)
    out, free_at = link.feed(first)
    assert free_at == len(first)


def test_open_batch_is_not_free_until_sync() -> None:
    link = Link(capacity=0)
    link.send(parse(b"", b"SELECT 1"), bind(b""), EXECUTE, msg(b"H"))
    _, free_at = link.feed(PARSE_OK + BIND_OK + ROW + SELECT_1)
    assert free_at == -1 and link.router.plan.idle and not link.free
    link.send(SYNC)
    _, free_at = link.feed(ready(b"I"))
    assert free_at == 5 + 1


def test_own_query_replies_are_dropped_errors_included() -> None:
    link = Link()
    link.router.plan.extend((own_query_step(),))
    link.send(msg(b"Q", b"SELECT 1\0"))
    ours = PARSE_OK + BIND_OK + ERROR + ready(b"I")
    theirs = ROW + SELECT_1 + ready(b"I")
    out, free_at = link.feed(ours + theirs)
    assert out == theirs and free_at == len(ours + theirs)


def test_parameter_status_passes_and_is_collected() -> None:
    link = Link()
    link.router.plan.extend((own_query_step(),))
    link.send(msg(b"Q", b"SET x\0"))
    stream = (PARSE_OK + param(b"TimeZone", b"UTC") + ready(b"I")
              + msg(b"C", b"SET\0") + param(b"DateStyle", b"ISO, DMY") + ready(b"I"))
    out, _ = link.feed(stream)
    assert out == (param(b"TimeZone", b"UTC") + msg(b"C", b"SET\0")
                   + param(b"DateStyle", b"ISO, DMY") + ready(b"I"))
    assert link.router.changes == {"TimeZone": "UTC", "DateStyle": "ISO, DMY"}


def test_fabricated_parse_complete_comes_at_its_turn() -> None:
    link = Link()
    # the statement is on the server already: the client's Parse is answered by pgcorral
    link.send(parse(b"a", b"SELECT 1"), SYNC)
    link.feed(PARSE_OK + ready(b"I"))
    assert "pgc_1" in link.server
    sent = link.send(msg(b"Q", b"SELECT 1\0"), parse(b"c", b"SELECT 1"), bind(b"c"), EXECUTE,
                     SYNC)
    assert b"pgc_1" in sent and sent.count(b"P\0") == 0
    query_replies = ROW + SELECT_1 + ready(b"I")
    rest = BIND_OK + ROW + SELECT_1 + ready(b"I")
    out, free_at = link.feed(query_replies + rest)
    assert out == query_replies + PARSE_COMPLETE + rest
    assert free_at == len(query_replies + rest)


def test_a_server_accepting_our_parse_makes_it_known() -> None:
    link = Link()
    link.send(parse(b"a", b"SELECT 1"), SYNC)
    assert not parse_locally(parse(b"b", b"SELECT 1")[5:], ClientStatements(), link.registry)
    link.feed(PARSE_OK + ready(b"I"))
    other = ClientStatements()
    assert parse_locally(parse(b"b", b"SELECT 1")[5:], other, link.registry)
    assert b"b" in other


def test_bytes_after_the_free_point_are_reported() -> None:
    link = Link()
    link.send(msg(b"Q", b"SELECT 1\0"))
    stream = SELECT_1 + ready(b"I") + NOTICE
    out, free_at = link.feed(stream)
    assert free_at == len(SELECT_1) + 6 and out == SELECT_1 + ready(b"I")


def test_a_ready_for_query_nobody_asked_for() -> None:
    """With nothing expected it frees an idle link (what follows is not passed); it does not
    while the client's batch is open."""
    link = Link()
    assert link.feed(ready(b"I") + NOTICE) == (ready(b"I"), 6)
    link = Link()
    link.send(parse(b"", b"SELECT 1"))  # no Sync: the batch is open
    assert link.feed(PARSE_OK + ready(b"I") + NOTICE) == (PARSE_OK + ready(b"I") + NOTICE, -1)


@pytest.mark.parametrize("length", [0, 3, 0x7FFFFFFF])
def test_bad_server_lengths_raise(length: int) -> None:
    link = Link()
    link.send(msg(b"Q", b"SELECT 1\0"))
    with pytest.raises(FramingError):
        link.feed(b"D" + struct.pack("!I", length) + b"\0" * 8)


def test_malformed_ready_for_query_raises() -> None:
    link = Link()
    link.send(SYNC)
    with pytest.raises(FramingError):
        link.feed(msg(b"Z", b"II"))


def _scenario() -> tuple[Link, bytes]:
    """A batch mixing own replies (re-Parse dropped), passes, fabrications and a notice."""
    link = Link()
    link.send(parse(b"a", b"SELECT 1"), SYNC)
    link.feed(PARSE_OK + ready(b"I"))
    link.server.discard("pgc_1")  # as if evicted: the next Bind re-Parses (reply dropped)
    link.router.plan.extend((own_query_step(),))
    link.send(parse(b"b", b"SELECT 2"), bind(b"a"), EXECUTE, SYNC, msg(b"Q", b"SELECT 1\0"))
    stream = (PARSE_OK + BIND_OK + param(b"application_name", b"x") + ready(b"I")  # ours
              + PARSE_OK  # client's Parse b
              + PARSE_OK  # our re-Parse of a, dropped
              + NOTICE + BIND_OK + ROW * 3 + SELECT_1 + ready(b"I")
              + ROW + SELECT_1 + ready(b"I"))
    return link, stream


def test_scenario_whole() -> None:
    link, stream = _scenario()
    out, free_at = link.feed(stream)
    assert free_at == len(stream)
    assert out == (param(b"application_name", b"x") + PARSE_OK + NOTICE + BIND_OK + ROW * 3
                   + SELECT_1 + ready(b"I") + ROW + SELECT_1 + ready(b"I"))


def test_scenario_byte_by_byte_and_every_split() -> None:
    _, stream = _scenario()
    whole = feed_chunks(_scenario()[0], stream, [])
    assert feed_chunks(_scenario()[0], stream, list(range(1, len(stream)))) == whole
    for cut in range(1, len(stream)):
        assert feed_chunks(_scenario()[0], stream, [cut]) == whole, cut


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=400), max_size=12))
def test_scenario_any_chunking(cuts: list[int]) -> None:
    _, stream = _scenario()
    whole = feed_chunks(_scenario()[0], stream, [])
    assert feed_chunks(_scenario()[0], stream, cuts) == whole


def test_a_half_forwarded_client_message_keeps_the_link() -> None:
    link = Link()
    link.send(msg(b"Q", b"SELECT 1\0"))
    copy = msg(b"d", b"x" * STREAM_FROM)
    assert link.send(copy[:100]) == copy[:100]  # streaming: the rest is still to come
    _, free_at = link.feed(SELECT_1 + ready(b"I"))
    assert free_at == -1 and link.router.free and not link.free
    assert link.send(copy[100:]) == copy[100:]
    assert link.free


# --- the hot path gives what the general path gives ------------------------------------------

#: Client batches: simple queries (rows, DEALLOCATE answered here, errors), extended batches
#: (renames, re-Parses, fabricated replies, errors skipping to Sync), pipelined ones.
BATCHES = [
    [query(b"SELECT 1")], [query(b"")], [query(b"nope")], [query(b"DEALLOCATE s1")],
    [parse(b"s1", b"SELECT 1"), SYNC], [parse(b"s2", b"SELECT 2"), bind(b"s2"), EXECUTE, SYNC],
    [bind(b"s1"), EXECUTE, SYNC], [bind(b"s1"), describe(b"P", b""), EXECUTE, SYNC],
    [parse(b"", b"SELECT 3"), bind(b""), describe(b"P", b""), EXECUTE, SYNC],
    [describe(b"S", b"s1"), FLUSH, SYNC], [close(b"S", b"s2"), SYNC],
    [parse(b"s3", b"BAD"), bind(b"s3"), EXECUTE, SYNC], [bind(b"nope"), EXECUTE, SYNC],
    [query(b"SELECT 1"), query(b"SELECT 2")],
    [parse(b"", b"SELECT 3"), bind(b""), EXECUTE, FLUSH],  # no Sync: the batch stays open
]
#: What PostgreSQL may slip in between replies (a ReadyForQuery nobody asked for, too).
ASYNC = [NOTICE, param(b"application_name", b"x"), msg(b"A", b"\0\0\0\x01chan\0\0"),
         ready(b"I")]


def _link_with_replies(capacity: int, rows: int, own_first: bool, batches: list[int],
                       slipped: list[tuple[int, int]]) -> tuple[Link, bytes]:
    """A link whose plan holds the steps of ``batches`` (indexes into BATCHES; maybe after an
    own query), and the server's replies to all of them with ``slipped`` (position, index into
    ASYNC) messages slipped in. The same arguments give the same link and stream."""
    link = Link(capacity)
    fake = FakePostgres(rows)
    replies: list[bytes] = []
    if own_first:
        link.router.plan.extend((own_query_step(),))
        replies += [msg(b"C", b"SELECT 1\0"), ready(b"I")]
    for i in batches:
        sent, rest, _ = link.forwarder.feed(b"".join(BATCHES[i]), link.router.plan,
                                            link.router.status)
        assert rest == b""
        replies += fake.feed(sent)
    for at, i in slipped:
        replies.insert(at % (len(replies) + 1), ASYNC[i])
    return link, b"".join(replies)


def reference(link: Link, stream: bytes) -> tuple[bytes, int]:
    """The router's answer the slow way: every whole message asks the plan."""
    plan, out, pos = link.router.plan, b"", 0
    for type_, body in split(stream):
        end = pos + 5 + len(body)
        if plan.on_server_reply(type_) == PASS:
            out += stream[pos:end]
        out += plan.fabricated_before_next()
        pos = end
        if type_ == codes.READY_FOR_QUERY and body == b"I" and link.forwarder.at_rest and (
                plan.idle):
            return out, pos
    return out, -1


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([0, 1, 10]), st.integers(0, 3), st.booleans(),
       st.lists(st.integers(0, len(BATCHES) - 1), min_size=1, max_size=5),
       st.lists(st.tuples(st.integers(0, 100), st.integers(0, len(ASYNC) - 1)), max_size=3),
       st.lists(st.integers(min_value=1, max_value=200), max_size=6))
def test_whole_messages_give_the_general_result(
        capacity: int, rows: int, own_first: bool, batches: list[int],
        slipped: list[tuple[int, int]], cuts: list[int]) -> None:
    """Whole messages take the router's hot path (the plan's quiet types are not asked about);
    byte by byte every message goes through the general path; the reference asks the plan
    about every message. They agree on the bytes, the free offset, and the state left."""
    def outcome(how: str) -> tuple[object, ...]:
        link, stream = _link_with_replies(capacity, rows, own_first, batches, slipped)
        if how == "reference":
            got = reference(link, stream)
        else:
            got = feed_chunks(link, stream, list(range(1, len(stream))) if how == "bytes"
                              else cuts)
        plan = link.router.plan
        return (got, link.router.status if how != "reference" else None, len(plan),
                plan.idle, link.server.names(), list(link.server.pending_close),
                dict(link.client.names), sorted(link.registry.known))

    whole, by_bytes, slow = outcome("cuts"), outcome("bytes"), outcome("reference")
    assert whole == by_bytes
    assert whole[0] == slow[0] and whole[2:] == slow[2:]
