"""LISTEN / UNLISTEN statements in a simple-protocol Query, read the way PostgreSQL reads them.

The transaction pipeline answers a Query that holds nothing but LISTEN and UNLISTEN statements
itself (``net.notify``): ``parse_listen`` turns the Query's text into the list of operations, or
None when the text is anything else (it then goes to a server as before, and PostgreSQL says
what it says). Only what is certain is accepted; anything unusual is None:

* statements separated by ``;`` (empty ones allowed), whitespace ``[ \\t\\n\\r\\f]``, ``--``
  comments to the end of the line and nested ``/* */`` comments anywhere between tokens;
* keywords in any case; ``LISTEN name``, ``UNLISTEN name``, ``UNLISTEN *``;
* a name is an identifier folded to lower case, or a double-quoted one (``""`` inside) kept as
  written; PostgreSQL's reserved keywords (and the type/function-name ones) are not names
  unquoted (its grammar takes a ColId there: ``LISTEN select`` is a syntax error);
* names longer than 63 bytes are cut to 63, as PostgreSQL does (NAMEDATALEN - 1);
* ASCII only (a non-ASCII byte anywhere, ``U&"..."`` names, an empty quoted name, an
  unterminated quote or comment: None). The client's encoding then does not matter.

Pure: no I/O, no state.
"""

from __future__ import annotations

from typing import Final

#: Operations.
LISTEN: Final = 1
UNLISTEN: Final = 2

#: PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
MAX_NAME: Final = 63

#: Bytes that may begin a Query of LISTEN/UNLISTEN statements (first byte of the text):
#: the keywords' first letters, whitespace, comments, an empty statement. Anything else is
#: certainly not one (one lookup in the transaction pipeline's hot path).
FIRST_BYTES: Final = frozenset(b"lLuU \t\n\r\f-/;")

#: Keywords PostgreSQL does not take as a ColId (pg_get_keywords() catcode R and T, PG 15).
_RESERVED_WORDS: Final = (
    "all analyse analyze and any array as asc asymmetric authorization binary both case cast "
    "check collate collation column concurrently constraint create cross current_catalog "
    "current_date current_role current_schema current_time current_timestamp current_user "
    "default deferrable desc distinct do else end except false fetch for foreign freeze from "
    "full grant group having ilike in initially inner intersect into is isnull join lateral "
    "leading left like limit localtime localtimestamp natural not notnull null offset on only "
    "or order outer overlaps placing primary references returning right select session_user "
    "similar some symmetric table tablesample then to trailing true union unique user using "
    "variadic verbose when where window with")
RESERVED: Final = frozenset(_RESERVED_WORDS.split())

_SPACE: Final = frozenset(b" \t\n\r\f")
_KEYWORDS: Final = frozenset(["listen", "unlisten"])
_IDENT_START: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CONT: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789$")
_QUOTE: Final = 34  # "
_SEMI: Final = 59  # ;
_STAR: Final = 42  # *

Ops = list[tuple[int, str | None]]


def parse_listen(body: bytes) -> Ops | None:
    """The operations of a Query body (the text and its terminating NUL), in order: (LISTEN,
    name), (UNLISTEN, name) or (UNLISTEN, None) for ``UNLISTEN *``. None: the Query holds
    anything else (or nothing but whitespace and comments)."""
    if not body or body[-1] != 0:
        return None
    text = body[:-1]
    # the first keyword before any scan of the whole text: a long query that merely begins
    # with whitespace or a comment costs little
    first = _skip(text, 0, len(text))
    while 0 <= first < len(text) and text[first] == _SEMI:
        first = _skip(text, first + 1, len(text))
    if first < 0 or first >= len(text) or _word(text, first, len(text))[0] not in _KEYWORDS:
        return None
    if not text.isascii() or 0 in text:
        return None
    ops: Ops = []
    pos, n = 0, len(text)
    while True:
        pos = _skip(text, pos, n)
        if pos < 0:
            return None
        if pos >= n:
            break
        if text[pos] == _SEMI:
            pos += 1
            continue
        word, pos = _word(text, pos, n)
        if word == "listen":
            op = LISTEN
        elif word == "unlisten":
            op = UNLISTEN
        else:
            return None
        pos = _skip(text, pos, n)
        if pos < 0 or pos >= n:
            return None
        channel: str | None
        if text[pos] == _STAR and op == UNLISTEN:
            channel, pos = None, pos + 1
        else:
            channel, pos = _name(text, pos, n)
            if channel is None:
                return None
        ops.append((op, channel))
        pos = _skip(text, pos, n)
        if pos < 0:
            return None
        if pos < n:
            if text[pos] != _SEMI:
                return None
            pos += 1
    return ops or None


