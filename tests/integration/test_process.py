"""pgcorral as an operating-system process: daemon mode, pidfile, log files and rotation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from devtools.pgcluster import find_free_port

if TYPE_CHECKING:
    from devtools.pgcluster import PgCluster
    from tests.conftest import DaemonFactory

REPO = Path(__file__).resolve().parents[2]


def _write_conf(tmp: Path, pg: PgCluster, port: int, **extra: str) -> Path:
    main = {"host": "127.0.0.1", "port": str(port), "unix_socket_dir": str(tmp),
            "log_type": "file", "log_path": str(tmp / "pgcorral.log"), "log_level": "info",
            **extra}
    text = "[pgcorral]\n" + "".join(f"{k} = {v}\n" for k, v in main.items())
    text += f"\n[primary]\nhost = 127.0.0.1\nport = {pg.port}\n"
    conf = tmp / "pgcorral.conf"
    conf.write_text(text)
    (tmp / "hba.conf").write_text("host all all all all\nlocal all all all\n")
    return conf


def _pgcorral(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgcorral", *args], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))


def _wait(cond: object, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_daemon_mode_pidfile_and_second_instance(tmp_path: Path, pg: PgCluster) -> None:
    os.chmod(tmp_path, 0o755)
    port = find_free_port()
    conf = _write_conf(tmp_path, pg, port)
    hba = str(tmp_path / "hba.conf")
    out = _pgcorral("-c", str(conf), "-a", hba, "-d")
    assert out.returncode == 0, out.stderr
    pidfile = tmp_path / f"pgcorral.{port}.pid"
    _wait(pidfile.exists, "the pidfile")
    pid = int(pidfile.read_text())
    try:
        log = tmp_path / "pgcorral.log"  # written after the pidfile: wait for it to exist
        _wait(lambda: log.exists() and "started on" in log.read_text(), "the start line")
        dsn = f"host=127.0.0.1 port={port} user=trustuser dbname=pgcorral_test"
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        again = _pgcorral("-c", str(conf), "-a", hba, "-d")
        assert again.returncode == 1
        assert f"pid {pid}" in again.stderr and "Traceback" not in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    _wait(lambda: not pidfile.exists(), "the pidfile to be removed at exit")


def test_console_log_type_is_refused_in_daemon_mode(tmp_path: Path, pg: PgCluster) -> None:
    conf = _write_conf(tmp_path, pg, find_free_port(), log_type="console")
    out = _pgcorral("-c", str(conf), "-a", str(tmp_path / "hba.conf"), "-d")
    assert out.returncode == 1
    assert "log_type" in out.stderr


def test_log_rotation_by_size(tmp_path: Path, pg: PgCluster) -> None:
    os.chmod(tmp_path, 0o755)
    port = find_free_port()
    conf = _write_conf(tmp_path, pg, port, log_rotation_size="2K", log_level="debug")
    proc = subprocess.Popen([sys.executable, "-m", "pgcorral", "-c", str(conf), "-a",
                             str(tmp_path / "hba.conf")],
                            env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = tmp_path / "pgcorral.log"
        _wait(lambda: log.exists() and "started on" in log.read_text(), "the start line")
        dsn = f"host=127.0.0.1 port={port} user=trustuser dbname=pgcorral_test"
        for _ in range(20):  # each refused login logs a line
            try:
                psycopg.connect(dsn.replace("pgcorral_test", "no_such_db")).close()
            except psycopg.OperationalError:
                pass
        _wait(lambda: len(list(tmp_path.glob("pgcorral.log.*"))) >= 1, "a rotated log file")
    finally:
        proc.terminate()
        proc.wait(10)


def test_sd_notify_ready_reloading_stopping(pgcorral: DaemonFactory, tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        d = pgcorral(env={"NOTIFY_SOCKET": path})
        assert sock.recv(256).startswith(b"READY=1")
        d.signal(signal.SIGHUP)
        assert sock.recv(256) == b"RELOADING=1"
        assert sock.recv(256) == b"READY=1"
        d.signal(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
