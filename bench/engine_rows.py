"""Benchmark rows that time one engine in this process, no job around it: bare vLLM with the job's and with
vLLM's default engine arguments (row 1), base against LoRA adapters served per request or merged into the weights,
guided decoding on and off (row 4), several adapters in one batch, and the classification-head tagger."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.corpus import PROBE_TEXT, render_prompts
from bench.measure import ProcessTreeUsage, row
from bench.vllm_passes import (Adapters, Bare, guided_params, load_vllm_engine, sampling_params, timed_engine_generate,
                               timed_llm_generate, warm_up)
from bench.workload import bench_settings, corpus_texts, workload

BASE_NO_LORA = "base, engine without LoRA"


def _bare_passes(args, label: str, with_ignore_eos: bool) -> tuple[list[dict], dict]:
    """Bare ``LLM.generate`` passes on an engine built with exactly the job's engine arguments."""
    settings = bench_settings(args)
    work = workload(args)
    engine, fixed = load_vllm_engine(settings)
    prompts = render_prompts(engine.tokenizer, work.task, work.texts)
    cfg = settings.engine
    bare = Bare(engine.llm, cfg, render_prompts(engine.tokenizer, work.task, [PROBE_TEXT])[0])
    rows = [timed_llm_generate(f"bare vLLM LLM.generate ({label}), guided", bare, prompts,
                               guided_params(cfg, work.task, work.texts, args.max_tokens))]
    if with_ignore_eos:
        rows.append(timed_llm_generate(f"bare vLLM LLM.generate ({label}), ignore_eos", bare, prompts,
                                       sampling_params(cfg, args.max_tokens, ignore_eos=True)))
    return rows, {**fixed, "first_token_s": rows[0]["first_token_s"]}


def row_bare(args) -> dict:
    """Row 1: bare ``LLM.generate`` on the prompt list, with exactly the job's engine arguments (the ceiling)."""
    rows, fixed = _bare_passes(args, "job engine args", with_ignore_eos=True)
    return {"rows": rows, "fixed": {"bare vLLM": fixed}}


def row_bare_all_cores(args) -> dict:
    """Row 1 with every core computing: vLLM CPU reserves one core per worker for its scheduler process (the
    worker is pinned to the other cores, with OMP_NUM_THREADS=1 on 2 cores, in the bench and in the job's Ray
    actor); VLLM_CPU_NUM_OF_RESERVED_CPU=0 lets the worker use them all, beside the scheduler."""
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    rows, fixed = _bare_passes(args, "job engine args, no reserved core", with_ignore_eos=False)
    return {"rows": rows, "fixed": {"bare vLLM, no reserved core": fixed}}


def row_bare_default(args) -> dict:
    """Row 1': bare ``LLM(model, dtype)`` with vLLM's default engine arguments, same prompts and sampling."""
    from transformers import AutoTokenizer
    from vllm import LLM

    from notelake.models.base_model import resolve_model

    settings = bench_settings(args)
    cfg = settings.engine
    work = workload(args)
    model_path = str(resolve_model(cfg.model))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = render_prompts(tokenizer, work.task, work.texts)
    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        # vLLM's default KV-cache share (0.9 of host memory on CPU) leaves no room for the rest of the machine's
        # processes: the job's share is the one non-default argument.
        llm = LLM(model=model_path, dtype=cfg.dtype, seed=cfg.seed, gpu_memory_utilization=cfg.gpu_memory_utilization)
        load_s = round(time.monotonic() - t0, 1)
    warm_s = warm_up(llm, tokenizer, cfg, args.max_tokens)
    bare = Bare(llm, cfg, render_prompts(tokenizer, work.task, [PROBE_TEXT])[0])
    rows = [
        timed_llm_generate("bare vLLM LLM.generate (default engine args), guided", bare, prompts,
                           guided_params(cfg, work.task, work.texts, args.max_tokens)),
        timed_llm_generate("bare vLLM LLM.generate (default engine args), ignore_eos", bare, prompts,
                           sampling_params(cfg, args.max_tokens, ignore_eos=True)),
    ]
    return {"rows": rows, "fixed": {"bare vLLM, default args": {
        "engine_load_s": load_s, "engine_load_peak_mem_gib": mem.peak_gib, "warm_up_4_notes_s": warm_s,
        "first_token_s": rows[0]["first_token_s"]}}}


def row_base_no_lora(args) -> dict:
    """Row 4's denominator: the base model on an engine started without LoRA support (``enable_lora: false``),
    the same passes as the lora row's base rows. An engine with LoRA enabled pays for it on base requests too."""
    settings = bench_settings(args, engine={"enable_lora": False, "merge_adapter": False})
    work = workload(args)
    engine, fixed = load_vllm_engine(settings)
    probe = render_prompts(engine.tokenizer, work.task, [PROBE_TEXT])[0]
    bare = Bare(engine.llm, settings.engine, probe)
    rows = [timed_engine_generate(f"VLLMEngine.generate, {BASE_NO_LORA}, guided on", engine, work, probe),
            timed_llm_generate(f"bare vLLM LLM.generate, {BASE_NO_LORA}, ignore_eos", bare,
                               render_prompts(engine.tokenizer, work.task, work.texts),
                               sampling_params(settings.engine, args.max_tokens, ignore_eos=True))]
    return {"rows": rows, "fixed": {"vLLM without LoRA": fixed}}


