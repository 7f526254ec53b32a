"""The health checker's round interval: ``health_check_period``, and FAILOVER_PERIOD while no
server is primary, so that a promotion is seen soon after it happens."""

from __future__ import annotations

from pathlib import Path

from pgcorral.config import Config, load_config
from pgcorral.pool.topology import Snapshot
from pgcorral.security.secrets import Secrets
from pgcorral.supervisor.health import FAILOVER_PERIOD, HealthChecker


def _config(tmp_path: Path, servers: int, period: str = "5s") -> Config:
    conf = tmp_path / "pgcorral.conf"
    text = ("[pgcorral]\nhost = 127.0.0.1\nport = 6432\nhealth_check = on\n"
            f"health_check_period = {period}\nhealth_check_user = health\n")
    for i in range(servers):
        text += f"\n[server{i}]\nhost = 127.0.0.1\nport = {5432 + i}\n"
    conf.write_text(text)
    hba = tmp_path / "hba.conf"
    hba.write_text("host all all all trust\n")
    return load_config(str(conf), str(hba))


def _checker(config: Config, snapshot: Snapshot | None) -> HealthChecker:
    checker = HealthChecker(config, Secrets(), lambda _: None, lambda: None)
    checker.snapshot = snapshot
    return checker


def test_the_configured_period_while_there_is_a_primary(tmp_path: Path) -> None:
    config = _config(tmp_path, 2)
    assert _checker(config, None).period() == 5.0  # before the first round
    assert _checker(config, Snapshot(primary="server0")).period() == 5.0


def test_faster_while_there_is_no_primary(tmp_path: Path) -> None:
    config = _config(tmp_path, 2)
    down = Snapshot(primary=None, refusal="no primary server: server0 is down")
    assert _checker(config, down).period() == FAILOVER_PERIOD
    short = _config(tmp_path, 2, period="100ms")
    assert _checker(short, down).period() == 0.1  # never slower than configured


def test_one_server_keeps_its_period(tmp_path: Path) -> None:
    config = _config(tmp_path, 1)
    down = Snapshot(primary=None, refusal="no primary server: server0 is down")
    assert _checker(config, down).period() == 5.0  # nothing to fail over to
