"""The state one worker's connections share: configuration snapshot, pool, cancel keys, clients.

Also owns the two server-side actions that need a fresh socket of their own: opening a server
connection for a pool slot and forwarding a CancelRequest; and the query/command API the
management layer calls (status, details, flush, enable/disable, switch-to, counters, live keys).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import secrets
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pgcorral.config import Config, HbaRule, ServerConfig
from pgcorral.errors import DatabaseDisabled, ServerUnavailable
from pgcorral.net.auth import VaultLogin
from pgcorral.net.server import ServerConnection
from pgcorral.net.txserver import TxServerConnection
from pgcorral.pool.pool import ACTIVE, IDLE, OPENING, Pool, Slot
from pgcorral.protocol import codes
from pgcorral.protocol import messages as msg
from pgcorral.protocol.statements import StatementRegistry
from pgcorral.security.secrets import Secrets

if TYPE_CHECKING:
    from pgcorral.net.client import ClientConnection
    from pgcorral.net.transaction import TransactionClient, TxLogin

log = logging.getLogger("pgcorral.context")

#: Seconds an empty validation query may take before the connection is closed.
VALIDATION_TIMEOUT = 5.0
#: auth_query: the stored secret of a role that may log in now (superuser needed for pg_authid)
AUTH_QUERY = ("SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin"
              " AND (rolvaliduntil IS NULL OR rolvaliduntil > now())")
#: The counters ``clear prometheus`` resets.
COUNTERS = ("client_connections", "logins_refused_disabled", "flushed_connections",
            "management_commands")
#: Virtual pids of the transaction pipeline start above Linux's largest pid_max (2**22), so a
#: client never sees a pid that belongs to a real backend.
VIRTUAL_PID_BASE = 1 << 22
#: Database names that mean every database in flush/enable/disable.
ALL_DATABASES = ("all", "*")


class Context:
    def __init__(self, config: Config, secrets: Secrets | None = None) -> None:
        self.config = config
        self.secrets = secrets or Secrets()
        self.pool = Pool(config.main.max_connections, config.limits, time.monotonic)
        self.clients: set[ClientConnection] = set()
        self.shutting_down = False
        # Cancel keys handed to clients: pid -> (secret bytes, client)
        self._cancel_keys: dict[int, tuple[bytes, ClientConnection]] = {}
        self.all_idle = asyncio.Event()
        self.aliases = config.aliases()
        self._auth_conns: dict[str, ServerConnection] = {}
        self._auth_lock = asyncio.Lock()
        self.prefill_initial = False  # set by a flush: prefill INITIAL_SIZE, not just MIN_SIZE
        self.hba_cache: dict[tuple[str, str, str, str | None], HbaRule | None] = {}
        # (setting, requested value) -> the value PostgreSQL reported (pipelines.settings)
        self.learned: dict[tuple[str, str], str] = {}
        self.disabled: set[str] = set()  # databases refusing new logins; "*" = all
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.failed_servers: set[str] = set()
        self._switched_to: str | None = None  # switch-to: the server new connections go to
        self.started_at = time.time()
        self.transaction = config.main.pipeline == "transaction"
        # transaction pipeline: pooler names of prepared statements, shared by all clients
        self.registry = StatementRegistry()
        self._next_virtual_pid = VIRTUAL_PID_BASE
        # transaction pipeline: what the last login of each (database, user) showed
        self.tx_logins: dict[tuple[str, str], TxLogin] = {}
        # transaction pipeline: clients waiting for a server connection, and the one timer
        # that checks their deadlines (net.transaction._sweep)
        self.tx_waiting: set[TransactionClient] = set()
        self.tx_sweep: asyncio.TimerHandle | None = None

    @property
    def server(self) -> ServerConfig:
        servers = self.config.servers
        for server in servers:
            if server.name == self._switched_to:
                return server
        for server in servers:
            if server.primary:
                return server
        return servers[0]

    def apply(self, config: Config, secrets: Secrets) -> None:
        """A reloaded configuration: new hba, limits, vaults and reloadable keys for new
        clients."""
        self.config = config
        self.secrets = secrets
        self.aliases = config.aliases()
        self.hba_cache.clear()
        self.tx_logins.clear()  # a changed vault or hba: logins go through a server again
        self.pool.set_limits(config.limits)

    # --- server connections ------------------------------------------------------------------

    async def open_server(self, slot: Slot,
                          on_lost: Callable[[ServerConnection], None] | None = None,
                          ) -> ServerConnection:
        """Connect to PostgreSQL for ``slot`` (not yet logged in)."""
        loop = asyncio.get_running_loop()
        server = self.server
        timeout = self.config.main.server_connect_timeout or None
        lost = on_lost or self._server_lost

        max_prepared = self.config.main.max_prepared_statements

        def factory() -> ServerConnection:
            if self.transaction:
                return TxServerConnection(slot, lost, max_prepared, self.registry.known)
            return ServerConnection(slot, lost)

        try:
            async with asyncio.timeout(timeout):
                if server.host.startswith("/"):
                    path = f"{server.host}/.s.PGSQL.{server.port}"
                    _, conn = await loop.create_unix_connection(factory, path)
                else:
                    _, conn = await loop.create_connection(factory, server.host, server.port)
        except (OSError, TimeoutError) as exc:
            raise ServerUnavailable(
                f"could not connect to server \"{server.name}\" at {server.host}:{server.port}: "
                f"{exc or 'timeout'}") from None
        slot.conn = conn
        return conn

    def _server_lost(self, server: ServerConnection) -> None:
        client = server.peer
        if client is None:
            self.pool.discard(server.slot)
        else:  # the linked client is told; its release then discards the slot
            client.server_lost()

    def release_server(self, server: ServerConnection, clean: bool) -> None:
        """Back to the pool if clean, else closed; either way the slot may serve a waiter."""
        slot = server.slot
        too_old = Pool.too_old(slot, time.monotonic(), self.config.main.max_connection_age)
        if clean and server.poolable and not server.closed and not too_old:
            server.idle = True
            self.pool.release(slot)
            if slot.state != "idle":  # handed straight to a waiter
                server.idle = False
        else:
            server.terminate()
            self.pool.discard(slot)

    # --- management: queries ----------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """Counts of the pool and the clients, servers, disabled databases, counters."""
        pool = self.pool
        current = self.server.name
        servers = [{"name": s.name, "host": s.host, "port": s.port,
                    "state": "primary" if s.name == current else
                    "failed" if s.name in self.failed_servers else "notinit"}
                   for s in self.config.servers]
        return {
            "status": "graceful shutdown" if self.shutting_down else "running",
            "active_connections": pool.count(ACTIVE), "idle_connections": pool.count(IDLE),
            "opening_connections": pool.count(OPENING), "total_connections": pool.total,
            "max_connections": pool.max_connections, "clients": len(self.clients),
            "waiting_clients": pool.waiting, "server": current, "servers": servers,
            "disabled": sorted(self.disabled), "counters": dict(self.counters),
        }

    def details(self) -> dict[str, object]:
        """``status`` plus one entry per server connection and per client."""
        now_mono, now = time.monotonic(), time.time()
        connections = []
        for slot in sorted(self.pool.slots(), key=lambda s: s.id):
            conn = slot.conn
            connections.append({
                "id": slot.id, "state": slot.state, "database": slot.key[0],
                "user": slot.key[1], "pid": getattr(conn, "pid", 0) if conn else 0,
                "started": round(now - (now_mono - slot.created_at), 3),
                "last_used": round(now - (now_mono - slot.last_used), 3)})
        sessions = [{"user": c.user, "database": c.database, "address": c.address or "[local]",
                     "pid": c.server.pid if c.server is not None else 0}
                    for c in self.clients]
        sessions.sort(key=lambda c: (str(c["database"]), str(c["user"]), str(c["address"])))
        return {**self.status(), "connections": connections, "sessions": sessions}

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

    # --- management: commands ----------------------------------------------------------------

    def disable(self, database: str) -> list[str]:
        self.disabled.add("*" if database in ALL_DATABASES else database)
        return sorted(self.disabled)

    def enable(self, database: str) -> list[str]:
        if database in ALL_DATABASES:
            self.disabled.clear()
        else:
            self.disabled.discard(database)
        return sorted(self.disabled)

    def _matches(self, database: str | None, name: str) -> bool:
        if database is None or database in ALL_DATABASES:
            return True
        return self.config.real_database(name) == self.config.real_database(database)

    def flush(self, mode: str, database: str | None = None) -> dict[str, int]:
        """idle: close idle server connections now; gracefully: also mark the ones in use to
        close when their client leaves; all: also abort the clients in session and close
        their server connections. Limited to ``database`` when given."""
        closed = marked = aborted = 0
        for slot in self.pool.idle_slots():
            if self._matches(database, slot.key[0]):
                self.pool.discard(slot)
                slot.conn.terminate()
                closed += 1
        if mode in ("gracefully", "all"):
            for slot in self.pool.slots():
                if slot.state != IDLE and slot.conn is not None and self._matches(
                        database, slot.key[0]):
                    slot.conn.poolable = False  # release closes it instead of pooling it
                    marked += 1
        if mode == "all":
            for client in list(self.clients):
                if self._matches(database, client.database):
                    client.abort()
                    aborted += 1
        self.counters["flushed_connections"] += closed + marked
        self.prefill_initial = True  # the next maintenance tick prefills INITIAL_SIZE again
        log.info("flush %s (%s): %d idle closed, %d marked, %d clients aborted", mode,
                 database or "all", closed, marked, aborted)
        return {"closed": closed, "marked": marked, "aborted": aborted}

    def switch_to(self, name: str) -> str:
        """Send new server connections to server ``name``; the previous one is marked failed.
        Existing connections are untouched. Returns the previous server's name."""
        names = [s.name for s in self.config.servers]
        if name not in names:
            raise KeyError(name)
        previous = self.server.name
        if previous != name:
            self.failed_servers.add(previous)
        self.failed_servers.discard(name)
        self._switched_to = name
        log.info("switched to server %s (was %s)", name, previous)
        return previous

    def clear_server(self, name: str) -> None:
        if name not in [s.name for s in self.config.servers]:
            raise KeyError(name)
        self.failed_servers.discard(name)

    def clear_counters(self) -> None:
        for name in self.counters:
            self.counters[name] = 0

    def set_main_key(self, name: str, value: object) -> object:
        """Apply a live key in memory (``conf set``); the previous value."""
        old = getattr(self.config.main, name)
        changes: dict[str, Any] = {name: value}
        main = dataclasses.replace(self.config.main, **changes)
        self.config = dataclasses.replace(self.config, main=main)
        return old

    def set_server_key(self, server: str, name: str, value: object) -> object:
        servers = list(self.config.servers)
        for i, entry in enumerate(servers):
            if entry.name == server:
                old = getattr(entry, name)
                changes: dict[str, Any] = {name: value}
                servers[i] = dataclasses.replace(entry, **changes)
                self.config = dataclasses.replace(self.config, servers=tuple(servers))
                return old
        raise KeyError(server)

    # --- prefill -----------------------------------------------------------------------------

    async def prefill(self, initial: bool) -> int:
        """Open connections ahead of clients for the limit rules naming a database and a vault
        user: up to INITIAL_SIZE at start and after a flush, up to MIN_SIZE on every tick.
        Returns how many were opened; a failure is logged and stops that rule's round."""
        opened = 0
        for rule in self.config.limits:
            target = rule.initial_size if initial else rule.min_size
            password = self.secrets.backend_password(rule.user)
            if target <= 0 or "all" in (rule.database, rule.user) or password is None:
                continue
            key = (rule.database, rule.user)
            while self.pool.count_key(key) < target and not self.shutting_down:
                slot = self.pool.reserve_new(key)
                if slot is None:
                    break
                try:
                    server = await self.open_server(slot)
                    async with asyncio.timeout(self.config.main.authentication_timeout or None):
                        await server.login(rule.user, rule.database,
                                           VaultLogin(rule.user, password))
                except Exception as exc:
                    log.warning("prefill of %s@%s failed: %s", rule.user, rule.database, exc)
                    if slot.conn is not None:
                        slot.conn.close()
                    self.pool.discard(slot)
                    break
                self.pool.opened(slot)
                self.release_server(server, clean=True)
                opened += 1
        return opened

    # --- auth_query ----------------------------------------------------------------------------

    async def fetch_secret(self, database: str, user: str) -> str | None:
        """The password secret PostgreSQL stores for ``user`` (SCRAM verifier or md5 hash),
        read by the superuser of the -S file on a connection kept for that purpose (outside
        the pool, one per database, one query at a time). None: no such login role."""
        login = self.secrets.superuser_login()
        assert login is not None
        async with self._auth_lock:
            conn = self._auth_conns.get(database)
            if conn is None or conn.closed:
                slot = Slot(0, (database, login[0]), None, time.monotonic())
                conn = await self.open_server(slot, on_lost=lambda _: None)
                async with asyncio.timeout(self.config.main.authentication_timeout or None):
                    await conn.login(login[0], database, VaultLogin(login[0], login[1]))
                self._auth_conns[database] = conn
            rows = await conn.query_rows(AUTH_QUERY, [user])
        return None if not rows or rows[0][0] is None else rows[0][0].decode()

    # --- lifecycle (driven by the supervisor's periodic tick) ------------------------------

    def close_expired(self) -> int:
        """Close idle connections past idle_timeout or max_connection_age; how many."""
        main = self.config.main
        expired = self.pool.expired_idle(time.monotonic(), main.idle_timeout,
                                         main.max_connection_age)
        for slot in expired:
            log.debug("closing idle server connection %d (%s@%s)", slot.id, slot.key[1],
                      slot.key[0])
            self.pool.discard(slot)
            slot.conn.terminate()
        return len(expired)

    def disconnect_idle_clients(self) -> int:
        """disconnect_client: end sessions whose client sent nothing for that long while their
        server connection sat idle (any state with disconnect_client_force). The server
        connection goes back to the pool as usual."""
        main = self.config.main
        if main.disconnect_client <= 0:
            return 0
        now = time.monotonic()
        ended = 0
        for client in list(self.clients):
            server = client.server
            if server is None and not getattr(client, "in_session", False):
                continue
            if client.activity != client.seen_activity[0]:
                client.seen_activity = (client.activity, now)
                continue
            idle_for = now - client.seen_activity[1]
            if idle_for < main.disconnect_client:
                continue
            status = server.status if server is not None else codes.TX_IDLE
            if status != codes.TX_IDLE and not main.disconnect_client_force:
                continue
            log.info("disconnecting client %s (user %s, database %s): idle for %.0f s",
                     client.address or "[local]", client.user, client.database, idle_for)
            client.write(msg.error_response(
                "57P05", "terminating connection due to idle-session timeout (disconnect_client)"))
            client.end("disconnect_client")
            ended += 1
        return ended

    async def validate_idle(self) -> None:
        """Background validation: check every idle connection; close the broken ones."""
        for slot in self.pool.idle_slots():
            if slot.state != "idle":  # taken meanwhile
                continue
            server: ServerConnection = slot.conn
            self.pool.checkout_idle(slot)
            server.idle = False
            self.release_server(server, await server.validate(VALIDATION_TIMEOUT))

    # --- cancel ------------------------------------------------------------------------------

    def issue_cancel_key(self, client: ClientConnection, pid: int) -> int:
        """A pooler-issued secret for the key the client sees; pid is the real backend's."""
        secret = secrets.randbits(32) - (1 << 31)
        self._cancel_keys[pid] = (struct.pack("!i", secret), client)
        return secret

    def issue_virtual_key(self, client: ClientConnection) -> tuple[int, int]:
        """Transaction pipeline: a virtual pid (unique among live clients) and its secret; a
        cancel for it goes to whichever backend runs the client's transaction then."""
        pid = self._next_virtual_pid
        while pid in self._cancel_keys:
            pid = pid + 1 if pid < 0x7FFFFFFF else VIRTUAL_PID_BASE
        self._next_virtual_pid = pid + 1 if pid < 0x7FFFFFFF else VIRTUAL_PID_BASE
        return pid, self.issue_cancel_key(client, pid)

    def drop_cancel_key(self, client: ClientConnection, pid: int) -> None:
        entry = self._cancel_keys.get(pid)
        if entry is not None and entry[1] is client:
            del self._cancel_keys[pid]

    async def forward_cancel(self, pid: int, secret: bytes) -> None:
        entry = self._cancel_keys.get(pid)
        expected = entry[0] if entry is not None else b"\0\0\0\0"
        matches = hmac.compare_digest(secret, expected)  # constant time even when unknown
        if entry is None or not matches:
            log.info("cancel request for pid %d did not match any client", pid)
            return
        server = entry[1].server
        if server is None or server.closed:
            return  # transaction pipeline: between transactions there is nothing to cancel
        held = server if isinstance(server, TxServerConnection) else None
        if held is not None:  # not handed to another client before the backend is signalled
            held.cancels += 1
        target = self.server
        try:
            async with asyncio.timeout(5):
                if target.host.startswith("/"):
                    reader, writer = await asyncio.open_unix_connection(
                        f"{target.host}/.s.PGSQL.{target.port}")
                else:
                    reader, writer = await asyncio.open_connection(target.host, target.port)
                writer.write(msg.cancel_request(server.pid, server.secret))
                await writer.drain()
                # PostgreSQL closes the connection once it has signalled the backend
                await reader.read()
                writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("could not forward cancel request for pid %d: %s", pid, exc)
        finally:
            if held is not None:
                held.cancel_done()

