"""The state one worker's connections share: configuration snapshot, pool, cancel keys, clients.

Also owns the two server-side actions that need a fresh socket of their own: opening a server
connection for a pool slot and forwarding a CancelRequest.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pgcorral.config import Config, HbaRule, ServerConfig
from pgcorral.errors import ServerUnavailable
from pgcorral.net.auth import VaultLogin
from pgcorral.net.server import ServerConnection
from pgcorral.pool.pool import Pool, Slot
from pgcorral.protocol import messages as msg
from pgcorral.security.secrets import Secrets

if TYPE_CHECKING:
    from pgcorral.net.client import ClientConnection

log = logging.getLogger("pgcorral.context")

#: Seconds an empty validation query may take before the connection is closed.
VALIDATION_TIMEOUT = 5.0
#: auth_query: the stored secret of a role that may log in now (superuser needed for pg_authid)
AUTH_QUERY = ("SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin"
              " AND (rolvaliduntil IS NULL OR rolvaliduntil > now())")


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
        self.hba_cache: dict[tuple[str, str, str, str | None], HbaRule | None] = {}
        # (setting, requested value) -> the value PostgreSQL reported (pipelines.settings)
        self.learned: dict[tuple[str, str], str] = {}

    @property
    def server(self) -> ServerConfig:
        servers = self.config.servers
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

        def factory() -> ServerConnection:
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
            return
        target = self.server
        try:
            async with asyncio.timeout(5):
                if target.host.startswith("/"):
                    _, writer = await asyncio.open_unix_connection(
                        f"{target.host}/.s.PGSQL.{target.port}")
                else:
                    _, writer = await asyncio.open_connection(target.host, target.port)
                writer.write(msg.cancel_request(server.pid, server.secret))
                await writer.drain()
                writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("could not forward cancel request for pid %d: %s", pid, exc)

