"""Microbench: the reply router's cost per transaction, to measure the DDL tag check (issue 14).

Runs the compiled ``ClientForwarder`` + ``ReplyRouter`` of the pgcorral on ``sys.path`` over
three reply streams (a simple-protocol SELECT, a prepared Bind/Execute/Sync, an explicit
transaction with BEGIN/UPDATE/COMMIT) and prints ns of process CPU time per transaction (best of
7 runs; CPU time, so that a busy machine disturbs it less). Run it
against two builds and compare, e.g.::

    PYTHONPATH=src .venv/bin/python bench/router_ddl.py
    PYTHONPATH=/path/to/other/src .venv/bin/python bench/router_ddl.py

No server, no sockets: only the pooler CPU that the tag check could add.
"""

from __future__ import annotations

import inspect
import struct
import time

from pgcorral.protocol.replyplan import ReplyPlan
from pgcorral.protocol.statements import ClientStatements, ServerStatements, StatementRegistry
from pgcorral.protocol.txforward import ClientForwarder
from pgcorral.protocol.txrelay import ReplyRouter


def msg(type_: bytes, body: bytes = b"") -> bytes:
    return type_ + struct.pack("!I", len(body) + 4) + body


def link() -> tuple[ClientForwarder, ReplyRouter]:
    registry = StatementRegistry()
    plan = ReplyPlan(ServerStatements(100), registry.known)
    if "registry" in inspect.signature(ReplyRouter.__init__).parameters:
        router = ReplyRouter(plan, registry=registry)
    else:
        router = ReplyRouter(plan)
    forwarder = ClientForwarder(ClientStatements(), registry)
    forwarder.link()
    return forwarder, router


ROW_DESC = msg(b"T", b"\0\x01x\0" + b"\0" * 6 + b"\0\x17\0\x04\xff\xff\xff\xff\0\0")
ROW = msg(b"D", b"\0\x01\0\0\0\x011")
SYNC = msg(b"S")


def workloads() -> dict[str, tuple[list[bytes], list[bytes]]]:
    select = msg(b"Q", b"SELECT 1\0")
    parse = msg(b"P", b"s\0SELECT 1\0\0\0")
    bind = msg(b"B", b"\0s\0\0\0\0\0\0\0")
    execute = msg(b"E", b"\0\0\0\0\0")
    return {
        "simple SELECT": ([select], [ROW_DESC + ROW + msg(b"C", b"SELECT 1\0")
                                     + msg(b"Z", b"I")]),
        "prepared Bind/Execute/Sync": ([bind + execute + SYNC],
                                       [msg(b"2") + ROW + msg(b"C", b"SELECT 1\0")
                                        + msg(b"Z", b"I")]),
        "BEGIN; UPDATE; COMMIT": (
            [msg(b"Q", b"BEGIN\0"), msg(b"Q", b"UPDATE t SET x = 1\0"), msg(b"Q", b"COMMIT\0")],
            [msg(b"C", b"BEGIN\0") + msg(b"Z", b"T"), msg(b"C", b"UPDATE 1\0") + msg(b"Z", b"T"),
             msg(b"C", b"COMMIT\0") + msg(b"Z", b"I")]),
        "_parse": ([parse + SYNC], [msg(b"1") + msg(b"Z", b"I")]),
    }


def run(name: str, requests: list[bytes], replies: list[bytes], setup: list[bytes],
        setup_replies: list[bytes], n: int) -> float:
    forwarder, router = link()
    for request, reply in zip(setup, setup_replies, strict=True):
        forwarder.feed(request, router.plan, router.status)
        router.feed(reply, forwarder.at_rest)
    plan = router.plan
    feed, route = forwarder.feed, router.feed
    pairs = list(zip(requests, replies, strict=True))
    start = time.process_time_ns()
    for _ in range(n):
        for request, reply in pairs:
            feed(request, plan, router.status)
            route(reply, forwarder.at_rest)
    return (time.process_time_ns() - start) / n


def main() -> None:
    loads = workloads()
    setup, setup_replies = loads.pop("_parse")
    n = 200_000
    for name, (requests, replies) in loads.items():
        best = min(run(name, requests, replies, setup, setup_replies, n) for _ in range(7))
        print(f"{name:30s} {best:8.1f} ns/transaction")


if __name__ == "__main__":
    main()
