"""Header walkers for transaction pooling (the groundwork of the transaction pipeline).

In transaction mode a server connection goes back to the pool at a ReadyForQuery with status
'I' once every request the client sent has been answered. Two walkers follow the two streams
without keeping their bytes (bodies are skipped by length, whatever the chunking):

* ``framing.BoundaryTracker`` (client -> server) counts the messages that each get exactly
  one ReadyForQuery: Query ('Q'), Sync ('S') and FunctionCall ('F') (``sync_points``), and
  finds a Terminate.
* ``ReplyWalker`` (server -> client) reports where each ReadyForQuery ends and its status, and
  collects ParameterStatus messages (the settings a client changed with SET, to be applied again
  when it moves to another server connection).

A server connection is free when ``replies seen == requests counted`` and the last status was
'I': the bytes up to that ReadyForQuery are written to the client, then the link ends.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import struct

from pgcorral.protocol import codes
from pgcorral.protocol.framing import FramingError
from pgcorral.protocol.messages import parse_parameter_status

_header = struct.Struct("!BI").unpack_from
#: ParameterStatus bodies are small; a larger one is skipped, not collected.
_MAX_COLLECTED = 64 * 1024


class ReplyWalker:
    """Server -> client: ``feed`` returns ``[(end offset in data, status byte)]`` for every
    ReadyForQuery that completes in ``data``; ``params`` collects ParameterStatus values."""

    __slots__ = ("_body", "_header", "_skip", "_type", "max_length", "params")

    def __init__(self, max_length: int = codes.LARGE_MESSAGE_LIMIT) -> None:
        self._skip = 0  # body bytes of the current message still to come
        self._header = b""  # a header split across chunks
        self._type = 0  # type of the message whose body is being consumed
        self.max_length = max_length
        self._body = bytearray()  # the body so far of a ReadyForQuery or ParameterStatus
        self.params: dict[str, str] = {}

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        ready: list[tuple[int, int]] = []
        pos, n = 0, len(data)
        if self._skip:
            pos = self._continue_body(data, ready)
        while pos < n:
            if self._header or pos + 5 > n:
                need = 5 - len(self._header)
                self._header += bytes(data[pos:pos + need])
                if len(self._header) < 5:
                    return ready
                type_, length = _header(self._header, 0)
                pos += need
                self._header = b""
            else:
                type_, length = _header(data, pos)
                pos += 5
            self._check(length)
            size = length - 4
            if type_ == codes.READY_FOR_QUERY or (
                    type_ == codes.PARAMETER_STATUS and size <= _MAX_COLLECTED):
                self._type, self._skip = type_, size
                self._body.clear()
                pos = self._continue_body(data, ready, pos)
            else:
                end = pos + size
                if end > n:
                    self._type, self._skip = type_, end - n
                    return ready
                pos = end
        return ready

    @property
    def at_boundary(self) -> bool:
        return self._skip == 0 and not self._header

    def _check(self, length: int) -> None:
        if length < 4 or length - 4 > self.max_length:
            raise FramingError(f"invalid message length {length}")

    def _continue_body(self, data: bytes, ready: list[tuple[int, int]], pos: int = 0) -> int:
        """Consume the rest of the current body from ``data[pos:]``; the new position."""
        take = min(self._skip, len(data) - pos)
        if self._type in (codes.READY_FOR_QUERY, codes.PARAMETER_STATUS):
            self._body += data[pos:pos + take]
        self._skip -= take
        pos += take
        if self._skip == 0:
            if self._type == codes.READY_FOR_QUERY:
                if len(self._body) != 1:
                    raise FramingError("ReadyForQuery with a body that is not one byte")
                ready.append((pos, self._body[0]))
            elif self._type == codes.PARAMETER_STATUS:
                try:
                    name, value = parse_parameter_status(bytes(self._body))
                except ValueError as exc:
                    raise FramingError(str(exc)) from None
                self.params[name] = value
            self._type = 0
        return pos
