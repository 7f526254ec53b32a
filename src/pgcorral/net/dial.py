"""Dialing PostgreSQL: the one place that opens a socket to a server (unix or TCP), with TLS
when the server section asks for it.

Used for server connections of the pool (and of prefill, validation and auth_query, which are
pool connections too) and for forwarding cancel requests, so all of them follow the section's
``tls`` (libpq's sslmode): an SSLRequest, then a handshake over ``net.tls.TlsLink``; ``prefer``
falls back to plaintext when the server says 'N' or the handshake fails, as libpq does. A byte
after the server's 'S' and before the handshake is refused (CVE-2021-23222: it would be read as
if it came encrypted).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import TypeVar, cast

from pgcorral.config import ServerConfig
from pgcorral.errors import ServerUnavailable
from pgcorral.net.tls import TlsLink
from pgcorral.protocol import messages as msg
from pgcorral.security.tls import ServerSideTls

P = TypeVar("P", bound=asyncio.Protocol)

#: Seconds a cancel request may take to reach PostgreSQL and be acknowledged (closed).
CANCEL_TIMEOUT = 5.0

_PLAIN = ServerSideTls("disable", None, None)


class TlsRefused(Exception):
    """TLS to a server could not be set up (libpq's words in the message)."""


def socket_path(server: ServerConfig) -> str | None:
    """The unix socket of ``server`` when its host is a directory, else None (TCP)."""
    return f"{server.host}/.s.PGSQL.{server.port}" if server.host.startswith("/") else None


async def connect(server: ServerConfig, factory: Callable[[], P], timeout: float | None,
                  tls: ServerSideTls | None = None) -> P:
    """A connected protocol from ``factory`` (over TLS when ``tls`` says so);
    ServerUnavailable (08006) on failure."""
    loop = asyncio.get_running_loop()
    path = socket_path(server)
    try:
        async with asyncio.timeout(timeout):
            if path is not None:
                _, conn = await loop.create_unix_connection(factory, path)
            elif tls is None or tls.context is None:
                _, conn = await loop.create_connection(factory, server.host, server.port)
            else:
                conn = await _connect_tls(loop, server, factory, tls)
    except TlsRefused as refused:  # (one name per type: mypyc types an except variable once)
        raise ServerUnavailable(
            f"could not connect to server \"{server.name}\" at {server.host}:{server.port}: "
            f"{refused}") from None
    except (OSError, TimeoutError) as exc:
        raise ServerUnavailable(
            f"could not connect to server \"{server.name}\" at {server.host}:{server.port}: "
            f"{str(exc) or 'timeout expired'}") from None
    return conn


class _Negotiation(asyncio.Protocol):
    """The socket's protocol from connect to the server's answer to SSLRequest."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(msg.ssl_request())

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        if len(data) > 5 and data[:1] == b"E":  # an error instead of an answer (libpq reads
            # it too): the postmaster could not start a backend, e.g. fork failed
            self.answer.set_exception(TlsRefused(
                f"server sent an error during SSL negotiation: {_error_text(data[5:])}"))
        elif len(data) != 1:  # CVE-2021-23222: nothing may follow the answer
            self.answer.set_exception(TlsRefused(
                "received unencrypted data after SSL response"))
        else:
            self.answer.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionResetError(
                "server closed the connection during SSL negotiation"))


def _error_text(body: bytes) -> str:
    try:
        fields = msg.parse_fields(body)
    except ValueError:
        fields = {}
    return fields.get("M") or "(unreadable error message)"


async def _negotiate(loop: asyncio.AbstractEventLoop, server: ServerConfig,
                     ) -> tuple[asyncio.Transport, bytes]:
    _, negotiation = await loop.create_connection(_Negotiation, server.host, server.port)
    try:
        answer = await negotiation.answer
    except BaseException:
        if negotiation.transport is not None:
            negotiation.transport.abort()
        raise
    assert negotiation.transport is not None
    return negotiation.transport, answer


async def _handshake(loop: asyncio.AbstractEventLoop, raw: asyncio.Transport,
                     app: asyncio.Protocol, tls: ServerSideTls) -> TlsLink:
    assert tls.context is not None
    done: asyncio.Future[TlsLink] = loop.create_future()

    def ready(link: TlsLink) -> None:
        app.connection_made(cast(asyncio.Transport, link))  # TlsLink quacks like one
        done.set_result(link)

    def failed(_: TlsLink, exc: Exception) -> None:
        if not done.done():
            done.set_exception(exc)

    link = TlsLink(raw, tls.context, server_side=False, app=app, on_ready=ready,
                   on_failed=failed, hostname=tls.hostname)
    link.start()
    try:
        return await done
    except (ssl.SSLError, ssl.CertificateError) as exc:
        raise TlsRefused(f"SSL error: {_reason(exc)}") from None
    finally:
        if not done.done() or done.cancelled():
            link.abort()


def _reason(exc: BaseException) -> str:
    """libpq's words ("certificate verify failed"), then OpenSSL's detail when there is one
    (e.g. "Hostname mismatch, certificate is not valid for 'localhost'.")."""
    reason = getattr(exc, "reason", None)
    text = str(reason).lower().replace("_", " ") if reason else str(exc)
    detail = getattr(exc, "verify_message", None)
    return f"{text}: {detail}" if detail else text


async def _connect_tls(loop: asyncio.AbstractEventLoop, server: ServerConfig,
                       factory: Callable[[], P], tls: ServerSideTls) -> P:
    raw, answer = await _negotiate(loop, server)
    if answer == b"S":
        conn = factory()
        try:
            await _handshake(loop, raw, conn, tls)
            return conn
        except TlsRefused:
            if tls.mode != "prefer":
                raise
        # prefer: the handshake failed, try again without TLS (libpq does the same)
        _, conn = await loop.create_connection(factory, server.host, server.port)
        return conn
    if answer != b"N":
        raw.abort()
        raise TlsRefused(f"received invalid response to SSL negotiation: {answer!r}")
    if tls.mode != "prefer":
        raw.abort()
        raise TlsRefused("server does not support SSL, but SSL was required")
    conn = factory()  # prefer: go on in plaintext on the same connection
    raw.set_protocol(conn)
    conn.connection_made(raw)
    return conn


class _CancelSent(asyncio.Protocol):
    """Sends a CancelRequest and waits for PostgreSQL to close the connection."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def send_cancel(server: ServerConfig, pid: int, secret: int,
                      tls: ServerSideTls | None = None) -> None:
    """Send a CancelRequest for backend ``pid`` (over TLS when the server's connections use
    it, as libpq does) and wait until PostgreSQL closes the connection (it has signalled the
    backend by then). OSError, TimeoutError or ServerUnavailable on failure."""
    sent: _CancelSent | None = None
    try:
        async with asyncio.timeout(CANCEL_TIMEOUT):
            sent = await connect(server, lambda: _CancelSent(msg.cancel_request(pid, secret)),
                                 CANCEL_TIMEOUT, tls or _PLAIN)
            await sent.closed
    finally:
        # a server that never closes the cancel connection (Odyssey's cancel-leak case)
        # must not keep its descriptor: closed here after CANCEL_TIMEOUT (the timeout cancelled
        # the ``closed`` future, so ask the transport)
        if sent is not None and sent.transport is not None and not sent.transport.is_closing():
            sent.transport.abort()
