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
import re
from typing import Final, NamedTuple

from pgcorral.protocol.messages import query as query_message

#: Statement keywords (lower case, followed by a non-identifier byte) that may create or
#: remove session state, by their first byte. CREATE counts when TEMP follows somewhere.
_HEADS: Final = {
    ord("s"): (b"set",), ord("r"): (b"reset",), ord("p"): (b"prepare",),
    ord("d"): (b"deallocate", b"declare", b"discard", b"drop"), ord("c"): (b"close", b"create"),
    ord("l"): (b"listen",), ord("u"): (b"unlisten",)}
#: 1 for the bytes that may start one of ``_HEADS`` (either case), 2 for blanks, 3 for the
#: bytes that may start a comment.
_CLASS: Final = bytes(1 if c in b"srpdcluSRPDCLU" else 2 if c in b" \t\n\r\x0b\x0c" else
                      3 if c in b"/-" else 0 for c in range(256))
#: 1 for the bytes an identifier may continue with (either case)
_IDENT: Final = bytes(1 if c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                      b"0123456789_$" or c >= 128 else 0 for c in range(256))


def _word_at(text: bytes, pos: int, word: bytes) -> bool:
    """Is the keyword ``word`` (lower case letters) at ``pos``, in any case, as a whole word?
    (No copy: compiled, a loop over a few bytes.)"""
    n = len(word)
    end = pos + n
    if end > len(text):
        return False
    for i in range(n):
        if text[pos + i] | 32 != word[i]:
            return False
    return end == len(text) or not _IDENT[text[end]]


def _statement_at(text: bytes, pos: int) -> bool:
    """Does a statement that may touch session state start at ``pos`` of ``text``, after
    blanks and comments?"""
    n = len(text)
    while pos < n:
        first = text[pos]
        kind = _CLASS[first]
        if kind == 2:
            pos += 1
        elif kind == 3:
            if text.startswith(b"--", pos):
                end = text.find(b"\n", pos)
                pos = n if end < 0 else end + 1
            elif text.startswith(b"/*", pos):
                end = text.find(b"*/", pos)
                pos = n if end < 0 else end + 2
            else:
                return False
        elif kind == 1:
            for word in _HEADS[first | 32]:
                if _word_at(text, pos, word):
                    return word != b"create" or text.lower().find(b"temp", pos + 6) >= 0
            return False
        else:
            return False
    return False


def may_touch_state(text: bytes, start: int = 0) -> bool:
    """The pre-check (see the module docstring). ``text[start:]`` is the SQL, maybe with the
    trailing NUL of its message (a whole Query message with ``start`` 5: no copy of the body
    is made). Cheap for the common statements: a look at the first word (and the one after
    each ``;``); the function names only where a ``(`` is (a lower-cased copy and three
    ``find``: not ``in``, which goes through the buffer protocol at twice the cost)."""
    if _statement_at(text, start):
        return True
    # several statements (or a ';' inside a literal: a false positive costs only a probe)
    semi = text.find(b";", start)
    while semi >= 0:
        if _statement_at(text, semi + 1):
            return True
        semi = text.find(b";", semi + 1)
    if text.find(b"(", start) < 0:
        return False  # no function is called
    low = text.lower()
    return (low.find(b"advisory", start) >= 0 or low.find(b"set_config", start) >= 0
            or low.find(b"_backend", start) >= 0)  # (pg_cancel/terminate_backend)


#: The first virtual pid (net.cancels.VIRTUAL_PID_BASE): no Linux pid is this large.
_VIRTUAL_PID_BASE: Final = 1 << 22
_SIGNAL_CALL: Final = re.compile(
    rb"(?i)pg_(cancel|terminate)_backend\s*\(\s*\(?\s*([0-9]{7,10})\b")


def vpid_refusal(body: bytes) -> bytes:
    """A Query that makes PostgreSQL refuse the client's ``pg_cancel_backend(N)`` or
    ``pg_terminate_backend(N)`` of a virtual pid (one pgcorral gave a client in BackendKeyData:
    no backend has it), or b"" when ``body`` (a Query body) has none.

    Refused, not translated: the call may sit anywhere in a statement, the client it names may
    be served by another worker process, and PostgreSQL's permission rule (same role or
    pg_signal_backend) cannot be checked by pgcorral. The error comes from PostgreSQL (a DO
    block that raises it), so an open transaction is aborted exactly as by any error. The
    cancel protocol (libpq's PQcancel, psycopg's ``cancel()``, asyncpg's timeouts) works with
    virtual pids; the admin console's KILL_CLIENT ends a client."""
    for match in _SIGNAL_CALL.finditer(body):
        pid = int(match.group(2))
        if pid >= _VIRTUAL_PID_BASE:
            what = match.group(1).decode()
            message = (f"pg_{what}_backend({pid}): {pid} is a virtual pid that pgcorral gave "
                       "a client in transaction pooling, not a PostgreSQL backend")
            hint = ("Use the cancel protocol (PQcancel, conn.cancel()) to cancel that client's "
                    "query, or KILL_CLIENT in pgcorral's admin console to end it.")
            message, hint = message.replace("'", "''"), hint.replace("'", "''")
            return query_message(
                "DO $pgcorral$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = "
                f"'{message}', HINT = '{hint}'; END $pgcorral$")
    return b""


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
    " pg_catalog.current_setting('role'), session_user,"
    # nor are custom settings (``app.user_id``): the names the client's SQL showed ($1)
    " (SELECT pg_catalog.json_object_agg(n, pg_catalog.current_setting(n, true))"
    "   FROM pg_catalog.unnest($1::pg_catalog.text[]) AS n)")

#: Custom (two-part) setting names in SET, RESET and set_config('...') of a statement text.
_CUSTOM: Final = re.compile(
    rb"(?:^|;)\s*(?:set|reset)\s+(?:session\s+|local\s+)?([a-z_][a-z0-9_$]*\.[a-z0-9_$.]+)"
    rb"|set_config\s*\(\s*'([a-z_][a-z0-9_$]*\.[a-z0-9_$.]+)'")
#: Custom setting names kept per client (a client that names more is not followed beyond).
CUSTOM_MAX: Final = 1000


def custom_setting_names(text: bytes) -> list[bytes]:
    """The custom setting names (``app.user_id``) a statement text sets or resets: PostgreSQL
    lists them nowhere (not in pg_settings), so the probe asks for each by name."""
    return [a or b for a, b in _CUSTOM.findall(text.lower())]


def names_array(names: set[bytes]) -> str:
    """A text[] literal of the (identifier-shaped, so unquoted) names."""
    return "{" + ",".join(sorted(n.decode("ascii", "replace") for n in names)) + "}"

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
    custom: dict[str, str]  # custom settings with a value (reset ones read "")


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
                        (row[6] or b"none").decode("utf-8"), (row[7] or b"").decode("utf-8"),
                        _custom(row[8] if len(row) > 8 else None))


def _custom(value: bytes | None) -> dict[str, str]:
    if value is None:
        return {}
    loaded = json.loads(value.decode("utf-8"))
    return {str(k): v for k, v in loaded.items() if isinstance(v, str) and v}


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