def _skip(text: bytes, pos: int, n: int) -> int:
    """Past whitespace and comments; -1 for an unterminated comment."""
    while pos < n:
        c = text[pos]
        if c in _SPACE:
            pos += 1
        elif c == 45 and pos + 1 < n and text[pos + 1] == 45:  # --
            while pos < n and text[pos] not in (10, 13):
                pos += 1
        elif c == 47 and pos + 1 < n and text[pos + 1] == 42:  # /* nested */
            depth = 1
            pos += 2
            while depth:
                if pos + 1 >= n:
                    return -1
                pair = text[pos:pos + 2]
                if pair == b"/*":
                    depth += 1
                    pos += 2
                elif pair == b"*/":
                    depth -= 1
                    pos += 2
                else:
                    pos += 1
        else:
            break
    return pos


def _word(text: bytes, pos: int, n: int) -> tuple[str, int]:
    """An unquoted identifier or keyword at ``pos``, lower-cased ("" if none)."""
    if text[pos] not in _IDENT_START:
        return "", pos
    end = pos + 1
    while end < n and text[end] in _IDENT_CONT:
        end += 1
    return text[pos:end].decode("ascii").lower(), end


def _name(text: bytes, pos: int, n: int) -> tuple[str | None, int]:
    """A channel name at ``pos``: quoted, or an identifier that is no reserved keyword."""
    if text[pos] == _QUOTE:
        parts: list[bytes] = []
        start = pos + 1
        while True:
            end = text.find(b'"', start)
            if end < 0:
                return None, pos
            parts.append(text[start:end])
            if end + 1 < n and text[end + 1] == _QUOTE:
                parts.append(b'"')
                start = end + 2
                continue
            name = b"".join(parts)
            if not name:
                return None, pos  # zero-length delimited identifier: PostgreSQL refuses it
            return name[:MAX_NAME].decode("ascii"), end + 1
    word, end = _word(text, pos, n)
    if not word or word in RESERVED:
        return None, pos
    return word[:MAX_NAME], end


def quote(channel: str) -> str:
    """``channel`` as a quoted identifier, for the statements pgcorral sends."""
    return '"' + channel.replace('"', '""') + '"'


def statements(op: int, channels: list[str]) -> bytes:
    """One Query text of ``LISTEN "a";LISTEN "b";...`` (or UNLISTEN), without the NUL."""
    keyword = "LISTEN " if op == LISTEN else "UNLISTEN "
    return ";".join(keyword + quote(c) for c in channels).encode()


# --- the extended protocol -------------------------------------------------------------------

_PARSE_COMPLETE: Final = b"1\0\0\0\x04"
_BIND_COMPLETE: Final = b"2\0\0\0\x04"
_NO_DATA: Final = b"n\0\0\0\x04"
_NO_PARAMETERS: Final = b"t\0\0\0\x06\0\0"
_NO_TYPES: Final = b"\0\0"  # a Parse's parameter type count, none


