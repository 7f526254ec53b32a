"""Helpers of the transaction pipeline's unit tests: client and server messages as bytes,
``Side``, one client on one server connection through the statement mapper and a reply plan,
and ``FakePostgres``, the replies of a server that keeps its statements and skips after
errors."""

from __future__ import annotations

import struct

from pgcorral.protocol import codes
from pgcorral.protocol.replyplan import PASS, ReplyPlan
from pgcorral.protocol.rewrite import REQUESTS, parse_bind, parse_parse, parse_target, rewrite
from pgcorral.protocol.statements import ClientStatements, ServerStatements, StatementRegistry


def msg(type_: bytes, body: bytes = b"") -> bytes:
    return type_ + struct.pack("!I", len(body) + 4) + body


def parse(name: bytes, query: bytes, oids: tuple[int, ...] = ()) -> bytes:
    types = struct.pack("!h", len(oids)) + b"".join(struct.pack("!I", o) for o in oids)
    return msg(b"P", name + b"\0" + query + b"\0" + types)


BIND_REST = b"\0\0\0\0\0\0"  # no formats, no parameters, no result formats


def bind(stmt: bytes, portal: bytes = b"") -> bytes:
    return msg(b"B", portal + b"\0" + stmt + b"\0" + BIND_REST)


def describe(kind: bytes, name: bytes) -> bytes:
    return msg(b"D", kind + name + b"\0")


def close(kind: bytes, name: bytes) -> bytes:
    return msg(b"C", kind + name + b"\0")


def query(sql: bytes) -> bytes:
    return msg(b"Q", sql + b"\0")


def ready(status: bytes) -> bytes:
    return msg(b"Z", status)


EXECUTE = msg(b"E", b"\0\0\0\0\0")
ROW_DESCRIPTION = msg(b"T", b"\0\x01x\0" + b"\0" * 6 + b"\0\x17\0\x04\xff\xff\xff\xff\0\0")
SYNC = msg(b"S")
FLUSH = msg(b"H")
TERMINATE = msg(b"X")


def split(data: bytes) -> list[tuple[int, bytes]]:
    """``(type, body)`` of each whole message in ``data``."""
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("!I", data, pos + 1)
        out.append((data[pos], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


class Side:
    """One client on one server connection: feeds messages to the mapper (keeping its batch
    start as ``ClientForwarder`` does), collects what each side gets."""

    def __init__(self, capacity: int = 10) -> None:
        self.registry = StatementRegistry()
        self.client = ClientStatements()
        self.server = ServerStatements(capacity)
        self.plan = ReplyPlan(self.server)
        self.to_client = b""
        self.at_sync = True  # just linked
        self.tx_failed = False

    def send(self, *messages: bytes) -> bytes:
        out = b""
        for m in messages:
            rw = rewrite(m[0], m[5:], self.client, self.server, self.registry,
                         at_sync=self.at_sync, tx_failed=self.tx_failed)
            if m[0] == codes.SYNC:
                self.at_sync = True
            elif m[0] in REQUESTS:
                self.at_sync = False
            out += rw.send
            self.plan.extend(rw.steps)
            self.to_client += self.plan.fabricated_before_next()
        return out

    def reply(self, *messages: bytes) -> list[str]:
        verdicts = []
        for m in messages:
            verdict = self.plan.on_server_reply(m[0])
            verdicts.append(verdict)
            if verdict == PASS:
                self.to_client += m
            self.to_client += self.plan.fabricated_before_next()
        return verdicts


class FakePostgres:
    """Named statements, error skipping until Sync, and the few replies the tests need."""

    def __init__(self, rows: int = 0) -> None:
        self.rows = rows  # DataRows per Execute or SELECT
        self.statements: dict[bytes, bytes] = {}
        self.skipping = False
        self.bound: list[bytes] = []  # identity of every successful Bind

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        for type_, body in split(data):
            if self.skipping and type_ != ord("S"):
                continue
            out += self._one(chr(type_), body)
        return out

    def _error(self) -> list[bytes]:
        self.skipping = True
        return [msg(b"E", b"\0")]

    def _one(self, kind: str, body: bytes) -> list[bytes]:
        if kind == "P":
            name, identity = parse_parse(body)
            if name and name in self.statements:
                return self._error()  # 42P05 (the mapper causes it for a client's second Parse)
            if identity.startswith(b"BAD"):
                return self._error()  # a statement PostgreSQL refuses
            self.statements[name] = identity
            return [msg(b"1")]
        if kind == "B":
            _, stmt, _ = parse_bind(body)
            if stmt not in self.statements:
                return self._error()
            self.bound.append(self.statements[stmt])
            return [msg(b"2")]
        if kind == "E":
            return [msg(b"D", b"\0\x01\0\0\0\x011")] * self.rows + [msg(b"C", b"SELECT 1\0")]
        if kind == "D":
            rows = [ROW_DESCRIPTION] if body[:1] == b"P" else [msg(b"t", b"\0\0"), msg(b"n")]
            return rows
        if kind == "H":
            return []
        if kind == "C":
            self.statements.pop(parse_target(body, "Close")[1], None)
            return [msg(b"3")]
        if kind == "S":
            self.skipping = False
            return [msg(b"Z", b"I")]
        sql = body[:-1]
        if sql.startswith(b"SELECT"):
            return [ROW_DESCRIPTION, *[msg(b"D", b"\0\x01\0\0\0\x011")] * self.rows,
                    msg(b"C", b"SELECT 1\0"), msg(b"Z", b"I")]
        if sql == b"":
            return [msg(b"I"), msg(b"Z", b"I")]
        if sql == b"DISCARD ALL":
            self.statements.clear()
            return [msg(b"C", b"DISCARD ALL\0"), msg(b"Z", b"I")]
        if sql == b"DEALLOCATE ALL":
            self.statements.clear()
            return [msg(b"C", b"DEALLOCATE ALL\0"), msg(b"Z", b"I")]
        name = sql.split()[-1]
        if name in self.statements:
            del self.statements[name]
            return [msg(b"C", b"DEALLOCATE\0"), msg(b"Z", b"I")]
        return [msg(b"E", b"\0"), msg(b"Z", b"I")]
