"""``pgcorral-cli top`` in a real terminal (tmux, on a tmux server of the test's own): the pool
line appears, its transaction count moves after queries, ``q`` quits with status 0; locally
and remotely. Also what ``Screen`` computes from two snapshots, and the refusals."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from devtools.pgcluster import find_free_port
from tests.conftest import REPO_ROOT
from tests.integration.test_management import _admins, cli, run_cli

from pgcorral.cli.top import Screen, fmt_duration, fmt_us
from pgcorral.pool.stats import NBUCKETS, bucket_index

if TYPE_CHECKING:
    from tests.conftest import Daemon, DaemonFactory

TMUX = shutil.which("tmux")


class Terminal:
    """One tmux session on a tmux server of its own (``-L``), 160x50, whose pane stays after
    the program exits (to read its exit status)."""

    def __init__(self, tmp: Path, command: list[str], env: dict[str, str]) -> None:
        if TMUX is None:
            if os.environ.get("CI"):
                pytest.fail("tmux is not installed (CI must install it: apt-get install tmux)")
            pytest.skip("tmux is not installed (apt-get install tmux)")
        self.socket = f"pgcorral-top-{os.getpid()}-{time.monotonic_ns()}"
        conf = tmp / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g status off\n", encoding="utf-8")
        line = " ".join(shlex.quote(a) for a in
                        ["env", *(f"{k}={v}" for k, v in env.items()), *command])
        # the shell writes the exit status to a file (tmux 3.3's #{pane_dead_status} stays
        # empty at times, and output written just before the pane dies can be lost)
        self.status_file = tmp / "top-exit-status"
        line = f"{line}; echo $? > {shlex.quote(str(self.status_file))}"
        self.tmux("-f", str(conf), "new-session", "-d", "-s", "top", "-x", "160", "-y", "50",
                  line)

    def tmux(self, *args: str) -> str:
        assert TMUX is not None
        done = subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=20, check=False)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_for(self, test: Any, what: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            found = test(text)
            if found:
                return found
            assert time.monotonic() < deadline, f"timed out waiting for {what}; screen:\n{text}"
            time.sleep(0.1)

    def exit_status(self, timeout: float = 10.0) -> str:
        """The program's exit status, once it has exited and the pane is dead."""
        deadline = time.monotonic() + timeout
        while True:
            dead = self.tmux("display-message", "-p", "-t", "top", "#{pane_dead}").strip()
            if dead == "1" and self.status_file.exists():
                return self.status_file.read_text(encoding="utf-8").strip()
            assert time.monotonic() < deadline, f"the program did not exit:\n{self.screen()}"
            time.sleep(0.05)

    def close(self) -> None:
        assert TMUX is not None
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=20, check=False)


@pytest.fixture
def terminals(tmp_path: Path) -> Iterator[list[Terminal]]:
    started: list[Terminal] = []
    yield started
    for term in started:
        term.close()


def top_command(*args: str) -> tuple[list[str], dict[str, str]]:
    env = {"PYTHONPATH": str(REPO_ROOT / "src"), "TERM": "screen", "LANG": "C.UTF-8"}
    env.update({k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ})
    return [sys.executable, "-m", "pgcorral.cli.cli", *args, "top", "--interval", "0.5"], env


def pool_line(screen: str) -> list[str] | None:
    for line in screen.splitlines():
        cells = line.split()
        if cells[:2] == ["pgcorral_test", "trustuser"]:
            return cells
    return None


def xacts(screen: str) -> int | None:
    cells = pool_line(screen)
    return int(cells[12]) if cells is not None else None


def watch(d: Daemon, term: Terminal) -> None:
    """The pools appear; 20 transactions later their count has moved; q quits."""
    with psycopg.connect(d.dsn(application_name="top-test"), autocommit=True) as held:
        held.execute("select 1")
        screen = term.wait_for(lambda s: pool_line(s) and "top-test" in s and s,
                               "the pool and the client")
        assert screen.startswith("pgcorral ") and " running " in screen.splitlines()[0]
        assert "POOLS" in screen and "CLIENTS (" in screen
        before = xacts(screen)
        assert before is not None
        for _ in range(20):
            held.execute("select 1")
        term.wait_for(lambda s: (n := xacts(s)) is not None and n >= before + 20,
                      f"20 more transactions than {before}")
    print(term.screen())
    term.tmux("send-keys", "-t", "top", "q")
    assert term.exit_status() == "0", term.screen()


def test_top_locally(pgcorral: DaemonFactory, terminals: list[Terminal],
                     tmp_path: Path) -> None:
    d = pgcorral()
    command, env = top_command("-c", os.path.join(d.dir, "pgcorral.conf"))
    term = Terminal(tmp_path, command, env)
    terminals.append(term)
    watch(d, term)


def test_top_remotely(pgcorral: DaemonFactory, terminals: list[Terminal],
                      tmp_path: Path) -> None:
    admins, key_env = _admins(tmp_path)
    port = find_free_port()
    d = pgcorral({"management": str(port)}, env=key_env, args=["-A", admins])
    command, env = top_command("-h", "127.0.0.1", "-p", str(port), "-U", "admin")
    env["PGCORRAL_PASSWORD"] = "adm1n-secret"
    term = Terminal(tmp_path, command, env)
    terminals.append(term)
    watch(d, term)


