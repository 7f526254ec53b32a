"""The metrics collector over a snapshot, without a server: every declared family comes out
with its type and labels, values computed from the snapshot, histograms well formed, the
client-group bound, escaping, the up=0 body, the index page."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tests.unit.metricshelpers import complete_stats

from pgcorral.config.model import Config, LimitRule, MainConfig
from pgcorral.management.metrics import FAMILIES, index_page, render, top_groups
from pgcorral.pool.stats import BUCKETS_US, LOGIN_OUTCOMES

LOGS = {"info": 4, "warn": 3, "error": 2, "fatal": 1}


def parse(body: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def config(groups: int = 100) -> Config:
    main = MainConfig(host="127.0.0.1", port=6432, metrics_client_groups=groups)
    rule = LimitRule(line=1, database="pgcorral_test", aliases=(), user="alice", max_size=10,
                     initial_size=4, min_size=1)
    return Config(main=main, servers=(), hba=(), limits=(rule,), warnings=(),
                  config_path="x", hba_path=None, limits_path=None)


def samples(families: dict[str, Any], name: str) -> list[Sample]:
    family = FAMILIES[name]
    parsed = name.removesuffix("_total") if family.type == "counter" else name
    return list(families[parsed].samples)


def value(families: dict[str, Any], metric: str, **labels: str) -> float:
    found = [s.value for s in samples(families, metric)
             if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (metric, labels, found)
    return float(found[0])


@pytest.fixture
def families() -> dict[str, Any]:
    return parse(render(complete_stats(), config(), LOGS))


def test_every_declared_family_comes_out_with_its_type_and_labels(
        families: dict[str, Any]) -> None:
    expected = {}
    for name, family in FAMILIES.items():
        parsed = name.removesuffix("_total") if family.type == "counter" else name
        expected[parsed] = "unknown" if family.type == "untyped" else family.type
    assert {name: f.type for name, f in families.items()} == expected
    for name, family in FAMILIES.items():
        for sample in samples(families, name):
            assert set(sample.labels) - {"le"} == set(family.labels), (name, sample)
            if family.type == "counter":
                assert sample.name == name  # *_total
            elif family.type != "histogram":
                assert sample.name == name  # pgagroal's names stay as they are


def test_pgagroal_values_from_the_snapshot(families: dict[str, Any]) -> None:
    s = complete_stats()
    assert value(families, "pgagroal_state") == 1
    assert value(families, "pgagroal_pipeline_mode") == 1
    assert value(families, "pgagroal_tx_count") == sum(p["xact_count"] for p in s["pools"])
    assert value(families, "pgagroal_query_count") == sum(p["query_count"] for p in s["pools"])
    assert value(families, "pgagroal_failed_servers") == 1
    assert value(families, "pgagroal_server_error", name="standby", state="failed") == 0
    assert value(families, "pgagroal_server_error", name="primary", state="primary") == 0
    assert value(families, "pgagroal_wait_time") == 2.5
    assert value(families, "pgagroal_active_connections") == 3  # 2 active, 1 tested
    assert value(families, "pgagroal_total_connections") == 5
    assert value(families, "pgagroal_max_connections") == 20
    assert value(families, "pgagroal_client_sockets") == 5
    assert value(families, "pgagroal_self_sockets") == 5
    assert value(families, "pgagroal_client_wait") == 2  # waiting + login
    assert value(families, "pgagroal_client_active") == 2
    assert value(families, "pgagroal_connection_awaiting") == 4  # cl_waiting of both pools
    assert value(families, "pgagroal_limit_awaiting", user="bob", database="db2") == 2
    assert value(families, "pgagroal_auth_user_success") == 5 * 3 + 5 * 1
    assert value(families, "pgagroal_auth_user_bad_password") == 2
    assert value(families, "pgagroal_auth_user_error") == 4 + 6
    assert value(families, "pgagroal_network_sent") == sum(p["bytes_sent"] for p in s["pools"])
    assert value(families, "pgagroal_connection_flush") == 2
    assert value(families, "pgagroal_logging_warn") == 3
    # one series per server connection, id <worker>.<id>, application_name of its client
    states = {(x.labels["id"], x.labels["state"], x.labels["application_name"])
              for x in samples(families, "pgagroal_connection")}
    assert states == {("0.1", "in_use", 'we"ird\\app\nname'), ("0.2", "free", ""),
                      ("0.3", "init", ""), ("1.1", "in_use", "app"), ("1.2", "in_use", "")}
    assert value(families, "pgagroal_connection_query_count", id="0.3") == 3 * 2
    limit = {x.labels["type"]: x.value for x in samples(families, "pgagroal_limit")
             if x.labels["database"] == "pgcorral_test"}
    assert limit == {"min": 1, "initial": 4, "max": 10, "active": 2, "backend": 5}


def test_pgcorral_pool_values(families: dict[str, Any]) -> None:
    pool = {"database": "pgcorral_test", "user": "alice"}
    p = complete_stats()["pools"][0]
    assert value(families, "pgcorral_pool_transactions_total", **pool) == p["xact_count"]
    assert value(families, "pgcorral_pool_wait_time_seconds_total", **pool) == \
        p["wait_time_us"] / 1e6
    assert value(families, "pgcorral_pool_errors_total", **pool, **{"class": "42"}) == 3
    assert value(families, "pgcorral_pool_logins_total", **pool, outcome="refused") == 2
    assert value(families, "pgcorral_pool_prepared_evictions_total", **pool) == 1
    assert value(families, "pgcorral_pool_clients", **pool, state="waiting") == 2
    assert value(families, "pgcorral_pool_servers", **pool, state="tested") == 1
    assert value(families, "pgcorral_pool_maxwait_seconds", **pool) == 1.5
    assert value(families, "pgcorral_clients", state="login") == 1
    assert value(families, "pgcorral_workers") == 2
    assert value(families, "pgcorral_up") == 1
    assert value(families, "pgcorral_management_commands_total") == 3
    assert value(families, "pgcorral_server", name="standby", state="failed",
                 host="127.0.0.2", port="5432") == 1
    assert value(families, "pgcorral_logins_total", outcome="refused") == 4
    assert value(families, "pgcorral_pool_paused", **pool) == 0
    assert value(families, "pgcorral_pool_paused", database="db2", user="bob") == 1


def test_every_counter_of_the_workers_is_shown() -> None:
    from pgcorral.net.context import COUNTERS

    families = parse(render(complete_stats(), config(), LOGS))
    for name in COUNTERS:
        if name.startswith("logins_") and name.removeprefix("logins_") in LOGIN_OUTCOMES:
            assert value(families, "pgcorral_logins_total", outcome=name[7:]) >= 0
        else:
            assert samples(families, f"pgcorral_{name}_total"), name


@pytest.mark.parametrize("name,field", [("pgcorral_pool_wait_seconds", "wait"),
                                        ("pgcorral_pool_transaction_seconds", "xact"),
                                        ("pgcorral_pool_query_seconds", "query")])
def test_histograms_are_cumulative_in_seconds(families: dict[str, Any], name: str,
                                              field: str) -> None:
    for p in complete_stats()["pools"]:
        labels = {"database": p["database"], "user": p["user"]}
        mine = [x for x in families[name].samples
                if {k: v for k, v in x.labels.items() if k != "le"} == labels]
        buckets = [x for x in mine if x.name == name + "_bucket"]
        assert [x.labels["le"] for x in buckets] == [repr(b / 1e6) for b in BUCKETS_US] + [
            "+Inf"]
        counts = [x.value for x in buckets]
        assert counts == sorted(counts)
        count = next(x.value for x in mine if x.name == name + "_count")
        assert counts[-1] == count == sum(p["hist"][field])
        assert next(x.value for x in mine if x.name == name + "_sum") == \
            p["hist_sum_us"][field] / 1e6


def test_client_groups_beyond_the_bound_are_added_up_under_other() -> None:
    stats = complete_stats()
    families = parse(render(stats, config(groups=1), LOGS))
    rows = {x.labels["address"]: x.value
            for x in samples(families, "pgcorral_client_group_transactions_total")}
    assert rows == {"10.0.0.2": 500, "(other)": 50 + 5 + 7}  # the busiest, then the rest
    clients = {x.labels["address"]: x.value
               for x in samples(families, "pgcorral_client_group_clients")}
    assert clients == {"10.0.0.2": 1, "(other)": 2}
    everything = parse(render(stats, config(groups=100), LOGS))
    assert len(samples(everything, "pgcorral_client_group_transactions_total")) == 4
    # no rest and no overflow group: no (other) row
    assert [g["address"] for g in top_groups(stats["client_groups"][:2], 5)] == [
        "10.0.0.2", "127.0.0.1"]
    assert top_groups([], 0) == []


def test_no_snapshot_is_up_zero() -> None:
    families = parse(render(None, None, None))
    assert families["pgcorral_up"].samples[0].value == 0
    assert set(families) == {"pgcorral_up", "pgcorral_build_info", "pgagroal_os_info"}


def test_up_is_zero_while_a_worker_does_not_answer() -> None:
    stats = complete_stats()  # two workers answered
    assert parse(render(stats, workers=2))["pgcorral_up"].samples[0].value == 1
    families = parse(render(stats, workers=3))
    assert families["pgcorral_up"].samples[0].value == 0
    assert families["pgcorral_workers"].samples[0].value == 2


def test_a_graceful_shutdown_and_the_transaction_pipeline() -> None:
    stats = copy.deepcopy(complete_stats())
    stats.update(status="graceful shutdown", pipeline="transaction")
    families = parse(render(stats))
    assert families["pgagroal_state"].samples[0].value == 2
    assert families["pgagroal_pipeline_mode"].samples[0].value == 2


def test_index_page_lists_every_family() -> None:
    page = index_page()
    for name in FAMILIES:
        assert f"<code>{name}</code>" in page
