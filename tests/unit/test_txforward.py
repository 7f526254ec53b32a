"""The transaction pipeline's client -> server forwarder (protocol/txforward.py): exact results
per case, and the same bytes to the server and the same reply plan whatever the chunking (every
split point, byte by byte, random chunkings), as tests/unit/test_txrelay.py does for the router."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.txhelpers import (
    EXECUTE,
    FLUSH,
    SYNC,
    bind,
    close,
    describe,
    msg,
    parse,
    query,
    split,
)
from tests.unit.txhelpers import TERMINATE as TERMINATE_MSG

from pgcorral.protocol import codes
from pgcorral.protocol.replyplan import PASS, ReplyPlan
from pgcorral.protocol.rewrite import EMPTY_QUERY, PARSE_COMPLETE
from pgcorral.protocol.statements import ClientStatements, ServerStatements, StatementRegistry
from pgcorral.protocol.txforward import (
    DISCARD_ALL,
    NAMED_PARSE,
    STREAM_FROM,
    TERMINATE,
    VIOLATION,
    ClientForwarder,
)

LIMIT = 1 << 20  # the client's max_packet_size in these tests


class Pipe:
    """What the network layer does with a forwarder, without a network: keeps the partial
    message in front of the next chunk, collects what reaches the server, the replies pgcorral
    makes itself, and what was seen; then answers as a fake PostgreSQL and collects what the
    client gets."""

    def __init__(self, capacity: int, status: int = codes.TX_IDLE,
                 general: bool = False) -> None:
        self.general = general  # every chunk through ``feed_general`` (no fast path)
        self.registry = StatementRegistry()
        self.client = ClientStatements()
        self.server = ServerStatements(capacity)
        self.plan = ReplyPlan(self.server, self.registry.known)
        self.forwarder = ClientForwarder(self.client, self.registry, LIMIT)
        self.forwarder.link()
        self.status = status
        self.rest = b""
        self.trace: list[tuple[object, ...]] = []  # what each chunk did, and the state after
        self.sent: list[bytes] = []
        self.fabricated: list[bytes] = []
        self.seen = 0

    @property
    def to_server(self) -> bytes:
        return b"".join(self.sent)

    def feed(self, chunk: bytes) -> bytes:
        """One chunk from the client; what went to the server for it."""
        if self.seen & (TERMINATE | VIOLATION):
            return b""  # the client is gone
        fwd = self.forwarder
        feed = fwd.feed_general if self.general else fwd.feed
        send, self.rest, seen = feed(self.rest + chunk, self.plan, self.status)
        assert fwd.at_rest == (not fwd.batch_open and not fwd.pending)
        assert not self.rest or not fwd.pending  # a kept message is never streaming
        self.sent.append(send)
        self.seen |= seen
        self.fabricated.append(self.plan.fabricated_before_next())
        self.trace.append((send, self.rest, seen, fwd.batch_open, fwd.at_sync, fwd.at_rest,
                           fwd.pending, len(self.plan), self.server.names(),
                           list(self.server.pending_close), self.client.identities()))
        return send

    def state(self) -> dict[str, object]:
        fwd = self.forwarder
        return {"to_server": self.to_server, "rest": self.rest,
                "fabricated": b"".join(self.fabricated), "seen": self.seen,
                "violation": fwd.violation if self.seen & VIOLATION else "",
                "batch_open": fwd.batch_open, "pending": fwd.pending, "at_rest": fwd.at_rest,
                "client names": self.client.identities(), "server names": self.server.names(),
                "pending close": list(self.server.pending_close),
                "at_sync": fwd.at_sync, "steps": len(self.plan)}

    def answer(self) -> tuple[list[str], bytes]:
        """PostgreSQL's replies to what reached the server: the plan's verdicts, and the bytes
        the client gets (passed replies and fabricated ones, in order)."""
        verdicts: list[str] = []
        out = self.plan.fabricated_before_next()
        for reply in _replies(self.to_server):
            verdict = self.plan.on_server_reply(reply[0])
            verdicts.append(verdict)
            if verdict == PASS:
                out += reply
            out += self.plan.fabricated_before_next()
        return verdicts, out


def _replies(sent: bytes) -> list[bytes]:
    """A fake PostgreSQL's replies to ``sent`` (enough for the plan to follow)."""
    out: list[bytes] = []
    for type_, body in split(sent):
        kind = chr(type_)
        if kind == "P":
            out.append(msg(b"1"))
        elif kind == "B":
            out.append(msg(b"2"))
        elif kind == "D":
            out += [msg(b"t", b"\0\0")] * (body[:1] == b"S") + [msg(b"n")]
        elif kind == "E":
            out.append(msg(b"C", b"SELECT 1\0"))
        elif kind == "C":
            out.append(msg(b"3"))
        elif kind == "S":
            out.append(msg(b"Z", b"I"))
        elif kind == "Q" and body.startswith(b"COPY"):
            out.append(msg(b"G", b"\0\0\0"))
        elif kind == "Q":
            done = msg(b"I") if body == b"\0" else msg(b"C", body.split(b" ")[0] + b"\0")
            out += [done, msg(b"Z", b"I")]
        elif kind == "c":
            out += [msg(b"C", b"COPY 1\0"), msg(b"Z", b"I")]
    return out


