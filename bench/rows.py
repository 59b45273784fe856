"""Benchmark rows, one per process. ``bench.run`` starts each (one vLLM engine at a time, clean teardown):

    python -m bench.rows <row> --notes 32 --seed 0 --max-tokens 64 [--conf conf/gpu.yaml] \\
        --work runs/bench/work --out runs/bench/work/<row>.json

Where the rows live, by what they time: bench/engine_rows.py (one engine: bare vLLM, LoRA, the tagger),
bench/job_rows.py (the job on a warm Spark, Ray and engine), bench/replay_rows.py (the data plane with the
REPLAY engine), bench/ray_data_llm.py (ray.data.llm); bench/workload.py holds what they all run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from bench.engine_rows import (row_bare, row_bare_all_cores, row_bare_default, row_base_no_lora, row_lora,
                               row_lora_merged, row_multi_adapter, row_tagger)
from bench.job_rows import row_job, row_job_nospark, row_tasks
from bench.ray_data_llm import row_ray_data_llm
from bench.replay_rows import row_nightly, row_replay, row_rounds

ROWS = {"bare": row_bare, "bare-all-cores": row_bare_all_cores, "bare-default": row_bare_default, "job": row_job,
        "job-nospark": row_job_nospark, "ray-data-llm": row_ray_data_llm, "lora": row_lora,
        "base-no-lora": row_base_no_lora, "lora-merged": row_lora_merged, "multi-adapter": row_multi_adapter,
        "replay": row_replay, "rounds": row_rounds, "nightly": row_nightly, "tasks": row_tasks, "tagger": row_tagger}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rows")
    p.add_argument("row", choices=sorted(ROWS))
    p.add_argument("--conf", default="conf/local.yaml", help="settings YAML (conf/gpu.yaml on a GPU node)")
    p.add_argument("--notes", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (lora row)")
    p.add_argument("--adapters", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="multi-adapter row: adapter folders whose requests are mixed in one batch")
    p.add_argument("--scaling", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="job row: also run the job on these corpus sizes; replay row: its corpus sizes")
    p.add_argument("--round-notes", type=int, default=2000, help="replay row: job.round_notes")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    logging.getLogger("notelake").setLevel(logging.INFO)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    result = ROWS[args.row](args)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":  # vLLM engines started in this process need the guard
    sys.exit(main())
