"""ReplyWalker and the sync points of BoundaryTracker, at every split point and with random
chunking."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcorral.protocol.framing import BoundaryTracker, FramingError
from pgcorral.protocol.walkers import ReplyWalker


def msg(type_: bytes, body: bytes = b"") -> bytes:
    return type_ + struct.pack("!I", len(body) + 4) + body


def ready(status: bytes) -> bytes:
    return msg(b"Z", status)


def param(name: str, value: str) -> bytes:
    return msg(b"S", name.encode() + b"\0" + value.encode() + b"\0")


REPLY = (msg(b"1") + msg(b"2") + msg(b"D", b"\0\1\0\0\0\3abc") + msg(b"C", b"SELECT 1\0")
         + param("application_name", "x") + ready(b"T")
         + msg(b"D", b"y" * 5000) + param("TimeZone", "UTC") + ready(b"I"))
READY_ENDS = [REPLY.index(ready(b"T")) + 6, len(REPLY)]


def feed_chunks(walker: ReplyWalker, data: bytes, cuts: list[int]) -> list[tuple[int, int]]:
    """Feed ``data`` cut at ``cuts``; ReadyForQuery ends as absolute offsets."""
    found: list[tuple[int, int]] = []
    start = 0
    for end in [*cuts, len(data)]:
        found += [(start + off, status) for off, status in walker.feed(data[start:end])]
        start = end
    return found


def test_reply_walker_whole() -> None:
    w = ReplyWalker()
    assert w.feed(REPLY) == [(READY_ENDS[0], ord("T")), (READY_ENDS[1], ord("I"))]
    assert w.params == {"application_name": "x", "TimeZone": "UTC"}
    assert w.at_boundary


def test_reply_walker_every_split_point() -> None:
    for cut in range(1, len(REPLY)):
        w = ReplyWalker()
        assert feed_chunks(w, REPLY, [cut]) == [(READY_ENDS[0], ord("T")),
                                                (READY_ENDS[1], ord("I"))], cut
        assert w.params == {"application_name": "x", "TimeZone": "UTC"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(REPLY) - 1), max_size=12, unique=True))
def test_reply_walker_random_chunks(cuts: list[int]) -> None:
    w = ReplyWalker()
    assert feed_chunks(w, REPLY, sorted(cuts)) == [(READY_ENDS[0], ord("T")),
                                                   (READY_ENDS[1], ord("I"))]


def test_reply_walker_byte_by_byte() -> None:
    w = ReplyWalker()
    assert feed_chunks(w, REPLY, list(range(1, len(REPLY)))) == [
        (READY_ENDS[0], ord("T")), (READY_ENDS[1], ord("I"))]


@pytest.mark.parametrize("bad", [b"D\0\0\0\x02", msg(b"Z", b"II"), msg(b"S", b"no-terminator")])
def test_reply_walker_rejects_broken_streams(bad: bytes) -> None:
    with pytest.raises(FramingError):
        ReplyWalker().feed(bad)


REQUESTS = (msg(b"P", b"\0select 1\0\0\0") + msg(b"B", b"\0\0\0\0\0\0\0\0")
            + msg(b"E", b"\0\0\0\0\0") + msg(b"S") + msg(b"Q", b"select 2\0")
            + msg(b"d", b"x" * 3000) + msg(b"F", b"\0" * 8) + msg(b"S"))


def test_request_walker_counts_sync_points_at_every_split() -> None:
    for cut in range(0, len(REQUESTS) + 1):
        w = BoundaryTracker()
        assert w.feed(REQUESTS[:cut]) == -1
        assert w.feed(REQUESTS[cut:]) == -1
        assert w.sync_points == 4, cut  # Sync, Query, FunctionCall, Sync
        assert w.at_boundary


def test_request_walker_finds_terminate() -> None:
    w = BoundaryTracker()
    data = msg(b"Q", b"select 1\0") + msg(b"X")
    assert w.feed(data) == len(data) - 5
    assert w.sync_points == 1


def test_request_walker_rejects_bad_lengths() -> None:
    with pytest.raises(FramingError):
        BoundaryTracker().feed(b"Q\0\0\0\x01")