def run(stream: bytes, cuts: list[int], capacity: int, status: int = codes.TX_IDLE,
        general: bool = False, trace: bool = False) -> dict[str, object]:
    """Feed ``stream`` cut at ``cuts``: everything the forwarder did, and the replies (and,
    with ``trace``, what each chunk did and the state after it)."""
    pipe = Pipe(capacity, status, general)
    start = 0
    for end in [*sorted(set(cuts)), len(stream)]:
        if start < end:
            pipe.feed(stream[start:end])
            start = end
    result = pipe.state()
    result["verdicts"], result["to_client"] = pipe.answer()
    if trace:
        result["trace"] = pipe.trace
    return result


# --- exact results ---------------------------------------------------------------------------

def test_simple_query_passes_as_the_same_bytes_object() -> None:
    pipe = Pipe(capacity=10)
    chunk = query(b"SELECT 1") + query(b"BEGIN")
    assert pipe.feed(chunk) is chunk  # nothing copied
    assert pipe.forwarder.at_rest and len(pipe.plan) == 2 and pipe.seen == 0


def test_a_partial_message_is_kept_until_whole() -> None:
    pipe = Pipe(capacity=10)
    whole = query(b"SELECT 1")
    assert pipe.feed(query(b"BEGIN") + whole[:3]) == query(b"BEGIN")
    assert pipe.rest == whole[:3]
    assert pipe.feed(whole[3:]) == whole and pipe.rest == b""


@pytest.mark.parametrize("capacity", [0, 10])
def test_an_extended_batch_is_open_from_parse_to_sync(capacity: int) -> None:
    pipe = Pipe(capacity)
    pipe.feed(parse(b"", b"SELECT 1") + bind(b"") + describe(b"P", b"") + EXECUTE + FLUSH)
    assert pipe.forwarder.batch_open and not pipe.forwarder.at_rest
    pipe.feed(SYNC)
    assert pipe.forwarder.at_rest
    assert pipe.to_server == (parse(b"", b"SELECT 1") + bind(b"") + describe(b"P", b"")
                              + EXECUTE + FLUSH + SYNC)  # the unnamed statement is not mapped


def test_mapping_on_renames_statements_and_answers_a_known_parse() -> None:
    pipe = Pipe(capacity=10)
    assert pipe.feed(parse(b"s1", b"SELECT 1") + bind(b"s1") + EXECUTE + SYNC) == (
        parse(b"pgc_1", b"SELECT 1") + bind(b"pgc_1") + EXECUTE + SYNC)
    # the server has it now: a Bind is renamed in place, a Parse answered by pgcorral
    assert pipe.feed(bind(b"s1", b"p") + EXECUTE + SYNC) == bind(b"pgc_1", b"p") + EXECUTE + SYNC
    assert pipe.feed(parse(b"s2", b"SELECT 1") + SYNC) == SYNC
    assert pipe.client.identities() == {b"s1": b"SELECT 1\0\0\0", b"s2": b"SELECT 1\0\0\0"}
    assert pipe.fabricated == [b""] * 3  # ParseComplete waits for its turn, after earlier replies
    assert pipe.answer()[1].count(PARSE_COMPLETE) == 2


