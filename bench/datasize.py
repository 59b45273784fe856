"""Data-size curve: one epoch over 10 / 20 / 50 / 100 % of the training notes, multi-task
instruction tuning (PHEE + MACCROBAT mixed) against single-task runs, each scored on the dev slices of the
tasks it was trained on. Every point is a real training run (conf/train/multitask.yaml's recipe, only the
tasks and `data_fraction` change) followed by `jobs.evaluate`; points already on disk are skipped, and a
training run cut off resumes from its last checkpoint.

    .venv/bin/python -m bench.datasize run --fractions 0.1,0.2 --setups mt,phee --out runs/datasize
    .venv/bin/python -m bench.datasize report runs/datasize --record docs/datasize.json --plot docs/img/datasize.png

`--record` keeps every point measured so far in a small committed JSON file: the points on disk replace the
recorded ones of the same (setup, %, task), so a run on another machine, without the reports of the runs before
it, extends the same table and plot.

Each training run prints its data plan (its planned tokens) first. A CPU machine runs the small fractions; a GPU
machine runs the whole grid (`--fractions 0.1,0.2,0.5,1.0 --setups mt,phee,maccrobat`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RECIPE = "conf/train/multitask.yaml"
SETUPS = {"mt": ["phee", "maccrobat"], "phee": ["phee"], "maccrobat": ["maccrobat"]}
DEV_LIMIT = {"phee": 200, "maccrobat": 5}  # the slices of docs/quality.md


def point_name(setup: str, fraction: float) -> str:
    return f"ds-{setup}-{round(fraction * 100)}pct"


def _call(argv: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as fh:
        rc = subprocess.call([sys.executable, *argv], stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed with exit code {rc}: see {log}")


def run(fractions: list[float], setups: list[str], out: Path, data_dir: Path) -> None:
    for fraction in fractions:
        for setup in setups:
            name = point_name(setup, fraction)
            adapter = out / "adapters" / name
            if not (adapter / "manifest.json").exists():
                print(f"train {name}", flush=True)
                _call(["-m", "notelake.jobs.train", "--config", RECIPE, "--tasks", ",".join(SETUPS[setup]),
                       "--data-fraction", str(fraction), "--name", name, "--output-dir", str(adapter),
                       "--checkpoint-dir", str(out / "checkpoints" / name)], out / "logs" / f"train-{name}.txt")
            for task in SETUPS[setup]:
                report = out / "eval" / f"{name}-{task}"
                if (report / "report.json").exists():
                    continue
                print(f"evaluate {name} on {task}", flush=True)
                _call(["-m", "notelake.jobs.evaluate", "--task", task, "--gold", str(data_dir / task / "dev.jsonl"),
                       "--limit", str(DEV_LIMIT[task]), "--adapter", str(adapter), "--label", name,
                       "--out", str(report)], out / "logs" / f"eval-{name}-{task}.txt")


def _point_key(row: dict) -> tuple:
    return row["task"], row["setup"], row["percent"]


def collect(out: Path) -> list[dict]:
    """One row per (setup, fraction, task) found under ``out``/eval."""
    rows = []
    for path in sorted((out / "eval").glob("ds-*/report.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        _, setup, pct = report["label"].split("-")  # point_name's ds-<setup>-<n>pct
        lenient = report["scores"]["cce"]["lenient"]
        rows.append({
            "setup": setup, "percent": int(pct.removesuffix("pct")), "task": report["task"],
            "train_tokens": report["adapter"].get("train_tokens"), "train_wall_s": report["adapter"].get("train_wall_s"),
            "lenient_f1": lenient["f1"], "ci95": lenient.get("ci95"),
            "strict_f1": report["scores"]["cce"]["strict"]["f1"],
            "relations_f1": (report["scores"].get("cre") or {}).get("lenient", {}).get("f1"),
        })
    return sorted(rows, key=_point_key)


def merge_record(rows: list[dict], record: Path) -> list[dict]:
    """The recorded points with ``rows`` laid over them (same setup, percent and task: the new one wins);
    the merged list is written back to ``record``."""
    merged = {_point_key(r): r for r in (json.loads(record.read_text(encoding="utf-8")) if record.exists() else [])}
    merged.update({_point_key(r): r for r in rows})
    out = [merged[k] for k in sorted(merged)]
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


def table(rows: list[dict]) -> str:
    lines = ["| dev task | trained on | % of train notes | train tokens | wall (min) | concepts lenient F1 [95 % CI] "
             "| strict F1 | relations lenient F1 |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        ci = f" [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r["ci95"] else ""
        wall = f"{r['train_wall_s'] / 60:.1f}" if r["train_wall_s"] else "–"
        rel = f"{r['relations_f1']:.3f}" if r["relations_f1"] is not None else "–"
        lines.append(f"| {r['task']} | {'+'.join(SETUPS[r['setup']])} | {r['percent']} | {r['train_tokens'] or 0:,} "
                     f"| {wall} | {r['lenient_f1']:.3f}{ci} | {r['strict_f1']:.3f} | {rel} |")
    return "\n".join(lines)


def plot(rows: list[dict], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for setup in SETUPS:
            points = [r for r in rows if r["task"] == task and r["setup"] == setup]
            if not points:
                continue
            x = [r["percent"] for r in points]
            low = [r["lenient_f1"] - r["ci95"][0] if r["ci95"] else 0 for r in points]
            high = [r["ci95"][1] - r["lenient_f1"] if r["ci95"] else 0 for r in points]
            ax.errorbar(x, [r["lenient_f1"] for r in points], yerr=[low, high], marker="o", capsize=3,
                        label="multi-task" if setup == "mt" else f"single-task ({setup})")
        ax.set(title=f"{task} dev, concepts", xlabel="% of training notes (one epoch)", ylabel="lenient F1",
               xscale="log", ylim=(0, 1))
        ax.set_xticks([10, 20, 50, 100], labels=["10", "20", "50", "100"])
        ax.legend()
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target)


def main(argv: list[str] | None = None) -> int:
    from notelake.models.training import default_data_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and evaluate the missing points")
    r.add_argument("--fractions", default="0.1,0.2,0.5,1.0")
    r.add_argument("--setups", default="mt,phee,maccrobat", help=f"of {sorted(SETUPS)}")
    r.add_argument("--out", default="runs/datasize")
    r.add_argument("--data-dir", default=None, help="shared/data folder (default NOTELAKE_DATA or ../shared/data)")
    s = sub.add_parser("report", help="print the table (and plot it) from the points on disk")
    s.add_argument("out")
    s.add_argument("--plot", default=None, help="PNG/SVG path")
    s.add_argument("--record", default=None, help="JSON file of the points measured so far (read, updated, written)")
    args = p.parse_args(argv)
    if args.command == "run":
        setups = args.setups.split(",")
        unknown = sorted(set(setups) - set(SETUPS))
        if unknown:
            p.error(f"unknown setups {unknown}; choose from {sorted(SETUPS)}")
        run([float(f) for f in args.fractions.split(",")], setups, Path(args.out),
            Path(args.data_dir) if args.data_dir else default_data_dir())
        return 0
    rows = collect(Path(args.out))
    if args.record:
        rows = merge_record(rows, Path(args.record))
    print(table(rows))
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
