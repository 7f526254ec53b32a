"""The Prometheus endpoint: ``GET /metrics`` on ``metrics = PORT``, and ``GET /`` listing the
metrics with their help.

Every scrape (or every ``metrics_cache_max_age`` seconds, see ``MetricsEndpoint``) reads one
``stats`` snapshot (``net.control.stats``, all workers added up by the supervisor) and renders
it with prometheus-client's text writer through ``SnapshotCollector`` on a private registry: no
global registry, no hand-written escaping. Two sets of names:

* pgagroal's (``pgagroal_*``, ../shared/reference/pgagroal.md 7.2) wherever pgcorral has the
  data, with pgagroal's labels, so pgagroal's Grafana dashboards keep working. pgagroal
  declares some of them ``counter`` without the ``_total`` suffix; prometheus-client's writer
  and parser tie a counter to ``_total`` samples, so those are declared ``untyped`` here (same
  names and values; PromQL's ``rate`` does not look at the type).
* pgcorral's own (``pgcorral_*``), named the Prometheus way (``_total`` counters, seconds and
  bytes): per pool, per client group (at most ``metrics_client_groups`` of them, the rest under
  ``(other)``), the server sections, the process.

``FAMILIES`` declares every family once (type, labels, help): the collector emits only
declared families and ``GET /`` lists them. This module reads the snapshot and nothing else of
the pooler; it never touches a worker's state.
"""

from __future__ import annotations

import asyncio
import functools
import html
import logging
import os
import platform
import re
import ssl
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pgcorral import __version__
from pgcorral.config import Config, best_limit_rule
from pgcorral.config.model import MainConfig
from pgcorral.management.commands import Controller
from pgcorral.management.http import Request, Response, Route
from pgcorral.pool.stats import LOGIN_OUTCOMES
from pgcorral.security.tls import http_side

log = logging.getLogger("pgcorral.metrics")

#: The group every client group beyond ``metrics_client_groups`` is added to (the same key the
#: workers use for the groups beyond their own bound, pool.stats.OTHER).
OTHER_GROUP = ("(other)", "(other)", "(other)")


