"""The reply plan of a server connection in transaction mode: what each request gets back.

It owns ``ReplyStep`` (the expected reply to one request), ``DEFAULT_STEPS`` (those of a message
passed unchanged), ``own_query_step`` (pgcorral's own request before a client's) and
``ReplyPlan`` (per server connection: the FIFO of steps). Pure: no I/O, no clock.

Ordering contract. Every client request puts its reply steps in the plan in request order,
whether it is sent, answered locally, or preceded by pgcorral's own Parse/Close, so:

1. Per complete client message: ``rw = rewrite(type, body, client, server, registry, ...)``
   (``protocol.rewrite``); write ``rw.send`` (maybe empty) to the server;
   ``plan.extend(rw.steps)``. (``protocol.txforward.ClientForwarder`` does this, and passes
   the messages that need no rewrite with their ``DEFAULT_STEPS``.)
2. Per complete server message: ``plan.on_server_reply(type)`` -> ``"pass"`` (forward it) or
   ``"drop"`` (skip its bytes).
3. After step 1 (per chunk at least) and after every step 2, write
   ``plan.fabricated_before_next()`` to the client after what was forwarded so far: the replies
   pgcorral makes whose turn has come (ParseComplete for a Parse of a statement the server has,
   CloseComplete for a client's Close 'S', CommandComplete for a local DEALLOCATE).
4. Release the server when ``plan.idle`` and the last ReadyForQuery passed said 'I'.

A step ends at a known reply type (ParseComplete, BindComplete, CloseComplete, RowDescription or
NoData, CommandComplete/EmptyQueryResponse/PortalSuspended, ReadyForQuery) and passes, drops or
is fabricated. Notices, ParameterStatus and notifications always pass. An ErrorResponse ends a
non-ReadyForQuery step and, as PostgreSQL ignores messages until Sync, discards the steps up to
the next Sync (fabricated ones too); a failed or skipped Parse of ours leaves the server's LRU,
and a client's Parse or Close that fails or is skipped is undone in the client's names, newest
first (``ReplyStep.client_undo``). CopyInResponse removes the steps of Syncs sent during copy-in
(PostgreSQL ignores them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from pgcorral.protocol import codes
from pgcorral.protocol.messages import message
from pgcorral.protocol.statements import ClientStatements, Entry, ServerStatements

PASS: Final = "pass"
DROP: Final = "drop"

# ``Final``: compiled, a C static load instead of a lookup in the module's dict.
#: Reply types that end a step, by request. A step of a Query or Sync ends with ``READY_ENDS``
#: (the plan tells it by identity).
READY_ENDS: Final = frozenset([codes.READY_FOR_QUERY])
PARSE_ENDS: Final = frozenset([codes.PARSE_COMPLETE])
BIND_ENDS: Final = frozenset([codes.BIND_COMPLETE])
CLOSE_ENDS: Final = frozenset([codes.CLOSE_COMPLETE])
DESCRIBE_ENDS: Final = frozenset([codes.ROW_DESCRIPTION, codes.NO_DATA])
_EXECUTE_ENDS: Final = frozenset([codes.COMMAND_COMPLETE, codes.EMPTY_QUERY_RESPONSE,
                                  codes.PORTAL_SUSPENDED])
_ASYNC: Final = frozenset([codes.NOTICE_RESPONSE, codes.PARAMETER_STATUS,
                           codes.NOTIFICATION_RESPONSE])
_COPY_END: Final = frozenset([codes.COPY_DONE, codes.COPY_FAIL])
#: Reply types ``on_server_reply`` acts on whatever the head step ends with.
_ATTENTION: Final = frozenset([codes.ERROR_RESPONSE, codes.COPY_IN_RESPONSE,
                               codes.EMPTY_QUERY_RESPONSE])


def type_table(types: frozenset[int]) -> bytes:
    """A table by message type byte: 1 for the types in ``types``, else 0 (indexing one is
    cheaper than a set lookup, the more so compiled)."""
    return bytes(1 if t in types else 0 for t in range(256))


#: The ``ReplyStep.quiet`` table when nothing is expected: every type passes quietly.
ALL_QUIET: Final = type_table(frozenset(range(256)))
_ASYNC_QUIET: Final = type_table(_ASYNC)
#: ``ReplyStep.quiet`` by ``ends`` (a handful of distinct sets).
_QUIET: Final[dict[frozenset[int], bytes]] = {}
_ERROR: Final = codes.ERROR_RESPONSE
_COPY_IN: Final = codes.COPY_IN_RESPONSE
_EMPTY_QUERY: Final = codes.EMPTY_QUERY_RESPONSE


@dataclass(slots=True)
class ReplyStep:
    """The expected reply to one request. ``ends``: reply types that complete it."""

    ends: frozenset[int]
    drop: bool = False  # pgcorral's own request: its replies never reach the client
    fabricate: bytes = b""  # not sent: these bytes are the reply, emitted at its turn
    sync: bool = False  # a Sync: ends the skipping after an error
    tag: bytes = b""  # replace EmptyQueryResponse with CommandComplete(tag)
    prepares: str | None = None  # a Parse of this pooler name
    closes: str | None = None  # a Close of this pooler name
    restore: tuple[str, ...] = ()  # names a DISCARD ALL forgot: back in the LRU if it fails
    copy_end: bool = False  # a CopyDone/CopyFail marker, no reply of its own
    error: bytes = b""  # an ErrorResponse that replaces the server's (``protocol.repair``)
    # a client's Parse or Close changed its names: (its statements, name, identity set or
    # None, identity before or None), put back if the request fails or is skipped
    client_undo: tuple[ClientStatements, bytes, Entry | None, Entry | None] | None = None
    # a DISCARD ALL: the client's names before it, put back if it fails
    client_names: tuple[ClientStatements, dict[bytes, Entry]] | None = None
    #: the reply types that ``ReplyPlan.on_server_reply`` answers "pass" without changing
    #: anything while this step is at the head (rows, command tags, notices, ...): a table
    #: by type byte (``type_table``), from ``ends`` and ``drop``; the router forwards them
    #: without asking
    quiet: bytes = field(default=b"", init=False, repr=False, compare=False)
    #: one of ``DEFAULT_STEPS`` (never changed): a reply in ``ends`` only removes it, so the
    #: router does that itself (``ReplyPlan.pop_plain``)
    plain: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.drop:
            self.quiet = _ASYNC_QUIET
            return
        quiet = _QUIET.get(self.ends)
        if quiet is None:
            quiet = _QUIET[self.ends] = type_table(
                frozenset(range(256)) - self.ends - _ATTENTION)
        self.quiet = quiet


_ENDS = {codes.PARSE: PARSE_ENDS, codes.BIND: BIND_ENDS, codes.CLOSE: CLOSE_ENDS,
         codes.DESCRIBE: DESCRIBE_ENDS, codes.EXECUTE: _EXECUTE_ENDS}


def _make_default_steps(type_: int) -> tuple[ReplyStep, ...]:
    if type_ == codes.SYNC:
        return (ReplyStep(READY_ENDS, sync=True, plain=True),)
    if type_ in (codes.QUERY, codes.FUNCTION_CALL):
        return (ReplyStep(READY_ENDS, plain=True),)
    if type_ in _COPY_END:
        return (ReplyStep(frozenset(), copy_end=True),)
    ends = _ENDS.get(type_)
    return (ReplyStep(ends, plain=True),) if ends is not None else ()


#: The steps of a message passed unchanged, by type. Shared: a plan never mutates a step that
#: has no ``restore`` (the only field it changes), and these have none.
DEFAULT_STEPS: Final[dict[int, tuple[ReplyStep, ...]]] = {
    t: _make_default_steps(t) for t in range(256)}


def own_query_step() -> ReplyStep:
    """The step of a Query or Sync-ended batch pgcorral sends itself before a client's requests
    (settings, reset): every reply up to its ReadyForQuery is dropped, errors included."""
    return ReplyStep(READY_ENDS, drop=True)


def _command_complete(tag: bytes) -> bytes:
    return message(b"C", tag + b"\0")


#: ``ReplyPlan.capture``: off (mapping off), on, suspended until the plan is idle again (a
#: retry was made, or too much was written)
CAPTURE_OFF: Final = 0
CAPTURE_ON: Final = 1
CAPTURE_SUSPENDED: Final = 2
#: at most this many bytes are kept per idle-to-idle stretch (more: suspended)
CAPTURE_LIMIT: Final = 64 * 1024


class ReplyPlan:
    """The FIFO of reply steps of one server connection (see the module docstring).

    With mapping on it also keeps what was written to the server since it was last idle
    (``sent``; ``net.txserver`` appends, and empties it when the plan is idle), for the
    error-driven repair of stale statements (``protocol.repair``)."""

    __slots__ = ("_copy_in", "_skipping", "capture", "known", "out", "sent", "sent_from",
                 "sent_size", "server", "steps")

    def __init__(self, server: ServerStatements, known: set[str] | None = None) -> None:
        self.server = server
        self.known = known  # StatementRegistry.known: names a server accepted
        #: the expected replies, oldest first (read by the router; changed only here)
        self.steps: deque[ReplyStep] = deque()
        self.out = bytearray()  # fabricated replies due now (``fabricated_before_next``)
        self._skipping = False  # after an error: steps up to the next Sync get no reply
        self._copy_in = False  # copy-in started: Syncs before the CopyDone/CopyFail are ignored
        self.capture = CAPTURE_ON if server.capacity > 0 else CAPTURE_OFF
        self.sent: list[bytes] = []  # written to the server since the plan was idle
        self.sent_size = 0
        self.sent_from = 0  # the router's ReadyForQuery count when ``sent`` started

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def idle(self) -> bool:
        """Every reply expected has been handled (and fabricated bytes taken)."""
        return not self.steps and not self.out

    @property
    def has_fabricated(self) -> bool:
        """Fabricated replies are due (``fabricated_before_next`` would return bytes), or a
        fabricated step waits at the head."""
        return bool(self.out)  # settled: a fabricated step never waits at the head

    def reset(self) -> None:
        """Forget every step (the server connection is being reset or closed)."""
        if self.steps:
            self.steps.clear()
        if self.out:
            self.out.clear()
        self._skipping = False
        self._copy_in = False
        self.idle_again()

    def idle_again(self) -> None:
        """Nothing is expected: what was written is forgotten, capturing starts again."""
        if self.sent:
            self.sent.clear()
            self.sent_size = 0
        if self.capture == CAPTURE_SUSPENDED:
            self.capture = CAPTURE_ON

    def quiet(self) -> bytes:
        """The types that pass now with no effect on the plan (``ReplyStep.quiet`` of the
        head): the router forwards them without asking ``on_server_reply``. Valid until the
        plan changes (a call of ``on_server_reply``, ``extend``, ``reset``)."""
        steps = self.steps
        return steps[0].quiet if steps else ALL_QUIET

    def extend(self, steps: Iterable[ReplyStep]) -> None:
        if not self._copy_in and not self._skipping:
            self.steps.extend(steps)
            if self.steps and (self.steps[0].fabricate or self.steps[0].copy_end):
                self._settle()
            return
        for step in steps:
            if self._copy_in:  # PostgreSQL ignores Sync (and Flush) in copy-in mode
                if step.copy_end:
                    self._copy_in = False
                    continue
                if step.sync:
                    continue
            self.steps.append(step)
        self._settle()

    def pop_plain(self) -> None:
        """What ``on_server_reply`` does with a reply in the ``ends`` of a plain head step
        (``ReplyStep.plain``; such a reply is never an error or a CopyInResponse, and a plain
        step has no tag): the step is done, with nothing to record or undo. The router's hot
        path for the replies that end requests (the extended protocol has one per message)."""
        steps = self.steps
        steps.popleft()
        if steps:
            head = steps[0]
            if head.fabricate or head.copy_end:
                self._settle()

    def fabricated_before_next(self) -> bytes:
        """Bytes pgcorral answers itself whose turn has come; write them to the client now."""
        self._settle()
        out = bytes(self.out)
        self.out.clear()
        return out

    def on_server_reply(self, type_: int) -> str:
        """``"pass"`` or ``"drop"`` for one server message, given its type byte.

        Every method leaves the plan settled (no fabricated step or copy marker at the head,
        no skipping with a request at the head), so there is nothing to settle first."""
        steps = self.steps
        if not steps or type_ in _ASYNC:
            return PASS
        head = steps[0]
        if type_ == _ERROR:
            if head.ends is READY_ENDS:  # a Query or Sync goes on to its ReadyForQuery
                if head.restore:
                    self._restore(head.restore)
                    head.restore = ()
                if head.client_names is not None:
                    client, saved = head.client_names
                    client.names.update(saved)
                    head.client_names = None
                return DROP if head.drop else PASS
            # The failed request and every one up to the next Sync have no effect: undone
            # newest first (a Close after a Parse of the same name must be undone first).
            skipped = [steps.popleft()]
            while steps and not steps[0].sync:
                skipped.append(steps.popleft())
            for step in reversed(skipped):
                self._undo(step)
            self._skipping = True
            self._settle()
            if head.error:  # the server's error is replaced
                self.out += head.error
                return DROP
            return PASS  # the error answers the client's request (ours only when it failed)
        if type_ == _COPY_IN:
            self._start_copy_in()
        elif type_ == _EMPTY_QUERY and head.tag:
            self.out += _command_complete(head.tag)
            return DROP
        if type_ in head.ends:
            steps.popleft()
            if head.prepares is not None and self.known is not None:
                self.known.add(head.prepares)
            self._settle()
        return DROP if head.drop else PASS

    def _start_copy_in(self) -> None:
        """The head request entered copy-in: the Syncs queued after it, up to the client's
        CopyDone/CopyFail, get no reply (PostgreSQL ignores them)."""
        head, *after = self.steps
        for i, step in enumerate(after):
            if step.copy_end:
                kept = [s for s in after[:i] if not s.sync] + after[i + 1:]
                break
        else:
            kept = [s for s in after if not s.sync]
            self._copy_in = True
        steps = self.steps  # changed in place: the router holds it
        steps.clear()
        steps.append(head)
        steps.extend(kept)

    def _settle(self) -> None:
        """Apply skipping, drop stray markers, collect fabricated replies at the head."""
        steps = self.steps
        while steps:
            head = steps[0]
            if self._skipping and not head.sync:
                steps.popleft()
                self._undo(head)
            elif head.copy_end:
                steps.popleft()
            elif head.fabricate:
                self.out += steps.popleft().fabricate
            else:
                break
        if self._skipping and steps:
            self._skipping = False

    def _undo(self, step: ReplyStep) -> None:
        """A request that failed or was skipped: its effect on the server did not happen."""
        server = self.server
        if step.prepares is not None:
            server.discard(step.prepares)
            server.pending_close.pop(step.prepares, None)  # never prepared: nothing to close
        if step.closes is not None and step.closes not in server:
            server.pending_close[step.closes] = None
        if step.restore:
            self._restore(step.restore)
        if step.client_undo is not None:
            client, name, done, before = step.client_undo
            if client.names.get(name) == done:  # not changed again since (compiled, a
                # tuple is boxed anew where it is stored: compared by value)
                if before is None:
                    client.names.pop(name, None)
                else:
                    client.names[name] = before

    def _restore(self, names: tuple[str, ...]) -> None:
        """A DISCARD ALL failed or was skipped: its statements are still prepared."""
        server = self.server
        for name in names:
            if name not in server:
                server.pending_close.update(dict.fromkeys(server.add(name)))
