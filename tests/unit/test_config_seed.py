"""The seed's pgagroal.conf, pgagroal_hba.conf and databases.conf load unchanged."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from pgcorral.config import Config, LimitRule, ServerConfig, best_limit_rule, load_config
from pgcorral.security.hba import match_hba

SEED_CONF = """[pgagroal]

host = *

port = 2345

log_type = file

log_level = info

log_path = /tmp/pgagroal.log

max_connections = 100
idle_timeout = 600
validation = off
unix_socket_dir = /tmp/.s.pgagroal

[primary]
host = localhost

port = 5432
"""

SEED_HBA = """#\t\t\t\t
# TYPE\tDATABASE\tUSER\tADDRESS\tMETHOD
#\t\t\t\t
host\tall\tall\tall\tall
"""

SEED_DATABASES = """#\t\t\t
# DATABASE\tUSER\tMAX_CONNECTIONS\tINITIAL_SIZE
#\t\t\t
db1\talice\t10\t5
db2\twatson\t19\t11
all\tall\tall\t
"""


@pytest.fixture
def seed(tmp_path: Path) -> Config:
    conf = tmp_path / "pgagroal.conf"
    hba = tmp_path / "pgagroal_hba.conf"
    dbs = tmp_path / "pgagroal_databases.conf"
    conf.write_text(SEED_CONF)
    hba.write_text(SEED_HBA)
    dbs.write_text(SEED_DATABASES)
    return load_config(str(conf), str(hba), str(dbs))


def test_seed_main(seed: Config) -> None:
    main = seed.main
    assert (main.host, main.port) == ("*", 2345)
    assert main.log_type == "file"
    assert main.log_level == "info"
    assert main.log_path == "/tmp/pgagroal.log"
    assert main.max_connections == 100
    assert main.idle_timeout == 600.0
    assert main.validation == "off"
    assert main.unix_socket_dir == "/tmp/.s.pgagroal"
    assert main.pipeline == "auto"
    assert main.blocking_timeout == 30.0
    assert main.server_reset_query == "DISCARD ALL"
    assert main.backlog == 128  # max(max_connections / 4, 128)
    assert main.pidfile == "/tmp/.s.pgagroal/pgcorral.2345.pid"
    assert seed.warnings == ()


def test_seed_servers(seed: Config) -> None:
    assert seed.servers == (ServerConfig(name="primary", host="localhost", port=5432),)


def test_seed_hba(seed: Config) -> None:
    assert len(seed.hba) == 1
    rule = seed.hba[0]
    assert (rule.line, rule.type, rule.database, rule.user, rule.address, rule.method) == (
        4, "host", "all", "all", "all", "all")
    assert rule.network is None
    assert match_hba(seed.hba, conn_type="host", database="db1", user="alice",
                     address="10.1.2.3") is rule


def test_seed_limits(seed: Config) -> None:
    assert seed.limits == (
        LimitRule(line=4, database="db1", aliases=(), user="alice", max_size=10,
                  initial_size=5, min_size=0),
        LimitRule(line=5, database="db2", aliases=(), user="watson", max_size=19,
                  initial_size=11, min_size=0),
        LimitRule(line=6, database="all", aliases=(), user="all", max_size=71,
                  initial_size=0, min_size=0),
    )
    assert best_limit_rule(seed.limits, "db1", "alice") is seed.limits[0]
    assert best_limit_rule(seed.limits, "db1", "bob") is seed.limits[2]


def test_seed_paths(seed: Config, tmp_path: Path) -> None:
    assert seed.config_path == str(tmp_path / "pgagroal.conf")
    assert seed.hba_path == str(tmp_path / "pgagroal_hba.conf")
    assert seed.limits_path == str(tmp_path / "pgagroal_databases.conf")


def test_hba_network_is_typed(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(SEED_CONF)
    hba = tmp_path / "hba"
    hba.write_text("host db u 10.0.0.0/8 trust\n")
    rule = load_config(str(conf), str(hba)).hba[0]
    assert rule.network == ipaddress.ip_network("10.0.0.0/8")
