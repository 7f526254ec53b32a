"""Framing of typed v3 messages (1-byte type, Int32 length including itself, body).

Two tools with different costs:

* ``MessageReader`` buffers bytes and returns whole messages ``(type, body)``. It is used where
  pgcorral reads messages itself: authentication, startup of server connections, the reset of a
  server connection, the settings applied for a client. Lengths are guarded: below 4 or above
  the reader's maximum raises ``FramingError`` before anything of that size is buffered.
* ``BoundaryTracker`` follows message boundaries in a stream it does not keep. The hot path of
  session pooling feeds it every chunk a client sends, to find a Terminate and to know whether
  the stream stands on a message boundary, at the cost of one ``unpack_from`` per message.
"""

from __future__ import annotations

import struct

from pgcorral.protocol import codes

_HEADER = struct.Struct("!BI")
_header_unpack_from = _HEADER.unpack_from


class FramingError(ValueError):
    """A length field out of range. The caller decides which side misbehaved."""


class MessageReader:
    """Buffers a byte stream and returns complete messages."""

    __slots__ = ("_buf", "max_length")

    def __init__(self, max_length: int = codes.SMALL_MESSAGE_LIMIT) -> None:
        self._buf = bytearray()
        self.max_length = max_length

    def feed(self, data: bytes) -> None:
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def matches_prefix(self, expected: bytes) -> bool:
        """Are the buffered bytes a prefix of ``expected`` (or ``expected`` itself)?"""
        n = len(self._buf)
        return n <= len(expected) and self._buf == expected[:n]

    def consume(self, n: int) -> None:
        del self._buf[:n]

    def next_message(self) -> tuple[int, bytes] | None:
        """``(type, body)`` of the next complete message, or None if more bytes are needed."""
        buf = self._buf
        if len(buf) < 5:
            return None
        type_, length = _header_unpack_from(buf, 0)
        if length < 4:
            raise FramingError(f"invalid message length {length}")
        if length - 4 > self.max_length:
            raise FramingError(f"message of {length - 4} bytes exceeds the limit of "
                               f"{self.max_length}")
        end = length + 1
        if len(buf) < end:
            return None
        body = bytes(buf[5:end])
        del buf[:end]
        return int(type_), body


#: ``BoundaryTracker.feed`` result: a Terminate began in an earlier chunk.
TERMINATE_SPLIT = -2


class BoundaryTracker:
    """Walks the message headers of a stream without keeping its bytes.

    ``feed`` returns the offset in ``data`` where a Terminate message starts, or -1. Bytes after
    a Terminate are of no interest: the caller stops reading there.
    """

    __slots__ = ("_partial", "_skip", "max_length")

    def __init__(self, max_length: int = codes.LARGE_MESSAGE_LIMIT) -> None:
        self._skip = 0  # body bytes of the current message still to come
        self._partial = b""  # the first bytes of a header split across chunks
        self.max_length = max_length

    @property
    def at_boundary(self) -> bool:
        return self._skip == 0 and not self._partial

    def feed(self, data: bytes) -> int:
        """Offset of a Terminate in ``data``, -1 if none, or ``TERMINATE_SPLIT`` when a
        Terminate's first bytes came in an earlier chunk (and were already passed on)."""
        n = len(data)
        pos = self._skip
        if self._partial:
            need = 5 - len(self._partial)
            header = self._partial + bytes(data[:need])
            if len(header) < 5:
                self._partial = header
                return -1
            self._partial = b""
            type_, length = _header_unpack_from(header, 0)
            if type_ == codes.TERMINATE:
                return TERMINATE_SPLIT
            self._check(length)
            pos = need + length - 4
        max_length = self.max_length
        while pos < n:
            if pos + 5 > n:
                self._partial = bytes(data[pos:])
                self._skip = 0
                return -1
            type_, length = _header_unpack_from(data, pos)
            if type_ == codes.TERMINATE:
                self._skip = 0
                return pos
            if length < 4 or length - 4 > max_length:
                self._check(length)
            pos += 1 + length
        self._skip = pos - n
        return -1

    def _check(self, length: int) -> None:
        if length < 4:
            raise FramingError(f"invalid message length {length}")
        if length - 4 > self.max_length:
            raise FramingError(f"message of {length - 4} bytes exceeds the limit of "
                               f"{self.max_length}")