class Batch:
    """An extended-protocol batch that only prepares or runs one LISTEN/UNLISTEN statement
    (``extended_batch``)."""

    __slots__ = ("end", "ops", "prepared", "replies", "synced")

    def __init__(self, ops: Ops, replies: bytes, end: int,
                 prepared: tuple[bytes, bytes] | None, synced: bool) -> None:
        self.ops = ops  # empty: the batch only prepares a statement
        self.replies = replies  # up to (not including) CommandComplete / ReadyForQuery
        self.end = end  # bytes of the batch, its Sync (or Flush) included
        self.prepared = prepared  # (name, identity) of a named statement it prepared
        self.synced = synced  # ends with Sync (ReadyForQuery due), else with Flush


def _cstring(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    nul = data.find(b"\0", pos, end)
    if nul < 0:
        raise ValueError("unterminated string")
    return data[pos:nul], nul + 1


def extended_batch(data: bytes, names: dict[bytes, tuple[str, bytes]],
                   mapping: bool) -> Batch | None:
    """``data`` starts with Parse or Bind: the batch up to its Sync, when it holds nothing but
    ``Parse [Describe S] [Bind [Describe P] Execute] Sync`` of one LISTEN/UNLISTEN statement
    with no parameters (``Bind [Describe P] Execute Sync`` of a named statement in ``names``,
    the client's, whose text is one; or ``Parse name [Describe S] Sync|Flush``, which only
    prepares it, as asyncpg does, when pgcorral maps statements: ``mapping``). None: anything
    else, or not all there."""
    try:
        return _extended(data, names, mapping)
    except (ValueError, IndexError):
        return None


def _extended(data: bytes, names: dict[bytes, tuple[str, bytes]],
              mapping: bool) -> Batch | None:
    pos, n = 0, len(data)
    replies: list[bytes] = []
    ops: Ops | None = None  # of the statement the batch knows about
    parsed: bytes | None = None  # the name its Parse gave
    identity = b""
    bound = executed = False
    while pos + 5 <= n:
        type_ = data[pos]
        length = int.from_bytes(data[pos + 1:pos + 5], "big")
        end = pos + 1 + length
        if length < 4 or end > n:
            return None
        start = pos + 5
        if type_ == 80 and pos == 0:  # Parse, first
            name, at = _cstring(data, start, end)
            text, at = _cstring(data, at, end)
            if data[at:end] != _NO_TYPES:
                return None
            ops = parse_listen(text + b"\0")
            if ops is None or len(ops) != 1 or (name and (not mapping or name in names)):
                return None
            parsed, identity = name, data[at - len(text) - 1:end]
            replies.append(_PARSE_COMPLETE)
        elif type_ == 66 and not bound:  # Bind
            portal, at = _cstring(data, start, end)
            stmt, at = _cstring(data, at, end)
            formats = int.from_bytes(data[at:at + 2], "big")
            at += 2 + 2 * formats
            if portal or at + 2 > end or data[at:at + 2] != b"\0\0":  # no parameters
                return None
            if stmt != parsed:
                if parsed is not None or not mapping or stmt not in names:
                    return None
                known = names[stmt][1]  # (pooler name, identity)
                ops = parse_listen(known[:known.index(b"\0") + 1])
                if ops is None or len(ops) != 1:
                    return None
            bound = True
            replies.append(_BIND_COMPLETE)
        elif type_ == 68:  # Describe
            kind = data[start]
            target, _ = _cstring(data, start + 1, end)
            if kind == 83 and not bound and parsed is not None and target == parsed:
                replies.append(_NO_PARAMETERS + _NO_DATA)
            elif kind == 80 and bound and not executed and not target:
                replies.append(_NO_DATA)
            else:
                return None
        elif type_ == 69 and bound and not executed:  # Execute
            portal, _ = _cstring(data, start, end)
            if portal:
                return None
            executed = True
        elif type_ == 83:  # Sync: the end of the batch
            if ops is None or bound != executed or (not bound and not parsed):
                return None
            prepared = (parsed, identity) if parsed else None
            return Batch(ops if executed else [], b"".join(replies), end, prepared, True)
        elif type_ == 72:  # Flush: the end of a batch that only prepares a named statement
            if bound or not parsed:
                return None
            return Batch([], b"".join(replies), end, (parsed, identity), False)
        else:
            return None
        pos = end
    return None
