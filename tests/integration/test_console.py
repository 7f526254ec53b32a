"""The web console (``console = PORT``): its JSON API against a running pgcorral (shape,
percentiles, the history growing with traffic), bad requests, and the page itself in a real
browser (headless chromium: the pools appear, a transaction counter moves after queries, a
client-chosen ``application_name`` stays text, a failing API shows "unavailable")."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from devtools.pgcluster import find_free_port
from tests.integration.test_management import poll

from pgcorral.config import Config
from pgcorral.management import console
from pgcorral.management.http import HttpServer
from pgcorral.pool.stats import BUCKETS_US, NBUCKETS, bucket_index
from pgcorral.security.secrets import Secrets

if TYPE_CHECKING:
    from tests.conftest import Daemon, DaemonFactory

WORKERS = int(os.environ.get("PGCORRAL_TEST_WORKERS", "1"))
POOL = "pgcorral_test/trustuser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVIL = '<img id=xss src=x onerror="document.title=1">'


# --- helpers -----------------------------------------------------------------------------------


def http(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def api(port: int, path: str) -> dict[str, Any]:
    status, headers, body = http(port, path)
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    answer: dict[str, Any] = json.loads(body)
    return answer


def pool_of(stats: dict[str, Any]) -> dict[str, Any] | None:
    for pool in stats["pools"]:
        if (pool["database"], pool["user"]) == ("pgcorral_test", "trustuser"):
            return pool
    return None


def transactions(d: Daemon, n: int, sleep_ms: int = 0, app: str = "console-test") -> None:
    """``n`` transactions (each one SELECT) on one connection."""
    with psycopg.connect(d.dsn(application_name=app), autocommit=True) as conn:
        for _ in range(n):
            conn.execute(f"select pg_sleep({sleep_ms / 1000})" if sleep_ms else "select 1")


@pytest.fixture
def daemon(pgcorral: DaemonFactory) -> Iterator[tuple[Daemon, int]]:
    port = find_free_port()
    d = pgcorral({"console": str(port)})  # no metrics: the console does not need them
    d.wait_for_log(f"console: listening on 127.0.0.1:{port}")
    yield d, port


# --- the JSON API ------------------------------------------------------------------------------


def test_api_stats_shape_and_percentiles(daemon: tuple[Daemon, int]) -> None:
    d, port = daemon
    transactions(d, 20, sleep_ms=20)
    with psycopg.connect(d.dsn(application_name="watcher")) as held:
        held.execute("select 1")
        stats = poll(lambda: (s := api(port, "/api/stats")) and pool_of(s)
                     and pool_of(s)["xact_count"] >= 21 and s, "20 transactions in /api/stats")
        assert stats["version"] and stats["status"] == "running"
        assert stats["uptime_s"] >= 0 and abs(stats["server_time"] - time.time()) < 5
        assert len(stats["workers"]) == WORKERS
        assert stats["buckets_us"] == list(BUCKETS_US)
        pool = pool_of(stats)
        assert pool is not None
        assert pool["cl_active"] + pool["cl_idle"] >= 1
        pct = pool["percentiles_us"]
        assert set(pct) == {"wait", "xact", "query"}
        for kind in pct.values():
            assert set(kind) == {"p50", "p95", "p99"}
            assert kind["p50"] <= kind["p95"] <= kind["p99"]
        # 20 of 21 transactions slept 20 ms: their median lies in the 16-32 ms bucket (or,
        # on a loaded machine, the next one)
        assert 16384 <= pct["xact"]["p50"] <= 65536, pct
        assert len(pool["hist"]["xact"]) == NBUCKETS
        assert sum(pool["hist"]["xact"]) == pool["xact_count"]
        assert sum(pool["hist"]["xact"][bucket_index(20_000):]) >= 20
        mine = [c for c in stats["clients"] if c["application_name"] == "watcher"]
        assert len(mine) == 1 and mine[0]["user"] == "trustuser"
        assert mine[0]["state"] in ("idle", "active")
        groups = {(g["address"], g["application_name"], g["user"]): g
                  for g in stats["client_groups"]}
        assert groups[("127.0.0.1", "console-test", "trustuser")]["xact_count"] >= 20
        assert groups[("127.0.0.1", "watcher", "trustuser")]["clients"] == 1
        assert any(s["database"] == "pgcorral_test" for s in stats["servers"])


def test_api_history_grows_with_traffic(daemon: tuple[Daemon, int]) -> None:
    d, port = daemon
    first = poll(lambda: api(port, "/api/history")["samples"], "a first sample")
    history = api(port, "/api/history")
    assert history["interval_s"] == console.SAMPLE_INTERVAL
    assert history["max_samples"] == console.HISTORY_SECONDS / console.SAMPLE_INTERVAL
    transactions(d, 30, sleep_ms=10)

    def busy() -> dict[str, Any] | None:
        for sample in api(port, "/api/history")["samples"]:
            pools = {(p["database"], p["user"]): p for p in sample["pools"]}
            pool = pools.get(("pgcorral_test", "trustuser"))
            if pool is not None and pool["tps"] > 0:
                return sample
        return None

    sample = poll(busy, "a sample with transactions")
    samples = api(port, "/api/history")["samples"]
    times = [s["time"] for s in samples]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert len(samples) > len(first)
    pool = next(p for p in sample["pools"] if p["database"] == "pgcorral_test")
    assert pool["xact_p50_us"] <= pool["xact_p95_us"] <= pool["xact_p99_us"]
    # the 10 ms transactions of this interval: p95 at least the 8-16 ms bucket
    assert pool["xact_p95_us"] >= 8192, pool
    assert sample["total"]["tps"] >= pool["tps"] > 0
    assert pool["tps"] * sample["interval_s"] <= 31.5
    for key in ("cl_active", "cl_idle", "cl_waiting", "sv_active", "sv_idle"):
        assert key in pool and key in sample["total"]
    # ?since= gives only the newer samples; the stats' "recent" window saw the traffic too
    later = api(port, f"/api/history?since={sample['time']}")["samples"]
    assert all(s["time"] > sample["time"] for s in later)
    recent = pool_of(api(port, "/api/stats"))
    assert recent is not None and recent["recent"] is not None
    assert recent["recent"]["tps"] > 0 and recent["recent"]["xact_p50_us"] >= 8192


def test_bad_requests(daemon: tuple[Daemon, int]) -> None:
    _, port = daemon
    assert http(port, "/nowhere")[0] == 404
    assert http(port, "/api/stats/extra")[0] == 404
    status, headers, _ = http(port, "/api/stats", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, _, body = http(port, "/api/history?since=yesterday")
    assert status == 400 and b"since" in body
    status, headers, body = http(port, "/", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    assert api(port, "/api/stats")["status"] == "running"  # still serving


def test_page_headers(daemon: tuple[Daemon, int]) -> None:
    _, port = daemon
    status, headers, body = http(port, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"<script>" in body and b"http://" not in body and b"https://" not in body
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp
    assert "connect-src 'self'" in csp and "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"


# --- the sampler's arithmetic, with made-up snapshots -------------------------------------------


class _Controller:
    """A Controller whose ``stats`` is whatever the test set (or an error)."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] | None = None
        self.calls = 0

    @property
    def config(self) -> Config:
        raise NotImplementedError

    @property
    def secrets(self) -> Secrets:
        raise NotImplementedError

    @property
    def shutting_down(self) -> bool:
        return False

    async def call(self, operation: str, *args: Any) -> Any:
        assert operation == "stats"
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.stats is None:
            raise ConnectionError("worker 0 did not answer")
        return self.stats

    def note_command(self) -> None:
        pass

    def stop(self, mode: str) -> None:
        pass

    def cancel_shutdown(self) -> bool:
        return False

    def reload(self) -> list[str]:
        return []


