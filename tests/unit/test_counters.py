"""The counters' pure parts: histogram buckets and percentiles, tallies, client groups, the
ErrorResponse finders of the session relay, the reply router's counts, PAUSE in the pool."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from tests.unit.test_pool import A, B, C, Recorder, make_pool, new_active, wait
from tests.unit.test_txrelay import ERROR, ROW, SELECT_1, Link
from tests.unit.txhelpers import SYNC, bind, ready

from pgcorral.pool.pool import Grant
from pgcorral.pool.stats import (
    BUCKETS_US,
    GROUPS_MAX,
    NBUCKETS,
    OTHER,
    GroupStats,
    Histogram,
    PoolStats,
    Tally,
    bucket_index,
    group_key,
    percentile,
)
from pgcorral.protocol import messages as m

# --- histograms ---------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=1 << 40))
def test_a_value_lands_in_the_first_bucket_whose_bound_is_above_it(us: int) -> None:
    i = bucket_index(us)
    if i < len(BUCKETS_US):
        assert us < BUCKETS_US[i]
    if i > 0:
        assert us >= BUCKETS_US[i - 1]
    h = Histogram()
    h.observe(us)
    assert h.counts[i] == 1 and sum(h.counts) == 1 and h.sum_us == us


def test_bucket_edges() -> None:
    assert bucket_index(0) == 0 and bucket_index(31) == 0
    assert bucket_index(32) == 1 and bucket_index(63) == 1 and bucket_index(64) == 2
    assert bucket_index(BUCKETS_US[-1] - 1) == len(BUCKETS_US) - 1
    assert bucket_index(BUCKETS_US[-1]) == NBUCKETS - 1  # +Inf
    assert bucket_index(10 ** 12) == NBUCKETS - 1


def test_percentiles_interpolate_inside_a_bucket() -> None:
    h = Histogram()
    for _ in range(100):
        h.observe(100)  # bucket (64, 128]
    p50 = percentile(h.counts, 0.5)
    assert 64 <= p50 <= 128
    assert percentile(h.counts, 1.0) == 128
    assert percentile([0] * NBUCKETS, 0.99) == 0.0
    h.observe(10 ** 9)  # +Inf: the last finite bound
    assert percentile(h.counts, 1.0) == BUCKETS_US[-1]


def test_percentiles_are_ordered() -> None:
    h = Histogram()
    for us in [50] * 90 + [5000] * 9 + [500_000]:
        h.observe(us)
    p50, p95, p99 = (percentile(h.counts, q) for q in (0.5, 0.95, 0.99))
    assert p50 <= 64 < 4096 <= p95 <= 8192 and p95 <= p99 <= 8192
    assert percentile(h.counts, 0.999) > 262_144


def test_histograms_add_and_clear() -> None:
    a, b = Histogram(), Histogram()
    a.observe(10)
    b.observe(10)
    b.observe(1000)
    a.add(b)
    assert sum(a.counts) == 3 and a.sum_us == 1020
    a.clear()
    assert sum(a.counts) == 0 and a.sum_us == 0


# --- tallies and groups -----------------------------------------------------------------------


def test_add_since_gives_a_client_what_was_counted_while_it_was_linked() -> None:
    server, mark, client = Tally(), Tally(), Tally()
    server.xact_count, server.bytes_sent = 10, 1000  # earlier clients
    mark.copy_from(server)
    server.xact_count += 3
    server.query_count += 4
    server.bytes_sent += 50
    server.xact_us += 7
    client.add_since(server, mark)
    assert (client.xact_count, client.query_count, client.bytes_sent, client.xact_us) == (
        3, 4, 50, 7)


def test_pool_stats_clear_and_error_classes() -> None:
    p = PoolStats()
    p.error("22012")
    p.error("22P02")
    p.error("42703")
    p.login("success")
    p.hist_xact.observe(5)
    assert p.errors == {"22": 2, "42": 1} and p.logins["success"] == 1
    p.clear()
    assert p.errors == {} and p.logins["success"] == 0 and sum(p.hist_xact.counts) == 0


def test_client_groups_are_bounded() -> None:
    groups: dict[tuple[str, str, str], GroupStats] = {}
    for i in range(GROUPS_MAX):
        groups[group_key(groups, (f"10.0.0.{i}", "app", "u"))] = GroupStats()
    assert group_key(groups, ("10.0.0.1", "app", "u")) == ("10.0.0.1", "app", "u")
    assert group_key(groups, ("192.168.0.1", "app", "u")) == OTHER


# --- errors found by the session relay -----------------------------------------------------------


def test_error_sqlstate_reads_the_code_field() -> None:
    body = m.error_response("42P01", "no such table")[5:]
    assert m.error_sqlstate(body) == "42P01"
    assert m.error_sqlstate(b"SERROR\0Mno code\0\0") == ""
    assert m.error_sqlstate(b"") == ""
    assert m.error_sqlstate(b"SERROR\0Cunterminated") == ""


def test_an_error_before_the_final_ready_for_query_is_found() -> None:
    rows = ROW * 3 + SELECT_1
    error = m.error_response("22012", "division by zero")
    data = rows + error + ready(b"E")
    assert m.error_sqlstate_ending_at(data, len(data) - 6) == "22012"
    chunk = rows + error  # the error alone at the end of a chunk
    assert m.error_sqlstate_ending_at(chunk, len(chunk)) == "22012"


def test_what_only_looks_like_an_error_end_is_not_one() -> None:
    # a ParameterStatus with an empty value also ends with two NULs before ReadyForQuery
    data = m.parameter_status("application_name", "") + ready(b"I")
    assert data[-7] == 0 and data[-8] == 0
    assert m.error_sqlstate_ending_at(data, len(data) - 6) == ""
    # an 'E' inside row data whose "length" does not reach the end
    fake = ROW + b"E\0\0\0\x09xx\0\0"
    assert m.error_sqlstate_ending_at(fake, len(fake)) == ""


@given(st.binary(max_size=300), st.sampled_from(["22012", "42P01", "57014", "XX000"]))
def test_an_error_after_any_bytes_is_found(prefix: bytes, code: str) -> None:
    data = prefix + m.error_response(code, "boom") + ready(b"I")
    assert m.error_sqlstate_ending_at(data, len(data) - 6) == code


# --- the reply router's counts (transaction pooling) --------------------------------------------


def test_router_counts_ready_for_query_transactions_and_errors() -> None:
    link = Link()
    link.send(b"Q\0\0\0\x0dselect 1\0")
    link.feed(ROW + SELECT_1 + ready(b"I"))
    assert (link.router.readies, link.router.idle_readies) == (1, 1)
    link.send(b"Q\0\0\0\x0aBEGIN\0")
    link.feed(msg_complete(b"BEGIN") + ready(b"T"))
    assert (link.router.readies, link.router.idle_readies) == (2, 1)
    link.send(b"Q\0\0\0\x0dselect 1\0")
    link.feed(ERROR + ready(b"E"))
    assert link.router.errors == ["42P01"]
    assert (link.router.readies, link.router.idle_readies) == (3, 1)


def test_router_does_not_count_pgcorrals_own_query() -> None:
    from pgcorral.protocol.replyplan import own_query_step

    link = Link()
    link.router.plan.extend((own_query_step(),))
    out, _ = link.feed(msg_complete(b"SELECT 1") + ready(b"I"))
    assert out == b""
    assert (link.router.readies, link.router.idle_readies, link.router.errors) == (0, 0, [])


def test_prepared_statement_counters_of_a_server_connection() -> None:
    link = Link(capacity=1)
    from tests.unit.txhelpers import parse

    link.send(parse(b"s1", b"select 1"), SYNC)
    link.feed(b"1\0\0\0\x04" + ready(b"I"))
    link.send(bind(b"s1"), SYNC)
    stmts = link.server
    assert stmts.misses == 1 and stmts.hits >= 1
    link.feed(b"2\0\0\0\x04" + ready(b"I"))
    link.send(parse(b"s2", b"select 2"), SYNC)  # capacity 1: s1 is evicted
    assert stmts.evictions == 1


def msg_complete(tag: bytes) -> bytes:
    return b"C" + (len(tag) + 5).to_bytes(4, "big") + tag + b"\0"


# --- PAUSE ------------------------------------------------------------------------------------


def test_pause_makes_new_requests_wait_until_resume() -> None:
    pool, _ = make_pool()
    a = new_active(pool, A)
    pool.release(a)  # idle, but paused: not given
    pool.pause(A[0])
    assert pool.is_paused(A) and pool.is_paused(B) and not pool.is_paused(C)
    assert pool.take_idle(A) is None
    rec = Recorder()
    wait(pool, A, rec("first"))
    assert rec.calls == []
    other = pool.request(C, None, rec("other db"))
    assert isinstance(other, Grant)  # another database goes on
    pool.resume(A[0])
    assert rec.names() == ["first"] and rec.calls[0][1].slot is a


def test_a_slot_released_during_a_pause_goes_idle_not_to_a_waiter() -> None:
    pool, _ = make_pool()
    a = new_active(pool, A)
    pool.pause("*")
    rec = Recorder()
    wait(pool, A, rec("w"))
    pool.release(a)
    assert rec.calls == [] and pool.count("idle") == 1
    pool.resume("*")
    assert rec.names() == ["w"] and not pool.paused
