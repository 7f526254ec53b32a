"""``pgcorral-cli top``: a live terminal view of the ``stats`` command, refreshed in place.

``Screen`` turns two successive ``stats`` answers into the lines to show (pure: the tests
feed it snapshots): a header, the pools with transactions and queries per second and the
p95 of transaction and wait time between the two refreshes (from the difference of the
histogram counts), then the busiest clients. ``run`` draws them with curses every
``interval`` seconds over one management connection (local or remote, as every pgcorral-cli
command) and returns when ``q`` is pressed. A connection that fails is shown on the first
line and opened again at the next refresh.
"""

from __future__ import annotations

import curses
import os
import time
from collections.abc import Callable
from typing import Any

from pgcorral import __version__
from pgcorral.management.client import ManagementClient, ManagementError
from pgcorral.pool.stats import percentile

#: The client states in the order ``top`` lists them.
_STATE_ORDER = {"waiting": 0, "active": 1, "login": 2, "idle": 3}


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f}us"
    if us < 1e6:
        return f"{us / 1000:.1f}ms"
    return f"{us / 1e6:.2f}s"


def fmt_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    text = f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def table(headers: list[str], rows: list[list[str]], left: set[int]) -> list[str]:
    """Aligned columns: ``left`` are the indexes of left-aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()
    return [line(headers)] + [line(r) for r in rows]


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "~"


class Screen:
    """What ``top`` shows, from the last two ``stats`` answers."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._prev: dict[str, Any] | None = None

    def frame(self, stats: dict[str, Any], height: int = 50, width: int = 160) -> list[str]:
        """The lines for ``stats`` (rates against the previous call's), at most ``height``
        lines of at most ``width`` characters."""
        prev, self._prev = self._prev, stats
        dt = float(stats["time"]) - float(prev["time"]) if prev is not None else 0.0
        workers = stats.get("workers")
        lines = [
            f"pgcorral {__version__}  {stats['status']}  up "
            f"{fmt_duration(float(stats['time']) - float(stats['started']))}  workers "
            f"{len(workers) if workers else 1}  {stats['pipeline']}  clients "
            f"{len(stats['clients'])}  server connections {len(stats['servers'])}/"
            f"{stats['max_connections']}  {time.strftime('%H:%M:%S')}  "
            f"(every {self.interval:g}s, q quits)", ""]
        lines += self._pools(stats, prev, dt)
        lines += ["", *self._clients(stats, prev, dt, max(0, height - len(lines) - 3))]
        return [_cut(line, width) for line in lines[:height]]

    def _pools(self, stats: dict[str, Any], prev: dict[str, Any] | None,
               dt: float) -> list[str]:
        before = {(p["database"], p["user"]): p for p in prev["pools"]} if prev else {}
        rows = []
        for p in stats["pools"]:
            old = before.get((p["database"], p["user"]))
            tps = qps = p95 = w95 = None
            if old is not None and dt > 0 and p["xact_count"] >= old["xact_count"]:
                tps = (p["xact_count"] - old["xact_count"]) / dt
                qps = max(0, p["query_count"] - old["query_count"]) / dt
                xact = [a - b for a, b in zip(p["hist"]["xact"], old["hist"]["xact"],
                                              strict=True)]
                wait = [a - b for a, b in zip(p["hist"]["wait"], old["hist"]["wait"],
                                              strict=True)]
                p95 = percentile(xact, 0.95) if sum(xact) > 0 else None
                w95 = percentile(wait, 0.95) if sum(wait) > 0 else None
            mode = p["pool_mode"] + ("/paused" if p.get("paused") else "")
            rows.append([_cut(p["database"], 24), _cut(p["user"], 20), mode,
                         str(p["cl_active"]), str(p["cl_waiting"]), str(p["cl_idle"]),
                         str(p["sv_active"]), str(p["sv_idle"]),
                         str(p["sv_used"] + p["sv_tested"] + p["sv_login"]),
                         fmt_us(p["maxwait_us"]), fmt_rate(tps), fmt_rate(qps),
                         str(p["xact_count"]), fmt_us(p95), fmt_us(w95)])
        if not rows:
            return ["POOLS", "(no pool yet)"]
        headers = ["DATABASE", "USER", "MODE", "CL_ACTIVE", "CL_WAITING", "CL_IDLE",
                   "SV_ACTIVE", "SV_IDLE", "SV_OTHER", "MAXWAIT", "TPS", "QPS", "XACTS",
                   "P95_XACT", "P95_WAIT"]
        return ["POOLS", *table(headers, rows, {0, 1, 2})]

    def _clients(self, stats: dict[str, Any], prev: dict[str, Any] | None, dt: float,
                 room: int) -> list[str]:
        before = {(c["worker"], c["id"]): c["xact_count"] for c in prev["clients"]} \
            if prev else {}
        now = float(stats["time"])
        ranked = []
        for c in stats["clients"]:
            old = before.get((c["worker"], c["id"]))
            delta = c["xact_count"] - old if old is not None and c["xact_count"] >= old else 0
            ranked.append((delta, c))
        ranked.sort(key=lambda dc: (-dc[0], _STATE_ORDER.get(dc[1]["state"], 9),
                                    -dc[1]["wait_current_us"], -dc[1]["xact_count"]))
        shown = ranked[:max(0, room)]
        title = f"CLIENTS ({len(ranked)}" + (f", BUSIEST {len(shown)} SHOWN" if len(shown) <
                                               len(ranked) else "") + ")"
        if not ranked:
            return [title, "(no client connected)"]
        rows = [[str(c["worker"]), str(c["id"]),
                 _cut(f"{c['address']}:{c['port']}" if c["port"] else c["address"], 40),
                 _cut(c["application_name"] or "-", 24), _cut(c["user"], 20),
                 _cut(c["database"], 24), c["state"],
                 fmt_rate(delta / dt) if dt > 0 else "-", str(c["xact_count"]),
                 fmt_us(c["wait_us"]), fmt_us(c["hold_us"]), c["tls"] or "-",
                 fmt_duration(now - float(c["connect_time"]))]
                for delta, c in shown]
        headers = ["W", "ID", "ADDRESS", "APPLICATION", "USER", "DATABASE", "STATE", "TPS",
                   "XACTS", "WAIT", "HOLD", "TLS", "CONNECTED"]
        return [title, *table(headers, rows, {2, 3, 4, 5, 6, 11})]


