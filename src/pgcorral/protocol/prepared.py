"""Protocol-level prepared statements in transaction mode: a pure mapper (no I/O, no clock).

It owns: ``StatementRegistry`` (per worker: identity -> pooler name ``pgc_<n>``; the identity is
the Parse body after the name, i.e. query + parameter type OIDs, so the same statement shares one
name across clients, for the process's life); ``ServerStatements`` (per server connection: an
LRU of the pooler names prepared there, bounded by ``max_prepared_statements``, 0 = mapping off,
plus ``pending_close``: evicted names still prepared there, whose Close is sent at the start of
the next batch, after a Sync or when a client is linked, where PostgreSQL is never skipping
messages after an error, so a Close is never lost and a re-Parse never meets 42P05);
``ClientStatements`` (per client: ``{client name: identity}``); ``rewrite()`` (one client
message -> ``Rewrite(send, slots)``); ``ReplyPlan`` (per server connection: the reply FIFO).

Ordering contract. Every client request puts its reply slots in the plan in request order,
whether it is sent, answered locally, or preceded by pgcorral's own Parse/Close, so:

1. Per complete client message: ``rw = rewrite(type, body, client, server, registry)``; write
   ``rw.send`` (maybe empty) to the server; ``plan.extend(rw.slots)``.
2. Per complete server message: ``plan.on_server_reply(type)`` -> ``"pass"`` (forward it) or
   ``"drop"`` (skip its bytes).
3. After step 1 (per chunk at least) and after every step 2, write
   ``plan.fabricated_before_next()`` to the client after what was forwarded so far: the replies
   pgcorral makes whose turn has come (ParseComplete for a Parse of a statement the server has,
   CloseComplete for a client's Close 'S', CommandComplete for a local DEALLOCATE).
4. Release the server when ``plan.idle`` and the last ReadyForQuery passed said 'I'. Set
   ``server.at_sync = True`` when linking a server connection to a client.

A slot ends at a known reply type (ParseComplete, BindComplete, CloseComplete, RowDescription or
NoData, CommandComplete/EmptyQueryResponse/PortalSuspended, ReadyForQuery) and passes, drops or
is fabricated. Notices, ParameterStatus and notifications always pass. An ErrorResponse ends a
non-ReadyForQuery slot and, as PostgreSQL ignores messages until Sync, discards the slots up to
the next Sync (fabricated ones too); a failed or skipped Parse of ours leaves the server's LRU.
CopyInResponse removes the slots of Syncs sent during copy-in (PostgreSQL ignores them).

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
answers 26000) passes unchanged.

A client's Parse or Close that fails or is skipped (after an error, until Sync) is undone in the
client's names, newest first (``Slot.client_undo``).

Known limits: in pipeline mode a Bind sent before the error of a skipped re-Parse came back gets
26000; a Query after an extended-protocol error without Sync gets no ReadyForQuery; inside an
aborted transaction a statement evicted from the connection cannot be prepared again, so a Bind
of it gets 25P02 even where PostgreSQL would first report another error (a wrong parameter
count). With several batches in flight (pipelining), the mapper decides each message when it is
sent, before the errors of earlier batches come back: after an error in one batch, the answers
to prepared-statement names in later batches can differ from PostgreSQL's (a name a skipped
Parse never created looks created, a DEALLOCATE of it succeeds). A differential test that sent
random batches all at once found these (2026-11-26); fixing them needs the mapper to hold a
batch's name changes until its Sync is answered.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from pgcorral.errors import ClientProtocolError
from pgcorral.protocol import codes
from pgcorral.protocol.messages import message

_I16 = struct.Struct("!h")
_header = struct.Struct("!BI")

PASS = "pass"
DROP = "drop"
PARSE_COMPLETE = message(b"1")
CLOSE_COMPLETE = message(b"3")
EMPTY_QUERY = message(b"Q", b"\0")
NAME_PREFIX = "pgc_"

_READY = frozenset([codes.READY_FOR_QUERY])
_PARSE_ENDS = frozenset([codes.PARSE_COMPLETE])
_BIND_ENDS = frozenset([codes.BIND_COMPLETE])
_CLOSE_ENDS = frozenset([codes.CLOSE_COMPLETE])
_DESCRIBE_ENDS = frozenset([codes.ROW_DESCRIPTION, codes.NO_DATA])
_EXECUTE_ENDS = frozenset([codes.COMMAND_COMPLETE, codes.EMPTY_QUERY_RESPONSE,
                           codes.PORTAL_SUSPENDED])
_ASYNC = frozenset([codes.NOTICE_RESPONSE, codes.PARAMETER_STATUS, codes.NOTIFICATION_RESPONSE])
_COPY_END = frozenset([codes.COPY_DONE, codes.COPY_FAIL])
#: requests that may open a batch (Close messages of evicted names go before them)
_REQUESTS = frozenset([codes.PARSE, codes.BIND, codes.DESCRIBE, codes.CLOSE, codes.EXECUTE,
                       codes.QUERY, codes.FUNCTION_CALL])
_KIND_STATEMENT = ord("S")
_KIND_PORTAL = ord("P")

_DEALLOCATE = re.compile(
    rb'\s*deallocate\s+(?:prepare\s+)?(?:(all)|([a-z_\x80-\xff][a-z0-9_$\x80-\xff]*)'
    rb'|"((?:[^"]|"")+)")\s*;?\s*\Z', re.I)
_DISCARD_ALL = re.compile(rb"\s*discard\s+all\s*;?\s*\Z", re.I)


# --- message bodies --------------------------------------------------------------------------

def _cstring(body: bytes, pos: int, what: str) -> tuple[bytes, int]:
    end = body.find(b"\0", pos)
    if end < 0:
        raise ClientProtocolError(f"malformed {what} message: unterminated string")
    return body[pos:end], end + 1


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


def command_complete(tag: bytes) -> bytes:
    return message(b"C", tag + b"\0")


# --- state -----------------------------------------------------------------------------------

class StatementRegistry:
    """Identity -> pooler name, shared by every client and server connection of a worker."""

    __slots__ = ("_names", "known")

    def __init__(self) -> None:
        self._names: dict[bytes, str] = {}
        #: pooler names some server has accepted (ParseComplete): a later Parse of the same
        #: statement outside a transaction may be answered without a server (``parse_locally``)
        self.known: set[str] = set()

    def lookup(self, identity: bytes) -> str | None:
        return self._names.get(identity)

    def name_for(self, identity: bytes) -> str:
        name = self._names.get(identity)
        if name is None:
            name = self._names[identity] = f"{NAME_PREFIX}{len(self._names) + 1}"
        return name

    def __len__(self) -> int:
        return len(self._names)


class ServerStatements:
    """The pooler names prepared on one server connection (LRU, most recent last)."""

    __slots__ = ("_lru", "at_sync", "capacity", "pending_close", "tx_failed")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lru: OrderedDict[str, None] = OrderedDict()
        #: evicted names still prepared on the server, closed at the start of the next batch
        self.pending_close: dict[str, None] = {}
        #: the server is at a batch start (after a Sync, or just linked): Close is safe here
        self.at_sync = True
        #: the connection's transaction is aborted (set by the caller before each request):
        #: Parse, DEALLOCATE and DISCARD ALL then go to PostgreSQL, which refuses them
        self.tx_failed = False

    def __contains__(self, name: object) -> bool:
        return name in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def names(self) -> list[str]:
        """Least recently used first."""
        return list(self._lru)

    def touch(self, name: str) -> None:
        self._lru.move_to_end(name)

    def add(self, name: str) -> list[str]:
        """Record ``name`` as prepared; the names evicted beyond the bound, oldest first."""
        self._lru[name] = None
        self._lru.move_to_end(name)
        evicted: list[str] = []
        while len(self._lru) > self.capacity:
            evicted.append(self._lru.popitem(last=False)[0])
        return evicted

    def discard(self, name: str) -> None:
        self._lru.pop(name, None)

    def clear(self) -> list[str]:
        """Forget every statement (DISCARD ALL, DEALLOCATE ALL, a reset); the names forgotten."""
        gone = list(self._lru) + list(self.pending_close)
        self._lru.clear()
        self.pending_close.clear()
        return gone


class ClientStatements:
    """A client's protocol-level statements: ``{client name: identity}``."""

    __slots__ = ("names",)

    def __init__(self) -> None:
        self.names: dict[bytes, bytes] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)


