"""protocol.listen: which Queries are only LISTEN/UNLISTEN, and on which channels."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcorral.protocol.listen import (
    FIRST_BYTES,
    LISTEN,
    MAX_NAME,
    RESERVED,
    UNLISTEN,
    extended_batch,
    parse_listen,
    quote,
    statements,
)


def parse(text: str | bytes) -> list[tuple[int, str | None]] | None:
    raw = text.encode() if isinstance(text, str) else text
    return parse_listen(raw + b"\0")


@pytest.mark.parametrize(("text", "ops"), [
    ("LISTEN ch", [(LISTEN, "ch")]),
    ("listen CH", [(LISTEN, "ch")]),
    ('LiStEn "Quoted"', [(LISTEN, "Quoted")]),
    ("UNLISTEN ch", [(UNLISTEN, "ch")]),
    ("unlisten *", [(UNLISTEN, None)]),
    ("UNLISTEN*", [(UNLISTEN, None)]),
    ('LISTEN"x"', [(LISTEN, "x")]),
    ("LISTEN a; LISTEN b;UNLISTEN a", [(LISTEN, "a"), (LISTEN, "b"), (UNLISTEN, "a")]),
    (";; LISTEN a ;;", [(LISTEN, "a")]),
    ("  -- comment\n LISTEN a -- trailing", [(LISTEN, "a")]),
    ("/* a /* nested */ comment */ LISTEN/**/a/* */;", [(LISTEN, "a")]),
    ("\t\r\n\fLISTEN\ta\n", [(LISTEN, "a")]),
    ('LISTEN "a""b"', [(LISTEN, 'a"b')]),
    ('LISTEN "with space;"', [(LISTEN, "with space;")]),
    ("LISTEN a$1_b", [(LISTEN, "a$1_b")]),
    ("LISTEN _x", [(LISTEN, "_x")]),
    ('LISTEN "select"', [(LISTEN, "select")]),
    ("LISTEN listen", [(LISTEN, "listen")]),  # unreserved keywords are names
    ("LISTEN notify", [(LISTEN, "notify")]),
    ("LISTEN " + "A" * 70, [(LISTEN, "a" * MAX_NAME)]),
    ('LISTEN "' + "B" * 70 + '"', [(LISTEN, "B" * MAX_NAME)]),
])
def test_accepted(text: str, ops: list[tuple[int, str | None]]) -> None:
    assert parse(text) == ops
    assert text.encode()[0] in FIRST_BYTES  # the hot path's pre-check lets it through


@pytest.mark.parametrize("text", [
    "", "   ", "-- only a comment", ";", ";;",
    "SELECT 1", "LISTEN", "LISTEN ;", "LISTEN *", "LISTEN a b", "LISTEN a, b",
    "LISTEN select", "LISTEN USER", "LISTEN verbose", "UNLISTEN all",
    'LISTEN ""', 'LISTEN "unterminated', "LISTEN a /* unterminated", 'LISTEN a"b"',
    "LISTEN 1a", "LISTEN $a", 'LISTEN U&"a"', "LISTEN a; SELECT 1", "NOTIFY a",
    "LISTEN a-b", "LISTEN a.b", '"LISTEN" a', "LISTENa", "LISTEN a\0", "LISTEN é",
    'LISTEN "é"', "UNLISTEN * *", "listen a; listen",
])
def test_refused(text: str) -> None:
    assert parse(text) is None


def test_body_must_end_with_nul() -> None:
    assert parse_listen(b"LISTEN a") is None
    assert parse_listen(b"") is None


def test_quote_and_statements_round_trip() -> None:
    names = ["a", 'we"ird', "Mixed Case", "x" * MAX_NAME]
    text = statements(LISTEN, names)
    assert parse(text) == [(LISTEN, n) for n in names]
    assert parse(statements(UNLISTEN, names)) == [(UNLISTEN, n) for n in names]
    assert quote('a"') == '"a"""'