def snapshot(t: float, xacts: int, xact_us: list[int], state: int = 0) -> dict[str, Any]:
    hist = [0] * NBUCKETS
    for us in xact_us:
        hist[bucket_index(us)] += 1
    pool = {"database": "db", "user": "u", "xact_count": xacts, "query_count": 2 * xacts,
            "hist": {"wait": [0] * NBUCKETS, "xact": hist, "query": [0] * NBUCKETS},
            "cl_active": state, "cl_idle": 1, "cl_waiting": 0, "sv_active": state, "sv_idle": 2}
    return {"time": t, "started": t - 100, "pools": [pool], "clients": [], "servers": [],
            "status": "running", "worker": 0, "pid": 1}


def test_sample_rates_come_from_the_difference_of_histograms() -> None:
    c = console.Console(_Controller(), sample_interval=2.0)
    assert c.sample(snapshot(1000.0, 100, [100] * 100)) is None  # the baseline
    # in two seconds: 40 more transactions, all of 20 ms (the old 100 us ones do not count)
    entry = c.sample(snapshot(1002.0, 140, [100] * 100 + [20_000] * 40, state=3))
    assert entry is not None
    pool = entry["pools"][0]
    assert pool["tps"] == 20.0 and pool["qps"] == 40.0
    assert 16384 <= pool["xact_p50_us"] <= pool["xact_p99_us"] <= 32768
    assert pool["cl_active"] == 3 and entry["total"]["sv_idle"] == 2
    assert entry["total"]["tps"] == 20.0
    assert c.sample(snapshot(1002.0, 150, [])) is None  # not newer: ignored
    # `clear prometheus` set everything back to 0: the new counts are the interval's
    entry = c.sample(snapshot(1004.0, 4, [1000] * 4))
    assert entry is not None and entry["pools"][0]["tps"] == 2.0
    assert 512 <= entry["pools"][0]["xact_p99_us"] <= 1024
    assert len(c.history) == 2
    # the `recent` window of /api/stats: from the oldest point kept to now
    enriched = c.enrich(snapshot(1006.0, 10, [1000] * 10))
    assert enriched["workers"] == [{"worker": 0, "pid": 1, "clients": 0, "servers": 0}]
    assert enriched["uptime_s"] == 100
    recent = enriched["pools"][0]["recent"]
    assert recent["window_s"] == 6.0 and recent["tps"] == round(10 / 6, 2)