# --- reply plan ------------------------------------------------------------------------------

@dataclass(slots=True)
class Slot:
    """The expected reply to one request. ``ends``: reply types that complete it."""

    ends: frozenset[int]
    drop: bool = False  # pgcorral's own request: its replies never reach the client
    fabricate: bytes = b""  # not sent: these bytes are the reply, emitted at its turn
    sync: bool = False  # a Sync: ends the skipping after an error
    tag: bytes = b""  # replace EmptyQueryResponse with CommandComplete(tag)
    prepares: str | None = None  # a Parse of this pooler name
    closes: str | None = None  # a Close of this pooler name
    restore: tuple[str, ...] = ()  # names a DISCARD ALL forgot: back in the LRU if it fails
    copy_end: bool = False  # a CopyDone/CopyFail marker, no reply of its own
    # a client's Parse or Close changed its names: (its statements, name, identity set or
    # None, identity before or None), put back if the request fails or is skipped
    client_undo: tuple[ClientStatements, bytes, bytes | None, bytes | None] | None = None
    # a DISCARD ALL: the client's names before it, put back if it fails
    client_names: tuple[ClientStatements, dict[bytes, bytes]] | None = None


_ENDS = {codes.PARSE: _PARSE_ENDS, codes.BIND: _BIND_ENDS, codes.CLOSE: _CLOSE_ENDS,
         codes.DESCRIBE: _DESCRIBE_ENDS, codes.EXECUTE: _EXECUTE_ENDS}


