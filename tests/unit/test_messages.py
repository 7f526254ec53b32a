"""Builders and parsers of protocol messages: layouts per the PostgreSQL protocol docs, round
trips through pgcorral's own readers, and ValueError on malformed input."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgcorral.protocol import codes
from pgcorral.protocol import messages as m
from pgcorral.protocol.framing import MessageReader
from pgcorral.protocol.startup import CancelRequest, Startup, StartupReader

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None)

# Text that can travel in a C string: no NUL, no lone surrogates.
cstring_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                       max_size=30)


def split(wire: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, body) messages of ``wire``, checking that it holds whole messages only."""
    reader = MessageReader(max_length=codes.LARGE_MESSAGE_LIMIT)
    reader.feed(wire)
    out = []
    while (msg := reader.next_message()) is not None:
        out.append((bytes([msg[0]]), msg[1]))
    assert len(reader) == 0
    return out


def one(wire: bytes, type_: bytes) -> bytes:
    [(got, body)] = split(wire)
    assert got == type_
    assert struct.unpack_from("!I", wire, 1)[0] == len(body) + 4
    return body


# --- framing of every builder ---------------------------------------------------------------


def test_message_frames_its_body() -> None:
    assert m.message(b"S") == b"S\0\0\0\x04"
    assert m.message(b"Q", b"x\0") == b"Q\0\0\0\x06x\0"


def test_fixed_messages() -> None:
    assert m.ready_for_query() == b"Z\0\0\0\x05I"
    assert m.ready_for_query(b"T") == b"Z\0\0\0\x05T"
    assert m.authentication_ok() == b"R\0\0\0\x08\0\0\0\0"
    assert m.authentication_cleartext() == b"R\0\0\0\x08\0\0\0\x03"
    assert m.terminate() == b"X\0\0\0\x04"
    assert m.sync() == b"S\0\0\0\x04"
    assert m.query("SELECT 1") == b"Q\0\0\0\x0dSELECT 1\0"
    assert m.password_message(b"pw\0") == b"p\0\0\0\x07pw\0"


def test_authentication_messages() -> None:
    body = one(m.authentication_md5(b"salt"), b"R")
    assert m.parse_auth_code(body) == codes.AUTH_MD5_PASSWORD
    assert body[4:] == b"salt"
    body = one(m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]), b"R")
    assert m.parse_auth_code(body) == codes.AUTH_SASL
    assert body[4:] == b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    body = one(m.authentication_sasl_continue(b"r=abc"), b"R")
    assert (m.parse_auth_code(body), body[4:]) == (codes.AUTH_SASL_CONTINUE, b"r=abc")
    body = one(m.authentication_sasl_final(b"v=xyz"), b"R")
    assert (m.parse_auth_code(body), body[4:]) == (codes.AUTH_SASL_FINAL, b"v=xyz")


@pytest.mark.parametrize("salt", [b"", b"abc", b"abcde"])
def test_md5_salt_must_be_4_bytes(salt: bytes) -> None:
    with pytest.raises(ValueError):
        m.authentication_md5(salt)


