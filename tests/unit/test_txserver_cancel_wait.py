"""A cancel waits while pgcorral's own request runs on the backend (issue 15's soak): the wait
ends by a callback when that request's replies have come, not by polling.

A ``TxServerConnection`` over a fake transport in a real event loop; PostgreSQL's replies are
built with the message builders; the linked client is a real TransactionClient over a fake
transport too.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.unit.test_login_caches import _config
from tests.unit.test_server_state import FakeTransport

from pgcorral.net.context import Context
from pgcorral.net.transaction import TransactionClient
from pgcorral.net.txserver import TxServerConnection
from pgcorral.pool.pool import Slot
from pgcorral.protocol import messages as m
from pgcorral.protocol.replyplan import DEFAULT_STEPS, own_query_step


def _linked(tmp_path: Path) -> tuple[TxServerConnection, FakeTransport]:
    """A server connection linked to a client, pgcorral's set_config for the client's
    settings due first, then the client's Query."""
    ctx = Context(_config(tmp_path, "host all all all trust\n"))
    client = TransactionClient(ctx, "host")
    to_client = FakeTransport()
    client.connection_made(to_client)  # type: ignore[arg-type]
    server = TxServerConnection(Slot(1, ("db", "user"), None, 0.0), lambda _: None, 0)
    server.connection_made(FakeTransport())  # type: ignore[arg-type]
    server.client = client
    server.peer = client
    server.router.plan.extend((own_query_step(), *DEFAULT_STEPS[ord("Q")]))
    return server, to_client


def _answer(tag: bytes) -> bytes:
    return m.message(b"C", tag + b"\0") + m.ready_for_query(b"T")


def test_the_wait_ends_when_the_own_request_is_answered(tmp_path: Path) -> None:
    async def main() -> None:
        server, to_client = _linked(tmp_path)
        assert server.own_step_running()
        done = server.own_step_done()
        assert server.own_step_done() is done  # every cancel waits on the same one
        server.data_received(m.message(b"C", b"SELECT 1\0"))  # not yet its ReadyForQuery
        await asyncio.sleep(0)
        assert not done.done()
        server.data_received(_answer(b"SELECT 1"))
        assert done.done() and not server.own_step_running()
        assert to_client.out == []  # pgcorral's own replies never reach the client
        server.data_received(_answer(b"SELECT 1"))  # the client's
        assert b"".join(to_client.out) == _answer(b"SELECT 1")

    asyncio.run(main())


def test_the_wait_ends_when_the_connection_is_lost(tmp_path: Path) -> None:
    async def main() -> None:
        server, _ = _linked(tmp_path)
        done = server.own_step_done()
        server.connection_lost(None)
        assert done.done()

    asyncio.run(main())


def test_nothing_to_wait_for_without_an_own_request(tmp_path: Path) -> None:
    async def main() -> None:
        server, _ = _linked(tmp_path)
        server.data_received(_answer(b"SELECT 1"))
        assert not server.own_step_running()
        assert server.own_step_done().done()

    asyncio.run(main())
