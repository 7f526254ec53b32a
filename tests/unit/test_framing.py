"""MessageReader and BoundaryTracker, fed at every split point."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgcorral.protocol import codes
from pgcorral.protocol.framing import (
    TERMINATE_SPLIT,
    BoundaryTracker,
    FramingError,
    MessageReader,
)

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def msg(type_: bytes, body: bytes = b"") -> bytes:
    return type_ + struct.pack("!I", len(body) + 4) + body


def header(type_: bytes, length: int) -> bytes:
    return type_ + struct.pack("!I", length & 0xFFFFFFFF)


TERMINATE = msg(b"X")

SEQUENCE: list[tuple[bytes, bytes]] = [
    (b"Q", b"SELECT 1;\0"),
    (b"S", b""),
    (b"d", bytes(range(256)) * 2),
    (b"H", b""),
    (b"p", b"secret\0"),
    (b"X", b""),
]
STREAM = b"".join(msg(t, b) for t, b in SEQUENCE)


def every_split(data: bytes) -> Iterable[list[bytes]]:
    yield [data]
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i:i + 1] for i in range(len(data))]


def read_all(chunks: Iterable[bytes], max_length: int = codes.SMALL_MESSAGE_LIMIT
             ) -> tuple[list[tuple[int, bytes]], bytes]:
    reader = MessageReader(max_length)
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (m := reader.next_message()) is not None:
            out.append(m)
    return out, reader.take_rest()


# --- MessageReader --------------------------------------------------------------------------


def test_message_reader_at_every_split_point() -> None:
    expected = [(t[0], b) for t, b in SEQUENCE]
    for chunks in every_split(STREAM):
        assert read_all(chunks) == (expected, b""), [len(c) for c in chunks]


def test_message_reader_three_way_splits() -> None:
    data = msg(b"Q", b"x\0") + msg(b"S") + msg(b"P", b"\0SELECT 1\0\0\0")
    expected = [(ord("Q"), b"x\0"), (ord("S"), b""), (ord("P"), b"\0SELECT 1\0\0\0")]
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert read_all([data[:i], data[i:j], data[j:]]) == (expected, b"")


def test_message_reader_keeps_an_incomplete_message() -> None:
    partial = msg(b"Q", b"SELECT 1;\0")[:-1]
    for chunks in every_split(msg(b"S") + partial):
        assert read_all(chunks) == ([(ord("S"), b"")], partial)
    reader = MessageReader()
    reader.feed(partial)
    assert reader.next_message() is None
    assert len(reader) == len(partial)


@given(
    messages=st.lists(
        st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=40)), max_size=8
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
@SETTINGS
def test_message_reader_random_chunks(messages: list[tuple[bytes, bytes]],
                                      cuts: list[int]) -> None:
    data = b"".join(msg(t, b) for t, b in messages)
    points = sorted({c for c in cuts if c <= len(data)} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    assert read_all(chunks) == ([(t[0], b) for t, b in messages], b"")


@pytest.mark.parametrize("length", [0, 1, 3, -1, 0x80000000])
def test_message_reader_refuses_length_below_4_or_negative(length: int) -> None:
    for chunks in every_split(header(b"Q", length) + b"\0" * 8):
        reader = MessageReader()
        with pytest.raises(FramingError):
            for chunk in chunks:
                reader.feed(chunk)
                while reader.next_message() is not None:
                    pass


def test_message_reader_refuses_an_oversized_message_from_its_header_alone() -> None:
    """Five bytes are enough: the body the header announces is never awaited."""
    reader = MessageReader(max_length=100)
    reader.feed(header(b"d", 4 + 101))
    with pytest.raises(FramingError):
        reader.next_message()
    for length in (codes.SMALL_MESSAGE_LIMIT + 5, codes.LARGE_MESSAGE_LIMIT, 0xFFFFFFFF):
        reader = MessageReader()
        reader.feed(header(b"Q", length))
        with pytest.raises(FramingError):
            reader.next_message()


def test_message_reader_accepts_a_body_of_exactly_max_length() -> None:
    reader = MessageReader(max_length=100)
    reader.feed(header(b"d", 4 + 100))
    assert reader.next_message() is None  # waits for the body: within the limit
    reader.feed(b"b" * 100)
    assert reader.next_message() == (ord("d"), b"b" * 100)
    assert read_all([msg(b"d", b"b" * 100)], max_length=100) == ([(ord("d"), b"b" * 100)], b"")


def test_message_reader_default_limit_is_the_small_message_limit() -> None:
    assert MessageReader().max_length == codes.SMALL_MESSAGE_LIMIT == 10000
    body = b"x" * codes.SMALL_MESSAGE_LIMIT
    assert read_all([msg(b"p", body)]) == ([(ord("p"), body)], b"")


def test_message_reader_take_rest() -> None:
    reader = MessageReader()
    reader.feed(msg(b"S") + b"tail")
    assert reader.next_message() == (ord("S"), b"")
    assert reader.take_rest() == b"tail"
    assert len(reader) == 0
    assert reader.next_message() is None


# --- BoundaryTracker ------------------------------------------------------------------------


def boundaries(messages: list[bytes]) -> set[int]:
    """Absolute offsets at which a message starts or the stream ends."""
    out = {0}
    pos = 0
    for m in messages:
        pos += len(m)
        out.add(pos)
    return out


def expected_reports(messages: list[bytes], terminate_at: int | None,
                     points: list[int]) -> list[int]:
    """What ``feed`` must return for each chunk ``points[i]:points[i+1]`` of the stream, up to
    and including the chunk that completes the Terminate's header."""
    term = sum(len(m) for m in messages[:terminate_at]) if terminate_at is not None else None
    out = []
    for start, end in itertools.pairwise(points):
        if term is not None and end >= term + 5:  # this chunk completes the header
            out.append(term - start if start <= term else TERMINATE_SPLIT)
            break
        out.append(-1)
    return out