def _make_default_slots(type_: int) -> tuple[Slot, ...]:
    if type_ == codes.SYNC:
        return (Slot(_READY, sync=True),)
    if type_ in (codes.QUERY, codes.FUNCTION_CALL):
        return (Slot(_READY),)
    if type_ in _COPY_END:
        return (Slot(frozenset(), copy_end=True),)
    ends = _ENDS.get(type_)
    return (Slot(ends),) if ends is not None else ()


#: The slots of a message passed unchanged, by type. Shared: a plan never mutates a slot that
#: has no ``restore`` (the only field it changes), and these have none.
DEFAULT_SLOTS: dict[int, tuple[Slot, ...]] = {t: _make_default_slots(t) for t in range(256)}


def own_query_slot() -> Slot:
    """The slot of a Query or Sync-ended batch pgcorral sends itself before a client's requests
    (settings, reset): every reply up to its ReadyForQuery is dropped, errors included."""
    return Slot(_READY, drop=True)


def is_discard_all(query_body: bytes) -> bool:
    """Is this Query body (with its terminating zero) exactly ``DISCARD ALL``?"""
    return (query_body[:64].lstrip()[:7].lower() == b"discard"
            and _DISCARD_ALL.match(query_body, 0, max(len(query_body) - 1, 0)) is not None)


