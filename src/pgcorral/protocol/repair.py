"""Error-driven repair of prepared statements made stale by DDL pgcorral did not see.

It owns ``stale_error`` (is an ErrorResponse PostgreSQL's answer to a Bind of a statement
prepared before a schema change?) and ``repair`` (what to do about it on one server
connection). Pure: no I/O, no clock. ``net.txserver`` calls ``repair`` from the router's
``on_bind_error`` and writes the retry it returns.

What PostgreSQL 15 sends, all at the Bind (the batch's first reply), measured with a real
server, statement prepared before the change on the same backend:

- column type changed, column added (``SELECT *``), table dropped and made again with other
  columns: 0A000 cached plan must not change result type;
- table dropped: 42P01 relation "t" does not exist;
- enum or composite type dropped (and made again): XX000 cache lookup failed for type N;
- domain dropped and made again: 42704 type with OID N does not exist;
- table dropped and made again with the same columns: nothing (PostgreSQL plans again).

A Describe 'S' of such a statement fails the same way (not repaired: the error passes).

The decision (``repair``), for the client's Bind of pooler name N that failed so:

- N is retired (``StatementRegistry.retire``): its identity gets a new name, so no client's
  Bind or Parse reaches N again, on any server connection; here N is closed.
- **Retried** when the batch ran outside an explicit transaction and nothing of it had taken
  effect: the last ReadyForQuery said 'I' (status before the batch), the batch holds nothing
  but Parse, Describe, Close and Flush before this Bind (no Bind, no Execute: no row reached
  the client, no portal or implicit transaction is lost), its Sync was sent and nothing after
  it, and the connection has not retried since it was last idle (once per batch). The retry,
  written at once (PostgreSQL is skipping to the Sync already sent): Close N, Parse of the new
  name (replies dropped), then the batch again from the Bind, with N renamed. A step in front
  of the plan drops the error and its ReadyForQuery; the batch's own steps are still in the
  plan and are answered by the retry.
- For 0A000 only when the batch asks for the new row description (a Describe after the
  Bind, as libpq's PQexecPrepared and psycopg send): a driver that sends Bind/Execute alone
  (asyncpg) decodes rows by the description it cached, and would read the new column type
  with the old decoder. It gets the error instead, as from PostgreSQL; asyncpg prepares the
  statement again itself and retries outside a transaction (its InvalidCachedStatementError
  handling), which then meets the new name.
- Otherwise (inside a transaction, rows already sent, pipelined batches behind it) the error
  passes as PostgreSQL sent it; N is retired and closed here at the next batch start
  (``ServerStatements.pending_close``), as evictions are. After a lookup error the client's
  statements on N move to the new name (their next use works). After 0A000 they stay on N and
  keep failing, as on the client's own connection, where its driver holds the old row
  description: N is *reshaped* (``StatementRegistry.reshaped``), and a Bind of a reshaped name
  on a connection that lacks it is sent without preparing it again, so the server answers
  26000, which becomes 0A000 here (``RESHAPED``), or a retry where one is allowed (then the
  client's statement moves: it gets the new row description with the rows).

The batch is found in what was written to the server since the plan was last idle
(``ReplyPlan.sent``, kept by ``net.txserver``): ``done`` ReadyForQuery messages passed since,
so the batch starts after ``done`` Sync/Query/FunctionCall messages; which of its Binds failed
is told by the Bind steps still in the plan up to its Sync.
"""

from __future__ import annotations

import struct
from typing import Final

from pgcorral.protocol import codes
from pgcorral.protocol.messages import error_sqlstate, message
from pgcorral.protocol.replyplan import (
    BIND_ENDS,
    CAPTURE_ON,
    CAPTURE_SUSPENDED,
    CLOSE_ENDS,
    ReplyPlan,
    ReplyStep,
    own_query_step,
)
from pgcorral.protocol.rewrite import _ensure, build_bind, build_target, parse_bind
from pgcorral.protocol.statements import NAME_PREFIX, ClientStatements, StatementRegistry

_header: Final = struct.Struct("!BI").unpack_from
_ENDERS: Final = frozenset([codes.SYNC, codes.QUERY, codes.FUNCTION_CALL])
#: what a repaired batch may hold (no COPY, no Query)
_BATCH_TYPES: Final = frozenset([codes.PARSE, codes.BIND, codes.DESCRIBE, codes.EXECUTE,
                                 codes.CLOSE, codes.FLUSH, codes.SYNC])
#: what may come before the failing Bind in a repaired batch (nothing with an effect that the
#: error undid)
_BEFORE: Final = frozenset([codes.PARSE, codes.DESCRIBE, codes.CLOSE, codes.FLUSH])
_STATES: Final = frozenset(["0A000", "42P01", "42704"])
_LOOKUP: Final = b"cache lookup failed for type"
_NAME: Final = NAME_PREFIX.encode()
#: PostgreSQL's answer to a Bind of a statement whose result type changed, field by field as
#: PostgreSQL 15 sends it (asyncpg tells InvalidCachedStatementError by the routine, R)
RESHAPED: Final = message(b"E", b"SERROR\0VERROR\0C0A000\0Mcached plan must not change "
                          b"result type\0Fplancache.c\0L722\0RRevalidateCachedQuery\0\0")