FRONTEND_TYPES = sorted(t for t in codes.FRONTEND_TYPES if t != codes.TERMINATE)
message_st = st.tuples(
    st.sampled_from(FRONTEND_TYPES).map(lambda t: bytes([t])),
    st.one_of(st.just(b""), st.binary(max_size=30)),
).map(lambda tb: msg(*tb))


@st.composite
def stream_and_cuts(draw: st.DrawFn) -> tuple[list[bytes], int | None, bytes, list[int]]:
    messages = draw(st.lists(message_st, max_size=8))
    terminate_at = draw(st.one_of(st.none(), st.integers(0, len(messages))))
    if terminate_at is not None:
        messages.insert(terminate_at, TERMINATE)
        # Whatever follows a Terminate is of no interest, even garbage.
        messages.append(draw(st.binary(max_size=10)))
    data = b"".join(messages)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    # Sometimes cut inside the Terminate's header.
    if terminate_at is not None and draw(st.booleans()):
        start = sum(len(m) for m in messages[:terminate_at])
        cuts += draw(st.lists(st.integers(start, start + 5), min_size=1, max_size=3))
    points = sorted(set(cuts) | {0, len(data)})
    return messages, terminate_at, data, points


@given(stream_and_cuts())
@SETTINGS
def test_boundary_tracker_random_streams(
    case: tuple[list[bytes], int | None, bytes, list[int]],
) -> None:
    messages, terminate_at, data, points = case
    tracker = BoundaryTracker()
    expected = expected_reports(messages, terminate_at, points)
    known = boundaries(messages[:terminate_at] if terminate_at is not None else messages)
    got = []
    for i, (start, end) in enumerate(itertools.pairwise(points)):
        got.append(tracker.feed(data[start:end]))
        if got[-1] != -1:
            break
        if i < len(expected):
            assert tracker.at_boundary == (end in known), (start, end)
    assert got == expected[:len(got)]
    if terminate_at is None:
        assert got == [-1] * (len(points) - 1)
        assert tracker.at_boundary
    else:
        assert got[-1] != -1, "the Terminate was never reported"