def test_history_is_bounded() -> None:
    c = console.Console(_Controller(), sample_interval=2.0)
    for i in range(600):
        c.sample(snapshot(float(i * 2), i, []))
    assert len(c.history) == console.HISTORY_SECONDS / 2
    assert c.history[0]["time"] == 2 * (600 - 450)


def test_snapshot_is_shared_and_cached() -> None:
    async def go() -> None:
        controller = _Controller()
        c = console.Console(controller)
        with pytest.raises(console.Unavailable, match="did not answer"):
            await c.snapshot()
        controller.stats = snapshot(1.0, 0, [])
        got = await asyncio.gather(*(c.snapshot() for _ in range(10)))
        assert controller.calls == 2 and all(g is got[0] for g in got)
        await c.snapshot()
        assert controller.calls == 2  # younger than MAX_AGE
        # the caller whose call it is gets cancelled: the others hear of it, they do not hang
        first = asyncio.ensure_future(c.snapshot(max_age=0))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(c.snapshot(max_age=0))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(console.Unavailable):
            await asyncio.wait_for(second, 5)
        assert (await c.snapshot(max_age=0))["time"] == 1.0  # and the next call is made
    asyncio.run(go())


# --- a real browser ----------------------------------------------------------------------------


def _need_chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must install it: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return CHROMIUM