def test_first_bytes_of_other_queries_cost_nothing() -> None:
    # the pre-check refuses the usual first letters of everything else
    for text in ("SELECT 1", "select 1", "BEGIN", "insert", "with", "(select 1)", "COMMIT"):
        assert text.encode()[0] not in FIRST_BYTES


# --- property tests ------------------------------------------------------------------------

_ident = st.from_regex(r"[a-z_][a-z0-9_$]{0,70}", fullmatch=True).filter(
    lambda s: s not in RESERVED)
_quoted = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=70)
_gap = st.lists(st.sampled_from([" ", "\t", "\n", "/* c */", "/* a /* b */ c */", "-- x\n"]),
                max_size=3).map("".join)
_sep = st.lists(st.sampled_from([" ", "\n", "/**/"]), min_size=1, max_size=2).map("".join)


def _case(word: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c for c, f in zip(word, flips + [False] * len(word),
                                                          strict=False))


@st.composite
def _statement(draw: st.DrawFn) -> tuple[str, tuple[int, str | None]]:
    op = draw(st.sampled_from([LISTEN, UNLISTEN]))
    keyword = _case("listen" if op == LISTEN else "unlisten",
                    draw(st.lists(st.booleans(), max_size=8)))
    kind = draw(st.sampled_from(["ident", "quoted", "star"] if op == UNLISTEN
                                else ["ident", "quoted"]))
    if kind == "star":
        return f"{keyword}{draw(_gap)}*", (op, None)
    if kind == "ident":
        name = draw(_ident)
        written = _case(name, draw(st.lists(st.booleans(), max_size=70)))
        return f"{keyword}{draw(_sep)}{written}", (op, name[:MAX_NAME])
    name = draw(_quoted)
    return f"{keyword}{draw(_gap)}{quote(name)}", (op, name[:MAX_NAME])


@given(st.lists(st.tuples(_statement(), _gap, _gap), min_size=1, max_size=6),
       st.booleans())
def test_generated_statements(parts: list[tuple[tuple[str, tuple[int, str | None]], str, str]],
                              trailing: bool) -> None:
    text = ";".join(f"{before}{stmt}{after}" for (stmt, _), before, after in parts)
    if trailing:
        text += ";"
    assert parse(text) == [op for (_, op), _, _ in parts]


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_refuse(data: bytes) -> None:
    ops = parse_listen(data + b"\0")
    assert ops is None or all(op in (LISTEN, UNLISTEN) for op, _ in ops)


@given(st.lists(_statement(), min_size=1, max_size=4), st.integers(min_value=0, max_value=200))
def test_cut_short_is_never_wrong(stmts: list[tuple[str, tuple[int, str | None]]],
                                  cut: int) -> None:
    """A prefix of a valid text parses to a prefix-compatible answer or None, never raises."""
    text = ";".join(s for s, _ in stmts)
    ops = parse(text[:cut])
    assert ops is None or len(ops) <= len(stmts)


# --- extended protocol ---------------------------------------------------------------------


def _msg(type_: bytes, body: bytes) -> bytes:
    return type_ + struct.pack("!I", len(body) + 4) + body


def _parse_msg(name: bytes, text: bytes, types: bytes = b"\0\0") -> bytes:
    return _msg(b"P", name + b"\0" + text + b"\0" + types)


def _bind(stmt: bytes, formats: bytes = b"\0\0", params: bytes = b"\0\0",
          results: bytes = b"\0\0") -> bytes:
    return _msg(b"B", b"\0" + stmt + b"\0" + formats + params + results)


DESCRIBE_PORTAL = _msg(b"D", b"P\0")
EXECUTE = _msg(b"E", b"\0\0\0\0\0")
SYNC = _msg(b"S", b"")
FLUSH = _msg(b"H", b"")
STMT = b"__asyncpg_stmt_1__"


