"""The SQL admin console's connection side: who may use it, the login, the session loop.

A client whose startup names the database ``pgcorral`` or ``pgbouncer`` is diverted here by
``ClientConnection._begin`` (after its hba rule) and served by its own coroutine: the user must
be in ``admin_users`` or ``stats_users`` or in the admins vault (-A), else 28000; the password
is checked by pgcorral with the hba method (``all``: SCRAM), against the admins vault for an
admins.conf user and the users/frontend vault otherwise (``net.auth.authenticate_client``);
``trust`` and ``cert`` ask for none. Then a greeting of pgcorral's own, and one statement per
simple Query answered by ``ctx.admin_console`` (``management.sqlconsole``, set by the process
that runs the worker: it reaches the whole pooler's management commands). The extended
protocol gets PgBouncer's error, and the session goes on after the batch's Sync.

This module knows no statement and no pool: it moves messages.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any

from pgcorral import __version__
from pgcorral.errors import ClientProtocolError, NoHbaEntry, ShuttingDown
from pgcorral.net.auth import authenticate_client
from pgcorral.protocol import codes
from pgcorral.protocol import messages as msg
from pgcorral.protocol.framing import MessageReader

if TYPE_CHECKING:
    from pgcorral.config import HbaRule
    from pgcorral.net.client import ClientConnection
    from pgcorral.net.context import Context

log = logging.getLogger("pgcorral.console")

#: The virtual databases of the console (PgBouncer's name is an alias).
CONSOLE_DATABASES = ("pgcorral", "pgbouncer")
#: A console session waiting for its next statement looks this often whether a graceful
#: shutdown waits only for console sessions (then it ends, so the shutdown is not held up).
SHUTDOWN_POLL = 0.5
#: hba methods that let a listed user in without a password.
_NO_PASSWORD = ("trust", "cert")


def is_console(database: str) -> bool:
    return database in CONSOLE_DATABASES


def _listed(text: str, user: str) -> bool:
    return user in [name.strip() for name in text.split(",")]


def role(ctx: Context, user: str) -> str | None:
    """``admin`` (admin_users, admins vault), ``stats`` (stats_users), or None."""
    main = ctx.config.main
    admins = ctx.secrets.admins
    if _listed(main.admin_users, user) or (admins is not None and admins.get(user) is not None):
        return "admin"
    if _listed(main.stats_users, user):
        return "stats"
    return None


def _password(ctx: Context, user: str) -> str | None:
    admins = ctx.secrets.admins
    password = admins.get(user) if admins is not None else None
    return password if password is not None else ctx.secrets.client_password(user)


def greeting(client: ClientConnection, admin: bool) -> bytes:
    """AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery. PgBouncer sends
    ``server_version`` 1.18.0/bouncer; pgcorral sends its own version the same way."""
    params = {"server_version": f"{__version__}/pgcorral", "server_encoding": "UTF8",
              "client_encoding": "UTF8", "DateStyle": "ISO", "IntervalStyle": "postgres",
              "integer_datetimes": "on", "standard_conforming_strings": "on",
              "TimeZone": "UTC", "is_superuser": "on" if admin else "off"}
    name = client.settings.get("application_name")
    if name is not None:
        params["application_name"] = name
    # nothing to cancel: a random key that matches no backend
    return (msg.authentication_ok() + msg.parameter_statuses(params)
            + msg.key_and_ready(secrets.randbits(31), secrets.randbits(31), codes.TX_IDLE))


async def serve(client: ClientConnection, rule: HbaRule) -> None:
    """The console session of ``client`` (in its coroutine), from the login to its end."""
    ctx = client.ctx
    user = client.user
    kind = role(ctx, user)
    if kind is None:
        raise NoHbaEntry(f'user "{user}" is not allowed to connect to the admin console '
                         f'(database "{client.database}")')
    if rule.method not in _NO_PASSWORD:
        method = "scram-sha-256" if rule.method == "all" else rule.method
        await authenticate_client(client, method, user, _password(ctx, user))
    client.use_reader(MessageReader(ctx.config.main.max_packet_size))
    if ctx.config.main.log_connections:
        log.info("admin console connection authorized: user=%s database=%s host=%s", user,
                 client.database, client.address or "[local]")
    client.write(greeting(client, kind == "admin"))
    skipping = False  # after an extended-protocol message, until its Sync
    while True:
        type_, body = await _next_message(client)
        if type_ == codes.TERMINATE:
            return
        if skipping:
            if type_ == codes.SYNC:
                skipping = False
                client.write(msg.ready_for_query())
            continue
        if type_ in _EXTENDED:
            # refused, and the session goes on: the rest of the batch is skipped up to its
            # Sync, as PostgreSQL skips a failed batch (FunctionCall has no Sync)
            client.write(msg.error_response("08P01", _EXTENDED_REFUSED, severity="ERROR"))
            if type_ == codes.FUNCTION_CALL:
                client.write(msg.ready_for_query())
            else:
                skipping = type_ != codes.SYNC
                if not skipping:
                    client.write(msg.ready_for_query())
            continue
        if type_ != codes.QUERY:
            raise ClientProtocolError(f"unexpected message type {chr(type_)!r} in the admin "
                                      "console")
        console = ctx.admin_console
        statement = body[:-1].decode("utf-8", "replace") if body.endswith(b"\0") else ""
        if console is None:
            reply = msg.error_response("0A000", "the admin console is not available here",
                                       severity="ERROR")
        else:
            answer = asyncio.ensure_future(console(statement, kind == "admin"))
            answer.add_done_callback(_retrieve)
            try:
                while not answer.done():  # PAUSE may wait long: stop when the client leaves
                    await asyncio.wait({answer}, timeout=SHUTDOWN_POLL)
                    if client.closed and not answer.done():
                        return
                reply = answer.result()
            finally:
                if not answer.done():
                    answer.cancel()
        client.write(reply + msg.ready_for_query())


_EXTENDED_REFUSED = ("extended query protocol not supported by admin console; use the simple "
                     "query protocol")
_EXTENDED = (codes.PARSE, codes.BIND, codes.DESCRIBE, codes.EXECUTE, codes.SYNC, codes.FLUSH,
             codes.CLOSE, codes.FUNCTION_CALL)


async def _next_message(client: ClientConnection) -> tuple[int, bytes]:
    """The client's next message; ShuttingDown when a graceful shutdown waits only for
    console sessions."""
    ctx = client.ctx
    read = asyncio.ensure_future(client.read_message())
    read.add_done_callback(_retrieve)  # its error is ours (or nobody's, at the loop's end)
    try:
        while True:
            done, _ = await asyncio.wait({read}, timeout=SHUTDOWN_POLL)
            if done:
                return read.result()
            if (ctx.shutting_down or ctx.draining) and all(
                    is_console(c.database) for c in ctx.clients):
                raise ShuttingDown("pgcorral is shutting down")
    finally:
        if not read.done():  # (also when this coroutine is cancelled at the loop's end)
            read.cancel()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark the outcome of a helper task as seen: when the session's coroutine was cancelled
    at the loop's end, nobody else will."""
    if not task.cancelled():
        task.exception()
