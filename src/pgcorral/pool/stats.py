"""The counters behind every view (Prometheus, the SQL console, the web console, ``top``).

Kept on the data path as plain integers on the objects that already exist there, and added up
only when someone reads them:

* ``Tally``: what one client did (transactions, queries, bytes each way, time waiting for a
  server connection, time holding one, time in queries and transactions). A client's tally is
  updated by its own callbacks; when it leaves, it is added to its pool's ``retired`` tally, so
  a pool's totals are ``retired`` plus its live clients (``PoolStats.totals``).
* ``Histogram``: fixed power-of-two buckets of microseconds (``BUCKETS_US``). ``observe`` is an
  ``int.bit_length`` and an index increment, cheap enough for every query.
* ``PoolStats``: per (database, user) of one worker: the retired tally, the three histograms
  (wait, transaction, query), errors by SQLSTATE class, logins by outcome, prepared-statement
  hits, misses and evictions.
* ``GroupStats``: the per-client-group view (address, application_name, user), bounded to
  ``GROUPS_MAX`` groups per worker; later groups are counted under ``OTHER``.

Times are integers of microseconds from ``time.monotonic_ns() // 1000`` taken by the network
layer (this module has no clock). Everything here is pure and has no I/O.
"""

from __future__ import annotations

#: Upper bounds of the histogram buckets, in microseconds: 2**5 (32 us) .. 2**24 (16.8 s),
#: then +Inf. Bucket i (i >= 1) holds values v with 2**(i+4) <= v < 2**(i+5) (bit_length i+5);
#: bucket 0 holds everything below 32 us.
FIRST_SHIFT = 5
BUCKETS_US: tuple[int, ...] = tuple(1 << k for k in range(FIRST_SHIFT, 25))
NBUCKETS = len(BUCKETS_US) + 1  # the last one is +Inf

#: Client groups kept per worker; the rest are counted under OTHER.
GROUPS_MAX = 1000
OTHER = ("(other)", "(other)", "(other)")

#: Login outcomes counted per pool.
LOGIN_OUTCOMES = ("success", "bad_password", "refused", "error")


class Histogram:
    """Counts per fixed bucket, their sum and count (Prometheus' histogram model)."""

    __slots__ = ("counts", "sum_us")

    def __init__(self) -> None:
        self.counts = [0] * NBUCKETS
        self.sum_us = 0

    def observe(self, us: int) -> None:
        i = us.bit_length() - FIRST_SHIFT
        if i < 0:
            i = 0
        elif i >= NBUCKETS:
            i = NBUCKETS - 1
        self.counts[i] += 1
        self.sum_us += us

    def add(self, other: Histogram) -> None:
        counts = self.counts
        for i, n in enumerate(other.counts):
            counts[i] += n
        self.sum_us += other.sum_us

    def clear(self) -> None:
        self.counts = [0] * NBUCKETS
        self.sum_us = 0


def bucket_index(us: int) -> int:
    """The bucket ``Histogram.observe`` puts ``us`` in (for tests and readers)."""
    return max(0, min(NBUCKETS - 1, us.bit_length() - FIRST_SHIFT))


def percentile(counts: list[int], q: float) -> float:
    """The q-quantile (0..1) in microseconds from bucket counts, interpolated linearly inside
    the bucket as Prometheus' ``histogram_quantile`` does (bucket 0 starts at 0; a quantile in
    the +Inf bucket is the last finite bound). 0.0 without observations."""
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(BUCKETS_US):
                return float(BUCKETS_US[-1])
            low = 0 if i == 0 else BUCKETS_US[i - 1]
            high = BUCKETS_US[i]
            return low + (high - low) * ((rank - seen) / n)
        seen += n
    return float(BUCKETS_US[-1])


