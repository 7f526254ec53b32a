"""The key table, MainConfig/ServerConfig and docs/CONFIGURATION.md agree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pgcorral.config import KEYS, MainConfig, ServerConfig
from pgcorral.config.keys import TYPES, render_reference_markdown

ROOT = Path(__file__).resolve().parents[2]

_PGAGROAL_MAIN_KEYS = """
host port unix_socket_dir metrics metrics_cache_max_age metrics_cache_max_size
metrics_cert_file metrics_key_file metrics_ca_file management console log_type log_level log_path
log_rotation_age log_rotation_size log_line_prefix log_mode log_connections log_disconnections
blocking_timeout connection_retry_delay idle_timeout max_connection_age validation
background_interval max_retries max_connections allow_unknown_users authentication_timeout
pipeline auth_query failover failover_script failover_notify_script tls tls_cert_file tls_key_file
tls_ca_file ev_backend keep_alive nodelay backlog hugepage tracker track_prepared_statements
server_reset_query server_reset_query_always server_reset_query_behavior_on_failure pidfile
update_process_title rotate_frontend_password_timeout rotate_frontend_password_length
health_check health_check_period health_check_timeout health_check_user startup_validation
flush_timeout disconnect_client disconnect_client_force
"""
PGAGROAL_MAIN_KEYS = _PGAGROAL_MAIN_KEYS.split()

OURS = ["max_packet_size", "max_prepared_statements", "pin_timeout", "max_pinned_connections",
        "query_timeout", "idle_transaction_timeout", "transaction_timeout",
        "workers", "server_connect_timeout", "so_reuseport", "max_client_conn",
        "admin_users", "stats_users", "tls_crl_file", "tls_min_protocol_version",
        "tls_max_protocol_version", "tls_ciphers", "metrics_client_groups",
        "max_replica_lag", "max_replica_lag_bytes", "replica_balance", "read_only_suffix",
        "read_your_writes"]


def _main_keys() -> dict[str, object]:
    return {k.name: k for k in KEYS if k.section == "main"}


def test_main_config_fields_match_key_table() -> None:
    fields = {f.name: f for f in dataclasses.fields(MainConfig)}
    keys = {k.name: k for k in KEYS if k.section == "main"}
    assert list(fields) == list(keys)
    for name, key in keys.items():
        if not key.required:
            assert fields[name].default == key.default, name


def test_server_config_fields_match_key_table() -> None:
    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    keys = {k.name: k for k in KEYS if k.section == "server"}
    assert list(fields) == ["name", *keys]
    for name, key in keys.items():
        if not key.required:
            assert fields[name].default == key.default, name


def test_every_pgagroal_key_and_ours_present() -> None:
    names = set(_main_keys())
    assert set(PGAGROAL_MAIN_KEYS) <= names
    assert set(OURS) <= names
    assert names - set(PGAGROAL_MAIN_KEYS) == set(OURS)


def test_ours_are_documented_as_ours() -> None:
    for key in KEYS:
        assert key.doc.startswith("pgcorral only") == (key.name in OURS), key.name


def test_key_table_is_well_formed() -> None:
    seen = set()
    for key in KEYS:
        assert key.type in TYPES
        assert key.section in ("main", "server")
        assert (key.type == "enum") == (key.choices is not None)
        if key.choices is not None:
            assert key.default in key.choices
        assert key.doc
        assert (key.section, key.name) not in seen
        seen.add((key.section, key.name))


def test_configuration_doc_is_up_to_date() -> None:
    doc = (ROOT / "docs" / "CONFIGURATION.md").read_text(encoding="utf-8")
    assert doc == render_reference_markdown(), (
        "docs/CONFIGURATION.md is stale: run PYTHONPATH=src python devtools/gen_config_doc.py")


def test_reference_lists_every_key() -> None:
    doc = render_reference_markdown()
    for key in KEYS:
        assert f"| `{key.name}` |" in doc
