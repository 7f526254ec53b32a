"""protocol.listen: which Queries are only LISTEN/UNLISTEN, and on which channels."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgcorral.protocol.listen import (
    FIRST_BYTES,
    LISTEN,
    MAX_NAME,
    RESERVED,
    UNLISTEN,
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
