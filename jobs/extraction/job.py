"""One pass of the extraction job, stage by stage: read the input once, plan every task against its ledger,
commit what needs no model, extract the selection in rounds, and record each task's run."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import uuid
from functools import reduce
from pathlib import Path

from notelake.conf import Settings
from notelake.conf.task import load_task
from notelake.jobs import storage
from notelake.jobs.extraction.commit import commit_planned_changes
from notelake.jobs.extraction.given_up import GivenUpSelection, reset_given_up
from notelake.jobs.extraction.identity import ExtractionIdentity, describe_extraction, job_engine_settings
from notelake.jobs.extraction.plan import (Pass, PassOptions, TaskPlan, input_window, plan_task, select_notes,
                                           start_plan)
from notelake.jobs.extraction.publish import link_and_publish
from notelake.jobs.extraction.read import read_input, read_note_ids
from notelake.jobs.extraction.report import (ExitCode, RunRecord, dry_run_report, end_runs, log_plan,
                                             write_records)
from notelake.jobs.extraction.rounds import extract_rounds
from notelake.jobs.extraction.session import start_spark
from notelake.jobs.extraction.stage import StageContext
from notelake.udfs.schemas import utc_now

log = logging.getLogger("notelake.extract")


def run(settings: Settings, source: str, output: str, *, limit: int | None = None, full_refresh: bool = False,
        dry_run: bool = False, retry_given_up: GivenUpSelection | None = None,
        spark=None) -> int:  # the CLI's flags by name; spark: a session to reuse
    """Run the job once on ``source`` into ``output``; returns the exit code (:class:`ExitCode`). Raises
    InputError, ConfigError, LockedError (LeaseLostError: the run lost its lease and stopped before its next
    commit), OutputWriteError and the engine's and adapters' errors.

    Every run that writes holds the output's lock for its whole length (:func:`notelake.jobs.guards.output_lock`:
    a flock on a local output, a heartbeat lease on an object store), taken before Spark starts; another run
    waits ``job.lock_timeout_s`` for it, then raises LockedError. A dry run writes nothing and takes no lock."""
    from notelake.jobs.guards import output_lock, resolve_output, restrictive_umask

    settings = job_engine_settings(settings)
    out = resolve_output(output, settings.job.output_root)
    if settings.job.log_phi:
        log.warning("job.log_phi is on: failure tracebacks may quote note text; use for debugging only")
    options = PassOptions(limit, full_refresh, dry_run, retry_given_up)
    with restrictive_umask(settings.job.umask):
        if dry_run:
            return run_pass(settings, source, out, options, spark)
        with output_lock(out, new_pass_id(), settings.job.lock_timeout_s, storage.settings_options(settings),
                         ttl_s=settings.job.lease_ttl_s) as lock:
            return run_pass(settings, source, out, options, spark, lock)


def new_pass_id() -> str:
    """A pass's id: its start time (sortable) and a random suffix."""
    return f"{utc_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def run_pass(settings: Settings, source: str, output: str, options: PassOptions, spark=None, lock=None) -> int:
    """One pass holding ``lock`` (the output lock, whose holder is the pass id; None for a dry run): plan every
    task on one read of the input, then print the dry-run report or extract and commit. Returns the exit code."""
    from notelake.jobs.warehouse import read_snapshot_spark

    tasks = [load_task(name) for name in settings.job.tasks]
    identities = {task.name: describe_extraction(settings, task) for task in tasks}  # before Spark: fail fast
    p = open_pass(settings, output, options, spark, identities, lock)
    if options.retry_given_up is not None:  # before the ledger is read: the reset notes are planned as retries
        reset_given_up(p.warehouse, list(identities), settings.job.max_attempts, options.retry_given_up,
                       dry_run=options.dry_run)
    plans = [start_plan(p, task, identities[task.name], p.pass_id if len(tasks) == 1 else f"{p.pass_id}-{task.name}")
             for task in tasks]
    checked = read_input(p.spark, settings, source, input_window(plans, settings.job.max_attempts))
    checked.rows.persist()
    errors = read_snapshot_spark(p.spark, p.warehouse.path("errors"), p.warehouse.storage_options)
    present = read_note_ids(p.spark, settings, source, checked.version).persist() \
        if settings.job.propagate_deletes else None
    for plan in plans:
        plan_task(plan, checked, errors, present, p)
        log_plan(plan, settings.job.max_attempts, settings.job.propagate_deletes)
    persisted = [checked.rows, *(plan.planned for plan in plans), *(plan.rejected for plan in plans)]
    if present is not None:
        persisted.append(present)
    try:
        if options.dry_run:
            for plan in plans:
                print(json.dumps(dry_run_report(plan, settings.engine.max_tokens)))
            return ExitCode.OK
        ctx = StageContext(settings=settings, tasks={plan.name: plan.task for plan in plans},
                           lineages={plan.name: plan.lineage for plan in plans},
                           heads={plan.name: plan.identity.extractors.heads() for plan in plans
                                  if plan.identity.extractors.uses_heads},
                           staging_dir=storage.join(p.staging_root, p.pass_id), passthrough=checked.passthrough,
                           storage_options=p.warehouse.storage_options)
        return extract_and_commit(p, ctx, plans, checked.valid)
    finally:
        for frame in persisted:
            frame.unpersist()


