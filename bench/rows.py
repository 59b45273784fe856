"""Benchmark rows. ``bench.run`` starts each in its own process (one vLLM engine at a time, clean teardown):

    python -m bench.rows <row> --notes 32 --seed 0 --max-tokens 64 [--conf conf/gpu.yaml] \\
        --work runs/bench/work --out runs/bench/work/<row>.json

Every row uses the same notes (bench.corpus, seeded), the same prompts (udfs.prompts.build_messages rendered
with the model's chat template), the same model and the same sampling (greedy, seed 0, ``--max-tokens``,
the job's answer grammar (``engine.guided_decoding``) unless a row says otherwise). Pure-throughput rows add
``ignore_eos`` and drop the grammar so every prompt decodes exactly ``--max-tokens`` tokens.

Before each timed pass the engine's prefix cache is emptied and one probe prompt (not in the corpus) is
generated with max_tokens=1: every pass starts with the shared instruction prefix cached and nothing else,
and the probe's latency is the "first token" figure. Logs carry counts and timings only, never note text.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import random
import resource
import sys
import time
from pathlib import Path

import pyarrow as pa

from bench.corpus import PROBE_TEXT, render_prompts, synthetic_notes, write_note_table
from bench.measure import ProcessTreeUsage, row

log = logging.getLogger("bench")

TASK = "phee"
REPO = Path(__file__).resolve().parents[1]
BASE_NO_LORA = "base, engine without LoRA"
WARMUP_SEED = 10_000  # the 4 notes every engine runs once before its timed passes (not in the corpus)
#: the conf's batching as it was before batches were sent ahead (session 18 and earlier)
ONE_BATCH_AT_A_TIME = {"ray": {"batches_ahead": 0}}


def bench_settings(args, **overrides):
    """``--conf`` with the bench's answer budget and task; base model unless ``engine={"adapter": ...}``. The
    engine is the one the job starts for these settings (no LoRA support without an adapter to serve,
    jobs.extraction.identity.job_engine_settings) unless the row sets ``enable_lora`` itself (adapters served per request)."""
    from notelake.conf import load_settings
    from notelake.jobs.extraction.identity import job_engine_settings

    engine = {"adapter": None, "max_tokens": args.max_tokens, **overrides.pop("engine", {})}
    # The bench measures speed: answers cut at a small --max-tokens are failed notes, not a failed run.
    job = {"task": TASK, "max_error_rate": 1.0, **overrides.pop("job", {})}
    settings = load_settings(REPO / args.conf).with_overrides(engine=engine, job=job, **overrides)
    return settings if "enable_lora" in engine else job_engine_settings(settings)


def corpus_texts(args) -> list[str]:
    return synthetic_notes(args.notes, args.seed)["text"].to_pylist()


# ============================================================================================== vLLM passes
def sampling_params(cfg, max_tokens: int, guide: dict | None = None, ignore_eos: bool = False):
    """The engine's sampling (models/engine.py): greedy, seeded, constrained by ``guide`` when given."""
    from vllm import SamplingParams

    from notelake.models.engine import _structured_output_api

    kwargs = {"temperature": cfg.temperature, "seed": cfg.seed, "max_tokens": max_tokens, "ignore_eos": ignore_eos}
    if guide is not None:
        params_cls, field_name = _structured_output_api()
        kwargs[field_name] = params_cls(**guide)
    return SamplingParams(**kwargs)


def guided_params(cfg, task, texts: list[str], max_tokens: int) -> list:
    """Per-prompt sampling with the job's answer grammar (grounded: each prompt's own mentions)."""
    from notelake.udfs.answer import answer_guide

    return [sampling_params(cfg, max_tokens, answer_guide(task, t, cfg.guided_decoding)) for t in texts]


def probe_first_token(llm, probe: list[int], cfg, lora=None) -> float:
    """Empty the prefix cache, then time one 1-token generation of the probe prompt."""
    llm.reset_prefix_cache()
    t0 = time.monotonic()
    llm.generate([{"prompt_token_ids": probe}], sampling_params(cfg, 1), use_tqdm=False, lora_request=lora)
    return round(time.monotonic() - t0, 3)


def timed_llm_generate(name: str, llm, prompts: list[list[int]], probe: list[int], cfg, params, lora=None,
                       **extra) -> dict:
    """One timed ``LLM.generate`` over all prompts (after the cache reset and probe)."""
    first_token_s = probe_first_token(llm, probe, cfg, lora)
    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=lora)
        wall = time.monotonic() - t0
    tokens_out = sum(len(o.outputs[0].token_ids) for o in outs)
    log.info("%s: %d prompts, %d output tokens in %.1f s", name, len(outs), tokens_out, wall)
    return row(name, notes=len(prompts), wall_s=wall, tokens_in=sum(len(o.prompt_token_ids) for o in outs),
               tokens_out=tokens_out, usage=mem, first_token_s=first_token_s, **extra)


def warm_up(llm, tokenizer, cfg, max_tokens: int) -> float:
    """One untimed guided pass over the 4 warm-up notes the job rows' first run uses: the first pass of a fresh
    engine runs slower (measured 9.75 s against 7.2 s for the next ones), and every row's timed passes start warm."""
    from notelake.conf.task import load_task

    task = load_task(TASK)
    texts = synthetic_notes(4, seed=WARMUP_SEED)["text"].to_pylist()
    t0 = time.monotonic()
    llm.generate([{"prompt_token_ids": p} for p in render_prompts(tokenizer, task, texts)],
                 guided_params(cfg, task, texts, max_tokens), use_tqdm=False)
    return round(time.monotonic() - t0, 2)


def _load_vllm_engine(settings):
    from notelake.models.engine import VLLMEngine

    with ProcessTreeUsage() as mem:
        engine = VLLMEngine(settings.engine)
    warm_s = warm_up(engine.llm, engine.tokenizer, settings.engine, settings.engine.max_tokens)
    return engine, {"engine_load_s": engine.load_seconds, "engine_load_peak_mem_gib": mem.peak_gib,
                    "warm_up_4_notes_s": warm_s}


