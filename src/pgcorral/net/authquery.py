"""auth_query: reading a role's stored password secret from PostgreSQL.

The superuser of the -S file reads ``pg_authid`` on a connection kept for that purpose (outside
the pool, one per database and worker, one query at a time).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from pgcorral.net.auth import VaultLogin
from pgcorral.pool.pool import Slot

if TYPE_CHECKING:
    from pgcorral.net.context import Context
    from pgcorral.net.server import ServerConnection

#: The stored secret of a role that may log in now (superuser needed for pg_authid)
#: (a bind parameter, never quoted text; every name schema-qualified: nothing on that connection
#: is the clients', but a role default could still change its search_path, CVE-2025-12819)
AUTH_QUERY = ("SELECT rolpassword FROM pg_catalog.pg_authid"
              " WHERE rolname OPERATOR(pg_catalog.=) $1 AND rolcanlogin"
              " AND (rolvaliduntil IS NULL"
              " OR rolvaliduntil OPERATOR(pg_catalog.>) pg_catalog.now())")


class AuthQuery:
    def __init__(self) -> None:
        self._conns: dict[str, ServerConnection] = {}
        self._lock = asyncio.Lock()

    def close(self) -> None:
        """Close the kept connections unless a lookup runs now (``fetch_secret`` then replaces
        them: they are of an older ``Context.tls_generation``)."""
        if not self._lock.locked():
            conns, self._conns = self._conns, {}
            for conn in conns.values():
                conn.terminate()

    async def fetch_secret(self, ctx: Context, database: str, user: str) -> str | None:
        """The password secret PostgreSQL stores for ``user`` (SCRAM verifier or md5 hash).
        None: no such login role."""
        try:
            user.encode("utf-8")
        except UnicodeEncodeError:  # not UTF-8 (kept as surrogates): no role has that name,
            return None  # and it never goes to PostgreSQL (CVE-2025-1094 class)
        login = ctx.secrets.superuser_login()
        assert login is not None
        async with self._lock:
            conn = self._conns.get(database)
            if conn is not None and conn.tls_generation != ctx.tls_generation:
                conn.terminate()  # opened with TLS settings a reload changed since
                conn = None
            if conn is None or conn.closed:
                slot = Slot(0, (database, login[0]), None, time.monotonic())
                conn = await ctx.open_server(slot, on_lost=lambda _: None)
                async with asyncio.timeout(ctx.config.main.authentication_timeout or None):
                    await conn.login(login[0], database, VaultLogin(login[0], login[1]))
                self._conns[database] = conn
            rows = await conn.query_rows(AUTH_QUERY, [user])
        return None if not rows or rows[0][0] is None else rows[0][0].decode()
