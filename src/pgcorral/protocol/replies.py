"""Checking the replies to requests pgcorral sends on its own behalf.

When pgcorral resets a server connection or applies a client's settings, it reads the server's
replies itself. ``Replies`` follows them: it records ParameterStatus changes, the command tags
and the first error, and finishes at the expected number of ReadyForQuery messages. Any message
type outside the allowed set means the stream holds something else (for instance the rest of a
result the previous client never read); that raises ``ServerProtocolError`` and the caller
discards the connection instead of handing it to anyone.
"""

from __future__ import annotations

from pgcorral.errors import ServerProtocolError
from pgcorral.protocol import codes
from pgcorral.protocol.messages import parse_command_tag, parse_fields, parse_parameter_status

#: Replies to simple Query messages that run utility statements (ROLLBACK, DISCARD ALL, SET).
UTILITY_REPLIES = frozenset(
    [codes.COMMAND_COMPLETE, codes.NOTICE_RESPONSE, codes.PARAMETER_STATUS,
     codes.NOTIFICATION_RESPONSE, codes.READY_FOR_QUERY, codes.ERROR_RESPONSE,
     codes.EMPTY_QUERY_RESPONSE]
)
#: Replies to Parse/Bind/Execute/Sync of a statement returning one row.
EXTENDED_ROW_REPLIES = UTILITY_REPLIES | {codes.PARSE_COMPLETE, codes.BIND_COMPLETE,
                                          codes.DATA_ROW}


class Replies:
    __slots__ = ("allowed", "error", "expected_ready", "params", "ready", "status", "tags")

    def __init__(self, expected_ready: int, allowed: frozenset[int] = UTILITY_REPLIES) -> None:
        self.expected_ready = expected_ready
        self.allowed = allowed
        self.ready = 0
        self.status = -1
        self.tags: list[str] = []
        self.params: dict[str, str] = {}
        self.error: dict[str, str] | None = None

    @property
    def done(self) -> bool:
        return self.ready >= self.expected_ready

    def feed(self, type_: int, body: bytes) -> bool:
        """Take one message; True once every expected ReadyForQuery has arrived."""
        if type_ not in self.allowed:
            raise ServerProtocolError(f"unexpected message type {chr(type_)!r} in reply")
        try:
            if type_ == codes.READY_FOR_QUERY:
                if len(body) != 1:
                    raise ValueError("bad ReadyForQuery")
                self.ready += 1
                self.status = body[0]
            elif type_ == codes.COMMAND_COMPLETE:
                self.tags.append(parse_command_tag(body))
            elif type_ == codes.PARAMETER_STATUS:
                name, value = parse_parameter_status(body)
                self.params[name] = value
            elif type_ == codes.ERROR_RESPONSE and self.error is None:
                self.error = parse_fields(body)
        except ValueError as exc:
            raise ServerProtocolError(f"malformed reply: {exc}") from None
        return self.done