def _bare_passes(args, label: str, with_ignore_eos: bool) -> tuple[list[dict], dict]:
    """Bare ``LLM.generate`` passes on an engine built with exactly the job's engine arguments."""
    from notelake.conf.task import load_task
    settings = bench_settings(args)
    task = load_task(TASK)
    engine, fixed = _load_vllm_engine(settings)
    texts = corpus_texts(args)
    prompts = render_prompts(engine.tokenizer, task, texts)
    probe = render_prompts(engine.tokenizer, task, [PROBE_TEXT])[0]
    cfg = settings.engine
    rows = [timed_llm_generate(f"bare vLLM LLM.generate ({label}), guided", engine.llm, prompts, probe, cfg,
                               guided_params(cfg, task, texts, args.max_tokens))]
    if with_ignore_eos:
        rows.append(timed_llm_generate(f"bare vLLM LLM.generate ({label}), ignore_eos", engine.llm, prompts, probe,
                                       cfg, sampling_params(cfg, args.max_tokens, ignore_eos=True)))
    return rows, {**fixed, "first_token_s": rows[0]["first_token_s"]}


def row_bare(args) -> dict:
    """Row 1: bare ``LLM.generate`` on the prompt list, with exactly the job's engine arguments (the ceiling)."""
    rows, fixed = _bare_passes(args, "job engine args", with_ignore_eos=True)
    return {"rows": rows, "fixed": {"bare vLLM": fixed}}


def row_bare_all_cores(args) -> dict:
    """Row 1 with every core computing: vLLM CPU reserves one core per worker for its scheduler process
    (measured: the worker is pinned to core 0 of 2, OMP_NUM_THREADS=1, in the bench and in the job's Ray actor);
    VLLM_CPU_NUM_OF_RESERVED_CPU=0 lets the worker use both, beside the scheduler."""
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    rows, fixed = _bare_passes(args, "job engine args, no reserved core", with_ignore_eos=False)
    return {"rows": rows, "fixed": {"bare vLLM, no reserved core": fixed}}


def row_bare_default(args) -> dict:
    """Row 1': bare ``LLM(model, dtype)`` with vLLM's default engine arguments, same prompts and sampling."""
    from transformers import AutoTokenizer
    from vllm import LLM

    from notelake.conf.task import load_task
    from notelake.models.base_model import resolve_model

    settings = bench_settings(args)
    cfg = settings.engine
    task = load_task(TASK)
    model_path = str(resolve_model(cfg.model))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = corpus_texts(args)
    prompts = render_prompts(tokenizer, task, texts)
    probe = render_prompts(tokenizer, task, [PROBE_TEXT])[0]
    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        # vLLM's default KV-cache share (0.9 of host memory on CPU) does not fit beside the rest of a 24 GiB
        # machine: the job's share is the one non-default argument.
        llm = LLM(model=model_path, dtype=cfg.dtype, seed=cfg.seed, gpu_memory_utilization=cfg.gpu_memory_utilization)
        load_s = round(time.monotonic() - t0, 1)
    warm_s = warm_up(llm, tokenizer, cfg, args.max_tokens)
    rows = [
        timed_llm_generate("bare vLLM LLM.generate (default engine args), guided", llm, prompts, probe, cfg,
                           guided_params(cfg, task, texts, args.max_tokens)),
        timed_llm_generate("bare vLLM LLM.generate (default engine args), ignore_eos", llm, prompts, probe, cfg,
                           sampling_params(cfg, args.max_tokens, ignore_eos=True)),
    ]
    return {"rows": rows, "fixed": {"bare vLLM, default args": {
        "engine_load_s": load_s, "engine_load_peak_mem_gib": mem.peak_gib, "warm_up_4_notes_s": warm_s,
        "first_token_s": rows[0]["first_token_s"]}}}


def timed_engine_generate(name: str, engine, task, texts: list[str], max_tokens: int, probe: list[int], *,
                          guided: bool = True, adapter_path: str | None = None, probe_lora=None, **extra) -> dict:
    """One ``VLLMEngine.generate`` over the texts' prompts (the job's engine call), after a first-token probe."""
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.answer import answer_guide
    from notelake.udfs.prompts import build_messages

    cfg = engine.cfg
    requests = [GenerationRequest(f"{i}", build_messages(task, t),
                                  guide=answer_guide(task, t, cfg.guided_decoding) if guided else None,
                                  max_tokens=max_tokens, adapter=adapter_path) for i, t in enumerate(texts)]
    first_token_s = probe_first_token(engine.llm, probe, cfg, probe_lora)
    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        results = engine.generate(requests)
        wall = time.monotonic() - t0
    return row(name, notes=len(texts), wall_s=wall, tokens_in=sum(r.prompt_tokens for r in results),
               tokens_out=sum(r.output_tokens for r in results), usage=mem, first_token_s=first_token_s,
               errors=sum(1 for r in results if not r.ok), guided=cfg.guided_decoding if guided else "off", **extra)


def row_base_no_lora(args) -> dict:
    """Row 4's denominator: the base model on an engine started without LoRA support (``enable_lora: false``),
    the same passes as the lora row's base rows. An engine with LoRA enabled pays for it on base requests too."""
    from notelake.conf.task import load_task

    settings = bench_settings(args, engine={"enable_lora": False, "merge_adapter": False})
    task = load_task(TASK)
    engine, fixed = _load_vllm_engine(settings)
    texts = corpus_texts(args)
    probe = render_prompts(engine.tokenizer, task, [PROBE_TEXT])[0]
    rows = [timed_engine_generate(f"VLLMEngine.generate, {BASE_NO_LORA}, guided on", engine, task, texts,
                                  args.max_tokens, probe),
            timed_llm_generate(f"bare vLLM LLM.generate, {BASE_NO_LORA}, ignore_eos", engine.llm,
                               render_prompts(engine.tokenizer, task, texts), probe, settings.engine,
                               sampling_params(settings.engine, args.max_tokens, ignore_eos=True))]
    return {"rows": rows, "fixed": {"vLLM without LoRA": fixed}}


