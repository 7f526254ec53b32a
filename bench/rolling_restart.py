"""A rolling restart under pgbench (issue 15, item 5; docs/RELIABILITY.md "Rolling restarts"):
pgbench runs through pgcorral (transaction pooling, ``so_reuseport = on``); a few seconds in,
a second pgcorral starts on the same port and the first one gets SIGTERM (with so_reuseport:
stop listening, serve the clients it has, exit when they are gone). The figure: pgbench's
failed transactions and aborted clients (pgbench 15 aborts a client at its first error).
Goal: 0.

    .venv/bin/python bench/rolling_restart.py                 # pgbench -c 8 -T 20, no -C
    .venv/bin/python bench/rolling_restart.py --connect       # -C: a new connection per transaction

Reports JSON: pgbench's processed and failed transactions, aborted clients, error lines, its
exit status, whether and when the old pgcorral exited, and that the new one runs on.
Loopback only; bounded by -T and timeouts.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pooler


def wait_log(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise SystemExit(f"{text!r} not in {path} after {timeout} s")
        time.sleep(0.05)


def run(args: argparse.Namespace) -> dict[str, object]:
    pooler.raise_fd_limit()
    with pooler.cluster("rolling-restart-") as (workdir, pg):
        pg.pgbench("-i", "-s", "1", "-q")
        extra = "so_reuseport = on\n"
        old = pooler.start_pgcorral(workdir, pg, args, extra=extra, name="old",
                                    log_level="info")
        port: int = old.port  # type: ignore[attr-defined]
        new = None
        try:
            wait_log(workdir / "old.log", "pgcorral: started")
            cmd = [pg.bin("pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", args.user,
                   "-n", "-c", str(args.clients), "-j", "2", "-T", str(args.seconds),
                   "-M", args.mode, *(["-C"] if args.connect else []), "postgres"]
            bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
            time.sleep(args.at)
            new = pooler.start_pgcorral(workdir, pg, args, port=port, extra=extra,
                                        name="new", log_level="info")
            wait_log(workdir / "new.log", "pgcorral: started")
            old.send_signal(signal.SIGTERM)  # so_reuseport: leave when the clients have
            sigterm_at = time.monotonic()
            out, err = bench.communicate(timeout=args.seconds + 120)
            bench_end = time.monotonic()
            try:
                old.wait(30)
                old_exit: float | None = round(time.monotonic() - bench_end, 2)
            except subprocess.TimeoutExpired:
                old_exit = None
            new_running = new.poll() is None
        finally:
            for p in (old, new):
                if p is not None:
                    pooler.stop(p)

    def figure(pattern: str) -> int | None:
        m = re.search(pattern, out)
        return int(m.group(1)) if m else None

    errors = [line for line in err.splitlines() if "error" in line.lower()
              or "abort" in line.lower()]
    return {
        "pgbench": " ".join(cmd[cmd.index("-n"):]),
        "exit_status": bench.returncode,
        "processed": figure(r"number of transactions actually processed: (\d+)"),
        "failed": figure(r"number of failed transactions: (\d+)") or 0,
        "aborted_clients": len(re.findall(r"client \d+ aborted", err)),
        "error_lines": errors[:20],
        "tps": (m.group(1) if (m := re.search(r"tps = ([\d.]+)", out)) else None),
        "sigterm_after_s": args.at,
        "pgbench_ran_s_after_sigterm": round(bench_end - sigterm_at, 1),
        "old_exited_s_after_pgbench": old_exit,
        "new_still_running": new_running,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--at", type=float, default=5.0, help="restart this many s in")
    parser.add_argument("--connect", action="store_true", help="pgbench -C")
    parser.add_argument("--mode", default="simple", choices=["simple", "extended", "prepared"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pool", type=int, default=8)
    args = parser.parse_args()
    args.pipeline, args.timeout, args.user = "transaction", 30, "postgres"
    result = run(args)
    result.update(workers=args.workers, pool=args.pool, connect=args.connect)
    print(json.dumps(result, indent=2))
    return 0 if result["failed"] == 0 and result["aborted_clients"] == 0 and \
        result["exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