def test_top_refusals(pgcorral: DaemonFactory, tmp_path: Path) -> None:
    d = pgcorral()
    done = cli(d, "-F", "json", "top")
    assert done.returncode == 2 and done.stderr == "pgcorral-cli: -F does not apply to top\n"
    done = cli(d, "top", "--interval", "0")
    assert done.returncode == 2 and "--interval must be" in done.stderr
    done = cli(d, "top", "now")
    assert done.returncode == 2 and "top takes no arguments" in done.stderr
    done = cli(d, "ping", "--interval", "2")
    assert done.returncode == 2 and "--interval applies to top only" in done.stderr
    done = cli(d, "top")  # stdin and stdout are pipes here
    assert done.returncode == 2 and "top needs a terminal" in done.stderr
    conf = tmp_path / "pgcorral.conf"
    conf.write_text(f"[pgcorral]\nhost = 127.0.0.1\nport = {find_free_port()}\n"
                    f"unix_socket_dir = {tmp_path}\n\n[p]\nhost = 127.0.0.1\nport = 5432\n",
                    encoding="utf-8")
    done = run_cli("-c", str(conf), "stats")
    assert done.returncode == 1 and "pgcorral is not running" in done.stderr


def test_top_says_unavailable_and_comes_back(pgcorral: DaemonFactory,
                                             terminals: list[Terminal],
                                             tmp_path: Path) -> None:
    """A daemon that goes away is shown as unavailable; q still quits."""
    d = pgcorral()
    command, env = top_command("-c", os.path.join(d.dir, "pgcorral.conf"))
    term = Terminal(tmp_path, command, env)
    terminals.append(term)
    term.wait_for(lambda s: s.startswith("pgcorral "), "the first screen")
    d.stop()
    term.wait_for(lambda s: s.startswith("unavailable: "), "unavailable")
    term.tmux("send-keys", "-t", "top", "q")
    assert term.exit_status() == "0"


# --- what Screen computes ----------------------------------------------------------------------


def snap(t: float, xacts: int, xact_us: list[int],
         clients: list[tuple[int, int]]) -> dict[str, Any]:
    hist = [0] * NBUCKETS
    for us in xact_us:
        hist[bucket_index(us)] += 1
    pool = {"database": "db", "user": "u", "pool_mode": "transaction", "cl_active": 1,
            "cl_waiting": 2, "cl_idle": 3, "sv_active": 1, "sv_idle": 4, "sv_used": 1,
            "sv_tested": 1, "sv_login": 1, "maxwait_us": 2500, "xact_count": xacts,
            "query_count": 2 * xacts,
            "hist": {"xact": hist, "wait": [xacts] + [0] * (NBUCKETS - 1), "query": hist}}
    rows = [{"worker": 0, "id": i, "address": "127.0.0.1", "port": 5000 + i,
             "application_name": f"app{i}", "user": "u", "database": "db", "state": "idle",
             "xact_count": n, "wait_us": 0, "hold_us": 0, "tls": "", "connect_time": t - 10,
             "wait_current_us": 0} for i, n in clients]
    return {"time": t, "started": t - 3661, "status": "running", "pipeline": "transaction",
            "max_connections": 20, "pools": [pool], "clients": rows, "servers": [],
            "workers": [{}, {}]}


def test_screen_rates_between_refreshes() -> None:
    screen = Screen(1.0)
    first = screen.frame(snap(100.0, 1000, [100] * 1000, [(1, 5), (2, 50)]))
    assert first[0].startswith("pgcorral ") and "up 01:01:01  workers 2  transaction" in first[0]
    cells = pool_line_of(first)
    assert cells[10:12] == ["-", "-"] and cells[12] == "1000"  # no rate before a second frame
    # two seconds later: 40 transactions more, all of 20 ms; client 1 made 30 of them
    later = screen.frame(snap(102.0, 1040, [100] * 1000 + [20_000] * 40, [(1, 35), (2, 60)]))
    cells = pool_line_of(later)
    assert cells[3:9] == ["1", "2", "3", "1", "4", "3"] and cells[9] == "2.5ms"
    assert cells[10:13] == ["20.0", "40.0", "1040"]
    assert cells[13].endswith("ms") and 16.3 <= float(cells[13][:-2]) <= 32.8
    clients = [line.split() for line in later if line.startswith("0 ")]
    assert [c[1] for c in clients] == ["1", "2"]  # the busiest first
    assert clients[0][7] == "15.0" and clients[1][7] == "5.0"
    assert len(screen.frame(snap(104.0, 1040, [], [(i, 0) for i in range(100)]), 20)) == 20


def pool_line_of(lines: list[str]) -> list[str]:
    cells = next(line.split() for line in lines if line.startswith("db "))
    return cells


def test_formats() -> None:
    assert fmt_us(12) == "12us" and fmt_us(2500) == "2.5ms" and fmt_us(3_200_000) == "3.20s"
    assert fmt_duration(90061) == "1d 01:01:01"