class ReplyPlan:
    """The FIFO of reply slots of one server connection (see the module docstring)."""

    __slots__ = ("_copy_in", "_skipping", "_slots", "known", "out", "server")

    def __init__(self, server: ServerStatements, known: set[str] | None = None) -> None:
        self.server = server
        self.known = known  # StatementRegistry.known: names a server accepted
        self._slots: deque[Slot] = deque()
        self.out = bytearray()  # fabricated replies due now (``fabricated_before_next``)
        self._skipping = False  # after an error: slots up to the next Sync get no reply
        self._copy_in = False  # copy-in started: Syncs before the CopyDone/CopyFail are ignored

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def idle(self) -> bool:
        """Every reply expected has been handled (and fabricated bytes taken)."""
        return not self._slots and not self.out

    @property
    def has_fabricated(self) -> bool:
        """Fabricated replies are due (``fabricated_before_next`` would return bytes), or a
        fabricated slot waits at the head."""
        return bool(self.out)  # settled: a fabricated slot never waits at the head

    def reset(self) -> None:
        """Forget every slot (the server connection is being reset or closed)."""
        self._slots.clear()
        self.out.clear()
        self._skipping = False
        self._copy_in = False

    def extend(self, slots: Iterable[Slot]) -> None:
        if not self._copy_in and not self._skipping:
            self._slots.extend(slots)
            if self._slots and (self._slots[0].fabricate or self._slots[0].copy_end):
                self._settle()
            return
        for slot in slots:
            if self._copy_in:  # PostgreSQL ignores Sync (and Flush) in copy-in mode
                if slot.copy_end:
                    self._copy_in = False
                    continue
                if slot.sync:
                    continue
            self._slots.append(slot)
        self._settle()

    def fabricated_before_next(self) -> bytes:
        """Bytes pgcorral answers itself whose turn has come; write them to the client now."""
        self._settle()
        out = bytes(self.out)
        self.out.clear()
        return out

    def on_server_reply(self, type_: int) -> str:
        """``"pass"`` or ``"drop"`` for one server message, given its type byte.

        Every method leaves the plan settled (no fabricated slot or copy marker at the head,
        no skipping with a request at the head), so there is nothing to settle first."""
        slots = self._slots
        if not slots or type_ in _ASYNC:
            return PASS
        head = slots[0]
        if type_ == codes.ERROR_RESPONSE:
            if head.ends is _READY:  # a Query or Sync goes on to its ReadyForQuery
                if head.restore:
                    self._restore(head.restore)
                    head.restore = ()
                if head.client_names is not None:
                    client, saved = head.client_names
                    client.names.update(saved)
                    head.client_names = None
                return DROP if head.drop else PASS
            # The failed request and every one up to the next Sync have no effect: undone
            # newest first (a Close after a Parse of the same name must be undone first).
            skipped = [slots.popleft()]
            while slots and not slots[0].sync:
                skipped.append(slots.popleft())
            for slot in reversed(skipped):
                self._undo(slot)
            self._skipping = True
            self._settle()
            return PASS  # the error answers the client's request (ours only when it failed)
        if type_ == codes.COPY_IN_RESPONSE:
            self._start_copy_in()
        elif type_ == codes.EMPTY_QUERY_RESPONSE and head.tag:
            self.out += command_complete(head.tag)
            return DROP
        if type_ in head.ends:
            slots.popleft()
            if head.prepares is not None and self.known is not None:
                self.known.add(head.prepares)
            self._settle()
        return DROP if head.drop else PASS

    def _start_copy_in(self) -> None:
        """The head request entered copy-in: the Syncs queued after it, up to the client's
        CopyDone/CopyFail, get no reply (PostgreSQL ignores them)."""
        head, *after = self._slots
        for i, slot in enumerate(after):
            if slot.copy_end:
                kept = [s for s in after[:i] if not s.sync] + after[i + 1:]
                break
        else:
            kept = [s for s in after if not s.sync]
            self._copy_in = True
        self._slots = deque([head, *kept])

    def _settle(self) -> None:
        """Apply skipping, drop stray markers, collect fabricated replies at the head."""
        slots = self._slots
        while slots:
            head = slots[0]
            if self._skipping and not head.sync:
                slots.popleft()
                self._undo(head)
            elif head.copy_end:
                slots.popleft()
            elif head.fabricate:
                self.out += slots.popleft().fabricate
            else:
                break
        if self._skipping and slots:
            self._skipping = False

    def _undo(self, slot: Slot) -> None:
        """A request that failed or was skipped: its effect on the server did not happen."""
        server = self.server
        if slot.prepares is not None:
            server.discard(slot.prepares)
            server.pending_close.pop(slot.prepares, None)  # never prepared: nothing to close
        if slot.closes is not None and slot.closes not in server:
            server.pending_close[slot.closes] = None
        if slot.restore:
            self._restore(slot.restore)
        if slot.client_undo is not None:
            client, name, done, before = slot.client_undo
            if client.names.get(name) is done:  # not changed again since
                if before is None:
                    client.names.pop(name, None)
                else:
                    client.names[name] = before

    def _restore(self, names: tuple[str, ...]) -> None:
        """A DISCARD ALL failed or was skipped: its statements are still prepared."""
        server = self.server
        for name in names:
            if name not in server:
                server.pending_close.update(dict.fromkeys(server.add(name)))


