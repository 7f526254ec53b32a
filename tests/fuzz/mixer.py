"""The mixing fuzzer: client workers run random mixes of transactions through pgcorral in
transaction mode and check, statement by statement, that nothing of another client reaches
them (issue 15, item 2).

Each logical client has an id (``c<n>``) and its own ``random.Random`` seeded from the run's
seed and its number, so a failure names the seed and the client; the interleaving of the
clients (and the faults) is the scheduler's, so a replay runs the same mixes per client, not
the same interleaving.

What a client runs (see ``Client.OPS``): simple-protocol transactions (one Query per statement,
or the whole transaction in one multi-statement Query), extended-protocol ones (asyncpg,
psycopg), psycopg pipeline mode, explicitly prepared statements, COPY in and out, `SET LOCAL`,
session `SET` inside a transaction (committed or rolled back) and outside, savepoints with
errors (22012, 23505) and `ROLLBACK TO`, cancels of a running query, disconnects and RSTs
(SO_LINGER 0) in the middle of a transaction or of a query. A chaos task terminates random
backends of the pool from a direct PostgreSQL connection.

The checks (a failure is printed with the seed at once and counted):
- every probe inside a transaction returns the same ``pg_backend_pid()`` and ``txid_current()``
  as the transaction's first probe;
- the owner setting (``search_path`` or ``fuzz.owner``: a session ``SET`` by the client) and
  ``application_name`` (its startup parameter) read back as the client's own, inside and
  outside transactions; ``fuzz.local`` (``SET LOCAL``) reads back as the value this
  transaction set;
- each probe carries a tag (client id, transaction number, nonce) that must come back as sent;
- a query cancel (57014) that the client did not ask for is a cancel that reached the wrong
  client;
- at the end, each client's rows in the table are exactly the ones of its committed
  transactions, plus possibly those whose COMMIT failed without an answer (ambiguous); no row
  belongs to an unknown client.

The figure: mixed transactions (a probe check failed in it) and leaked ones (rows check) out of
all transactions run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg

TABLE = "public.fuzz_rows"  # qualified: the clients' search_path may name no real schema

#: The session setting that holds a client's owner value (a session SET, carried by the
#: ledger): "fuzz.owner", a custom placeholder (pg_settings does not list those; the ledger
#: follows them by name since tests/integration/test_fuzz_mix.py::
#: test_custom_setting_does_not_leak). FUZZ_OWNER_GUC picks another (search_path...).
OWNER_GUC = "fuzz.owner"

#: SQLSTATEs that mean "this connection is gone" (the backend terminated, the pooler closed
#: it); the client reconnects.
#: A cancel request may arrive after the canceled query has ended and stop the same client's
#: next statement, as on a direct connection (asyncpg does not wait for its cancel request
#: to be delivered): a 57014 that soon after the client's own cancel is its own.
LATE_CANCEL = 2.0

DEFAULT_PATH = '"$user", public'  # search_path's default

GONE_STATES = {"57P01", "57P02", "57P03", "08006", "08003", "08000", "08001", "08004"}


@dataclass
class Target:
    """Where the clients connect (pgcorral) and where the checker and the chaos task do
    (PostgreSQL directly, as a superuser)."""

    host: str
    port: int
    database: str
    user: str
    direct_host: str
    direct_port: int
    direct_user: str
    table: str = TABLE


@dataclass
class Config:
    seed: int
    transactions: int = 50_000  # stop after this many (0: no limit)
    seconds: float = 0.0  # stop after this long (0: no limit)
    clients: int = 16
    kill_interval: float = 0.25  # mean seconds between pg_terminate_backend calls (0: none)
    faults: bool = True  # cancels, disconnects, RSTs
    owner_guc: str = OWNER_GUC
    #: run what met the bugs the fuzzer found (all fixed: True); False avoids those steps and
    #: counts a client's own lost SET apart, as before the fixes
    known_bugs: bool = True
    progress: bool = False


@dataclass
class Result:
    seed: int
    transactions: int = 0
    committed: int = 0
    mixed: int = 0  # transactions where a probe check failed
    leaked: int = 0  # transactions whose rows check failed
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the known bug's cases (see Stale)
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    reconnects: int = 0
    ambiguous_commits: int = 0
    stale: int = 0  # lost session SETs of a client's own (known bug; see Stale)
    elapsed: float = 0.0

    def summary(self) -> str:
        rate = self.transactions / self.elapsed if self.elapsed else 0.0
        lines = [
            f"fuzz seed={self.seed}: {self.mixed + self.leaked} mixed or leaked transactions "
            f"out of {self.transactions} (mixed {self.mixed}, leaked {self.leaked}); "
            f"{self.committed} committed, {self.ambiguous_commits} ambiguous commits, "
            f"{self.stale} lost own SETs (known bug), "
            f"{self.kills} backends terminated, {self.reconnects} reconnects, "
            f"{self.elapsed:.1f} s ({rate:.0f} tx/s)",
            "ops: " + ", ".join(f"{k}={v}" for k, v in sorted(self.ops.items())),
            "errors seen: " + (", ".join(f"{k}={v}" for k, v in sorted(self.errors.items()))
                               or "none"),
        ]
        if self.notes:
            lines.append(f"lost own SETs ({len(self.notes)}, first 5):")
            lines += ["  " + f for f in self.notes[:5]]
        if self.failures:
            lines.append(f"failures ({len(self.failures)}, first 20):")
            lines += ["  " + f for f in self.failures[:20]]
        return "\n".join(lines)


class Gone(Exception):
    """The client's connection is gone (or in a state the client cannot trust): reconnect."""