def test_sasl_initial_response_layout() -> None:
    body = one(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=nonce"), b"p")
    assert body == b"SCRAM-SHA-256\0" + struct.pack("!i", 13) + b"n,,n=,r=nonce"


# --- error and notice -----------------------------------------------------------------------


def test_error_response_round_trip() -> None:
    body = one(m.error_response("28P01", 'password authentication failed for user "a"'), b"E")
    assert m.parse_fields(body) == {
        "S": "FATAL", "V": "FATAL", "C": "28P01",
        "M": 'password authentication failed for user "a"',
    }
    assert body.endswith(b"\0\0")


def test_error_response_with_detail_and_hint() -> None:
    wire = m.error_response("53300", "too many", severity="ERROR", detail="d", hint="h")
    fields = m.parse_fields(one(wire, b"E"))
    assert fields == {"S": "ERROR", "V": "ERROR", "C": "53300", "M": "too many", "D": "d",
                      "H": "h"}
    assert list(fields) == ["S", "V", "C", "M", "D", "H"]


def test_error_response_from_fields_keeps_fields_as_sent() -> None:
    fields = {"S": "ERROR", "C": "42P01", "M": "relation does not exist", "P": "15",
              "F": "parse_relation.c", "L": "1392", "R": "parserOpenTable"}
    assert m.parse_fields(one(m.error_response_from_fields(fields), b"E")) == fields


def test_notice_response_round_trip() -> None:
    body = one(m.notice_response("25P01", "there is no transaction in progress",
                                 severity="WARNING"), b"N")
    assert m.parse_fields(body) == {"S": "WARNING", "V": "WARNING", "C": "25P01",
                                    "M": "there is no transaction in progress"}


@given(sqlstate=st.from_regex(r"\A[0-9A-Z]{5}\Z"), text=cstring_text,
       detail=st.one_of(st.none(), cstring_text), hint=st.one_of(st.none(), cstring_text))
@SETTINGS
def test_error_response_round_trip_any_text(sqlstate: str, text: str, detail: str | None,
                                            hint: str | None) -> None:
    body = one(m.error_response(sqlstate, text, detail=detail, hint=hint), b"E")
    assert m.parse_fields(body) == m.error_fields("FATAL", sqlstate, text, detail=detail,
                                                  hint=hint)


@pytest.mark.parametrize(
    "body",
    [b"", b"M", b"Mtext", b"Mtext\0", b"Sx\0Mtext", b"Sx\0Mtext\0"],
    ids=["empty", "code-only", "unterminated-value", "no-final-terminator",
         "second-unterminated", "second-no-final-terminator"],
)
def test_parse_fields_malformed(body: bytes) -> None:
    with pytest.raises(ValueError):
        m.parse_fields(body)


def test_parse_fields_edge_cases() -> None:
    assert m.parse_fields(b"\0") == {}
    assert m.parse_fields(memoryview(b"M\0\0")) == {"M": ""}
    assert m.parse_fields(b"M\xff\0\0") == {"M": "\ufffd"}


# --- ParameterStatus, BackendKeyData, CommandComplete ---------------------------------------


@given(name=cstring_text, value=cstring_text)
@SETTINGS
def test_parameter_status_round_trip(name: str, value: str) -> None:
    assert m.parse_parameter_status(one(m.parameter_status(name, value), b"S")) == (name, value)


def test_parameter_status_layout() -> None:
    assert m.parameter_status("TimeZone", "UTC") == b"S\0\0\0\x11TimeZone\0UTC\0"


@pytest.mark.parametrize("body", [b"", b"a", b"a\0", b"a\0b", b"a\0b\0c\0", b"a\0b\0\0"])
def test_parse_parameter_status_malformed(body: bytes) -> None:
    with pytest.raises(ValueError):
        m.parse_parameter_status(body)


@given(pid=st.integers(-(2**31), 2**31 - 1), secret=st.integers(-(2**31), 2**31 - 1))
@SETTINGS
def test_backend_key_data_round_trip(pid: int, secret: int) -> None:
    body = one(m.backend_key_data(pid, secret), b"K")
    assert len(body) == 8
    assert m.parse_backend_key_data(body) == (pid, secret)
    assert m.parse_backend_key_data(memoryview(body)) == (pid, secret)


@given(pid=st.integers(-(2**31), 2**31 - 1), secret=st.integers(-(2**31), 2**31 - 1),
       status=st.sampled_from(b"ITE"))
@SETTINGS
def test_key_and_ready_is_backend_key_data_then_ready_for_query(pid: int, secret: int,
                                                                 status: int) -> None:
    assert m.key_and_ready(pid, secret, status) == (
        m.backend_key_data(pid, secret) + m.ready_for_query(bytes([status])))


def test_parameter_statuses_are_the_messages_in_order() -> None:
    params = {"application_name": "x", "DateStyle": "ISO, MDY", "TimeZone": "UTC"}
    assert m.parameter_statuses(params) == b"".join(
        m.parameter_status(k, v) for k, v in params.items())
    assert m.parameter_statuses({}) == b""


@pytest.mark.parametrize("size", [0, 4, 7, 9, 36])
def test_parse_backend_key_data_wrong_length(size: int) -> None:
    with pytest.raises(ValueError):
        m.parse_backend_key_data(b"\1" * size)


@pytest.mark.parametrize("size", [0, 1, 3])
def test_parse_auth_code_too_short(size: int) -> None:
    with pytest.raises(ValueError):
        m.parse_auth_code(b"\0" * size)


def test_parse_command_tag() -> None:
    assert m.parse_command_tag(b"ROLLBACK\0") == "ROLLBACK"
    assert m.parse_command_tag(memoryview(b"SELECT 1\0")) == "SELECT 1"
    for bad in (b"", b"ROLLBACK"):
        with pytest.raises(ValueError):
            m.parse_command_tag(bad)


# --- NegotiateProtocolVersion ---------------------------------------------------------------


def test_negotiate_protocol_version_layout() -> None:
    """Byte1('v'), Int32 length, Int32 version, Int32 count, one String per option.

    The version is the full ``major << 16 | minor`` that PostgreSQL sends (its backend writes
    PG_PROTOCOL_LATEST; libpq 18 refuses anything below 3.0 as "server requested downgrade to
    pre-3.0 protocol version"), not the bare minor number the older docs describe.
    """
    wire = m.negotiate_protocol_version(0, ["_pq_.foo", "_pq_.bar"])
    body = one(wire, b"v")
    assert struct.unpack_from("!ii", body) == (codes.PROTOCOL_3_0, 2)
    assert body[8:] == b"_pq_.foo\0_pq_.bar\0"
    assert wire == b"v" + struct.pack("!Iii", 4 + 8 + 18, 3 << 16, 2) + b"_pq_.foo\0_pq_.bar\0"


def test_negotiate_protocol_version_without_options() -> None:
    assert m.negotiate_protocol_version(0, []) == b"v" + struct.pack("!Iii", 12, 0x30000, 0)
    assert m.negotiate_protocol_version(2, iter(())) == b"v" + struct.pack("!Iii", 12, 0x30002, 0)


# --- frontend messages, read back by pgcorral's own readers -----------------------------------


def read_startup_packet(wire: bytes) -> object:
    reader = StartupReader()
    reader.feed(wire)
    packet = reader.next_packet()
    assert len(reader) == 0
    return packet


def test_startup_message_read_back() -> None:
    params = {"user": "alice", "database": "db1", "application_name": "pgcorral",
              "options": "-c search_path=x"}
    assert read_startup_packet(m.startup_message(params)) == Startup(3, 0, params)


def test_startup_message_other_version_and_pq_options() -> None:
    wire = m.startup_message({"user": "u", "_pq_.x": "1"}, version=codes.PROTOCOL_3_0 | 2)
    assert read_startup_packet(wire) == Startup(3, 2, {"user": "u"}, ("_pq_.x",))


def test_startup_message_layout() -> None:
    wire = m.startup_message({"user": "u"})
    assert wire == struct.pack("!ii", 16, codes.PROTOCOL_3_0) + b"user\0u\0\0"


@given(params=st.dictionaries(cstring_text.filter(lambda s: s != "" and not s.startswith("_pq_.")),
                              cstring_text, max_size=5),
       user=cstring_text.filter(bool))
@SETTINGS
def test_startup_message_round_trip(params: dict[str, str], user: str) -> None:
    params = {**params, "user": user}
    wire = m.startup_message(params)
    if len(wire) > codes.MAX_STARTUP_PACKET_LENGTH:
        return
    assert read_startup_packet(wire) == Startup(3, 0, params)


def test_cancel_request_read_back() -> None:
    wire = m.cancel_request(1234, -5)
    assert len(wire) == 16
    assert read_startup_packet(wire) == CancelRequest(1234, struct.pack("!i", -5))


# --- set_config_statement --------------------------------------------------------------------


def read_cstr(body: bytes, pos: int) -> tuple[bytes, int]:
    end = body.index(b"\0", pos)
    return body[pos:end], end + 1


def decode_bind(body: bytes) -> tuple[bytes, bytes, list[int], list[bytes | None], list[int]]:
    portal, pos = read_cstr(body, 0)
    statement, pos = read_cstr(body, pos)
    (nfmt,) = struct.unpack_from("!h", body, pos)
    formats = list(struct.unpack_from(f"!{nfmt}h", body, pos + 2))
    pos += 2 + 2 * nfmt
    (nparams,) = struct.unpack_from("!h", body, pos)
    pos += 2
    values: list[bytes | None] = []
    for _ in range(nparams):
        (size,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + size])
            pos += size
    (nres,) = struct.unpack_from("!h", body, pos)
    results = list(struct.unpack_from(f"!{nres}h", body, pos + 2))
    pos += 2 + 2 * nres
    assert pos == len(body), "trailing bytes in Bind"
    return portal, statement, formats, values, results


