"""Server roles: which server is the primary, which replicas may serve reads (pure policy).

The health checker (``net.health``) probes every server section and reports a ``Probe`` per
server, or None when the probe failed; ``Topology`` keeps one ``ServerState`` per section and
``decide`` turns them into a ``Snapshot``, the immutable answer every worker routes by:

- **primary**: the one server that answers and is not in recovery. None when no server is
  (the primary is down and nothing was promoted yet) or when two or more are (**split
  brain**: writes are refused with ``refusal`` until exactly one is, or an operator chose one
  with ``switch-to``);
- **replicas**: servers in recovery that answer and whose lag is within the bounds
  (``max_replica_lag`` seconds, ``max_replica_lag_bytes``); a lagging replica is skipped;
- per server its state (``primary``, ``replica``, ``lagging``, ``down``, ``unknown``) and its
  WAL position (``lsn``: the primary's insert position, a replica's replay position), which
  read-your-writes compares with a client's last commit.

Before the first probe round (or with ``health_check = off``) nothing is known: the primary is
the configured one (``switch-to``, else ``primary = on``, else the first section) and there are
no replicas to read from.

No I/O and no clock of its own: the caller passes ``now``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

UNKNOWN = "unknown"
PRIMARY = "primary"
REPLICA = "replica"
LAGGING = "lagging"
DOWN = "down"


@dataclass(frozen=True, slots=True)
class Probe:
    """What one health probe of a server saw."""

    in_recovery: bool
    lsn: int  # primary: pg_current_wal_insert_lsn; replica: pg_last_wal_replay_lsn (bytes)
    lag_seconds: float = 0.0  # replica: time since the last replayed commit, 0 if caught up
    system_identifier: str = ""


@dataclass(slots=True)
class ServerState:
    name: str
    state: str = UNKNOWN
    lsn: int = 0
    lag_bytes: int = 0
    lag_seconds: float = 0.0
    failures: int = 0  # consecutive failed probes
    last_ok: float = 0.0  # when the last probe succeeded (the caller's clock)
    last_error: str = ""
    system_identifier: str = ""

    def view(self) -> dict[str, object]:
        return {"state": self.state, "lsn": self.lsn, "lag_bytes": self.lag_bytes,
                "lag_seconds": round(self.lag_seconds, 3), "failures": self.failures,
                "last_error": self.last_error, "system_identifier": self.system_identifier}


@dataclass(slots=True)
class Snapshot:
    """The routing answer of one decision, sent to every worker (pickled: not frozen, as a
    frozen slotted class does not unpickle). Never changed once made."""

    primary: str | None  # the server writes go to; None: refused (see ``refusal``)
    refusal: str = ""  # why writes are refused ("" when primary is set)
    replicas: tuple[str, ...] = ()  # servers reads may go to, in configuration order
    lsns: tuple[tuple[str, int], ...] = ()  # (server, WAL position) of every server that answered
    states: tuple[tuple[str, str], ...] = ()  # (server, state) of every server
    known: bool = False  # False until the first probe round: configuration only
    generation: int = 0  # counts decisions that changed the primary
    #: when the round began (time.monotonic, the same clock in every process): the primary's
    #: position in ``lsns`` is at or past every commit that ended before (read-your-writes)
    at: float = 0.0

    def lsn_of(self, name: str) -> int:
        for server, lsn in self.lsns:
            if server == name:
                return lsn
        return 0

    def state_of(self, name: str) -> str:
        for server, state in self.states:
            if server == name:
                return state
        return UNKNOWN


@dataclass(slots=True)
class Topology:
    """The servers' states and the decision over them (see the module docstring)."""

    names: tuple[str, ...]
    configured: str  # the configured primary (switch-to, primary = on, first section)
    max_lag_seconds: float = 0.0  # 0: no bound
    max_lag_bytes: int = 0  # 0: no bound
    servers: dict[str, ServerState] = field(default_factory=dict)
    chosen: str | None = None  # switch-to by an operator: wins a split brain
    primary: str | None = None  # the last decision's primary
    generation: int = 0
    rounds: int = 0

    def __post_init__(self) -> None:
        for name in self.names:
            self.servers.setdefault(name, ServerState(name))

    def observe(self, name: str, probe: Probe | None, now: float, error: str = "") -> None:
        """A probe of ``name`` finished: what it saw, or None when it failed."""
        state = self.servers[name]
        if probe is None:
            state.failures += 1
            state.state = DOWN
            state.last_error = error
            return
        state.failures = 0
        state.last_ok = now
        state.last_error = ""
        state.lsn = probe.lsn
        state.lag_seconds = probe.lag_seconds
        state.system_identifier = probe.system_identifier
        state.state = REPLICA if probe.in_recovery else PRIMARY

    def decide(self, at: float = 0.0) -> Snapshot:
        """The routing answer after a round of probes (every server observed once) that
        began at ``at``."""
        self.rounds += 1
        claimants = [n for n in self.names if self.servers[n].state == PRIMARY]
        refusal = ""
        if len(self.names) == 1:  # one server: the checks only report (nothing to fail over
            primary: str | None = self.names[0]  # to; a standby alone still serves reads)
        elif len(claimants) == 1:
            primary = claimants[0]
        elif not claimants:
            primary = None
            refusal = "no primary server: " + (
                ", ".join(f"{n} {self.servers[n].state}" for n in self.names))
        elif self.chosen in claimants:  # an operator resolved the split brain
            primary = self.chosen
        else:
            primary = None
            refusal = ("split brain: servers " + " and ".join(claimants)
                       + " both claim to be primary; writes are refused until exactly one "
                       "does (or an operator runs switch-to)")
        if primary is not None and primary != self.primary:
            self.generation += 1
        self.primary = primary
        head = self.servers[primary].lsn if primary is not None else max(
            (s.lsn for s in self.servers.values() if s.state == PRIMARY), default=0)
        replicas = []
        for name in self.names:
            server = self.servers[name]
            if server.state not in (REPLICA, LAGGING):
                continue
            server.lag_bytes = max(0, head - server.lsn) if head else 0
            lagging = (self.max_lag_bytes > 0 and server.lag_bytes > self.max_lag_bytes) or (
                self.max_lag_seconds > 0 and server.lag_seconds > self.max_lag_seconds)
            server.state = LAGGING if lagging else REPLICA
            if not lagging:
                replicas.append(name)
        return Snapshot(
            primary=primary, refusal=refusal, replicas=tuple(replicas),
            lsns=tuple((n, self.servers[n].lsn) for n in self.names
                       if self.servers[n].state != DOWN),
            states=tuple((n, self.servers[n].state) for n in self.names),
            known=True, generation=self.generation, at=at)

    def failover_candidate(self) -> str | None:
        """With no primary: the replica that replayed the most WAL (None if none answers)."""
        best: ServerState | None = None
        for name in self.names:
            server = self.servers[name]
            if server.state in (REPLICA, LAGGING) and (best is None or server.lsn > best.lsn):
                best = server
        return best.name if best is not None else None


def configured_snapshot(configured: str) -> Snapshot:
    """Before any probe: writes go to the configured primary, no replica serves reads."""
    return Snapshot(primary=configured)


def pick_replica(snapshot: Snapshot, min_lsn: int, busy: dict[str, int], turn: int,
                 least_busy: bool) -> str | None:
    """A replica for a read that must see WAL position ``min_lsn`` (0: any), or None when no
    replica qualifies (the read then goes to the primary). ``least_busy``: the replica with
    the fewest connections in use here (``busy``), ties broken by ``turn``; else round robin
    by ``turn``."""
    eligible: Sequence[str] = snapshot.replicas
    if min_lsn:
        eligible = [r for r in eligible if snapshot.lsn_of(r) >= min_lsn]
    if not eligible:
        return None
    count = len(eligible)
    if not least_busy:
        return eligible[turn % count]
    best = None
    best_busy = 0
    for i in range(count):
        name = eligible[(turn + i) % count]
        used = busy.get(name, 0)
        if best is None or used < best_busy:
            best, best_busy = name, used
    return best
