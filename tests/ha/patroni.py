"""A Patroni cluster on loopback for the end-to-end HA test: one etcd (v3 API) and two
Patroni nodes running PostgreSQL 15, all as the unprivileged OS user, in one temp directory.

    with PatroniCluster.start(tmpdir) as cluster:
        leader = cluster.wait_healthy()         # a leader and a streaming replica
        leader.kill_postmaster()                # SIGKILL: Patroni fails over (see CONFIG)
        new = cluster.wait_leader(other_than=leader)

Debian packages: ``patroni`` (3.0.2) and ``etcd-server`` (3.4).  Patroni talks to etcd's v3
gRPC gateway (its ``etcd3:`` section).  Timings: ttl 10, loop_wait 1, retry_timeout 4 (Patroni
wants loop_wait + 2 * retry_timeout <= ttl), ``primary_start_timeout: 0`` (a crashed primary
is failed over at once instead of restarted in place, as long as a healthy synchronous standby
exists) and ``synchronous_mode: true`` (no commit is acknowledged before the standby has it).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from devtools.pgcluster import (
    child_pids,
    find_bindir,
    find_free_port,
    pid_alive,
    unprivileged_user,
)

HOST = "127.0.0.1"
SCOPE = "pgcorral-ha"
TTL, LOOP_WAIT, RETRY_TIMEOUT = 10, 1, 4


class PatroniError(RuntimeError):
    pass


def tools_missing() -> list[str]:
    """The programs this harness needs that are not installed."""
    return [p for p in ("patroni", "etcd") if shutil.which(p) is None]


def _server_user_prefix() -> list[str]:
    """setpriv (it execs: the pid we get is the daemon's own) as the unprivileged user."""
    user = unprivileged_user()
    if user is None:
        return []
    import pwd

    pw = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]


def _chown(path: str) -> None:
    user = unprivileged_user()
    if user is not None:
        import pwd

        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _mkdir(path: str, mode: int = 0o755) -> str:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)
    _chown(path)
    return path