class Feed:
    """``stats`` over one management connection, opened again after a failure."""

    def __init__(self, connect: Callable[[], ManagementClient]) -> None:
        self._connect = connect
        self._client: ManagementClient | None = None

    def stats(self) -> dict[str, Any]:
        """The ``stats`` answer; ``ManagementError`` when it cannot be had."""
        if self._client is None:
            self._client = self._connect()
        try:
            answer = self._client.command("stats", [])
        except ManagementError:
            self.close()
            raise
        if answer.get("outcome") != "ok":
            raise ManagementError(f"stats: {answer.get('reason', 'failed')}")
        if "time" not in answer:  # the supervisor before any worker answered
            raise ManagementError("no worker is running yet")
        return answer

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def run(feed: Feed, interval: float) -> int:
    """Show ``top`` until ``q``; the exit code."""
    for name in ("LINES", "COLUMNS"):  # the terminal's real size, not a stale inherited one
        os.environ.pop(name, None)
    return int(curses.wrapper(_loop, feed, interval))


def _loop(window: curses.window, feed: Feed, interval: float) -> int:
    curses.curs_set(0)
    screen = Screen(interval)
    lines: list[str] = []
    problem = ""
    while True:
        started = time.monotonic()
        height, width = window.getmaxyx()
        try:
            lines = screen.frame(feed.stats(), height, width - 1)
            problem = ""
        except ManagementError as exc:
            problem = f"unavailable: {exc} (retrying every {interval:g}s, q quits)"
        window.erase()
        shown = ([problem] if problem else []) + lines
        for y, line in enumerate(shown[:height]):
            window.addnstr(y, 0, line, max(0, width - 1),
                           curses.A_BOLD if y == 0 or line == line.upper() else curses.A_NORMAL)
        window.refresh()
        while True:  # keys until the next refresh
            left = interval - (time.monotonic() - started)
            if left <= 0:
                break
            window.timeout(max(1, int(left * 1000)))
            key = window.getch()
            if key in (ord("q"), ord("Q")):
                feed.close()
                return 0
            if key == curses.KEY_RESIZE:
                break


__all__ = ["Feed", "Screen", "fmt_duration", "fmt_us", "run", "table"]
