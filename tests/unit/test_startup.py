"""StartupReader and parse_options: every first packet a client may send, whole and at every
split point, checked against PostgreSQL's own answers (reliability.md section 3.1)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import pytest

from pgcorral.errors import ClientProtocolError, PgCorralError, StartupRejected
from pgcorral.protocol import codes
from pgcorral.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    Packet,
    SSLRequest,
    Startup,
    StartupReader,
    parse_options,
)

# --- building raw packets -------------------------------------------------------------------


def packet(code: int, payload: bytes = b"") -> bytes:
    """An untyped startup-phase packet: Int32 length (self included), Int32 code, payload."""
    return struct.pack("!ii", 8 + len(payload), code) + payload


def strings(*items: bytes) -> bytes:
    """NUL-terminated strings followed by the final terminator of a StartupMessage."""
    return b"".join(s + b"\0" for s in items) + b"\0"


def startup(*items: bytes, major: int = 3, minor: int = 0) -> bytes:
    return packet((major << 16) | minor, strings(*items))


def cancel(pid: int, key: bytes) -> bytes:
    return packet(codes.CANCEL_REQUEST_CODE, struct.pack("!i", pid) + key)


SSL = packet(codes.SSL_REQUEST_CODE)
GSSENC = packet(codes.GSSENC_REQUEST_CODE)
# Fixed length of a StartupMessage carrying only ``user``: length, code, "user\0", "\0" at the
# end of the name, and the final terminator.
_USER_OVERHEAD = 4 + 4 + len(b"user\0") + 1 + 1


# --- driving the reader ---------------------------------------------------------------------

Outcome = tuple[str, str, bool, str]  # error type, sqlstate, silent, message
Result = tuple[list[Packet | Outcome], bytes]


def error_outcome(exc: PgCorralError) -> Outcome:
    return (type(exc).__name__, exc.sqlstate, getattr(exc, "silent", False), exc.message)


def drive(chunks: Iterable[bytes]) -> Result:
    """Feed each chunk and take every packet it completes (as a network layer does).

    Returns the packets (an error ends the list as an ``Outcome``) and the bytes left over.
    """
    reader = StartupReader()
    out: list[Packet | Outcome] = []
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (pkt := reader.next_packet()) is not None:
                out.append(pkt)
    except PgCorralError as exc:
        out.append(error_outcome(exc))
        return out, b""  # the connection is closed: what is left over does not matter
    return out, reader.take_rest()


def every_split(data: bytes) -> Iterable[list[bytes]]:
    """Whole, cut in two at every point (including the empty ends), and byte by byte."""
    yield [data]
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]
    yield [data[i:i + 1] for i in range(len(data))]


def assert_same_at_every_split(data: bytes) -> Result:
    whole = drive([data])
    for chunks in every_split(data):
        assert drive(chunks) == whole, [len(c) for c in chunks]
    return whole


def silent(message: str = "invalid length of startup packet") -> Outcome:
    return ("ClientProtocolError", "08P01", True, message)


def rejected(sqlstate: str, message: str) -> Outcome:
    return ("StartupRejected", sqlstate, False, message)


LAYOUT = "invalid startup packet layout: expected terminator as last byte"
NO_USER = "no PostgreSQL user name specified in startup packet"

# (id, bytes, expected packets, an Outcome last when the packet is refused)
CASES: list[tuple[str, bytes, list[Packet | Outcome]]] = [
    ("ssl", SSL, [SSLRequest()]),
    ("gssenc", GSSENC, [GSSENCRequest()]),
    ("cancel-4-byte-key", cancel(4242, b"\x01\x02\x03\x04"),
     [CancelRequest(4242, b"\x01\x02\x03\x04")]),
    ("cancel-32-byte-key", cancel(7, bytes(range(32))), [CancelRequest(7, bytes(range(32)))]),
    ("cancel-256-byte-key", cancel(-1, b"k" * 256), [CancelRequest(-1, b"k" * 256)]),
    ("cancel-257-byte-key", cancel(7, b"k" * 257), [silent("invalid length of cancel request")]),
    ("cancel-no-key", cancel(7, b""), [silent("invalid length of cancel request")]),
    ("startup-3.0", startup(b"user", b"alice", b"database", b"db1"),
     [Startup(3, 0, {"user": "alice", "database": "db1"})]),
    ("startup-3.2", startup(b"user", b"alice", minor=2), [Startup(3, 2, {"user": "alice"})]),
    ("startup-3.9-pq-options",
     startup(b"user", b"alice", b"_pq_.foo", b"1", b"application_name", b"x", b"_pq_.bar", b"",
             minor=9),
     [Startup(3, 9, {"user": "alice", "application_name": "x"}, ("_pq_.foo", "_pq_.bar"))]),
    ("startup-empty-value", startup(b"user", b"bob", b"options", b""),
     [Startup(3, 0, {"user": "bob", "options": ""})]),
    ("startup-duplicate-key-last-wins", startup(b"user", b"a", b"user", b"b"),
     [Startup(3, 0, {"user": "b"})]),
    ("startup-non-utf8-user", startup(b"user", b"\xff\xfe"),
     [Startup(3, 0, {"user": "\udcff\udcfe"})]),
    ("protocol-2.0", startup(b"user", b"alice", major=2),
     [rejected("0A000", "unsupported frontend protocol 2.0: server supports 3.0 to 3.0")]),
    ("protocol-4.0", startup(b"user", b"alice", major=4),
     [rejected("0A000", "unsupported frontend protocol 4.0: server supports 3.0 to 3.0")]),
    ("protocol-1234.5681", packet((1234 << 16) | 5681, strings(b"user", b"a")),
     [rejected("0A000", "unsupported frontend protocol 1234.5681: server supports 3.0 to 3.0")]),
    ("missing-user", startup(b"database", b"db1"), [rejected("28000", NO_USER)]),
    ("no-parameters", startup(), [rejected("28000", NO_USER)]),
    ("empty-user", startup(b"user", b"", b"database", b"db1"), [rejected("28000", NO_USER)]),
    ("missing-terminator", packet(codes.PROTOCOL_3_0, b"user\0alice\0"),
     [rejected("08P01", LAYOUT)]),
    ("no-payload-at-all", packet(codes.PROTOCOL_3_0), [rejected("08P01", LAYOUT)]),
    ("odd-number-of-strings", startup(b"user", b"alice", b"database"),
     [rejected("08P01", LAYOUT)]),
    ("odd-number-no-terminator", packet(codes.PROTOCOL_3_0, b"user\0alice\0database\0"),
     [rejected("08P01", LAYOUT)]),
    ("unterminated-last-string", packet(codes.PROTOCOL_3_0, b"user\0alice\0\0x"),
     [rejected("08P01", LAYOUT)]),
    ("empty-parameter-name", startup(b"user", b"alice", b"", b"x"),
     [rejected("08P01", "invalid startup packet layout: empty parameter name")]),
    ("length-0", struct.pack("!i", 0) + b"\0" * 8, [silent()]),
    ("length-3", struct.pack("!i", 3) + b"\0" * 8, [silent()]),
    ("length-7", struct.pack("!i", 7) + b"\0" * 8, [silent()]),
    ("length-minus-1", struct.pack("!i", -1) + b"\0" * 8, [silent()]),
    ("length-100000", struct.pack("!i", 100000) + b"\0" * 8, [silent()]),
    ("length-2**31-1", struct.pack("!i", 2**31 - 1) + b"\0" * 8, [silent()]),
    ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", [silent()]),
    ("ssl-with-length-12", struct.pack("!iii", 12, codes.SSL_REQUEST_CODE, 0), [silent()]),
    ("gssenc-with-length-12", struct.pack("!iii", 12, codes.GSSENC_REQUEST_CODE, 0), [silent()]),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_packet_at_every_split_point(data: bytes, expected: list[Packet | Outcome]) -> None:
    packets, rest = assert_same_at_every_split(data)
    assert packets == expected
    if not isinstance(expected[-1], tuple):
        assert rest == b""


@pytest.mark.parametrize("data", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_incomplete_packet_waits(data: bytes) -> None:
    """Any proper prefix too short to carry a length is kept and nothing is returned."""
    for cut in range(4):
        packets, rest = drive([data[:cut]])
        assert packets == []
        assert rest == data[:cut]


def test_truncated_startup_waits_for_more() -> None:
    data = startup(b"user", b"alice")
    for cut in range(4, len(data)):
        packets, rest = drive([data[:cut]])
        assert packets == [], cut
        assert rest == data[:cut]


@pytest.mark.parametrize("length", [0, 3, -1, 10001, 100000, 0x47455420])
def test_bad_length_is_refused_from_the_length_field_alone(length: int) -> None:
    """Nothing of the claimed size is awaited or buffered: four bytes are enough to refuse."""
    reader = StartupReader()
    reader.feed(struct.pack("!i", length))
    with pytest.raises(ClientProtocolError) as info:
        reader.next_packet()
    assert info.value.silent
    assert info.value.sqlstate == "08P01"


# --- the 10 000 byte limit ------------------------------------------------------------------


def long_user_startup(total: int) -> bytes:
    data = startup(b"user", b"u" * (total - _USER_OVERHEAD))
    assert len(data) == total
    return data


def test_10kb_user_fits_exactly_at_the_limit() -> None:
    data = long_user_startup(codes.MAX_STARTUP_PACKET_LENGTH)
    packets, rest = assert_same_at_every_split(data)
    # Accepted; the name is then cut to NAMEDATALEN - 1 bytes, as PostgreSQL does.
    assert packets == [Startup(3, 0, {"user": "u" * 63})]
    assert rest == b""


def test_user_and_database_names_are_cut_to_63_bytes() -> None:
    data = startup(b"user", b"u" * 64, b"database", "é".encode() * 40,
                   b"application_name", b"a" * 100)
    [packet], _ = drive([data])
    assert isinstance(packet, Startup)
    assert packet.user == "u" * 63
    # Cut by bytes, as PostgreSQL: half a character survives as a surrogate escape.
    assert packet.database.encode("utf-8", "surrogateescape") == ("é".encode() * 40)[:63]
    assert packet.params["application_name"] == "a" * 100
    [exact], _ = drive([startup(b"user", b"u" * 63)])
    assert exact == Startup(3, 0, {"user": "u" * 63})


def test_one_byte_over_the_limit_is_refused_silently() -> None:
    data = long_user_startup(codes.MAX_STARTUP_PACKET_LENGTH + 1)
    packets, _ = assert_same_at_every_split(data)
    assert packets == [silent()]


# --- encryption requests and pipelined bytes (CVE-2021-23214 / CVE-2021-3935) ---------------


@pytest.mark.parametrize(
    ("request_", "which"), [(SSL, "SSL"), (GSSENC, "GSSAPI encryption")], ids=["ssl", "gssenc"]
)
@pytest.mark.parametrize(
    "extra", [b"x", startup(b"user", b"mallory"), b"\x16\x03\x01\x02\x00"],
    ids=["one-byte", "startup", "tls-hello-prefix"],
)
def test_bytes_pipelined_after_encryption_request_are_refused(
    request_: bytes, which: str, extra: bytes
) -> None:
    """Whatever follows the request in the same read is refused loudly, never silently."""
    expected = ("ClientProtocolError", "08P01", False,
                f"received unencrypted data after {which} request")
    assert drive([request_ + extra]) [0] == [expected]
    # However the request itself was split, the extra bytes arrived together with its end.
    for cut in range(len(request_)):
        assert drive([request_[:cut], request_[cut:] + extra])[0] == [expected], cut
    reader = StartupReader()
    reader.feed(request_ + extra)
    with pytest.raises(ClientProtocolError) as info:
        reader.next_packet()
    assert not info.value.silent


@pytest.mark.parametrize(("request_", "expected"), [(SSL, SSLRequest()),
                                                    (GSSENC, GSSENCRequest())])
def test_encryption_request_then_startup_in_a_later_read(request_: bytes, expected: Packet) -> None:
    """A client that waits for the answer before sending its startup is served normally."""
    data = startup(b"user", b"alice")
    packets, rest = drive([request_, data])
    assert packets == [expected, Startup(3, 0, {"user": "alice"})]
    assert rest == b""


def test_encryption_request_sent_twice_in_separate_reads() -> None:
    assert drive([SSL, SSL])[0] == [SSLRequest(), SSLRequest()]


def test_bytes_pipelined_after_startup_are_kept_for_the_caller() -> None:
    data = startup(b"user", b"alice")
    pipelined = b"Q\0\0\0\x0dSELECT 1;\0"
    for chunks in every_split(data + pipelined):
        reader = StartupReader()
        got: list[Packet] = []
        for chunk in chunks:
            reader.feed(chunk)
            if not got and (pkt := reader.next_packet()) is not None:
                got.append(pkt)
        assert got == [Startup(3, 0, {"user": "alice"})]
        assert len(reader) == len(pipelined)
        assert reader.take_rest() == pipelined
        assert len(reader) == 0


# --- the Startup value ----------------------------------------------------------------------


def test_startup_properties() -> None:
    plain = Startup(3, 0, {"user": "alice"})
    assert plain.user == "alice"
    assert plain.database == "alice"
    assert not plain.needs_negotiation
    with_db = Startup(3, 0, {"user": "alice", "database": "db1"})
    assert with_db.database == "db1"
    assert Startup(3, 0, {"user": "a", "database": ""}).database == "a"
    assert Startup(3, 2, {"user": "a"}).needs_negotiation
    assert Startup(3, 0, {"user": "a"}, ("_pq_.x",)).needs_negotiation


def test_reader_errors_are_pgcorral_errors() -> None:
    assert issubclass(ClientProtocolError, PgCorralError)
    assert issubclass(StartupRejected, PgCorralError)


# --- parse_options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("", {}),
        ("   \t ", {}),
        ("-c a=b", {"a": "b"}),
        ("-ca=b", {"a": "b"}),
        ("--a-b=c", {"a_b": "c"}),
        ("-c a-b=c", {"a_b": "c"}),
        ("  -c   a=1  --b=2 -cc=3  ", {"a": "1", "b": "2", "c": "3"}),
        ("-c a=", {"a": ""}),
        ("-c a=b=c", {"a": "b=c"}),
        ("-c search_path=my\\ schema", {"search_path": "my schema"}),
        ("-c a=x\\\\y", {"a": "x\\y"}),
        ("-c a=x\\\\ --b=y", {"a": "x\\", "b": "y"}),
        ("-c a=\\x", {"a": "x"}),
        ("-c a=b\\", {"a": "b"}),
        ("-c\\ a=b", {" a": "b"}),
        ("-c a=1 -c a=2", {"a": "2"}),
        ("-c application_name=caf\u00e9", {"application_name": "caf\u00e9"}),
    ],
)
def test_parse_options(options: str, expected: dict[str, str]) -> None:
    assert parse_options(options) == expected


@pytest.mark.parametrize(
    "options",
    ["-d 5", "-x", "a=b", "-c", "-c a=b -c", "--", "--a", "-c a", "-c =x", "--=x", "-", "\\",
     "-c a=b extra", "-B 100", "-F"],
)
def test_parse_options_refuses_other_switches(options: str) -> None:
    with pytest.raises(StartupRejected) as info:
        parse_options(options)
    assert info.value.sqlstate == "08P01"
    assert info.value.message.startswith("invalid command-line argument for server process: ")


def test_options_split_only_on_ascii_whitespace() -> None:
    from pgcorral.protocol.startup import parse_options

    # a no-break space is part of the value, as in PostgreSQL's pg_split_opts
    assert parse_options("-c application_name=a\u00a0b") == {"application_name": "a\u00a0b"}
    assert parse_options("-c a=1\t-c b=2") == {"a": "1", "b": "2"}
