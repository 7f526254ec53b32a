"""pgcorral-cli against a running daemon: every command with its observable effect, the text and
JSON output, remote management with SCRAM, and the exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from devtools.pgcluster import find_free_port
from tests.conftest import REPO_ROOT
from tests.pgwire import connect_error

from pgcorral.security.vault import MasterKey, Vault

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import Daemon, DaemonFactory

USER = {"user": "trustuser", "database": "pgcorral_test"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "PGCORRAL_PASSWORD"}
    environ.update(PYTHONPATH=str(REPO_ROOT / "src"), **(env or {}))
    return subprocess.run([sys.executable, "-m", "pgcorral.cli.cli", *args], env=environ,
                          capture_output=True, text=True, timeout=60, check=False)


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """Run pgcorral-cli locally against ``d`` (the socket found from its config file)."""
    return run_cli("-c", os.path.join(d.dir, "pgcorral.conf"), *args)


def cli_json(d: Daemon, *args: str) -> dict[str, Any]:
    """The JSON answer of a command that must succeed."""
    done = cli(d, "-F", "json", *args)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    assert answer["outcome"] == "ok"
    return answer


def poll(condition: Any, what: str, timeout: float = 20.0, more: Any = lambda: "") -> Any:
    """Wait until ``condition()`` is truthy; its value. ``more()`` adds to the failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what} {more()}"
        time.sleep(0.05)


def backend_alive(pg: PgCluster, pid: int) -> bool:
    return pg.psql(f"select count(*) from pg_stat_activity where pid = {pid}").strip() == "1"


