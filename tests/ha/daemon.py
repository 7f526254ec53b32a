"""pgcorral in front of the Patroni nodes: writes the configuration (the issue 13 keys, one
server section per node) and runs ``python -m pgcorral`` as a subprocess, stopped by its pid.

Not the suite's ``pgcorral`` fixture: that one depends on the session cluster ``pg`` and
writes the same keys into every server section, while ``primary = on`` goes to one node."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from devtools.pgcluster import find_free_port

import pgcorral

PGCORRAL_PATH = str(Path(pgcorral.__file__).resolve().parent.parent)

HA_KEYS = {
    "health_check": "on",
    "health_check_period": "1s",
    "health_check_timeout": "1s",
    "health_check_user": "pgcorral_health",
    "failover": "off",  # Patroni promotes; pgcorral follows the role it sees
    "pipeline": "transaction",
}


class Pgcorral:
    def __init__(
        self, workdir: str, servers: list[tuple[str, int, bool]], extra: dict[str, str] | None
    ) -> None:
        """servers: (name, port, primary hint) on 127.0.0.1."""
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = find_free_port()
        main = {
            "host": self.host,
            "port": str(self.port),
            "unix_socket_dir": workdir,
            "log_type": "console",
            "log_level": "info",
            "max_connections": "60",
            "workers": os.environ.get("PGCORRAL_TEST_WORKERS", "1"),
            **HA_KEYS,
            **(extra or {}),
        }
        text = "[pgcorral]\n" + "".join(f"{k} = {v}\n" for k, v in main.items())
        for name, port, primary in servers:
            text += f"\n[{name}]\nhost = 127.0.0.1\nport = {port}\n"
            if primary:
                text += "primary = on\n"
        self.conf_path = os.path.join(workdir, "pgcorral.conf")
        Path(self.conf_path).write_text(text, encoding="utf-8")
        hba = os.path.join(workdir, "pgcorral_hba.conf")
        Path(hba).write_text("host all all all all\nlocal all all all\n", encoding="utf-8")
        self.log_path = os.path.join(workdir, "pgcorral.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = PGCORRAL_PATH + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgcorral", "-c", self.conf_path, "-a", hba],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir,
            env=env,
        )

    def log(self) -> str:
        return Path(self.log_path).read_text(encoding="utf-8", errors="replace")

    def wait_started(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgcorral exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    if "pgcorral: started" in self.log():
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgcorral did not start in {timeout:g} s:\n{self.log()}")
            time.sleep(0.05)

    def dsn(self, dbname: str = "pgcorral_test", user: str = "trustuser") -> str:
        return f"host={self.host} port={self.port} dbname={dbname} user={user}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
