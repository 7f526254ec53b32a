"""`make run`: run pgcorral in the foreground in front of a throwaway PostgreSQL.

Environment:
  PGCORRAL_SERVER_HOST / PGCORRAL_SERVER_PORT  use this server instead of a
                                               throwaway cluster (both needed)
  PGCORRAL_PORT        pgcorral's TCP port (default 2345)
  PGCORRAL_LOG_LEVEL   log_level (default info)

Ctrl-C (SIGINT), SIGTERM or SIGHUP stops pgcorral and destroys the cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devtools.pgcluster import PgCluster  # noqa: E402

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _stop_daemon(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            print("run_dev: pgcorral ignored SIGTERM for 10s; killing it", file=sys.stderr)
            proc.kill()
            proc.wait()
    assert proc.returncode is not None
    return proc.returncode


def main() -> int:
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, _raise_stop)

    cluster: PgCluster | None = None
    workdir: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    rc = 0
    try:
        server_host = os.environ.get("PGCORRAL_SERVER_HOST")
        server_port = os.environ.get("PGCORRAL_SERVER_PORT")
        if server_host and server_port:
            print(f"run_dev: using PostgreSQL at {server_host}:{server_port}", flush=True)
        else:
            basedir = tempfile.mkdtemp(prefix="pgcorral-pg-")
            os.chmod(basedir, 0o755)
            cluster = PgCluster(basedir)
            cluster.init(settings={"log_min_messages": "warning"})
            cluster.start()
            server_host, server_port = cluster.host, str(cluster.port)
            print(
                f"run_dev: throwaway PostgreSQL on {server_host}:{server_port} "
                f"(data in {cluster.datadir}, log {cluster.logfile})",
                flush=True,
            )

        port = int(os.environ.get("PGCORRAL_PORT", "2345"))
        workdir = tempfile.mkdtemp(prefix="pgcorral-dev-")
        os.chmod(workdir, 0o755)
        conf = os.path.join(workdir, "pgcorral.conf")
        hba = os.path.join(workdir, "pgcorral_hba.conf")
        Path(conf).write_text(
            "[pgcorral]\n"
            "host = 127.0.0.1\n"
            f"port = {port}\n"
            f"unix_socket_dir = {workdir}\n"
            "log_type = console\n"
            f"log_level = {os.environ.get('PGCORRAL_LOG_LEVEL', 'info')}\n"
            "max_connections = 100\n"
            "\n"
            "[primary]\n"
            f"host = {server_host}\n"
            f"port = {server_port}\n",
            encoding="utf-8",
        )
        Path(hba).write_text("host all all all all\nlocal all all all\n", encoding="utf-8")

        env = dict(os.environ)
        src = str(REPO_ROOT / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        # Own session: the terminal's Ctrl-C reaches only us; we then SIGTERM pgcorral.
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgcorral", "-c", conf, "-a", hba],
            env=env,
            start_new_session=True,
        )
        print(f"run_dev: config in {workdir}; connect with:", flush=True)
        print(f"psql -h 127.0.0.1 -p {port} -U postgres postgres", flush=True)
        print("run_dev: Ctrl-C to stop", flush=True)
        rc = proc.wait()
        print(f"run_dev: pgcorral exited with status {rc}", file=sys.stderr)
    except _Stop as e:
        print(f"\nrun_dev: {e}, shutting down", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nrun_dev: interrupted, shutting down", file=sys.stderr)
    finally:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if proc is not None:
            status = _stop_daemon(proc)
            if rc == 0 and status not in (0, -signal.SIGTERM):
                rc = status if status > 0 else 1
        if cluster is not None:
            cluster.destroy()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