def test_mapping_off_passes_names_and_sees_a_named_parse() -> None:
    pipe = Pipe(capacity=0)
    stream = parse(b"s1", b"SELECT 1") + bind(b"s1") + EXECUTE + SYNC
    assert pipe.feed(stream) is stream
    assert pipe.seen == NAMED_PARSE and not pipe.client.names and len(pipe.registry) == 0


def test_an_empty_parse_with_mapping_off_goes_to_postgresql() -> None:
    """A Parse with no body at all (malformed): PostgreSQL answers it; nothing breaks here,
    whether it ends the chunk or another message follows."""
    for stream in (b"P\0\0\0\x04", b"P\0\0\0\x04" + SYNC):
        pipe = Pipe(capacity=0)
        assert pipe.feed(stream) == stream
        assert not pipe.seen & NAMED_PARSE


def test_a_parse_in_an_aborted_transaction_goes_to_postgresql() -> None:
    pipe = Pipe(capacity=10)
    pipe.feed(parse(b"s1", b"SELECT 1") + SYNC)
    pipe.status = codes.TX_FAILED
    assert pipe.feed(parse(b"s2", b"SELECT 1")) == parse(b"pgc_1", b"SELECT 1")  # 25P02 there


@pytest.mark.parametrize("capacity", [0, 10])
def test_deallocate_and_discard_all(capacity: int) -> None:
    pipe = Pipe(capacity)
    pipe.feed(parse(b"s1", b"SELECT 1") + SYNC)
    sent = pipe.feed(query(b"DEALLOCATE s1"))
    assert sent == (EMPTY_QUERY if capacity else query(b"DEALLOCATE s1"))
    assert pipe.seen & DISCARD_ALL == 0
    assert pipe.feed(query(b"  discard ALL;")) == query(b"  discard ALL;")
    assert pipe.seen & DISCARD_ALL and len(pipe.server) == 0
    assert pipe.feed(query(b"DISCARD PLANS")) == query(b"DISCARD PLANS")


def test_a_large_copy_data_streams_as_it_comes() -> None:
    pipe = Pipe(capacity=10)
    big = msg(b"d", b"x" * STREAM_FROM)
    head = query(b"COPY t FROM STDIN") + big[:1000]
    assert pipe.feed(head) == head  # forwarded before its end arrived
    assert pipe.forwarder.pending == len(big) - 1000 and not pipe.forwarder.at_rest
    assert pipe.feed(big[1000:2000]) == big[1000:2000]
    assert pipe.feed(big[2000:] + msg(b"c")) == big[2000:] + msg(b"c")
    assert pipe.forwarder.at_rest and pipe.rest == b""


def test_a_message_under_the_threshold_is_kept_until_whole() -> None:
    pipe = Pipe(capacity=0)
    data = msg(b"d", b"x" * (STREAM_FROM - 100))
    assert pipe.feed(data[:1000]) == b"" and pipe.rest == data[:1000]


def test_a_large_mapped_query_is_kept_whole() -> None:
    pipe = Pipe(capacity=10)
    long_query = query(b"SELECT '" + b"x" * STREAM_FROM + b"'")
    assert pipe.feed(long_query[:1000]) == b"" and pipe.rest == long_query[:1000]
    assert pipe.feed(long_query[1000:]) == long_query


def test_terminate_stops_the_stream() -> None:
    pipe = Pipe(capacity=10)
    sent = pipe.feed(query(b"SELECT 1") + TERMINATE_MSG + query(b"SELECT 2"))
    assert sent == query(b"SELECT 1") and pipe.seen == TERMINATE and pipe.rest == b""


@pytest.mark.parametrize("bad, text", [
    (b"Q\0\0\0\x03", "invalid message length 3"),
    (b"Q" + struct.pack("!I", LIMIT + 5), f"invalid message length {LIMIT + 5}"),
    (msg(b"p", b"secret\0"), f"invalid frontend message type {ord('p')}"),
    (msg(b"Z", b"I"), f"invalid frontend message type {ord('Z')}"),
])
def test_malformed_input_is_a_protocol_violation(bad: bytes, text: str) -> None:
    pipe = Pipe(capacity=10)
    sent = pipe.feed(query(b"SELECT 1") + bad + query(b"SELECT 2"))
    assert sent == query(b"SELECT 1")  # what came before it still goes
    assert pipe.seen == VIOLATION and pipe.forwarder.violation == text and pipe.rest == b""