def row_lora(args) -> dict:
    """Row 4: base model vs the shipped LoRA adapter, guided decoding on vs off, through our VLLMEngine.generate;
    plus the pure per-token LoRA cost (bare LLM.generate, ignore_eos, unguided)."""
    from vllm.lora.request import LoRARequest

    from notelake.conf.task import load_task
    from notelake.models.adapters import load_adapter

    settings = bench_settings(args, engine={"enable_lora": True})
    cfg = settings.engine
    task = load_task(TASK)
    engine, _ = _load_vllm_engine(settings)
    adapter = load_adapter(args.adapter, engine.model_sha256)  # refuses an adapter trained on another base
    texts = corpus_texts(args)
    probe = render_prompts(engine.tokenizer, task, [PROBE_TEXT])[0]
    lora = LoRARequest(adapter.name, 1, str(adapter.path))
    rows = []
    # LoRA with guided decoding off is left out: the guided on/off difference is measured on the base model, and a
    # LoRA pass costs ~3x a base pass on vLLM CPU.
    for guided, label, adapter_path, probe_lora in ((True, "base", "", None),
                                                    (True, f"LoRA {adapter.name}", str(adapter.path), lora),
                                                    (False, "base", "", None)):
        rows.append(timed_engine_generate(f"VLLMEngine.generate, {label}, guided {'on' if guided else 'off'}",
                                          engine, task, texts, args.max_tokens, probe, guided=guided,
                                          adapter_path=adapter_path, probe_lora=probe_lora,
                                          adapter=adapter.name if adapter_path else None))
    prompts = render_prompts(engine.tokenizer, task, texts)
    pure = sampling_params(cfg, args.max_tokens, ignore_eos=True)
    rows.append(timed_llm_generate("bare vLLM LLM.generate, base, ignore_eos", engine.llm, prompts, probe, cfg, pure))
    rows.append(timed_llm_generate(f"bare vLLM LLM.generate, LoRA {adapter.name}, ignore_eos", engine.llm, prompts,
                                   probe, cfg, pure, lora=lora, adapter=adapter.name))
    return {"rows": rows, "adapter": {"name": adapter.name, "sha256": adapter.sha256, "rank": adapter.rank}}


def row_lora_merged(args) -> dict:
    """Row 4': the adapter merged into the base weights (engine.merge_adapter: no per-token LoRA work),
    same engine args, same passes as the base rows of the lora row."""
    from notelake.conf.task import load_task
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
    task = load_task(TASK)
    engine, fixed = _load_vllm_engine(settings)
    texts = corpus_texts(args)
    probe = render_prompts(engine.tokenizer, task, [PROBE_TEXT])[0]
    label = f"LoRA {adapter.name} merged into the weights"
    rows = [timed_engine_generate(f"VLLMEngine.generate, {label}, guided on", engine, task, texts, args.max_tokens,
                                  probe, adapter=adapter.name)]
    prompts = render_prompts(engine.tokenizer, task, texts)
    rows.append(timed_llm_generate(f"bare vLLM LLM.generate, {label}, ignore_eos", engine.llm, prompts, probe, cfg,
                                   sampling_params(cfg, args.max_tokens, ignore_eos=True), adapter=adapter.name))
    return {"rows": rows, "fixed": {f"merged {adapter.name}": {**fixed, "merge_s": merge_s}}}


# ============================================================================================== job
def _runs_row(output: str) -> dict:
    """The latest row of the job's ``runs`` table (counts and tokens)."""
    from notelake.jobs.warehouse import read_delta_arrow

    runs = read_delta_arrow(Path(output) / "runs").to_pylist()
    return max(runs, key=lambda r: r["started_at"])


def _reset_actor_prefix_cache(pool) -> None:
    import ray

    ray.get([a.__ray_call__.remote(lambda actor: actor.engine.llm.reset_prefix_cache()) for a in pool.actors])


def _probe_pool(pool, task) -> float:
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.prompts import build_messages

    t0 = time.monotonic()
    pool.generate([GenerationRequest("probe", build_messages(task, PROBE_TEXT), max_tokens=1)])
    return round(time.monotonic() - t0, 3)


def timed_bare_on_job_engine(name: str, pool, task, texts: list[str], max_tokens: int) -> dict:
    """Bare vLLM ``LLM.generate`` on the job's own engine, run and timed inside its actor process: the same engine
    instance, args and sampling as the job run timed right after it. Rows measured minutes apart in separate
    processes differ by up to ~10 % on this VM (docs/benchmarks.md, session 19); a pair on one engine keeps that
    drift out of the job / bare ratio."""
    import ray

    def bare_pass(actor, task_json: dict, texts: list[str], max_tokens: int) -> dict:
        import time

        from notelake.conf.task import Task
        from notelake.models.engine import GenerationRequest
        from notelake.udfs.answer import answer_guide
        from notelake.udfs.prompts import build_messages

        engine, task = actor.engine, Task.model_validate(task_json)
        # the engine's own request preparation (chat template, sampling, LoRA): exactly what the job's calls send
        prompts, params, loras = zip(*(engine._prepare(GenerationRequest(
            f"bare-{i}", build_messages(task, t), guide=answer_guide(task, t, engine.cfg.guided_decoding),
            max_tokens=max_tokens)) for i, t in enumerate(texts)))
        t0 = time.monotonic()
        outs = engine.llm.generate(list(prompts), list(params), use_tqdm=False,
                                   lora_request=list(loras) if any(loras) else None)
        return {"wall_s": time.monotonic() - t0, "tokens_in": sum(len(o.prompt_token_ids) for o in outs),
                "tokens_out": sum(len(o.outputs[0].token_ids) for o in outs)}

    _reset_actor_prefix_cache(pool)
    first_token_s = _probe_pool(pool, task)
    with ProcessTreeUsage() as mem:
        got = ray.get(pool.actors[0].__ray_call__.remote(bare_pass, task.model_dump(mode="json"), texts, max_tokens))
    log.info("%s: %d prompts, %d output tokens in %.1f s", name, len(texts), got["tokens_out"], got["wall_s"])
    return row(name, notes=len(texts), wall_s=got["wall_s"], tokens_in=got["tokens_in"], tokens_out=got["tokens_out"],
               usage=mem, first_token_s=first_token_s)