def open_pass(settings: Settings, output: str, options: PassOptions, spark,
              identities: dict[str, ExtractionIdentity], lock=None) -> Pass:
    """Start the pass: Spark, the output's warehouse (its commits tagged with the pass and fenced by ``lock``),
    its note buckets, its staging root (this output's own, also under a shared ``storage.staging``), and, holding
    ``lock`` (not a dry run), the clean-up after the runs that died on this output: every other run on it has
    ended or lost its lock, so whatever it left staged or ``running`` is a dead run's."""
    from notelake.jobs.warehouse import open_warehouse

    pass_id = lock.holder if lock is not None else new_pass_id()
    started, commit_sha = utc_now(), git_sha()
    spark = spark or start_spark(settings)
    first = next(iter(identities.values()))
    warehouse = open_warehouse(output, {
        "notelake.run_id": pass_id, "notelake.git_sha": commit_sha or "", "notelake.model": first.model,
        "notelake.adapter": first.adapter or "",
        "notelake.prompt_version": ",".join(identity.prompt_version for identity in identities.values()),
    }, storage.settings_options(settings), fence=None if lock is None else lock.check)
    p = Pass(pass_id=pass_id, settings=settings, options=options, spark=spark, warehouse=warehouse,
             buckets=warehouse.note_buckets(settings.job.note_buckets, create=not options.dry_run),
             staging_root=warehouse.staging_root(settings.storage.staging), started=started, git_sha=commit_sha)
    if lock is not None:
        if lock.taken_over is not None:
            log.warning("run %s held the lease on this output and let it expire (died or stalled): recovering it",
                        lock.taken_over.holder)
        abandoned, repaired = warehouse.recover(p.staging_root)
        if abandoned:
            log.warning("marked %d run(s) left running by a dead process as abandoned: %s", len(abandoned),
                        ", ".join(abandoned))
        if repaired:
            log.warning("removed the uncommitted rows of %d note(s) from the round an earlier run died in "
                        "(extracted again now)", repaired)
    return p


def extract_and_commit(p: Pass, ctx: StageContext, plans: list[TaskPlan], valid) -> int:
    """Record the runs, commit rejections, deletes and refreshes, extract every task's selection in shared rounds
    (its text joined back from ``valid``), link and publish the tasks' concepts (omop.link, omop.publish), and
    end the runs. Returns the exit code: the extraction's, or the link or publish stage's failure (higher)."""
    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    from notelake.jobs.warehouse import OutputWriteError

    config_json = p.settings.model_dump_json()
    for plan in plans:
        plan.record = RunRecord.start(plan.run_id, plan.name, plan.identity, p.git_sha, config_json, p.started)
    records = [plan.record for plan in plans]
    write_records(p.warehouse, records)
    try:
        for plan in plans:
            commit_planned_changes(plan, p.warehouse, ctx, p.buckets)
        selections = [select_notes(plan.planned, p.options.limit).withColumn("task", F.lit(plan.name))
                      for plan in plans if plan.selected]
        finished = not selections or extract_rounds(
            p, ctx, reduce(DataFrame.unionByName, selections).join(valid.select("note_id", "text"), "note_id"), plans)
    except OutputWriteError:
        for plan in plans:
            plan.record.end("failed", plan.counts)
        with contextlib.suppress(OutputWriteError):  # best effort: the runs table may be unwritable too
            write_records(p.warehouse, records)
        raise
    finally:
        storage.delete_tree(ctx.staging_dir, ctx.storage_options)  # note-derived PHI: never left behind
    omop = link_and_publish(p, [plan.task for plan in plans])  # its failure keeps the committed extraction
    code = end_runs(plans, finished, json.dumps(p.warehouse.versions()), p.settings.job)
    for record in records:
        record.omop_json = omop.to_json()
    write_records(p.warehouse, records)
    return max(code, omop.code)


def git_sha() -> str | None:
    """The commit of the code running (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