def test_a_malformed_mapped_message_is_a_protocol_violation() -> None:
    pipe = Pipe(capacity=10)
    pipe.feed(bind(b"s1") + msg(b"P", b"s2\0SELECT 1"))  # no parameter type count
    assert pipe.seen == VIOLATION and pipe.to_server == bind(b"s1")
    assert "malformed Parse message" in pipe.forwarder.violation


@pytest.mark.xfail(strict=True, reason="known gap: a streamed message is not looked at, so a "
                   "large named Parse with mapping off neither opens a batch nor counts for "
                   "track_prepared_statements")
def test_a_streamed_named_parse_is_seen() -> None:
    pipe = Pipe(capacity=0)
    big = parse(b"s1", b"SELECT '" + b"x" * STREAM_FROM + b"'")
    pipe.feed(big[:1000])
    pipe.feed(big[1000:])
    assert pipe.seen == NAMED_PARSE and pipe.forwarder.batch_open


# --- the same result whatever the chunking ---------------------------------------------------

def _mixed() -> bytes:
    """Simple and extended protocol, renames, local answers, DEALLOCATE, DISCARD ALL."""
    return (query(b"SELECT 1")
            + parse(b"s1", b"SELECT $1", (23,)) + bind(b"s1") + describe(b"P", b"")
            + EXECUTE + SYNC
            + bind(b"s1", b"portal") + EXECUTE + parse(b"s2", b"SELECT $1", (23,))
            + describe(b"S", b"s2") + close(b"S", b"s2") + FLUSH + SYNC
            + parse(b"", b"SELECT 2") + bind(b"") + EXECUTE + SYNC
            + query(b"DEALLOCATE s1") + query(b"SELECT 3")
            + parse(b"s3", b"SELECT 4") + SYNC + query(b"DISCARD ALL")
            + bind(b"s3") + EXECUTE + SYNC)


def _copy() -> bytes:
    """A CopyData longer than STREAM_FROM between small messages."""
    return (query(b"SELECT 1") + query(b"COPY t FROM STDIN") + msg(b"d", b"1\n")
            + msg(b"d", bytes(range(256)) * (STREAM_FROM // 256 + 4)) + msg(b"c")
            + parse(b"s1", b"SELECT 1") + bind(b"s1") + EXECUTE + SYNC)


STREAMS = {
    "mixed": _mixed(),
    "terminate": query(b"SELECT 1") + parse(b"a", b"SELECT 1") + SYNC + TERMINATE_MSG
    + query(b"SELECT 2"),
    "bad length": parse(b"a", b"SELECT 1") + bind(b"a") + SYNC + b"Q\0\0\0\x02" + SYNC,
    "bad type": query(b"SELECT 1") + bind(b"") + msg(b"p", b"pw\0") + SYNC,
}


@pytest.mark.parametrize("capacity", [0, 10])
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_split_point(name: str, capacity: int) -> None:
    stream = STREAMS[name]
    whole = run(stream, [], capacity)
    assert run(stream, list(range(1, len(stream))), capacity) == whole  # byte by byte
    for cut in range(1, len(stream)):
        assert run(stream, [cut], capacity) == whole, cut


@pytest.mark.parametrize("capacity", [0, 10])
def test_large_copy_data_every_split_point_around_the_message(capacity: int) -> None:
    stream = _copy()
    whole = run(stream, [], capacity)
    assert whole["seen"] == (0 if capacity else NAMED_PARSE)
    assert whole["at_rest"] and whole["rest"] == b""
    big_at = stream.index(b"d\0\x01")
    big_end = big_at + 1 + struct.unpack_from("!I", stream, big_at + 1)[0]
    # every cut outside the long body and near its edges; a stride through the middle
    cuts = [*range(1, big_at + 300), *range(big_at + 300, big_end - 300, 97),
            *range(big_end - 300, len(stream))]
    for cut in cuts:
        assert run(stream, [cut], capacity) == whole, cut
    assert run(stream, list(range(1, len(stream))), capacity) == whole  # byte by byte


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(STREAMS)), st.sampled_from([0, 10]),
       st.lists(st.integers(min_value=1, max_value=600), max_size=20))
