"""pool.topology: roles, split brain, lag and replica choice, without servers."""

from __future__ import annotations

from pgcorral.pool.topology import (
    DOWN,
    LAGGING,
    PRIMARY,
    REPLICA,
    Probe,
    Topology,
    configured_snapshot,
    pick_replica,
)


def topo(**kw: object) -> Topology:
    return Topology(("a", "b", "c"), "a", **kw)  # type: ignore[arg-type]


def test_one_primary_and_replicas() -> None:
    t = topo()
    t.observe("a", Probe(False, 1000), 1.0)
    t.observe("b", Probe(True, 900), 1.0)
    t.observe("c", Probe(True, 1000), 1.0)
    s = t.decide(5.0)
    assert s.primary == "a" and s.refusal == "" and s.known and s.at == 5.0
    assert s.replicas == ("b", "c")
    assert s.lsn_of("b") == 900 and s.state_of("c") == REPLICA
    assert t.servers["b"].lag_bytes == 100


def test_primary_down_means_no_primary_then_the_promoted_one() -> None:
    t = topo()
    t.observe("a", Probe(False, 10), 1.0)
    t.observe("b", Probe(True, 10), 1.0)
    t.observe("c", Probe(True, 5), 1.0)
    assert t.decide().primary == "a"
    t.observe("a", None, 2.0, "refused")
    s = t.decide()
    assert s.primary is None and s.refusal.startswith("no primary server")
    assert s.state_of("a") == DOWN and t.servers["a"].failures == 1
    assert t.failover_candidate() == "b"  # replayed the most WAL
    t.observe("b", Probe(False, 20), 3.0)  # promoted
    s = t.decide()
    assert s.primary == "b" and s.replicas == ("c",) and s.generation == 2


def test_split_brain_refuses_until_one_or_an_operator_choice() -> None:
    t = topo()
    t.observe("a", Probe(False, 10), 1.0)
    t.observe("b", Probe(False, 10), 1.0)
    t.observe("c", None, 1.0)
    s = t.decide()
    assert s.primary is None and "split brain" in s.refusal and "a and b" in s.refusal
    t.chosen = "c"  # not a claimant: no effect
    assert t.decide().primary is None
    t.chosen = "b"
    assert t.decide().primary == "b"
    t.chosen = None
    t.observe("b", Probe(True, 10), 2.0)  # demoted
    assert t.decide().primary == "a"


def test_lag_bounds() -> None:
    t = topo(max_lag_bytes=50, max_lag_seconds=2.0)
    t.observe("a", Probe(False, 1000), 1.0)
    t.observe("b", Probe(True, 900), 1.0)  # 100 bytes behind
    t.observe("c", Probe(True, 990, lag_seconds=3.0), 1.0)  # 3 s behind
    s = t.decide()
    assert s.replicas == () and s.state_of("b") == LAGGING and s.state_of("c") == LAGGING
    t.observe("b", Probe(True, 1000), 2.0)
    t.observe("c", Probe(True, 1000), 2.0)
    assert t.decide().replicas == ("b", "c")


def test_one_server_is_always_where_writes_go() -> None:
    t = Topology(("only",), "only")
    t.observe("only", Probe(True, 5), 1.0)  # a standby alone: still served
    assert t.decide().primary == "only"
    t.observe("only", None, 2.0)
    assert t.decide().primary == "only"  # connecting then fails as without health checks


def test_pick_replica() -> None:
    t = topo()
    t.observe("a", Probe(False, 100), 1.0)
    t.observe("b", Probe(True, 50), 1.0)
    t.observe("c", Probe(True, 100), 1.0)
    s = t.decide()
    assert [pick_replica(s, 0, {}, turn, False) for turn in range(4)] == ["b", "c", "b", "c"]
    assert pick_replica(s, 60, {}, 0, False) == "c"  # only c replayed position 60
    assert pick_replica(s, 101, {}, 0, False) is None  # none: the primary
    assert pick_replica(s, 0, {"b": 3, "c": 1}, 0, True) == "c"  # least busy
    assert pick_replica(s, 0, {"b": 1, "c": 1}, 1, True) == "c"  # a tie: in turn
    assert pick_replica(configured_snapshot("a"), 0, {}, 0, False) is None


def test_states_names() -> None:
    t = topo()
    t.observe("a", Probe(False, 1), 1.0)
    assert t.servers["a"].state == PRIMARY
    assert t.servers["b"].view()["state"] == "unknown"


def test_record_end_takes_back_a_page_header() -> None:
    from pgcorral.supervisor.health import _size, record_end

    seg, block = 16 << 20, 8192
    assert record_end(3 * seg + 40, seg, block) == 3 * seg  # after a segment's long header
    assert record_end(3 * seg + 5 * block + 24, seg, block) == 3 * seg + 5 * block
    assert record_end(3 * seg + 5 * block + 200, seg, block) == 3 * seg + 5 * block + 200
    assert _size("16MB", 0) == seg and _size("8192", 0) == 8192 and _size("x", 7) == 7
