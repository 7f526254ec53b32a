"""Where the bytes of one idle client go (issue 15, item 1): the pooler's Python heap diffed
around N idle clients, in one worker.

    .venv/bin/python bench/idle_breakdown.py --clients 2000 --pipeline transaction
    .venv/bin/python bench/idle_breakdown.py --clients 2000 --pipeline session --pure

It starts a throwaway PostgreSQL 15 and pgcorral (``workers = 1``) in a child process that
runs the daemon with ``tracemalloc`` on and a probe thread. The parent logs in ``--clients``
clients as bench/idle_clients.py does (transaction pooling: logged in and idle; session
pooling: ``--pool`` of them linked, the others waiting in line), and asks the probe, before
and after, for:

* the bytes tracemalloc traces (every PyObject and PyMem allocation, uvloop's libuv handles
  included), per client;
* the objects that are new (not there before), grouped by type: count and ``sys.getsizeof``
  per client (GC-tracked objects and the untracked ones they refer to: bytes, str, int);
* with ``--pure`` (pgcorral from a copy of src/ without the compiled modules) the allocation
  sites (tracemalloc lines): compiled code has no Python frames to attribute them to;
* PSS of the process.

Everything stays on 127.0.0.1 and is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


# --- the child: pgcorral with a probe thread --------------------------------------------------

def _pss_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class Probe:
    """Answers ``<dir>/probe-<name>`` files with ``<dir>/<name>.json``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.base_ids: set[int] = set()
        self.base_keep: list[object] = []  # the baseline objects stay alive: ids stay unique
        self.base_snapshot: Any = None
        self.base_traced = 0

    def objects(self, skip: set[int]) -> list[object]:
        """GC-tracked objects not in ``skip``, and the untracked objects they refer to
        (bytes, str, int, ...)."""
        tracked = [o for o in gc.get_objects() if id(o) not in skip]
        seen = {id(o) for o in tracked}
        seen.add(id(seen))
        tracked = [o for o in tracked if o is not seen and o is not skip]
        extra = []
        for o in tracked:
            for r in gc.get_referents(o):
                if id(r) not in seen and id(r) not in skip and not gc.is_tracked(r):
                    seen.add(id(r))
                    extra.append(r)
        return tracked + extra

    def own(self) -> set[int]:
        """The probe's own objects: its baseline containers, its snapshot and all it holds."""
        seen = {id(self), id(self.__dict__), id(self.base_keep), id(self.base_ids)}
        todo: list[object] = [self.base_snapshot]
        while todo:
            o = todo.pop()
            if id(o) in seen:
                continue
            seen.add(id(o))
            if isinstance(o, (list, tuple, set, dict)) or type(o).__module__ == "tracemalloc":
                todo.extend(gc.get_referents(o))
        return seen

    def baseline(self) -> dict[str, Any]:
        import tracemalloc
        gc.collect()
        objs = self.objects(set())
        self.base_keep = objs  # kept alive: the ids stay unique
        self.base_ids = {id(o) for o in objs}
        self.base_snapshot = tracemalloc.take_snapshot()
        self.base_traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        return {"traced": self.base_traced, "pss_kib": _pss_kib()}

    def measure(self, n: int) -> dict[str, Any]:
        import tracemalloc
        traced, peak = tracemalloc.get_traced_memory()  # before the census allocates
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
        pss = _pss_kib()
        skip = self.base_ids | self.own()
        skip.add(id(skip))
        objs = self.objects(skip)
        skip.add(id(objs))
        by_type: Counter[str] = Counter()
        count: Counter[str] = Counter()
        for o in objs:
            if id(o) in skip or (type(o) is set and len(o) > n) or (
                    type(o) is int and o > 1 << 40):
                continue  # the census's own id sets, and the addresses in them
            name = type(o).__module__ + "." + type(o).__qualname__
            name = name.removeprefix("builtins.")
            by_type[name] += sys.getsizeof(o)
            count[name] += 1
        client = self.one_client(objs, skip)
        del objs, skip
        snapshot = tracemalloc.take_snapshot()
        types = [{"type": t, "bytes_per_client": round(b / n, 1),
                  "count_per_client": round(count[t] / n, 2)}
                 for t, b in by_type.most_common() if b / n >= 4]
        sites = []
        for stat in snapshot.compare_to(self.base_snapshot, "lineno")[:60]:
            frame = stat.traceback[0]
            if stat.size_diff / n < 8 or frame.filename == __file__:
                continue
            sites.append({"site": f"{frame.filename.split('/src/')[-1]}:{frame.lineno}",
                          "bytes_per_client": round(stat.size_diff / n, 1),
                          "blocks_per_client": round(stat.count_diff / n, 2)})
        tracemalloc.reset_peak()
        return {"traced_per_client": round((traced - self.base_traced) / n, 1),
                "peak_per_client": round((peak - self.base_traced) / n, 1),
                "objects_per_client": round(sum(by_type.values()) / n, 1),
                "pss_kib": pss, "types": types, "sites": sites, "client": client}

    def one_client(self, objs: list[object], skip: set[int]) -> list[tuple[str, str, int]]:
        """The attributes of one new client object that hold objects of their own:
        (name, type, sys.getsizeof), the object's own size first."""
        from pgcorral.net.client import ClientConnection
        client = next((o for o in reversed(objs) if isinstance(o, ClientConnection)), None)
        if client is None:
            return []
        rows = [("(the object)", type(client).__qualname__, sys.getsizeof(client))]
        for name in dir(client):
            if name.startswith("__"):
                continue
            try:
                value = getattr(client, name)
            except Exception:
                continue
            if id(value) in skip or (callable(value) and not hasattr(value, "__self__")):
                continue
            if value is None or isinstance(value, (bool, int, float)):
                continue
            if getattr(value, "__self__", None) is client:
                continue  # a bound method made by getattr
            rows.append((name, type(value).__qualname__, sys.getsizeof(value)))
        return rows

    def run(self) -> None:
        while True:
            for path in self.workdir.glob("probe-*"):
                name, _, arg = path.name.removeprefix("probe-").partition("-")
                path.unlink()
                result = self.baseline() if name == "base" else self.measure(int(arg))
                tmp = self.workdir / f"{name}.tmp"
                tmp.write_text(json.dumps(result))
                tmp.rename(self.workdir / f"{name}.json")
            time.sleep(0.05)


