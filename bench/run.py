"""Run the benchmark rows (each in its own process, one after another), print the table and the ratios, and
write ``results.json``, ``results.md`` and ``throughput.svg`` into ``--out``:

    .venv/bin/python -m bench.run --notes 32 --seed 0            # or: make bench
    .venv/bin/python -m bench.run --notes 4 --max-tokens 32 --scaling 2 --replay-notes 500   # smoke

Rows (bench/rows.py lists them): bare vLLM with the job's engine args and with vLLM's defaults (1), the job end to
end with the conf's batching (right after bare vLLM on the job's own engine: a pair), with one batch at a time,
and without Spark (2), ray.data.llm (3), base vs LoRA (served by vLLM and merged into the weights) and guided
decoding on/off (4), the incremental rerun (5), scaling with the real engine and the REPLAY data plane (6), fixed
costs (7).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import report
from bench.measure import machine

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO / "models" / "adapters"
ROW_ORDER = ["bare", "bare-all-cores", "bare-default", "job", "job-nospark", "ray-data-llm", "lora", "base-no-lora", "lora-merged", "multi-adapter",
             "replay", "tasks", "tagger"]
# job-nospark (the job without Spark) and multi-adapter are for the GPU box (bench/gpu/run_gpu.sh); on CPU the
# job row already measures the no-Spark path beside the Spark one.
DEFAULT_ROWS = "bare,bare-all-cores,bare-default,job,ray-data-llm,lora,base-no-lora,lora-merged,replay"


def default_adapter() -> str:
    """The shipped multi-task adapter when present, else the pilot."""
    for name in ("notelake-mt", "phee-pilot"):
        if (ADAPTERS / name / "manifest.json").is_file():
            return str(ADAPTERS / name)
    raise SystemExit(f"no adapter with a manifest under {ADAPTERS}")


def run_row(name: str, argv: list[str], work: Path, timeout_s: float) -> dict:
    """One row in a fresh process group; anything it leaves behind (Ray, vLLM, JVM) is ended with it."""
    out = work / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.rows", name, *argv, "--work", str(work), "--out", str(out)]
    print(f"[bench] {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = "timeout"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    wall = round(time.monotonic() - t0, 1)
    print(f"[bench] {name}: exit {code} after {wall} s", flush=True)
    if code == 0 and out.is_file():
        result = json.loads(out.read_text())
    else:
        result = {"rows": [{"row": name, "error": f"row process exit {code} after {wall} s"}]}
    result["process_wall_s"] = wall
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--notes", type=int, default=32, help="corpus size of rows 1-5 (synthetic PHEE-like notes)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    p.add_argument("--max-tokens", type=int, default=64, help="answer budget (max_tokens) of every row")
    p.add_argument("--scaling", default="8,128", help="extra corpus sizes for the job (--notes is the third)")
    p.add_argument("--replay-notes", default="2000,100000",
                   help="corpus sizes of the REPLAY data-plane row, comma-separated")
    p.add_argument("--replay-round-notes", type=int, default=10_000, help="job.round_notes of the REPLAY row")
    p.add_argument("--adapter", default=None, help="LoRA adapter of row 4 (default: notelake-mt, else phee-pilot)")
    p.add_argument("--tagger", default=".notelake/taggers/tagger-phee-lora",
                   help="tagger row: a tagger folder (conf/train/tagger-phee-lora.yaml writes the default)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"subset of {','.join(ROW_ORDER)}")
    p.add_argument("--conf", default="conf/local.yaml", help="settings YAML (conf/gpu.yaml on a GPU node)")
    p.add_argument("--adapters", default=None, help="multi-adapter row: comma-separated adapter folders "
                                                    "(default: every shipped adapter)")
    p.add_argument("--row-timeout-s", type=float, default=900, help="a row still running after this is killed")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/<UTC time>)")
    p.add_argument("--include", nargs="*", default=[], help="row results (<out>/work/<row>.json) of earlier runs to "
                                                            "report with this one's (--rows '' reports them alone)")
    return p


def row_plan(args) -> list[tuple[str, list[str]]]:
    """(row, its ``bench.rows`` arguments) for every row of ``--rows``, in ROW_ORDER."""
    adapter = args.adapter or default_adapter()
    common = ["--notes", str(args.notes), "--seed", str(args.seed), "--max-tokens", str(args.max_tokens),
              "--conf", args.conf]
    adapters = args.adapters or ",".join(str(p.parent) for p in sorted(ADAPTERS.glob("*/manifest.json")))
    extra = {"job": ["--scaling", args.scaling], "lora": ["--adapter", adapter],
             "lora-merged": ["--adapter", adapter], "tasks": ["--adapter", adapter],
             "tagger": ["--adapter", str(REPO / args.tagger)], "multi-adapter": ["--adapters", adapters],
             "replay": ["--scaling", args.replay_notes, "--round-notes", str(args.replay_round_notes)]}
    return [(name, common + extra.get(name, [])) for name in ROW_ORDER if name in args.rows.split(",")]


def collect(results: list[tuple[str, dict]]) -> tuple[list[dict], dict, dict]:
    """The rows, fixed costs and extras (adapter, each row process's wall time) of the row results."""
    rows, fixed, extras = [], {}, {}
    for name, result in results:
        rows += result["rows"]
        fixed.update(result.get("fixed", {}))
        if "adapter" in result:
            extras["adapter"] = result["adapter"]
        extras.setdefault("process_wall_s", {})[name] = result["process_wall_s"]
    return rows, fixed, extras


def write_results(out: Path, results: dict) -> None:
    """``results.json``, ``results.md`` and ``throughput.svg`` (job and REPLAY notes/s against corpus size)."""
    rows, fixed, entries = results["rows"], results["fixed"], results["ratios"]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text("\n\n".join([report.markdown_table(rows), report.fixed_table(fixed),
                                                 report.ratio_table(entries)]) + "\n")
    real = [(r["notes"], r["notes_per_s"]) for r in rows
            if r["row"].startswith(("job end to end, conf", "job scaling")) and r.get("notes_per_s")]
    replay = [(r["notes"], r["notes_per_s"]) for r in rows if r["row"].startswith("job with REPLAY")
              and r.get("notes_per_s")]
    svg = report.throughput_svg({"vLLM CPU engine": real, "REPLAY (simulated)": replay},
                                f"notelake job throughput vs corpus size ({os.cpu_count()} CPU cores)")
    if svg:
        (out / "throughput.svg").write_text(svg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = datetime.now(timezone.utc)
    machine_at_start = machine()
    out = Path(args.out or REPO / "runs" / "bench" / f"{started:%Y%m%dT%H%M%S}")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    plan = row_plan(args)
    earlier = [(Path(path).stem, {**json.loads(Path(path).read_text()), "process_wall_s": None}) for path in args.include]
    ran = [(name, run_row(name, row_argv, work, args.row_timeout_s)) for name, row_argv in plan]
    rows, fixed, extras = collect(earlier + ran)
    rows += report.cold_rows(rows, fixed)
    entries = report.ratios(rows, fixed)
    write_results(out, {
        "started_at": started.isoformat(timespec="seconds"),
        "ended_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_at_start, "load_avg_at_end": machine()["load_avg_1_5_15"], "conf": args.conf,
        "task": "phee", "notes": args.notes, "seed": args.seed, "max_tokens": args.max_tokens,
        "rows": rows, "fixed": fixed, "ratios": entries, **extras,
    })
    for table in (report.text_table(rows), report.fixed_table(fixed), report.ratio_table(entries)):
        print()
        print(table)
    print(f"\nwrote {out / 'results.json'}, results.md, throughput.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
