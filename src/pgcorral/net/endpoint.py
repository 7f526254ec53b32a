"""What client and server connections share: an asyncio.Protocol with two modes.

* **framed**: bytes are buffered in a reader (``StartupReader`` or ``MessageReader``) and
  pgcorral reads whole packets from it: a coroutine with ``read_message``, or a callback the
  subclass runs when ``buffer`` woke nobody (the client's startup, the server's reset). Used
  while pgcorral itself talks: startup, authentication, reset, settings.
* **relay**: the subclass's ``data_received`` writes each chunk straight to the linked peer.

Flow control is cross-wired: when our transport's write buffer is full, the peer stops reading
(``pause_writing`` -> ``peer.transport.pause_reading``), and resumes when it drains.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from pgcorral.errors import ClientProtocolError, ServerProtocolError
from pgcorral.protocol.framing import FramingError, MessageReader
from pgcorral.protocol.startup import StartupReader

log = logging.getLogger("pgcorral.net")

#: Bytes buffered in framed mode before we stop reading from the peer.
FRAMED_BUFFER_LIMIT = 1 << 20


class ConnectionLost(Exception):
    """The other end closed the connection (or it broke) while pgcorral waited for it."""


class Endpoint(asyncio.Protocol):
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop  # set at connection_made (get_running_loop costs a getpid)
    peer: Endpoint | None
    side = "?"

    def __init__(self, rx: StartupReader | MessageReader) -> None:
        self.peer = None
        self.closed = False
        self._rx: StartupReader | MessageReader = rx
        self._wakeup: asyncio.Future[None] | None = None
        self._reading_paused = False
        # our transport's write buffer is over its high-water mark: whoever is linked to us
        # must not read (the transaction pipeline re-applies this when peers change)
        self.writing_paused = False

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake(ConnectionLost(str(exc) if exc else "connection closed"))

    terminating = False  # clients only: Terminate seen, replies still coming

    def server_lost(self) -> None:
        """Called on a client when its linked server connection is gone."""

    def end(self, reason: str) -> None:
        """Called on a client to end its session (see ClientConnection.end)."""

    def pause_writing(self) -> None:
        self.writing_paused = True
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.transport.resume_reading()

    # --- framed mode -------------------------------------------------------------------------

    def buffer(self, data: bytes) -> None:
        """Framed mode: keep ``data`` for the coroutine reading from this connection."""
        self._rx.feed(data)
        if len(self._rx) > FRAMED_BUFFER_LIMIT and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake(None)

    def use_reader(self, reader: StartupReader | MessageReader) -> None:
        """Switch the framed-mode reader, carrying over bytes already received."""
        rest = self._rx.take_rest()
        self._rx = reader
        if rest:
            reader.feed(rest)

    def take_buffered(self) -> bytes:
        return self._rx.take_rest()

    def _wake(self, exc: Exception | None) -> None:
        waiter = self._wakeup
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    async def _wait_data(self) -> None:
        if self.closed:
            raise ConnectionLost("connection closed")
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        self._wakeup = self.loop.create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    async def read_message(self) -> tuple[int, bytes]:
        reader = self._rx
        assert isinstance(reader, MessageReader)
        while True:
            try:
                message = reader.next_message()
            except FramingError as exc:
                if self.side == "client":
                    raise ClientProtocolError(str(exc)) from None
                raise ServerProtocolError(str(exc)) from None
            if message is not None:
                return message
            await self._wait_data()

    # --- both modes --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
        self._wake(ConnectionLost("connection closed"))

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()
        self._wake(ConnectionLost("connection closed"))

    def info(self) -> dict[str, Any]:
        return {"side": self.side, "closed": self.closed}