def chromium(url: str, *extra: str, budget_ms: int = 6000) -> str:
    """Run headless chromium on ``url``; its stdout (the DOM with --dump-dom)."""
    with_profile = f"--user-data-dir={os.environ.get('TMPDIR', '/tmp')}/pgcorral-chromium-" \
        f"{os.getpid()}-{threading.get_ident()}"
    cmd = [_need_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
           "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
           "--disable-background-networking", "--disable-sync", "--hide-scrollbars",
           "--mute-audio", with_profile, f"--virtual-time-budget={budget_ms}", *extra, url]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    finally:
        shutil.rmtree(with_profile.split("=", 1)[1], ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Dom(HTMLParser):
    """The parts of the dumped DOM the tests read: rows of the tables' bodies (each a dict of
    the ``tr`` attributes and its cells' texts), and texts by element id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: dict[str, list[tuple[dict[str, str], list[tuple[str, str]]]]] = {}
        self.by_id: dict[str, str] = {}
        self.ids: set[str] = set()
        self._stack: list[tuple[str, str]] = []  # (tag, id) of open elements
        self._body = ""
        self._cell: list[str] | None = None
        self._cls = ""
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag in ("meta", "br", "img", "input", "link"):
            return
        self._stack.append((tag, a.get("id", "")))
        if tag == "tbody":
            self._body = a.get("id", "")
            self.rows[self._body] = []
        elif tag == "tr" and self._body:
            self.rows[self._body].append((a, []))
        elif tag == "td" and self._body:
            self._cell, self._cls = [], a.get("class", "")

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            open_tag, open_id = self._stack.pop()
            if open_id and open_id not in self.by_id:
                self.by_id[open_id] = ""
            if open_tag == tag:
                break
        if tag == "td" and self._cell is not None and self._body:
            self.rows[self._body][-1][1].append((self._cls, "".join(self._cell).strip()))
            self._cell = None
        elif tag == "tbody":
            self._body = ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, open_id in self._stack:
            if open_id:
                self.by_id[open_id] = self.by_id.get(open_id, "") + data

    def pool_row(self, pool: str) -> dict[str, str] | None:
        for attrs, cells in self.rows.get("pools-body", []):
            if attrs.get("data-pool") == pool:
                return {cls.split()[-1] if cls else str(i): text
                        for i, (cls, text) in enumerate(cells)}
        return None


def number(text: str) -> int:
    return int(text.replace(",", ""))


def test_page_in_chromium(daemon: tuple[Daemon, int], tmp_path: Path) -> None:
    d, port = daemon
    _need_chromium()
    url = f"http://127.0.0.1:{port}/"
    with psycopg.connect(d.dsn(application_name=EVIL), autocommit=True) as held:
        held.execute("select 1")
        transactions(d, 5)
        poll(lambda: pool_of(api(port, "/api/stats")), "the pool")
        dom = Dom(chromium(url, "--dump-dom"))
        assert dom.by_id["status"].strip() == "running", dom.by_id
        row = dom.pool_row(POOL)
        assert row is not None, dom.rows.get("pools-body")
        assert row["db"] == "pgcorral_test" and row["user"] == "trustuser"
        before = number(row["xacts"])
        assert dom.by_id["workers"].strip() == str(WORKERS)
        # the hostile application_name is a cell's text, never an element
        assert "xss" not in dom.ids
        assert any(cells[3][1] == EVIL for _, cells in dom.rows["clients-body"]), \
            dom.rows["clients-body"]
        # the sampler has a baseline (with workers it starts when they answer), so the
        # next transactions fall into a sample's interval
        poll(lambda: api(port, "/api/history")["samples"], "a first sample")
        transactions(d, 25)
        poll(lambda: (p := pool_of(api(port, "/api/stats"))) and p["xact_count"] >= before + 25,
             "25 more transactions")
        poll(lambda: any(p["tps"] > 0 for s in api(port, "/api/history")["samples"]
                         for p in s["pools"]), "a sample with transactions",
             more=lambda: f"history: {api(port, '/api/history')}\nlog: {d.log()}")
        dom = Dom(chromium(url, "--dump-dom"))
        row = dom.pool_row(POOL)
        assert row is not None and number(row["xacts"]) >= before + 25
        assert any(cells[1][1] == "console-test" for _, cells in dom.rows["groups-body"])
        shot = tmp_path / "console.png"
        chromium(url, f"--screenshot={shot}", "--window-size=1400,1000")
    assert shot.stat().st_size > 10_000  # a blank page compresses to far less
    keep = Path(os.environ.get("PGCORRAL_SCREENSHOT_DIR") or tmp_path.parent) / \
        f"console-{WORKERS}w.png"
    shutil.copyfile(shot, keep)
    print(f"screenshot: {keep}")


class _FakeService:
    """The console (HTTP server and sampler) on a loop in a thread, over a fake controller."""

    def __init__(self, controller: _Controller, sample_interval: float = 0.2) -> None:
        self.port = find_free_port()
        self.controller = controller
        self.sample_interval = sample_interval
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        state = console.Console(self.controller, self.sample_interval)
        self.server = HttpServer("console", state.routes())

        async def start() -> None:
            await self.server.start("127.0.0.1", self.port)
            self.server.run_beside(state.run())
        self.loop.run_until_complete(start())
        self._started.set()
        self.loop.run_forever()

    def __enter__(self) -> _FakeService:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        time.sleep(0.05)  # let the sampler see its cancellation
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def test_page_says_unavailable_when_the_api_fails() -> None:
    _need_chromium()
    with _FakeService(_Controller()) as service:
        assert http(service.port, "/api/stats")[0] == 503
        dom = Dom(chromium(f"http://127.0.0.1:{service.port}/", "--dump-dom", budget_ms=3000))
    assert dom.by_id["status"].strip() == "unavailable"
    assert "did not answer" in dom.by_id["error"]


class _Busy(_Controller):
    """A pooler of two pools whose counters grow by ``tps`` per second of real time, with
    clients, server connections and client groups: every table and chart of the page has
    something to show."""

    def __init__(self) -> None:
        super().__init__()
        self.t0 = time.time()

    async def call(self, operation: str, *args: Any) -> Any:
        self.calls += 1
        now = time.time()
        pools = []
        for i, (db, tps, us) in enumerate((("app", 300, 3000), ("reports", 20, 90_000))):
            n = int((now - self.t0) * tps) + 1000 * (i + 1)
            hist = [0] * NBUCKETS
            hist[bucket_index(us)] = n - n // 10
            hist[bucket_index(us * 4)] = n // 10
            tally = {"xact_count": n, "query_count": 3 * n, "bytes_received": 90 * n,
                     "bytes_sent": 400 * n, "xact_time_us": us * n, "query_time_us": us * n,
                     "wait_time_us": 50 * n, "wait_count": n, "hold_time_us": us * n}
            pools.append({"database": db, "user": "u" + str(i), "pool_mode": "session",
                          "cl_active": 3 - i, "cl_waiting": i, "cl_idle": 5, "cl_login": 0,
                          "sv_active": 3 - i, "sv_idle": 2, "sv_used": 0, "sv_tested": 0,
                          "sv_login": 0, "maxwait_us": 1500 * i, "pool_size": 20,
                          "min_pool_size": 0, **tally, "errors": {}, "logins": {},
                          "prepared": {"hits": 0, "misses": 0, "evictions": 0},
                          "hist": {"wait": [n] + [0] * (NBUCKETS - 1), "xact": hist,
                                   "query": hist},
                          "hist_sum_us": {"wait": 0, "xact": us * n, "query": us * n}})
        clients = [{"id": k, "worker": k % 2, "database": "app", "user": "u0",
                    "address": f"10.0.0.{k}", "port": 40000 + k,
                    "application_name": EVIL if k == 4 else f"web-{k % 3}",
                    "state": ("active", "idle", "waiting")[k % 3],
                    "tls": "TLSv1.3" if k % 2 else "", "connect_time": self.t0 - 60 * k,
                    "request_time": now - 1, "wait_us": 10 * k, "hold_us": 1000 * k,
                    "wait_current_us": 0, "server_pid": 5000 + k if k % 3 == 0 else 0,
                    "server_id": k, "xact_count": 10 * k, "query_count": 30 * k,
                    "bytes_received": 0, "bytes_sent": 0, "xact_time_us": 0,
                    "query_time_us": 0, "wait_count": k} for k in range(1, 9)]
        servers = [{"id": k, "worker": k % 2, "database": "app", "user": "u0",
                    "state": ("active", "idle")[k % 2], "pid": 5000 + k, "server": "primary",
                    "host": "127.0.0.1", "port": 5432, "tls": False,
                    "connect_time": self.t0 - 300, "request_time": now - 2, "client_id": k,
                    "xact_count": 100 * k, "query_count": 300 * k} for k in range(1, 6)]
        groups = [{"address": f"10.0.0.{k}", "application_name": f"web-{k}", "user": "u0",
                   "clients": k, "clients_total": 10 * k, "xact_count": 1000 * k,
                   "query_count": 3000 * k, "bytes_received": 0, "bytes_sent": 0,
                   "xact_time_us": 3000 * k, "query_time_us": 0, "wait_time_us": 50_000 * k,
                   "wait_count": 0, "hold_time_us": 2_000_000 * k} for k in range(1, 4)]
        return {"time": now, "started": self.t0 - 3725, "status": "running",
                "pipeline": "session", "max_connections": 100, "buckets_us": list(BUCKETS_US),
                "pools": pools, "clients": clients, "servers": servers,
                "client_groups": groups, "counters": {}, "disabled": [],
                "server_sections": [], "workers": [{"worker": 0, "pid": 1, "clients": 4,
                                                    "servers": 3},
                                                   {"worker": 1, "pid": 2, "clients": 4,
                                                    "servers": 2}]}


def test_page_renders_every_view(tmp_path: Path) -> None:
    """The page over a made-up busy pooler: tables, uptime, workers, both charts drawn."""
    _need_chromium()
    with _FakeService(_Busy()) as service:
        poll(lambda: len(api(service.port, "/api/history")["samples"]) >= 10, "10 samples")
        url = f"http://127.0.0.1:{service.port}/"
        dom = Dom(chromium(url, "--dump-dom", budget_ms=3000))
        shot = tmp_path / "console-synthetic.png"
        chromium(url, f"--screenshot={shot}", "--window-size=1400,1000", budget_ms=3000)
    assert dom.by_id["status"].strip() == "running"
    assert dom.by_id["uptime"].strip().startswith("01:02:")
    assert dom.by_id["workers"].strip() == "2"
    app = dom.pool_row("app/u0")
    assert app is not None and app["cl_active"] == "3" and app["sv_idle"] == "2"
    assert 250 <= float(app["tps"]) <= 350, app  # 300 per second
    assert app["p50"].endswith(" ms") and 2.0 <= float(app["p50"].split()[0]) <= 4.1, app
    reports = dom.pool_row("reports/u1")
    assert reports is not None and reports["maxwait"] == "1.50 ms"
    assert reports["p95"].endswith(" ms") and float(reports["p95"].split()[0]) >= 65
    assert len(dom.rows["clients-body"]) == 8 and len(dom.rows["servers-body"]) == 5
    assert dom.rows["clients-body"][0][1][6][1] == "waiting"  # waiting clients first
    assert [cells[1][1] for _, cells in dom.rows["groups-body"]] == ["web-1", "web-2", "web-3"]
    assert "chart-tps" in dom.ids and "chart-lat" in dom.ids
    assert dom.by_id["tps-note"].startswith("one sample every 0.2 s, last 00:00:")
    assert "xss" not in dom.ids  # a client's application_name is text, never markup
    assert any(cells[3][1] == EVIL for _, cells in dom.rows["clients-body"])
    assert shot.stat().st_size > 30_000
    print(f"screenshot: {shot}")
