"""A small HTTP/1.1 server for the metrics endpoint and the web console.

It runs in the process that serves management (the supervisor with several workers, the one
process otherwise), never in a worker: a scrape costs the data path nothing but the ``stats``
call it makes. One request per connection (``Connection: close``), GET and HEAD only, bounded
everywhere:

* the request line and headers must arrive within ``READ_TIMEOUT`` seconds and fit in
  ``MAX_HEAD`` bytes, else 408 / 431 and the connection is closed (a slow or garbage scraper
  holds one socket for at most that long and nothing else);
* anything that is not ``METHOD SP target SP HTTP/1.x`` is 400, answered as soon as the
  request line has arrived (garbage does not wait for the end of a head it will never send);
  a method other than GET/HEAD is 405; an unknown path 404;
* a response is written with a ``WRITE_TIMEOUT`` (a scraper that stops reading is dropped);
* at most ``MAX_CONNECTIONS`` connections at once; more get a canned 503 and are closed at
  once (nothing is read from them).

``PGCORRAL_HTTP_READ_TIMEOUT`` (seconds), read for every connection, replaces ``READ_TIMEOUT``:
a test hook (the daemon is a subprocess), not a configuration key.

TLS when an ``ssl.SSLContext`` is given (``metrics_cert_file`` / ``metrics_key_file``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("pgcorral.http")

READ_TIMEOUT = 5.0
READ_TIMEOUT_ENV = "PGCORRAL_HTTP_READ_TIMEOUT"
WRITE_TIMEOUT = 10.0
MAX_HEAD = 16384
MAX_CONNECTIONS = 64

_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Route = Callable[[Request], Awaitable[Response]]


def text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


def read_timeout() -> float:
    """``READ_TIMEOUT``, or ``PGCORRAL_HTTP_READ_TIMEOUT`` when that is a positive number."""
    try:
        value = float(os.environ.get(READ_TIMEOUT_ENV, ""))
    except ValueError:
        return READ_TIMEOUT
    return value if value > 0 else READ_TIMEOUT


#: What a connection over ``MAX_CONNECTIONS`` gets, before it is closed.
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 5\r\nConnection: close\r\nRetry-After: 1\r\n\r\nbusy\n")


class HttpServer:
    """Serves ``routes`` (exact paths) on one port."""

    def __init__(self, name: str, routes: dict[str, Route],
                 tls: ssl.SSLContext | None = None) -> None:
        self.name = name  # for log lines: "metrics", "console"
        self.routes = routes
        self.tls = tls
        self._servers: list[asyncio.AbstractServer] = []
        self._open = 0

    async def start(self, host: str, port: int) -> None:
        hosts = None if host in ("*", "") else host
        server = await asyncio.start_server(self._serve, hosts, port, ssl=self.tls,
                                            reuse_address=True, limit=MAX_HEAD,
                                            ssl_handshake_timeout=read_timeout()
                                            if self.tls is not None else None)
        self._servers.append(server)
        log.info("%s: listening on %s:%d (%s)", self.name, host, port,
                 "https" if self.tls is not None else "http")

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            with contextlib.suppress(Exception):
                writer.write(_BUSY)
            writer.close()
            return
        self._open += 1
        try:
            response, head_only = await self._answer(reader)
            await asyncio.wait_for(self._write(writer, response, head_only), WRITE_TIMEOUT)
        except (ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        try:
            async with asyncio.timeout(read_timeout()):
                head = await reader.readuntil(b"\n")
                if parse_request_line(head) is None:
                    return text(400, "bad request"), False
                while True:  # header lines up to the empty one
                    line = await reader.readuntil(b"\n")
                    head += line
                    if len(head) > MAX_HEAD:
                        return text(431, "request head too large"), False
                    if line in (b"\r\n", b"\n"):
                        break
        except TimeoutError:
            return text(408, "request timeout"), False
        except asyncio.LimitOverrunError:
            return text(431, "request head too large"), False
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise
            return text(400, "incomplete request"), False
        if len(head) > MAX_HEAD:
            return text(431, "request head too large"), False
        request = parse_head(head)
        if request is None:
            return text(400, "bad request"), False
        if request.method not in ("GET", "HEAD"):
            response = text(405, "only GET and HEAD")
            response.headers["Allow"] = "GET, HEAD"
            return response, False
        route = self.routes.get(request.path)
        if route is None:
            return text(404, "not found"), request.method == "HEAD"
        try:
            return await route(request), request.method == "HEAD"
        except Exception:
            log.exception("%s: %s failed", self.name, request.path)
            return text(500, "internal error"), False

    async def _write(self, writer: asyncio.StreamWriter, response: Response,
                     head_only: bool) -> None:
        reason = _REASONS.get(response.status, "Unknown")
        lines = [f"HTTP/1.1 {response.status} {reason}",
                 f"Content-Type: {response.content_type}",
                 f"Content-Length: {len(response.body)}",
                 "Connection: close", "Cache-Control: no-store"]
        lines += [f"{k}: {v}" for k, v in response.headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(response.body)
        await writer.drain()


def parse_request_line(line: bytes) -> tuple[str, str, str] | None:
    """Method, target and version of a request line (``METHOD SP target SP HTTP/1.x CRLF``),
    None when it is not one."""
    parts = line.rstrip(b"\r\n").decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha() \
            or not parts[0].isascii() or not parts[1].startswith("/"):
        return None
    return parts[0], parts[1], parts[2]


def parse_head(head: bytes) -> Request | None:
    """The request line and headers, or None when they are not HTTP/1.x."""
    try:
        decoded = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    lines = [line.removesuffix("\r") for line in decoded.split("\n")]
    parts = parse_request_line(lines[0].encode("latin-1"))
    if parts is None:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    target = urlsplit(parts[1])
    return Request(parts[0].upper(), target.path, dict(parse_qsl(target.query)), headers)


__all__ = ["HttpServer", "Request", "Response", "Route", "parse_head", "parse_request_line",
           "read_timeout", "text"]
