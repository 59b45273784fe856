"""Row 3: ray.data.llm's vLLM engine processor on the same prompts and sampling as the job; answers parsed,
grounded and written to a Delta ``concepts`` table like the job's."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from bench.corpus import PROBE_TEXT, render_prompts
from bench.measure import ProcessTreeUsage, row
from bench.workload import bench_settings, workload

log = logging.getLogger("bench")
NAME = "ray.data.llm vLLMEngineProcessor, guided"


def row_ray_data_llm(args) -> dict:
    """Row 3. On failure the row records the error.

    Each processor run starts its own engine, so it runs twice: on the probe note alone (engine load + dataset
    overhead + 1 note, warming the compile caches), then on the corpus. The corpus run is the cold, one-shot
    figure. Its steady-state figure is the engine time of the corpus run: every prompt is in one batch
    (``batch_size`` >= the corpus), submitted at once, so the longest per-request latency (``time_taken_llm``)
    spans the engine's work."""
    import ray
    from transformers import AutoTokenizer

    from notelake.models.actor import ensure_ray
    from notelake.models.base_model import resolve_model

    settings = bench_settings(args)
    work = workload(args)
    model_path = str(resolve_model(settings.engine.model))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = render_prompts(tokenizer, work.task, work.texts)
    probe = render_prompts(tokenizer, work.task, [PROBE_TEXT])
    t0 = time.monotonic()
    ensure_ray(settings.ray)
    fixed = {"ray_up_s": round(time.monotonic() - t0, 2)}
    try:
        t0 = time.monotonic()
        _generate(settings, model_path, work.task, probe, [PROBE_TEXT], args.max_tokens)
        fixed["engine_load_and_1_note_s"] = round(time.monotonic() - t0, 2)
        with ProcessTreeUsage() as mem:
            t0 = time.monotonic()
            outputs = _generate(settings, model_path, work.task, prompts, work.texts, args.max_tokens)
            concept_rows = _write_concepts(work.task, work.texts, outputs, Path(args.work) / "wh-ray-data-llm")
            wall = time.monotonic() - t0
    except Exception as exc:  # noqa: BLE001 - the row reports why it cannot run here
        message = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {(message[0] if message else '')[:300]}"
        log.error("%s failed: %s", NAME, error)
        return {"rows": [{"row": NAME, "notes": len(work.texts), "error": error}], "fixed": {"ray.data.llm": fixed}}
    finally:
        ray.shutdown()
    tokens_in = sum(o["num_input_tokens"] for o in outputs)
    tokens_out = sum(o["num_generated_tokens"] for o in outputs)
    cold = row(f"{NAME}, cold (incl. its engine load)", notes=len(outputs), wall_s=wall, tokens_in=tokens_in,
               tokens_out=tokens_out, usage=mem, concept_rows=concept_rows)
    warm = row(f"{NAME}, steady state (engine time: longest request of the one batch)", notes=len(outputs),
               wall_s=max(o["time_taken_llm"] for o in outputs), tokens_in=tokens_in, tokens_out=tokens_out,
               usage=mem, concept_rows=concept_rows)
    return {"rows": [warm, cold], "fixed": {"ray.data.llm": fixed}}


def _generate(settings, model_path: str, task, token_ids: list[list[int]], prompt_texts: list[str],
              max_tokens: int) -> list[dict]:
    """One processor run (its own engine) over the prompts, guided by the job's answer grammar: the outputs."""
    import ray

    from notelake.udfs.answer import answer_guide

    processor = _build_ray_data_processor(settings, model_path, max_tokens)
    ds = ray.data.from_items([{"note_index": i, "tokenized_prompt": p,
                               "guide": answer_guide(task, t, settings.engine.guided_decoding)}
                              for i, (p, t) in enumerate(zip(token_ids, prompt_texts))])
    return processor(ds).select_columns(["note_index", "generated_text", "num_generated_tokens",
                                         "num_input_tokens", "time_taken_llm"]).take_all()


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
        # detokenize actor would hold the second of the 2 Ray CPUs and starve the preprocess task (the dataset
        # then never starts).
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
