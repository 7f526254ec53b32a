"""contrib/grafana/pgcorral.json names only metrics pgcorral exports.

Every panel's PromQL ``expr`` is tokenized (strings, selectors, ranges, grouping clauses and
Grafana variables removed; identifiers called as functions and PromQL keywords dropped) and
every metric name left must be one the collector emits for a complete snapshot
(tests/unit/metricshelpers.py), histogram suffixes allowed. No server needed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.unit.metricshelpers import complete_stats

from pgcorral.management.metrics import render

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "pgcorral.json"

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless", "inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_SELECTOR = re.compile(r"\{[^}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = _STRING.sub(" ", expr)
    text = _RANGE.sub(" ", text)
    text = _SELECTOR.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _VARIABLE.sub(" 1 ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(name)
    return names


def test_the_tokenizer() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le, "x") (rate(a_b_bucket{le="1", '
                        'user=~"$user"}[$__rate_interval])))') == {"a_b_bucket"}
    assert metric_names("sum(x_total) / on (db) group_left (user) y offset 5m > bool 1") == {
        "x_total", "y"}
    assert metric_names("topk($topn, sum without (instance) (rate(z[5m])))") == {"z"}
    assert metric_names("max(up) or vector(0)") == {"up"}
    assert metric_names('count({__name__=~"pg.*"}) unless absent(w)') == {"w"}


def exported() -> tuple[set[str], set[str]]:
    """(every sample name, histogram family names) the collector emits."""
    body = render(complete_stats(), None, {"info": 1, "warn": 0, "error": 0, "fatal": 0})
    samples: set[str] = set()
    histograms: set[str] = set()
    for family in text_string_to_metric_families(body.decode()):
        samples.update(s.name for s in family.samples)
        if family.type == "histogram":
            histograms.add(family.name)
    return samples, histograms


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


def unknown(names: set[str], samples: set[str], histograms: set[str]) -> set[str]:
    bad = set()
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in samples and base not in histograms:
            bad.add(name)
    return bad


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def test_every_query_names_an_exported_metric(dashboard: dict[str, Any]) -> None:
    samples, histograms = exported()
    queries = exprs(dashboard)
    assert len(queries) >= 20
    seen = set()
    for title, expr in queries:
        names = metric_names(expr)
        assert names, (title, expr)
        assert not unknown(names, samples, histograms), (title, expr)
        seen |= names
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            (name,) = re.findall(r"label_values\((\w+)\s*,", variable["definition"])
            assert name in samples, variable
    # what the issue asks the dashboard to show
    for wanted in ("pgcorral_pool_clients", "pgcorral_pool_transactions_total",
                   "pgcorral_pool_transaction_seconds_bucket", "pgcorral_pool_query_seconds_bucket",
                   "pgcorral_pool_wait_seconds_bucket", "pgcorral_pool_errors_total",
                   "pgcorral_logins_total", "pgcorral_client_group_transactions_total",
                   "pgcorral_pool_received_bytes_total", "pgcorral_pool_sent_bytes_total"):
        assert wanted in seen, wanted


def test_a_made_up_metric_is_caught() -> None:
    samples, histograms = exported()
    assert unknown(metric_names("rate(pgcorral_pool_transactions_total[1m])"), samples,
                   histograms) == set()
    assert unknown(metric_names("rate(pgcorral_pool_transaction_total[1m])"), samples,
                   histograms) == {"pgcorral_pool_transaction_total"}
    assert unknown(metric_names("pgcorral_pool_clients_bucket"), samples, histograms) == {
        "pgcorral_pool_clients_bucket"}


def test_every_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
