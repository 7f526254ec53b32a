"""The state of one worker: its configuration snapshot, pool, clients and what they share.

What acts on this state lives beside it, one concern per module: ``dial`` (sockets to
PostgreSQL), ``cancels`` (the cancel-key table), ``control`` (what management asks of a worker),
``maintenance`` (prefill, expiry, validation, disconnect_client) and ``authquery``. Here remain
the few actions every connection needs: opening a server connection for a slot, giving one
back to the pool, and forwarding a CancelRequest.

Which pipeline serves clients is chosen once, when the worker starts (``net.pipeline``): the
factory of its server connections arrives here as ``new_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pgcorral.config import Config, HbaRule, ServerConfig
from pgcorral.errors import DatabaseDisabled, NoPrimary, ServerUnavailable
from pgcorral.net import dial
from pgcorral.net.authquery import AuthQuery
from pgcorral.net.cancels import CancelKeys
from pgcorral.net.notify import Hubs, Sender
from pgcorral.net.server import ServerConnection
from pgcorral.net.waits import WaitTimer
from pgcorral.pool.budget import Budget
from pgcorral.pool.pool import ACTIVE, Pool, Slot, apply_limits
from pgcorral.pool.stats import GroupStats, PoolStats, group_key
from pgcorral.pool.topology import Snapshot, configured_snapshot, pick_replica
from pgcorral.protocol.statements import StatementRegistry
from pgcorral.security import tls
from pgcorral.security.secrets import Secrets

if TYPE_CHECKING:
    from pgcorral.net.client import ClientConnection
    from pgcorral.net.transaction import TxLogin

log = logging.getLogger("pgcorral.context")

#: The counters ``clear prometheus`` resets.
COUNTERS = ("client_connections", "logins_refused_disabled", "flushed_connections",
            "management_commands", "server_connections_adopted", "logins_success",
            "logins_bad_password", "logins_refused", "logins_error",
            "clients_refused_too_many", "notifications_delivered", "notify_reconnects",
            "notify_maybe_missed")

#: Makes the server connection of a slot: (context, slot, on_lost) -> connection.
ServerFactory = Callable[["Context", Slot, Callable[[ServerConnection], None]], ServerConnection]


def session_server(ctx: Context, slot: Slot,
                   on_lost: Callable[[ServerConnection], None]) -> ServerConnection:
    conn = ServerConnection(slot, on_lost)
    conn.pstats = ctx.pool_stats(slot.key)
    return conn


class Context:
    def __init__(self, config: Config, secrets: Secrets | None = None, *,
                 new_server: ServerFactory = session_server, worker: int = 0,
                 budget: Budget | None = None) -> None:
        self.config = config
        self.secrets = secrets or Secrets()
        self.worker = worker  # this worker's index (0 with one process)
        self.new_server = new_server
        self.pool = Pool(config.main.max_connections, config.limits, time.monotonic, budget)
        self.clients: set[ClientConnection] = set()
        self.shutting_down = False
        self.pinned = 0  # transaction pipeline: clients pinned to a server connection
        #: shutdown wait_for_clients: listeners closed, stopping once the clients have left
        #: by themselves (``shutting_down`` stays False: nobody is told to go)
        self.draining = False
        self.too_many_logged = 0.0  # when a refusal for max_client_conn was last logged
        self.workers = 1  # worker processes sharing max_client_conn (set by the worker)
        self.cancels: CancelKeys[ClientConnection] = CancelKeys(worker)
        #: set by the worker runtime with several workers: hand a CancelRequest that matches
        #: no client here to the other workers
        self.cancel_elsewhere: Callable[[int, bytes], None] | None = None
        #: ``so_reuseport``: a key no client of this pgcorral has goes to the other processes
        #: on the port (``supervisor.peers``); set in the process that owns the listeners
        self.cancel_peers: Callable[[int, bytes], None] | None = None
        #: set by the worker runtime with several workers in session pooling: an idle
        #: connection another worker's client waits for is offered to it (net.handoff)
        self.offer: Callable[[tuple[str, str], int], None] | None = None
        #: set by the daemon (one process) or the worker process: answers one statement of the
        #: SQL admin console (``management.sqlconsole``) as protocol messages, for the whole
        #: pooler; (statement, admin?) -> bytes. None: no console (tests of one Context)
        self.admin_console: Callable[[str, bool], Awaitable[bytes]] | None = None
        self.all_idle = asyncio.Event()
        self.aliases = config.aliases()
        self.auth_query = AuthQuery()
        self.prefill_initial = False  # set by a flush: prefill INITIAL_SIZE, not just MIN_SIZE
        self.hba_cache: dict[tuple[str, str, str, str | None, bool], HbaRule | None] = {}
        # (setting, requested value) -> the value PostgreSQL reported (pipelines.settings)
        self.learned: dict[tuple[str, str], str] = {}
        self.disabled: set[str] = set()  # databases refusing new logins; "*" = all
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.failed_servers: set[str] = set()
        #: connections to each server section that failed to open (pgagroal_server_error)
        self.server_errors: dict[str, int] = {}
        self.switched_to: str | None = None  # switch-to: the server new connections go to
        #: issue 13: the servers' roles as the health checker last saw them
        #: (``supervisor.health``); before its first round, the configured primary only
        self.topology: Snapshot = configured_snapshot(config.current_server(None).name)
        #: ask the health checker for a round now: the checker's ``poke`` with one worker, a
        #: message to the supervisor with several (set by the runtime); None: no checker
        self.probe_now: Callable[[], None] | None = None
        #: resolved at the next topology (``_primary_after_failure`` waits on them)
        self._topology_waiters: list[asyncio.Future[None]] = []
        #: a pool per replica server section that served reads here (``pool_for``)
        self.replica_pools: dict[str, Pool] = {}
        self.read_turn = 0  # round robin over the replicas
        #: (when a health round began, the primary's WAL insert position it read): the last
        #: rounds, oldest first, for read-your-writes (``read_pool``)
        self.wal_marks: deque[tuple[float, int]] = deque(maxlen=64)
        self.reads_to_replica = 0  # read routes served by a replica / by the primary
        self.reads_to_primary = 0
        self.started_at = time.time()
        #: counters per (real database, user) and per client group (pool.stats)
        self.stats: dict[tuple[str, str], PoolStats] = {}
        self.groups: dict[tuple[str, str, str], GroupStats] = {}
        # transaction pipeline: pooler names of prepared statements, shared by all clients
        self.registry = StatementRegistry()
        # transaction pipeline: what the last login of each (database, user) showed
        self.tx_logins: dict[tuple[str, str], TxLogin] = {}
        # transaction pipeline, LISTEN/NOTIFY (net.notify): the listening connections, and
        # who ran the last transactions on each backend pid (NotificationResponse pids)
        self.notify = Hubs(self)
        self.notify_senders: dict[int, Sender] = {}
        # blocking_timeout of every waiting client, both pipelines
        self.waits = WaitTimer(self.pool)
        self._loop: asyncio.AbstractEventLoop | None = None
        #: TLS toward clients (None: tls off) and toward each server, by section name; built
        #: again at every reload (``apply``: new files for new connections)
        self.client_tls: tls.ClientSideTls | None = None
        self.server_tls: dict[str, tls.ServerSideTls] = {}
        #: counts reloads that changed a server's TLS settings; a server connection opened
        #: under an older one is not pooled again (``release_server``)
        self.tls_generation = 0
        self._load_tls(config, startup=True)

    def client_limit(self) -> int:
        """Clients this worker accepts at once: its share of max_client_conn, or (auto) what
        the descriptor limit leaves after max_connections + 64 (read each time: an operator
        may raise the limit of the running process with prlimit)."""
        main = self.config.main
        if main.max_client_conn > 0:
            return -(-main.max_client_conn // self.workers)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 1 << 30
        return max(1, soft - self.pool.max_connections - 64)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The worker's event loop, kept: ``asyncio.get_running_loop`` asks the kernel for the
        process id each time, and every connection needs the loop a few times."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def pool_stats(self, key: tuple[str, str]) -> PoolStats:
        """The counters of the (real database, user) pool ``key``, made on first use."""
        stats = self.stats.get(key)
        if stats is None:
            stats = self.stats[key] = PoolStats()
        return stats

    def retire(self, client: ClientConnection) -> None:
        """A client left: its counters join its pool's and its group's."""
        if not client.linked_once:
            return
        client.pstats.retired.add(client.tally)
        groups = self.groups
        key = group_key(groups, (client.address or "[local]",
                                 client.settings.get("application_name", ""), client.user))
        group = groups.get(key)
        if group is None:
            group = groups[key] = GroupStats()
        group.clients += 1
        group.tally.add(client.tally)

    @property
    def server(self) -> ServerConfig:
        """The server writes (and new connections of the primary pool) go to."""
        primary = self.topology.primary
        if primary is not None and self.topology.known:
            server = self.config.server_named(primary)
            if server is not None:
                return server
        return self.config.current_server(self.switched_to)

    # --- read routing (issue 13) -------------------------------------------------------------

    @property
    def has_replicas(self) -> bool:
        return bool(self.topology.replicas)

    def read_pool(self, wrote_at: float) -> Pool:
        """The pool a read-only transaction or session takes a connection from: a healthy
        replica's, chosen by ``replica_balance``; else the primary pool.

        Read-your-writes: ``wrote_at`` is when the client's last transaction on the primary
        ended (0.0: never, or the check is off). The first health round that began after it
        read the primary's WAL insert position, which is at or past that transaction's
        commit record; only a replica that has replayed that far qualifies. Until such a
        round, the read goes to the primary. No query on the client's path: the cost is
        that reads right after a write go to the primary for up to one
        ``health_check_period`` (plus the replica's replay delay)."""
        snapshot = self.topology
        name = None
        min_lsn = 0
        if wrote_at:
            for at, head in self.wal_marks:
                if at > wrote_at:
                    min_lsn = head
                    break
            else:
                min_lsn = -1  # no round since the write: no replica is known to have it
        if snapshot.replicas and min_lsn >= 0:
            self.read_turn += 1
            busy: dict[str, int] = {}
            least_busy = self.config.main.replica_balance == "least_busy"
            if least_busy:
                for replica in snapshot.replicas:
                    pool = self.replica_pools.get(replica)
                    busy[replica] = 0 if pool is None else pool.count(ACTIVE)
            name = pick_replica(snapshot, min_lsn, busy, self.read_turn, least_busy)
        if name is None:
            self.reads_to_primary += 1
            return self.pool
        self.reads_to_replica += 1
        return self.pool_for(name)

    def pool_for(self, server: str) -> Pool:
        """The pool of replica ``server``, made on first use (sharing the budget)."""
        pool = self.replica_pools.get(server)
        if pool is None:
            main = self.pool
            pool = Pool(main.max_connections, main.limits, time.monotonic, main.budget,
                        server=server)
            pool.paused = set(main.paused)  # PAUSE/RESUME hold for every server
            pool.on_starved = main.on_starved
            self.replica_pools[server] = pool
            self.waits.pools.append(pool)
        return pool

    def pools(self) -> list[Pool]:
        return [self.pool, *self.replica_pools.values()]

    @staticmethod
    def pool_of(slot: Slot, default: Pool) -> Pool:
        home = slot.home
        return home if home is not None else default

    def set_topology(self, snapshot: Snapshot) -> None:
        """A new decision of the health checker: route by it, and close what it retired.
        Idle connections of the primary pool to another server than the primary (or to any
        server when writes are refused) are closed and busy ones are not pooled again; a
        replica pool of a server no longer a healthy replica is emptied the same way."""
        old, self.topology = self.topology, snapshot
        waiters, self._topology_waiters = self._topology_waiters, []
        for waiter in waiters:  # connections that found the primary gone (``open_server``)
            if not waiter.done():
                waiter.set_result(None)
        primary = snapshot.primary
        # no primary (not a split brain): a failover is under way; write transactions and
        # logins wait for the new primary (blocking_timeout), as under PAUSE
        self.pool.hold(primary is None and not snapshot.refusal.startswith("split brain"))
        if primary is not None and snapshot.at:
            self.wal_marks.append((snapshot.at, snapshot.lsn_of(primary)))
        closed = marked = 0
        for pool in self.pools():
            if pool is self.pool:
                keep = primary
            else:
                keep = pool.server if pool.server in snapshot.replicas else None
            for slot in pool.slots():
                conn = slot.conn
                if conn is None or conn.server_name == keep:
                    continue
                if slot.state == "idle":
                    conn.terminate()
                    pool.discard(slot)
                    closed += 1
                elif conn.poolable:
                    conn.poolable = False
                    marked += 1
        if old.primary != primary or closed or marked:
            log.info("topology: primary %s, replicas %s; %d idle server connections closed, "
                     "%d closed when their clients are done", primary or "none (refused)",
                     ", ".join(snapshot.replicas) or "none", closed, marked)

    def no_primary(self, waited: float) -> NoPrimary:
        """The error of a client that waited ``waited`` seconds for a new primary."""
        return NoPrimary(f"no primary server: none became available within {waited:g} s "
                         f"({self.topology.refusal})")

    def check_writable(self) -> None:
        """NoPrimary (57P03) when the health checker sees no single primary."""
        snapshot = self.topology
        if snapshot.primary is None:
            refusal = snapshot.refusal
            raise NoPrimary(refusal if refusal.startswith(("split brain", "no primary server"))
                            else f"no primary server: {refusal}")

    def apply(self, config: Config, secrets: Secrets) -> None:
        """A reloaded configuration: new hba, limits, vaults and reloadable keys for new
        clients. A server connection opened with TLS settings this reload changed is closed:
        now if idle, else when its client leaves."""
        old_config, old_tls = self.config, self.server_tls
        self.config = config
        self.secrets = secrets
        self.aliases = config.aliases()
        self.hba_cache.clear()
        self.tx_logins.clear()  # a changed vault or hba: logins go through a server again
        apply_limits(self.pools(), config.limits)
        self._load_tls(config, startup=False)
        if _tls_changed(old_config, old_tls, config, self.server_tls):
            self._retire_server_connections()

    def _load_tls(self, config: Config, startup: bool) -> None:
        """The TLS contexts of ``config``, read from their files again. At a reload, a file
        that does not load keeps the context in use (one log line naming it, from worker 0:
        every worker reads the same files); at startup the configuration check
        (``config.load``) already refused it, so this raises."""
        try:
            client = tls.client_side(config.main, any(rule.clientcert for rule in config.hba))
        except tls.TlsFileError as exc:
            if startup:
                raise
            self._tls_not_reloaded(exc)
        else:
            self.client_tls = client
        servers: dict[str, tls.ServerSideTls] = {}
        for server in config.servers:
            try:
                servers[server.name] = tls.server_side(server)
            except tls.TlsFileError as exc:
                if startup:
                    raise
                self._tls_not_reloaded(exc, server.name)
                old = self.server_tls.get(server.name)
                if old is not None:
                    servers[server.name] = old
        self.server_tls = servers

    def _retire_server_connections(self) -> None:
        """The TLS settings changed: no connection opened before serves a client again."""
        self.tls_generation += 1
        closed = 0
        for slot in self.pool.idle_slots():
            slot.conn.terminate()
            self.pool.discard(slot)
            closed += 1
        self.auth_query.close()
        self.prefill_initial = True  # prefill again, with the new settings
        log.info("reload: server TLS settings changed; %d idle server connections closed, "
                 "the ones in use close when their clients leave", closed)

    def _tls_not_reloaded(self, exc: tls.TlsFileError, server: str | None = None) -> None:
        if self.worker == 0:
            where = f"server [{server}] " if server else ""
            log.error("reload: %s%s; keeping the TLS settings in use", where, exc)

    def is_disabled(self, database: str) -> bool:
        disabled = self.disabled
        return bool(disabled) and ("*" in disabled or database in disabled
                                   or self.config.real_database(database) in disabled)

    def check_enabled(self, database: str) -> None:
        """Raise DatabaseDisabled (57P03) if ``database`` refuses new logins."""
        if self.is_disabled(database):
            self.counters["logins_refused_disabled"] += 1
            raise DatabaseDisabled("connection refused",
                                   detail=f'database "{database}" is disabled')

    # --- server connections ------------------------------------------------------------------

    async def open_server(self, slot: Slot,
                          on_lost: Callable[[ServerConnection], None] | None = None,
                          ) -> ServerConnection:
        """Connect to PostgreSQL for ``slot`` (not yet logged in)."""
        lost = on_lost or self.server_lost
        new_server = self.new_server

        def factory() -> ServerConnection:
            return new_server(self, slot, lost)

        home = slot.home
        if home is not None and home.server:
            replica = self.config.server_named(home.server)
            if replica is None:
                raise ServerUnavailable(f'server "{home.server}" is no longer configured')
            server = replica
        else:
            server = await self._writable_server()
        generation = self.tls_generation
        try:
            conn = await self._dial(server, factory)
        except ServerUnavailable as exc:
            if (home is not None and home.server) or not self._waits_for_primary():
                raise
            server = await self._next_primary(server.name, exc)
            conn = await self._dial(server, factory)
        conn.binding_policy = server.channel_binding
        conn.tls_generation = generation
        conn.server_name = server.name
        slot.conn = conn
        return conn

    async def _dial(self, server: ServerConfig,
                    factory: Callable[[], ServerConnection]) -> ServerConnection:
        try:
            return await dial.connect(server, factory,
                                      self.config.main.server_connect_timeout or None,
                                      self.server_tls.get(server.name))
        except Exception:
            self.server_errors[server.name] = self.server_errors.get(server.name, 0) + 1
            raise

    def _waits_for_primary(self) -> bool:
        """Does a connection for writes wait for a primary that is missing or just failed?
        With health checks over several servers and blocking_timeout > 0."""
        main = self.config.main
        return self.probe_now is not None and main.health_check and \
            len(self.config.servers) > 1 and main.blocking_timeout > 0

    async def _writable_server(self) -> ServerConfig:
        """The primary. While there is none (a failover under way, not a split brain) a new
        connection waits for one, as requests do in the held pool: a connection granted just
        before the hold would otherwise fail with 57P03."""
        snapshot = self.topology
        if snapshot.primary is None and not snapshot.refusal.startswith("split brain") and \
                self._waits_for_primary():
            return await self._next_primary(None, None)
        self.check_writable()
        return self.server

    async def _next_primary(self, failed: str | None,
                            exc: ServerUnavailable | None) -> ServerConfig:
        """Wait, bounded by blocking_timeout, for the health checker to name a primary.

        ``failed``: the primary refused a connection (``exc``). It may have just died, and
        the checker, which probes every ``health_check_period``, does not know yet: ask it for
        a round now and take its answer from a round that began after the failure: another
        primary (promoted by the failover script, Patroni or by hand) takes the connection;
        ``failed`` still primary means ``exc`` stands. No primary: a failover is under way,
        wait on. (Issue 13: without this, new transactions in the moments after the
        primary's death failed with 08006, most of the errors in the Patroni runs.)"""
        main = self.config.main
        loop = asyncio.get_running_loop()
        asked = time.monotonic()
        deadline = asked + main.blocking_timeout
        if failed is not None and self.probe_now is not None:
            self.probe_now()
        while True:
            snapshot = self.topology
            if failed is None or snapshot.at >= asked:
                if snapshot.primary is None:
                    if snapshot.refusal.startswith("split brain"):
                        self.check_writable()  # (raises NoPrimary with the refusal)
                elif snapshot.primary != failed:
                    if failed is not None:
                        log.info("server %s refused a connection; writes go to the new "
                                 "primary %s", failed, snapshot.primary)
                    return self.server
                elif exc is not None:
                    raise exc  # the checker reached it: the failure was this connection's
            answer: asyncio.Future[None] = loop.create_future()
            self._topology_waiters.append(answer)
            try:
                await asyncio.wait_for(answer, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                if self.topology.primary is None or exc is None:
                    raise self.no_primary(main.blocking_timeout) from None
                raise exc from None

    def server_lost(self, server: ServerConnection) -> None:
        self.notify_senders.pop(server.pid, None)  # its pid may come back as another backend
        pool = self.pool_of(server.slot, self.pool)
        if server.draining:
            pool.gone(server.slot)
            return
        client = server.peer
        if client is None:
            pool.discard(server.slot)
        else:  # the linked client is told; its release then discards the slot
            client.server_lost()

    def release_server(self, server: ServerConnection, clean: bool) -> None:
        """Back to the pool if clean, else closed; either way the slot may serve a waiter."""
        slot = server.slot
        pool = self.pool_of(slot, self.pool)
        too_old = Pool.too_old(slot, time.monotonic(), self.config.main.max_connection_age) \
            or server.tls_generation != self.tls_generation
        if clean and server.poolable and not server.closed and not too_old:
            server.idle = True
            wanted_elsewhere = pool.release(slot)
            if slot.state != "idle":  # handed straight to a waiter
                server.idle = False
            elif wanted_elsewhere:  # a client of another worker waits for it
                if self.offer is not None and pool is self.pool:
                    # session pooling: hand it over (net.handoff)
                    self.offer(slot.key, slot.rule_no)
                else:  # make room there
                    pool.checkout_idle(slot)
                    server.idle = False
                    server.terminate()
                    pool.discard(slot)
        else:
            server.terminate()
            pool.discard(slot)

    # --- cancel ------------------------------------------------------------------------------

    async def forward_cancel(self, pid: int, secret: bytes, *, local_only: bool = False) -> bool:
        """Cancel the query of the client whose key is ``(pid, secret)``: its backend gets a
        CancelRequest with the real key. A key no client of this worker has goes to the other
        workers (unless ``local_only``). True if the key matched here."""
        client = self.cancels.match(pid, secret)
        if client is None:
            if self.cancel_elsewhere is not None and not local_only:
                self.cancel_elsewhere(pid, secret)
            elif self.cancel_peers is not None and not local_only:
                self.cancel_peers(pid, secret)
            else:
                log.info("cancel request for pid %d did not match any client", pid)
            return False
        if local_only:
            log.info("cancel request for pid %d reached another worker; forwarded by worker %d",
                     pid, self.worker)
        server: Any = client.server
        if server is None or server.closed:
            return True  # transaction pipeline: between transactions there is nothing to cancel
        await self.cancel_backend(server)
        return True

    async def cancel_backend(self, server: Any) -> None:
        """Send a CancelRequest with the real key of ``server``'s backend (a client's cancel,
        or ``query_timeout``)."""
        held = server if hasattr(server, "cancel_done") else None
        if held is not None:  # not handed to another client before the backend is signalled
            held.cancels += 1
            # pgcorral's own statement may run first on this backend (the client's settings
            # or prepared statements, linked just now): a cancel would hit it, its error would
            # be dropped with its replies, and the client's statement would run without its
            # settings (the soak of issue 15 saw application_name lost so, once in 649,147
            # transactions). Wait until it is done (bounded), then the cancel reaches the
            # client's statement, as it would on PostgreSQL.
            if held.own_step_running() and not held.closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(held.own_step_done()), OWN_STEP_WAIT)
        # the backend's server, with its section's TLS: not where switch-to sends new ones
        target = self.config.current_server(server.server_name or self.switched_to)
        try:
            await dial.send_cancel(target, server.pid, server.secret,
                                   self.server_tls.get(target.name))
        except (OSError, TimeoutError, ServerUnavailable) as exc:
            log.warning("could not forward a cancel request to backend %d: %s", server.pid,
                        exc)
        finally:
            if held is not None:
                held.cancel_done()


#: how long a cancel waits for pgcorral's own statement on the backend to finish
OWN_STEP_WAIT = 2.0


def _tls_settings(server: ServerConfig) -> tuple[str, str, str, str]:
    return (server.tls, server.tls_ca_file, server.tls_cert_file, server.tls_key_file)


def _tls_changed(old: Config, old_tls: dict[str, tls.ServerSideTls], new: Config,
                 new_tls: dict[str, tls.ServerSideTls]) -> bool:
    """Did a reload change how some server is reached (and the new settings loaded)?"""
    before = {server.name: _tls_settings(server) for server in old.servers}
    return any(before.get(server.name) != _tls_settings(server)
               and new_tls.get(server.name) is not old_tls.get(server.name)
               for server in new.servers)
