"""Client -> server forwarding in transaction mode: one ``ClientForwarder`` per client.

The mirror of ``protocol.txrelay.ReplyRouter``. While a server connection is linked, the
forwarder walks the headers of what the client sends and returns what goes to the server:
whole messages only (a partial one is handed back, to be kept until the rest arrives), each
with its reply steps put into the connection's ``ReplyPlan``; with prepared-statement mapping
on (the connection's ``ServerStatements.capacity`` > 0), the messages that name statements go
through the mapper (``protocol.rewrite``), a Bind of a statement the connection has is renamed
in place (``bind_fast``), and the rest passes as is. A message of ``STREAM_FROM`` bytes or more
that passes unchanged (CopyData, mostly) is forwarded as its bytes arrive (``pending``: how
many are still to come).

It keeps the client's half of the question "may the server connection go back to the pool":
an extended-protocol batch is open (``batch_open``: Parse, Bind, Describe, Close or Execute
sent, no Sync yet) or a message is half forwarded (``pending``). ``at_rest`` says neither; the
network layer gives it to ``ReplyRouter.feed``, which finds the ReadyForQuery 'I' that frees
the connection.

Messages that pass are forwarded as slices of the chunk, bodies unread, except the few bytes a
decision needs (the head of a Query, for DEALLOCATE and DISCARD; the names of a Parse, Bind,
Describe or Close when mapping is on). Pure: no I/O, no clock.

Hot paths (pooler CPU per transaction, issue 10): ``feed`` passes a lone Query without a loop,
and a chunk of messages that all pass (or are a renamed Bind) through ``_feed_passing``, which
changes nothing until it has seen the whole chunk; anything else goes to ``feed_general``, the
one general path. The unit tests compare ``feed`` with ``feed_general`` chunk by chunk.
"""

from __future__ import annotations

import struct
from typing import Final

from pgcorral.errors import ClientProtocolError
from pgcorral.protocol import codes
from pgcorral.protocol.replyplan import DEFAULT_STEPS, ReplyPlan, ReplyStep, type_table
from pgcorral.protocol.rewrite import REQUESTS, bind_fast, is_discard_all, rewrite
from pgcorral.protocol.sessionsql import (
    CUSTOM_MAX,
    custom_setting_names,
    may_touch_state,
    vpid_refusal,
)
from pgcorral.protocol.statements import ClientStatements, StatementRegistry

# Module constants are ``Final``: compiled with mypyc, reading one is a C static load, not a
# lookup in the module's dict (and in another module's, for ``codes.X``).
_header: Final = struct.Struct("!BI").unpack_from
_length: Final = struct.Struct("!I").unpack_from

#: A message at least this long that passes unchanged is forwarded as its bytes arrive.
STREAM_FROM: Final = 64 * 1024
#: What PostgreSQL accepts after login (a password message, or anything else, is refused with
#: 08P01 "invalid frontend message type"; pgcorral answers it without a server connection).
SESSION_TYPES: Final = codes.FRONTEND_TYPES - {codes.PASSWORD}
#: Messages that open an extended-protocol batch (closed by Sync).
_BATCH: Final = frozenset([codes.PARSE, codes.BIND, codes.DESCRIBE, codes.CLOSE, codes.EXECUTE])
#: Messages that go through ``rewrite`` when the mapping is on (unless a fast path takes them).
_REWRITTEN: Final = REQUESTS | frozenset([codes.SYNC])
_KIND_PORTAL: Final = ord("P")
# What the loop needs to know of a message type, in one table by type byte (an index is
# cheaper than set lookups, the more so compiled): bits of
_F_SESSION: Final = 1  # in SESSION_TYPES
_F_BATCH: Final = 2  # in _BATCH
_F_REWRITTEN: Final = 4  # in _REWRITTEN
_FLAGS: Final = bytes((_F_SESSION if t in SESSION_TYPES else 0) | (_F_BATCH if t in _BATCH else 0)
                      | (_F_REWRITTEN if t in _REWRITTEN else 0) for t in range(256))