# --- the translator --------------------------------------------------------------------------

@dataclass(slots=True)
class Rewrite:
    """What to send to the server for one client message, and its reply slots in order."""

    send: bytes
    slots: list[Slot] | tuple[Slot, ...]


def _identifier(match: re.Match[bytes]) -> bytes | None:
    """The statement name of a DEALLOCATE match, None for ALL."""
    if match.group(1) is not None:
        return None
    if match.group(2) is not None:
        return match.group(2).lower()  # PostgreSQL folds unquoted identifiers (ASCII)
    return match.group(3).replace(b'""', b'"')


def _ensure(name: str, identity: bytes, server: ServerStatements, parts: list[bytes],
            slots: list[Slot], drop: bool) -> bool:
    """Make ``name`` usable on the server; True if it already was (nothing sent)."""
    if name in server:
        server.touch(name)
        return True
    present = name in server.pending_close  # evicted, its Close not sent yet
    if present:
        del server.pending_close[name]
    else:
        parts.append(build_parse(name.encode(), identity))
        slots.append(Slot(_PARSE_ENDS, drop=drop, prepares=name))
    server.pending_close.update(dict.fromkeys(server.add(name)))
    return present


def rewrite(type_: int, body: bytes, client: ClientStatements, server: ServerStatements,
            registry: StatementRegistry) -> Rewrite:
    """Translate one client message (``type_``, ``body`` without the header)."""
    if server.capacity <= 0:
        return Rewrite(_header.pack(type_, len(body) + 4) + body, DEFAULT_SLOTS[type_])
    parts: list[bytes] = []
    slots: list[Slot] = []  # built in request order
    if server.at_sync and type_ in _REQUESTS and server.pending_close:
        for name in server.pending_close:
            parts.append(build_target(b"C", _KIND_STATEMENT, name.encode()))
            slots.append(Slot(_CLOSE_ENDS, drop=True, closes=name))
        server.pending_close.clear()
    if type_ == codes.SYNC:
        server.at_sync = True
    elif type_ in _REQUESTS:
        server.at_sync = False
    handled = _translate(type_, body, client, server, registry, parts, slots)
    if not handled:
        parts.append(_header.pack(type_, len(body) + 4) + body)
        if not slots:
            return Rewrite(parts[0], DEFAULT_SLOTS[type_])
        slots.extend(DEFAULT_SLOTS[type_])
    return Rewrite(b"".join(parts), slots)


