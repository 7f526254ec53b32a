"""The daemon's management server: the local unix socket and the remote TCP port.

The local socket ``<unix_socket_dir>/.s.pgcorral.<port>`` is created 0600 (its permissions are
the only protection, as in pgagroal) and removed at exit. With ``management = <port>`` a TCP
listener opens too; there every connection first proves it is an admin of the ``-A`` vault with
SCRAM-SHA-256 (``ScramServer``), and a wrong password or an unknown user gets one error frame
and the connection closes. After that, each request frame gets one answer frame from
``commands.dispatch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from typing import Any

from pgcorral.errors import PgCorralError
from pgcorral.management import protocol
from pgcorral.management.commands import Controller, dispatch
from pgcorral.protocol.scram_server import ScramServer

log = logging.getLogger("pgcorral.management")

AUTH_FAILED = "authentication failed"


class ManagementServer:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.unix_path = ""
        self._servers: list[asyncio.AbstractServer] = []
        self._salts: dict[str, bytes] = {}  # per admin, stable so PBKDF2 is cached
        self._mock_secret = secrets.token_bytes(32)
        self._inode = 0  # of the local socket

    async def start(self) -> None:
        main = self.controller.config.main
        self.unix_path = protocol.socket_path(main.unix_socket_dir, main.port)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.unix_path)  # the client socket check already ran: no live owner
        old_umask = os.umask(0o177)
        try:
            self._servers.append(await asyncio.start_unix_server(self._local, self.unix_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.unix_path, 0o600)
        self._inode = os.stat(self.unix_path).st_ino
        if main.management:
            host = None if main.host in ("*", "") else main.host
            self._servers.append(await asyncio.start_server(
                self._remote, host, main.management, reuse_address=True))
            log.info("remote management on %s:%d", main.host, main.management)

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        if self._inode:  # unless a newer pgcorral on the port took the path (so_reuseport)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.unix_path).st_ino == self._inode:
                    os.unlink(self.unix_path)
            self._inode = 0

    # --- connections -----------------------------------------------------------------------

    async def _local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._handle(reader, writer, remote=False)

    async def _remote(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._handle(reader, writer, remote=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      remote: bool) -> None:
        """A connection's task. Cancelled at shutdown, it ends quietly: asyncio's streams
        (Python 3.11) log a traceback for a handler task that ends cancelled."""
        try:
            await self._run(reader, writer, remote)
        except asyncio.CancelledError:
            writer.close()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   remote: bool) -> None:
        try:
            if remote:
                timeout = self.controller.config.main.authentication_timeout or None
                async with asyncio.timeout(timeout):
                    if not await self._authenticate(reader, writer):
                        return
            while True:
                request = await _read_frame(reader)
                if request is None:
                    return
                writer.write(protocol.encode(await dispatch(self.controller, request)))
                await writer.drain()
        except protocol.FrameError as exc:
            log.info("management: bad frame: %s", exc)
            with contextlib.suppress(protocol.FrameError):
                writer.write(protocol.encode(protocol.error("", str(exc))))
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _authenticate(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> bool:
        """SCRAM-SHA-256 against the admins vault; True when the peer proved it is an admin."""
        first = await _read_frame(reader)
        if first is None:
            return False
        user = first.get("user")
        if not isinstance(user, str):
            raise protocol.FrameError("the first frame must name the user")
        admins = self.controller.secrets.admins
        password = admins.get(user) if admins is not None else None
        if password is None:  # the same exchange as a real one, ending in the same error
            scram = ScramServer.mock(user, self._mock_secret)
        else:
            salt = self._salts.setdefault(user, secrets.token_bytes(16))
            scram = ScramServer.from_password(user, password, salt=salt)
        try:
            reply = scram.handle_initial(protocol.unb64(first.get("sasl")))
            await _send(writer, {"outcome": "continue",
                                 "sasl": protocol.b64(protocol.message_body(reply))})
            final = await _read_frame(reader)
            if final is None:
                return False
            reply = scram.handle_response(protocol.unb64(final.get("sasl")))
        except PgCorralError as exc:
            log.warning("remote management: authentication failed for %r: %s", user,
                        exc.message)
            await _send(writer, protocol.error("auth", AUTH_FAILED))
            return False
        if not scram.done:  # pragma: no cover - handle_response raises on every other path
            await _send(writer, protocol.error("auth", AUTH_FAILED))
            return False
        await _send(writer, {"outcome": "ok", "command": "auth",
                             "sasl": protocol.b64(protocol.message_body(reply))})
        log.info("remote management: admin %r authenticated", user)
        return True


async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(protocol.encode(obj))
    await writer.drain()


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next request, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(protocol.HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    return protocol.decode(await reader.readexactly(protocol.frame_length(header)))