def test_boundary_tracker_every_split_point() -> None:
    messages = [msg(t, b) for t, b in SEQUENCE]
    term = len(STREAM) - len(TERMINATE)
    known = boundaries(messages[:-1])
    for cut in range(len(STREAM) + 1):
        tracker = BoundaryTracker()
        first = tracker.feed(STREAM[:cut])
        if cut >= term + 5:
            assert first == term
            continue
        assert first == -1
        assert tracker.at_boundary == (cut in known), cut
        second = tracker.feed(STREAM[cut:])
        assert second == (term - cut if cut <= term else TERMINATE_SPLIT), cut


def test_boundary_tracker_byte_by_byte() -> None:
    tracker = BoundaryTracker()
    messages = [msg(t, b) for t, b in SEQUENCE]
    known = boundaries(messages[:-1])
    term = len(STREAM) - len(TERMINATE)
    for i in range(len(STREAM)):
        result = tracker.feed(STREAM[i:i + 1])
        if i < term + 4:
            assert result == -1, i
            assert tracker.at_boundary == (i + 1 in known), i
        else:
            assert result == (0 if term == i else TERMINATE_SPLIT)
            break
    else:
        pytest.fail("Terminate not reported")


def test_boundary_tracker_terminate_first_and_after_empty_messages() -> None:
    assert BoundaryTracker().feed(TERMINATE) == 0
    assert BoundaryTracker().feed(msg(b"S") + msg(b"H") + TERMINATE + b"junk") == 10
    tracker = BoundaryTracker()
    assert tracker.feed(b"") == -1
    assert tracker.at_boundary
    assert tracker.feed(msg(b"S")) == -1
    assert tracker.at_boundary


def test_boundary_tracker_skips_a_long_body_across_chunks() -> None:
    tracker = BoundaryTracker()
    body = b"X" * 1000  # body bytes that look like Terminates must not be taken for one
    data = msg(b"d", body) + TERMINATE
    assert tracker.feed(data[:5]) == -1
    assert not tracker.at_boundary
    for i in range(5, 1005, 100):
        assert tracker.feed(data[i:i + 100]) == -1
        assert tracker.at_boundary == (i + 100 == 1005)
    assert tracker.feed(data[1005:]) == 0


@st.composite
def bad_stream(draw: st.DrawFn) -> tuple[bytes, int, list[int]]:
    """Good messages, then a header with a bad length; returns data, header offset, points."""
    messages = draw(st.lists(message_st, max_size=5))
    bad_length = draw(st.one_of(st.integers(0, 3), st.integers(4 + 65, 0xFFFFFFFF)))
    type_ = bytes([draw(st.sampled_from(FRONTEND_TYPES))])
    at = sum(len(m) for m in messages)
    data = b"".join(messages) + header(type_, bad_length) + draw(st.binary(max_size=10))
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=8))
    cuts += draw(st.lists(st.integers(at, at + 5), max_size=2))
    return data, at, sorted(set(cuts) | {0, len(data)})


@given(bad_stream())
@SETTINGS
def test_boundary_tracker_bad_length_raises(case: tuple[bytes, int, list[int]]) -> None:
    data, at, points = case
    tracker = BoundaryTracker(max_length=64)
    for start, end in itertools.pairwise(points):
        if end >= at + 5:  # this chunk completes the bad header
            with pytest.raises(FramingError):
                tracker.feed(data[start:end])
            return
        assert tracker.feed(data[start:end]) == -1
    pytest.fail("the bad header was never completed")


def test_boundary_tracker_limits() -> None:
    assert BoundaryTracker().max_length == codes.LARGE_MESSAGE_LIMIT
    tracker = BoundaryTracker(max_length=10)
    assert tracker.feed(header(b"d", 14)) == -1  # body of exactly max_length is fine
    assert not tracker.at_boundary
    assert tracker.feed(b"0123456789") == -1
    assert tracker.at_boundary
    with pytest.raises(FramingError):
        BoundaryTracker(max_length=10).feed(header(b"d", 15))
    with pytest.raises(FramingError):
        BoundaryTracker().feed(header(b"Q", 0xFFFFFFFF))
    split = BoundaryTracker(max_length=10)
    assert split.feed(b"d\0") == -1
    with pytest.raises(FramingError):
        split.feed(b"\0\0\x03")
