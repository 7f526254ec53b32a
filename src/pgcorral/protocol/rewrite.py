"""The statement mapper of transaction mode: client messages rewritten to pooler names.

It owns ``rewrite()`` (one client message -> ``Rewrite(send, steps)``), its hot-path twin
``bind_fast()``, ``parse_locally()`` and ``close_locally()`` (answers without a server), the
parsers and builders of the message bodies it reads and writes, and ``is_discard_all()``. Pure:
no I/O, no clock. The names live in ``protocol.statements``, the replies in
``protocol.replyplan`` (whose docstring has the ordering contract).

Translation (mapping on): named Parse -> ``Parse pgc_n`` only if the server lacks it, else a
fabricated ParseComplete; a second Parse of a name the client has makes the server refuse a
second Parse of its pooler name (a real 42P05, which also aborts an open transaction as it
would on the client's own connection); Bind and
Describe 'S' of a mapped name -> renamed, preceded by ``Parse pgc_n`` (reply dropped) when the
server lacks it; Close 'S' of a mapped name -> forgotten, nothing sent, CloseComplete
fabricated; Query ``DEALLOCATE [PREPARE] name|ALL`` of a mapped name or ALL -> forgotten, the
server gets an empty Query ``Q\\0\\0\\0\\x05\\0`` (its ReadyForQuery status stays real) and the
EmptyQueryResponse becomes CommandComplete ``DEALLOCATE [ALL]``, server statements stay;
``DISCARD ALL`` passes, the client forgets all and ``server.clear()`` is done at once (back into
the LRU if it fails). Everything else (unnamed statements, portals, unknown names: PostgreSQL
answers 26000) passes unchanged. Evicted names are closed at the start of the next batch
(``at_sync``: after a Sync, or just linked, as the caller knows). In an aborted transaction
(``tx_failed``) Parse, DEALLOCATE and DISCARD ALL go to PostgreSQL, which refuses them (25P02).

A client's new Parse maps onto a pooler name made in the current schema epoch
(``StatementRegistry.fresh_for``), and ``parse_locally`` answers only for such a name: a Parse
after DDL is prepared anew, as on the client's own connection.

A client's Parse or Close that fails or is skipped (after an error, until Sync) is undone in the
client's names, newest first (``ReplyStep.client_undo``).

Known limits: in pipeline mode a Bind sent before the error of a skipped re-Parse came back
gets 26000; a Query after an extended-protocol error without Sync gets no ReadyForQuery; inside
an aborted transaction a statement evicted from the connection cannot be prepared again, so a
Bind of it gets 25P02 even where PostgreSQL would first report another error (a wrong parameter
count); likewise a Bind or Describe of one whose table was dropped gets the re-Parse's 42P01
first (PostgreSQL: the wrong parameter count, or a Describe's ParameterDescription). With
several batches in flight (pipelining), the mapper decides each message when it is sent, before
the errors of earlier batches come back: after an error in one batch, the answers to prepared-
statement names in later batches can differ from PostgreSQL's (a name a skipped Parse never
created looks created, a DEALLOCATE of it succeeds). A differential test that sent random
batches all at once found these (2026-11-26); fixing them needs the mapper to hold a batch's
name changes until its Sync is answered.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final

from pgcorral.errors import ClientProtocolError
from pgcorral.protocol import codes
from pgcorral.protocol.messages import message
from pgcorral.protocol.replyplan import (
    BIND_ENDS,
    CLOSE_ENDS,
    DEFAULT_STEPS,
    DESCRIBE_ENDS,
    PARSE_ENDS,
    READY_ENDS,
    ReplyStep,
)
from pgcorral.protocol.statements import ClientStatements, ServerStatements, StatementRegistry

# ``Final``: compiled, a C static load instead of a lookup in the module's dict.
_I16: Final = struct.Struct("!h")
_header: Final = struct.Struct("!BI")

PARSE_COMPLETE: Final = message(b"1")
CLOSE_COMPLETE: Final = message(b"3")
EMPTY_QUERY: Final = message(b"Q", b"\0")

#: requests that may open a batch (Close messages of evicted names go before them); after one,
#: the server connection is no longer at a batch start, until the next Sync
REQUESTS: Final = frozenset([codes.PARSE, codes.BIND, codes.DESCRIBE, codes.CLOSE,
                             codes.EXECUTE, codes.QUERY, codes.FUNCTION_CALL])
_KIND_STATEMENT: Final = ord("S")
_KIND_PORTAL: Final = ord("P")
_BIND: Final = codes.BIND

_DEALLOCATE: Final = re.compile(
    rb'\s*deallocate\s+(?:prepare\s+)?(?:(all)|([a-z_\x80-\xff][a-z0-9_$\x80-\xff]*)'
    rb'|"((?:[^"]|"")+)")\s*;?\s*\Z', re.I)
_DISCARD_ALL: Final = re.compile(rb"\s*discard\s+all\s*;?\s*\Z", re.I)


# --- message bodies --------------------------------------------------------------------------

def _cstring(body: bytes, pos: int, what: str) -> tuple[bytes, int]:
    end = body.find(b"\0", pos)
    if end < 0:
        raise ClientProtocolError(f"malformed {what} message: unterminated string")
    return body[pos:end], end + 1


_EXIT_WORDS: Final = (b"rollback", b"abort", b"commit", b"end")


def _exits_transaction(identity: bytes) -> bool:
    """Is the query of ``identity`` one PostgreSQL parses even in an aborted transaction
    (ROLLBACK, ABORT, COMMIT, END, ROLLBACK TO, PREPARE TRANSACTION, COMMIT/ROLLBACK
    PREPARED: its IsTransactionExitStmt)?"""
    head = identity[:64].lstrip().lower()
    for word in _EXIT_WORDS:
        if head.startswith(word) and (len(head) == len(word)
                                      or not head[len(word):len(word) + 1].isalnum()):
            return True
    return head.startswith(b"prepare") and head[7:].lstrip().startswith(b"transaction")


def parse_parse(body: bytes) -> tuple[bytes, bytes]:
    """``(statement name, identity)`` of a Parse body; identity = query + parameter types."""
    name, start = _cstring(body, 0, "Parse")
    _, pos = _cstring(body, start, "Parse")
    if pos + 2 > len(body):
        raise ClientProtocolError("malformed Parse message: no parameter type count")
    (count,) = _I16.unpack_from(body, pos)
    if count < 0 or len(body) != pos + 2 + 4 * count:
        raise ClientProtocolError("malformed Parse message: bad parameter types")
    return name, body[start:]


def build_parse(name: bytes, identity: bytes) -> bytes:
    return message(b"P", name + b"\0" + identity)


def parse_bind(body: bytes) -> tuple[bytes, bytes, bytes]:
    """``(portal, statement, rest)`` of a Bind body; the rest is kept as is."""
    portal, pos = _cstring(body, 0, "Bind")
    statement, pos = _cstring(body, pos, "Bind")
    return portal, statement, body[pos:]


def build_bind(portal: bytes, statement: bytes, rest: bytes) -> bytes:
    return message(b"B", portal + b"\0" + statement + b"\0" + rest)


def parse_target(body: bytes, what: str = "Describe") -> tuple[int, bytes]:
    """``(kind 'S' or 'P', name)`` of a Describe or Close body."""
    if not body or body[0] not in (_KIND_STATEMENT, _KIND_PORTAL):
        raise ClientProtocolError(f"malformed {what} message: bad target kind")
    name, pos = _cstring(body, 1, what)
    if pos != len(body):
        raise ClientProtocolError(f"malformed {what} message: trailing bytes")
    return body[0], name


def build_target(type_: bytes, kind: int, name: bytes) -> bytes:
    """A Describe (``type_`` b"D") or Close (b"C") message."""
    return message(type_, bytes([kind]) + name + b"\0")


def is_discard_all(query_body: bytes) -> bool:
    """Is this Query body (with its terminating zero) exactly ``DISCARD ALL``?"""
    return (query_body[:64].lstrip()[:7].lower() == b"discard"
            and _DISCARD_ALL.match(query_body, 0, max(len(query_body) - 1, 0)) is not None)


# --- the translator --------------------------------------------------------------------------

@dataclass(slots=True)
class Rewrite:
    """What to send to the server for one client message, and its reply steps in order."""

    send: bytes
    steps: list[ReplyStep] | tuple[ReplyStep, ...]


def _identifier(match: re.Match[bytes]) -> bytes | None:
    """The statement name of a DEALLOCATE match, None for ALL."""
    if match.group(1) is not None:
        return None
    if match.group(2) is not None:
        return match.group(2).lower()  # PostgreSQL folds unquoted identifiers (ASCII)
    return match.group(3).replace(b'""', b'"')


def _ensure(name: str, identity: bytes, server: ServerStatements, parts: list[bytes],
            steps: list[ReplyStep], drop: bool) -> bool:
    """Make ``name`` usable on the server; True if it already was (nothing sent)."""
    if name in server:
        server.touch(name)
        server.hits += 1
        return True
    present = name in server.pending_close  # evicted, its Close not sent yet
    if present:
        del server.pending_close[name]
        server.hits += 1
    else:
        server.misses += 1
        parts.append(build_parse(name.encode(), identity))
        steps.append(ReplyStep(PARSE_ENDS, drop=drop, prepares=name))
    server.pending_close.update(dict.fromkeys(server.add(name)))
    return present


def rewrite(type_: int, body: bytes, client: ClientStatements, server: ServerStatements,
            registry: StatementRegistry, *, at_sync: bool, tx_failed: bool) -> Rewrite:
    """Translate one client message (``type_``, ``body`` without the header). ``at_sync``:
    the server connection is at a batch start (after a Sync, or just linked), where the Closes
    of evicted names go first; ``tx_failed``: its transaction is aborted."""
    if server.capacity <= 0:
        return Rewrite(_header.pack(type_, len(body) + 4) + body, DEFAULT_STEPS[type_])
    parts: list[bytes] = []
    steps: list[ReplyStep] = []  # built in request order
    if at_sync and type_ in REQUESTS and server.pending_close:
        for name in server.pending_close:
            parts.append(build_target(b"C", _KIND_STATEMENT, name.encode()))
            steps.append(ReplyStep(CLOSE_ENDS, drop=True, closes=name))
        server.pending_close.clear()
    handled = _translate(type_, body, client, server, registry, tx_failed, parts, steps)
    if not handled:
        parts.append(_header.pack(type_, len(body) + 4) + body)
        if not steps:
            return Rewrite(parts[0], DEFAULT_STEPS[type_])
        steps.extend(DEFAULT_STEPS[type_])
    return Rewrite(b"".join(parts), steps)


def _translate(type_: int, body: bytes, client: ClientStatements, server: ServerStatements,
               registry: StatementRegistry, tx_failed: bool, parts: list[bytes],
               steps: list[ReplyStep]) -> bool:
    """Append the translation of a mapped message; False if it passes unchanged."""
    names = client.names
    if type_ == codes.PARSE:
        name, identity = parse_parse(body)
        if not name:
            return False
        existing = names.get(name)
        if existing is not None:
            # PostgreSQL refuses a second Parse of a name (42P05), and the refusal aborts an
            # open transaction: make the server refuse it for real, by parsing the pooler
            # name it already has (made sure of first) once more.
            # The new query goes with it: PostgreSQL analyses it first (its error, if any,
            # comes before 42P05, as on the client's own connection).
            pooled = existing[0]
            _ensure(pooled, existing[1], server, parts, steps, drop=True)
            parts.append(build_parse(pooled.encode(), identity))
            steps.append(ReplyStep(PARSE_ENDS))
            return True
        pooled = registry.fresh_for(identity)  # made in this schema epoch (issue 14)
        entry = (pooled, identity)
        names[name] = entry
        undo = (client, name, entry, None)
        if not _ensure(pooled, identity, server, parts, steps, drop=False):
            steps[-1].client_undo = undo
        elif tx_failed and not _exits_transaction(identity):
            # PostgreSQL refuses any Parse here (25P02): let it. (Not a Parse of ROLLBACK,
            # COMMIT and the like, which it accepts in an aborted transaction: the server has
            # the statement, so a second Parse would get 42P05; found by the mixing fuzzer.)
            parts.append(build_parse(pooled.encode(), identity))
            steps.append(ReplyStep(PARSE_ENDS, client_undo=undo))
        else:
            steps.append(ReplyStep(frozenset(), fabricate=PARSE_COMPLETE, client_undo=undo))
        return True
    if type_ == codes.BIND:
        portal, statement, rest = parse_bind(body)
        mapped = names.get(statement) if statement else None
        if mapped is None:
            return False
        pooled = mapped[0]
        if (pooled in registry.reshaped and pooled not in server
                and pooled not in server.pending_close):
            # its result type changed since the client was told it: not prepared again here,
            # the server's 26000 becomes 0A000 (``protocol.repair``), as from PostgreSQL
            parts.append(build_bind(portal, pooled.encode(), rest))
            steps.append(ReplyStep(BIND_ENDS))
            return True
        _ensure(pooled, mapped[1], server, parts, steps, drop=True)
        parts.append(build_bind(portal, pooled.encode(), rest))
        steps.append(ReplyStep(BIND_ENDS))
        return True
    if type_ in (codes.DESCRIBE, codes.CLOSE):
        kind, name = parse_target(body, "Describe" if type_ == codes.DESCRIBE else "Close")
        target = names.get(name) if kind == _KIND_STATEMENT and name else None
        if target is None:
            return False
        if type_ == codes.CLOSE:
            del names[name]
            steps.append(ReplyStep(frozenset(), fabricate=CLOSE_COMPLETE,
                                   client_undo=(client, name, None, target)))
            return True
        pooled = target[0]
        _ensure(pooled, target[1], server, parts, steps, drop=True)
        parts.append(build_target(b"D", kind, pooled.encode()))
        steps.append(ReplyStep(DESCRIBE_ENDS))
        return True
    if type_ == codes.QUERY:
        return _translate_query(body, client, server, tx_failed, parts, steps)
    return False


def bind_fast(data: bytes, pos: int, name_at: int, end: int, client: ClientStatements,
              server: ServerStatements, registry: StatementRegistry) -> bytes | None:
    """The hot path of ``rewrite`` for the Bind ``data[pos:end]`` whose statement name starts
    at ``name_at``: a mapped statement the server connection already has, renamed (the
    caller plans one BindComplete). None: go through ``rewrite`` (unknown or missing
    statement, malformed body). Reads the chunk in place: only the name is copied."""
    name_end = data.find(b"\0", name_at, end)
    if name_end < 0:
        return None
    entry = client.names.get(data[name_at:name_end])
    if entry is None:
        return None
    pooled = entry[0]
    lru = server.lru
    if pooled not in lru:
        return None
    lru.move_to_end(pooled)  # ServerStatements.touch
    server.hits += 1
    wire = registry.encoded.get(pooled)
    if wire is None:  # retired since (the client's statement keeps it)
        wire = pooled.encode()
    length = end - pos - 1 - (name_end - name_at) + len(wire)
    return b"".join((_header.pack(_BIND, length), data[pos + 5:name_at], wire,
                     data[name_end:end]))


def parse_locally(body: bytes, client: ClientStatements, registry: StatementRegistry) -> bool:
    """A named Parse, with no server linked and no transaction open, of a statement a server
    has accepted before, under a name made in the current schema epoch (no DDL went through
    since): recorded for the client, answered ParseComplete by the caller, and prepared on a
    server when first used (a Bind or Describe re-Parses it). False: it needs a server.
    This keeps clients that prepare synchronously before each transaction (pgbench -M
    prepared) from waiting for a server only to be told ParseComplete."""
    name, identity = parse_parse(body)
    if not name or name in client.names:  # a second Parse of a name: the server refuses it
        return False
    pooled = registry.lookup(identity)
    if pooled is None or pooled not in registry.known or not registry.current(pooled):
        return False  # (a schema change since: it must be prepared anew, by a server)
    client.names[name] = (pooled, identity)
    return True


def close_locally(body: bytes, client: ClientStatements) -> bool:
    """A Close 'S' of a mapped name with no server linked: forgotten; the caller answers
    CloseComplete. False: it needs a server (a portal, or a name pgcorral does not map)."""
    kind, name = parse_target(body, "Close")
    if kind != _KIND_STATEMENT or not name or name not in client.names:
        return False
    del client.names[name]
    return True


def _translate_query(body: bytes, client: ClientStatements, server: ServerStatements,
                     tx_failed: bool, parts: list[bytes], steps: list[ReplyStep]) -> bool:
    if not body.endswith(b"\0"):
        raise ClientProtocolError("malformed Query message: unterminated string")
    head = body[:64].lstrip()[:10].lower()
    if tx_failed:
        return False  # PostgreSQL refuses both in an aborted transaction (25P02): let it
    if head.startswith(b"deallocate"):
        match = _DEALLOCATE.match(body, 0, len(body) - 1)
        if match is None:
            return False
        name = _identifier(match)
        if name is None:
            client.names.clear()
            tag = b"DEALLOCATE ALL"
        elif client.names.pop(name, None) is not None:
            tag = b"DEALLOCATE"
        else:
            return False
        parts.append(EMPTY_QUERY)
        steps.append(ReplyStep(READY_ENDS, tag=tag))
        return True
    if head.startswith(b"discard") and _DISCARD_ALL.match(body, 0, len(body) - 1):
        saved = dict(client.names)  # back if it fails (inside a transaction block: 25001)
        client.names.clear()
        parts.append(message(b"Q", body))
        steps.append(ReplyStep(READY_ENDS, restore=tuple(server.clear()),
                               client_names=(client, saved)))
        return True
    return False
