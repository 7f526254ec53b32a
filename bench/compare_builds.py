#!/usr/bin/env python3
"""Ratios of one pgcorral build to another from a bench/run.py result file, per cell.

    .venv/bin/python bench/compare_builds.py bench/results/<run>.json [--of src --to base]

For every cell (workload, clients, auth) and every --workers value: median TPS of
pgcorral-wN (the build --of) over pgcorral-wN-base (--to), and the same for the pooler's CPU
per unit, plus each round's TPS ratio (rounds are interleaved, so round i of both ran under
the same conditions). Used for the cost of the issue 12 counters (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def name(workers: int, build: str) -> str:
    return f"pgcorral-w{workers}" + ("" if build == "src" else f"-{build}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--of", default="src")
    p.add_argument("--to", default="base")
    a = p.parse_args()
    with open(a.results, encoding="utf-8") as f:
        data = json.load(f)
    workers = data["config"]["workers"]
    print(f"{'workload':<22}{'clients':>8}  {'workers':>7}  {'tps ' + a.of + '/' + a.to:>14}"
          f"  {'cpu/unit ' + a.of + '/' + a.to:>18}  per-round tps ratios")
    all_ratios = []
    for row in data["summary"]:
        for w in workers:
            mine, theirs = row.get(name(w, a.of)), row.get(name(w, a.to))
            if not mine or not theirs or not theirs.get("median_tps"):
                continue
            tps = mine["median_tps"] / theirs["median_tps"]
            cpu = (mine["cpu_us"] / theirs["cpu_us"]) if mine.get("cpu_us") and \
                theirs.get("cpu_us") else float("nan")
            rounds = [x / y for x, y in zip(mine["rounds"], theirs["rounds"], strict=False)
                      if x and y]
            all_ratios.append(tps)
            print(f"{row['label']:<22}{row['clients']:>8}  {w:>7}  {tps:>14.3f}  {cpu:>18.3f}"
                  f"  {' '.join(f'{r:.3f}' for r in rounds)}")
    if all_ratios:
        print(f"geometric mean of the TPS ratios: "
              f"{statistics.geometric_mean(all_ratios):.3f} over {len(all_ratios)} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
