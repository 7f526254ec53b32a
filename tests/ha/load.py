"""A write load that remembers every acknowledged commit, for failover tests.

N client threads (psycopg 3, autocommit) each insert ``(run, client, seq)`` rows one at a
time; a row whose INSERT returned without error is an acknowledged commit.  Failures are kept
with their SQLSTATE (or ``"none"`` when the driver has none: a connection refused or lost),
and a failure on an open connection that died mid-statement is *in doubt* (it may have
committed).  After the run, ``check()`` reads the rows back from the primary: every
acknowledged row must be there (lost = 0).

A WARNING ``canceling wait for synchronous replication`` is counted too: it means a commit was
acknowledged without its standby (a client-side cancel would cause it; none is sent here).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg

TABLE = "ha_rows"
CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (run int, client int, seq int, "
    "at timestamptz DEFAULT clock_timestamp(), PRIMARY KEY (run, client, seq))"
)


@dataclass
class Event:
    client: int
    start: float  # time.monotonic()
    end: float
    ok: bool
    phase: str  # "connect" or "write"
    sqlstate: str | None = None
    message: str = ""


@dataclass
class ClientState:
    ident: int
    acked: list[int] = field(default_factory=list)
    in_doubt: list[int] = field(default_factory=list)
    stuck_since: float | None = None  # start of the statement it is in


class WriteLoad:
    """Start with start(), end with stop(); events/acknowledged rows are kept per client."""

    def __init__(
        self, dsn: str, clients: int, run: int, *, connect_timeout: int = 3,
        pause_after_error: float = 0.05,
    ) -> None:
        self.dsn = dsn
        self.run = run
        self.connect_timeout = connect_timeout
        self.pause_after_error = pause_after_error
        self.clients = [ClientState(i) for i in range(clients)]
        self.events: list[Event] = []
        self.sync_cancel_warnings = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: dict[int, psycopg.Connection[Any]] = {}

    # ----------------------------------------------------------------- running
    def start(self) -> None:
        for c in self.clients:
            t = threading.Thread(target=self._client, args=(c,), daemon=True,
                                 name=f"ha-load-{c.ident}")
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 15.0) -> list[int]:
        """Stop the clients; returns the clients still stuck in a statement after
        ``timeout`` (their connections are then closed under them)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [c.ident for c, t in zip(self.clients, self._threads, strict=True)
                 if t.is_alive()]
        for ident in stuck:
            conn = self._conns.get(ident)
            if conn is not None:
                try:
                    conn.cancel()
                except psycopg.Error:
                    pass
        for t in self._threads:
            t.join(5)
        return stuck

    def _record(self, ev: Event) -> None:
        with self._lock:
            self.events.append(ev)

    def _notice(self, diag: psycopg.errors.Diagnostic) -> None:
        if "synchronous replication" in (diag.message_primary or ""):
            with self._lock:
                self.sync_cancel_warnings += 1

    def _client(self, c: ClientState) -> None:
        conn: psycopg.Connection[Any] | None = None
        seq = 0
        while not self._stop.is_set():
            if conn is None:
                t0 = time.monotonic()
                try:
                    conn = psycopg.connect(self.dsn, autocommit=True,
                                           connect_timeout=self.connect_timeout)
                except psycopg.Error as e:
                    self._record(Event(c.ident, t0, time.monotonic(), False, "connect",
                                       e.sqlstate, _first_line(e)))
                    self._stop.wait(self.pause_after_error)
                    continue
                conn.add_notice_handler(self._notice)
                self._conns[c.ident] = conn
            seq += 1
            t0 = time.monotonic()
            c.stuck_since = t0
            try:
                conn.execute(f"INSERT INTO {TABLE} (run, client, seq) VALUES (%s, %s, %s)",
                             (self.run, c.ident, seq))
            except psycopg.Error as e:
                t1 = time.monotonic()
                c.stuck_since = None
                broken = conn.broken or conn.closed
                if _maybe_committed(e.sqlstate):
                    c.in_doubt.append(seq)  # the connection died: the commit may have happened
                self._record(Event(c.ident, t0, t1, False, "write", e.sqlstate, _first_line(e)))
                if broken:  # else (an error through a pooler) the same connection goes on
                    conn.close()
                    conn = None
                    self._conns.pop(c.ident, None)
                self._stop.wait(self.pause_after_error)
                continue
            t1 = time.monotonic()
            c.stuck_since = None
            c.acked.append(seq)
            self._record(Event(c.ident, t0, t1, True, "write"))
        if conn is not None:
            conn.close()

    # ---------------------------------------------------------------- figures
    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def first_success_after(self, t: float) -> Event | None:
        """The first write that started at or after ``t`` and succeeded."""
        oks = [e for e in self.snapshot() if e.ok and e.start >= t]
        return min(oks, key=lambda e: e.end) if oks else None

    def all_succeeded_since(self, t: float) -> bool:
        """Every client has a successful write that started at or after ``t``."""
        done = {e.client for e in self.snapshot() if e.ok and e.start >= t}
        return len(done) == len(self.clients)

    def window(self, t_from: float, t_to: float) -> dict[str, Any]:
        """Figures for one failover: writes between t_from (the kill) and t_to."""
        evs = [e for e in self.snapshot() if t_from <= e.end < t_to]
        fails = [e for e in evs if not e.ok]
        oks = [e for e in evs if e.ok]
        out: dict[str, Any] = {
            "writes_ok": len(oks),
            "errors": len(fails),
            "errors_by_sqlstate": dict(Counter(e.sqlstate or "none" for e in fails)),
            "error_samples": sorted({f"{e.sqlstate or 'none'}: {e.message}" for e in fails})[:8],
        }
        if fails:
            first_fail = min(e.end for e in fails)
            after = [e.end for e in oks if e.end > first_fail and e.start >= first_fail]
            out["first_error_after_kill_s"] = round(first_fail - t_from, 3)
            out["unavailable_s"] = round(min(after) - first_fail, 3) if after else None
        else:
            out["first_error_after_kill_s"] = None
            out["unavailable_s"] = 0.0
        # from the kill to the end of the unavailability (or to the first write after the
        # kill when none failed)
        if fails:
            rec = [e.end for e in oks if e.start >= min(e.end for e in fails)]
        else:
            rec = [e.end for e in oks if e.start >= t_from]
        out["kill_to_recovery_s"] = round(min(rec) - t_from, 3) if rec else None
        # the longest time any one client went without a commit across the kill
        gaps: list[float] = []
        for c in self.clients:
            ends = sorted(e.end for e in evs if e.ok and e.client == c.ident)
            prior = [e.end for e in self.snapshot()
                     if e.ok and e.client == c.ident and e.end < t_from]
            points = ([max(prior)] if prior else [t_from]) + ends
            if len(points) > 1:
                gaps.append(max(b - a for a, b in itertools.pairwise(points)))
        out["max_client_gap_s"] = round(max(gaps), 3) if gaps else None
        out["clients_recovered"] = sum(
            1 for c in self.clients if any(e.ok and e.client == c.ident for e in evs)
        )
        return out

    def totals(self) -> dict[str, Any]:
        evs = self.snapshot()
        fails = [e for e in evs if not e.ok]
        return {
            "clients": len(self.clients),
            "writes_ok": sum(1 for e in evs if e.ok),
            "errors": len(fails),
            "errors_by_sqlstate": dict(Counter(e.sqlstate or "none" for e in fails)),
            "acknowledged": sum(len(c.acked) for c in self.clients),
            "in_doubt": sum(len(c.in_doubt) for c in self.clients),
            "sync_rep_cancel_warnings": self.sync_cancel_warnings,
        }

    # ------------------------------------------------------------------ check
    def check(self, primary_dsn: str) -> dict[str, Any]:
        """Read this run's rows from the primary: lost (acknowledged, missing) and how many
        in-doubt writes did commit."""
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            rows = conn.execute(f"SELECT client, seq FROM {TABLE} WHERE run = %s",
                                (self.run,)).fetchall()
        present = {(int(c), int(s)) for c, s in rows}
        acked = {(c.ident, s) for c in self.clients for s in c.acked}
        doubt = {(c.ident, s) for c in self.clients for s in c.in_doubt}
        lost = sorted(acked - present)
        return {
            "rows_on_primary": len(present),
            "lost": len(lost),
            "lost_sample": lost[:10],
            "in_doubt_committed": len(doubt & present),
            "unexpected_rows": len(present - acked - doubt),
        }


def _maybe_committed(sqlstate: str | None) -> bool:
    """Whether a write that failed so may have committed: no SQLSTATE (the connection was
    lost), a connection exception (08), or a backend terminated while it ran (57P01, 57P02).
    57P03 (cannot connect now) and the rest mean the statement did not run or was rolled
    back."""
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in ("57P01", "57P02")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