@dataclass(frozen=True)
class Family:
    """One metric family: ``type`` is counter, gauge, histogram or untyped."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str


_POOL = ("database", "user")
_GROUP = ("address", "application_name", "user")
_SLOT = ("id", "user", "database", "application_name")


def _families(*rows: tuple[str, str, tuple[str, ...], str]) -> dict[str, Family]:
    return {name: Family(name, kind, labels, text) for name, kind, labels, text in rows}


FAMILIES: dict[str, Family] = _families(
    # -- pgagroal's names ----------------------------------------------------------------------
    ("pgagroal_state", "gauge", (), "1 = running, 2 = graceful shutdown."),
    ("pgagroal_pipeline_mode", "gauge", (),
     "Pipeline: 0 = performance, 1 = session (and auto), 2 = transaction."),
    ("pgagroal_server_error", "untyped", ("name", "state"),
     "Errors of the server section (pgcorral does not count them per server: always 0); the "
     "state label is the section's state (primary, failed, not_init)."),
    ("pgagroal_failed_servers", "gauge", (), "Server sections in the failed state."),
    ("pgagroal_wait_time", "gauge", (),
     "Seconds the longest-waiting client has been waiting for a server connection."),
    ("pgagroal_query_count", "untyped", (), "Queries (counter)."),
    ("pgagroal_connection_query_count", "untyped", _SLOT,
     "Queries run on each server connection (counter); id is <worker>.<connection id>."),
    ("pgagroal_tx_count", "untyped", (), "Transactions (counter)."),
    ("pgagroal_active_connections", "gauge", (), "Server connections in use by a client."),
    ("pgagroal_total_connections", "gauge", (), "Server connections, opening ones included."),
    ("pgagroal_max_connections", "gauge", (), "The max_connections setting."),
    ("pgagroal_connection", "gauge", (*_SLOT, "state"),
     "1 per server connection; state is init (logging in), free (idle) or in_use."),
    ("pgagroal_limit", "gauge", ("user", "database", "type"),
     "Per pool: min, initial and max size (limit rule or max_connections), active (in use) "
     "and backend (server connections)."),
    ("pgagroal_limit_awaiting", "gauge", ("user", "database"),
     "Clients waiting for a server connection of this pool."),
    ("pgagroal_connection_awaiting", "gauge", (), "Clients waiting for a server connection."),
    ("pgagroal_auth_user_success", "untyped", (), "Client logins that succeeded (counter)."),
    ("pgagroal_auth_user_bad_password", "untyped", (),
     "Client logins refused for a wrong password (counter)."),
    ("pgagroal_auth_user_error", "untyped", (),
     "Client logins that failed otherwise: refused (hba, a full pool, shutdown, an unknown or "
     "disabled database) or an error (counter)."),
    ("pgagroal_client_wait", "gauge", (),
     "Clients logging in or waiting for a server connection."),
    ("pgagroal_client_active", "gauge", (), "Clients holding a server connection."),
    ("pgagroal_network_sent", "gauge", (),
     "Bytes sent to clients (a counter; pgagroal declares it a gauge)."),
    ("pgagroal_network_received", "gauge", (),
     "Bytes received from clients (a counter; pgagroal declares it a gauge)."),
    ("pgagroal_client_sockets", "gauge", (), "Client connections."),
    ("pgagroal_self_sockets", "gauge", (), "Server connections pgcorral opened."),
    ("pgagroal_connection_get", "untyped", (), "Server connections handed to clients (counter)."),
    ("pgagroal_connection_flush", "untyped", (),
     "Server connections closed or marked by flush (counter)."),
    ("pgagroal_os_info", "gauge", ("os", "major", "minor", "patch"), "The kernel, 1."),
    ("pgagroal_logging_info", "gauge", (),
     "Log lines at level info since the metrics endpoint started."),
    ("pgagroal_logging_warn", "gauge", (),
     "Log lines at level warning since the metrics endpoint started."),
    ("pgagroal_logging_error", "gauge", (),
     "Log lines at level error since the metrics endpoint started."),
    ("pgagroal_logging_fatal", "gauge", (),
     "Log lines at level fatal since the metrics endpoint started."),
    # -- pgcorral's own: the process -----------------------------------------------------------
    ("pgcorral_up", "gauge", (),
     "1 when every worker answered the snapshot behind this scrape, else 0."),
    ("pgcorral_build_info", "gauge", ("version", "build"),
     "1; build is mypyc (compiled hot path), pure or partial."),
    ("pgcorral_workers", "gauge", (), "Worker processes that answered the snapshot."),
    ("pgcorral_start_time_seconds", "gauge", (), "When the pooler started (epoch seconds)."),
    ("pgcorral_snapshot_timestamp_seconds", "gauge", (),
     "When the snapshot behind this body was taken (epoch seconds; older than the scrape by "
     "up to metrics_cache_max_age)."),
    ("pgcorral_max_connections", "gauge", (), "The max_connections setting."),
    ("pgcorral_server", "gauge", ("name", "host", "port", "state"),
     "1 per server section; state is primary, replica, lagging, down or unknown with "
     "health_check on (docs/HA.md), else primary, failed or not_init."),
    ("pgcorral_server_wal_position_bytes", "gauge", ("name",),
     "WAL position the last health probe read: the primary's insert position, a replica's "
     "replay position (0: not probed)."),
    ("pgcorral_clients", "gauge", ("state",),
     "Client connections by state: active, idle, waiting, login."),
    ("pgcorral_client_connections_total", "counter", (), "Client connections accepted."),
    ("pgcorral_logins_refused_disabled_total", "counter", (),
     "Logins refused because the database is disabled."),
    ("pgcorral_clients_refused_too_many_total", "counter", (),
     "Clients refused with 53300 beyond max_client_conn (or the descriptor limit)."),
    ("pgcorral_flushed_connections_total", "counter", (),
     "Server connections closed or marked by flush."),
    ("pgcorral_management_commands_total", "counter", (), "Management commands served."),
    ("pgcorral_server_connections_adopted_total", "counter", (),
     "Server connections handed over from another worker."),
    ("pgcorral_notifications_delivered_total", "counter", (),
     "Transaction pipeline: notifications delivered to LISTENing clients (one per client)."),
    ("pgcorral_notify_reconnects_total", "counter", (),
     "Transaction pipeline: listening connections opened again after they broke."),
    ("pgcorral_notify_maybe_missed_total", "counter", (),
     "Transaction pipeline: channels (one per broken listening connection) whose "
     "notifications may have been lost."),
    ("pgcorral_logins_total", "counter", ("outcome",),
     "Client logins by outcome (success, bad_password, refused, error), all pools and the "
     "logins that named no pool."),
    # -- per pool (database, user) -------------------------------------------------------------
    ("pgcorral_pool_clients", "gauge", (*_POOL, "state"),
     "Clients of the pool by state: active, idle, waiting, login."),
    ("pgcorral_pool_servers", "gauge", (*_POOL, "state"),
     "Server connections of the pool by state: active, idle, used, tested, login."),
    ("pgcorral_pool_paused", "gauge", _POOL, "1 while the pool's database is paused."),
    ("pgcorral_pool_pinned_clients", "gauge", _POOL,
     "Transaction pipeline: clients pinned to a server connection by their session state."),
    ("pgcorral_pool_size", "gauge", _POOL,
     "Most server connections the pool may have (limit rule, else max_connections)."),
    ("pgcorral_pool_maxwait_seconds", "gauge", _POOL,
     "How long the pool's longest-waiting client has waited so far."),
    ("pgcorral_pool_transactions_total", "counter", _POOL, "Transactions."),
    ("pgcorral_pool_queries_total", "counter", _POOL, "Queries."),
    ("pgcorral_pool_received_bytes_total", "counter", _POOL, "Bytes received from clients."),
    ("pgcorral_pool_sent_bytes_total", "counter", _POOL, "Bytes sent to clients."),
    ("pgcorral_pool_server_requests_total", "counter", _POOL,
     "Server connections asked for (each wait, a wait of 0 included)."),
    ("pgcorral_pool_wait_time_seconds_total", "counter", _POOL,
     "Time clients waited for a server connection."),
    ("pgcorral_pool_hold_time_seconds_total", "counter", _POOL,
     "Time clients held a server connection."),
    ("pgcorral_pool_transaction_time_seconds_total", "counter", _POOL,
     "Time spent in transactions."),
    ("pgcorral_pool_query_time_seconds_total", "counter", _POOL, "Time spent in queries."),
    ("pgcorral_pool_errors_total", "counter", (*_POOL, "class"),
     "Errors sent to clients by SQLSTATE class (the first two characters)."),
    ("pgcorral_pool_logins_total", "counter", (*_POOL, "outcome"),
     "Client logins by outcome: success, bad_password, refused, error."),
    ("pgcorral_pool_prepared_hits_total", "counter", _POOL,
     "Prepared statements found already prepared on the server connection."),
    ("pgcorral_pool_prepared_misses_total", "counter", _POOL,
     "Prepared statements prepared on the server connection first."),
    ("pgcorral_pool_prepared_evictions_total", "counter", _POOL,
     "Prepared statements closed to make room (max_prepared_statements)."),
    ("pgcorral_pool_wait_seconds", "histogram", _POOL,
     "Time each client request waited for a server connection."),
    ("pgcorral_pool_transaction_seconds", "histogram", _POOL, "Transaction durations."),
    ("pgcorral_pool_query_seconds", "histogram", _POOL, "Query durations."),
    # -- per client group (address, application_name, user) ------------------------------------
    ("pgcorral_client_group_clients", "gauge", _GROUP, "Clients of the group connected now."),
    ("pgcorral_client_group_connections_total", "counter", _GROUP,
     "Clients of the group seen (connected now or gone)."),
    ("pgcorral_client_group_transactions_total", "counter", _GROUP, "Transactions."),
    ("pgcorral_client_group_queries_total", "counter", _GROUP, "Queries."),
    ("pgcorral_client_group_wait_time_seconds_total", "counter", _GROUP,
     "Time the group's clients waited for a server connection."),
    ("pgcorral_client_group_hold_time_seconds_total", "counter", _GROUP,
     "Time the group's clients held a server connection."),
)

#: stats "counters" shown as pgcorral_<name>_total (the logins_* ones: pgcorral_logins_total)
_GLOBAL_COUNTERS = ("client_connections", "logins_refused_disabled", "flushed_connections",
                    "management_commands", "server_connections_adopted",
                    "clients_refused_too_many", "notifications_delivered",
                    "notify_reconnects", "notify_maybe_missed")
_PIPELINE_MODE = {"performance": 0, "session": 1, "auto": 1, "transaction": 2}
_SLOT_STATE = {"login": "init", "idle": "free"}  # others: in_use
_SECTION_STATE = {"notinit": "not_init"}
_CLIENT_STATES = ("active", "idle", "waiting", "login")
_SERVER_STATES = ("active", "idle", "used", "tested", "login")
_HISTOGRAMS = (("wait", "pgcorral_pool_wait_seconds"),
               ("xact", "pgcorral_pool_transaction_seconds"),
               ("query", "pgcorral_pool_query_seconds"))
_POOL_COUNTERS = (("xact_count", "pgcorral_pool_transactions_total", 1),
                  ("query_count", "pgcorral_pool_queries_total", 1),
                  ("bytes_received", "pgcorral_pool_received_bytes_total", 1),
                  ("bytes_sent", "pgcorral_pool_sent_bytes_total", 1),
                  ("wait_count", "pgcorral_pool_server_requests_total", 1),
                  ("wait_time_us", "pgcorral_pool_wait_time_seconds_total", 1e-6),
                  ("hold_time_us", "pgcorral_pool_hold_time_seconds_total", 1e-6),
                  ("xact_time_us", "pgcorral_pool_transaction_time_seconds_total", 1e-6),
                  ("query_time_us", "pgcorral_pool_query_time_seconds_total", 1e-6))
_GROUP_COUNTERS = (("clients_total", "pgcorral_client_group_connections_total", 1),
                   ("xact_count", "pgcorral_client_group_transactions_total", 1),
                   ("query_count", "pgcorral_client_group_queries_total", 1),
                   ("wait_time_us", "pgcorral_client_group_wait_time_seconds_total", 1e-6),
                   ("hold_time_us", "pgcorral_client_group_hold_time_seconds_total", 1e-6))


class LogCounter(logging.Handler):
    """Counts the log lines of every ``pgcorral.*`` logger in this process. It runs in the
    process that serves management, which with several workers is the supervisor: the workers'
    records are handled again there (``supervisor.multi``), so the counts are the whole
    pooler's lines at or above ``log_level``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts = {"info": 0, "warn": 0, "error": 0, "fatal": 0}

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelno
        name = ("fatal" if level >= logging.CRITICAL else "error" if level >= logging.ERROR
                else "warn" if level >= logging.WARNING else "info")
        self.counts[name] += 1