#: The first bytes of a Query body that may start DEALLOCATE or DISCARD (ASCII whitespace,
#: which ``bytes.lstrip`` skips, and both cases of "d"), a table by byte: any other is not
#: looked at further.
_MAYBE_SPECIAL: Final = type_table(frozenset(b" \t\n\r\x0b\x0cdD"))
#: ``DEFAULT_STEPS`` as a list by type byte (compiled: indexed natively)
_STEPS: Final = [DEFAULT_STEPS[t] for t in range(256)]
_QUERY_STEPS: Final = DEFAULT_STEPS[codes.QUERY]
_BIND: Final = codes.BIND
_CLOSE: Final = codes.CLOSE
_DESCRIBE: Final = codes.DESCRIBE
_EXECUTE: Final = codes.EXECUTE
_FLUSH: Final = codes.FLUSH
_PARSE: Final = codes.PARSE
_QUERY: Final = codes.QUERY
_SYNC: Final = codes.SYNC
_TERMINATE: Final = codes.TERMINATE
_TX_FAILED: Final = codes.TX_FAILED

# What ``ClientForwarder.feed`` saw besides requests to forward: bits of its third result.
#: A Terminate: neither it nor anything after it was taken.
TERMINATE: Final = 1
#: A DISCARD ALL went to the server: it resets the session's settings too (RESET ALL).
DISCARD_ALL: Final = 2
#: A named Parse went through unmapped (for ``track_prepared_statements``).
NAMED_PARSE: Final = 4
#: A protocol violation (``ClientForwarder.violation`` says which): nothing from the bad
#: message on was taken, and the client must be refused (08P01).
VIOLATION: Final = 8
#: A request whose SQL may create or remove session state (``sessionsql.may_touch_state``):
#: the server connection is probed when the transaction ends (``net.transaction``).
SESSION_STATE: Final = 16
#: A DEALLOCATE ALL (translated for the mapped statements): the SQL-level ones go too.
DEALLOCATE_ALL: Final = 32


def _second_string(data: bytes, pos: int, end: int) -> bytes:
    """The second NUL-terminated string of the message at ``pos`` (to ``end``), or b"" if
    malformed: a Parse's query text (after its statement name), a Bind's statement name
    (after its portal name)."""
    first_end = data.find(b"\0", pos + 5, end)
    if first_end < 0:
        return b""
    second_end = data.find(b"\0", first_end + 1, end)
    return data[first_end + 1:second_end] if second_end > 0 else b""


#: What ``stateful`` and ``custom`` start as: one empty set for every forwarder, never
#: changed (``add_stateful``/``add_custom`` put a set of the forwarder's own in its place
#: first). Two empty sets were 432 bytes of every idle client (issue 15).
NO_NAMES: Final[set[bytes]] = set()


