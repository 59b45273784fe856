"""Extract a pass's selection round by round: each round's notes go through the executors (:mod:`.stage`) and
its rows are committed (:mod:`.commit`) before the next round starts, so a failure or a ``--max-runtime`` stop
loses at most one round's work and a round's commits touch only its buckets' files."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pyarrow as pa

from notelake.jobs import storage
from notelake.jobs.extraction.commit import commit_round
from notelake.jobs.extraction.faults import LEDGER_OUTCOMES
from notelake.jobs.extraction.plan import Pass, TaskPlan
from notelake.jobs.extraction.report import Progress, engine_brake
from notelake.jobs.extraction.session import restore_ray_level
from notelake.jobs.extraction.stage import StageContext, transform
from notelake.jobs.extraction import staging

log = logging.getLogger("notelake.extract")


def stage_rounds(selected, n_selected: int, p: Pass, ctx: StageContext) -> list[str]:
    """Write the selection to the pass's staging folder partitioned by round, once: each round then reads its own
    partition instead of rescanning the selection. Returns the rounds' folders in order."""
    return staging.stage_rounds(selected, n_selected, storage.join(ctx.staging_dir, "selected"),
                                p.settings.job.round_notes, p.buckets, ctx.storage_options, p.settings.job.umask)


def extract_rounds(p: Pass, ctx: StageContext, selected, plans: list[TaskPlan]) -> bool:
    """Extract and commit ``selected`` (the notes of every task in ``plans``, a ``task`` column each) round by
    round; False when it stopped early (``job.max_runtime_s``, or the engines failing more than
    ``job.max_engine_error_rate`` of the notes). A round holds the notes of every task: their prompts share the
    engines, their rows are committed task by task. With ``ray.engine_scope: pass`` the engine actors are this
    pass's own (named after it) and stopped when it ends."""
    from notelake.models.actor import EnginePool, ensure_ray

    settings = p.settings
    limit_s = settings.job.max_runtime_s
    # --max-runtime: executors submit no new batch after the deadline and stop waiting for the engines at it
    deadline = time.time() + limit_s if limit_s is not None else None
    owner = p.pass_id if settings.ray.engine_scope == "pass" else None
    gcs_address = ensure_ray(settings.ray)
    restore_ray_level()
    pool = EnginePool.get_or_create(settings, owner, detached=owner is None)
    try:
        pool.ready(progress_s=settings.job.progress_interval_s)
        ctx = dataclasses.replace(ctx, gcs_address=gcs_address, deadline=deadline, engine_owner=owner,
                                  engine_actor_ids=pool.actor_ids())
        return run_rounds(p, ctx, selected, plans, pool)
    finally:
        if owner is not None:  # this pass's own actors: their engines' memory goes back to the cluster now
            pool.shutdown()


def run_rounds(p: Pass, ctx: StageContext, selected, plans: list[TaskPlan], pool) -> bool:
    """The rounds of :func:`extract_rounds` on a ready engine ``pool``, with progress lines."""
    from pyspark.sql.pandas.types import to_arrow_type

    settings, t0 = p.settings, time.monotonic()
    passthrough_schema = pa.schema([(c, to_arrow_type(selected.schema[c].dataType)) for c in ctx.passthrough])
    n_selected = sum(plan.selected for plan in plans)
    rounds = stage_rounds(selected, n_selected, p, ctx)
    done = 0
    with Progress(pool, settings.job.progress_interval_s, n_selected, sum(plan.prompts for plan in plans),
                  [plan.counts for plan in plans]):
        for k, notes_dir in enumerate(rounds):
            if ctx.deadline is not None and time.time() > ctx.deadline:
                log.warning("job.max_runtime_s %.0f reached after %d/%d rounds: %d notes left for the next run",
                            settings.job.max_runtime_s, k, len(rounds), n_selected - done)
                return False
            extracted = extract_round(p, ctx, notes_dir, k, passthrough_schema, plans)
            if extracted is None:
                log.error("round %d/%d cancelled %.0f s after job.max_runtime_s (job.stop_grace_s): nothing of it "
                          "committed, its notes wait for the next run", k + 1, len(rounds), settings.job.stop_grace_s)
                return False
            done += extracted
            elapsed = time.monotonic() - t0
            rate = done / elapsed if elapsed else 0.0
            eta = (n_selected - done) / rate if rate else float("nan")
            log.info("round %d/%d: %d/%d notes, %.2f notes/s, %.1f output tok/s, %d failed, %d engine errors, "
                     "commit %.1fs, ETA %.0fs", k + 1, len(rounds), done, n_selected, rate,
                     sum(plan.counts.tokens_out for plan in plans) / max(elapsed, 1e-9),
                     sum(plan.counts.failed for plan in plans), sum(plan.counts.engine_errors for plan in plans),
                     plans[0].counts.rounds[-1]["commit_s"], eta)
            if engine_brake(plans, settings.job) and k + 1 < len(rounds):
                log.error("the engines failed %d notes (job.max_engine_error_rate %.3f): no further round",
                          sum(plan.counts.engine_errors for plan in plans), settings.job.max_engine_error_rate)
                return False
    return done == n_selected


