#!/usr/bin/env python3
"""pgcorral benchmark: pgbench straight at PostgreSQL vs through PgBouncer vs through pgcorral.

One command (see bench/README.md)::

    .venv/bin/python bench/run.py            # full run, about 17 minutes
    .venv/bin/python bench/run.py --quick    # 2-second smoke of every cell

It starts a throwaway PostgreSQL cluster (devtools/pgcluster.py), one PgBouncer and one
pgcorral of its own, runs every pgbench workload x client count against every target for
several interleaved rounds, prints a table of median TPS and ratios, writes the full
results to bench/results/<timestamp>.json and stops everything it started, by PID, even on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

try:
    from devtools.pgcluster import PgCluster, PgClusterError, find_free_port, unprivileged_user
except ImportError as _exc:  # pragma: no cover - only when the checkout is incomplete
    sys.exit(f"bench/run.py: cannot import devtools/pgcluster.py from {REPO}: {_exc}")

DBNAME = "pgbench"
DBUSER = "postgres"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALL_TARGETS = ("direct", "pgbouncer", "pgcorral")

# name -> (label, pgbench arguments).  tpcb-like is pgbench's default builtin script.
WORKLOADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "simple": ("tpcb -M simple", ("-M", "simple")),
    "extended": ("tpcb -M extended", ("-M", "extended")),
    "prepared": ("tpcb -M prepared", ("-M", "prepared")),
    "select-prepared": ("select -M prepared", ("-S", "-M", "prepared")),
    "select-connect": ("select -C", ("-S", "-C")),
}
PROFILE_WORKLOAD = os.environ.get("PGCORRAL_PROFILE_WORKLOAD", "select-prepared")
PROFILE_CLIENTS = 100


@dataclass(frozen=True)
class ModeSpec:
    """How one pooling mode maps onto each pooler's configuration."""

    pgbouncer_pool_mode: str
    pgcorral_pipeline: str


# Adding a mode is one entry here (plus whatever the poolers need for it).  Caveat for
# "transaction": PgBouncer 1.18 (Debian 12) has no protocol-level prepared statement
# support, so the -M prepared workloads fail through it in that mode.
MODES: dict[str, ModeSpec] = {
    "session": ModeSpec(pgbouncer_pool_mode="session", pgcorral_pipeline="session"),
    "transaction": ModeSpec(pgbouncer_pool_mode="transaction", pgcorral_pipeline="transaction"),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without libpq variables (PGHOST, PGPORT...) that could redirect us."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:]) or "<the log is empty>"


# --------------------------------------------------------------------------- processes


class Processes:
    """Every long-running child we start, so cleanup can stop exactly those, by PID."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(list(args), **kw)
        self._procs.append((name, proc))
        return proc

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        stop_process(proc, sig)
        self.forget(proc)

    def stop_all(self) -> None:
        for name, proc in reversed(self._procs):
            if proc.poll() is None:
                log(f"stopping {name} (pid {proc.pid})")
            stop_process(proc, signal.SIGTERM)
        self._procs.clear()


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10
) -> None:
    """Signal one process by its PID, wait, escalate to SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


PROCS = Processes()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------- pgbench


@dataclass
class RunResult:
    round: int
    workload: str
    clients: int
    target: str
    position: int  # 0 = this target ran first in this cell in this round
    tps: float | None = None
    tps_kind: str = ""
    failed_tx: int | None = None
    transactions: int | None = None
    latency_ms: float | None = None
    aborted: bool = False
    returncode: int = 0
    elapsed_s: float = 0.0
    error: str | None = None
    output: str = ""

    @property
    def usable(self) -> bool:
        """Counted in the median: pgbench finished normally (failed transactions are only
        marked: pgbench's TPS already excludes them)."""
        return self.tps is not None and not self.aborted and not self.returncode and not self.error

    @property
    def bad(self) -> bool:
        return bool(
            self.tps is None or self.failed_tx or self.aborted or self.returncode or self.error
        )


TPS_RE = re.compile(r"^tps = ([0-9.]+) \(([^)]*)\)", re.M)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)
XACTS_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
LATENCY_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)


def parse_pgbench(output: str, result: RunResult) -> None:
    """Fill result from pgbench's report (PostgreSQL 14+ format)."""
    if m := TPS_RE.search(output):
        result.tps = float(m.group(1))
        result.tps_kind = m.group(2)
    if m := FAILED_RE.search(output):
        result.failed_tx = int(m.group(1))
    if m := XACTS_RE.search(output):
        result.transactions = int(m.group(1))
    if m := LATENCY_RE.search(output):
        result.latency_ms = float(m.group(1))
    result.aborted = "Run was aborted" in output or "aborted in command" in output


def pgbench_cmd(
    pgbench: str, host: str, port: int, workload: str, clients: int, duration: int, jobs: int
) -> list[str]:
    return [
        pgbench,
        "-h", host,
        "-p", str(port),
        "-U", DBUSER,
        "-n",  # no vacuum through the pooler: reset_tables() did it directly
        "-T", str(duration),
        "-j", str(max(1, min(jobs, clients))),
        "-c", str(clients),
        *WORKLOADS[workload][1],
        DBNAME,
    ]  # fmt: skip


