"""Session state in transaction mode: the cheap look at a client's SQL, and the probe that says
what a server connection really holds.

Two steps, so that queries that touch no session state cost almost nothing:

1. ``may_touch_state(text)``: a byte-level pre-check of a Query's or Parse's text. True when
   some statement in it starts with a keyword that may create or remove state that outlives a
   transaction (SET, RESET, PREPARE, DEALLOCATE, DECLARE, CLOSE, DISCARD, LISTEN, UNLISTEN,
   CREATE ... TEMP, DROP), or when it names a function that does (``advisory``, ``set_config``).
   False positives cost one probe; a false negative is a function that takes an advisory lock
   or sets a setting inside its body without naming it, which no text check can see
   (docs/TRANSACTION.md lists it).
2. ``PROBE``: after the transaction that the pre-check flagged has ended (ReadyForQuery 'I'),
   pgcorral asks the server connection itself (one round trip) what it holds: session advisory
   locks, temporary relations, WITH HOLD cursors, listened channels, SQL-level prepared
   statements and the settings made in the session. ``SessionState.from_rows`` reads the
   answer; ``net.transaction`` then pins the client to the connection or carries the state.

Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Final, NamedTuple

#: Statement keywords (lower case, followed by a non-identifier byte) that may create or
#: remove session state.
_HEADS: Final = (b"set", b"reset", b"prepare", b"deallocate", b"declare", b"close", b"discard",
                 b"listen", b"unlisten", b"drop")
#: Function names (lower case, anywhere in the text) that take or release session state.
_NAMES: Final = (b"advisory", b"set_config")
#: Bytes that may start one of ``_HEADS`` (either case), or CREATE (then TEMP is looked for).
_FIRST: Final = frozenset(b"sSrRpPdDcClLuU")
_IDENT: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")
_SPACE: Final = b" \t\n\r\x0b\x0c"


def _head_hits(low: bytes) -> bool:
    """Does the statement text ``low`` (lower case, leading blanks gone) start with one of the
    keywords (or CREATE with TEMP somewhere after it)?"""
    if low.startswith(b"create"):
        return b"temp" in low
    for head in _HEADS:
        if low.startswith(head) and (len(low) == len(head) or low[len(head)] not in _IDENT):
            return True
    return False


def _strip_comments(text: bytes) -> bytes:
    """Leading blanks and comments off (a statement may start after ``/* ... */`` or ``--``)."""
    while True:
        text = text.lstrip(_SPACE)
        if text.startswith(b"--"):
            end = text.find(b"\n")
            text = b"" if end < 0 else text[end + 1:]
        elif text.startswith(b"/*"):
            end = text.find(b"*/")
            text = b"" if end < 0 else text[end + 2:]
        else:
            return text


def may_touch_state(text: bytes) -> bool:
    """The pre-check (see the module docstring). ``text`` is the SQL, maybe with the trailing
    NUL of its message. Cheap for the common statements: a SELECT/INSERT/UPDATE/DELETE without
    ``;`` costs a lower-casing and two substring searches."""
    low = text.lower()
    for name in _NAMES:
        if name in low:
            return True
    start = _strip_comments(low)
    if start and start[0] in _FIRST and _head_hits(start):
        return True
    if b";" not in low:
        return False
    # several statements (or a ';' inside a literal: a false positive costs only a probe)
    for part in low.split(b";")[1:]:
        part = _strip_comments(part)
        if part and part[0] in _FIRST and _head_hits(part):
            return True
    return False


#: What a server connection holds that outlives a transaction, in one round trip. Each column
#: is text; the settings and statements come as JSON (NULL when there are none).
PROBE: Final = (
    "SELECT"
    " (SELECT count(*) FROM pg_catalog.pg_locks"
    "   WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()),"
    " (SELECT count(*) FROM pg_catalog.pg_class"
    "   WHERE relnamespace = pg_catalog.pg_my_temp_schema()),"
    " (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable),"
    " (SELECT count(*) FROM pg_catalog.pg_listening_channels()),"
    " (SELECT pg_catalog.json_object_agg(name, pg_catalog.current_setting(name))"
    "   FROM pg_catalog.pg_settings WHERE source = 'session'),"
    " (SELECT pg_catalog.json_object_agg(name, statement)"
    "   FROM pg_catalog.pg_prepared_statements WHERE from_sql),"
    # SET ROLE and SET SESSION AUTHORIZATION are not in pg_settings
    " pg_catalog.current_setting('role'), session_user")

#: Why a client is pinned to its server connection (the words the admin views show).
PIN_LOCK: Final = "advisory lock"
PIN_TEMP: Final = "temporary table"
PIN_CURSOR: Final = "cursor WITH HOLD"
PIN_LISTEN: Final = "LISTEN"
PIN_PREPARE: Final = "PREPARE in a multi-statement query"
PIN_AUTHORIZATION: Final = "SET SESSION AUTHORIZATION"


def single_prepare(statement: str) -> bool:
    """Can this SQL-level prepared statement's source text be run again on another connection
    as it is? Only when it is one PREPARE and nothing else (pg_prepared_statements shows the
    whole query string the client sent, which may hold other statements)."""
    text = statement.strip().rstrip(";").rstrip()
    return text[:7].lower() == "prepare" and ";" not in text


class SessionState(NamedTuple):
    """What ``PROBE`` found on one server connection."""

    locks: int
    temps: int
    cursors: int
    channels: int
    settings: dict[str, str]  # lower-case name -> current value, for the session-set ones
    prepared: dict[str, str]  # SQL-level prepared statement name -> its source text
    role: str  # SET ROLE's role, "none" when not set
    session_user: str  # differs from the login user after SET SESSION AUTHORIZATION


def _count(value: bytes | None) -> int:
    return int(value) if value is not None else 0


def _object(value: bytes | None) -> dict[str, str]:
    if value is None:
        return {}
    loaded = json.loads(value.decode("utf-8"))
    return {str(k): str(v) for k, v in loaded.items()}


def probe_result(row: list[bytes | None]) -> SessionState:
    """The ``SessionState`` of ``PROBE``'s one row."""
    return SessionState(_count(row[0]), _count(row[1]), _count(row[2]), _count(row[3]),
                        {k.lower(): v for k, v in _object(row[4]).items()}, _object(row[5]),
                        (row[6] or b"none").decode("utf-8"), (row[7] or b"").decode("utf-8"))


def pins(state: SessionState, login_user: str) -> list[str]:
    """The reasons to keep the client on the probed connection (empty: it may go)."""
    reasons = []
    if state.session_user != login_user:
        reasons.append(PIN_AUTHORIZATION)
    if state.locks:
        reasons.append(PIN_LOCK)
    if state.temps:
        reasons.append(PIN_TEMP)
    if state.cursors:
        reasons.append(PIN_CURSOR)
    if state.channels:
        reasons.append(PIN_LISTEN)
    if any(not single_prepare(text) for text in state.prepared.values()):
        reasons.append(PIN_PREPARE)
    return reasons