def timed_job(name: str, settings, spark, source: str, output: str, pool=None, task=None, **extra) -> dict:
    """One ``jobs.extraction.job.run`` on a warm Spark, Ray and engine; counts and tokens from its ``runs`` row."""
    from notelake.jobs.extraction.job import run

    first_token_s = None
    if pool is not None:  # same cache state as the bare passes: shared prefix only
        _reset_actor_prefix_cache(pool)
        first_token_s = _probe_pool(pool, task)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(settings.spark.arrow_batch_size))
    profiler = cProfile.Profile()  # the driver's side of the run: where its wall time goes, stage by stage
    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        profiler.enable()
        code = run(settings, source, output, spark=spark)
        profiler.disable()
        wall = time.monotonic() - t0
    runs = _runs_row(output)
    log.info("%s: exit %d, %d selected, %d succeeded in %.1f s", name, code, runs["selected"], runs["succeeded"], wall)
    return row(name, notes=runs["selected"], wall_s=wall, tokens_in=runs["tokens_in"], tokens_out=runs["tokens_out"],
               usage=mem, exit_code=code, succeeded=runs["succeeded"], failed=runs["failed"],
               skipped=runs["skipped"], first_token_s=first_token_s,
               batching={"batch_size": settings.ray.batch_size, "max_in_flight": settings.ray.max_in_flight,
                         "arrow_batch_size": settings.spark.arrow_batch_size},
               driver_profile=project_functions(profiler), **extra)


def project_functions(profiler, top: int = 20) -> list[dict]:
    """The project's functions (jobs/, models/, udfs/) and Spark's DataFrame actions with the most cumulative
    driver time; names only."""
    stats = pstats.Stats(profiler).stats
    found = []
    for (path, _, func), (_, calls, _, cum_s, _) in stats.items():
        where = Path(path)
        if REPO in where.parents and where.relative_to(REPO).parts[0] in ("jobs", "models", "udfs"):
            name = f"{where.relative_to(REPO)}:{func}"
        elif "pyspark" in where.parts and where.name == "dataframe.py" and not func.startswith("_"):
            name = f"pyspark DataFrame.{func}"
        else:
            continue
        found.append({"function": name, "calls": calls, "cum_s": round(cum_s, 2)})
    return sorted(found, key=lambda f: -f["cum_s"])[:top]


def timed_job_without_spark(name: str, settings, notes, output: str, pool, task) -> dict:
    """The job's executor path without Spark: ``extract_batches`` (chunk, prompt, EnginePool.generate, parse,
    ground, stage; ``ray.batches_ahead`` sent ahead) on Arrow batches of ``spark.arrow_batch_size`` notes, in
    ``num_actors x max_in_flight`` threads (the job's Spark partitions), then ``commit_round`` to Delta. Isolates
    what Spark adds to the job."""
    import shutil
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    from notelake.jobs.extraction.commit import commit_round
    from notelake.jobs.extraction.identity import describe_extraction
    from notelake.jobs.extraction.stage import OUTCOME_SCHEMA, StageContext, extract_batches
    from notelake.jobs.warehouse import open_warehouse
    from notelake.udfs.hashing import note_bucket, sha256_text

    _reset_actor_prefix_cache(pool)
    first_token_s = _probe_pool(pool, task)
    passthrough = ("patient_id", "note_date", "note_type")
    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        run_id = f"bench-nospark-{uuid.uuid4().hex[:8]}"
        lineage = describe_extraction(settings, task).lineage(run_id)
        warehouse = open_warehouse(output, {"notelake.run_id": run_id})
        buckets = warehouse.note_buckets(settings.job.note_buckets)
        staging = Path(output) / "_staging" / run_id
        ctx = StageContext(settings=settings, tasks={task.name: task}, lineages={task.name: lineage},
                           staging_dir=str(staging), passthrough=passthrough)
        n = notes.num_rows
        hashed = notes.append_column("text_sha256", pa.array([sha256_text(t) for t in notes["text"].to_pylist()])) \
            .append_column("note_bucket", pa.array([note_bucket(i, buckets) for i in notes["note_id"].to_pylist()],
                                                   pa.int32())) \
            .append_column("passthrough_sha256", pa.nulls(n, pa.string())) \
            .append_column("attempt", pa.array([1] * n, pa.int32())) \
            .append_column("task", pa.array([task.name] * n, pa.string())) \
            .append_column("has_output", pa.array([False] * n)).append_column("in_ledger", pa.array([False] * n))
        batches = hashed.to_batches(max_chunksize=settings.spark.arrow_batch_size)
        partitions = settings.ray.num_actors * settings.ray.max_in_flight  # the job's Spark partitions
        with ThreadPoolExecutor(partitions) as threads:
            streams = threads.map(lambda p: [b for _, b in extract_batches(batches[p::partitions], ctx, lambda: pool,
                                                                             f"driver-p{p}")], range(partitions))
            outcomes = pa.Table.from_batches([b for stream in streams for b in stream], OUTCOME_SCHEMA)
        commit_round(warehouse, str(staging), outcomes.to_pylist(), hashed.select(list(passthrough)).schema)
        shutil.rmtree(staging, ignore_errors=True)
        wall = time.monotonic() - t0
    status = outcomes["status"].to_pylist()
    log.info("%s: %d notes in %.1f s", name, len(status), wall)
    return row(name, notes=len(status), wall_s=wall, tokens_in=sum(outcomes["tokens_in"].to_pylist()),
               tokens_out=sum(outcomes["tokens_out"].to_pylist()), usage=mem,
               succeeded=status.count("succeeded"), failed=status.count("failed"), skipped=0,
               first_token_s=first_token_s,
               batching={"batch_size": settings.ray.batch_size, "max_in_flight": settings.ray.max_in_flight,
                         "arrow_batch_size": settings.spark.arrow_batch_size})