LOG_COUNTER = LogCounter()


def count_log_lines() -> None:
    """Start counting (idempotent): attach ``LOG_COUNTER`` to the ``pgcorral`` logger."""
    logger = logging.getLogger("pgcorral")
    if LOG_COUNTER not in logger.handlers:
        logger.addHandler(LOG_COUNTER)


@functools.cache
def _build_label() -> str:
    from pgcorral.build import info

    build = info()
    return "pure" if not build.compiled else "partial" if build.pure else "mypyc"


def _os_info() -> tuple[str, str, str, str]:
    release = re.findall(r"\d+", platform.release())[:3]
    release += ["0"] * (3 - len(release))
    return platform.system(), release[0], release[1], release[2]


class _Out:
    """The families of one snapshot as prometheus-client ``Metric`` objects, in FAMILIES
    order, each made when its first sample comes."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def _metric(self, name: str) -> Metric:
        metric = self.metrics.get(name)
        if metric is None:
            family = FAMILIES[name]
            base = name.removesuffix("_total") if family.type == "counter" else name
            kind = "unknown" if family.type == "untyped" else family.type
            metric = self.metrics[name] = Metric(base, family.help, kind)
        return metric

    def add(self, name: str, value: float, *labels: object) -> None:
        family = FAMILIES[name]
        assert len(labels) == len(family.labels), name
        self._metric(name).add_sample(name, dict(zip(family.labels, map(str, labels),
                                                     strict=True)), float(value))

    def histogram(self, name: str, bounds_us: list[int], counts: list[int], sum_us: int,
                  *labels: object) -> None:
        family = FAMILIES[name]
        metric = self._metric(name)
        base = dict(zip(family.labels, map(str, labels), strict=True))
        cumulative = 0
        for i, n in enumerate(counts):
            cumulative += n
            le = repr(bounds_us[i] / 1e6) if i < len(bounds_us) else "+Inf"
            metric.add_sample(name + "_bucket", {**base, "le": le}, float(cumulative))
        metric.add_sample(name + "_count", base, float(cumulative))
        metric.add_sample(name + "_sum", base, sum_us / 1e6)

    def ordered(self) -> Iterator[Metric]:
        for name in FAMILIES:
            metric = self.metrics.get(name)
            if metric is not None:
                yield metric


class SnapshotCollector(Collector):
    """A collector over one ``stats`` snapshot (None: the snapshot could not be taken; then
    only ``pgcorral_up 0`` and the process facts). ``config``: limit rules for
    ``pgagroal_limit{type="initial"}``, ``metrics_client_groups``. ``workers``: how many
    workers should have answered."""

    def __init__(self, stats: dict[str, Any] | None, config: Config | None = None,
                 log_counts: dict[str, int] | None = None, workers: int = 0) -> None:
        self.stats = stats
        self.config = config
        self.log_counts = log_counts
        self.workers = workers  # how many should have answered (0: do not check)

    def collect(self) -> Iterator[Metric]:
        out = _Out()
        s = self.stats
        answered = len(s.get("workers") or [s]) if s is not None else 0
        out.add("pgcorral_up", 1 if s is not None and answered >= self.workers else 0)
        out.add("pgcorral_build_info", 1, __version__, _build_label())
        out.add("pgagroal_os_info", 1, *_os_info())
        if self.log_counts is not None:
            for level, n in self.log_counts.items():
                out.add(f"pgagroal_logging_{level}", n)
        if s is not None:
            self._process(out, s)
            self._pgagroal(out, s)
            self._pools(out, s)
            self._groups(out, s.get("client_groups", []))
        yield from out.ordered()

    # --- the parts ---------------------------------------------------------------------------

    def _process(self, out: _Out, s: dict[str, Any]) -> None:
        out.add("pgcorral_workers", len(s.get("workers") or [s]))
        out.add("pgcorral_start_time_seconds", s["started"])
        out.add("pgcorral_snapshot_timestamp_seconds", s["time"])
        out.add("pgcorral_max_connections", s["max_connections"])
        for section in s.get("server_sections", []):
            out.add("pgcorral_server", 1, section["name"], section["host"], section["port"],
                    _SECTION_STATE.get(section["state"], section["state"]))
            out.add("pgcorral_server_wal_position_bytes", section.get("lsn", 0),
                    section["name"])
        states = dict.fromkeys(_CLIENT_STATES, 0)
        for client in s["clients"]:
            states[client["state"]] = states.get(client["state"], 0) + 1
        for state, n in states.items():
            out.add("pgcorral_clients", n, state)
        counters = s.get("counters", {})
        for name in _GLOBAL_COUNTERS:
            out.add(f"pgcorral_{name}_total", counters.get(name, 0))
        for outcome, n in _logins(s).items():
            out.add("pgcorral_logins_total", n, outcome)

    def _pgagroal(self, out: _Out, s: dict[str, Any]) -> None:
        pools, clients, servers = s["pools"], s["clients"], s["servers"]
        out.add("pgagroal_state", 1 if s["status"] == "running" else 2)
        out.add("pgagroal_pipeline_mode", _PIPELINE_MODE.get(s.get("pipeline", ""), 1))
        sections = s.get("server_sections", [])
        for section in sections:
            out.add("pgagroal_server_error", section.get("errors", 0), section["name"],
                    _SECTION_STATE.get(section["state"], section["state"]))
        out.add("pgagroal_failed_servers", sum(x["state"] == "failed" for x in sections))
        out.add("pgagroal_wait_time", max((c["wait_current_us"] for c in clients), default=0)
                / 1e6)
        out.add("pgagroal_query_count", sum(p["query_count"] for p in pools))
        out.add("pgagroal_tx_count", sum(p["xact_count"] for p in pools))
        # the application_name of the client each server connection serves
        app = {(c["worker"], c["server_id"]): c["application_name"] for c in clients
               if c["server_id"]}
        for sv in servers:
            slot = (f"{sv['worker']}.{sv['id']}", sv["user"], sv["database"],
                    app.get((sv["worker"], sv["id"]), ""))
            out.add("pgagroal_connection_query_count", sv["query_count"], *slot)
            out.add("pgagroal_connection", 1, *slot, _SLOT_STATE.get(sv["state"], "in_use"))
        out.add("pgagroal_active_connections",
                sum(sv["state"] not in ("idle", "login") for sv in servers))
        out.add("pgagroal_total_connections", len(servers))
        out.add("pgagroal_max_connections", s["max_connections"])
        limits = self.config.limits if self.config is not None else ()
        for p in pools:
            rule = best_limit_rule(limits, p["database"], p["user"]) if limits else None
            backend = sum(p["sv_" + state] for state in _SERVER_STATES)
            for kind, value in (("min", p["min_pool_size"]),
                                ("initial", rule.initial_size if rule is not None else 0),
                                ("max", p["pool_size"]),
                                ("active", backend - p["sv_idle"] - p["sv_login"]),
                                ("backend", backend)):
                out.add("pgagroal_limit", value, p["user"], p["database"], kind)
            out.add("pgagroal_limit_awaiting", p["cl_waiting"], p["user"], p["database"])
        out.add("pgagroal_connection_awaiting", sum(p["cl_waiting"] for p in pools))
        logins = _logins(s)
        out.add("pgagroal_auth_user_success", logins["success"])
        out.add("pgagroal_auth_user_bad_password", logins["bad_password"])
        out.add("pgagroal_auth_user_error", logins["error"] + logins["refused"])
        out.add("pgagroal_client_wait", sum(c["state"] in ("waiting", "login") for c in clients))
        out.add("pgagroal_client_active", sum(c["state"] == "active" for c in clients))
        out.add("pgagroal_network_sent", sum(p["bytes_sent"] for p in pools))
        out.add("pgagroal_network_received", sum(p["bytes_received"] for p in pools))
        out.add("pgagroal_client_sockets", len(clients))
        out.add("pgagroal_self_sockets", len(servers))
        out.add("pgagroal_connection_get", sum(p["wait_count"] for p in pools))
        out.add("pgagroal_connection_flush", s.get("counters", {}).get("flushed_connections", 0))

    def _pools(self, out: _Out, s: dict[str, Any]) -> None:
        bounds = list(s.get("buckets_us", []))
        for p in s["pools"]:
            key = (p["database"], p["user"])
            for state in _CLIENT_STATES:
                out.add("pgcorral_pool_clients", p["cl_" + state], *key, state)
            for state in _SERVER_STATES:
                out.add("pgcorral_pool_servers", p["sv_" + state], *key, state)
            out.add("pgcorral_pool_paused", 1 if p.get("paused") else 0, *key)
            out.add("pgcorral_pool_pinned_clients", p.get("cl_pinned", 0), *key)
            out.add("pgcorral_pool_size", p["pool_size"], *key)
            out.add("pgcorral_pool_maxwait_seconds", p["maxwait_us"] / 1e6, *key)
            for field, name, scale in _POOL_COUNTERS:
                out.add(name, p[field] * scale, *key)
            for cls, n in sorted(p["errors"].items()):
                out.add("pgcorral_pool_errors_total", n, *key, cls)
            for outcome, n in sorted(p["logins"].items()):
                out.add("pgcorral_pool_logins_total", n, *key, outcome)
            prepared = p["prepared"]
            out.add("pgcorral_pool_prepared_hits_total", prepared["hits"], *key)
            out.add("pgcorral_pool_prepared_misses_total", prepared["misses"], *key)
            out.add("pgcorral_pool_prepared_evictions_total", prepared["evictions"], *key)
            for field, name in _HISTOGRAMS:
                out.histogram(name, bounds, p["hist"][field], p["hist_sum_us"][field], *key)

    def _groups(self, out: _Out, groups: list[dict[str, Any]]) -> None:
        limit = self.config.main.metrics_client_groups if self.config is not None else 100
        for g in top_groups(groups, limit):
            key = (g["address"], g["application_name"], g["user"])
            out.add("pgcorral_client_group_clients", g["clients"], *key)
            for field, name, scale in _GROUP_COUNTERS:
                out.add(name, g[field] * scale, *key)


def _logins(s: dict[str, Any]) -> dict[str, int]:
    """Logins by outcome: the pooler's counters (they include logins naming no pool)."""
    counters = s.get("counters", {})
    return {k: counters.get("logins_" + k, 0) for k in LOGIN_OUTCOMES}


