"""Session pooling: a server connection belongs to one client for the client's whole session.

While linked, bytes flow untouched (see ``net.client`` / ``net.server`` ``data_received``).
When the client leaves, ``release`` decides whether the server connection can serve another
client: only if the client's stream stopped on a message boundary and the server's last words
were a ReadyForQuery. Then an open transaction is rolled back and ``server_reset_query`` runs,
and the replies are checked one by one; anything unexpected closes the connection instead.
The ``performance`` pipeline is the same code: pgcorral's session path already does the minimum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgcorral.net.client import ClientConnection
    from pgcorral.net.context import Context
    from pgcorral.net.server import ServerConnection

#: Seconds a reset may take before the connection is closed instead.
RESET_TIMEOUT = 10.0


async def release(ctx: Context, server: ServerConnection, client: ClientConnection,
                  clean: bool) -> None:
    """Unlink ``server`` from ``client`` and return it to the pool, reset, or close it."""
    client.server = None
    client.peer = None
    server.peer = None
    reusable = (clean and not client.dirty and client.tracker.at_boundary
                and server.status != -1 and server.poolable and not server.closed)
    if reusable:
        server.transport.resume_reading()  # the client may have left it paused
        reusable = await server.reset(ctx.config.main.server_reset_query, RESET_TIMEOUT)
    ctx.release_server(server, reusable)