def test_asyncpg_prepare_then_bind_execute() -> None:
    """asyncpg's add_listener: Parse/Describe S/Flush, then Bind (a binary format code, no
    parameters)/Execute/Sync."""
    prepare = _parse_msg(STMT, b'LISTEN "achan"') + _msg(b"D", b"S" + STMT + b"\0") + FLUSH
    batch = extended_batch(prepare + b"more", {}, mapping=True)
    assert batch is not None
    assert (batch.ops, batch.end, batch.synced) == ([], len(prepare), False)
    assert batch.prepared == (STMT, b'LISTEN "achan"\0\0\0')
    assert batch.replies == b"1\0\0\0\x04" + b"t\0\0\0\x06\0\0" + b"n\0\0\0\x04"
    assert extended_batch(prepare, {}, mapping=False) is None  # statements are not mapped
    assert extended_batch(prepare, {STMT: ("pgc_1", b"x")}, mapping=True) is None  # 42P05

    names = {STMT: ("pgc_1", batch.prepared[1])}  # (pooler name, identity)
    run = _bind(STMT, formats=b"\0\1\0\1", results=b"\0\1\0\1") + EXECUTE + SYNC
    batch = extended_batch(run, names, mapping=True)
    assert batch is not None
    assert (batch.ops, batch.end, batch.synced, batch.prepared) == (
        [(LISTEN, "achan")], len(run), True, None)
    assert batch.replies == b"2\0\0\0\x04"


def test_unnamed_parse_bind_describe_execute_sync() -> None:
    """libpq's PQsendQueryParams (psycopg with binary results)."""
    data = (_parse_msg(b"", b"UNLISTEN *") + _bind(b"") + DESCRIBE_PORTAL + EXECUTE + SYNC)
    batch = extended_batch(data, {}, mapping=False)
    assert batch is not None
    assert batch.ops == [(UNLISTEN, None)] and batch.synced and batch.prepared is None
    assert batch.replies == b"1\0\0\0\x04" + b"2\0\0\0\x04" + b"n\0\0\0\x04"


@pytest.mark.parametrize("data", [
    _parse_msg(b"", b"SELECT 1") + _bind(b"") + EXECUTE + SYNC,  # not a LISTEN
    _parse_msg(b"", b"LISTEN a; LISTEN b") + _bind(b"") + EXECUTE + SYNC,  # two statements
    _parse_msg(b"", b"LISTEN a", b"\0\1\0\0\0\x17") + _bind(b"") + EXECUTE + SYNC,  # a type
    _parse_msg(b"", b"LISTEN a") + _bind(b"", params=b"\0\1\0\0\0\1x") + EXECUTE + SYNC,
    _parse_msg(b"", b"LISTEN a") + _bind(b"") + EXECUTE,  # no Sync yet
    _parse_msg(b"", b"LISTEN a") + _bind(b"") + SYNC,  # bound, never executed
    _parse_msg(b"", b"LISTEN a") + SYNC,  # an unnamed statement kept past its Sync
    _parse_msg(b"", b"LISTEN a") + FLUSH,
    _parse_msg(b"", b"LISTEN a") + _bind(b"") + EXECUTE + _msg(b"Q", b"x\0") + SYNC,
    _parse_msg(b"", b"LISTEN a") + _bind(b"other") + EXECUTE + SYNC,
    _bind(STMT) + EXECUTE + SYNC,  # a name the client does not have
    _parse_msg(b"", b"LISTEN a") + _bind(b"") + EXECUTE + EXECUTE + SYNC,
    b"P\0\0\0\x03",  # a bad length
])
def test_extended_refused(data: bytes) -> None:
    assert extended_batch(data, {}, mapping=True) is None


@given(st.binary(max_size=120))
def test_extended_any_bytes(data: bytes) -> None:
    batch = extended_batch(b"P" + data, {STMT: b"LISTEN a\0\0\0"}, mapping=True)
    assert batch is None or batch.end <= len(data) + 1
