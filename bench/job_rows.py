"""Benchmark rows that time the job (``jobs.extraction.job.run``) on a warm Spark, Ray and engine pool: the job end to
end paired with bare vLLM on its own engine (row 2), its batches one at a time, without Spark, the incremental
rerun (row 5), corpus scaling (row 6), the fixed costs (row 7), and two tasks in one pass against two runs."""

from __future__ import annotations

import cProfile
import logging
import pstats
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.corpus import PROBE_TEXT, synthetic_notes, write_note_table
from bench.measure import ProcessTreeUsage, row
from bench.workload import REPO, TASK, WARMUP_SEED, bench_settings

log = logging.getLogger("bench")

#: the conf's batching without batches sent ahead: one engine call in flight per Spark partition
ONE_BATCH_AT_A_TIME = {"ray": {"batches_ahead": 0}}


@dataclass
class JobStack:
    """Spark (None where a row runs without it), Ray and the engine pool, started once per row process, the task
    they serve, and their start-up costs (row 7)."""

    spark: Any
    pool: Any
    task: Any
    fixed: dict

    def shutdown(self) -> None:
        self.pool.shutdown()
        if self.spark is not None:
            self.spark.stop()


def runs_row(output: str) -> dict:
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


def _first_token(stack: JobStack) -> float:
    """The pool's first-token probe after emptying its prefix cache: every timed pass starts from the same cache."""
    _reset_actor_prefix_cache(stack.pool)
    return _probe_pool(stack.pool, stack.task)


def timed_bare_on_job_engine(name: str, stack: JobStack, texts: list[str], max_tokens: int) -> dict:
    """Bare vLLM ``LLM.generate`` on the job's own engine, run and timed inside its actor process: the same engine
    instance, args and sampling as the job run timed right after it. Rows measured minutes apart in separate
    processes drift apart (docs/benchmarks.md); a pair on one engine keeps that drift out of the job / bare
    ratio."""
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

    first_token_s = _first_token(stack)
    with ProcessTreeUsage() as mem:
        got = ray.get(stack.pool.actors[0].__ray_call__.remote(bare_pass, stack.task.model_dump(mode="json"), texts,
                                                               max_tokens))
    log.info("%s: %d prompts, %d output tokens in %.1f s", name, len(texts), got["tokens_out"], got["wall_s"])
    return row(name, notes=len(texts), wall_s=got["wall_s"], tokens_in=got["tokens_in"], tokens_out=got["tokens_out"],
               usage=mem, first_token_s=first_token_s)


def batching(settings) -> dict:
    return {"batch_size": settings.ray.batch_size, "max_in_flight": settings.ray.max_in_flight,
            "arrow_batch_size": settings.spark.arrow_batch_size}


def timed_job(name: str, stack: JobStack, settings, source: str, output: str, *, probe: bool = True,
              **extra) -> dict:
    """One ``jobs.extraction.job.run`` on the stack's warm Spark, Ray and engine, after a first-token probe when
    ``probe``; counts and tokens from its ``runs`` row, ``extra`` joins the row."""
    from notelake.jobs.extraction.job import run

    first_token_s = _first_token(stack) if probe else None  # same cache state as the bare passes: shared prefix only
    stack.spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(settings.spark.arrow_batch_size))
    profiler = cProfile.Profile()  # the driver's side of the run: where its wall time goes, stage by stage
    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        profiler.enable()
        code = run(settings, source, output, spark=stack.spark)
        profiler.disable()
        wall = time.monotonic() - t0
    runs = runs_row(output)
    log.info("%s: exit %d, %d selected, %d succeeded in %.1f s", name, code, runs["selected"], runs["succeeded"], wall)
    return row(name, notes=runs["selected"], wall_s=wall, tokens_in=runs["tokens_in"], tokens_out=runs["tokens_out"],
               usage=mem, exit_code=code, succeeded=runs["succeeded"], failed=runs["failed"],
               skipped=runs["skipped"], first_token_s=first_token_s, batching=batching(settings),
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


def timed_job_without_spark(name: str, stack: JobStack, settings, notes, output: str) -> dict:
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

    first_token_s = _first_token(stack)
    task, pool = stack.task, stack.pool
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
               first_token_s=first_token_s, batching=batching(settings))


