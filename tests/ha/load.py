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

import bisect
import itertools
import threading
import time
from array import array
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
    """One client's record. Successful writes are kept compactly (a run has millions):
    ``acked[i]`` is the sequence number of the i-th acknowledged commit, which started at
    ``ok_start[i]`` and returned at ``ok_end[i]`` (both ascending)."""

    ident: int
    acked: array[int] = field(default_factory=lambda: array("q"))
    ok_start: array[float] = field(default_factory=lambda: array("d"))
    ok_end: array[float] = field(default_factory=lambda: array("d"))
    in_doubt: list[int] = field(default_factory=list)

    def first_ok_since(self, t: float) -> int:
        """Index of the first success that started at or after ``t`` (len when none)."""
        return bisect.bisect_left(self.ok_start, t)


class WriteLoad:
    """Start with start(), end with stop(); events/acknowledged rows are kept per client."""

    def __init__(
        self, dsn: str, clients: int, run: int, *, connect_timeout: int = 3,
        pause_after_error: float = 0.05, think: float = 0.002,
    ) -> None:
        """think: pause after each commit (seconds), so that the load measures availability
        without saturating a shared machine (about 400 commits/s per client)."""
        self.dsn = dsn
        self.think = think
        self.run = run
        self.connect_timeout = connect_timeout
        self.pause_after_error = pause_after_error
        self.clients = [ClientState(i) for i in range(clients)]
        self.failures: list[Event] = []
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
            self.failures.append(ev)

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
            try:
                conn.execute(f"INSERT INTO {TABLE} (run, client, seq) VALUES (%s, %s, %s)",
                             (self.run, c.ident, seq))
            except psycopg.Error as e:
                t1 = time.monotonic()
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
            with self._lock:
                c.acked.append(seq)
                c.ok_start.append(t0)
                c.ok_end.append(t1)
            if self.think:
                self._stop.wait(self.think)
        if conn is not None:
            conn.close()

    # ---------------------------------------------------------------- figures
    def snapshot(self) -> list[Event]:
        """The failures so far."""
        with self._lock:
            return list(self.failures)

    def first_success_after(self, t: float) -> bool:
        """Whether a write that started at or after ``t`` succeeded."""
        with self._lock:
            return any(c.first_ok_since(t) < len(c.ok_start) for c in self.clients)

    def all_succeeded_since(self, t: float) -> bool:
        """Every client has a successful write that started at or after ``t``."""
        with self._lock:
            return all(c.first_ok_since(t) < len(c.ok_start) for c in self.clients)

    def window(self, t_from: float, t_to: float) -> dict[str, Any]:
        """Figures for one failover: writes that returned between t_from (the kill) and t_to.
        Call after stop()."""
        fails = [e for e in self.failures if t_from <= e.end < t_to]
        first_fail = min((e.end for e in fails), default=None)
        since = first_fail if first_fail is not None else t_from
        writes_ok = 0
        recovered: list[float] = []  # per client: the end of its first success since `since`
        gaps: list[float] = []
        clients_recovered = 0
        for c in self.clients:
            lo = bisect.bisect_left(c.ok_end, t_from)
            hi = bisect.bisect_left(c.ok_end, t_to)
            writes_ok += hi - lo
            clients_recovered += hi > lo
            i = c.first_ok_since(since)
            if i < len(c.ok_end) and c.ok_end[i] < t_to:
                recovered.append(c.ok_end[i])
            # the longest time this client went without a commit, from its last one before
            # the kill through the window
            points = [c.ok_end[lo - 1] if lo else t_from, *c.ok_end[lo:hi]]
            if len(points) > 1:
                gaps.append(max(b - a for a, b in itertools.pairwise(points)))
        first_back = min(recovered, default=None)
        return {
            "writes_ok": writes_ok,
            "errors": len(fails),
            "errors_by_sqlstate": dict(Counter(e.sqlstate or "none" for e in fails)),
            "error_samples": sorted({f"{e.sqlstate or 'none'}: {e.message}" for e in fails})[:8],
            "first_error_after_kill_s": _r(first_fail - t_from) if first_fail else None,
            # from the first failed write to the first successful write that started after it
            "unavailable_s": (0.0 if first_fail is None else
                              _r(first_back - first_fail) if first_back else None),
            # from the kill to the end of the unavailability
            "kill_to_recovery_s": _r(first_back - t_from) if first_back else None,
            "max_client_gap_s": _r(max(gaps)) if gaps else None,
            "clients_recovered": clients_recovered,
        }

    def totals(self) -> dict[str, Any]:
        fails = self.snapshot()
        acked = sum(len(c.acked) for c in self.clients)
        return {
            "clients": len(self.clients),
            "writes_ok": acked,
            "errors": len(fails),
            "errors_by_sqlstate": dict(Counter(e.sqlstate or "none" for e in fails)),
            "acknowledged": acked,
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


def _r(seconds: float) -> float:
    return round(seconds, 3)


def _maybe_committed(sqlstate: str | None) -> bool:
    """Whether a write that failed so may have committed: no SQLSTATE (the connection was
    lost), a connection exception (08), or a backend terminated while it ran (57P01, 57P02).
    57P03 (cannot connect now) and the rest mean the statement did not run or was rolled
    back."""
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in ("57P01", "57P02")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