class Tally:
    """What one client (or a set of clients) did. Plain integers; the network layer adds to
    them directly."""

    __slots__ = ("bytes_received", "bytes_sent", "hold_us", "query_count", "query_us",
                 "wait_count", "wait_us", "xact_count", "xact_us")

    def __init__(self) -> None:
        self.xact_count = 0
        self.query_count = 0
        self.bytes_received = 0  # from the client
        self.bytes_sent = 0  # to the client
        self.xact_us = 0
        self.query_us = 0
        self.wait_us = 0  # waiting for a server connection
        self.wait_count = 0  # server connections asked for (a wait of 0 included)
        self.hold_us = 0  # holding a server connection

    def add(self, other: Tally) -> None:
        self.xact_count += other.xact_count
        self.query_count += other.query_count
        self.bytes_received += other.bytes_received
        self.bytes_sent += other.bytes_sent
        self.xact_us += other.xact_us
        self.query_us += other.query_us
        self.wait_us += other.wait_us
        self.wait_count += other.wait_count
        self.hold_us += other.hold_us

    def copy_from(self, other: Tally) -> None:
        self.xact_count = other.xact_count
        self.query_count = other.query_count
        self.bytes_received = other.bytes_received
        self.bytes_sent = other.bytes_sent
        self.xact_us = other.xact_us
        self.query_us = other.query_us
        self.wait_us = other.wait_us
        self.wait_count = other.wait_count
        self.hold_us = other.hold_us

    def add_since(self, now: Tally, mark: Tally) -> None:
        """Add what ``now`` counted since it was ``mark`` (a server connection's tally while
        it served one client, given to that client at unlink)."""
        self.xact_count += now.xact_count - mark.xact_count
        self.query_count += now.query_count - mark.query_count
        self.bytes_received += now.bytes_received - mark.bytes_received
        self.bytes_sent += now.bytes_sent - mark.bytes_sent
        self.xact_us += now.xact_us - mark.xact_us
        self.query_us += now.query_us - mark.query_us

    def as_dict(self) -> dict[str, int]:
        return {"xact_count": self.xact_count, "query_count": self.query_count,
                "bytes_received": self.bytes_received, "bytes_sent": self.bytes_sent,
                "xact_time_us": self.xact_us, "query_time_us": self.query_us,
                "wait_time_us": self.wait_us, "wait_count": self.wait_count,
                "hold_time_us": self.hold_us}


class PoolStats:
    """The counters of one (database, user) pool in one worker."""

    __slots__ = ("errors", "evictions", "hist_query", "hist_wait", "hist_xact", "hits",
                 "logins", "misses", "retired")

    def __init__(self) -> None:
        self.retired = Tally()  # clients that left
        self.hist_wait = Histogram()
        self.hist_xact = Histogram()
        self.hist_query = Histogram()
        self.errors: dict[str, int] = {}  # SQLSTATE class (2 characters) -> count
        self.logins: dict[str, int] = dict.fromkeys(LOGIN_OUTCOMES, 0)
        self.hits = 0  # prepared statements found prepared on the server connection
        self.misses = 0  # prepared there first
        self.evictions = 0  # closed to make room (max_prepared_statements)

    def error(self, sqlstate: str) -> None:
        cls = sqlstate[:2]
        self.errors[cls] = self.errors.get(cls, 0) + 1

    def login(self, outcome: str) -> None:
        self.logins[outcome] = self.logins.get(outcome, 0) + 1

    def clear(self) -> None:
        self.retired = Tally()
        self.hist_wait = Histogram()
        self.hist_xact = Histogram()
        self.hist_query = Histogram()
        self.errors = {}
        self.logins = dict.fromkeys(LOGIN_OUTCOMES, 0)
        self.hits = self.misses = self.evictions = 0


class GroupStats:
    """Per (address, application_name, user): clients seen and their tallies (the departed
    ones; live clients are added when read)."""

    __slots__ = ("clients", "tally")

    def __init__(self) -> None:
        self.clients = 0  # clients that left
        self.tally = Tally()


def group_key(groups: dict[tuple[str, str, str], GroupStats],
              key: tuple[str, str, str]) -> tuple[str, str, str]:
    """``key`` if it has (or may get) a group of its own, else ``OTHER``."""
    if key in groups or len(groups) < GROUPS_MAX:
        return key
    return OTHER


__all__ = ["BUCKETS_US", "GROUPS_MAX", "LOGIN_OUTCOMES", "NBUCKETS", "OTHER", "GroupStats",
           "Histogram", "PoolStats", "Tally", "bucket_index", "group_key", "percentile"]
