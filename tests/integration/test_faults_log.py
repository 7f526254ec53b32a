"""The disk for logs full (issue 15, item 3; docs/RELIABILITY.md "Faults"): pgcorral logs to a
file whose writes fail with ENOSPC (``log_path = /dev/full``). Logging must never take the
pooler down: clients keep working, nothing crashes, the pooler does not spin, and a failed
write costs no traceback (one line on stderr a minute at most, with the count of lost records).
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

import psycopg
import pytest
from tests.integration.test_management import cli_json, poll
from tests.load import Load, tree_fds, tree_pids

if TYPE_CHECKING:
    from tests.conftest import DaemonFactory


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of ``pid`` and its children (the workers), seconds."""
    ticks = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / 100  # (USER_HZ is 100 on Linux)


@pytest.mark.parametrize("rotation", ["0", "1048576"])
@pytest.mark.parametrize("pipeline", ["session", "transaction"])
def test_log_disk_full(pgcorral: DaemonFactory, pipeline: str, rotation: str) -> None:
    """With every record failing to be written (debug level: several per client), clients
    see no error, reloads and new connections work, the pooler is idle when the clients are
    (no busy loop), and its stderr holds one short note, no traceback. With
    log_rotation_size the size check itself fails (it used to raise out of the handler and
    stop pgcorral)."""
    d = pgcorral({"pipeline": pipeline, "max_connections": "6", "log_type": "file",
                  "log_path": "/dev/full", "log_level": "debug5",
                  "log_rotation_size": rotation})
    load = Load(d, clients=4, connectors=1)
    try:
        load.progress(200)
        poll(lambda: load.connects > 20, "new connections")
        for _ in range(3):  # a reload logs too (and reopens nothing that helps)
            d.signal(signal.SIGHUP)
            load.progress(50)
        assert load.failures == []
    finally:
        load.finish()
    assert d.running()
    poll(lambda: cli_json(d, "status")["clients"] == 0, "the clients to leave")
    fds = tree_fds(d.pid)
    before = cpu_seconds(d.pid)
    time.sleep(1.0)  # (measuring idleness: a busy loop would burn most of this second)
    assert cpu_seconds(d.pid) - before < 0.2
    with psycopg.connect(d.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert abs(tree_fds(d.pid) - fds) <= 2
    err = d.log()
    assert "Logging error" not in err and "Traceback" not in err
    assert 1 <= err.count("cannot write the log /dev/full") <= 3, err  # once a minute
    assert len(err) < 2000, err