def _translate(type_: int, body: bytes, client: ClientStatements, server: ServerStatements,
               registry: StatementRegistry, parts: list[bytes], slots: list[Slot]) -> bool:
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
            pooled = registry.name_for(existing)
            _ensure(pooled, existing, server, parts, slots, drop=True)
            parts.append(build_parse(pooled.encode(), identity))
            slots.append(Slot(_PARSE_ENDS))
            return True
        names[name] = identity
        undo = (client, name, identity, None)
        pooled = registry.name_for(identity)
        if not _ensure(pooled, identity, server, parts, slots, drop=False):
            slots[-1].client_undo = undo
        elif server.tx_failed:  # PostgreSQL refuses any Parse here (25P02): let it
            parts.append(build_parse(pooled.encode(), identity))
            slots.append(Slot(_PARSE_ENDS, client_undo=undo))
        else:
            slots.append(Slot(frozenset(), fabricate=PARSE_COMPLETE, client_undo=undo))
        return True
    if type_ == codes.BIND:
        portal, statement, rest = parse_bind(body)
        mapped = names.get(statement) if statement else None
        if mapped is None:
            return False
        pooled = registry.name_for(mapped)
        _ensure(pooled, mapped, server, parts, slots, drop=True)
        parts.append(build_bind(portal, pooled.encode(), rest))
        slots.append(Slot(_BIND_ENDS))
        return True
    if type_ in (codes.DESCRIBE, codes.CLOSE):
        kind, name = parse_target(body, "Describe" if type_ == codes.DESCRIBE else "Close")
        target = names.get(name) if kind == _KIND_STATEMENT and name else None
        if target is None:
            return False
        if type_ == codes.CLOSE:
            del names[name]
            slots.append(Slot(frozenset(), fabricate=CLOSE_COMPLETE,
                              client_undo=(client, name, None, target)))
            return True
        pooled = registry.name_for(target)
        _ensure(pooled, target, server, parts, slots, drop=True)
        parts.append(build_target(b"D", kind, pooled.encode()))
        slots.append(Slot(_DESCRIBE_ENDS))
        return True
    if type_ == codes.QUERY:
        return _translate_query(body, client, server, parts, slots)
    return False


def bind_fast(body: bytes, client: ClientStatements, server: ServerStatements,
              registry: StatementRegistry) -> bytes | None:
    """The hot path of ``rewrite`` for a Bind: a mapped statement the server connection
    already has, renamed in place (the caller plans one BindComplete). None: go through
    ``rewrite`` (unnamed, unknown or missing statement, malformed body)."""
    p1 = body.find(b"\0")
    if p1 < 0:
        return None
    p2 = body.find(b"\0", p1 + 1)
    if p2 <= p1 + 1:
        return None
    identity = client.names.get(body[p1 + 1:p2])
    if identity is None:
        return None
    pooled = registry.name_for(identity)
    if pooled not in server:
        return None
    server.touch(pooled)
    new = body[:p1 + 1] + pooled.encode() + body[p2:]
    return _header.pack(codes.BIND, len(new) + 4) + new


def parse_locally(body: bytes, client: ClientStatements, registry: StatementRegistry) -> bool:
    """A named Parse, with no server linked and no transaction open, of a statement a server
    has accepted before: recorded for the client, answered ParseComplete by the caller, and
    prepared on a server when first used (a Bind or Describe re-Parses it). False: it needs a
    server. This keeps clients that prepare synchronously before each transaction (pgbench
    -M prepared) from waiting for a server only to be told ParseComplete."""
    name, identity = parse_parse(body)
    if not name or name in client.names:  # a second Parse of a name: the server refuses it
        return False
    pooled = registry.lookup(identity)
    if pooled is None or pooled not in registry.known:
        return False
    client.names[name] = identity
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
                     parts: list[bytes], slots: list[Slot]) -> bool:
    if not body.endswith(b"\0"):
        raise ClientProtocolError("malformed Query message: unterminated string")
    head = body[:64].lstrip()[:10].lower()
    if server.tx_failed:
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
        slots.append(Slot(_READY, tag=tag))
        return True
    if head.startswith(b"discard") and _DISCARD_ALL.match(body, 0, len(body) - 1):
        saved = dict(client.names)  # back if it fails (inside a transaction block: 25001)
        client.names.clear()
        parts.append(message(b"Q", body))
        slots.append(Slot(_READY, restore=tuple(server.clear()), client_names=(client, saved)))
        return True
    return False
