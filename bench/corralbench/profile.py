"""Profiling pgcorral: the py-spy (or cProfile) run, folded stacks, flame graph, speedscope, top."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import PROFILE_CLIENTS, PROFILE_WORKLOAD, WORKLOADS, log
from .pgbench import RunResult, parse_pgbench, pgbench_cmd, run_pgbench
from .procs import PROCS, clean_env, first_line
from .report import fmt_tps
from .targets import PgCorralTarget, TargetError

if TYPE_CHECKING:
    from .grid import Bench


def find_py_spy(pgcorral_python: str, explicit: str | None) -> str | None:
    """The py-spy binary: the explicit one, else PATH, else next to either interpreter."""
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
    """The stacks as a speedscope.app "sampled" profile."""
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


def run_profile(bench: Bench) -> dict[str, Any]:
    """Profile pgcorral during one pgbench run (py-spy, else cProfile); what goes in the JSON."""
    cfg = bench.cfg
    # The first pgcorral target (the first --workers value); py-spy follows its children.
    target = next((t for t in bench.targets.values() if isinstance(t, PgCorralTarget)), None)
    if target is None:
        log("--profile: pgcorral is not running; no profile taken")
        return {"error": "pgcorral not running"}
    outdir = Path(cfg.results_dir) / f"{bench.stamp}-profile"
    outdir.mkdir(parents=True, exist_ok=True)
    spy = find_py_spy(cfg.pgcorral_python, cfg.py_spy)
    dur = max(cfg.duration, 5)
    result = RunResult(-1, PROFILE_WORKLOAD, PROFILE_CLIENTS, target.name, 0)
    info: dict[str, Any] = {"dir": str(outdir), "target": target.name,
                            "workload": PROFILE_WORKLOAD, "clients": PROFILE_CLIENTS,
                            "duration": dur}  # fmt: skip
    if spy is not None:
        assert target.proc is not None
        info["tool"] = first_line([spy, "--version"]) or "py-spy"
        bench.reset_tables()
        cmd = pgbench_cmd(bench.pgbench, target.host, target.port, PROFILE_WORKLOAD,
                          PROFILE_CLIENTS, dur, cfg.jobs)  # fmt: skip
        bench_proc = PROCS.start(
            "pgbench", cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=clean_env(**bench.client_env),
        )  # fmt: skip
        time.sleep(1)  # past the connection ramp-up
        raw = outdir / "pgcorral.folded"
        spy_cmd = [spy, "record", "--pid", str(target.proc.pid), "--subprocesses",
                   "--function", "--nonblocking", "--rate", "200",
                   "--duration", str(max(1, dur - 2)), "--format", "raw",
                   "-o", str(raw)]  # fmt: skip
        log(f"profiling {target.name} pid {target.proc.pid}: {' '.join(spy_cmd)}")
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
            title = f"{target.name}, pgbench {WORKLOADS[PROFILE_WORKLOAD][0]} c={PROFILE_CLIENTS}"
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
        # workers = 1: cProfile sees only the process it starts (with more, the supervisor).
        prof_target = PgCorralTarget(
            cfg.pgcorral_python, bench.tmp / "pgcorral-cprofile", bench.cluster,
            cfg.pool_size, bench.mode, bench.psql, cfg.start_timeout, workers=1, tls=bench.tls,
        )  # fmt: skip
        info["target"] = prof_target.name
        try:
            prof_target.start(wrapper=("-m", "cProfile", "-o", str(prof_path)))
        except (TargetError, OSError) as e:
            prof_target.stop()
            info["error"] = f"pgcorral under cProfile failed to start: {e}"
            log(info["error"])
            return info
        bench.reset_tables()
        cmd = pgbench_cmd(bench.pgbench, prof_target.host, prof_target.port,
                          PROFILE_WORKLOAD, PROFILE_CLIENTS, dur, cfg.jobs)  # fmt: skip
        run_pgbench(cmd, result, timeout=dur + 120, env=bench.client_env)
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
    return info