def top_groups(groups: Iterable[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The ``limit`` groups with the most transactions (ties by key), then one ``(other)``
    group adding up the rest (and the workers' own overflow group), when there is a rest."""
    ranked: list[dict[str, Any]] = []
    other: dict[str, Any] | None = None
    for g in groups:
        if (g["address"], g["application_name"], g["user"]) == OTHER_GROUP:
            other = dict(g)
        else:
            ranked.append(g)
    ranked.sort(key=lambda g: (-g["xact_count"], g["address"], g["application_name"],
                               g["user"]))
    kept, rest = ranked[:limit], ranked[limit:]
    for g in rest:
        if other is None:
            other = {**dict(g), "address": OTHER_GROUP[0], "application_name": OTHER_GROUP[1],
                     "user": OTHER_GROUP[2]}
            continue
        for name, value in g.items():
            if isinstance(value, int) and not isinstance(value, bool):
                other[name] = other.get(name, 0) + value
    return kept + ([other] if other is not None else [])


def render(stats: dict[str, Any] | None, config: Config | None = None,
           log_counts: dict[str, int] | None = None, workers: int = 0) -> bytes:
    """The text exposition (format 0.0.4) of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(stats, config, log_counts, workers))
    return generate_latest(registry)


def expected_workers(main: MainConfig) -> int:
    """The workers the pooler runs (as ``supervisor.main.run`` decides)."""
    return main.workers or len(os.sched_getaffinity(0))


class MetricsEndpoint:
    """``GET /metrics``: one snapshot per scrape, or the body rendered less than
    ``metrics_cache_max_age`` ago when that is set and the body was at most
    ``metrics_cache_max_size`` bytes. Concurrent scrapes share one snapshot in the making."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._body: bytes | None = None
        self._built_at = 0.0
        self._building: asyncio.Future[bytes] | None = None

    async def body(self) -> bytes:
        main = self.controller.config.main
        body = self._body
        if body is not None and main.metrics_cache_max_age > 0 and \
                time.monotonic() - self._built_at < main.metrics_cache_max_age:
            return body
        building = self._building
        if building is None:
            building = self._building = asyncio.ensure_future(self._build())
        try:
            return await asyncio.shield(building)
        finally:
            if building.done() and self._building is building:
                self._building = None

    async def _build(self) -> bytes:
        started = time.monotonic()
        try:
            stats: dict[str, Any] | None = dict(await self.controller.call("stats"))
        except Exception as exc:  # no snapshot: pgcorral_up 0
            log.warning("metrics: no snapshot: %s", exc or type(exc).__name__)
            stats = None
        if stats is not None and "pools" not in stats:  # no worker answered
            stats = None
        config = self.controller.config
        body = render(stats, config, dict(LOG_COUNTER.counts), expected_workers(config.main))
        main = config.main
        if b"\npgcorral_up 1.0\n" in body and main.metrics_cache_max_age > 0 and \
                len(body) <= main.metrics_cache_max_size:
            self._body, self._built_at = body, started
        else:
            self._body = None
        return body

    async def metrics(self, request: Request) -> Response:
        return Response(200, await self.body(), CONTENT_TYPE_PLAIN_0_0_4)

    async def index(self, request: Request) -> Response:
        return Response(200, index_page().encode(), "text/html; charset=utf-8")


def index_page() -> str:
    """``GET /``: every family with its type, labels and help (as pgagroal's)."""
    rows = "".join(
        f"<tr><td><code>{html.escape(f.name)}</code></td><td>{f.type}</td>"
        f"<td>{html.escape(', '.join(f.labels))}</td><td>{html.escape(f.help)}</td></tr>\n"
        for f in FAMILIES.values())
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>pgcorral metrics"
            "</title></head><body>\n<h1>pgcorral metrics</h1>\n<p>Prometheus text exposition "
            f"at <a href=\"/metrics\">/metrics</a> (pgcorral {html.escape(__version__)}).</p>\n"
            "<table border=\"1\" cellpadding=\"3\">\n<tr><th>metric</th><th>type</th>"
            f"<th>labels</th><th>help</th></tr>\n{rows}</table>\n</body></html>\n")


def tls_context(main: MainConfig) -> ssl.SSLContext | None:
    """HTTPS for the metrics and console ports when ``metrics_cert_file`` and
    ``metrics_key_file`` are set (``security.tls.http_side``; at startup ``config.load`` has
    already reported a file that does not load)."""
    return http_side(main)


def routes(controller: Controller) -> dict[str, Route]:
    count_log_lines()
    endpoint = MetricsEndpoint(controller)
    return {"/metrics": endpoint.metrics, "/": endpoint.index}


__all__ = ["FAMILIES", "LOG_COUNTER", "Family", "MetricsEndpoint", "SnapshotCollector",
           "count_log_lines", "index_page", "render", "routes", "tls_context", "top_groups"]
