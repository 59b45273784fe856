"""Where a LoRA pass spends its time on vLLM CPU: py-spy samples of the engine's processes during base and LoRA
passes (same prompts, ignore_eos), summarised as the share of busy samples (idle waits left out) per leaf
function.

    .venv/bin/python -m bench.profile_lora --adapter models/adapters/notelake-mt --notes 8 --max-tokens 32

Prints function names and shares only (no prompt or note text).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.corpus import render_prompts
from bench.vllm_passes import sampling_params
from bench.workload import TASK, bench_settings, corpus_texts

# vLLM's CPU LoRA kernels (vllm/lora/ops/torch_ops): a per-token gather of the adapter matrices, then an einsum
# (counted apart: the leaf name alone does not say who called it).
LORA_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")
# Leaves of processes waiting on each other (the engine core spins while the worker computes): not work.
IDLE = ("sched_yield", "SpinCondition.wait", "MessageQueue.", "memory_fence", "select", "poll", "wait")


def busy_leaves(raw_files: list[Path]) -> tuple[int, collections.Counter]:
    """(busy samples, leaf function -> samples) over py-spy ``--format raw`` files, idle waits left out."""
    total, leaves = 0, collections.Counter()
    for path in raw_files:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            leaf = stack.split(";")[-1].split(" (")[0]
            if not leaf.startswith(IDLE):
                leaves[leaf] += int(count)
                total += int(count)
    return total, leaves


def main(argv: list[str] | None = None) -> int:
    from vllm.lora.request import LoRARequest

    from notelake.conf.task import load_task
    from notelake.models.adapters import load_adapter
    from notelake.models.vllm_engine import VLLMEngine

    p = argparse.ArgumentParser(prog="python -m bench.profile_lora")
    p.add_argument("--adapter", required=True)
    p.add_argument("--notes", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conf", default="conf/local.yaml")
    args = p.parse_args(argv)
    settings = bench_settings(args, engine={"enable_lora": True})
    engine = VLLMEngine(settings.engine)
    adapter = load_adapter(args.adapter, engine.model_sha256)
    lora = LoRARequest(adapter.name, 1, str(adapter.path))
    prompts = [{"prompt_token_ids": ids} for ids in render_prompts(engine.tokenizer, load_task(TASK), corpus_texts(args))]
    params = sampling_params(settings.engine, args.max_tokens, ignore_eos=True)
    engine.llm.generate(prompts[:1], params, use_tqdm=False, lora_request=lora)  # adapter loaded before timing
    engine_pids = [c.pid for c in psutil.Process(os.getpid()).children(recursive=True)]
    out = Path(tempfile.mkdtemp(prefix="notelake-lora-profile-"))
    for mode, request in (("base", None), (f"LoRA {adapter.name}", lora)):
        recorders = [subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "50", "--format", "raw",
                                       "--nonblocking", "-o", str(out / f"{mode}-{pid}.txt")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in engine_pids]
        time.sleep(1)  # let py-spy attach
        t0 = time.monotonic()
        for _ in range(args.passes):
            engine.llm.generate(prompts, params, use_tqdm=False, lora_request=request)
        wall = time.monotonic() - t0
        for recorder in recorders:
            recorder.send_signal(2)  # SIGINT: py-spy writes its samples and exits
            recorder.wait()
        total, leaves = busy_leaves(sorted(out.glob(f"{mode}-*.txt")))
        lora_share = sum(n for name, n in leaves.items() if name in LORA_OPS) / max(1, total)
        print(f"{mode}: {args.passes} passes of {len(prompts)} prompts x {args.max_tokens} tokens in {wall:.1f} s; "
              f"{total} busy samples, {lora_share:.0%} in vLLM's CPU LoRA ops")
        for name, n in leaves.most_common(8):
            print(f"    {n / max(1, total):6.1%}  {name}")
    return 0


if __name__ == "__main__":  # the vLLM engine created here needs the guard
    sys.exit(main())
