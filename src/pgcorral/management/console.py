"""The web console (``console = PORT``): one self-contained page and the JSON API behind it.

* ``GET /``: ``console.html`` (inline CSS and JS, no external resource; it fetches the API
  every two seconds and draws its charts on ``<canvas>`` with its own code). Served with a
  Content-Security-Policy that allows only that page's own script and style (by hash) and
  requests to this origin, so a client-chosen ``application_name`` can never run as script.
* ``GET /api/stats``: the ``stats`` snapshot (all workers added up) plus, per pool,
  ``percentiles_us`` (p50/p95/p99 of wait, transaction and query time since start or the last
  ``clear prometheus``) and ``recent`` (rates and percentiles over the last minute), the
  version and ``uptime_s``.
* ``GET /api/history[?since=T]``: the samples the console keeps (every ``SAMPLE_INTERVAL``
  seconds, at most ``HISTORY_SECONDS``): per pool and in total, transactions and queries per
  second and the p50/p95/p99 of transaction time over each interval (from the difference of
  histogram counts between two samples), with the client and server state counts.

It reads the pooler only through ``Controller.call("stats")``, like the management commands,
and at most once per ``MAX_AGE`` seconds however many pages are open (concurrent requests share
one call). The sampler is a task beside the HTTP server (``Console.run``); it must not reach
pool internals, and nothing here runs in a worker.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
from collections import deque
from importlib import resources
from typing import Any

from pgcorral import __version__
from pgcorral.management.commands import Controller
from pgcorral.management.http import Request, Response, Route
from pgcorral.pool.stats import percentile

log = logging.getLogger("pgcorral.console")

#: Seconds between two history samples, and how far back the history goes.
SAMPLE_INTERVAL = 2.0
HISTORY_SECONDS = 15 * 60
#: The window of the ``recent`` figures of ``/api/stats``.
RECENT_SECONDS = 60.0
#: A snapshot younger than this is served again instead of asking the workers.
MAX_AGE = 1.0
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
#: Histogram kinds of a pool's ``hist``.
KINDS = ("wait", "xact", "query")

PoolKey = tuple[str, str]


class Unavailable(Exception):
    """The pooler did not answer ``stats``."""


def _diff(new: list[int], old: list[int] | None) -> list[int]:
    """Counts added between two cumulative histograms; after a reset (a count went down) the
    new counts themselves."""
    if old is None or len(old) != len(new) or any(n < o for n, o in zip(new, old, strict=True)):
        return list(new)
    return [n - o for n, o in zip(new, old, strict=True)]


def _grow(value: int, old: int | None) -> int:
    if old is None or value < old:
        return value
    return value - old


def quantiles(counts: list[int], prefix: str = "", suffix: str = "") -> dict[str, float]:
    """p50/p95/p99 (microseconds, rounded) of bucket counts, named ``prefix + p50 + suffix``."""
    return {prefix + name + suffix: round(percentile(counts, q), 1) for name, q in QUANTILES}


def _add(into: list[int], counts: list[int]) -> list[int]:
    if not into:
        return list(counts)
    return [a + b for a, b in zip(into, counts, strict=True)]


class _Point:
    """What a sample keeps of one snapshot to compute rates against the next: per pool the
    cumulative counters and histograms."""

    __slots__ = ("hists", "time", "totals")

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.time: float = float(snapshot["time"])
        self.totals: dict[PoolKey, tuple[int, int]] = {}
        self.hists: dict[PoolKey, dict[str, list[int]]] = {}
        for pool in snapshot["pools"]:
            key = (pool["database"], pool["user"])
            self.totals[key] = (pool["xact_count"], pool["query_count"])
            self.hists[key] = {k: list(pool["hist"][k]) for k in KINDS}


def rates(new: _Point, old: _Point) -> dict[PoolKey, dict[str, Any]]:
    """Per pool, from ``old`` to ``new``: tps, qps, the interval's transaction percentiles and
    wait p95, and the interval's raw transaction counts (to add up pools)."""
    dt = max(new.time - old.time, 1e-3)
    out: dict[PoolKey, dict[str, Any]] = {}
    for key, (xacts, queries) in new.totals.items():
        before = old.totals.get(key)
        dx = _grow(xacts, before[0] if before else None)
        dq = _grow(queries, before[1] if before else None)
        hx = _diff(new.hists[key]["xact"], old.hists.get(key, {}).get("xact"))
        hw = _diff(new.hists[key]["wait"], old.hists.get(key, {}).get("wait"))
        out[key] = {"tps": round(dx / dt, 2), "qps": round(dq / dt, 2),
                    **quantiles(hx, "xact_", "_us"), "wait_p95_us": round(percentile(hw, 0.95), 1),
                    "_xact": hx, "_wait": hw, "_dx": dx, "_dq": dq}
    return out


