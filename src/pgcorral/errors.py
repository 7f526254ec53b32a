"""The one error hierarchy of pgcorral.

Every error that can reach a PostgreSQL client carries a SQLSTATE and a severity; the network layer
turns it into an ErrorResponse in exactly one place (``net.client``). Protocol violations are told
apart by who caused them: the client (``ClientProtocolError``) or the server
(``ServerProtocolError``). Configuration problems are collected, never raised one by one, and are
printed as one line per problem by the daemon.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations


class PgCorralError(Exception):
    """Root of every error pgcorral raises on purpose."""

    sqlstate = "XX000"
    severity = "FATAL"

    def __init__(self, message: str, *, sqlstate: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate
        self.detail = detail


class ClientProtocolError(PgCorralError):
    """The client sent bytes that break protocol v3 (bad length, unexpected message...).

    ``silent`` errors close the connection without an ErrorResponse, where PostgreSQL itself
    closes silently (a startup length out of range, an HTTP request, a bogus cancel).
    """

    sqlstate = "08P01"

    def __init__(self, message: str, *, sqlstate: str | None = None, silent: bool = False):
        super().__init__(message, sqlstate=sqlstate)
        self.silent = silent


class ServerProtocolError(PgCorralError):
    """The server sent bytes pgcorral cannot make sense of; the server connection is discarded."""

    sqlstate = "08P01"


class StartupRejected(PgCorralError):
    """The startup packet is well framed but unacceptable (no user, bad protocol version...)."""

    sqlstate = "08P01"


class AuthenticationError(PgCorralError):
    """Authentication failed or is not allowed (hba reject, no hba entry, wrong password)."""

    sqlstate = "28000"


class NoHbaEntry(AuthenticationError):
    sqlstate = "28000"


class PasswordFailed(AuthenticationError):
    sqlstate = "28P01"


class UnknownDatabase(PgCorralError):
    sqlstate = "3D000"


class PoolExhausted(PgCorralError):
    """No server connection became free within blocking_timeout."""

    sqlstate = "53300"


class ServerUnavailable(PgCorralError):
    """PostgreSQL could not be reached, or the connection to it broke."""

    sqlstate = "08006"


class ShuttingDown(PgCorralError):
    sqlstate = "57P01"


class DatabaseDisabled(PgCorralError):
    sqlstate = "57P03"


class NoPrimary(PgCorralError):
    """Writes are refused: no server is primary now (failover in progress), or two claim to be
    (split brain). See ``pool.topology``."""

    sqlstate = "57P03"


class ServerError(PgCorralError):
    """An ErrorResponse that PostgreSQL sent and pgcorral relays (fields kept as sent)."""

    def __init__(self, fields: dict[str, str]):
        super().__init__(fields.get("M", "server error"), sqlstate=fields.get("C", "XX000"))
        self.fields = fields
        self.severity = fields.get("S", "FATAL")


class ConfigError(PgCorralError):
    """One or more problems in the configuration files.

    ``problems`` holds one line per problem, each formatted ``file:line: key: what is wrong``
    (line and key left out where they do not apply).
    """

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems) if problems else "configuration error")
        self.problems = problems
        self.warnings: list[str] = []  # found along the way, reported with the problems