def test_ping_and_its_old_name(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    done = cli(d, "ping")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.split("\n")[0].split() == ["status", "running"]
    assert cli_json(d, "is-alive")["command"] == "ping"
    socket_file = Path(d.socket_dir) / f".s.pgcorral.{d.port}"
    assert socket_file.stat().st_mode & 0o777 == 0o600


def test_status_counts_and_output_shapes(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with psycopg.connect(d.dsn()) as conn:
        pid = conn.info.backend_pid
        status = cli_json(d, "status")
        assert status["active_connections"] == 1 and status["clients"] == 1
        assert status["max_connections"] == 20 and status["status"] == "running"
        assert status["servers"] == [{"name": "primary", "host": "127.0.0.1",
                                      "port": status["servers"][0]["port"], "state": "primary",
                                      "lsn": 0, "reads_active": 0, "errors": 0}]
        details = cli_json(d, "details")  # the 0.5.0 name of status details
        assert details["connections"][0]["pid"] == pid
        assert details["connections"][0]["state"] == "active"
        sessions = [{k: v for k, v in s.items() if k != "worker"} for s in details["sessions"]]
        assert sessions == [{"user": "trustuser", "database": "pgcorral_test",
                             "address": "127.0.0.1", "pid": pid, "tls": "", "pinned": ""}]
        assert details["connections"][0]["tls"] is False
        assert details["sessions"][0]["worker"] == details["connections"][0]["worker"]
        text = cli(d, "status", "details").stdout.splitlines()
        assert ["active_connections", "1"] in [line.split() for line in text]
        assert len({line.index(" 1") for line in text if line.endswith(" 1")
                    and not line.startswith(" ")}) == 1  # values aligned in one column
        header = next(line for line in text if line.strip().startswith("ID"))
        assert header.split() == ["ID", "STATE", "DATABASE", "USER", "PID", "STARTED",
                                  "LAST_USED", "TLS", "WORKER"]
    poll(lambda: cli_json(d, "status")["idle_connections"] == 1, "the connection to be idle")
    assert cli_json(d, "status")["counters"]["client_connections"] >= 1


def test_flush_idle_closes_the_idle_backend(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = pgcorral()
    with psycopg.connect(d.dsn()) as conn:
        pid = conn.info.backend_pid
    poll(lambda: cli_json(d, "status")["idle_connections"] == 1, "an idle connection")
    answer = cli_json(d, "flush", "idle")
    assert (answer["mode"], answer["closed"]) == ("idle", 1)
    poll(lambda: not backend_alive(pg, pid), "the flushed backend to go")
    assert cli_json(d, "flush-idle")["closed"] == 0  # the 0.5.0 name


def test_flush_gracefully_closes_busy_backends_when_released(pgcorral: DaemonFactory,
                                                            pg: PgCluster) -> None:
    d = pgcorral()
    with psycopg.connect(d.dsn()) as conn:
        pid = conn.info.backend_pid
        answer = cli_json(d, "flush", "gracefully", "pgcorral_test")
        assert (answer["closed"], answer["marked"]) == (0, 1)
        assert conn.execute("select 1").fetchone() == (1,)  # still serving its client
        assert backend_alive(pg, pid)
    poll(lambda: not backend_alive(pg, pid), "the marked backend to close on release")
    assert cli_json(d, "status")["total_connections"] == 0


def test_flush_all_aborts_clients(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = pgcorral()
    conn = psycopg.connect(d.dsn())
    pid = conn.info.backend_pid
    assert cli_json(d, "flush-all")["aborted"] == 1
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    conn.close()
    poll(lambda: not backend_alive(pg, pid), "the aborted client's backend to close")


def test_disable_refuses_new_logins_only(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with psycopg.connect(d.dsn()) as conn:
        assert cli_json(d, "disable", "pgcorral_test")["disabled"] == ["pgcorral_test"]
        error = connect_error(d.host, d.port, USER)
        assert error is not None and error["C"] == "57P03"
        assert error["M"] == "connection refused"
        assert connect_error(d.host, d.port, {**USER, "database": "db2"}) is None
        assert conn.execute("select 1").fetchone() == (1,)  # the existing session goes on
        assert cli_json(d, "enable", "pgcorral_test")["disabled"] == []
        assert connect_error(d.host, d.port, USER) is None
    cli_json(d, "disable")  # all databases
    error = connect_error(d.host, d.port, {**USER, "database": "db2"})
    assert error is not None and error["C"] == "57P03"
    cli_json(d, "enable", "all")
    assert connect_error(d.host, d.port, USER) is None


def test_graceful_shutdown_lets_a_transaction_commit(pgcorral: DaemonFactory,
                                                     pg: PgCluster) -> None:
    d = pgcorral()
    conn = psycopg.connect(d.dsn())
    conn.execute("insert into pgbench_history (tid, bid, aid, delta) values (1, 1, 1, 917364)")
    assert cli_json(d, "shutdown", "gracefully")["mode"] == "gracefully"
    assert cli_json(d, "status")["status"] == "graceful shutdown"
    error = connect_error(d.host, d.port, USER)
    assert error is not None and error["C"] == "57P01"
    conn.commit()
    conn.close()
    d.proc.wait(15)
    assert d.proc.returncode == 0
    assert pg.psql("select count(*) from pgbench_history where delta = 917364",
                   dbname="pgcorral_test").strip() == "1"
    assert not (Path(d.socket_dir) / f".s.pgcorral.{d.port}").exists()


def test_cancel_shutdown_resumes_service(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    with psycopg.connect(d.dsn()) as conn:
        cli_json(d, "gracefully")
        error = connect_error(d.host, d.port, USER)
        assert error is not None and error["C"] == "57P01"
        assert cli_json(d, "cancel-shutdown")["mode"] == "cancel"
        assert connect_error(d.host, d.port, USER) is None
        assert conn.execute("select 1").fetchone() == (1,)
    assert cli_json(d, "ping")["status"] == "running"
    done = cli(d, "shutdown", "cancel")
    assert done.returncode == 1
    assert done.stderr.strip() == "pgcorral-cli: shutdown: no graceful shutdown in progress"


def test_stop_exits_at_once(pgcorral: DaemonFactory) -> None:
    d = pgcorral()
    conn = psycopg.connect(d.dsn())
    cli_json(d, "stop")
    d.proc.wait(15)
    conn.close()


def test_conf_get_and_set(pgcorral: DaemonFactory) -> None:
    d = pgcorral({"max_connections": "1"})
    assert cli_json(d, "conf", "get", "blocking_timeout")["value"] == 30
    answer = cli_json(d, "conf", "set", "blocking_timeout", "1")
    assert (answer["value"], answer["previous"]) == (1, 30)
    assert cli_json(d, "conf", "get", "pgcorral.blocking_timeout")["value"] == 1
    assert cli(d, "conf", "get", "blocking_timeout").stdout.split() == [
        "key", "blocking_timeout", "value", "1"]
    with psycopg.connect(d.dsn()):  # holds the only server connection
        started = time.monotonic()
        error = connect_error(d.host, d.port, USER)
        assert error is not None and error["C"] == "53300"
        assert time.monotonic() - started < 10  # the new 1 s, not the old 30 s
    done = cli(d, "-F", "json", "conf", "set", "port", "1234")
    assert done.returncode == 1 and json.loads(done.stdout)["restart_required"] is True
    assert done.stderr.strip() == "pgcorral-cli: conf: restart required"
    assert cli_json(d, "conf", "get", "port")["value"] == d.port
    done = cli(d, "conf", "set", "validation", "sometimes")
    assert done.returncode == 1 and "invalid value for validation" in done.stderr
    assert cli(d, "conf", "get", "no_such_key").returncode == 1


def test_conf_ls_alias_and_reload(pgcorral: DaemonFactory) -> None:
    d = pgcorral(limits="pgcorral_test=appdb,app2 trustuser 5 1 0\n")
    listing = cli_json(d, "conf", "ls")
    assert listing["values"]["port"] == d.port
    assert listing["values"]["server.primary.host"] == "127.0.0.1"
    assert listing["files"]["main"] == os.path.join(d.dir, "pgcorral.conf")
    aliases = cli_json(d, "conf", "alias")["databases"]
    assert aliases == [{"database": "pgcorral_test", "aliases": ["appdb", "app2"],
                        "user": "trustuser", "max_size": 5, "initial_size": 1, "min_size": 0}]
    text = cli(d, "conf", "alias").stdout.splitlines()
    assert text[1].split() == ["DATABASE", "ALIASES", "USER", "MAX_SIZE", "INITIAL_SIZE",
                               "MIN_SIZE"]
    assert cli_json(d, "conf", "reload")["reloaded"] is True
    d.wait_for_log("configuration reloaded")


def test_switch_to_and_clear(pgcorral: DaemonFactory, pg: PgCluster) -> None:
    d = pgcorral(servers=[("primary", "127.0.0.1", pg.port), ("other", "localhost", pg.port)])
    assert cli_json(d, "switch-to", "other")["previous"] == "primary"
    states = {s["name"]: s["state"] for s in cli_json(d, "status")["servers"]}
    assert states == {"primary": "failed", "other": "primary"}
    with psycopg.connect(d.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    cli_json(d, "clear", "server", "primary")
    states = {s["name"]: s["state"] for s in cli_json(d, "status")["servers"]}
    assert states == {"primary": "notinit", "other": "primary"}
    assert cli(d, "switch-to", "nowhere").returncode == 1
    assert cli_json(d, "status")["counters"]["client_connections"] >= 1
    cli_json(d, "clear", "prometheus")
    assert cli_json(d, "status")["counters"]["client_connections"] == 0


def _admins(tmp_path: Path) -> tuple[str, dict[str, str]]:
    key = tmp_path / "key" / "master.key"
    vault = Vault(MasterKey.create("Str0ng!Passphrase", str(key), iterations=1000))
    vault.set("admin", "adm1n-secret")
    path = tmp_path / "admins.conf"
    vault.save(str(path))
    return str(path), {"PGCORRAL_MASTER_KEY_FILE": str(key)}


def test_remote_management_needs_an_admin(pgcorral: DaemonFactory, tmp_path: Path) -> None:
    admins, env = _admins(tmp_path)
    port = find_free_port()
    d = pgcorral({"management": str(port)}, env=env, args=["-A", admins])
    remote = ("-h", "127.0.0.1", "-p", str(port))
    done = run_cli(*remote, "-U", "admin", "-P", "adm1n-secret", "-F", "json", "status")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "running"
    done = run_cli(*remote, "-U", "admin", "ping", env={"PGCORRAL_PASSWORD": "adm1n-secret"})
    assert done.returncode == 0, done.stderr
    for user, password in (("admin", "wrong"), ("trustuser", "adm1n-secret")):
        done = run_cli(*remote, "-U", user, "-P", password, "shutdown")
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr == "pgcorral-cli: authentication failed\n"
    assert d.running()
    d.wait_for_log("authentication failed for 'trustuser'")


def test_daemon_not_running(tmp_path: Path) -> None:
    conf = tmp_path / "pgcorral.conf"
    conf.write_text(f"[pgcorral]\nhost = 127.0.0.1\nport = 6\nunix_socket_dir = {tmp_path}\n"
                    "\n[primary]\nhost = 127.0.0.1\nport = 5432\n", encoding="utf-8")
    done = run_cli("-c", str(conf), "status")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "pgcorral is not running" in done.stderr
    done = run_cli("-h", "127.0.0.1", "-p", str(find_free_port()), "-U", "a", "-P", "b", "ping")
    assert done.returncode == 1 and "pgcorral is not running" in done.stderr
    done = run_cli("-c", str(conf), "frobnicate")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert run_cli("-V").stdout.startswith("pgcorral-cli ")