class ClientForwarder:
    """``feed(data, plan, status) -> (bytes for the server, bytes to keep, what was seen)``.

    ``data`` starts where the last call's kept bytes started (the caller puts them in front of
    the new chunk); ``plan`` is the linked server connection's, ``status`` the transaction
    status of its last ReadyForQuery.
    """

    __slots__ = ("at_rest", "at_sync", "batch_open", "client", "custom", "max_length",
                 "pending", "registry", "stateful", "violation")

    def __init__(self, client: ClientStatements, registry: StatementRegistry,
                 max_length: int = codes.LARGE_MESSAGE_LIMIT) -> None:
        self.client = client
        self.registry = registry
        self.max_length = max_length
        self.batch_open = False  # an extended-protocol batch was sent and not yet Synced
        self.pending = 0  # bytes of a large message still to forward as they come
        #: no batch is open and no message is half forwarded: the client side lets the server
        #: connection go (kept with the two above; read once per chunk each way)
        self.at_rest = True
        #: the linked server connection is at a batch start (after a Sync, or just linked):
        #: the Closes of statements evicted there may go first (mapping on)
        self.at_sync = True
        self.violation = ""  # what the last VIOLATION was
        #: the client's names of the statements whose text may touch session state: a Bind of
        #: one is ``SESSION_STATE`` too (client-side names, mapped or not)
        self.stateful: set[bytes] = NO_NAMES
        #: custom setting names (``app.user_id``) the client's SQL set or reset: the
        #: session-state probe asks for their values (pg_settings does not list them)
        self.custom: set[bytes] = NO_NAMES

    def add_stateful(self, name: bytes) -> None:
        if self.stateful is NO_NAMES:
            self.stateful = set()
        self.stateful.add(name)

    def add_custom(self, names: list[bytes]) -> None:
        if self.custom is NO_NAMES:
            self.custom = set()
        self.custom.update(names)

    def link(self) -> None:
        """A server connection is linked to the client: its stream is at a batch start."""
        self.at_sync = True
        self.batch_open = False
        self.at_rest = not self.pending

    def feed(self, data: bytes, plan: ReplyPlan, status: int) -> tuple[bytes, bytes, int]:
        """Forward the whole messages of ``data`` (and the streaming one's bytes): what to
        write to the server (maybe empty), the partial message to keep (empty after a
        Terminate or a violation), and the ``TERMINATE``/``DISCARD_ALL``/``NAMED_PARSE``/
        ``VIOLATION`` bits of what was seen. Every request's reply steps are in ``plan`` when
        this returns; fabricated replies may be due (``plan.has_fabricated``)."""
        if not self.pending:
            # The commonest chunk of all, one whole Query (a simple-protocol client), first.
            n = len(data)
            if n > 5 and data[0] == _QUERY and not _MAYBE_SPECIAL[data[5]]:
                length: int = _length(data, 1)[0]
                if length + 1 == n and length - 4 <= self.max_length and not may_touch_state(
                        data, 5):
                    statements = plan.server
                    if statements.capacity <= 0:
                        plan.extend(_QUERY_STEPS)
                        return data, b"", 0
                    if not (self.at_sync and statements.pending_close):
                        self.at_sync = False
                        plan.extend(_QUERY_STEPS)
                        return data, b"", 0
            send = self._feed_passing(data, plan)
            if send is not None:
                return send, b"", 0
        return self.feed_general(data, plan, status)

    def _feed_passing(self, data: bytes, plan: ReplyPlan) -> bytes | None:
        """The hot path: a chunk of whole messages that all pass unchanged (or, a Bind of a
        statement the server connection has, renamed) with their default reply steps, the
        usual chunk of a client in a transaction: a Query (not DEALLOCATE or DISCARD); an
        extended-protocol batch of unnamed statements and portals; a Bind/Execute/Sync of a
        prepared statement. Anything else (a named Parse, a Close, a message to translate,
        Closes of evicted statements due first, a partial or bad message): None, and
        ``feed_general`` takes the chunk from its start, as nothing was changed here (but the
        LRU order of a renamed statement, which it sets again). The unit tests compare the
        two on random chunks."""
        statements = plan.server
        mapping = statements.capacity > 0
        # a request at a batch start must send the Closes of evicted statements first
        closes_due = mapping and bool(statements.pending_close)
        at_sync = self.at_sync
        batch_open = self.batch_open
        limit = self.max_length
        type_: int  # (typed: compiled, they stay machine integers)
        length: int
        steps: list[ReplyStep] = []
        parts: list[bytes] = []  # only when a Bind is renamed
        pos = run = 0
        n = len(data)
        while pos < n:
            if pos + 5 > n:
                return None
            type_, length = _header(data, pos)
            end = pos + 1 + length
            if end > n or length < 4 or length - 4 > limit:
                return None
            if type_ == _SYNC:
                batch_open = False
                if mapping:
                    at_sync = True
            elif type_ == _FLUSH:
                pass
            else:
                if mapping and at_sync and closes_due:
                    return None
                if type_ == _EXECUTE:
                    batch_open = True
                elif type_ == _QUERY:
                    if end > pos + 5 and _MAYBE_SPECIAL[data[pos + 5]]:
                        return None  # maybe DEALLOCATE or DISCARD
                    if may_touch_state(data[pos + 5:end]):
                        return None  # session state: seen by feed_general
                elif type_ == _BIND:
                    name_at = data.find(b"\0", pos + 5, end) + 1
                    if name_at <= 0 or name_at >= end:
                        return None  # malformed
                    if self.stateful and data[name_at] != 0 and _second_string(
                            data, pos, end) in self.stateful:
                        return None
                    if mapping and data[name_at] != 0:  # a named statement: renamed
                        renamed = bind_fast(data, pos, name_at, end, self.client, statements,
                                            self.registry)
                        if renamed is None:
                            return None
                        if run < pos:
                            parts.append(data[run:pos])
                        parts.append(renamed)
                        run = end
                    batch_open = True
                elif type_ == _PARSE:
                    if end == pos + 5 or data[pos + 5] != 0:
                        return None  # named, or empty
                    if may_touch_state(data[pos + 6:end]):
                        return None  # session state: seen by feed_general
                    batch_open = True
                elif type_ == _DESCRIBE:
                    if end < pos + 7 or (data[pos + 5] != _KIND_PORTAL and data[pos + 6] != 0):
                        return None  # a named statement
                    batch_open = True
                else:
                    return None
                if mapping:
                    at_sync = False
            steps += _STEPS[type_]
            pos = end
        if steps:
            plan.extend(steps)
        self.at_sync = at_sync
        self.batch_open = batch_open
        self.at_rest = not batch_open  # (nothing pending)
        if run == 0:
            return data
        if run < n:
            parts.append(data[run:])
        return b"".join(parts)

    def feed_general(self, data: bytes, plan: ReplyPlan,
                     status: int) -> tuple[bytes, bytes, int]:
        """``feed`` for any chunk."""
        statements = plan.server
        mapping = statements.capacity > 0
        limit = self.max_length
        type_: int  # (typed: compiled, they stay machine integers)
        length: int
        flags: int
        parts: list[bytes] = []
        steps: list[ReplyStep] = []  # of every request taken, for the plan at the end
        pos = run = 0  # run: start of the bytes to pass not yet appended to parts
        n = len(data)
        seen = 0
        if self.pending:  # the rest of a large message already on its way
            pos = min(self.pending, n)
            self.pending -= pos
        try:
            while pos + 5 <= n:
                type_, length = _header(data, pos)
                if length < 4 or length - 4 > limit:
                    raise ClientProtocolError(f"invalid message length {length}")
                end = pos + 1 + length
                flags = _FLAGS[type_]
                if not flags & _F_SESSION:
                    raise ClientProtocolError(f"invalid frontend message type {type_}")
                if end > n:
                    if length < STREAM_FROM or (mapping and flags & _F_REWRITTEN):
                        break  # kept until it is whole
                    # large CopyData and the like stream through as they come
                    steps += _STEPS[type_]
                    self.pending = end - n
                    pos = n
                    break
                if type_ == _TERMINATE:
                    seen |= TERMINATE
                    break
                if flags & _F_BATCH:
                    self.batch_open = True
                elif type_ == _SYNC:
                    self.batch_open = False
                # DEALLOCATE or DISCARD: translated, DISCARD ALL also resets (a Query whose
                # first byte cannot start either is not looked at further)
                special = False
                if type_ == _QUERY and end > pos + 5 and _MAYBE_SPECIAL[data[pos + 5]]:
                    head = data[pos + 5:pos + 69].lstrip()[:10].lower()
                    special = head.startswith(b"deallocate") or head.startswith(b"discard")
                if type_ == _QUERY:
                    if may_touch_state(data[pos + 5:end]):
                        seen |= SESSION_STATE
                        if len(self.custom) < CUSTOM_MAX:
                            self.add_custom(custom_setting_names(data[pos + 5:end]))
                        refusal = vpid_refusal(data[pos + 5:end])
                        if refusal:  # pg_cancel_backend(virtual pid): PostgreSQL refuses
                            if run < pos:
                                parts.append(data[run:pos])
                            parts.append(refusal)
                            run = pos = end
                            steps += _STEPS[type_]
                            continue
                elif type_ == _PARSE:
                    text = _second_string(data, pos, end)
                    if may_touch_state(text):
                        seen |= SESSION_STATE
                        if len(self.custom) < CUSTOM_MAX:
                            self.add_custom(custom_setting_names(text))
                        if end > pos + 5 and data[pos + 5] != 0:
                            self.add_stateful(data[pos + 5:data.find(b"\0", pos + 5, end)])
                    elif self.stateful and end > pos + 5 and data[pos + 5] != 0:
                        # the name now means another text (after a Close or DEALLOCATE)
                        self.stateful.discard(data[pos + 5:data.find(b"\0", pos + 5, end)])
                elif type_ == _BIND and self.stateful and _second_string(
                        data, pos, end) in self.stateful:
                    seen |= SESSION_STATE
                if not mapping:
                    if type_ == _PARSE and end > pos + 5 and data[pos + 5] != 0:
                        seen |= NAMED_PARSE  # track_prepared_statements: DEALLOCATE ALL
                    steps += _STEPS[type_]
                elif type_ == _SYNC:
                    self.at_sync = True
                    steps += _STEPS[type_]
                elif not flags & _F_REWRITTEN:  # CopyData, CopyDone, CopyFail, Flush
                    steps += _STEPS[type_]
                else:  # one of the REQUESTS: passed as is, renamed, or through ``rewrite``
                    renamed: bytes | None = None
                    if self.at_sync and statements.pending_close:
                        fast = False  # the Closes of evicted statements go first
                    elif type_ == _BIND:
                        portal_end = data.find(b"\0", pos + 5, end)
                        if portal_end < 0 or portal_end + 1 >= end:
                            fast = False  # malformed: ``rewrite`` says so
                        elif data[portal_end + 1] == 0:
                            fast = True  # the unnamed statement is not mapped
                        else:
                            renamed = bind_fast(data, pos, portal_end + 1, end, self.client,
                                                statements, self.registry)
                            fast = renamed is not None
                    elif type_ == _QUERY:
                        fast = not special
                    elif type_ == _PARSE:  # the unnamed statement is not mapped
                        fast = end > pos + 5 and data[pos + 5] == 0
                    elif type_ in (_DESCRIBE, _CLOSE):
                        # a portal, or the unnamed statement, is not mapped
                        fast = end > pos + 6 and (data[pos + 5] == _KIND_PORTAL
                                                  or data[pos + 6] == 0)
                    else:  # Execute, FunctionCall
                        fast = True
                    if not fast:
                        if run < pos:
                            parts.append(data[run:pos])
                        rw = rewrite(type_, data[pos + 5:end], self.client, statements,
                                     self.registry, at_sync=self.at_sync,
                                     tx_failed=status == _TX_FAILED)
                        if rw.send:
                            parts.append(rw.send)
                        steps += rw.steps
                        run = end
                    else:
                        steps += _STEPS[type_]
                        if renamed is not None:
                            if run < pos:
                                parts.append(data[run:pos])
                            parts.append(renamed)
                            run = end
                    self.at_sync = False
                if special and head.startswith(b"deallocate") and b"all" in data[
                        pos + 5:end].lower():
                    seen |= DEALLOCATE_ALL
                if special and head.startswith(b"discard") and is_discard_all(
                        data[pos + 5:end]):
                    seen |= DISCARD_ALL
                    if not mapping:
                        statements.clear()
                pos = end
        except ClientProtocolError as exc:
            self.violation = exc.message
            seen |= VIOLATION
        if steps:
            plan.extend(steps)
        self.at_rest = not self.batch_open and not self.pending
        if run == 0 and pos == n:  # the whole chunk as it came (compiled, a full slice copies)
            return data, b"", seen
        if run < pos:
            parts.append(data[run:pos])
        send = parts[0] if len(parts) == 1 else b"".join(parts)
        if seen & (TERMINATE | VIOLATION):
            return send, b"", seen  # nothing from the bad message (or Terminate) on
        return send, data[pos:] if pos < n else b"", seen
