"""Names of protocol-level prepared statements in transaction mode: who has which statement.

It owns: ``StatementRegistry`` (per worker: identity -> pooler name ``pgc_<n>``; the identity is
the Parse body after the name, i.e. query + parameter type OIDs, so the same statement shares one
name across clients, for the process's life); ``ServerStatements`` (per server connection: an
LRU of the pooler names prepared there, bounded by ``max_prepared_statements``, 0 = mapping off,
plus ``pending_close``: evicted names still prepared there, whose Close is sent at the start of
the next batch, where PostgreSQL is never skipping messages after an error, so a Close is never
lost and a re-Parse never meets 42P05); ``ClientStatements`` (per client: ``{client name:
identity}``). Changed by ``protocol.rewrite`` (requests) and ``protocol.replyplan`` (replies).
Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict

NAME_PREFIX = "pgc_"


class StatementRegistry:
    """Identity -> pooler name, shared by every client and server connection of a worker."""

    __slots__ = ("encoded", "known", "names")

    def __init__(self) -> None:
        #: identity -> pooler name (read directly by the mapper's hot path, ``bind_fast``)
        self.names: dict[bytes, str] = {}
        #: pooler name -> its bytes on the wire
        self.encoded: dict[str, bytes] = {}
        #: pooler names some server has accepted (ParseComplete): a later Parse of the same
        #: statement outside a transaction may be answered without a server (``parse_locally``)
        self.known: set[str] = set()

    def lookup(self, identity: bytes) -> str | None:
        return self.names.get(identity)

    def name_for(self, identity: bytes) -> str:
        name = self.names.get(identity)
        if name is None:
            name = self.names[identity] = f"{NAME_PREFIX}{len(self.names) + 1}"
            self.encoded[name] = name.encode()
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


class ClientStatements:
    """A client's protocol-level statements: ``{client name: identity}``."""

    __slots__ = ("names",)

    def __init__(self) -> None:
        self.names: dict[bytes, bytes] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)
