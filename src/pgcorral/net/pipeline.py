"""Which connection classes serve each pipeline; chosen once when a worker starts.

``performance``, ``session`` and ``auto`` are session pooling (``ClientConnection`` and
``ServerConnection``); ``transaction`` is transaction pooling (``TransactionClient`` and
``TxServerConnection``). The decisions of each pipeline (when a server connection may serve
another client) are pure functions in ``pgcorral.pipelines``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from pgcorral.net.client import ClientConnection
from pgcorral.net.context import Context, ServerFactory, session_server
from pgcorral.net.server import ServerConnection
from pgcorral.net.transaction import TransactionClient
from pgcorral.net.txserver import TxServerConnection
from pgcorral.pool.pool import Slot


def transaction_server(ctx: Context, slot: Slot,
                       on_lost: Callable[[ServerConnection], None]) -> ServerConnection:
    conn = TxServerConnection(slot, on_lost, ctx.config.main.max_prepared_statements,
                              ctx.registry)
    conn.pstats = ctx.pool_stats(slot.key)
    return conn


class Pipeline(NamedTuple):
    name: str
    client: type[ClientConnection]
    server: ServerFactory


SESSION = Pipeline("session", ClientConnection, session_server)
TRANSACTION = Pipeline("transaction", TransactionClient, transaction_server)


def choose(name: str) -> Pipeline:
    """The pipeline of the ``pipeline`` key."""
    return TRANSACTION if name == "transaction" else SESSION