def stale_error(body: bytes) -> str:
    """The SQLSTATE of an ErrorResponse body if it is one a schema change gives a statement
    prepared before it (0A000, 42P01, 42704, XX000 "cache lookup failed for type"), else ""."""
    state = error_sqlstate(body)
    if state in _STATES or (state == "XX000" and _LOOKUP in body):
        return state
    return ""


def _messages(data: bytes) -> list[tuple[int, int, int]]:
    """``(type, start, end)`` of each whole message in ``data``."""
    out: list[tuple[int, int, int]] = []
    pos, n = 0, len(data)
    while pos + 5 <= n:
        type_, length = _header(data, pos)
        end = pos + 1 + length
        if length < 4 or end > n:
            break
        out.append((type_, pos, end))
        pos = end
    return out


def _binds_left(plan: ReplyPlan) -> tuple[int, bool]:
    """Client Bind steps in the plan up to the first Sync step (the failing one first), and
    whether that Sync step is there."""
    count = 0
    for step in plan.steps:
        if step.sync:
            return count, True
        if step.ends is BIND_ENDS and not step.drop:
            count += 1
    return count, False


def repair(plan: ReplyPlan, registry: StatementRegistry, client: ClientStatements | None,
           body: bytes, status: int, done: int) -> bytes | None:
    """A client's Bind (the plan's head step) failed with the ErrorResponse ``body``;
    ``client``: the linked client's statements; ``status``: of the last ReadyForQuery;
    ``done``: ReadyForQuery messages passed since the capture started. The retry to write to
    the server (the plan is ready for its replies), or None: the error passes (a stale
    statement is retired all the same, and the client's statements on it moved)."""
    state = stale_error(body)
    unprepared = not state and error_sqlstate(body) == "26000"  # a reshaped one, maybe
    if not (state or unprepared) or plan.capture != CAPTURE_ON or not plan.sent:
        return None  # (suspended: a retry is in flight, ``sent`` is not what the server runs)
    data = b"".join(plan.sent) if len(plan.sent) > 1 else plan.sent[0]
    messages = _messages(data)
    first = 0  # the failing batch: after ``done`` batch ends
    while done > 0 and first < len(messages):
        if messages[first][0] in _ENDERS:
            done -= 1
        first += 1
    last = first  # its Sync (or the end of what was sent)
    while last < len(messages) and messages[last][0] not in _ENDERS:
        last += 1
    batch = messages[first:last + 1]
    binds = [i for i, m in enumerate(batch) if m[0] == codes.BIND]
    left, synced = _binds_left(plan)
    if left < 1 or left > len(binds):
        return None  # not what was sent: leave it
    at = binds[-left]
    _, start, end = batch[at]
    portal, name, rest = parse_bind(data[start + 5:end])
    if not name.startswith(_NAME):
        return None
    failed = name.decode()
    if unprepared:
        if failed not in registry.reshaped:
            return None  # (PostgreSQL's own 26000)
        state = "0A000"
    identity = registry.identities.get(failed) or registry.retired.get(failed)
    if identity is None and client is not None:
        for entry in client.names.values():
            if entry[0] == failed:
                identity = entry[1]
    if identity is None:
        return None
    server = plan.server
    was_here = failed in server
    server.discard(failed)
    fresh = registry.retire(failed)  # None: retired already (by another connection)
    if fresh is None:
        fresh = registry.fresh_for(identity)
        if fresh in server or fresh in server.pending_close:
            # prepared here before: it may be as stale as the one that failed
            fresh = registry.retire(fresh) or fresh
    if state == "0A000":
        registry.reshaped.add(failed)
    retry = (status == codes.TX_IDLE and plan.capture == CAPTURE_ON and synced
             and last == len(messages) - 1 and messages[last][0] == codes.SYNC
             and all(m[0] in _BEFORE for m in batch[:at])
             and all(m[0] in _BATCH_TYPES for m in batch)
             and (state != "0A000" or any(m[0] == codes.DESCRIBE for m in batch[at + 1:])))
    if not retry:
        if was_here and failed not in server.pending_close:
            server.pending_close[failed] = None
        if unprepared:
            plan.steps[0] = ReplyStep(BIND_ENDS, error=RESHAPED)
        if state != "0A000" and client is not None:
            client.moved(failed, fresh)  # (0A000: the statement fails on, as in PostgreSQL)
        return None
    if client is not None:
        client.moved(failed, fresh)  # it gets the new row description with the rows
    server.pending_close.pop(failed, None)
    plan.capture = CAPTURE_SUSPENDED  # once
    parts: list[bytes] = []
    steps = [own_query_step()]
    if was_here:
        parts.append(build_target(b"C", ord("S"), name))
        steps.append(ReplyStep(CLOSE_ENDS, drop=True, closes=failed))
    _ensure(fresh, identity, server, parts, steps, drop=True)
    wire = fresh.encode()
    parts.append(build_bind(portal, wire, rest))
    for type_, start, end in batch[at + 1:]:
        if type_ == codes.BIND:
            portal2, name2, rest2 = parse_bind(data[start + 5:end])
            if name2 == name:
                parts.append(build_bind(portal2, wire, rest2))
                continue
        elif type_ == codes.DESCRIBE and data[start + 5] == ord("S") and \
                data[start + 6:end - 1] == name:
            parts.append(build_target(b"D", ord("S"), wire))
            continue
        parts.append(data[start:end])
    plan.steps.extendleft(reversed(steps))
    return b"".join(parts)