def start_engine_pool(settings, task) -> JobStack:
    """Ray up, the engine actor loaded, one probe note, no Spark: the stack with ray_up_s, engine_load_s and
    first_token_s."""
    from notelake.models.actor import EnginePool, ensure_ray

    fixed = {}
    t0 = time.monotonic()
    ensure_ray(settings.ray)
    fixed["ray_up_s"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    pool = EnginePool.get_or_create(settings).ready()
    fixed["engine_load_s"] = round(time.monotonic() - t0, 2)
    fixed["first_token_s"] = _probe_pool(pool, task)
    return JobStack(None, pool, task, fixed)


def start_job_stack(settings, task, work: Path) -> JobStack:
    """Spark, Ray and the engine pool, each timed (row 7's fixed costs), the first-token probe, then one job run
    on 4 other notes: it starts Spark's Python workers and their Ray connections, which every later run reuses."""
    from notelake.jobs.extraction.job import run, start_spark

    with ProcessTreeUsage() as mem:
        t0 = time.monotonic()
        spark = start_spark(settings, app_name="notelake-bench")
        spark_up_s = round(time.monotonic() - t0, 2)
        stack = start_engine_pool(settings, task)
        stack.spark = spark
        stack.fixed = {"spark_up_s": spark_up_s, **stack.fixed}
        warmup = write_note_table(synthetic_notes(4, seed=WARMUP_SEED), work / "notes-warmup")
        t0 = time.monotonic()
        run(settings, warmup, str(work / "wh-warmup"), spark=spark)
        stack.fixed["first_job_run_4_notes_s"] = round(time.monotonic() - t0, 2)
    stack.fixed["startup_peak_mem_gib"] = mem.peak_gib
    return stack


def batching_label(settings) -> str:
    return (f"batch {settings.ray.batch_size}, {settings.ray.max_in_flight} in flight, "
            f"Arrow {settings.spark.arrow_batch_size}, {settings.ray.batches_ahead} ahead")


def row_job(args) -> dict:
    """Rows 2, 5, 6 and 7: bare vLLM on the job's engine paired with the job end to end right after it, the job
    with its batches sent one at a time, the incremental rerun, the job's executor path without Spark, scaling,
    and the fixed costs."""
    from notelake.conf.task import load_task

    work = Path(args.work)
    conf = bench_settings(args)
    one_at_a_time = bench_settings(args, **ONE_BATCH_AT_A_TIME)
    stack = start_job_stack(conf, load_task(TASK), work)
    notes = synthetic_notes(max([args.notes, *args.scaling]), args.seed)
    source = write_note_table(notes.slice(0, args.notes), work / f"notes-{args.notes}")
    rows = [timed_bare_on_job_engine("bare vLLM LLM.generate on the job's engine actor, guided (paired)", stack,
                                     notes.slice(0, args.notes)["text"].to_pylist(), args.max_tokens),
            timed_job(f"job end to end, conf batching ({batching_label(conf)})", stack, conf, source,
                      str(work / "wh-conf"))]
    # The bench's failed notes are answers cut at --max-tokens; retried, they would turn the unchanged-corpus rerun
    # into a retry run. One attempt per note measures what the rerun row is for: selection over an unchanged corpus.
    rerun = bench_settings(args, job={"max_attempts": 1})
    rows.append(timed_job("job incremental rerun, unchanged corpus (failed notes not retried)", stack, rerun, source,
                          str(work / "wh-conf"), probe=False))
    rows.append(timed_job(f"job end to end, one batch at a time ({batching_label(one_at_a_time)})", stack,
                          one_at_a_time, source, str(work / "wh-one-at-a-time")))
    rows.append(timed_job_without_spark(f"job without Spark: extract_batches + load ({batching_label(conf)})", stack,
                                        conf, notes.slice(0, args.notes), str(work / "wh-nospark")))
    for n in args.scaling:
        scaled = write_note_table(notes.slice(0, n), work / f"notes-{n}")
        rows.append(timed_job(f"job scaling {n} notes, conf batching", stack, conf, scaled, str(work / f"wh-scale-{n}"),
                              scaling_notes=n))
    stack.shutdown()
    return {"rows": rows, "fixed": {"job": stack.fixed}}


def row_job_nospark(args) -> dict:
    """Row 2 where Spark is absent (the GPU box): Ray engine actors + the job's extract_batches + load, with the
    conf's batching and with one engine call per Arrow batch, plus Ray up / engine load / first token."""
    from notelake.conf.task import load_task

    work = Path(args.work)
    conf = bench_settings(args)
    # One engine call per Arrow batch: on a GPU conf whose batch_size is below max_num_seqs this shows what the
    # engine's one-call-at-a-time batching costs.
    one_call = bench_settings(args, ray={"batch_size": conf.spark.arrow_batch_size})
    stack = start_engine_pool(conf, load_task(TASK))
    notes = synthetic_notes(args.notes, args.seed)
    rows = [timed_job_without_spark(f"job without Spark: extract_batches + load, {label} ({batching_label(settings)})",
                                    stack, settings, notes, str(work / f"wh-nospark-{i}"))
            for i, (label, settings) in enumerate((("conf batching", conf),
                                                   ("one engine call per Arrow batch", one_call)))]
    stack.shutdown()
    return {"rows": rows, "fixed": {"job without Spark": stack.fixed}}


def row_tasks(args) -> dict:
    """One pass over two tasks (``--task phee,maccrobat``) against two separate runs on the same notes and
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