def child(workdir: Path, conf: str, hba: str) -> int:
    import tracemalloc
    tracemalloc.start(1)
    threading.Thread(target=Probe(workdir).run, daemon=True).start()
    from pgcorral.cli.daemon import main
    return main(["-c", conf, "-a", hba])


# --- the parent ---------------------------------------------------------------------------------

async def ask(workdir: Path, name: str, arg: int = 0) -> dict[str, Any]:
    (workdir / f"probe-{name}-{arg}").write_text("")
    out = workdir / f"{name}.json"
    while not out.exists():
        await asyncio.sleep(0.05)
    result: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return result


async def measure(args: argparse.Namespace, port: int, workdir: Path) -> dict[str, Any]:
    from idle_clients import hold, login
    for _ in range(200):
        try:
            _, w = await login(port, args.user, args.database, wait_ready=True)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    # warm up: the pool's server connections (session: the first --pool clients hold them)
    warm = await hold(port, args.pool, args.user, args.database,
                      wait_ready=args.pipeline == "transaction")
    await asyncio.sleep(1)
    base = await ask(workdir, "base")
    writers = await hold(port, args.clients, args.user, args.database,
                         wait_ready=args.pipeline == "transaction")
    await asyncio.sleep(1)
    held = await ask(workdir, "held", args.clients)
    for w in writers:
        w.close()
    await asyncio.sleep(3)
    # what is left of the clients once they left (per client that left)
    gone = await ask(workdir, "gone", args.clients)
    held["after_close"] = {k: gone[k] for k in ("traced_per_client", "objects_per_client",
                                                "peak_per_client")}
    held["after_close"]["types"] = gone["types"][:12]
    for w in warm:
        w.close()
    held["pss_per_client_kib"] = round((held["pss_kib"] - base["pss_kib"]) / args.clients, 2)
    return held


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--pipeline", choices=["session", "transaction"], default="transaction")
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--pure", action="store_true",
                        help="run pgcorral from a copy of src/ without compiled modules")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--src", type=Path, default=ROOT / "src",
                        help="the pgcorral tree to measure (default: this checkout's src/)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child[0]), args.child[1], args.child[2])
    from devtools.pgcluster import PgCluster, find_free_port
    args.user, args.database = "postgres", "postgres"
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="idle-breakdown-"))
    os.chmod(workdir, 0o755)
    src = args.src
    if args.pure:
        src = workdir / "src"
        shutil.copytree(args.src, src, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    pg = PgCluster(str(workdir / "pg"))
    pg.init()
    pg.start()
    proc = None
    try:
        port = find_free_port()
        conf = workdir / "pgcorral.conf"
        conf.write_text(
            "[pgcorral]\nhost = 127.0.0.1\n"
            f"port = {port}\nunix_socket_dir = {workdir}\nlog_type = file\n"
            f"log_path = {workdir}/pgcorral.log\nlog_level = warn\n"
            f"pipeline = {args.pipeline}\nmax_connections = {args.pool}\n"
            f"workers = 1\nblocking_timeout = {int(args.timeout)}\n"
            f"\n[primary]\nhost = 127.0.0.1\nport = {pg.port}\n")
        hba = workdir / "hba.conf"
        hba.write_text("host all all 127.0.0.1/32 trust\n")
        env = dict(os.environ, PYTHONPATH=str(src))
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(workdir), str(conf),
                                 str(hba)], env=env, cwd=workdir)
        result = asyncio.run(asyncio.wait_for(measure(args, port, workdir), args.timeout))
        result.update(pipeline=args.pipeline, clients=args.clients,
                      build="pure" if args.pure else "compiled")
        print(json.dumps(result, indent=1))
        return 0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
