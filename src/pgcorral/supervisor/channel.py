"""The control channel between the supervisor and one worker: framed messages on a socketpair.

A frame is a 4-byte length and a pickled tuple whose first item names the message. Both ends
are pgcorral processes started by the same user; the socketpair is never reachable by anyone
else. Replies to requests carry the request's id (``Channel.request``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

_LEN = struct.Struct("!I")

log = logging.getLogger("pgcorral.main")


class ChannelClosed(Exception):
    """The other process is gone."""


class Channel(asyncio.Protocol):
    def __init__(self, on_message: Callable[[tuple[Any, ...]], None],
                 on_lost: Callable[[], None]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            message = pickle.loads(buf[pos + 4:pos + 4 + n])
            pos += 4 + n
            if message[0] == "reply":
                future = self._pending.pop(message[1], None)
                if future is not None and not future.done():
                    if message[2]:
                        future.set_result(message[3])
                    else:
                        future.set_exception(message[3])
                continue
            try:
                self._on_message(message)
            except Exception:
                log.exception("control message %r failed", message[0])
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ChannelClosed())
        self._pending.clear()
        self._on_lost()

    def send(self, *message: Any) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(_LEN.pack(len(data)) + data)

    def request(self, *message: Any) -> asyncio.Future[Any]:
        """Send ``(name, id, *rest)``; the future of the reply's value."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_exception(ChannelClosed())
            return future
        request_id = next(self._ids)
        self._pending[request_id] = future
        self.send(message[0], request_id, *message[1:])
        return future

    def reply(self, request_id: int, ok: bool, value: Any) -> None:
        self.send("reply", request_id, ok, value)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def send_blocking(sock: socket.socket, *message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def receive_blocking(sock: socket.socket) -> tuple[Any, ...]:
    """One frame, read before the event loop runs (the worker's first message)."""
    def exactly(n: int) -> bytes:
        chunks = b""
        while len(chunks) < n:
            chunk = sock.recv(n - len(chunks))
            if not chunk:
                raise ChannelClosed()
            chunks += chunk
        return chunks

    (n,) = _LEN.unpack(exactly(4))
    message: tuple[Any, ...] = pickle.loads(exactly(n))
    return message
