"""Dialing PostgreSQL: the one place that opens a socket to a server (unix or TCP).

Used for server connections of the pool (and of prefill, validation and auth_query, which are
pool connections too) and for forwarding cancel requests. TLS toward servers will go here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from pgcorral.config import ServerConfig
from pgcorral.errors import ServerUnavailable
from pgcorral.protocol import messages as msg

P = TypeVar("P", bound=asyncio.Protocol)

#: Seconds a cancel request may take to reach PostgreSQL and be acknowledged (closed).
CANCEL_TIMEOUT = 5.0


def socket_path(server: ServerConfig) -> str | None:
    """The unix socket of ``server`` when its host is a directory, else None (TCP)."""
    return f"{server.host}/.s.PGSQL.{server.port}" if server.host.startswith("/") else None


async def connect(server: ServerConfig, factory: Callable[[], P], timeout: float | None) -> P:
    """A connected protocol from ``factory``; ServerUnavailable (08006) on failure."""
    loop = asyncio.get_running_loop()
    path = socket_path(server)
    try:
        async with asyncio.timeout(timeout):
            if path is not None:
                _, conn = await loop.create_unix_connection(factory, path)
            else:
                _, conn = await loop.create_connection(factory, server.host, server.port)
    except (OSError, TimeoutError) as exc:
        raise ServerUnavailable(
            f"could not connect to server \"{server.name}\" at {server.host}:{server.port}: "
            f"{exc or 'timeout'}") from None
    return conn


async def send_cancel(server: ServerConfig, pid: int, secret: int) -> None:
    """Send a CancelRequest for backend ``pid`` and wait until PostgreSQL closes the
    connection (it has signalled the backend by then). OSError or TimeoutError on failure."""
    path = socket_path(server)
    async with asyncio.timeout(CANCEL_TIMEOUT):
        if path is not None:
            reader, writer = await asyncio.open_unix_connection(path)
        else:
            reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            writer.write(msg.cancel_request(pid, secret))
            await writer.drain()
            await reader.read()
        finally:
            writer.close()
