"""The health checker: probes every server, decides the roles, runs failover (issue 13).

One ``HealthChecker`` runs in the process that owns management (the ``Daemon`` with one
worker, the ``Supervisor`` with several), so there is one view of the servers and one
failover, whatever the number of workers. Every ``health_check_period`` it probes each server
section on a connection of its own (kept between rounds, opened again after a failure) as
``health_check_user`` (database of the same name, pgagroal's rule; the password from the users
vault, or none for trust), with ``health_check_timeout`` per probe. The probe is one query:
``pg_is_in_recovery()``, the WAL position and the replay lag.

``pool.topology`` turns the probes into a ``Snapshot``; when it changes, ``publish`` sends it
to every worker (``net.control.set_topology``), which routes new transactions by it and closes
its idle connections to servers that are down or changed role.

Failover (``failover = on``): when the primary stops answering and no other server claims the
primary role, the replica that replayed the most WAL is the candidate, and ``failover_script``
runs as pgagroal runs it (``old_host old_port new_host new_port``, waited for). On exit 0 the
checker probes again at once and follows the role the servers then report: pgcorral never
marks a server primary that does not say so itself. Whoever promotes (the script, Patroni, an
operator), once exactly one server is out of recovery writes go there, and
``failover_notify_script`` runs (``old_host old_port new_host new_port [replica_host
replica_port]...``). Each step is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pgcorral.config import Config, ServerConfig
from pgcorral.net import dial
from pgcorral.net.auth import VaultLogin
from pgcorral.net.server import ServerConnection
from pgcorral.pool.pool import Slot
from pgcorral.pool.topology import Probe, Snapshot, Topology
from pgcorral.security import tls
from pgcorral.security.secrets import Secrets

log = logging.getLogger("pgcorral.health")

#: the round interval while there is no primary (a failover under way), at most
FAILOVER_PERIOD = 0.2

#: One round trip: role, WAL position (as a byte count), replay lag in seconds (0 when the
#: replica replayed all it received), system identifier. Every name schema-qualified.
PROBE_SQL = (
    "SELECT r, (CASE WHEN r THEN pg_catalog.pg_last_wal_replay_lsn()"
    " ELSE pg_catalog.pg_current_wal_insert_lsn() END"
    " OPERATOR(pg_catalog.-) '0/0'::pg_catalog.pg_lsn)::pg_catalog.int8,"
    " CASE WHEN NOT r OR pg_catalog.pg_last_wal_receive_lsn()"
    " OPERATOR(pg_catalog.<=) pg_catalog.pg_last_wal_replay_lsn() THEN 0"
    " ELSE COALESCE(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()"
    " OPERATOR(pg_catalog.-) pg_catalog.pg_last_xact_replay_timestamp()), 0) END,"
    " (SELECT system_identifier FROM pg_catalog.pg_control_system())::pg_catalog.text,"
    " pg_catalog.current_setting('wal_segment_size', true),"
    " pg_catalog.current_setting('wal_block_size', true)"
    " FROM (SELECT pg_catalog.pg_is_in_recovery() AS r) AS s")

_UNITS = {"B": 1, "kB": 1024, "MB": 1024 * 1024, "GB": 1024 * 1024 * 1024}


def _size(text: str, default: int) -> int:
    """A size setting as current_setting shows it ("16MB", "8192")."""
    text = text.strip()
    for unit, factor in _UNITS.items():
        if text.endswith(unit) and text[:-len(unit)].isdigit():
            return int(text[:-len(unit)]) * factor
    return int(text) if text.isdigit() else default


def record_end(lsn: int, segment: int, block: int) -> int:
    """The end of the last WAL record, from the primary's insert position. At the start of
    a page the insert position has skipped the page header (40 bytes at a segment's start,
    24 at another page's), while a replica that replayed everything reports the end of the
    record, the page boundary: without this a caught-up replica would look 24 or 40 bytes
    behind (read-your-writes would never choose it)."""
    if segment > 0 and lsn % segment == 40:
        return lsn - 40
    if block > 0 and lsn % block == 24:
        return lsn - 24
    return lsn

#: The longest a failover or notify script may run before it is killed.
SCRIPT_TIMEOUT = 120.0


def _ignore(_: ServerConnection) -> None:
    pass


class HealthChecker:
    def __init__(self, config: Config, secrets: Secrets,
                 publish: Callable[[Snapshot], None],
                 chosen: Callable[[], str | None]) -> None:
        self.config = config
        self.secrets = secrets
        self._publish = publish
        self._chosen = chosen  # the server switch-to named, if any
        self.topology = self._new_topology(config)
        self.snapshot: Snapshot | None = None
        self._conns: dict[str, ServerConnection] = {}
        self._tls: dict[str, tls.ServerSideTls] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failover_tried: str | None = None  # the lost primary a script ran for
        self._lost_primary: str | None = None  # the primary before the one now missing
        self.failovers = 0

    @staticmethod
    def _new_topology(config: Config) -> Topology:
        main = config.main
        return Topology(tuple(s.name for s in config.servers),
                        config.current_server(None).name,
                        max_lag_seconds=main.max_replica_lag,
                        max_lag_bytes=main.max_replica_lag_bytes)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and self.config.main.health_check:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for conn in self._conns.values():
            conn.terminate()
        self._conns.clear()

    def apply(self, config: Config, secrets: Secrets) -> None:
        """A reload: new servers, keys and passwords from the next round on."""
        old = self.config
        self.config, self.secrets = config, secrets
        self._tls.clear()
        if [s for s in old.servers] != [s for s in config.servers] or \
                old.main.health_check_user != config.main.health_check_user:
            for conn in self._conns.values():
                conn.terminate()
            self._conns.clear()
            states = self.topology.servers
            self.topology = self._new_topology(config)
            for name, state in states.items():
                if name in self.topology.servers:
                    self.topology.servers[name] = state
        self.topology.max_lag_seconds = config.main.max_replica_lag
        self.topology.max_lag_bytes = config.main.max_replica_lag_bytes
        if config.main.health_check:
            self.start()
            self.poke()
        else:
            self.stop()

    def poke(self) -> None:
        """Probe again now (after a failover script, a switch-to, a reload)."""
        self._wake.set()

    # --- the rounds --------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # (before the round: a poke during it asks for another)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the probing
                log.exception("health check round failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.period())
            except TimeoutError:
                pass

    def period(self) -> float:
        """Seconds to the next round: ``health_check_period``, shorter while there is no
        primary (writes and new connections wait for one: a new primary is seen within
        FAILOVER_PERIOD of its promotion, not up to a whole period later)."""
        period = self.config.main.health_check_period
        snapshot = self.snapshot
        if snapshot is not None and snapshot.primary is None and \
                len(self.config.servers) > 1:
            return min(period, FAILOVER_PERIOD)
        return period

    async def round(self) -> Snapshot:
        """Probe every server once, decide, publish a change, fail over if needed."""
        servers = self.config.servers
        began = time.monotonic()
        results = await asyncio.gather(*(self._probe(s) for s in servers))
        now = time.monotonic()
        topology = self.topology
        topology.chosen = self._chosen()
        for server, (probe, error) in zip(servers, results, strict=True):
            before = topology.servers[server.name].state
            topology.observe(server.name, probe, now, error)
            after = topology.servers[server.name].state
            if before != after and not (before in ("replica", "lagging")
                                        and after in ("replica", "lagging")):
                level = logging.WARNING if after == "down" else logging.INFO
                log.log(level, "health: server %s at %s:%d is %s%s", server.name, server.host,
                        server.port, after, f" ({error})" if error else "")
        previous = self.snapshot
        snapshot = topology.decide(began)
        self.snapshot = snapshot
        self._log_change(previous, snapshot)
        self._publish(snapshot)  # every round: read-your-writes needs each round's mark
        if previous is not None and previous.primary and snapshot.primary is None:
            self._lost_primary = previous.primary
        if snapshot.primary is not None:
            if self._lost_primary and snapshot.primary != self._lost_primary:
                await self._notify(self._lost_primary, snapshot)
                self.failovers += 1
            self._lost_primary = None
            self._failover_tried = None
        elif self._lost_primary and not snapshot.refusal.startswith("split brain"):
            await self._failover(self._lost_primary)
        return snapshot

    def _log_change(self, previous: Snapshot | None, snapshot: Snapshot) -> None:
        if previous is not None and previous.primary == snapshot.primary and \
                previous.refusal == snapshot.refusal:
            return
        if snapshot.primary is not None:
            server = self.config.server_named(snapshot.primary)
            assert server is not None
            log.info("health: primary is %s at %s:%d; replicas for reads: %s", server.name,
                     server.host, server.port, ", ".join(snapshot.replicas) or "none")
        elif snapshot.refusal.startswith("split brain"):
            log.error("health: %s", snapshot.refusal)
        else:
            log.warning("health: %s; writes wait for a new primary", snapshot.refusal)

    async def _probe(self, server: ServerConfig) -> tuple[Probe | None, str]:
        main = self.config.main
        try:
            async with asyncio.timeout(main.health_check_timeout or None):
                conn = self._conns.get(server.name)
                if conn is None or conn.closed:
                    conn = await self._connect(server)
                    self._conns[server.name] = conn
                rows = await conn.query_rows(PROBE_SQL, [])
            row = rows[0]
            values = [v.decode() if v is not None else "" for v in row]
            lsn = int(values[1] or 0)
            if values[0] != "t":
                lsn = record_end(lsn, _size(values[4], 16 << 20), _size(values[5], 8192))
            return Probe(in_recovery=values[0] == "t", lsn=lsn,
                         lag_seconds=float(values[2] or 0), system_identifier=values[3]), ""
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            conn = self._conns.pop(server.name, None)
            if conn is not None:
                conn.terminate()
            return None, str(exc) or type(exc).__name__

    async def _connect(self, server: ServerConfig) -> ServerConnection:
        user = self.config.main.health_check_user
        side = self._tls.get(server.name)
        if side is None:
            side = self._tls[server.name] = tls.server_side(server)
        slot = Slot(0, (user, user), None, time.monotonic())

        def factory() -> ServerConnection:
            return ServerConnection(slot, _ignore)

        conn = await dial.connect(server, factory, self.config.main.health_check_timeout or None,
                                  side)
        conn.binding_policy = server.channel_binding
        conn.server_name = server.name
        try:
            await conn.login(user, user, VaultLogin(user, self.secrets.backend_password(user)))
        except BaseException:
            conn.terminate()
            raise
        return conn

    # --- failover ----------------------------------------------------------------------------

    async def _failover(self, lost: str) -> None:
        main = self.config.main
        if not main.failover or not main.failover_script or self._failover_tried == lost:
            return
        candidate = self.topology.failover_candidate()
        if candidate is None:
            log.warning("failover: primary %s is down and no replica answers; waiting", lost)
            return
        self._failover_tried = lost
        old, new = self.config.server_named(lost), self.config.server_named(candidate)
        assert old is not None and new is not None
        log.warning("failover: primary %s is down; promoting %s with %s", lost, candidate,
                    main.failover_script)
        code = await _run_script(main.failover_script,
                                 [old.host, str(old.port), new.host, str(new.port)])
        if code == 0:
            log.warning("failover: %s exited 0; waiting for %s to leave recovery",
                        main.failover_script, candidate)
            self.poke()
        else:
            log.error("failover: %s exited with %s; %s stays a replica, writes stay refused "
                      "(run switch-to or clear server once a primary is back)",
                      main.failover_script, code, candidate)

    async def _notify(self, lost: str, snapshot: Snapshot) -> None:
        assert snapshot.primary is not None
        old, new = self.config.server_named(lost), self.config.server_named(snapshot.primary)
        if old is None or new is None:
            return
        log.warning("failover: writes go to %s at %s:%d (was %s at %s:%d)", new.name, new.host,
                    new.port, old.name, old.host, old.port)
        script = self.config.main.failover_notify_script
        if not script:
            return
        args = [old.host, str(old.port), new.host, str(new.port)]
        for name in snapshot.replicas:
            replica = self.config.server_named(name)
            if replica is not None:
                args += [replica.host, str(replica.port)]
        code = await _run_script(script, args)
        log.info("failover: %s exited with %s", script, code)

    def view(self) -> dict[str, Any]:
        """Per server state for ``status details`` and the metrics."""
        return {name: state.view() for name, state in self.topology.servers.items()}


async def _run_script(path: str, args: list[str]) -> int | None:
    """Run ``path args...`` and wait for it (killed after SCRIPT_TIMEOUT); its exit code."""
    try:
        process = await asyncio.create_subprocess_exec(
            path, *args, stdin=asyncio.subprocess.DEVNULL)
    except OSError as exc:
        log.error("failover: cannot run %s: %s", path, exc)
        return None
    try:
        return await asyncio.wait_for(process.wait(), SCRIPT_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        log.error("failover: %s did not finish within %.0f s; killed", path, SCRIPT_TIMEOUT)
        return None
