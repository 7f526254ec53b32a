"""Builders for the messages pgcorral itself sends, and parsers for the few it must read.

Builders return complete wire messages (type byte, length, body) as ``bytes``. Parsers take a
message body (without type and length) and raise ``ValueError`` on malformed input; callers turn
that into the right protocol error for the side that sent it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

from pgcorral.protocol import codes

_I32 = struct.Struct("!i")
_HEADER = struct.Struct("!cI")
_I32x2 = struct.Struct("!ii")
_I16 = struct.Struct("!h")


def message(type_: bytes, body: bytes = b"") -> bytes:
    """Frame ``body`` as a typed v3 message."""
    return _HEADER.pack(type_, len(body) + 4) + body


def _cstr(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape") + b"\0"


# --- backend messages (pooler -> client) -----------------------------------------------------

# Field codes of ErrorResponse/NoticeResponse, in the order PostgreSQL sends them.
def error_fields(
    severity: str, sqlstate: str, message_text: str, *, detail: str | None = None,
    hint: str | None = None,
) -> dict[str, str]:
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message_text}
    if detail:
        fields["D"] = detail
    if hint:
        fields["H"] = hint
    return fields


def _fields_body(fields: Mapping[str, str]) -> bytes:
    parts = [code.encode("ascii") + _cstr(value) for code, value in fields.items()]
    return b"".join(parts) + b"\0"


def error_response(
    sqlstate: str, message_text: str, *, severity: str = "FATAL", detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    fields = error_fields(severity, sqlstate, message_text, detail=detail, hint=hint)
    return message(b"E", _fields_body(fields))


def error_response_from_fields(fields: Mapping[str, str]) -> bytes:
    return message(b"E", _fields_body(fields))


def notice_response(sqlstate: str, message_text: str, *, severity: str = "NOTICE") -> bytes:
    return message(b"N", _fields_body(error_fields(severity, sqlstate, message_text)))


#: ParameterStatus messages by (name, value): every greeting repeats the same dozen or so
#: (bounded: cleared when full, as application_name values are the client's to choose).
_STATUS_CACHE: dict[tuple[str, str], bytes] = {}
STATUS_CACHE_LIMIT = 4096


def parameter_status(name: str, value: str) -> bytes:
    key = (name, value)
    status = _STATUS_CACHE.get(key)
    if status is None:
        status = message(b"S", _cstr(name) + _cstr(value))
        if len(_STATUS_CACHE) >= STATUS_CACHE_LIMIT:
            _STATUS_CACHE.clear()
        _STATUS_CACHE[key] = status
    return status


def parameter_statuses(params: Mapping[str, str]) -> bytes:
    """A ParameterStatus message for each setting, in order."""
    return b"".join(parameter_status(k, v) for k, v in params.items())


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", _I32x2.pack(pid, secret))


_KEY_AND_READY = struct.Struct("!cIiicIB")


def key_and_ready(pid: int, secret: int, status: int) -> bytes:
    """BackendKeyData and ReadyForQuery(``status``), the end of every greeting, in one pack."""
    return _KEY_AND_READY.pack(b"K", 12, pid, secret, b"Z", 5, status)


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def authentication_ok() -> bytes:
    return message(b"R", _I32.pack(codes.AUTH_OK))


def authentication_cleartext() -> bytes:
    return message(b"R", _I32.pack(codes.AUTH_CLEARTEXT_PASSWORD))


def authentication_md5(salt: bytes) -> bytes:
    if len(salt) != 4:
        raise ValueError("md5 salt must be 4 bytes")
    return message(b"R", _I32.pack(codes.AUTH_MD5_PASSWORD) + salt)


def authentication_sasl(mechanisms: Sequence[str]) -> bytes:
    body = _I32.pack(codes.AUTH_SASL) + b"".join(_cstr(m) for m in mechanisms) + b"\0"
    return message(b"R", body)


def authentication_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _I32.pack(codes.AUTH_SASL_CONTINUE) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return message(b"R", _I32.pack(codes.AUTH_SASL_FINAL) + data)


def negotiate_protocol_version(newest_minor: int, unrecognized: Iterable[str]) -> bytes:
    """NegotiateProtocolVersion. The first Int32 is the full version ``3 << 16 | minor``, as
    PostgreSQL sends it (``PG_PROTOCOL_LATEST``); libpq 18 refuses a bare minor below 3.0."""
    names = list(unrecognized)
    version = codes.PROTOCOL_3_0 | newest_minor
    body = _I32x2.pack(version, len(names)) + b"".join(_cstr(n) for n in names)
    return message(b"v", body)


# --- frontend messages (pooler -> server) ----------------------------------------------------

def startup_message(params: Mapping[str, str], version: int = codes.PROTOCOL_3_0) -> bytes:
    body = _I32.pack(version) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!ii", 8, codes.SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!iiii", 16, codes.CANCEL_REQUEST_CODE, pid, secret)


def password_message(data: bytes) -> bytes:
    """PasswordMessage / SASLResponse: ``data`` is sent as is (callers add the NUL if needed)."""
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


def query(sql: str) -> bytes:
    return message(b"Q", _cstr(sql))


def terminate() -> bytes:
    return message(b"X")


def sync() -> bytes:
    return message(b"S")


def extended_query(sql: str, params: Sequence[str | None]) -> bytes:
    """Parse/Bind/Execute/Sync of ``sql`` as the unnamed statement, with text parameters
    (None is SQL NULL): values never go through quoting."""
    parse = message(b"P", b"\0" + _cstr(sql) + _I16.pack(0))
    values = [None if v is None else v.encode("utf-8", "surrogateescape") for v in params]
    encoded = b"".join(_I32.pack(-1) if v is None else _I32.pack(len(v)) + v for v in values)
    bind_body = (
        b"\0\0" + _I16.pack(0) + _I16.pack(len(values))
        + encoded + _I16.pack(0)
    )
    return parse + message(b"B", bind_body) + message(b"E", b"\0" + _I32.pack(0)) + sync()


def set_config_statement(settings: Sequence[tuple[str, str | None]]) -> bytes:
    """``SELECT set_config($1, $2, false), ...`` for the pairs, applied left to right. A value
    of None resets the setting to its session default (set_config with NULL is RESET)."""
    calls = ", ".join(f"set_config(${2 * i + 1}, ${2 * i + 2}, false)"
                      for i in range(len(settings)))
    params: list[str | None] = [s for pair in settings for s in pair]
    return extended_query("SELECT " + calls, params)


# --- parsers ---------------------------------------------------------------------------------

def parse_fields(body: bytes | memoryview) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body."""
    raw = bytes(body)
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(raw) and raw[pos] != 0:
        end = raw.find(b"\0", pos + 1)
        if end < 0:
            raise ValueError("unterminated field in error message")
        fields[chr(raw[pos])] = raw[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    if pos >= len(raw):
        raise ValueError("error message lacks its terminator")
    return fields


def error_sqlstate(body: bytes) -> str:
    """The SQLSTATE (field ``C``) of an ErrorResponse body; "" when it has none."""
    pos, n = 0, len(body)
    while pos < n and body[pos] != 0:
        end = body.find(b"\0", pos + 1)
        if end < 0:
            return ""
        if body[pos] == 67:  # 'C'
            return body[pos + 1:end].decode("ascii", "replace")
        pos = end + 1
    return ""


#: How far back ``error_sqlstate_ending_at`` looks for the start of an ErrorResponse.
_ERROR_LOOKBACK = 4096


def error_sqlstate_ending_at(data: bytes, end: int) -> str:
    """The SQLSTATE of an ErrorResponse that ends exactly at ``end`` in ``data`` (the chunk
    end, or just before a final ReadyForQuery), or "" when none does. Callers check the cheap
    hint first: an ErrorResponse ends with a non-empty field value and two NULs
    (``data[end-3] != 0``, ``data[end-2] == data[end-1] == 0``). The message start is found
    backwards: a type byte 'E' whose length reaches exactly to ``end`` (a ParameterStatus
    with an empty value, or binary row data, may end so too; they do not match)."""
    low = max(0, end - _ERROR_LOOKBACK)
    pos = data.rfind(b"E", low, end - 5)
    while pos >= 0:
        (length,) = _I32.unpack_from(data, pos + 1)
        if pos + 1 + length == end:
            return error_sqlstate(data[pos + 5:end])
        pos = data.rfind(b"E", low, pos)
    return ""


def fatal_ending_at(data: bytes, end: int) -> bool:
    """Does an ErrorResponse of severity FATAL or PANIC end exactly at ``end`` in ``data``?
    (What PostgreSQL sends before it closes a connection; same hint and search as
    ``error_sqlstate_ending_at``.)"""
    low = max(0, end - _ERROR_LOOKBACK)
    pos = data.rfind(b"E", low, end - 5)
    while pos >= 0:
        (length,) = _I32.unpack_from(data, pos + 1)
        if pos + 1 + length == end:
            body = data[pos + 5:end]
            return (body.startswith(b"SFATAL\0") or body.startswith(b"SPANIC\0")
                    or b"\0VFATAL\0" in body or b"\0VPANIC\0" in body)
        pos = data.rfind(b"E", low, pos)
    return False


def parse_parameter_status(body: bytes | memoryview) -> tuple[str, str]:
    raw = bytes(body)
    parts = raw.split(b"\0")
    if len(parts) != 3 or parts[2] != b"":
        raise ValueError("malformed ParameterStatus")
    return parts[0].decode("utf-8", "replace"), parts[1].decode("utf-8", "replace")


def parse_backend_key_data(body: bytes | memoryview) -> tuple[int, int]:
    if len(body) != 8:
        raise ValueError(f"BackendKeyData of unsupported length {len(body)}")
    pid, secret = _I32x2.unpack_from(body, 0)
    return int(pid), int(secret)


def parse_auth_code(body: bytes | memoryview) -> int:
    if len(body) < 4:
        raise ValueError("Authentication message too short")
    return int(_I32.unpack_from(body, 0)[0])


def parse_command_tag(body: bytes | memoryview) -> str:
    raw = bytes(body)
    if not raw.endswith(b"\0"):
        raise ValueError("CommandComplete without terminator")
    return raw[:-1].decode("utf-8", "replace")


def parse_data_row(body: bytes | memoryview) -> list[bytes | None]:
    """The column values of a DataRow body (None for SQL NULL)."""
    raw = bytes(body)
    if len(raw) < 2:
        raise ValueError("DataRow too short")
    (count,) = _I16.unpack_from(raw, 0)
    pos = 2
    values: list[bytes | None] = []
    for _ in range(count):
        if pos + 4 > len(raw):
            raise ValueError("DataRow truncated")
        (length,) = _I32.unpack_from(raw, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        if pos + length > len(raw):
            raise ValueError("DataRow truncated")
        values.append(raw[pos:pos + length])
        pos += length
    if pos != len(raw):
        raise ValueError("DataRow has trailing bytes")
    return values