def row_lora(args) -> dict:
    """Row 4: base model vs the shipped LoRA adapter, guided decoding on vs off, through our VLLMEngine.generate;
    plus the pure per-token LoRA cost (bare LLM.generate, ignore_eos, unguided)."""
    from vllm.lora.request import LoRARequest

    from notelake.models.adapters import load_adapter

    settings = bench_settings(args, engine={"enable_lora": True})
    cfg = settings.engine
    work = workload(args)
    engine, _ = load_vllm_engine(settings)
    adapter = load_adapter(args.adapter, engine.model_sha256)  # refuses an adapter trained on another base
    probe = render_prompts(engine.tokenizer, work.task, [PROBE_TEXT])[0]
    lora = LoRARequest(adapter.name, 1, str(adapter.path))
    served = Adapters((str(adapter.path),), lora)
    rows = []
    # LoRA with guided decoding off is left out: the guided on/off difference is measured on the base model, and a
    # LoRA pass costs several base passes on vLLM CPU (docs/benchmarks.md).
    for guided, label, adapters in ((True, "base", None), (True, f"LoRA {adapter.name}", served),
                                    (False, "base", None)):
        rows.append(timed_engine_generate(f"VLLMEngine.generate, {label}, guided {'on' if guided else 'off'}",
                                          engine, work, probe, guided=guided, adapters=adapters,
                                          adapter=adapter.name if adapters else None))
    prompts = render_prompts(engine.tokenizer, work.task, work.texts)
    pure = sampling_params(cfg, args.max_tokens, ignore_eos=True)
    bare = Bare(engine.llm, cfg, probe)
    rows.append(timed_llm_generate("bare vLLM LLM.generate, base, ignore_eos", bare, prompts, pure))
    rows.append(timed_llm_generate(f"bare vLLM LLM.generate, LoRA {adapter.name}, ignore_eos", bare, prompts, pure,
                                   lora=lora, adapter=adapter.name))
    return {"rows": rows, "adapter": {"name": adapter.name, "sha256": adapter.sha256, "rank": adapter.rank}}


def row_lora_merged(args) -> dict:
    """Row 4': the adapter merged into the base weights (engine.merge_adapter: no per-token LoRA work),
    same engine args, same passes as the base rows of the lora row."""
    from notelake.models.adapters import load_adapter, merged_model
    from notelake.models.base_model import model_sha256, resolve_model

    base = bench_settings(args)
    base_path = resolve_model(base.engine.model)
    adapter = load_adapter(args.adapter, model_sha256(base_path))
    t0 = time.monotonic()
    merged_model(base_path, adapter)  # built once per (adapter, base), then cached: 0-ish when cached
    merge_s = round(time.monotonic() - t0, 1)
    settings = bench_settings(args, engine={"adapter": str(adapter.path), "merge_adapter": True})
    cfg = settings.engine
    work = workload(args)
    engine, fixed = load_vllm_engine(settings)
    probe = render_prompts(engine.tokenizer, work.task, [PROBE_TEXT])[0]
    label = f"LoRA {adapter.name} merged into the weights"
    rows = [timed_engine_generate(f"VLLMEngine.generate, {label}, guided on", engine, work, probe,
                                  adapter=adapter.name),
            timed_llm_generate(f"bare vLLM LLM.generate, {label}, ignore_eos", Bare(engine.llm, cfg, probe),
                               render_prompts(engine.tokenizer, work.task, work.texts),
                               sampling_params(cfg, args.max_tokens, ignore_eos=True), adapter=adapter.name)]
    return {"rows": rows, "fixed": {f"merged {adapter.name}": {**fixed, "merge_s": merge_s}}}


def row_multi_adapter(args) -> dict:
    """Several LoRA adapters in one batch (requests round-robin over ``--adapters``) vs one adapter, guided,
    through VLLMEngine.generate."""
    settings = bench_settings(args, engine={"enable_lora": True, "max_loras": max(len(args.adapters), 1)})
    work = workload(args)
    engine, _ = load_vllm_engine(settings)
    probe = render_prompts(engine.tokenizer, work.task, [PROBE_TEXT])[0]
    rows = []
    for label, folders in ((f"one adapter ({Path(args.adapters[0]).name})", args.adapters[:1]),
                           (f"{len(args.adapters)} adapters mixed", args.adapters)):
        adapters = Adapters(tuple(str(Path(f).resolve()) for f in folders))
        rows.append(timed_engine_generate(f"VLLMEngine.generate, {label}, guided", engine, work, probe,
                                          adapters=adapters))
    return {"rows": rows}


def row_tagger(args) -> dict:
    """The classification-head tagger (``--adapter`` = its folder) on the same synthetic notes as the vLLM
    rows: one forward pass per note window, no decoding. Through the job's engine interface (TaggerEngine)."""
    from notelake.models.engine import GenerationRequest
    from notelake.models.tagger import TaggerEngine

    settings = bench_settings(args, engine={"backend": "tagger", "adapter": args.adapter})
    t0 = time.monotonic()
    engine = TaggerEngine(settings.engine)
    load_s = round(time.monotonic() - t0, 2)
    texts = corpus_texts(args)
    requests = [GenerationRequest(f"{i}", [], text=t) for i, t in enumerate(texts)]
    engine.generate(requests[:1])  # warm-up
    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        results = engine.generate(requests)
        wall = time.monotonic() - t0
    return {"rows": [row(f"tagger {engine.info.name} (classification head, TaggerEngine.generate)", notes=len(texts),
                         wall_s=wall, tokens_in=sum(r.prompt_tokens for r in results), tokens_out=0,
                         usage=mem, concepts=sum(len(r.spans or ()) for r in results),
                         errors=sum(1 for r in results if r.error))],
            "fixed": {"tagger": {"engine_load_s": load_s}}}