def test_any_chunking(name: str, capacity: int, cuts: list[int]) -> None:
    stream = STREAMS[name]
    assert run(stream, cuts, capacity) == run(stream, [], capacity)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([0, 10]),
       st.lists(st.integers(min_value=1, max_value=len(_copy()) - 1), max_size=12))
def test_any_chunking_of_a_large_copy(capacity: int, cuts: list[int]) -> None:
    stream = _copy()
    assert run(stream, cuts, capacity) == run(stream, [], capacity)


# --- the fast path gives what the general path gives -----------------------------------------

#: Client messages the fast path must tell apart (whole Queries that pass, that are translated,
#: that start with whitespace, an empty one) mixed with the rest.
MESSAGES = [
    query(b"SELECT 1"), query(b"select 2"), query(b" SELECT 3"), query(b"\tdiscard all"),
    query(b"DISCARD ALL"), query(b"discard plans"), query(b"DEALLOCATE s1"),
    query(b"deallocate ALL"), query(b"Deallocate prepare s2"), query(b"do $$ $$"),
    query(b""), msg(b"Q", b"no terminator"), msg(b"Q"),
    parse(b"s1", b"SELECT 1"), parse(b"s2", b"SELECT 2"), parse(b"s3", b"SELECT 3"),
    parse(b"", b"SELECT 4"), bind(b"s1"), bind(b"s2", b"portal"), bind(b"s3"), bind(b""),
    bind(b"nope"), msg(b"B", b"\0"), describe(b"S", b"s1"), describe(b"P", b""),
    close(b"S", b"s2"), close(b"P", b"portal"), EXECUTE, SYNC, FLUSH,
    msg(b"d", b"row\n"), msg(b"c"),
]


@pytest.mark.parametrize("capacity", [0, 1, 10])
@pytest.mark.parametrize("messages", [
    # an evicted statement's Close goes before the next batch, a lone Query included
    [parse(b"s1", b"SELECT 1"), parse(b"s2", b"SELECT 2"), SYNC, query(b"SELECT 1")],
    [parse(b"s1", b"SELECT 1"), bind(b"s1"), parse(b"s2", b"SELECT 2"), bind(b"s2"), SYNC,
     query(b"SELECT 1"), query(b"SELECT 2")],
    [query(b"DISCARD ALL"), query(b" discard all"), query(b"DEALLOCATE ALL")],
])
def test_fast_path_gives_the_general_result_cases(messages: list[bytes], capacity: int) -> None:
    cuts = [len(b"".join(messages[:i])) for i in range(1, len(messages))]
    stream = b"".join(messages)
    assert run(stream, cuts, capacity, trace=True) == run(stream, cuts, capacity, general=True,
                                                          trace=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(MESSAGES), min_size=1, max_size=14),
       st.sampled_from([0, 1, 2, 10]),
       st.sampled_from([codes.TX_IDLE, codes.TX_IN_BLOCK, codes.TX_FAILED]),
       st.lists(st.integers(min_value=1, max_value=300), max_size=8), st.booleans())
def test_fast_path_gives_the_general_result(messages: list[bytes], capacity: int, status: int,
                                            cuts: list[int], one_per_chunk: bool) -> None:
    """``feed`` (with its fast paths) and ``feed_general`` give the same bytes and leave the
    same plan, names and state after every chunk, whether each message comes in a chunk of its
    own or the stream is cut anywhere."""
    stream = b"".join(messages)
    if one_per_chunk:
        cuts = [len(b"".join(messages[:i])) for i in range(1, len(messages))]
    assert run(stream, cuts, capacity, status, trace=True) == run(
        stream, cuts, capacity, status, general=True, trace=True)


def test_the_fast_path_takes_a_lone_query() -> None:
    pipe = Pipe(capacity=10)
    data = query(b"SELECT 1")
    send, rest, seen = pipe.forwarder.feed(data, pipe.plan, codes.TX_IDLE)
    assert send is data and rest == b"" and seen == 0 and len(pipe.plan) == 1
    assert not pipe.forwarder.at_sync and pipe.forwarder.at_rest