def _start_engine_pool(settings, task) -> tuple:
    """Ray up, the engine actor loaded, one probe note: (pool, {ray_up_s, engine_load_s, first_token_s})."""
    from notelake.models.actor import EnginePool, ensure_ray

    fixed = {}
    t0 = time.monotonic()
    ensure_ray(settings.ray)
    fixed["ray_up_s"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    pool = EnginePool.get_or_create(settings).ready()
    fixed["engine_load_s"] = round(time.monotonic() - t0, 2)
    fixed["first_token_s"] = _probe_pool(pool, task)
    return pool, fixed


def _start_job_stack(settings, task, work: Path):
    """Spark, Ray and the engine pool, each timed (row 7's fixed costs), the first-token probe, then one job run
    on 4 other notes: it starts Spark's Python workers and their Ray connections, which every later run reuses."""
    from notelake.jobs.extraction.job import run
    from notelake.jobs.extraction.session import start_spark

    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        spark = start_spark(settings, app_name="notelake-bench")
        spark_up_s = round(time.monotonic() - t0, 2)
        pool, fixed = _start_engine_pool(settings, task)
        fixed = {"spark_up_s": spark_up_s, **fixed}
        warmup = write_note_table(synthetic_notes(4, seed=WARMUP_SEED), work / "notes-warmup")
        t0 = time.monotonic()
        run(settings, warmup, str(work / "wh-warmup"), spark=spark)
        fixed["first_job_run_4_notes_s"] = round(time.monotonic() - t0, 2)
    fixed["startup_peak_mem_gib"] = mem.peak_gib
    return spark, pool, fixed


def batching_label(settings) -> str:
    return (f"batch {settings.ray.batch_size}, {settings.ray.max_in_flight} in flight, "
            f"Arrow {settings.spark.arrow_batch_size}, {settings.ray.batches_ahead} ahead")


def row_job(args) -> dict:
    """Rows 2, 5, 6 and 7: bare vLLM on the job's engine paired with the job end to end right after it, the job
    with its batches sent one at a time, the incremental rerun, the job's executor path without Spark, scaling,
    and the fixed costs."""
    from notelake.conf.task import load_task

    work = Path(args.work)
    task = load_task(TASK)
    conf = bench_settings(args)
    one_at_a_time = bench_settings(args, **ONE_BATCH_AT_A_TIME)
    spark, pool, fixed = _start_job_stack(conf, task, work)
    notes = synthetic_notes(max([args.notes, *args.scaling]), args.seed)
    source = write_note_table(notes.slice(0, args.notes), work / f"notes-{args.notes}")
    rows = [timed_bare_on_job_engine("bare vLLM LLM.generate on the job's engine actor, guided (paired)", pool, task,
                                     notes.slice(0, args.notes)["text"].to_pylist(), args.max_tokens),
            timed_job(f"job end to end, conf batching ({batching_label(conf)})", conf, spark, source,
                      str(work / "wh-conf"), pool, task)]
    # The bench's failed notes are answers cut at --max-tokens; retried, they would turn the unchanged-corpus rerun
    # into a retry run. One attempt per note measures what the rerun row is for: selection over an unchanged corpus.
    rerun = bench_settings(args, job={"max_attempts": 1})
    rows.append(timed_job("job incremental rerun, unchanged corpus (failed notes not retried)", rerun, spark, source,
                          str(work / "wh-conf")))
    rows.append(timed_job(f"job end to end, one batch at a time ({batching_label(one_at_a_time)})", one_at_a_time,
                          spark, source, str(work / "wh-one-at-a-time"), pool, task))
    rows.append(timed_job_without_spark(f"job without Spark: extract_batches + load ({batching_label(conf)})", conf,
                                        notes.slice(0, args.notes), str(work / "wh-nospark"), pool, task))
    for n in args.scaling:
        scaled = write_note_table(notes.slice(0, n), work / f"notes-{n}")
        rows.append(timed_job(f"job scaling {n} notes, conf batching", conf, spark, scaled, str(work / f"wh-scale-{n}"),
                              pool, task, scaling_notes=n))
    pool.shutdown()
    spark.stop()
    return {"rows": rows, "fixed": {"job": fixed}}


def row_job_nospark(args) -> dict:
    """Row 2 where Spark is absent (the GPU box): Ray engine actors + the job's extract_batches + load, with the
    conf's batching and with one engine call per Arrow batch, plus Ray up / engine load / first token."""
    from notelake.conf.task import load_task

    work = Path(args.work)
    task = load_task(TASK)
    conf = bench_settings(args)
    # One engine call per Arrow batch: on a GPU conf whose batch_size is below max_num_seqs this shows what the
    # engine's one-call-at-a-time batching costs.
    one_call = bench_settings(args, ray={"batch_size": conf.spark.arrow_batch_size})
    pool, fixed = _start_engine_pool(conf, task)
    notes = synthetic_notes(args.notes, args.seed)
    rows = [timed_job_without_spark(f"job without Spark: extract_batches + load, {label} ({batching_label(settings)})",
                                    settings, notes, str(work / f"wh-nospark-{i}"), pool, task)
            for i, (label, settings) in enumerate((("conf batching", conf),
                                                   ("one engine call per Arrow batch", one_call)))]
    pool.shutdown()
    return {"rows": rows, "fixed": {"job without Spark": fixed}}


def row_multi_adapter(args) -> dict:
    """Several LoRA adapters in one batch (requests round-robin over ``--adapters``) vs one adapter, guided,
    through VLLMEngine.generate."""
    from notelake.conf.task import load_task
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.answer import answer_guide
    from notelake.udfs.prompts import build_messages

    settings = bench_settings(args, engine={"enable_lora": True, "max_loras": max(len(args.adapters), 1)})
    task = load_task(TASK)
    engine, _ = _load_vllm_engine(settings)
    texts = corpus_texts(args)
    probe = render_prompts(engine.tokenizer, task, [PROBE_TEXT])[0]
    rows = []
    for label, adapters in ((f"one adapter ({Path(args.adapters[0]).name})", args.adapters[:1]),
                            (f"{len(args.adapters)} adapters mixed", args.adapters)):
        requests = [GenerationRequest(f"{i}", build_messages(task, t), max_tokens=args.max_tokens,
                                      guide=answer_guide(task, t, settings.engine.guided_decoding),
                                      adapter=str(Path(adapters[i % len(adapters)]).resolve()))
                    for i, t in enumerate(texts)]
        first_token_s = probe_first_token(engine.llm, probe, settings.engine)
        with ProcessTreeUsage() as mem:
            t0 = time.monotonic()
            results = engine.generate(requests)
            wall = time.monotonic() - t0
        rows.append(row(f"VLLMEngine.generate, {label}, guided", notes=len(texts), wall_s=wall,
                        tokens_in=sum(r.prompt_tokens for r in results), tokens_out=sum(r.output_tokens for r in results),
                        usage=mem, first_token_s=first_token_s, errors=sum(1 for r in results if not r.ok)))
    return {"rows": rows}


def row_replay(args) -> dict:
    """Row 6 (data plane): the whole job with the REPLAY engine (made-up answers, simulated latency) on each corpus
    size of --scaling (on one Spark/Ray start), each followed by its rerun; two engine actors (a simulated 2-GPU
    node: two Spark partitions feeding two actors)."""
    from notelake.conf.task import load_task
    from notelake.jobs.warehouse import read_delta_arrow

    work = Path(args.work)
    task = load_task(TASK)
    settings = bench_settings(args, engine={"backend": "replay", "enable_lora": False, "max_num_seqs": 256},
                              job={"round_notes": args.round_notes}, ray={"num_actors": 2})
    spark, pool, fixed = _start_job_stack(settings, task, work)
    replay = pool.describe()
    rows = []
    for n in args.scaling:
        t0 = time.monotonic()
        source = write_note_table(synthetic_notes(n, args.seed), work / f"replay-notes-{n}")
        table_s = round(time.monotonic() - t0, 1)
        output = work / f"wh-replay-{n}"
        out = timed_job(f"job with REPLAY engine, {n} notes", settings, spark, source, str(output),
                        note_table_write_s=table_s, round_notes=args.round_notes,
                        replay={k: replay[k] for k in ("replay_decode_step_s", "replay_prefill_s_per_token")})
        concepts = read_delta_arrow(output / "concepts", columns=["grounded"])
        out["concept_rows"] = concepts.num_rows
        out["grounded_share"] = round(sum(concepts["grounded"].to_pylist()) / max(1, concepts.num_rows), 3)
        rows += [out, timed_job(f"job incremental rerun, unchanged corpus of {n} notes", settings, spark, source,
                                str(output))]
    pool.shutdown()
    spark.stop()
    return {"rows": rows, "fixed": {"job (replay engine)": fixed}}


def _replay_stack(args, work: Path, **job):
    """Spark, Ray and REPLAY engine actors (a simulated 2-GPU node) with the bench's settings."""
    from notelake.conf.task import load_task

    task = load_task(TASK)
    # a 4 GiB driver heap: Spark's local-mode default (1 GiB) runs out reading and caching 10^6 notes
    settings = bench_settings(args, engine={"backend": "replay", "enable_lora": False, "max_num_seqs": 256},
                              job={"round_notes": args.round_notes, **job}, ray={"num_actors": 2},
                              spark={"extra": {"spark.driver.memory": "4g"}})
    spark, pool, fixed = _start_job_stack(settings, task, work)
    return settings, spark, pool, fixed


def row_rounds(args) -> dict:
    """#13's write-path check (data plane): one full run per corpus size of --scaling in --round-notes rounds,
    with each round's seconds and commit seconds (the runs table's rounds_json) and the driver's peak RSS: flat
    rounds = a write path that does not grow with the tables."""
    work = Path(args.work)
    settings, spark, pool, fixed = _replay_stack(args, work)
    rows = []
    for n in args.scaling:
        source = write_note_table(synthetic_notes(n, args.seed), work / f"rounds-notes-{n}")
        output = work / f"wh-rounds-{n}"
        out = timed_job(f"job with REPLAY engine, {n} notes in rounds of {args.round_notes}", settings, spark,
                        source, str(output), round_notes=args.round_notes)
        rounds = json.loads(_runs_row(str(output))["rounds_json"])
        out["rounds"] = rounds
        out["driver_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        out["first_round_s"], out["last_round_s"] = rounds[0]["seconds"], rounds[-1]["seconds"]
        out["first_commit_s"], out["last_commit_s"] = rounds[0]["commit_s"], rounds[-1]["commit_s"]
        rows.append(out)
    pool.shutdown()
    spark.stop()
    return {"rows": rows, "fixed": {"job (replay engine)": fixed}}


def row_nightly(args) -> dict:
    """#13's nightly sequence on --scaling[0] notes (REPLAY engine, --propagate-deletes): night 1 full, night 2
    unchanged, night 3 with 1 % of the notes edited, 0.1 % deleted, 10 bad rows and one changed patient_id. Each
    night's exit code and the exact counts of its runs row."""
    from notelake.jobs.extraction.job import run

    work = Path(args.work)
    settings, spark, pool, fixed = _replay_stack(args, work, propagate_deletes=True)
    n = args.scaling[0]
    notes = synthetic_notes(n, args.seed).to_pylist()
    rng = random.Random(f"nightly:{args.seed}")
    source, output = work / f"nightly-notes-{n}", work / f"wh-nightly-{n}"
    edited = rng.sample(range(n), n // 100)
    deleted = set(rng.sample([i for i in range(n) if i not in set(edited)], n // 1000))
    third = [dict(r) for r in notes]
    for i in edited:
        third[i]["text"] += " The dose was reduced."
    moved = next(i for i in range(n) if i not in deleted and i not in set(edited))
    third[moved]["patient_id"] = "P-MERGED"
    third = [r for i, r in enumerate(third) if i not in deleted]
    third += [{**notes[0], "note_id": f"bad-{k}", "text": " " * k} for k in range(10)]
    nights = []
    for night, table in ((1, notes), (2, notes), (3, third)):
        write_note_table(pa.Table.from_pylist(table, schema=synthetic_notes(1, args.seed).schema), source)
        t0 = time.monotonic()
        code = run(settings, str(source), str(output), spark=spark)
        wall = round(time.monotonic() - t0, 1)
        r = _runs_row(str(output))
        nights.append({"night": night, "exit_code": code, "wall_s": wall, "tokens_out": r["tokens_out"],
                       **{k: r[k] for k in ("status", "selected", "succeeded", "failed", "skipped", "rejected",
                                           "deleted", "refreshed", "retried", "given_up", "stale_removed")}})
        log.info("night %d: exit %d in %.1f s: %s", night, code, wall, nights[-1])
    pool.shutdown()
    spark.stop()
    return {"rows": [{"row": f"nightly sequence, {n} notes (REPLAY)", "notes": n, "nights": nights,
                      "edited": len(edited), "deleted": len(deleted), "bad_rows": 10, "patient_id_changed": 1}],
            "fixed": {"job (replay engine)": fixed}}


def row_tasks(args) -> dict:
    """#15: one pass over two tasks (``--task phee,maccrobat``) against two separate runs on the same notes and
    adapter, each run a job process of its own as a scheduler starts it (Spark, Ray and the engine loaded per
    process): wall time, notes and tokens from the runs tables, engine loads counted in the job's log."""
    import subprocess

    import yaml

    from notelake.jobs.warehouse import read_delta_arrow

    work = Path(args.work)
    source = write_note_table(synthetic_notes(args.notes, args.seed), work / f"notes-tasks-{args.notes}")
    conf = work / "tasks-conf.yaml"
    conf.write_text(yaml.safe_dump(bench_settings(args, engine={"adapter": args.adapter}).model_dump(mode="json")))

    def job_process(tasks: str, output: Path) -> dict:
        cmd = [sys.executable, "-m", "notelake.jobs.extract", "--conf", str(conf), "--input", source, "--output",
               str(output), "--task", tasks]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.monotonic() - t0
        runs = read_delta_arrow(output / "runs").to_pylist() if (output / "runs").exists() else []
        log.info("job --task %s: exit %d in %.1f s", tasks, proc.returncode, wall)
        return {"wall_s": wall, "exit_code": proc.returncode, "engine_loads": proc.stderr.count("engine pool ready in"),
                **{k: sum(r[k] for r in runs) for k in ("selected", "succeeded", "failed", "tokens_in", "tokens_out")}}

    separate = [job_process(task, work / f"wh-tasks-{task}") for task in ("phee", "maccrobat")]
    one_pass = job_process("phee,maccrobat", work / "wh-tasks-one-pass")
    rows = []
    for name, parts in (("two tasks, two job runs (--task phee; --task maccrobat)", separate),
                        ("two tasks, one pass (--task phee,maccrobat)", [one_pass])):
        total = {k: sum(p[k] for p in parts) for k in parts[0]}
        rows.append(row(name, notes=total["succeeded"] + total["failed"], wall_s=total["wall_s"],
                        tokens_in=total["tokens_in"], tokens_out=total["tokens_out"], usage=None,
                        engine_loads=total["engine_loads"], exit_codes=[p["exit_code"] for p in parts],
                        process_walls_s=[round(p["wall_s"], 1) for p in parts]))
    return {"rows": rows}


def row_tagger(args) -> dict:
    """#14: the classification-head tagger (``--adapter`` = its folder) on the same synthetic notes as the vLLM
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


# ============================================================================================== ray.data.llm
def row_ray_data_llm(args) -> dict:
    """Row 3: ray.data.llm's vLLM engine processor on the same prompts and sampling; answers parsed, grounded
    and written to a Delta ``concepts`` table like the job's. On failure the row records the error.

    Each processor run starts its own engine, so it runs twice: on the probe note alone (engine load + dataset
    overhead + 1 note, warming the compile caches), then on the corpus. The corpus run is the cold, one-shot
    figure. Its steady-state figure is the engine time of the corpus run: every prompt is in one batch
    (``batch_size`` >= the corpus), submitted at once, so the longest per-request latency (``time_taken_llm``)
    spans the engine's work. (The difference of the two runs' walls, used before, mostly measured how much faster
    the second engine loaded: 1.9-2.9 s for 32 x 64 tokens, 5x bare vLLM's decode rate.)"""
    import ray
    from transformers import AutoTokenizer

    from notelake.conf.task import load_task
    from notelake.models.actor import ensure_ray
    from notelake.models.base_model import resolve_model
    from notelake.udfs.answer import answer_guide

    settings = bench_settings(args)
    cfg = settings.engine
    task = load_task(TASK)
    model_path = str(resolve_model(cfg.model))
    texts = corpus_texts(args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = render_prompts(tokenizer, task, texts)
    probe = render_prompts(tokenizer, task, [PROBE_TEXT])
    name = "ray.data.llm vLLMEngineProcessor, guided"
    t0 = time.monotonic()
    ensure_ray(settings.ray)
    fixed = {"ray_up_s": round(time.monotonic() - t0, 2)}

    def generate(token_ids: list[list[int]], prompt_texts: list[str]) -> list[dict]:
        processor = _build_ray_data_processor(settings, model_path, args.max_tokens)
        ds = ray.data.from_items([{"note_index": i, "tokenized_prompt": p,
                                   "guide": answer_guide(task, t, cfg.guided_decoding)}
                                  for i, (p, t) in enumerate(zip(token_ids, prompt_texts))])
        return processor(ds).select_columns(["note_index", "generated_text", "num_generated_tokens",
                                             "num_input_tokens", "time_taken_llm"]).take_all()

    try:
        t0 = time.monotonic()
        generate(probe, [PROBE_TEXT])
        fixed["engine_load_and_1_note_s"] = round(time.monotonic() - t0, 2)
        with ProcessTreeUsage() as mem:
            t0 = time.monotonic()
            outputs = generate(prompts, texts)
            concept_rows = _write_concepts(task, texts, outputs, Path(args.work) / "wh-ray-data-llm")
            wall = time.monotonic() - t0
    except Exception as exc:  # noqa: BLE001 - the row reports why it cannot run here
        message = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {(message[0] if message else '')[:300]}"
        log.error("%s failed: %s", name, error)
        return {"rows": [{"row": name, "notes": len(texts), "error": error}], "fixed": {"ray.data.llm": fixed}}
    finally:
        ray.shutdown()
    tokens_in = sum(o["num_input_tokens"] for o in outputs)
    tokens_out = sum(o["num_generated_tokens"] for o in outputs)
    cold = row(f"{name}, cold (incl. its engine load)", notes=len(outputs), wall_s=wall, tokens_in=tokens_in,
               tokens_out=tokens_out, usage=mem, concept_rows=concept_rows)
    warm = row(f"{name}, steady state (engine time: longest request of the one batch)", notes=len(outputs),
               wall_s=max(o["time_taken_llm"] for o in outputs), tokens_in=tokens_in, tokens_out=tokens_out,
               usage=mem, concept_rows=concept_rows)
    return {"rows": [warm, cold], "fixed": {"ray.data.llm": fixed}}


def _build_ray_data_processor(settings, model_path: str, max_tokens: int):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    cfg = settings.engine
    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs={"dtype": cfg.dtype, "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs,
                       "gpu_memory_utilization": cfg.gpu_memory_utilization, "enforce_eager": cfg.enforce_eager,
                       "enable_prefix_caching": True, "seed": cfg.seed,
                       "structured_outputs_config": {"backend": "xgrammar"}},
        batch_size=settings.ray.batch_size, concurrency=1,
        # A CPU bundle instead of the default GPU one, so the engine stage can be scheduled on a CPU-only node.
        placement_group_config={"bundles": [{"CPU": 1}]},
        # Prompts come tokenized (the same ids as every other row); vLLM detokenizes itself. A separate
        # detokenize actor would hold the second of the 2 Ray CPUs and starve the preprocess task (measured: the
        # dataset never starts).
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        # The default (True) exports engine metrics through ray.serve, which ray[default] lacks: the engine
        # actor then dies in its constructor (ImportError "RayPrometheusMetric requires Ray to be installed").
        log_engine_metrics=False,
    )
    return build_processor(
        config,
        preprocess=lambda r: {**r, "sampling_params": {
            "temperature": cfg.temperature, "seed": cfg.seed, "max_tokens": max_tokens,
            "structured_outputs": r["guide"]}},
        postprocess=lambda r: r,
    )


def _write_concepts(task, texts: list[str], outputs: list[dict], warehouse: Path) -> int:
    """Parse and ground the answers with the job's udfs and write them as a Delta ``concepts`` table."""
    from datetime import datetime, timezone

    from deltalake import write_deltalake

    from notelake.udfs import schemas
    from notelake.udfs.assemble import assemble_note
    from notelake.udfs.chunking import chunk_text

    lineage = {"run_id": "bench-ray-data-llm", "model": task.name, "adapter": None, "adapter_sha256": None,
               "prompt_version": "", "fingerprint": "", "extracted_at": datetime.now(timezone.utc)}
    rows = []
    for out in sorted(outputs, key=lambda o: o["note_index"]):
        text = texts[out["note_index"]]
        chunks = chunk_text(text, task.max_chunk_chars)  # one chunk: bench notes are single sentences
        result = assemble_note(note_id=str(out["note_index"]), text=text, task=task, chunks=chunks,
                               outputs=[out["generated_text"]], output_errors=[None], lineage=lineage, passthrough={})
        rows += result.concepts
    write_deltalake(str(warehouse / "concepts"), schemas.rows_to_table(rows, schemas.concepts_schema()),
                    mode="overwrite")
    return len(rows)


# ============================================================================================== main
ROWS = {"bare": row_bare, "bare-all-cores": row_bare_all_cores, "bare-default": row_bare_default, "job": row_job, "job-nospark": row_job_nospark,
        "ray-data-llm": row_ray_data_llm, "lora": row_lora, "base-no-lora": row_base_no_lora, "lora-merged": row_lora_merged, "multi-adapter": row_multi_adapter, "replay": row_replay,
        "rounds": row_rounds, "nightly": row_nightly, "tasks": row_tasks,
        "tagger": row_tagger}


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