def extract_round(p: Pass, ctx: StageContext, notes_dir: str, round_index: int, passthrough_schema: pa.Schema,
                  plans: list[TaskPlan]) -> int | None:
    """Extract the round staged in ``notes_dir`` and commit it; returns the notes it extracted (fewer after the
    deadline), None when the hard wall-clock limit cancelled it (nothing committed). Each task's counts gain the
    round's outcomes and figures."""
    t_round = time.monotonic()
    staging = storage.join(ctx.staging_dir, f"round-{round_index:05d}")
    notes = storage.read_parquet(p.spark, notes_dir, ctx.storage_options)
    frame = transform(notes, dataclasses.replace(ctx, staging_dir=staging),
                      p.settings.ray.num_actors * p.settings.ray.max_in_flight)
    hard_limit = None if ctx.deadline is None else ctx.deadline + p.settings.job.stop_grace_s
    rows = collect_until(p.spark, frame, hard_limit, f"notelake-{p.pass_id}-round-{round_index}")
    if rows is None:
        storage.delete_tree(staging, ctx.storage_options)
        for plan in plans:
            plan.counts.rounds.append({"round": len(plan.counts.rounds) + 1, "notes": 0, "cancelled": True,
                                       "seconds": round(time.monotonic() - t_round, 2), "commit_s": 0.0})
        return None
    outcomes = [r.asDict() for r in rows]
    t_commit = time.monotonic()
    commit_round(p.warehouse, staging, outcomes, passthrough_schema, ctx.storage_options)
    commit_s = time.monotonic() - t_commit
    storage.delete_tree(staging, ctx.storage_options)
    seconds = round(time.monotonic() - t_round, 2)
    for plan in plans:
        mine = [r for r in outcomes if r["task"] == plan.name]
        plan.counts.add(mine)
        plan.counts.rounds.append({"round": len(plan.counts.rounds) + 1, "notes": len(mine), "seconds": seconds,
                                   "commit_s": round(commit_s, 2)})
    return sum(1 for r in outcomes if r["status"] in LEDGER_OUTCOMES)


def collect_until(spark, frame, hard_limit: float | None, tag: str) -> list | None:
    """``frame.collect()``; None when it was still running at ``hard_limit`` (epoch seconds) and was cancelled."""
    if hard_limit is None:
        return frame.collect()
    sc = spark.sparkContext
    cancelled = threading.Event()

    def cancel() -> None:
        cancelled.set()
        sc.cancelJobsWithTag(tag)

    sc.addJobTag(tag)
    sc.setInterruptOnCancel(True)
    timer = threading.Timer(max(0.0, hard_limit - time.time()), cancel)
    timer.daemon = True
    timer.start()
    try:
        return frame.collect()
    except Exception:
        if cancelled.is_set():
            return None
        raise
    finally:
        timer.cancel()
        sc.removeJobTag(tag)
        sc.setInterruptOnCancel(False)
