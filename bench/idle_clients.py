"""Memory per idle client (issue 15, item 1): N client connections held open through a pooler,
and the pooler's memory (PSS of all its processes) before and after.

    .venv/bin/python bench/idle_clients.py --clients 10000 --pipeline transaction --workers 1
    .venv/bin/python bench/idle_clients.py --clients 10000 --target pgbouncer

It starts a throwaway PostgreSQL 15 (devtools/pgcluster.py) and the pooler (pgcorral from src/,
or Debian's pgbouncer), opens the clients from one asyncio process with a raw protocol-v3
login (trust), keeps them open, measures, and reports JSON on stdout:

* transaction pooling: every client is logged in (ReadyForQuery seen) and idle; the pool has
  `--pool` server connections.
* session pooling: `--pool` clients hold a server connection each; the others wait in the
  pool's line (blocking_timeout is raised so that they stay): what a session pooler holds for a
  client it cannot serve yet.

While the clients are held, one more client runs `SELECT 1` in a loop: its median latency is
reported with and without the crowd. Everything stays on 127.0.0.1; the run is bounded by
`--timeout`.
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

from pooler import fds, login, pooler_run, pss_kib, raise_fd_limit, wait_ready


async def query_latency(port: int, user: str, database: str, seconds: float) -> float:
    """Median round trip of ``SELECT 1`` on one connection, ms."""
    reader, writer = await login(port, user, database, wait_ready=True)
    q = b"SELECT 1\0"
    message = b"Q" + struct.pack("!i", len(q) + 4) + q
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        writer.write(message)
        while True:
            head = await reader.readexactly(5)
            await reader.readexactly(struct.unpack("!i", head[1:])[0] - 4)
            if head[:1] == b"Z":
                break
        samples.append((time.perf_counter() - start) * 1000)
    writer.close()
    return statistics.median(samples)


async def hold(port: int, n: int, user: str, database: str, wait_ready: bool,
               concurrency: int = 200) -> list[asyncio.StreamWriter]:
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            _, writer = await login(port, user, database, wait_ready)
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(n)))
    return writers


async def measure(args: argparse.Namespace, proc: subprocess.Popen[bytes]) -> dict[str, object]:
    port: int = proc.port  # type: ignore[attr-defined]
    await wait_ready(port, args.user, args.database)
    latency_before = await query_latency(port, args.user, args.database, 2)
    await asyncio.sleep(1)
    before, fds_before = pss_kib(proc.pid), fds(proc.pid)
    start = time.monotonic()
    writers = await hold(port, args.clients, args.user, args.database,
                         wait_ready=args.pipeline == "transaction")
    connect_s = time.monotonic() - start
    await asyncio.sleep(2)
    after, fds_after = pss_kib(proc.pid), fds(proc.pid)
    latency_during = await query_latency(port, args.user, args.database, 2) \
        if args.pipeline == "transaction" else None
    for w in writers:
        w.close()
    await asyncio.sleep(3)
    released = pss_kib(proc.pid)
    return {
        "clients": args.clients, "connect_seconds": round(connect_s, 2),
        "pss_before_kib": before, "pss_held_kib": after, "pss_after_close_kib": released,
        "kib_per_client": round((after - before) / args.clients, 2),
        "fds_before": fds_before, "fds_held": fds_after,
        "select1_ms_median_alone": round(latency_before, 3),
        "select1_ms_median_with_crowd": round(latency_during, 3)
        if latency_during is not None else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--pipeline", choices=["session", "transaction"], default="transaction")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--target", choices=["pgcorral", "pgbouncer"], default="pgcorral")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    args.user, args.database = "postgres", "postgres"
    hard = raise_fd_limit()
    if args.clients + 200 > hard:
        print(f"the fd limit ({hard}) is too low for {args.clients} clients", file=sys.stderr)
        return 2
    with pooler_run("idle-clients-", args) as proc:
        result = asyncio.run(asyncio.wait_for(measure(args, proc), args.timeout))
    result.update(target=args.target, pipeline=args.pipeline, workers=args.workers,
                  pool=args.pool)
    print(json.dumps(result, indent=2))
    return 0

if __name__ == "__main__":
    sys.exit(main())
