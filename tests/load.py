"""Load for fault and restart tests: clients on their own connections running short
transactions in threads, and optionally clients connecting and leaving in a loop, counting
what they did and every error they saw. Also the pooler's descriptors and memory, to check that
nothing leaked after a fault.

``Load(d)`` starts at once; ``finish()`` stops and joins every thread and closes every
connection. By default a client stops at its first error (the tests that expect none assert
``failures == []``); with ``reconnect=True`` it records the error and connects again, for
faults that are expected to end connections (a PostgreSQL restart, backend kills).

Test code only; threads, loopback only.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import Counter
from typing import Any, Protocol

import psycopg


class Target(Protocol):
    def dsn(self, dbname: str = ..., user: str = ..., password: str | None = ...,
            **params: str) -> str: ...


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its children (pgcorral's workers)."""
    pids = [pid]
    children = f"/proc/{pid}/task/{pid}/children"
    if os.path.exists(children):
        with open(children, encoding="ascii") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def tree_fds(pid: int) -> int:
    """Open file descriptors of ``pid`` and its children (the workers)."""
    total = 0
    for p in tree_pids(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except FileNotFoundError:
            pass
    return total


def tree_pss_kib(pid: int) -> int:
    """PSS of ``pid`` and its children, KiB (``/proc/PID/smaps_rollup``)."""
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup", encoding="ascii") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except FileNotFoundError:
            pass
    return total


def error_key(exc: BaseException) -> str:
    """What a client saw, for counting: the SQLSTATE, or the class of a connection failure."""
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else type(exc).__name__


class Load:
    """``clients`` connections running transactions (``SELECT 1``, and ``pg_sleep(0.001)``
    with ``sleep``) and ``connectors`` threads connecting, querying once and leaving."""

    def __init__(self, d: Target, clients: int = 6, *, connectors: int = 0,
                 sleep: bool = False, reconnect: bool = False,
                 connect_timeout: int = 10) -> None:
        self.d = d
        self.sleep = sleep
        self.reconnect = reconnect
        self.connect_timeout = connect_timeout
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.errors: Counter[str] = Counter()  # error_key -> count
        #: of those, the errors of a reconnect's login (``reconnect``), by error_key
        self.connect_errors: Counter[str] = Counter()
        self.done = 0  # transactions of the persistent clients
        self.connects = 0  # connect-query-leave rounds of the connectors
        self.last_ok = time.monotonic()  # when a transaction last succeeded
        self.conns: list[psycopg.Connection[Any] | None] = [
            self._connect() for _ in range(clients)]
        self.threads = [threading.Thread(target=self._query, args=(i,), daemon=True)
                        for i in range(clients)]
        self.threads += [threading.Thread(target=self._connector, daemon=True)
                         for _ in range(connectors)]
        for t in self.threads:
            t.start()

    @property
    def queries(self) -> int:  # (the rolling-restart test's name for it)
        return self.done

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.d.dsn(), autocommit=True,
                               connect_timeout=self.connect_timeout)

    def _error(self, what: str, exc: BaseException) -> None:
        with self.lock:
            self.failures.append(f"{what}: {exc}")
            self.errors[error_key(exc)] += 1

    def _query(self, i: int) -> None:
        while not self.stop.is_set():
            conn = self.conns[i]
            try:
                if conn is None:
                    try:
                        conn = self.conns[i] = self._connect()
                    except psycopg.Error as exc:
                        with self.lock:
                            self.connect_errors[error_key(exc)] += 1
                        raise
                with conn.transaction():
                    conn.execute("SELECT 1").fetchone()
                    if self.sleep:
                        conn.execute("SELECT pg_sleep(0.001)")
                with self.lock:
                    self.done += 1
                    self.last_ok = time.monotonic()
            except psycopg.Error as exc:
                self._error("query", exc)
                if not self.reconnect:
                    return
                if conn is not None:
                    conn.close()
                self.conns[i] = None
                self.stop.wait(0.05)  # (no tight loop while the server is away)

    def _connector(self) -> None:
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.d.dsn(), autocommit=True,
                                     connect_timeout=self.connect_timeout) as c:
                    c.execute("SELECT 1").fetchone()
                with self.lock:
                    self.connects += 1
            except psycopg.Error as exc:
                self._error("connect", exc)
                if self.reconnect:
                    self.stop.wait(0.05)

    def progress(self, more: int = 20, timeout: float = 30.0) -> None:
        """Wait until the persistent clients have run ``more`` transactions from now."""
        target = self.done + more
        deadline = time.monotonic() + timeout
        while self.done < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"the load made no progress in {timeout:g} s "
                                     f"({self.done}/{target}); errors: {dict(self.errors)}")
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        for c in self.conns:
            if c is not None:
                c.close()
        self.conns = []
        # A psycopg connect that timed out leaves its half-made connection to the garbage
        # collector (held by a traceback cycle): still logged in at the pooler until then.
        gc.collect()
