"""A connection storm (issue 15, item 1): new clients at a fixed rate (default 2,000 a second for
60 s) against a pool of 20 server connections, each logging in, running `SELECT 1` and
leaving; meanwhile one client connected before the storm runs `SELECT 1` in a loop.

    .venv/bin/python bench/storm.py --rate 2000 --seconds 60 --pipeline transaction
    .venv/bin/python bench/storm.py --rate 2000 --seconds 60 --target pgbouncer

Reports JSON: connections attempted, served, refused (an error from the pooler), failed
(anything else: timeouts, resets), achieved rate, the steady client's latency (median, p99,
max) during the storm and alone before it, and the pooler's memory (PSS) and descriptors
before, right after, and 5 s after the storm (no growth once the storm ends is the goal).
Loopback only; bounded by --seconds and per-connection timeouts. PostgreSQL and the pooler
are started and stopped by bench/pooler.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pooler as ic

Q1 = b"SELECT 1\0"
QUERY = b"Q" + struct.pack("!i", len(Q1) + 4) + Q1
TERMINATE = b"X\0\0\0\4"


async def read_until_ready(reader: asyncio.StreamReader) -> bytes | None:
    """Messages up to ReadyForQuery; the first ErrorResponse's body, or None."""
    error = None
    while True:
        head = await reader.readexactly(5)
        body = await reader.readexactly(struct.unpack("!i", head[1:])[0] - 4)
        if head[:1] == b"E" and error is None:
            error = body
            return error  # a refused login ends here
        if head[:1] == b"Z":
            return error


async def one_client(port: int, user: str, database: str, stats: dict[str, int]) -> None:
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(ic.startup(user, database))
                if await read_until_ready(reader) is not None:
                    stats["refused"] += 1
                    return
                writer.write(QUERY)
                if await read_until_ready(reader) is not None:
                    stats["refused"] += 1
                    return
                writer.write(TERMINATE)
                stats["served"] += 1
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        stats["failed"] += 1


async def steady(port: int, user: str, database: str, stop: asyncio.Event,
                 samples: list[float]) -> None:
    reader, writer = await ic.login(port, user, database, wait_ready=True)
    while not stop.is_set():
        start = time.perf_counter()
        writer.write(QUERY)
        await read_until_ready(reader)
        samples.append((time.perf_counter() - start) * 1000)
        await asyncio.sleep(0.005)
    writer.close()


def quantiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered), 3),
            "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1], 3),
            "max_ms": round(ordered[-1], 3), "n": len(ordered)}


async def storm(args: argparse.Namespace, proc: subprocess.Popen[bytes]) -> dict[str, object]:
    port: int = proc.port  # type: ignore[attr-defined]
    user, database = args.user, args.database
    await ic.wait_ready(port, user, database)
    alone: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(steady(port, user, database, stop, alone))
    await asyncio.sleep(2)
    stop.set()
    await task
    pss0, fds0 = ic.pss_kib(proc.pid), ic.fds(proc.pid)
    during: list[float] = []
    stop = asyncio.Event()
    steady_task = asyncio.create_task(steady(port, user, database, stop, during))
    stats = {"served": 0, "refused": 0, "failed": 0}
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    sent = 0
    while (now := time.monotonic()) - start < args.seconds:
        due = int((now - start) * args.rate)
        while sent < due:
            t = asyncio.create_task(one_client(port, user, database, stats))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(0.001)
    elapsed = time.monotonic() - start
    if tasks:
        await asyncio.wait(tasks, timeout=15)
    stop.set()
    await steady_task
    pss1, fds1 = ic.pss_kib(proc.pid), ic.fds(proc.pid)
    await asyncio.sleep(5)
    pss2, fds2 = ic.pss_kib(proc.pid), ic.fds(proc.pid)
    return {"attempted": sent, **stats, "rate_offered": args.rate,
            "rate_served": round(stats["served"] / elapsed, 1),
            "steady_alone": quantiles(alone), "steady_during": quantiles(during),
            "pss_kib": [pss0, pss1, pss2], "fds": [fds0, fds1, fds2]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--pipeline", choices=["session", "transaction"], default="transaction")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--target", choices=["pgcorral", "pgbouncer"], default="pgcorral")
    args = parser.parse_args()
    args.user, args.database, args.timeout, args.clients = "postgres", "postgres", 30, 10000
    with ic.pooler_run("storm-", args) as proc:
        result = asyncio.run(storm(args, proc))
    result.update(target=args.target, pipeline=args.pipeline, workers=args.workers,
                  pool=args.pool, seconds=args.seconds)
    print(json.dumps(result, indent=2))
    return 0

if __name__ == "__main__":
    sys.exit(main())