class Stale(Exception):
    """The owner setting read back as one of the client's own earlier values, or the default:
    a session SET of the client was lost (the known bug of test_fuzz_mix.py::
    test_set_survives_a_failed_probe), not another client's state. Counted apart; the client
    reconnects (its session on pgcorral keeps the stale value)."""


class Mixed(Exception):
    """A probe check failed: the transaction saw something that is not its own."""


def sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def error_name(exc: BaseException) -> str:
    state = sqlstate(exc)
    return f"{type(exc).__name__}({state})" if state else type(exc).__name__


class Run:
    """State shared by the clients of one run."""

    def __init__(self, target: Target, config: Config) -> None:
        self.target = target
        self.config = config
        self.result = Result(seed=config.seed)
        self.started = time.monotonic()
        self.stop = False

    def take(self) -> bool:
        """Count one more transaction; False when the budget is spent."""
        cfg = self.config
        if self.stop:
            return False
        if cfg.transactions and self.result.transactions >= cfg.transactions:
            self.stop = True
            return False
        if cfg.seconds and time.monotonic() - self.started >= cfg.seconds:
            self.stop = True
            return False
        self.result.transactions += 1
        if cfg.progress and self.result.transactions % 10_000 == 0:
            print(f"  {self.result.transactions} transactions, "
                  f"{time.monotonic() - self.started:.0f} s, mixed {self.result.mixed}",
                  file=sys.stderr, flush=True)
        return True

    def fail(self, client: str, txn: int, what: str, op: str = "",
             after: list[str] | None = None) -> None:
        where = f" op={op}" if op else ""
        now = time.strftime("%H:%M:%S", time.gmtime())
        msg = f"{now} seed={self.config.seed} client={client} txn={txn}{where}: {what}"
        if after:
            msg += f" (after {', '.join(after)})"
        self.result.failures.append(msg)
        print("FUZZ CHECK FAILED: " + msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ connections


class Conn:
    """One client connection, asyncpg or psycopg, with what the fuzzer needs of each."""

    kind = ""

    async def close(self, rst: bool = False) -> None:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError


def _linger0(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class PgConn(Conn):
    kind = "asyncpg"

    def __init__(self, conn: Any) -> None:
        self.c = conn

    async def close(self, rst: bool = False) -> None:
        if rst:
            transport = self.c._transport  # the only way to reach the socket
            if transport is not None:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    _linger0(sock)
            self.c.terminate()
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.c.close(), 5)
            self.c.terminate()

    def healthy(self) -> bool:
        return not self.c.is_closed()


class PsyConn(Conn):
    kind = "psycopg"

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.c = conn

    async def close(self, rst: bool = False) -> None:
        if rst and not self.c.closed:
            with contextlib.suppress(Exception):
                fd = self.c.pgconn.socket
                dup = socket.socket(fileno=os.dup(fd))
                _linger0(dup)
                dup.close()
        with contextlib.suppress(Exception):
            await self.c.close()

    def healthy(self) -> bool:
        return not self.c.closed and not self.c.broken


# ---------------------------------------------------------------------------------- client

def probe_sql(guc: str) -> str:
    """The probe inside a transaction; the caller appends the tag expression."""
    return ("SELECT pg_backend_pid(), txid_current()::text, "
            f"current_setting('{guc}', true), current_setting('fuzz.local', true), "
            "current_setting('application_name'), ")


def outside_sql(guc: str) -> str:
    return f"SELECT current_setting('{guc}', true), current_setting('application_name'), "


class Client:
    def __init__(self, run: Run, number: int) -> None:
        self.run = run
        self.cid = f"c{number}"
        self.rng = random.Random(f"{run.config.seed}:{number}")
        self.guc = run.config.owner_guc
        # psycopg prepares ROLLBACK (TO SAVEPOINT) like any statement; a prepared one sent in
        # an aborted transaction meets a known bug (test_fuzz_mix.py::
        # test_prepared_rollback_in_aborted_transaction): unprepared unless FUZZ_KNOWN_BUGS=1
        self.exit_prepare: bool | None = None if run.config.known_bugs else False
        self.PROBE = probe_sql(self.guc)
        self.OUTSIDE = outside_sql(self.guc)
        self.conn: Conn | None = None
        self.owner = ""  # the value of the owner setting this client's session should have
        self.owner_version = 0
        self.seq = 0
        self.committed: set[int] = set()
        self.ambiguous: set[int] = set()
        self.txn = 0  # number of the current transaction of this client
        self.op = ""  # the operation running
        self.outcome = ""  # how it ended: ok or the error's name
        self.history: list[str] = []  # the client's last operations before this one
        self.nonce = ""
        self.expect_cancel = False
        self.last_cancel = -1e9  # when this client last sent a cancel (monotonic)
        # per transaction: what the probes saw first
        self.pid: int | None = None
        self.xid: str | None = None
        self.local: str | None = None
        self.app_local: str | None = None

    # -- helpers

    def tag(self, k: int) -> str:
        return f"{self.cid}:{self.txn}:{self.nonce}:{k}"

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def report(self, what: str) -> None:
        self.run.fail(self.cid, self.txn, what, op=self.op, after=self.history)

    def mixed(self, what: str) -> None:
        raise Mixed(what)

    def wrong_owner(self, where: str, owner: str | None) -> None:
        what = f"{where}: {self.guc} {owner!r}, expected {self.owner!r}"
        own = not owner or owner == DEFAULT_PATH or owner.startswith(f"{self.cid}_s")
        if own and not self.run.config.known_bugs:
            raise Stale(what)
        self.mixed(what)

    def check_probe(self, row: Any, k: int) -> None:
        pid, xid, owner, local, app, tag = row
        if tag != self.tag(k):
            self.mixed(f"probe {k}: tag {tag!r}, sent {self.tag(k)!r}")
        if self.pid is None:
            self.pid, self.xid = int(pid), str(xid)
        elif (int(pid), str(xid)) != (self.pid, self.xid):
            self.mixed(f"probe {k}: backend pid/txid {pid}/{xid}, the transaction began on "
                       f"{self.pid}/{self.xid}")
        if owner != self.owner:
            self.wrong_owner(f"probe {k}", owner)
        if (local or None) != self.local:
            self.mixed(f"probe {k}: fuzz.local {local!r}, expected {self.local!r}")
        if app != (self.app_local or self.cid):
            self.mixed(f"probe {k}: application_name {app!r}, expected "
                       f"{self.app_local or self.cid!r}")

    def check_outside(self, row: Any, k: int) -> None:
        owner, app, tag = row
        if tag != self.tag(k):
            self.mixed(f"outside probe {k}: tag {tag!r}, sent {self.tag(k)!r}")
        if owner != self.owner:
            self.wrong_owner(f"outside probe {k}", owner)
        if app != self.cid:
            self.mixed(f"outside probe {k}: application_name {app!r}, expected {self.cid!r}")

    def begin_txn(self) -> None:
        self.txn += 1
        self.nonce = f"{self.rng.getrandbits(48):012x}"
        self.pid = self.xid = self.local = self.app_local = None
        self.expect_cancel = False

    def new_local(self) -> str:
        self.local = f"{self.cid}.{self.txn}.{self.nonce}"
        return self.local

    # -- connecting

    async def connect(self) -> None:
        t = self.run.target
        self.owner_version += 1
        owner = f"{self.cid}_s{self.owner_version}"
        if self.rng.random() < 0.5:
            c = await asyncpg.connect(
                host=t.host, port=t.port, user=t.user, database=t.database,
                server_settings={"application_name": self.cid},
                statement_cache_size=self.rng.choice([0, 100]), timeout=30)
            self.conn = PgConn(c)
            await c.execute(f"SET {self.guc} = '{owner}'")
        else:
            pc = await psycopg.AsyncConnection.connect(
                host=t.host, port=t.port, user=t.user, dbname=t.database,
                application_name=self.cid, autocommit=True, connect_timeout=30,
                prepare_threshold=self.rng.choice([None, 0, 2]))
            self.conn = PsyConn(pc)
            await pc.execute(f"SET {self.guc} = '{owner}'", prepare=False)
        self.owner = owner

    async def drop(self, rst: bool = False) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.close(rst)

    # -- the loop

    async def main(self) -> None:
        res = self.run.result
        while self.run.take():
            try:
                if self.conn is None or not self.conn.healthy():
                    await self.drop()
                    await self.connect()
                    res.reconnects += 1
                ops = self.OPS[self.conn.kind] if self.conn else []
                names = [o[0] for o in ops]
                weights = [o[1] for o in ops]
                if not self.run.config.faults:
                    weights = [0.0 if n in FAULT_OPS else w
                               for n, w in zip(names, weights, strict=True)]
                name = self.rng.choices(names, weights)[0]
                res.ops[name] += 1
                self.history.append(f"{self.op}:{self.outcome}")
                del self.history[:-4]
                self.outcome = "ok"
                self.op = name
                self.begin_txn()
                await getattr(self, "op_" + name)()
            except Stale as e:
                self.outcome = "STALE"
                res.stale += 1
                res.errors["Stale"] += 1
                self.run.result.notes.append(
                    f"seed={self.run.config.seed} client={self.cid} txn={self.txn} "
                    f"op={self.op}: {e} (after {', '.join(self.history)})")
                await self.drop()
            except Mixed as e:
                self.outcome = "MIXED"
                res.mixed += 1
                self.report(str(e))
                await self.drop()
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                self.classify(e)
                await self.drop()

    def classify(self, e: BaseException) -> None:
        res = self.run.result
        self.outcome = error_name(e)
        state = sqlstate(e)
        key = error_name(e)
        if not state:  # which kind of connection loss, in the summary
            key += ": " + str(e).split("\n")[0][:60]
        res.errors[key] += 1
        own = self.expect_cancel or time.monotonic() - self.last_cancel < LATE_CANCEL
        if state == "57014" and not own:
            res.mixed += 1
            self.report(f"query canceled (57014) but this client sent no "
                          f"cancel: {e!r}")
        elif isinstance(e, Gone | TimeoutError | OSError | asyncpg.InterfaceError
                        | psycopg.OperationalError | psycopg.InterfaceError):
            pass
        elif isinstance(e, asyncpg.InternalClientError) and "another operation" in str(e):
            # asyncpg after a FATAL (pg_terminate_backend) that came while the connection was
            # idle: its next operation fails so (seen with PostgreSQL directly too)
            pass
        elif state in GONE_STATES or state == "57014":
            pass
        elif isinstance(e, asyncpg.PostgresError | psycopg.Error):
            # an error nothing in this transaction should have raised
            res.mixed += 1
            self.report(f"unexpected error {error_name(e)}: {e!r}")
        else:
            res.mixed += 1
            self.report(f"unexpected exception {e!r}")

    # -- commit accounting

    async def commit(self, rows: list[int], send: Any) -> None:
        """Run ``send`` (the COMMIT); rows count as committed if it answers, ambiguous if it
        fails (the reply was lost)."""
        try:
            await send()
        except BaseException:
            self.ambiguous.update(rows)
            self.run.result.ambiguous_commits += 1
            raise
        self.committed.update(rows)
        self.run.result.committed += 1

    # ============================================================== asyncpg operations

    async def pg_probe(self, c: Any, k: int) -> None:
        row = await c.fetchrow(self.PROBE + "$1::text", self.tag(k))
        self.check_probe(tuple(row), k)

    async def pg_insert(self, c: Any, seq: int) -> None:
        await c.execute(f"INSERT INTO {self.run.target.table} (client, seq, note) "
                        "VALUES ($1, $2, $3)", self.cid, seq, self.nonce)

    async def op_pg_outside(self) -> None:
        c = self.pgc()
        row = await c.fetchrow(self.OUTSIDE + "$1::text", self.tag(0))
        self.check_outside(tuple(row), 0)

    async def op_pg_autocommit_insert(self) -> None:
        c = self.pgc()
        seq = self.next_seq()
        await self.commit([seq], lambda: self.pg_insert(c, seq))

    def pgc(self) -> Any:
        assert isinstance(self.conn, PgConn)
        return self.conn.c

    async def op_pg_extended(self) -> None:
        c = self.pgc()
        rows: list[int] = []
        await c.execute("BEGIN")
        await self.pg_probe(c, 0)
        if self.rng.random() < 0.5:
            await c.execute(f"SET LOCAL fuzz.local = '{self.new_local()}'")
        if self.rng.random() < 0.3:
            self.app_local = f"{self.cid}-{self.txn}"
            await c.execute(f"SET LOCAL application_name = '{self.app_local}'")
        for k in range(1, self.rng.randint(2, 4)):
            if self.rng.random() < 0.6:
                seq = self.next_seq()
                await self.pg_insert(c, seq)
                rows.append(seq)
            await self.pg_probe(c, k)
        if self.rng.random() < 0.15:
            await c.execute("ROLLBACK")
            return
        await self.commit(rows, lambda: c.execute("COMMIT"))
        self.app_local = None

    async def op_pg_prepared(self) -> None:
        c = self.pgc()
        stmt = await c.prepare(self.PROBE + "$1::text")
        ins = await c.prepare(f"INSERT INTO {self.run.target.table} (client, seq, note) "
                              "VALUES ($1, $2, $3)")
        rows: list[int] = []
        async with c.transaction():
            for k in range(self.rng.randint(1, 3)):
                self.check_probe(tuple(await stmt.fetchrow(self.tag(k))), k)
                seq = self.next_seq()
                await ins.fetch(self.cid, seq, self.nonce)
                rows.append(seq)
            self.ambiguous.update(rows)  # the COMMIT is sent on leaving the block
        self.ambiguous.difference_update(rows)
        self.committed.update(rows)
        self.run.result.committed += 1

    async def op_pg_savepoint(self) -> None:
        c = self.pgc()
        rows: list[int] = []
        await c.execute("BEGIN")
        seq = self.next_seq()
        await self.pg_insert(c, seq)
        rows.append(seq)
        await self.pg_probe(c, 0)
        await c.execute("SAVEPOINT s1")
        lost = self.next_seq()
        await self.pg_insert(c, lost)  # undone by the ROLLBACK TO
        try:
            if self.rng.random() < 0.5:
                await c.fetchval("SELECT 1/0")
            else:
                await self.pg_insert(c, seq)  # 23505
            self.mixed("the error statement did not fail")
        except (asyncpg.DivisionByZeroError, asyncpg.UniqueViolationError):
            pass
        await c.execute("ROLLBACK TO SAVEPOINT s1")
        await self.pg_probe(c, 1)
        seq = self.next_seq()
        await self.pg_insert(c, seq)
        rows.append(seq)
        await self.pg_probe(c, 2)
        await self.commit(rows, lambda: c.execute("COMMIT"))

    async def op_pg_copy(self) -> None:
        c = self.pgc()
        rows: list[int] = []
        await c.execute("BEGIN")
        await self.pg_probe(c, 0)
        recs = []
        for _ in range(self.rng.randint(1, 5)):
            seq = self.next_seq()
            recs.append((self.cid, seq, self.nonce))
            rows.append(seq)
        schema, table = self.run.target.table.split(".")
        await c.copy_records_to_table(table, schema_name=schema, records=recs,
                                      columns=["client", "seq", "note"])
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(bytes(data))

        tag = self.tag(1).replace("'", "")
        await c.copy_from_query(f"{self.PROBE}'{tag}'", output=sink)
        line = b"".join(chunks).decode().rstrip("\n").split("\t")
        if len(line) != 6:
            self.mixed(f"COPY TO gave {b''.join(chunks)!r}")
        self.check_probe([None if v == "\\N" else v for v in line], 1)
        await self.commit(rows, lambda: c.execute("COMMIT"))

    async def op_pg_session_set(self) -> None:
        """A session SET inside a transaction, committed or rolled back; or outside one."""
        c = self.pgc()
        self.owner_version += 1
        new = f"{self.cid}_s{self.owner_version}"
        r = self.rng.random()
        if r < 0.4:
            await c.execute(f"SET {self.guc} = '{new}'")
            self.owner = new
            await self.op_pg_outside()
            return
        await c.execute("BEGIN")
        await self.pg_probe(c, 0)
        old = self.owner
        await c.execute(f"SET {self.guc} = '{new}'")
        self.owner = new
        await self.pg_probe(c, 1)
        if r < 0.7:
            await c.execute("ROLLBACK")
            self.owner = old
        else:
            try:
                await c.execute("COMMIT")
            except BaseException:
                self.owner = "?"  # unknown: the connection is dropped anyway
                raise
        self.txn += 1
        row = await c.fetchrow(self.OUTSIDE + "$1::text", self.tag(0))
        self.check_outside(tuple(row), 0)

    async def op_pg_cancel(self) -> None:
        """A query canceled mid-way (asyncpg's timeout sends a cancel request), inside a
        transaction or outside one."""
        c = self.pgc()
        inside = self.rng.random() < 0.6
        if inside:
            await c.execute("BEGIN")
            seq = self.next_seq()
            await self.pg_insert(c, seq)
            await self.pg_probe(c, 0)
        self.expect_cancel = True
        self.last_cancel = time.monotonic()
        try:
            await c.fetchval("SELECT pg_sleep(0.2)", timeout=self.rng.uniform(0.005, 0.05))
        except TimeoutError:
            pass
        self.expect_cancel = False
        if inside:
            await c.execute("ROLLBACK")
        self.txn += 1
        await self.op_pg_outside()

    async def op_pg_disconnect(self) -> None:
        """Leave in the middle of a transaction: between statements or while a query runs;
        with a Terminate or with an RST."""
        c = self.pgc()
        await c.execute("BEGIN")
        seq = self.next_seq()
        await self.pg_insert(c, seq)  # must never be seen
        await self.pg_probe(c, 0)
        rst = self.rng.random() < 0.5
        if self.rng.random() < 0.5:
            task = asyncio.ensure_future(c.fetchval("SELECT pg_sleep(0.05)"))
            await asyncio.sleep(self.rng.uniform(0, 0.02))
            if rst:
                await self.drop(rst=True)
            else:
                c.terminate()  # (asyncpg's close() waits for the running query)
                self.conn = None
            with contextlib.suppress(BaseException):
                await task
        else:
            await self.drop(rst)

    # ============================================================== psycopg operations

    def psc(self) -> psycopg.AsyncConnection[Any]:
        assert isinstance(self.conn, PsyConn)
        return self.conn.c

    async def ps_probe(self, cur: Any, k: int, prepare: bool | None = None) -> None:
        await cur.execute(self.PROBE + "%s::text", (self.tag(k),), prepare=prepare)
        self.check_probe(await cur.fetchone(), k)

    async def ps_insert(self, cur: Any, seq: int, prepare: bool | None = None) -> None:
        await cur.execute(f"INSERT INTO {self.run.target.table} (client, seq, note) "
                          "VALUES (%s, %s, %s)", (self.cid, seq, self.nonce), prepare=prepare)

    async def op_ps_outside(self) -> None:
        c = self.psc()
        cur = await c.execute(self.OUTSIDE + "%s::text", (self.tag(0),))
        self.check_outside(await cur.fetchone(), 0)

    async def op_ps_extended(self) -> None:
        c = self.psc()
        prepare = self.rng.choice([None, True, False])
        cur = c.cursor()
        rows: list[int] = []
        await cur.execute("BEGIN")
        await self.ps_probe(cur, 0, prepare)
        if self.rng.random() < 0.5:
            await cur.execute(f"SET LOCAL fuzz.local = '{self.new_local()}'")
        for k in range(1, self.rng.randint(2, 4)):
            seq = self.next_seq()
            await self.ps_insert(cur, seq, prepare)
            rows.append(seq)
            await self.ps_probe(cur, k, prepare)
        if self.rng.random() < 0.15:
            await cur.execute("ROLLBACK")
            return
        await self.commit(rows, lambda: cur.execute("COMMIT"))

    async def op_ps_simple(self) -> None:
        """The simple protocol (psycopg's client-side cursor): one Query per statement, or the
        whole transaction in one multi-statement Query."""
        c = self.psc()
        cur = psycopg.AsyncClientCursor(c)
        t = self.run.target.table
        seq1, seq2 = self.next_seq(), self.next_seq()
        local = self.new_local() if self.rng.random() < 0.5 else None
        stmts = ["BEGIN",
                 f"INSERT INTO {t} (client, seq, note) VALUES ('{self.cid}', {seq1}, 'x')",
                 *([f"SET LOCAL fuzz.local = '{local}'"] if local else []),
                 self.PROBE + f"'{self.tag(0)}'",
                 f"INSERT INTO {t} (client, seq, note) VALUES ('{self.cid}', {seq2}, 'x')",
                 self.PROBE + f"'{self.tag(1)}'"]
        if self.rng.random() < 0.5:
            # one Query; with COMMIT in it, an error-free reply means it committed
            sql = "; ".join([*stmts, "COMMIT"])
            self.ambiguous.update((seq1, seq2))
            await cur.execute(sql)
            probes = []
            while True:
                if cur.description is not None:
                    probes.append(await cur.fetchone())
                if not cur.nextset():
                    break
            self.ambiguous.difference_update((seq1, seq2))
            self.committed.update((seq1, seq2))
            self.run.result.committed += 1
            if len(probes) != 2:
                self.mixed(f"multi-statement query gave {len(probes)} result sets, not 2")
            for k, row in enumerate(probes):
                self.check_probe(row, k)
            return
        k = 0
        for s in stmts:
            await cur.execute(s)
            if s.startswith("SELECT"):
                self.check_probe(await cur.fetchone(), k)
                k += 1
        await self.commit([seq1, seq2], lambda: cur.execute("COMMIT"))

    async def op_ps_pipeline(self) -> None:
        """psycopg pipeline mode: the whole transaction sent before any reply is read."""
        c = self.psc()
        seqs = [self.next_seq() for _ in range(self.rng.randint(1, 3))]
        curs = []
        self.ambiguous.update(seqs)
        async with c.pipeline():
            await c.execute("BEGIN")
            if self.rng.random() < 0.5:
                await c.execute(f"SET LOCAL fuzz.local = '{self.new_local()}'")
            for k, seq in enumerate(seqs):
                await c.execute(f"INSERT INTO {self.run.target.table} (client, seq, note) "
                                "VALUES (%s, %s, %s)", (self.cid, seq, self.nonce))
                curs.append(await c.execute(self.PROBE + "%s::text", (self.tag(k),)))
            await c.execute("COMMIT")
        self.ambiguous.difference_update(seqs)
        self.committed.update(seqs)
        self.run.result.committed += 1
        for k, cur in enumerate(curs):
            self.check_probe(await cur.fetchone(), k)

    async def op_ps_savepoint(self) -> None:
        c = self.psc()
        cur = c.cursor()
        rows: list[int] = []
        await cur.execute("BEGIN")
        seq = self.next_seq()
        await self.ps_insert(cur, seq)
        rows.append(seq)
        await self.ps_probe(cur, 0)
        await cur.execute("SAVEPOINT s1")
        await self.ps_insert(cur, self.next_seq())  # undone by the ROLLBACK TO
        try:
            if self.rng.random() < 0.5:
                await cur.execute("SELECT 1/0")
            else:
                await self.ps_insert(cur, seq)
            self.mixed("the error statement did not fail")
        except (psycopg.errors.DivisionByZero, psycopg.errors.UniqueViolation):
            pass
        await cur.execute("ROLLBACK TO SAVEPOINT s1", prepare=self.exit_prepare)
        await self.ps_probe(cur, 1)
        seq = self.next_seq()
        await self.ps_insert(cur, seq)
        rows.append(seq)
        await self.commit(rows, lambda: cur.execute("COMMIT"))

    async def op_ps_copy(self) -> None:
        c = self.psc()
        cur = c.cursor()
        rows: list[int] = []
        await cur.execute("BEGIN")
        await self.ps_probe(cur, 0)
        t = self.run.target.table
        async with cur.copy(f"COPY {t} (client, seq, note) FROM STDIN") as copy:
            for _ in range(self.rng.randint(1, 5)):
                seq = self.next_seq()
                await copy.write_row((self.cid, seq, self.nonce))
                rows.append(seq)
        got = []
        async with cur.copy(f"COPY ({self.PROBE}'{self.tag(1)}') TO STDOUT") as copy:
            async for row in copy.rows():
                got.append(row)
        if len(got) != 1:
            self.mixed(f"COPY TO gave {got!r}")
        self.check_probe(got[0], 1)
        await self.commit(rows, lambda: cur.execute("COMMIT"))

    async def op_ps_cancel(self) -> None:
        c = self.psc()
        inside = self.rng.random() < 0.6
        if inside:
            await c.execute("BEGIN")
            await self.ps_insert(c.cursor(), self.next_seq())
        self.expect_cancel = True
        self.last_cancel = time.monotonic()
        task = asyncio.ensure_future(c.execute("SELECT pg_sleep(0.2)"))
        await asyncio.sleep(self.rng.uniform(0.0, 0.03))
        await c.cancel_safe(timeout=10)
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            await task
        self.expect_cancel = False
        if inside:
            await c.execute("ROLLBACK", prepare=self.exit_prepare)
        self.txn += 1
        await self.op_ps_outside()

    async def op_ps_disconnect(self) -> None:
        c = self.psc()
        await c.execute("BEGIN")
        await self.ps_insert(c.cursor(), self.next_seq())  # must never be seen
        await self.drop(self.rng.random() < 0.5)

    OPS: dict[str, list[tuple[str, float]]] = {
        "asyncpg": [("pg_outside", 2), ("pg_autocommit_insert", 1), ("pg_extended", 4),
                    ("pg_prepared", 2), ("pg_savepoint", 2), ("pg_copy", 1),
                    ("pg_session_set", 1), ("pg_cancel", 0.3), ("pg_disconnect", 0.2)],
        "psycopg": [("ps_outside", 2), ("ps_extended", 3), ("ps_simple", 3),
                    ("ps_pipeline", 2), ("ps_savepoint", 2), ("ps_copy", 1),
                    ("ps_cancel", 0.3), ("ps_disconnect", 0.2)],
    }


FAULT_OPS = {"pg_cancel", "pg_disconnect", "ps_cancel", "ps_disconnect"}


# ------------------------------------------------------------------------------ the run


async def direct(target: Target) -> Any:
    return await asyncpg.connect(host=target.direct_host, port=target.direct_port,
                                 user=target.direct_user, database=target.database)


async def setup(target: Target) -> None:
    c = await direct(target)
    try:
        await c.execute(f"DROP TABLE IF EXISTS {target.table}")
        await c.execute(f"CREATE TABLE {target.table} (client text, seq int, note text, "
                        "PRIMARY KEY (client, seq))")
        await c.execute(f"GRANT ALL ON {target.table} TO PUBLIC")
    finally:
        await c.close()


async def chaos(run: Run) -> None:
    """pg_terminate_backend of a random backend of the clients' user, now and then."""
    if run.config.kill_interval <= 0:
        return
    rng = random.Random(f"{run.config.seed}:chaos")
    c = await direct(run.target)
    try:
        kill = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ("
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND usename = $2 "
                "AND backend_type = 'client backend' ORDER BY random() LIMIT 1)")
        await c.execute(f"SELECT setseed({rng.random() * 2 - 1})")
        while not run.stop:
            await asyncio.sleep(rng.expovariate(1 / run.config.kill_interval))
            if await c.fetchval(kill, run.target.database, run.target.user):
                run.result.kills += 1
    finally:
        await c.close()


async def verify(run: Run, clients: list[Client]) -> None:
    """Each client's rows are exactly its committed ones (plus, possibly, the ambiguous)."""
    c = await direct(run.target)
    try:
        found: dict[str, set[int]] = {}
        for r in await c.fetch(f"SELECT client, seq FROM {run.target.table}"):
            found.setdefault(r["client"], set()).add(r["seq"])
    finally:
        await c.close()
    known = {cl.cid: cl for cl in clients}
    for cid, seqs in found.items():
        if cid not in known:
            run.result.leaked += len(seqs)
            run.fail(cid, 0, f"{len(seqs)} rows of an unknown client")
    for cl in clients:
        seqs = found.get(cl.cid, set())
        missing = cl.committed - seqs
        extra = seqs - cl.committed - cl.ambiguous
        if missing:
            run.result.leaked += len(missing)
            run.fail(cl.cid, 0, f"rows of committed transactions missing: seqs "
                     f"{sorted(missing)[:20]}")
        if extra:
            run.result.leaked += len(extra)
            run.fail(cl.cid, 0, f"rows of uncommitted (rolled back, failed or abandoned) "
                     f"transactions present: seqs {sorted(extra)[:20]}")


async def fuzz(target: Target, config: Config) -> Result:
    await setup(target)
    run = Run(target, config)
    clients = [Client(run, n) for n in range(config.clients)]
    chaos_task = asyncio.ensure_future(chaos(run))
    try:
        await asyncio.gather(*(cl.main() for cl in clients))
    finally:
        run.stop = True
        for cl in clients:
            await cl.drop()
        chaos_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await chaos_task
    run.result.elapsed = time.monotonic() - run.started
    await verify(run, clients)
    return run.result