class _Daemon:
    """A subprocess we started (etcd or patroni), logging to a file; stopped by its pid."""

    def __init__(self, name: str, cmd: list[str], cwd: str, log_path: str) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "ETCD"))}
        env.update(HOME=cwd, LC_ALL="C.UTF-8", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            _server_user_prefix() + cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()


class Etcd:
    """A one-member etcd 3.4 cluster on loopback ports found free."""

    def __init__(self, basedir: str) -> None:
        self.dir = _mkdir(os.path.join(basedir, "etcd"))
        self.client_port = find_free_port()
        self.peer_port = find_free_port()
        client = f"http://{HOST}:{self.client_port}"
        peer = f"http://{HOST}:{self.peer_port}"
        self.daemon = _Daemon(
            "etcd",
            [
                shutil.which("etcd") or "etcd",
                "--name", "etcd0",
                "--data-dir", os.path.join(self.dir, "data"),
                "--listen-client-urls", client,
                "--advertise-client-urls", client,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"etcd0={peer}",
                "--initial-cluster-state", "new",
                "--log-level", "warn",
                "--logger", "zap",
            ],
            self.dir,
            os.path.join(basedir, "etcd.log"),
        )

    @property
    def hosts(self) -> str:
        return f"{HOST}:{self.client_port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.daemon.running():
                raise PatroniError(f"etcd exited:\n{self.daemon.log()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://{self.hosts}/health", timeout=1
            ) as resp:
                if json.loads(resp.read()).get("health") == "true":
                    return
            if time.monotonic() > deadline:
                raise PatroniError(f"etcd not healthy after {timeout:g} s:\n{self.daemon.log()}")
            time.sleep(0.1)


@dataclass
class NodeState:
    """What a node's REST API says about itself."""

    role: str | None  # "master"/"primary", "replica", or None when the API does not answer
    state: str | None  # "running", "starting", "stopped"...
    streaming: bool


class PatroniNode:
    """One Patroni-managed PostgreSQL node."""

    def __init__(self, basedir: str, name: str, etcd: Etcd, bindir: str) -> None:
        self.name = name
        self.dir = _mkdir(os.path.join(basedir, name))
        self.pg_port = find_free_port()
        self.api_port = find_free_port()
        self.datadir = os.path.join(self.dir, "data")
        self.socket_dir = _mkdir(os.path.join(self.dir, "sock"))
        self.config_path = os.path.join(self.dir, "patroni.yml")
        config = self._config(etcd, bindir)
        # JSON is YAML: no yaml module needed here
        Path(self.config_path).write_text(json.dumps(config, indent=1), encoding="utf-8")
        _chown(self.config_path)
        self.log_path = os.path.join(basedir, f"{name}.log")
        self.daemon: _Daemon | None = None

    def _config(self, etcd: Etcd, bindir: str) -> dict[str, Any]:
        trust = [
            "local all all trust",
            f"host all all {HOST}/32 trust",
            f"host replication all {HOST}/32 trust",
        ]
        return {
            "scope": SCOPE,
            "name": self.name,
            "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
            "restapi": {
                "listen": f"{HOST}:{self.api_port}",
                "connect_address": f"{HOST}:{self.api_port}",
            },
            "etcd3": {"hosts": etcd.hosts, "protocol": "http"},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1048576,
                    "primary_start_timeout": 0,
                    "synchronous_mode": True,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",
                            "max_connections": 200,
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "128MB",
                            "fsync": "off",  # no OS crash here; a killed process loses nothing
                            "full_page_writes": "off",
                            "synchronous_commit": "on",
                            "wal_receiver_status_interval": "1s",
                            "log_min_messages": "warning",
                        },
                        "pg_hba": trust,
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "no-sync"],
            },
            "postgresql": {
                "listen": f"{HOST}:{self.pg_port}",
                "connect_address": f"{HOST}:{self.pg_port}",
                "data_dir": self.datadir,
                "bin_dir": bindir,
                "pgpass": os.path.join(self.dir, "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "postgres"},
                    "replication": {"username": "replicator", "password": "replicator"},
                    "rewind": {"username": "postgres", "password": "postgres"},
                },
                "parameters": {"unix_socket_directories": self.socket_dir},
                "pg_hba": trust,
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
        }

    # ------------------------------------------------------------------ process
    def start(self) -> None:
        self.daemon = _Daemon(
            f"patroni-{self.name}", [shutil.which("patroni") or "patroni", self.config_path],
            self.dir, self.log_path,
        )

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        # Patroni stops its PostgreSQL on SIGTERM; make sure nothing is left behind.
        self.kill_postmaster()

    def log(self) -> str:
        return self.daemon.log() if self.daemon is not None else ""

    def postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.datadir, "postmaster.pid"), encoding="utf-8") as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def kill_postmaster(self, timeout: float = 10.0) -> int | None:
        """SIGKILL this node's postmaster (not Patroni); wait until it and its children are
        gone.  Returns the pid (None when none ran)."""
        pid = self.postmaster_pid()
        if pid is None:
            return None
        children = child_pids(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) or any(pid_alive(c) for c in children):
            if time.monotonic() > deadline:
                raise PatroniError(f"postmaster {pid} of {self.name} still alive")
            time.sleep(0.01)
        return pid

    # --------------------------------------------------------------------- REST
    def api(self, path: str, timeout: float = 1.0) -> tuple[int, Any]:
        """GET the node's REST API: (HTTP status, parsed JSON or None); (0, None) when it
        does not answer."""
        try:
            with urllib.request.urlopen(
                f"http://{HOST}:{self.api_port}{path}", timeout=timeout
            ) as resp:
                return resp.status, _json(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, _json(e.read())
        except OSError:
            return 0, None

    def state(self) -> NodeState:
        status, body = self.api("/patroni")
        if status == 0 or not isinstance(body, dict):
            return NodeState(None, None, False)
        replication = body.get("replication_state")
        return NodeState(body.get("role"), body.get("state"), replication == "streaming")

    def is_leader(self) -> bool:
        return self.api("/primary")[0] == 200

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"host={HOST} port={self.pg_port} dbname={dbname} user={user}"

    def __repr__(self) -> str:
        return f"PatroniNode({self.name}, pg={self.pg_port}, api={self.api_port})"


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


class PatroniCluster:
    """etcd + two Patroni nodes under ``basedir`` (created 0755, removed by stop())."""

    def __init__(self, basedir: str, nodes: int = 2) -> None:
        self.basedir = _mkdir(basedir)
        self.bindir = find_bindir()
        self.etcd = Etcd(self.basedir)
        self.nodes = [
            PatroniNode(self.basedir, f"node{i + 1}", self.etcd, self.bindir)
            for i in range(nodes)
        ]

    @classmethod
    def start(cls, basedir: str, nodes: int = 2) -> PatroniCluster:
        cluster = cls(basedir, nodes)
        atexit.register(cluster.stop)  # an interrupted run leaves no daemon behind
        try:
            cluster.etcd.wait_ready()
            # the first node bootstraps alone, the others clone from it
            cluster.nodes[0].start()
            cluster.wait_leader(timeout=60)
            for node in cluster.nodes[1:]:
                node.start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def logs(self) -> str:
        parts = [f"--- etcd ---\n{self.etcd.daemon.log()[-3000:]}"]
        parts += [f"--- {n.name} ---\n{n.log()[-6000:]}" for n in self.nodes]
        return "\n".join(parts)

    def _wait(self, what: str, timeout: float, check: Any) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            for node in self.nodes:
                if node.daemon is not None and not node.daemon.running():
                    raise PatroniError(f"patroni {node.name} exited\n{self.logs()}")
            if time.monotonic() > deadline:
                raise PatroniError(f"no {what} after {timeout:g} s\n{self.logs()}")
            time.sleep(0.1)

    def leader(self) -> PatroniNode | None:
        leaders = [n for n in self.nodes if n.is_leader()]
        return leaders[0] if len(leaders) == 1 else None

    def wait_leader(
        self, timeout: float = 60.0, other_than: PatroniNode | None = None
    ) -> PatroniNode:
        """Wait until exactly one node answers 200 on /primary (and it is not
        ``other_than``)."""

        def check() -> PatroniNode | None:
            leader = self.leader()
            return leader if leader is not None and leader is not other_than else None

        node: PatroniNode = self._wait("leader", timeout, check)
        return node

    def cluster_view(self) -> dict[str, Any]:
        """GET /cluster from any node that answers."""
        for node in self.nodes:
            status, body = node.api("/cluster")
            if status == 200 and isinstance(body, dict):
                return body
        return {}

    def wait_healthy(self, timeout: float = 90.0) -> PatroniNode:
        """Wait for a leader and every other node a streaming replica that is the
        synchronous standby (GET /cluster); returns the leader."""

        def check() -> PatroniNode | None:
            leader = self.leader()
            if leader is None:
                return None
            members = self.cluster_view().get("members", [])
            others = [m for m in members if m.get("name") != leader.name]
            if len(others) != len(self.nodes) - 1:
                return None
            for m in others:
                if m.get("role") not in ("sync_standby", "replica") or m.get(
                    "state"
                ) not in ("streaming", "running"):
                    return None
            if not any(m.get("role") == "sync_standby" for m in others):
                return None
            for node in self.nodes:
                if node is not leader and node.api("/replica")[0] != 200:
                    return None
            return leader

        node: PatroniNode = self._wait("leader with a streaming synchronous standby",
                                       timeout, check)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        with contextlib.suppress(Exception):
            self.etcd.daemon.stop()

    def destroy(self) -> None:
        atexit.unregister(self.stop)
        self.stop()
        shutil.rmtree(self.basedir, ignore_errors=True)

    def __enter__(self) -> PatroniCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()
