"""Timed passes on one vLLM engine: bare ``LLM.generate`` over token ids, and ``VLLMEngine.generate`` (the job's
engine call) over chat requests.

Before each timed pass the engine's prefix cache is emptied and one probe prompt (not in the corpus) is
generated with max_tokens=1: every pass starts with the shared instruction prefix cached and nothing else,
and the probe's latency is the "first token" figure. Pure-throughput passes add ``ignore_eos`` and drop the
grammar so every prompt decodes exactly ``--max-tokens`` tokens. Logs carry counts and timings only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from bench.corpus import render_prompts, synthetic_notes
from bench.measure import ProcessTreeUsage, row
from bench.workload import TASK, WARMUP_SEED, Workload

log = logging.getLogger("bench")


def sampling_params(cfg, max_tokens: int, guide: dict | None = None, ignore_eos: bool = False):
    """The engine's sampling (models/vllm_engine.py): greedy, seeded, constrained by ``guide`` when given."""
    from vllm import SamplingParams

    from notelake.models.vllm_engine import structured_output_api

    kwargs = {"temperature": cfg.temperature, "seed": cfg.seed, "max_tokens": max_tokens, "ignore_eos": ignore_eos}
    if guide is not None:
        params_cls, field_name = structured_output_api()
        kwargs[field_name] = params_cls(**guide)
    return SamplingParams(**kwargs)


def guided_params(cfg, task, texts: list[str], max_tokens: int) -> list:
    """Per-prompt sampling with the job's answer grammar (grounded: each prompt's own mentions)."""
    from notelake.udfs.answer import answer_guide

    return [sampling_params(cfg, max_tokens, answer_guide(task, t, cfg.guided_decoding)) for t in texts]


@dataclass(frozen=True)
class Bare:
    """A vLLM ``LLM`` timed bare: the instance, the engine config whose sampling it follows, the probe's token ids."""

    llm: Any
    cfg: Any  # notelake.conf.settings.EngineConfig
    probe: list[int]


def probe_first_token(bare: Bare, lora=None) -> float:
    """Empty the prefix cache, then time one 1-token generation of the probe prompt."""
    bare.llm.reset_prefix_cache()
    t0 = time.monotonic()
    bare.llm.generate([{"prompt_token_ids": bare.probe}], sampling_params(bare.cfg, 1), use_tqdm=False,
                      lora_request=lora)
    return round(time.monotonic() - t0, 3)


def timed_llm_generate(name: str, bare: Bare, prompts: list[list[int]], params, lora=None, **extra) -> dict:
    """One timed ``LLM.generate`` over all prompts (after the cache reset and probe); ``extra`` joins the row."""
    first_token_s = probe_first_token(bare, lora)
    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        outs = bare.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                                 lora_request=lora)
        wall = time.monotonic() - t0
    tokens_out = sum(len(o.outputs[0].token_ids) for o in outs)
    log.info("%s: %d prompts, %d output tokens in %.1f s", name, len(outs), tokens_out, wall)
    return row(name, notes=len(prompts), wall_s=wall, tokens_in=sum(len(o.prompt_token_ids) for o in outs),
               tokens_out=tokens_out, usage=mem, first_token_s=first_token_s, **extra)


def warm_up(llm, tokenizer, cfg, max_tokens: int) -> float:
    """One untimed guided pass over the 4 warm-up notes the job rows' first run uses: the first pass of a fresh
    engine runs slower than the next ones, and every row's timed passes start warm."""
    from notelake.conf.task import load_task

    task = load_task(TASK)
    texts = synthetic_notes(4, seed=WARMUP_SEED)["text"].to_pylist()
    t0 = time.monotonic()
    llm.generate([{"prompt_token_ids": p} for p in render_prompts(tokenizer, task, texts)],
                 guided_params(cfg, task, texts, max_tokens), use_tqdm=False)
    return round(time.monotonic() - t0, 2)


def load_vllm_engine(settings):
    """A warmed-up ``VLLMEngine`` of ``settings`` and its fixed costs (load time and memory, warm-up time)."""
    from notelake.models.vllm_engine import VLLMEngine

    with ProcessTreeUsage() as mem:
        engine = VLLMEngine(settings.engine)
    warm_s = warm_up(engine.llm, engine.tokenizer, settings.engine, settings.engine.max_tokens)
    return engine, {"engine_load_s": engine.load_seconds, "engine_load_peak_mem_gib": mem.peak_gib,
                    "warm_up_4_notes_s": warm_s}


@dataclass(frozen=True)
class Adapters:
    """The adapters an engine pass serves: folders, round-robin over its requests, and the LoRA request of its
    first-token probe (None: the probe runs on the base model)."""

    folders: tuple[str, ...]
    probe: Any = None


def timed_engine_generate(name: str, engine, work: Workload, probe: list[int], *, guided: bool = True,
                          adapters: Adapters | None = None, **extra) -> dict:
    """One ``VLLMEngine.generate`` over the workload's prompts (the job's engine call), after a first-token probe;
    the engine's default adapter unless ``adapters``. ``extra`` joins the row."""
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.answer import answer_guide
    from notelake.udfs.prompts import build_messages

    cfg = engine.cfg
    folders = adapters.folders if adapters else (None,)
    requests = [GenerationRequest(f"{i}", build_messages(work.task, t),
                                  guide=answer_guide(work.task, t, cfg.guided_decoding) if guided else None,
                                  max_tokens=work.max_tokens, adapter=folders[i % len(folders)])
                for i, t in enumerate(work.texts)]
    first_token_s = probe_first_token(Bare(engine.llm, cfg, probe), adapters.probe if adapters else None)
    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        results = engine.generate(requests)
        wall = time.monotonic() - t0
    return row(name, notes=len(work.texts), wall_s=wall, tokens_in=sum(r.prompt_tokens for r in results),
               tokens_out=sum(r.output_tokens for r in results), usage=mem, first_token_s=first_token_s,
               errors=sum(1 for r in results if not r.ok), guided=cfg.guided_decoding if guided else "off", **extra)
