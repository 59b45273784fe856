"""The benchmark's ratios over several runs: median, min and max of each (one run is not a result).

    .venv/bin/python -m bench.medians runs/bench/<run 1> runs/bench/<run 2> runs/bench/<run 3> [--out medians.md]
    make bench-medians          # three `make bench` runs one after another, then this table

Each argument is a ``bench.run`` output folder (or its ``results.json``). A ratio is reported only from the runs that
measured it; its median is judged against the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for path in map(Path, paths):
        runs.append(json.loads((path / "results.json" if path.is_dir() else path).read_text()))
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """One entry per ratio, in the order of the first run: values per run, median, min, max, target, met."""
    order: list[str] = []
    values: dict[str, list[float]] = {}
    targets: dict[str, str] = {}
    for run in runs:
        for entry in run["ratios"]:
            name = entry["ratio"]
            if name not in targets:
                order.append(name)
                targets[name] = entry["target"]
            if entry["value"] is not None:
                values.setdefault(name, []).append(entry["value"])
    out = []
    for name in order:
        found = values.get(name, [])
        median = statistics.median(found) if found else None
        op, target = targets[name].split()
        met = None if median is None else (median >= float(target) if op == ">=" else median <= float(target))
        out.append({"ratio": name, "runs": len(found), "values": [round(v, 3) for v in found],
                    "median": None if median is None else round(median, 3),
                    "min": round(min(found), 3) if found else None, "max": round(max(found), 3) if found else None,
                    "target": targets[name], "met": met})
    return out


def markdown(entries: list[dict], runs: list[dict]) -> str:
    lines = [f"Ratios over {len(runs)} runs ({', '.join(r['started_at'] for r in runs)}):", "",
             "| ratio | runs | median | min | max | target | median meets it |", "|---|---:|---:|---:|---:|---|---|"]
    for e in entries:
        fmt = (lambda v: "–" if v is None else f"{v:.3f}")
        met = {True: "yes", False: "**no**", None: "–"}[e["met"]]
        lines.append(f"| {e['ratio']} | {e['runs']} | {fmt(e['median'])} | {fmt(e['min'])} | {fmt(e['max'])} | "
                     f"{e['target']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.medians", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="bench.run output folders or their results.json")
    p.add_argument("--out", help="also write the table here (markdown) and a .json beside it")
    args = p.parse_args(argv)
    runs = load_runs(args.runs)
    entries = summarize(runs)
    table = markdown(entries, runs)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
        Path(args.out).with_suffix(".json").write_text(json.dumps(entries, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
