"""Fixtures of the HA tests: the streaming pairs of tests/ha/fixtures.py and the Patroni
cluster of tests/ha/patroni.py."""

from __future__ import annotations

import pytest
from tests.ha.fixtures import ha_pair, ha_pair_delayed, ha_pair_factory, ha_template

__all__ = ["ha_pair", "ha_pair_delayed", "ha_pair_factory", "ha_template"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "patroni: the Patroni end-to-end run (needs patroni and etcd-server); the long "
        "variant only under `make ha-test` (PGCORRAL_HA_TEST=full)",
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.ha import report

    if not report.RUNS:
        return
    terminalreporter.section("HA figures")
    for run in report.RUNS:
        for line in report.table(run):
            terminalreporter.write_line(line)