def run_pgbench(cmd: list[str], result: RunResult, timeout: float) -> RunResult:
    t0 = time.monotonic()
    proc = PROCS.start(
        "pgbench", cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=clean_env()
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        PROCS.stop(proc, signal.SIGINT)
        result.error = f"pgbench still running after {timeout:.0f}s; stopped"
        out = b""
    finally:
        PROCS.forget(proc)
    result.elapsed_s = round(time.monotonic() - t0, 2)
    result.returncode = proc.returncode if proc.returncode is not None else -1
    result.output = out.decode("utf-8", errors="replace")
    parse_pgbench(result.output, result)
    if result.tps is None and result.error is None:
        result.error = "no tps line in pgbench output"
    return result


# --------------------------------------------------------------------------- targets


def wait_ready(
    name: str,
    port: int,
    psql: str,
    proc: subprocess.Popen[bytes] | None,
    logfile: Path | None,
    timeout: float,
) -> None:
    """Wait until `SELECT 1` works on 127.0.0.1:port; raise with the log tail otherwise."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TargetError(
                f"{name} exited with code {proc.returncode} during startup"
                + (f"; tail of {logfile}:\n{tail(logfile)}" if logfile else "")
            )
        with socket.socket() as s:
            s.settimeout(1)
            listening = s.connect_ex(("127.0.0.1", port)) == 0
        if listening:
            res = subprocess.run(
                [psql, "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", DBUSER,
                 "-d", DBNAME, "-c", "SELECT 1"],
                capture_output=True, text=True, env=clean_env(PGCONNECT_TIMEOUT="5"),
                timeout=30, check=False,
            )  # fmt: skip
            if res.returncode == 0 and res.stdout.strip() == "1":
                return
            last = (res.stderr or res.stdout).strip()
        time.sleep(0.2)
    raise TargetError(
        f"{name} did not accept `SELECT 1` on 127.0.0.1:{port} within {timeout:.0f}s"
        + (f" (last error: {last})" if last else "")
        + (f"; tail of {logfile}:\n{tail(logfile)}" if logfile else "")
    )


class TargetError(RuntimeError):
    """A target could not be started or died."""


class Target:
    name = "?"
    host = "127.0.0.1"
    port = 0
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    logfile: Path | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                log(f"stopping {self.name} (pid {self.proc.pid})")
            PROCS.stop(self.proc)
            self.proc = None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise TargetError(
                f"{self.name} (pid {self.proc.pid}) died with code {self.proc.returncode}"
                + (f"; tail of {self.logfile}:\n{tail(self.logfile)}" if self.logfile else "")
            )

    def version(self) -> str | None:
        return None


class DirectTarget(Target):
    name = "direct"

    def __init__(self, cluster: PgCluster) -> None:
        self.port = cluster.port

    def start(self) -> None:
        pass


class PoolerTarget(Target):
    """A pooler in front of the cluster (what the PgBouncer and pgcorral targets share)."""

    def __init__(
        self, workdir: Path, cluster: PgCluster, pool_size: int, mode: ModeSpec,
        psql: str, start_timeout: float,
    ) -> None:  # fmt: skip
        self.workdir = workdir
        self.cluster = cluster
        self.pool_size = pool_size
        self.mode = mode
        self.psql = psql
        self.start_timeout = start_timeout
        self.port = find_free_port()
        self.log_path = workdir / f"{self.name}.log"
        self.logfile = self.log_path


class PgBouncerTarget(PoolerTarget):
    name = "pgbouncer"

    def __init__(
        self, binary: str, workdir: Path, cluster: PgCluster, pool_size: int, mode: ModeSpec,
        psql: str, start_timeout: float,
    ) -> None:  # fmt: skip
        super().__init__(workdir, cluster, pool_size, mode, psql, start_timeout)
        self.binary = binary

    def ini(self) -> str:
        w = self.workdir
        return f"""\
[databases]
{DBNAME} = host={self.cluster.host} port={self.cluster.port} dbname={DBNAME}
postgres = host={self.cluster.host} port={self.cluster.port} dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {w / "userlist.txt"}
admin_users = {DBUSER}
pool_mode = {self.mode.pgbouncer_pool_mode}
default_pool_size = {self.pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 1000
max_db_connections = {self.pool_size}
server_reset_query = DISCARD ALL
ignore_startup_parameters = extra_float_digits,options
logfile = {self.log_path}
pidfile = {w / "pgbouncer.pid"}
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
"""

    def start(self) -> None:
        user = unprivileged_user()  # PgBouncer refuses to run as root
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "userlist.txt").write_text(f'"{DBUSER}" ""\n')
        ini = self.workdir / "pgbouncer.ini"
        ini.write_text(self.ini())
        self.log_path.touch()
        if user is not None:
            pw = pwd.getpwnam(user)
            for p in (self.workdir, *self.workdir.iterdir()):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        # Our own process with our own ini on our own port (never the Debian service).
        self.proc = PROCS.start(
            "pgbouncer",
            [self.binary, str(ini)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "pgbouncer.stderr", "wb"),  # noqa: SIM115
            cwd=self.workdir,
            user=user,
            group=pwd.getpwnam(user).pw_gid if user else None,
            extra_groups=[] if user else None,
            start_new_session=True,
            env=clean_env(),
        )
        wait_ready(self.name, self.port, self.psql, self.proc, self.logfile, self.start_timeout)

    def version(self) -> str | None:
        return first_line([self.binary, "--version"])


class PgCorralTarget(PoolerTarget):
    name = "pgcorral"

    def __init__(
        self, python: str, workdir: Path, cluster: PgCluster, pool_size: int, mode: ModeSpec,
        psql: str, start_timeout: float,
    ) -> None:  # fmt: skip
        super().__init__(workdir, cluster, pool_size, mode, psql, start_timeout)
        self.python = python

    def conf(self) -> str:
        return f"""\
[pgcorral]
host = 127.0.0.1
port = {self.port}
unix_socket_dir = {self.workdir}
log_type = console
log_level = warn
max_connections = {self.pool_size}
pipeline = {self.mode.pgcorral_pipeline}
blocking_timeout = 30

[primary]
host = {self.cluster.host}
port = {self.cluster.port}
"""

    def command(self, wrapper: Sequence[str] = ()) -> list[str]:
        """`python [wrapper...] -m pgcorral ...`; wrapper is e.g. ("-m", "cProfile", ...)."""
        return [
            self.python, *wrapper, "-m", "pgcorral",
            "-c", str(self.workdir / "pgcorral.conf"),
            "-a", str(self.workdir / "pgcorral_hba.conf"),
        ]  # fmt: skip

    def start(self, wrapper: Sequence[str] = ()) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "pgcorral.conf").write_text(self.conf())
        (self.workdir / "pgcorral_hba.conf").write_text("host all all all all\n")
        env = clean_env()
        # Works from a plain checkout too; harmless with an editable install.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p
        )
        self.proc = PROCS.start(
            "pgcorral",
            self.command(wrapper),
            stdin=subprocess.DEVNULL,
            stdout=open(self.log_path, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
            env=env,
        )
        wait_ready(self.name, self.port, self.psql, self.proc, self.logfile, self.start_timeout)

    def version(self) -> str | None:
        return first_line(
            [self.python, "-c", "import pgcorral; print(pgcorral.__version__)"],
            env={"PYTHONPATH": str(REPO / "src")},
        )


# --------------------------------------------------------------------------- machine info


def first_line(cmd: Sequence[str], env: dict[str, str] | None = None) -> str | None:
    try:
        res = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=30, check=False,
            env=clean_env(**(env or {})),
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    out = (res.stdout or res.stderr).strip()
    return out.splitlines()[0] if out else None


def machine_info(
    cluster: PgCluster, pgbench: str, pgbouncer: str | None, pgcorral_python: str
) -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = f"{int(line.split()[1]) // 1024} MiB"
                break
    server_version = None
    with contextlib.suppress(PgClusterError, subprocess.TimeoutExpired):
        server_version = cluster.psql("SELECT version()").strip()
    git = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory": mem_total,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
        "postgresql": server_version,
        "pgbench": first_line([pgbench, "--version"]),
        "pgbouncer": first_line([pgbouncer, "--version"]) if pgbouncer else None,
        "python_harness": sys.version.split()[0],
        "python_pgcorral": first_line(
            [pgcorral_python, "-c", "import platform; print(platform.python_version())"]
        ),
        "uvloop": first_line([pgcorral_python, "-c", "import uvloop; print(uvloop.__version__)"]),
        "git_commit": git,
        "git_src_dirty": bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        )
        if git
        else None,
    }


# --------------------------------------------------------------------------- profiling


def find_py_spy(pgcorral_python: str, explicit: str | None) -> str | None:
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for cand in (
        shutil.which("py-spy"),
        str(Path(pgcorral_python).parent / "py-spy"),
        str(Path(sys.executable).parent / "py-spy"),
    ):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    """Parse folded stacks ("root;child;leaf 42" per line), as written by py-spy --format raw."""
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def profile_summary(stacks: list[tuple[list[str], int]], top: int = 40) -> str:
    """A `py-spy top`-like table: %own (leaf samples) and %total (samples with the frame)."""
    total = sum(c for _, c in stacks) or 1
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    for frames, count in stacks:
        # Drop py-spy's "process N:..." / "thread ..." pseudo-frames from the table.
        real = [f for f in frames if not f.startswith(("process ", "thread "))] or frames
        own[real[-1]] = own.get(real[-1], 0) + count
        for f in set(real):
            incl[f] = incl.get(f, 0) + count
    lines = [f"samples: {total} (active samples only: time blocked in epoll is not counted)", ""]
    for title, table in (("by own time", own), ("by total time", incl)):
        lines.append(f"--- top {top} {title} ---")
        lines.append(f"{'%own':>7} {'%total':>7}  function")
        key_of: Callable[[tuple[str, int]], int] = lambda kv: kv[1]  # noqa: E731
        for name, _ in sorted(table.items(), key=key_of, reverse=True)[:top]:
            lines.append(
                f"{100 * own.get(name, 0) / total:6.1f}% {100 * incl.get(name, 0) / total:6.1f}%"
                f"  {name}"
            )
        lines.append("")
    return "\n".join(lines)


def write_speedscope(stacks: list[tuple[list[str], int]], path: Path, name: str) -> None:
    frames: dict[str, int] = {}
    samples: list[list[int]] = []
    weights: list[int] = []
    for stack, count in stacks:
        samples.append([frames.setdefault(f, len(frames)) for f in stack])
        weights.append(count)
    doc = {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": [{"name": f} for f in frames]},
        "profiles": [
            {
                "type": "sampled",
                "name": name,
                "unit": "none",
                "startValue": 0,
                "endValue": sum(weights),
                "samples": samples,
                "weights": weights,
            }
        ],
        "exporter": "pgcorral bench/run.py",
    }
    path.write_text(json.dumps(doc))


@dataclass
class _Node:
    count: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def write_flamegraph_svg(stacks: list[tuple[list[str], int]], path: Path, title: str) -> None:
    """A static flame graph (root at the bottom, hover for details) from folded stacks."""
    root = _Node()
    for frames, count in stacks:
        root.count += count
        node = root
        for f in frames:
            node = node.children.setdefault(f, _Node())
            node.count += count
    width, row_h, pad = 1600.0, 16, 30
    total = root.count or 1
    boxes: list[tuple[str, int, float, int, float]] = []  # name, samples, x, depth, width

    def walk(node: _Node, x: float, depth: int) -> None:
        for name, child in sorted(node.children.items()):
            w = width * child.count / total
            if w >= 0.3:
                boxes.append((name, child.count, x, depth, w))
                walk(child, x, depth + 1)
            x += w

    walk(root, 0.0, 0)
    max_depth = max((b[3] for b in boxes), default=0)
    height = pad + (max_depth + 1) * row_h + 10
    body = []
    for name, count, x, depth, w in boxes:
        y = height - 10 - (depth + 1) * row_h
        hue = 10 + sum(map(ord, name)) % 45
        fits = int(w / 7)
        label = name if len(name) <= fits else name[: max(0, fits - 2)] + ".."
        text = f'<text x="{x + 3:.1f}" y="{y + row_h - 4}">{_xml(label)}</text>' if w > 21 else ""
        body.append(
            f"<g><title>{_xml(name)} ({count} samples, {100 * count / total:.2f}%)</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 1}" '
            f'fill="hsl({hue},80%,60%)" rx="2"/>{text}</g>'
        )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'font-family="monospace" font-size="11">'
        f'<rect width="100%" height="100%" fill="#fdfdf6"/>'
        f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-size="14">'
        f"{_xml(title)} ({total} samples)</text>" + "".join(body) + "</svg>\n"
    )
    path.write_text(svg)


# --------------------------------------------------------------------------- the bench


@dataclass
class Config:
    rounds: int
    duration: int
    clients: list[int]
    workloads: list[str]
    targets: list[str]
    scale: int
    pool_size: int
    mode: str
    jobs: int
    profile: bool
    py_spy: str | None
    pgcorral_python: str
    start_timeout: float
    warmup: int
    keep: bool
    results_dir: str


def parse_args(argv: Sequence[str] | None = None) -> Config:
    default_py = REPO / ".venv" / "bin" / "python"
    p = argparse.ArgumentParser(
        description="pgbench: direct PostgreSQL vs PgBouncer vs pgcorral (see bench/README.md)"
    )

    def csv(kind: Callable[[str], Any], choices: Sequence[str] = ()) -> Callable[[str], list[Any]]:
        def conv(s: str) -> list[Any]:
            items = [kind(x.strip()) for x in s.split(",") if x.strip()]
            bad = [x for x in items if choices and x not in choices]
            if bad or not items:
                hint = f"; choose from {','.join(choices)}" if choices else ""
                raise argparse.ArgumentTypeError(f"bad value(s) {bad or s!r}{hint}")
            return items

        return conv

    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; quick 1)")
    p.add_argument("--duration", type=int, default=None, help="seconds per run (10; quick 2)")
    p.add_argument("--clients", type=csv(int), default=[10, 100], help="e.g. 10,100")
    p.add_argument(
        "--workloads", type=csv(str, list(WORKLOADS)), default=list(WORKLOADS),
        help=f"comma list from {','.join(WORKLOADS)} (default all)",
    )  # fmt: skip
    p.add_argument(
        "--targets", type=csv(str, ALL_TARGETS), default=list(ALL_TARGETS),
        help="comma list from direct,pgbouncer,pgcorral (default all)",
    )  # fmt: skip
    p.add_argument("--scale", type=int, default=None, help="pgbench -i -s (default 10; quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke: 1 round of 2 s runs, scale 1")
    p.add_argument("--pool-size", type=int, default=100, help="pooler server connections (100)")
    p.add_argument("--mode", choices=list(MODES), default="session", help="pooling mode")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j threads (default 2)")
    p.add_argument(
        "--profile", action="store_true",
        help=f"after the rounds, profile pgcorral (py-spy, else cProfile) during one "
        f"{WORKLOADS[PROFILE_WORKLOAD][0]} {PROFILE_CLIENTS}-client run",
    )  # fmt: skip
    p.add_argument("--py-spy", default=None, help="py-spy binary (default: PATH, then venvs)")
    p.add_argument(
        "--pgcorral-python", default=str(default_py) if default_py.exists() else sys.executable,
        help="interpreter that runs `-m pgcorral` (default .venv/bin/python)",
    )  # fmt: skip
    p.add_argument("--start-timeout", type=float, default=30, help="seconds for a pooler to start")
    p.add_argument("--warmup", type=int, default=None, help="unrecorded seconds per target (3)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the JSON goes")
    a = p.parse_args(argv)
    duration = a.duration if a.duration is not None else (2 if a.quick else 10)
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    scale = a.scale if a.scale is not None else (1 if a.quick else 10)
    warmup = a.warmup if a.warmup is not None else 3  # 100 clients need ~1 s just to connect
    if rounds < 0 or duration < 1 or scale < 1 or a.pool_size < 1 or min(a.clients) < 1:
        p.error("--rounds >= 0, --duration, --scale, --pool-size and --clients must be >= 1")
    if rounds == 0 and not a.profile:
        p.error("--rounds 0 only makes sense with --profile")
    return Config(
        rounds=rounds, duration=duration, clients=a.clients, workloads=a.workloads,
        targets=a.targets, scale=scale, pool_size=a.pool_size, mode=a.mode, jobs=a.jobs,
        profile=a.profile, py_spy=a.py_spy, pgcorral_python=a.pgcorral_python,
        start_timeout=a.start_timeout,
        warmup=warmup, keep=a.keep, results_dir=a.results_dir,
    )  # fmt: skip


class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.mode = MODES[cfg.mode]
        self.tmp = Path(tempfile.mkdtemp(prefix="pgcorral-bench-"))
        os.chmod(self.tmp, 0o755)  # the server user must traverse it
        self.cluster = PgCluster(self.tmp / "pg")
        self.pgbench = self.cluster.bin("pgbench")
        self.psql = self.cluster.bin("psql")
        self.targets: dict[str, Target] = {}
        self.skipped: dict[str, str] = {}
        self.start_failures: list[str] = []  # skipped because broken, not because not installed
        self.runs: list[RunResult] = []
        self.profile: dict[str, Any] | None = None
        self.machine: dict[str, Any] = {}
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        self.pgbouncer_bin = shutil.which("pgbouncer") or next(
            (b for b in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(b, os.X_OK)),
            None,
        )

    # -- setup ---------------------------------------------------------------
    def setup_cluster(self) -> None:
        log(f"initialising PostgreSQL in {self.cluster.basedir} (port {self.cluster.port})")
        self.cluster.init(
            settings={
                # direct runs need one backend per client (500-client cells)
                "max_connections": str(max(400, max(self.cfg.clients) + 50)),
                "shared_buffers": "256MB",
                "fsync": "off",
                "synchronous_commit": "off",
            }
        )
        self.cluster.start()
        self.cluster.psql(f"CREATE DATABASE {DBNAME}")
        log(f"pgbench -i -s {self.cfg.scale}")
        self.cluster.pgbench("-i", "-q", "-s", str(self.cfg.scale), dbname=DBNAME)
        self.cluster.psql("VACUUM ANALYZE; CHECKPOINT;", dbname=DBNAME)

    def setup_targets(self) -> None:
        for name in self.cfg.targets:
            target: Target
            if name == "direct":
                target = DirectTarget(self.cluster)
            elif name == "pgbouncer":
                if self.pgbouncer_bin is None:
                    self.skip(
                        name,
                        "pgbouncer not found on PATH (nor /usr/sbin); install it with "
                        "`apt-get update && apt-get install -y pgbouncer`",
                    )
                    continue
                target = PgBouncerTarget(
                    self.pgbouncer_bin, self.tmp / "pgbouncer", self.cluster,
                    self.cfg.pool_size, self.mode, self.psql, self.cfg.start_timeout,
                )  # fmt: skip
            else:
                target = PgCorralTarget(
                    self.cfg.pgcorral_python, self.tmp / "pgcorral", self.cluster,
                    self.cfg.pool_size, self.mode, self.psql, self.cfg.start_timeout,
                )  # fmt: skip
            log(f"starting {name} on 127.0.0.1:{target.port}")
            try:
                target.start()
            except (TargetError, OSError) as e:
                target.stop()
                self.skip(name, f"failed to start: {e}")
                self.start_failures.append(name)
                continue
            if target.proc is not None:
                target.pid = target.proc.pid
                log(f"{name} is up (pid {target.proc.pid})")
            self.targets[name] = target

    def skip(self, name: str, why: str) -> None:
        self.skipped[name] = why
        log(f"SKIPPING target {name}: {why}")

    def reset_tables(self) -> None:
        """What pgbench's own pre-run vacuum does, done directly on the server."""
        self.cluster.psql(
            "TRUNCATE pgbench_history; VACUUM pgbench_branches; VACUUM pgbench_tellers; "
            "CHECKPOINT;",
            dbname=DBNAME,
        )

    # -- running -------------------------------------------------------------
    def one_run(
        self, target: Target, workload: str, clients: int, rnd: int, position: int,
        duration: int,
    ) -> RunResult:  # fmt: skip
        result = RunResult(rnd, workload, clients, target.name, position)
        try:
            target.check_alive()
        except TargetError as e:
            result.error = str(e)
            return result
        self.reset_tables()
        cmd = pgbench_cmd(
            self.pgbench, target.host, target.port, workload, clients, duration, self.cfg.jobs
        )
        return run_pgbench(cmd, result, timeout=duration + 120)

    def warmup(self) -> None:
        if self.cfg.warmup <= 0:
            return
        for target in self.targets.values():
            clients = max(self.cfg.clients)
            r = self.one_run(target, "select-prepared", clients, -1, 0, self.cfg.warmup)
            log(f"warm-up {target.name}: {fmt_tps(r.tps).strip()} tps")
            if r.bad:
                log(f"warm-up {target.name} problem: {describe_problem(r)}; pgbench said:\n"
                    + "\n".join(r.output.splitlines()[-15:]))  # fmt: skip

    def run_rounds(self) -> None:
        cells = [(w, c) for w in self.cfg.workloads for c in self.cfg.clients]
        order = [t for t in self.cfg.targets if t in self.targets]
        total = self.cfg.rounds * len(cells) * len(order)
        est = total * (self.cfg.duration + 1.5)
        log(f"{total} pgbench runs of {self.cfg.duration}s: about {est / 60:.1f} minutes")
        n = 0
        for rnd in range(self.cfg.rounds):
            for ci, (workload, clients) in enumerate(cells):
                # Rotate who goes first, by round and by cell: each target goes first in a
                # different round, and no target always runs right after the same neighbour.
                k = (rnd + ci) % len(order)
                rotated = order[k:] + order[:k]
                for pos, name in enumerate(rotated):
                    n += 1
                    r = self.one_run(
                        self.targets[name], workload, clients, rnd, pos, self.cfg.duration
                    )
                    self.runs.append(r)
                    flag = "" if not r.bad else f"  <-- {describe_problem(r)}"
                    log(
                        f"[{n}/{total}] round {rnd + 1} {WORKLOADS[workload][0]:<18} "
                        f"c={clients:<4} {name:<9} {fmt_tps(r.tps)} tps{flag}"
                    )

    def run_profile(self) -> None:
        cfg = self.cfg
        target = self.targets.get("pgcorral")
        if target is None or not isinstance(target, PgCorralTarget):
            log("--profile: pgcorral is not running; no profile taken")
            self.profile = {"error": "pgcorral not running"}
            return
        outdir = Path(cfg.results_dir) / f"{self.stamp}-profile"
        outdir.mkdir(parents=True, exist_ok=True)
        spy = find_py_spy(cfg.pgcorral_python, cfg.py_spy)
        dur = max(cfg.duration, 5)
        result = RunResult(-1, PROFILE_WORKLOAD, PROFILE_CLIENTS, "pgcorral", 0)
        info: dict[str, Any] = {"dir": str(outdir), "workload": PROFILE_WORKLOAD,
                                "clients": PROFILE_CLIENTS, "duration": dur}  # fmt: skip
        if spy is not None:
            assert target.proc is not None
            info["tool"] = first_line([spy, "--version"]) or "py-spy"
            self.reset_tables()
            cmd = pgbench_cmd(self.pgbench, target.host, target.port, PROFILE_WORKLOAD,
                              PROFILE_CLIENTS, dur, cfg.jobs)  # fmt: skip
            bench_proc = PROCS.start(
                "pgbench", cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=clean_env(),
            )  # fmt: skip
            time.sleep(1)  # past the connection ramp-up
            raw = outdir / "pgcorral.folded"
            spy_cmd = [spy, "record", "--pid", str(target.proc.pid), "--subprocesses",
                       "--function", "--nonblocking", "--rate", "200",
                       "--duration", str(max(1, dur - 2)), "--format", "raw",
                       "-o", str(raw)]  # fmt: skip
            log(f"profiling pgcorral pid {target.proc.pid}: {' '.join(spy_cmd)}")
            spy_res = subprocess.run(spy_cmd, capture_output=True, text=True, check=False,
                                     timeout=dur + 60)  # fmt: skip
            out, _ = bench_proc.communicate(timeout=dur + 120)
            PROCS.forget(bench_proc)
            result.returncode = bench_proc.returncode
            result.output = out.decode("utf-8", errors="replace")
            parse_pgbench(result.output, result)
            if spy_res.returncode != 0 or not raw.exists():
                info["error"] = f"py-spy failed ({spy_res.returncode}): {spy_res.stderr[-2000:]}"
                log(info["error"])
            else:
                stacks = read_collapsed(raw)
                title = f"pgcorral, pgbench {WORKLOADS[PROFILE_WORKLOAD][0]} c={PROFILE_CLIENTS}"
                write_flamegraph_svg(stacks, outdir / "flamegraph.svg", title)
                write_speedscope(stacks, outdir / "speedscope.json", title)
                (outdir / "top.txt").write_text(profile_summary(stacks))
                info["files"] = ["pgcorral.folded", "flamegraph.svg", "speedscope.json",
                                 "top.txt"]  # fmt: skip
        else:
            log("py-spy not found (pip install py-spy); falling back to cProfile on a "
                "dedicated pgcorral process")  # fmt: skip
            info["tool"] = "cProfile"
            prof_path = outdir / "pgcorral.prof"
            prof_target = PgCorralTarget(
                cfg.pgcorral_python, self.tmp / "pgcorral-cprofile", self.cluster,
                cfg.pool_size, self.mode, self.psql, cfg.start_timeout,
            )  # fmt: skip
            try:
                prof_target.start(wrapper=("-m", "cProfile", "-o", str(prof_path)))
            except (TargetError, OSError) as e:
                prof_target.stop()
                info["error"] = f"pgcorral under cProfile failed to start: {e}"
                log(info["error"])
                self.profile = info
                return
            self.reset_tables()
            cmd = pgbench_cmd(self.pgbench, prof_target.host, prof_target.port,
                              PROFILE_WORKLOAD, PROFILE_CLIENTS, dur, cfg.jobs)  # fmt: skip
            run_pgbench(cmd, result, timeout=dur + 120)
            assert prof_target.proc is not None
            PROCS.stop(prof_target.proc, signal.SIGINT)  # cProfile writes its file on exit
            prof_target.proc = None
            if prof_path.exists():
                import pstats
                from io import StringIO

                buf = StringIO()
                st = pstats.Stats(str(prof_path), stream=buf)
                st.sort_stats("tottime").print_stats(40)
                st.sort_stats("cumulative").print_stats(40)
                (outdir / "top.txt").write_text(buf.getvalue())
                info["files"] = ["pgcorral.prof", "top.txt"]
            else:
                info["error"] = "cProfile wrote no file (pgcorral did not exit cleanly on SIGINT)"
                log(info["error"])
        info["tps_under_profiler"] = result.tps
        info["failed_tx"] = result.failed_tx
        log(f"profile run: {fmt_tps(result.tps)} tps under the profiler; files in {outdir}")
        self.profile = info

    # -- reporting -----------------------------------------------------------
    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for workload in self.cfg.workloads:
            for clients in self.cfg.clients:
                row: dict[str, Any] = {"workload": workload, "label": WORKLOADS[workload][0],
                                       "clients": clients}  # fmt: skip
                for t in self.cfg.targets:
                    runs = [r for r in self.runs if (r.workload, r.clients, r.target)
                            == (workload, clients, t)]  # fmt: skip
                    # An aborted run's TPS comes from the clients that survived: not comparable.
                    vals = [r.tps for r in runs if r.tps is not None and r.usable]
                    row[t] = {
                        "median_tps": statistics.median(vals) if vals else None,
                        "rounds": [r.tps for r in runs],
                        "spread_pct": (
                            round(100 * (max(vals) - min(vals)) / statistics.median(vals), 1)
                            if len(vals) > 1 and statistics.median(vals)
                            else None
                        ),
                        "failures": [describe_problem(r) for r in runs if r.bad],
                    }
                row["pgcorral/pgbouncer"] = ratio(row, "pgcorral", "pgbouncer")
                row["pgcorral/direct"] = ratio(row, "pgcorral", "direct")
                row["pgbouncer/direct"] = ratio(row, "pgbouncer", "direct")
                rows.append(row)
        return rows

    def report(self, rows: list[dict[str, Any]]) -> str:
        hdr = ["workload", "clients", "direct", "pgbouncer", "pgcorral",
               "corral/bouncer", "corral/direct", "bouncer/direct"]  # fmt: skip
        table = [hdr]
        for row in rows:
            cells = [row["label"], str(row["clients"])]
            for t in ALL_TARGETS:
                cells.append(self._cell(row, t))
            for key in ("pgcorral/pgbouncer", "pgcorral/direct", "pgbouncer/direct"):
                cells.append(f"{row[key]:.2f}" if row[key] is not None else "-")
            table.append(cells)
        widths = [max(len(r[i]) for r in table) for i in range(len(hdr))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(r, widths, strict=True)))
            for r in table
        ]  # fmt: skip
        lines.insert(1, "-" * len(lines[0]))
        out = [
            f"Median TPS over {self.cfg.rounds} round(s) of {self.cfg.duration}s, "
            f"mode={self.cfg.mode}, pool size {self.cfg.pool_size}, scale {self.cfg.scale}, "
            f"pgbench -j {self.cfg.jobs}",
            *lines,
            "'!' = a run of the cell failed or had failed transactions (an aborted run is left"
            " out of the median);",
            "'skipped' = target not run; ratio > 1: the first target is faster.",
        ]
        for name, why in self.skipped.items():
            out.append(f"{name} skipped: {why}")
        out += ["", "Per-round TPS (round 1, 2, ...; spread = (max-min)/median):"]
        for row in rows:
            for t in self.cfg.targets:
                d = row[t]
                if not d["rounds"]:
                    continue
                vals = ", ".join(fmt_tps(v).strip() for v in d["rounds"])
                spread = f"  spread {d['spread_pct']}%" if d["spread_pct"] is not None else ""
                fails = f"  FAILED: {'; '.join(d['failures'])}" if d["failures"] else ""
                out.append(f"  {row['label']:<18} c={row['clients']:<4} {t:<9} "
                           f"[{vals}]{spread}{fails}")  # fmt: skip
        return "\n".join(out)

    def _cell(self, row: dict[str, Any], t: str) -> str:
        if t not in row:
            return "-"
        if t in self.skipped:
            return "skipped"
        d = row[t]
        if not d["rounds"]:
            return "-"
        mark = "!" if d["failures"] else ""
        return (fmt_tps(d["median_tps"]).strip() if d["median_tps"] is not None else "fail") + mark

    def write_json(self, rows: list[dict[str, Any]], status: str) -> Path:
        outdir = Path(self.cfg.results_dir)
        outdir.mkdir(parents=True, exist_ok=True)
        path = outdir / f"{self.stamp}.json"
        doc = {
            "status": status,
            "started": self.started,
            "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": sys.argv,
            "config": asdict(self.cfg),
            "machine": self.machine,
            "loadavg_at_end": os.getloadavg(),
            "targets": {
                name: {"port": t.port, "version": t.version(), "pid": t.pid}
                for name, t in self.targets.items()
            },
            "skipped": self.skipped,
            "summary": rows,
            "profile": self.profile,
            "runs": [asdict(r) for r in self.runs],
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    # -- main ----------------------------------------------------------------
    def run(self) -> int:
        status = "interrupted"
        try:
            self.setup_cluster()
            self.machine = machine_info(
                self.cluster, self.pgbench, self.pgbouncer_bin, self.cfg.pgcorral_python
            )
            self.setup_targets()
            if not self.targets:
                log("no target could be started; nothing to measure")
                status = "no targets"
                return 1
            self.warmup()
            self.run_rounds()
            if self.cfg.profile:
                self.run_profile()
            status = "complete"
        except KeyboardInterrupt:
            log("interrupted; cleaning up")
        except Exception as e:  # report what we have, then clean up
            import traceback

            traceback.print_exc()
            status = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"{status}; cleaning up")
        finally:
            # No second Ctrl-C half way through the cleanup.
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self.cleanup()
                rows = self.summary()
                if self.runs:
                    print()
                    print(self.report(rows))
                if self.runs or self.profile:
                    path = self.write_json(rows, status)
                    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                    log(f"results written to {shown}")
            finally:
                signal.signal(signal.SIGINT, old)
        ok = status == "complete" and not self.start_failures and not any(r.bad for r in self.runs)
        return 0 if ok else 1

    def cleanup(self) -> None:
        for target in list(self.targets.values())[::-1]:
            try:
                target.stop()
            except Exception as e:  # keep going: the cluster must still be stopped
                log(f"stopping {target.name}: {e}")
        PROCS.stop_all()
        try:
            if self.cfg.keep:
                self.cluster.stop()
                log(f"kept {self.tmp}")
            else:
                self.cluster.destroy()
                shutil.rmtree(self.tmp, ignore_errors=True)
        except Exception as e:
            log(f"stopping PostgreSQL: {e}")


def describe_problem(r: RunResult) -> str:
    where = f"round {r.round + 1}" if r.round >= 0 else "warm-up/profile"
    if r.error:
        return f"{where}: {r.error.splitlines()[0]}"
    bits = []
    if r.failed_tx:
        bits.append(f"{r.failed_tx} failed transactions")
    if r.aborted:
        bits.append("run aborted")
    if r.returncode:
        bits.append(f"pgbench exit {r.returncode}")
    cause = next((ln for ln in r.output.splitlines() if "error" in ln.lower()), "")
    return f"{where}: " + ", ".join(bits) + (f" ({cause.strip()})" if cause else "")


def fmt_tps(v: float | None) -> str:
    return f"{v:9.0f}" if v is not None else "     fail"


def ratio(row: dict[str, Any], a: str, b: str) -> float | None:
    x = row.get(a, {}).get("median_tps")
    y = row.get(b, {}).get("median_tps")
    if x is None or not y:
        return None
    return round(float(x) / float(y), 3)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    # Explicit, so that cleanup also runs when started with SIGINT ignored (e.g. `cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    bench = Bench(cfg)
    return bench.run()


if __name__ == "__main__":
    sys.exit(main())