class Console:
    """The console's state: the cached snapshot and the history ring."""

    def __init__(self, controller: Controller, sample_interval: float = SAMPLE_INTERVAL) -> None:
        self.controller = controller
        self.sample_interval = sample_interval
        self.history: deque[dict[str, Any]] = deque(
            maxlen=max(1, int(HISTORY_SECONDS / sample_interval)))
        self._recent: deque[_Point] = deque(
            maxlen=max(2, int(RECENT_SECONDS / sample_interval) + 1))
        self._last: _Point | None = None
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        page = resources.files("pgcorral.management").joinpath("console.html").read_bytes()
        self.page = page
        self.csp = content_security_policy(page.decode())

    # --- the snapshot ------------------------------------------------------------------------

    async def snapshot(self, max_age: float = MAX_AGE) -> dict[str, Any]:
        """The ``stats`` answer, at most ``max_age`` old; concurrent callers share one call."""
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < max_age:
            return self._cached[1]
        if self._pending is not None:
            return await asyncio.shield(self._pending)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending = future
        try:
            stats = dict(await self.controller.call("stats"))
            if "time" not in stats:  # the supervisor before any worker answered
                raise Unavailable("no worker is running yet")
        except BaseException as exc:  # cancelled too: whoever shares the call must not hang
            reason = str(exc) or type(exc).__name__
            future.set_exception(Unavailable(reason))
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            if isinstance(exc, Exception):
                raise Unavailable(reason) from exc
            raise
        else:
            self._cached = (time.monotonic(), stats)
            future.set_result(stats)
            return stats
        finally:
            self._pending = None

    # --- the sampler --------------------------------------------------------------------------

    async def run(self) -> None:
        """Take a sample every ``sample_interval`` seconds until cancelled."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                self.sample(await self.snapshot(max_age=0.0))
            except Unavailable as exc:
                log.debug("console: no sample: %s", exc)
            except Exception:  # a bug here must not end the sampler
                log.exception("console: sampling failed")
            next_at += self.sample_interval
            now = loop.time()
            if next_at < now:  # fell behind (a slow stats call): skip, do not burst
                next_at = now + self.sample_interval
            await asyncio.sleep(next_at - now)

    def sample(self, snapshot: dict[str, Any]) -> dict[str, Any] | None:
        """Add the sample from ``snapshot`` to the history (none for the first snapshot,
        which is only the baseline, or one no newer than the last); the sample."""
        point = _Point(snapshot)
        last = self._last
        if last is not None and point.time <= last.time:
            return None
        self._last = point
        self._recent.append(point)
        if last is None:
            return None
        per_pool = rates(point, last)
        pools = []
        total_x: list[int] = []
        total_w: list[int] = []
        dx = dq = 0
        counts = dict.fromkeys(("cl_active", "cl_idle", "cl_waiting", "sv_active",
                                "sv_idle"), 0)
        for pool in snapshot["pools"]:
            r = per_pool[(pool["database"], pool["user"])]
            total_x = _add(total_x, r.pop("_xact"))
            total_w = _add(total_w, r.pop("_wait"))
            dx += r.pop("_dx")
            dq += r.pop("_dq")
            states = {k: pool[k] for k in counts}
            for k, v in states.items():
                counts[k] += v
            pools.append({"database": pool["database"], "user": pool["user"], **r, **states})
        dt = max(point.time - last.time, 1e-3)
        entry = {"time": round(point.time, 3), "interval_s": round(dt, 3), "pools": pools,
                 "total": {"tps": round(dx / dt, 2), "qps": round(dq / dt, 2),
                           **quantiles(total_x, "xact_", "_us"),
                           "wait_p95_us": round(percentile(total_w, 0.95), 1), **counts}}
        self.history.append(entry)
        return entry

    # --- the API ----------------------------------------------------------------------------

    def enrich(self, stats: dict[str, Any]) -> dict[str, Any]:
        """``stats`` with the version, uptime, the workers list also with one process, and per
        pool ``percentiles_us`` and ``recent``."""
        out = dict(stats)
        out["version"] = __version__
        out["server_time"] = time.time()
        out["uptime_s"] = max(0.0, float(stats["time"]) - float(stats["started"]))
        if "workers" not in out:  # one process: control.stats of worker 0 as it is
            out["workers"] = [{"worker": stats.get("worker", 0), "pid": stats.get("pid", 0),
                               "clients": len(stats["clients"]),
                               "servers": len(stats["servers"])}]
        oldest = self._recent[0] if self._recent else None
        window = rates(_Point(stats), oldest) if oldest is not None and \
            stats["time"] > oldest.time else {}
        pools = []
        for pool in stats["pools"]:
            pool = dict(pool)
            pool["percentiles_us"] = {k: quantiles(pool["hist"][k]) for k in KINDS}
            recent = window.get((pool["database"], pool["user"]))
            if recent is not None and oldest is not None:
                pool["recent"] = {"window_s": round(stats["time"] - oldest.time, 1),
                                  **{k: v for k, v in recent.items() if not k.startswith("_")}}
            else:
                pool["recent"] = None
            pools.append(pool)
        out["pools"] = pools
        return out

    def routes(self) -> dict[str, Route]:
        async def page(request: Request) -> Response:
            return Response(200, self.page, "text/html; charset=utf-8",
                            {"Content-Security-Policy": self.csp, **_SAFE})

        async def api_stats(request: Request) -> Response:
            try:
                stats = await self.snapshot()
            except Unavailable as exc:
                return _json({"error": f"pgcorral did not answer: {exc}"}, 503)
            return _json(self.enrich(stats))

        async def api_history(request: Request) -> Response:
            since = request.query.get("since", "")
            try:
                after = float(since) if since else 0.0
            except ValueError:
                return _json({"error": "since must be a number (epoch seconds)"}, 400)
            samples = [s for s in self.history if s["time"] > after]
            return _json({"interval_s": self.sample_interval,
                          "max_samples": self.history.maxlen, "samples": samples})

        return {"/": page, "/index.html": page, "/api/stats": api_stats,
                "/api/history": api_history}


_SAFE = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
         "X-Frame-Options": "DENY"}


def _json(obj: Any, status: int = 200) -> Response:
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return Response(status, body, "application/json", dict(_SAFE))


def content_security_policy(page: str) -> str:
    """Only the page's own inline ``<script>`` and ``<style>`` (by their SHA-256) may run, and
    only requests to the console itself."""
    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest())
                        .decode() + "'" for b in bodies)
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


def routes(controller: Controller) -> dict[str, Route]:
    """The console's routes without its sampler (the history stays empty)."""
    return Console(controller).routes()


def service(controller: Controller) -> tuple[dict[str, Route], Console]:
    """The console's routes and its state, whose ``run`` is the sampler to start beside it."""
    console = Console(controller)
    return console.routes(), console


__all__ = ["Console", "content_security_policy", "quantiles", "rates", "routes", "service"]
