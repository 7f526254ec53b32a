"""Server -> client routing in transaction mode: one ``ReplyRouter`` per server connection.

The router walks the headers of what PostgreSQL sends while a client is linked, asks the
connection's ``ReplyPlan`` (``protocol.replyplan``) whether each message passes to the client or
is dropped (the replies to pgcorral's own requests: settings, re-Parse, deferred Close), splices
in the replies pgcorral fabricates (ParseComplete, CloseComplete, CommandComplete of a local
DEALLOCATE) at their turn, and says where the server connection became free: the end of a
ReadyForQuery with status 'I' after which no reply is expected, when the client side is at rest
too (``client_at_rest``: no extended-protocol batch open and no client message half forwarded,
``ClientForwarder.at_rest`` in ``protocol.txforward``; it cannot change during one ``feed``).

Bodies are not kept, except the one byte of a ReadyForQuery and ParameterStatus bodies (the
settings a client changed, to follow it to its next server connection: ``changes``). A message
that passes is forwarded as its bytes arrive, whatever the chunking, so large rows and COPY
data stream through. Pure: no I/O, no clock.

Hot path (pooler CPU per transaction, issue 10): whole messages are walked in one loop; a
type the plan's head step ignores (``ReplyStep.quiet``: rows, command tags, notices) passes
without asking the plan, and a reply that ends a plain (default) step pops it
(``ReplyPlan.pop_plain``). Only a message split across chunks goes through the state machine
(``_start``/``_end``). The unit tests compare whole chunks with byte-by-byte feeding and with
a reference that asks the plan about every message.

Schema changes (issue 14): a CommandComplete whose tag starts with CREATE, ALTER, DROP or is DO
bumps the statement registry's schema epoch (``StatementRegistry.bump``), and so does the
ReadyForQuery 'I' that ends a transaction that had one (other connections see the change only
once it is committed). The check is one index into a table by the tag's first two bytes. An
ErrorResponse to a client's Bind (whole in one chunk: the usual case, as it is the batch's first
reply) goes first to ``on_bind_error`` (``protocol.repair`` via
``net.txserver``), which may retry the batch with the statement prepared anew: it then puts a
step in front of the plan that drops the error and its ReadyForQuery.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from pgcorral.protocol import codes
from pgcorral.protocol.framing import FramingError
from pgcorral.protocol.messages import error_sqlstate, parse_parameter_status
from pgcorral.protocol.replyplan import ALL_QUIET, BIND_ENDS, DROP, ReplyPlan
from pgcorral.protocol.statements import StatementRegistry

# ``Final``: compiled, a C static load instead of a lookup in the module's dict.
_header: Final = struct.Struct("!BI").unpack_from
#: ParameterStatus bodies are small; a larger one is forwarded but not collected.
_MAX_COLLECTED: Final = 64 * 1024
_length: Final = struct.Struct("!I").unpack_from
_READY: Final = codes.READY_FOR_QUERY
_PARAM: Final = codes.PARAMETER_STATUS
_DATA_ROW: Final = codes.DATA_ROW
_COPY_DATA: Final = codes.COPY_DATA
_ALL_QUIET: Final = ALL_QUIET
_TX_IDLE: Final = codes.TX_IDLE
_ERROR: Final = codes.ERROR_RESPONSE
_COMMAND: Final = codes.COMMAND_COMPLETE
_BIND_ENDS: Final = BIND_ENDS


def _tag_table() -> bytes:
    """1 at ``(first << 8) | second`` for the first two bytes of a DDL command tag: CREATE ...,
    ALTER ..., DROP ..., DO (no other tag starts with CR, AL, DR or DO)."""
    table = bytearray(65536)
    for tag in (b"CR", b"AL", b"DR", b"DO"):
        table[(tag[0] << 8) | tag[1]] = 1
    return bytes(table)


#: DDL command tags by their first two bytes (``_tag_table``)
_DDL_TAGS: Final = _tag_table()


def is_ddl_tag(body: bytes) -> bool:
    """Is this CommandComplete body (tag and its zero) one that bumps the schema epoch?"""
    return len(body) >= 3 and _DDL_TAGS[(body[0] << 8) | body[1]] == 1


class ReplyRouter:
    """``feed(data, client_at_rest) -> (bytes for the client, free offset or -1)``.

    The free offset is where, in ``data``, the connection became free: the caller writes the
    returned bytes to the client and unlinks the server connection; bytes of ``data`` after the
    offset were not routed (PostgreSQL sent something nobody asked for).
    """

    __slots__ = ("_body", "_ddl_open", "_drop", "_header", "_in_body", "_skip", "_type",
                 "changes", "errors", "idle_readies", "max_length", "on_bind_error", "plan",
                 "readies", "registry", "status")

    def __init__(self, plan: ReplyPlan, max_length: int = codes.LARGE_MESSAGE_LIMIT,
                 registry: StatementRegistry | None = None) -> None:
        self.plan = plan
        #: the worker's statements: its schema epoch is bumped on DDL (None: not followed)
        self.registry = registry
        self._ddl_open = False  # DDL passed since the last ReadyForQuery 'I'
        #: an ErrorResponse (its body) answers a client's Bind: True when the callee has
        #: arranged a retry (a step at the plan's head now drops the error)
        self.on_bind_error: Callable[[bytes], bool] | None = None
        self.max_length = max_length
        self.status = codes.TX_IDLE  # of the last ReadyForQuery
        self.changes: dict[str, str] = {}  # ParameterStatus values since the caller last looked
        # counters for the views: ReadyForQuery messages passed, those with status 'I' (a
        # transaction ended), and the SQLSTATEs of ErrorResponses passed (the caller empties
        # it; an ErrorResponse split across chunks is not seen)
        self.readies = 0
        self.idle_readies = 0
        self.errors: list[str] = []
        self._header = b""  # a header split across chunks
        self._in_body = False
        self._skip = 0  # body bytes of the current message still to come
        self._type = 0
        self._drop = False
        self._body: bytearray | None = None  # collected body (ReadyForQuery, ParameterStatus)

    @property
    def at_boundary(self) -> bool:
        return not self._in_body and not self._header

    @property
    def free(self) -> bool:
        """The server's side is done: nothing is owed to the client, no server message is half
        read, and the last status was 'I'. The connection is free when the client's side is at
        rest too (``ClientForwarder.at_rest``)."""
        return (self.status == codes.TX_IDLE and self.plan.idle and not self._in_body
                and not self._header)

    def reset(self) -> None:
        """Forget any message in progress (the connection is reused after pgcorral's own
        exchange, which read whole messages)."""
        self._header = b""
        self._in_body = False
        self._skip = 0
        self._body = None
        self.plan.reset()

    def feed(self, data: bytes, client_at_rest: bool) -> tuple[bytes, int]:
        out: list[bytes] = []
        n = len(data)
        pos = run = 0  # run: start of the bytes to pass not yet appended to out
        plan = self.plan
        steps = plan.steps
        fabricated = plan.out
        if self._header:  # the rest of a split header
            need = 5 - len(self._header)
            header = self._header + data[:need]
            if len(header) < 5:
                self._header = header
                return b"", -1
            self._header = b""
            pos = run = need
            if self._start(*_header(header, 0)):
                out.append(header)
        if self._in_body:  # the rest of a split message
            take = self._skip if self._skip <= n - pos else n - pos
            if self._body is not None:
                self._body += data[pos:pos + take]
            pos += take
            self._skip -= take
            if self._drop:
                run = pos
            if self._skip:  # the rest comes in a later chunk
                if run == 0 and not out:
                    return data, -1
                out.append(data[run:pos])
                return b"".join(out), -1
            self._in_body = False
            ready = self._end()
            if fabricated:
                out.append(data[run:pos])
                out.append(plan.fabricated_before_next())
                run = pos
            if ready and client_at_rest and not steps and self.status == _TX_IDLE:
                out.append(data[run:pos])
                return b"".join(out), pos
        max_length = self.max_length
        type_: int  # (typed: compiled, they stay machine integers)
        length: int
        # The types that pass without the plan's attention now (rows, command tags, ...):
        # forwarded without a call. Read again after anything that may change the plan.
        quiet = steps[0].quiet if steps else _ALL_QUIET  # (plan.quiet())
        while pos < n:  # whole messages, and maybe a split one at the end
            if pos + 5 > n:
                out.append(data[run:pos])
                self._header = data[pos:]
                return b"".join(out), -1
            type_, length = _header(data, pos)
            end = pos + 1 + length
            if length < 4 or length - 4 > max_length:
                raise FramingError(f"invalid message length {length} from the server")
            if end > n:  # split: the general path follows it to its end in later chunks
                if not self._start(type_, length):
                    out.append(data[run:pos])
                    run = pos + 5
                take = n - pos - 5
                self._skip -= take
                if self._body is not None:
                    self._body += data[pos + 5:n]
                pos = n
                if self._drop:
                    run = n
                break
            if quiet[type_]:  # the common case: it passes, the plan has nothing to do
                if type_ in (_DATA_ROW, _COPY_DATA):
                    # the rows (or COPY data) that follow get the same answer: skipped by
                    # their headers only
                    while end + 5 <= n and data[end] == type_:
                        (length,) = _length(data, end + 1)
                        if length < 4 or length - 4 > max_length or end + 1 + length > n:
                            break
                        end += 1 + length
                    pos = end
                    continue
                pos = end
                if type_ == _READY:
                    if length != 5:
                        raise FramingError("ReadyForQuery with a body that is not one byte")
                    status = data[end - 1]
                    self.status = status
                    self.readies += 1
                    if status == _TX_IDLE:
                        self.idle_readies += 1
                        if self._ddl_open:
                            self._ddl_committed()
                    # free when nothing is expected (and so nothing fabricated is due)
                    if client_at_rest and status == _TX_IDLE and not steps:
                        return (data if run == 0 and not out and pos == n else
                                b"".join([*out, data[run:pos]])), pos
                elif type_ == _COMMAND:
                    if length > 6 and _DDL_TAGS[(data[pos - length + 4] << 8)
                                                | data[pos - length + 5]]:
                        self._ddl()
                elif type_ == _PARAM and length - 4 <= _MAX_COLLECTED:
                    self._collect_parameter(data[end - length + 4:end])
                continue
            # the plan's attention: the reply ends a request, is an error, is dropped, ...
            head = steps[0]  # (quiet is ALL_QUIET when nothing is expected)
            dropped = False  # pgcorral's own request's reply: not the client's query
            if type_ == _COMMAND:
                if length > 6 and _DDL_TAGS[(data[pos + 5] << 8) | data[pos + 6]]:
                    self._ddl()
            elif (type_ == _ERROR and head.ends is _BIND_ENDS and not head.drop
                  and self.on_bind_error is not None
                  and self.on_bind_error(data[pos + 5:end])):
                head = steps[0]  # a retry: the step that drops the error and its Ready
            if head.plain and type_ in head.ends:
                plan.pop_plain()  # a request passed unchanged is answered
            elif plan.on_server_reply(type_) == DROP:
                out.append(data[run:pos])
                run = end
                dropped = True
            if type_ == _ERROR and not dropped:
                self.errors.append(error_sqlstate(data[pos + 5:end]))
            quiet = steps[0].quiet if steps else _ALL_QUIET
            pos = end
            if fabricated:  # (taking them leaves the plan's steps as they are)
                out.append(data[run:pos])
                out.append(plan.fabricated_before_next())
                run = pos
            if type_ == _READY:
                if length != 5:
                    raise FramingError("ReadyForQuery with a body that is not one byte")
                status = data[end - 1]
                self.status = status
                if not dropped:
                    self.readies += 1
                    if status == _TX_IDLE:
                        self.idle_readies += 1
                if status == _TX_IDLE and self._ddl_open:
                    self._ddl_committed()
                if client_at_rest and status == _TX_IDLE and not steps:
                    out.append(data[run:pos])
                    return b"".join(out), pos
        if run == 0 and not out:
            return data, -1
        out.append(data[run:pos])
        return b"".join(out), -1

    def _collect_parameter(self, body: bytes) -> None:
        """A ParameterStatus passed: its value is remembered (``changes``)."""
        try:
            name, value = parse_parameter_status(body)
        except ValueError as exc:
            raise FramingError(str(exc)) from None
        self.changes[name] = value

    def _ddl(self) -> None:
        """A DDL command tag passed: new Parses (of this transaction too) are prepared anew."""
        registry = self.registry
        if registry is not None:
            registry.bump()
            self._ddl_open = True

    def _ddl_committed(self) -> None:
        """The transaction that ran DDL ended: bumped again, as others see the change now."""
        self._ddl_open = False
        registry = self.registry
        if registry is not None:
            registry.bump()

    def _start(self, type_: int, length: int) -> bool:
        """A message header: decide pass or drop; True if it passes."""
        if length < 4 or length - 4 > self.max_length:
            raise FramingError(f"invalid message length {length} from the server")
        self._type = type_
        self._skip = length - 4
        self._in_body = True
        self._body = bytearray() if (type_ == _READY or (
            type_ in (_PARAM, _COMMAND) and length - 4 <= _MAX_COLLECTED)) else None
        self._drop = self.plan.on_server_reply(type_) == DROP
        return not self._drop

    def _end(self) -> bool:
        """A message is complete; True if it was a ReadyForQuery."""
        body = self._body
        if body is None:
            return False
        self._body = None
        if self._type == _READY:
            if len(body) != 1:
                raise FramingError("ReadyForQuery with a body that is not one byte")
            self.status = body[0]
            if not self._drop:
                self.readies += 1
                if body[0] == _TX_IDLE:
                    self.idle_readies += 1
            if body[0] == _TX_IDLE and self._ddl_open:
                self._ddl_committed()
            return True
        if self._type == _COMMAND:
            if is_ddl_tag(bytes(body)):
                self._ddl()
            return False
        self._collect_parameter(bytes(body))
        return False
