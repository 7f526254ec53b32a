"""Names of protocol-level prepared statements in transaction mode: who has which statement.

It owns: ``StatementRegistry`` (per worker: identity -> pooler name ``pgc_<n>``; the identity is
the Parse body after the name, i.e. query + parameter type OIDs, so the same statement shares one
name across clients, for the process's life); ``ServerStatements`` (per server connection: an
LRU of the pooler names prepared there, bounded by ``max_prepared_statements``, 0 = mapping off,
plus ``pending_close``: evicted names still prepared there, whose Close is sent at the start of
the next batch, where PostgreSQL is never skipping messages after an error, so a Close is never
lost and a re-Parse never meets 42P05); ``ClientStatements`` (per client: ``{client name:
(pooler name, identity)}``). Changed by ``protocol.rewrite`` (requests) and
``protocol.replyplan`` (replies). Pure: no I/O, no clock.

Schema changes (issue 14). The registry keeps a schema ``epoch``, bumped by the reply router
on every DDL command tag that passes (``protocol.txrelay``), and the epoch each pooler name was
made in (``born``). A client's new Parse reuses an identity's name only if it was made in the
current epoch (``fresh_for``): otherwise the identity gets a new name, prepared anew wherever
it is used, so a new Parse always sees the schema as it is now. ``retire`` does the same for a
name a server found stale (0A000, a lookup error: ``protocol.repair``). A client's statement
keeps the pooler name it was parsed as: its Bind reaches the statement prepared then (where a
server connection still has it), so a driver that cached the row description meets the
error PostgreSQL gives on its own connection, not rows of a new shape; a statement whose
server name was found stale is moved to the new name (``ClientStatements.moved``) unless its
result type changed (``reshaped``: it fails on with 0A000, as in PostgreSQL). A retired
name stays prepared on the server connections that have it until their LRU evicts it, or is
closed at the next batch start where it failed.
"""

from __future__ import annotations

from collections import OrderedDict

NAME_PREFIX = "pgc_"
#: retired names whose identity is kept (``StatementRegistry.retired``)
RETIRED_KEPT = 4096


class StatementRegistry:
    """Identity -> pooler name, shared by every client and server connection of a worker."""

    __slots__ = ("born", "count", "encoded", "epoch", "identities", "known", "names",
                 "reshaped", "retired")

    def __init__(self) -> None:
        #: identity -> pooler name (read directly by the mapper's hot path, ``bind_fast``)
        self.names: dict[bytes, str] = {}
        #: pooler name -> its bytes on the wire (names in use, and the ``retired`` ones)
        self.encoded: dict[str, bytes] = {}
        #: pooler names some server has accepted (ParseComplete): a later Parse of the same
        #: statement outside a transaction may be answered without a server (``parse_locally``)
        self.known: set[str] = set()
        #: the schema epoch: DDL seen (``bump``)
        self.epoch = 0
        #: pooler name -> the epoch it was made in
        self.born: dict[str, int] = {}
        #: pooler name -> its identity (the names in use only)
        self.identities: dict[str, bytes] = {}
        self.count = 0  # names made so far (the next is pgc_<count + 1>)
        #: retired name -> identity, the newest ``RETIRED_KEPT`` (a server may still report
        #: one stale after another connection retired it)
        self.retired: OrderedDict[str, bytes] = OrderedDict()
        #: retired names a server answered 0A000 (their result type changed): a client's Bind
        #: of one on a connection that lacks it gets 0A000 too (``protocol.repair``), not rows
        #: of the new type from a statement prepared again
        self.reshaped: set[str] = set()

    def lookup(self, identity: bytes) -> str | None:
        return self.names.get(identity)

    def current(self, name: str) -> bool:
        """Was ``name`` made in the current schema epoch (and is it still in use)?"""
        return self.born.get(name, -1) == self.epoch

    def name_for(self, identity: bytes) -> str:
        """The identity's pooler name now (a new one for a new identity)."""
        name = self.names.get(identity)
        if name is None:
            name = self._new(identity)
        return name

    def fresh_for(self, identity: bytes) -> str:
        """The pooler name for a client's new Parse: the identity's name if it was made in
        the current epoch, else a new one (the old one retired)."""
        name = self.names.get(identity)
        if name is None or self.born[name] != self.epoch:
            name = self._new(identity)
        return name

    def retire(self, name: str) -> str | None:
        """A server found ``name`` stale: its identity gets a new name (returned), made in
        the current epoch. None: ``name`` is not in use (retired already, or unknown)."""
        identity = self.identities.get(name)
        if identity is None:
            return None
        return self._new(identity)

    def bump(self) -> None:
        """A schema change went through: names made before are not reused for new Parses."""
        self.epoch += 1

    def _new(self, identity: bytes) -> str:
        old = self.names.get(identity)
        if old is not None:  # retired: server connections and clients' statements hold it
            del self.born[old]
            self.known.discard(old)
            retired = self.retired
            retired[old] = self.identities.pop(old)
            if len(retired) > RETIRED_KEPT:  # (its wire bytes go with it)
                gone = retired.popitem(last=False)[0]
                self.encoded.pop(gone, None)
                self.reshaped.discard(gone)
        self.count += 1
        name = self.names[identity] = f"{NAME_PREFIX}{self.count}"
        self.encoded[name] = name.encode()
        self.born[name] = self.epoch
        self.identities[name] = identity
        return name

    def __len__(self) -> int:
        return len(self.names)


class ServerStatements:
    """The pooler names prepared on one server connection (LRU, most recent last)."""

    __slots__ = ("capacity", "evictions", "hits", "lru", "misses", "pending_close")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # counters for the views: a statement found prepared here, prepared here first,
        # closed to keep within ``capacity``
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        #: the names, least recently used first (the mapper's hot path, ``bind_fast``, looks
        #: names up and touches them here directly)
        self.lru: OrderedDict[str, None] = OrderedDict()
        #: evicted names still prepared on the server, closed at the start of the next batch
        self.pending_close: dict[str, None] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.lru

    def __len__(self) -> int:
        return len(self.lru)

    def names(self) -> list[str]:
        """Least recently used first."""
        return list(self.lru)

    def touch(self, name: str) -> None:
        self.lru.move_to_end(name)

    def add(self, name: str) -> list[str]:
        """Record ``name`` as prepared; the names evicted beyond the bound, oldest first."""
        self.lru[name] = None
        self.lru.move_to_end(name)
        evicted: list[str] = []
        while len(self.lru) > self.capacity:
            evicted.append(self.lru.popitem(last=False)[0])
        self.evictions += len(evicted)
        return evicted

    def discard(self, name: str) -> None:
        self.lru.pop(name, None)

    def clear(self) -> list[str]:
        """Forget every statement (DISCARD ALL, DEALLOCATE ALL, a reset); the names forgotten."""
        gone = list(self.lru) + list(self.pending_close)
        self.lru.clear()
        self.pending_close.clear()
        return gone


#: a client's statement: (pooler name, identity)
Entry = tuple[str, bytes]


class ClientStatements:
    """A client's protocol-level statements: ``{client name: (pooler name, identity)}``."""

    __slots__ = ("names",)

    def __init__(self) -> None:
        self.names: dict[bytes, Entry] = {}

    def identities(self) -> dict[bytes, bytes]:
        """``{client name: identity}``."""
        return {name: entry[1] for name, entry in self.names.items()}

    def moved(self, old: str, new: str) -> None:
        """The pooler name ``old`` was retired for ``new``: the statements on it follow."""
        names = self.names
        for name, entry in list(names.items()):
            if entry[0] == old:
                names[name] = (new, entry[1])

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)