@pytest.mark.parametrize(
    "settings_",
    [
        [("search_path", "my schema")],
        [("application_name", "caf\u00e9"), ("DateStyle", "ISO, DMY"), ("x.y", "")],
        [("a", "'; DROP TABLE t; --"), ("b", "\\"), ("c", "$1")],
        [("a", "1"), ("a", "2")],  # applied left to right: the last one wins
    ],
)
def test_set_config_statement_layout(settings_: list[tuple[str, str]]) -> None:
    wire = m.set_config_statement(settings_)
    msgs = split(wire)
    assert [t for t, _ in msgs] == [b"P", b"B", b"E", b"S"]
    (_, parse), (_, bind), (_, execute), (_, sync_) = msgs

    # Parse: unnamed statement, query, no parameter types.
    name, pos = read_cstr(parse, 0)
    sql, pos = read_cstr(parse, pos)
    assert name == b""
    assert parse[pos:] == struct.pack("!h", 0)
    text = sql.decode()
    n = len(settings_)
    assert text == "SELECT " + ", ".join(
        f"pg_catalog.set_config(${2 * i + 1}, ${2 * i + 2}, false)" for i in range(n))
    placeholders = sorted({int(p) for p in re.findall(r"\$(\d+)", text)})
    assert placeholders == list(range(1, 2 * n + 1))

    # Bind: unnamed portal and statement, text parameters, one per placeholder, in order.
    portal, statement, formats, values, results = decode_bind(bind)
    assert (portal, statement, formats, results) == (b"", b"", [], [])
    assert values == [s.encode() for pair in settings_ for s in pair]

    # Execute: unnamed portal, no row limit. Sync: empty.
    assert execute == b"\0" + struct.pack("!i", 0)
    assert sync_ == b""
