"""What every benchmark row runs: the bench's settings, the task and the synthetic corpus (bench.corpus).

Every row uses the same notes (seeded), the same prompts (udfs.prompts.build_messages rendered with the model's
chat template), the same model and the same sampling (greedy, seed 0, ``--max-tokens``, the job's answer grammar
(``engine.guided_decoding``) unless a row says otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.corpus import synthetic_notes

TASK = "phee"
REPO = Path(__file__).resolve().parents[1]
WARMUP_SEED = 10_000  # the 4 notes every engine runs once before its timed passes (not in the corpus)


def bench_settings(args, **overrides):
    """``--conf`` with the bench's answer budget and task; base model unless ``engine={"adapter": ...}``. The
    engine is the one the job starts for these settings (no LoRA support without an adapter to serve,
    jobs.extraction.identity.job_engine_settings) unless the row sets ``enable_lora`` itself (adapters served per request)."""
    from notelake.conf import load_settings
    from notelake.jobs.extraction.identity import job_engine_settings

    engine = {"adapter": None, "max_tokens": args.max_tokens, **overrides.pop("engine", {})}
    # The bench measures speed: answers cut at a small --max-tokens are failed notes, not a failed run.
    job = {"task": TASK, "max_error_rate": 1.0, **overrides.pop("job", {})}
    # the rows' job runs share the engine actors the bench loaded once (the engine's start is a row of its own)
    ray = {"engine_scope": "cluster", **overrides.pop("ray", {})}
    settings = load_settings(REPO / args.conf).with_overrides(engine=engine, job=job, ray=ray, **overrides)
    return settings if "enable_lora" in engine else job_engine_settings(settings)


def corpus_texts(args) -> list[str]:
    return synthetic_notes(args.notes, args.seed)["text"].to_pylist()


@dataclass(frozen=True)
class Workload:
    """The prompts of a row's passes: the task, the corpus texts and the answer budget."""

    task: Any  # notelake.conf.task.Task
    texts: list[str]
    max_tokens: int


def workload(args) -> Workload:
    """The row's task, its ``--notes`` corpus texts and ``--max-tokens``."""
    from notelake.conf.task import load_task

    return Workload(load_task(TASK), corpus_texts(args), args.max_tokens)
