"""Plan each task of a pass against its ledger: what happens to every note (extract, retry, given up, refresh,
unchanged), which notes this pass extracts, which rows go because their note left the input, and the watermark.

The ledger holds one row per (task, note): its text sha256 and extraction fingerprint decide whether the note is
extracted again. An unchanged corpus selects nothing, and the engines are never started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from notelake.conf import Settings
from notelake.conf.task import Task
from notelake.jobs.extraction.given_up import GivenUpSelection
from notelake.jobs.extraction.identity import ExtractionIdentity, Lineage
from notelake.jobs.extraction.read import WATERMARK, CheckedInput, InputError, ReadWindow
from notelake.jobs.extraction.report import RunRecord, TaskCounts, succeeded_runs

if TYPE_CHECKING:
    from notelake.jobs.warehouse import Warehouse

ACTIONS = ("extract", "retry", "given_up", "refresh", "unchanged")


@dataclass(frozen=True)
class PassOptions:
    """The flags of one pass (``--limit``, ``--full-refresh``, ``--dry-run``, ``--retry-given-up``)."""

    limit: int | None = None  # extract at most this many of the selected notes
    full_refresh: bool = False  # ignore the ledger and the watermark
    dry_run: bool = False  # plan and report; write nothing
    retry_given_up: GivenUpSelection | None = None  # given-up notes whose attempts are reset before planning


@dataclass(frozen=True)
class Pass:
    """One invocation of the job: its id, settings and flags, the Spark session and the output it writes. A pass
    over several tasks reads the input once and shares the engines; each task has its own run (and run id)."""

    pass_id: str
    settings: Settings
    options: PassOptions
    spark: object
    warehouse: Warehouse
    buckets: int  # note buckets of the output (fixed by its first run)
    staging_root: str
    started: datetime
    git_sha: str | None


@dataclass(frozen=True)
class PlanRules:
    """How a pass plans every task's notes."""

    buckets: int  # note buckets of the output
    max_attempts: int  # job.max_attempts: failed attempts per text and fingerprint before a note is given up
    full_refresh: bool = False  # every valid note is extracted


@dataclass(frozen=True)
class PlanSummary:
    """A task's plan in counts (one Spark action over the planned notes and the rejected rows)."""

    valid: int
    actions: dict[str, int]  # notes per action (ACTIONS)
    rejected: int  # rejected rows not recorded before (the error rate counts these)
    rejected_known: int  # rejected rows recorded on an earlier run (no new error row)
    stale: int  # rejected notes that still have rows from an earlier extraction
    passthrough_stale: int = 0  # notes whose rows carry pass-through values the input changed (whatever the action)
    watermark: datetime | None = None  # the latest updated_at read (input.updated_at_column), at most the run's start
    prompts: int = 0  # chunks (prompts) of the notes to extract (new and retried), from their lengths

    @property
    def new(self) -> int:
        return self.actions.get("extract", 0) + self.actions.get("retry", 0)

    def prompts_of(self, selected: int) -> int:
        """Estimated prompts of ``selected`` of the new notes (all of them, or a ``--limit`` cut)."""
        return round(self.prompts * selected / self.new) if self.new else 0


@dataclass
class TaskPlan:
    """One task of a pass: what extracts it, its run's id and history, its ledger state, what the pass does with
    each of its notes, and what its run did (``counts``, ``record``)."""

    task: Task
    identity: ExtractionIdentity
    run_id: str
    history: list[RunRecord]  # succeeded runs under this fingerprint, oldest first
    since: datetime | None  # the watermark this run reads from, less the lookback (input.watermark column)
    state: object  # the task's ledger rows (Spark), None before its first run
    since_version: int | None = None  # the input version the last complete run read (input.watermark delta_version)
    read_version: int | None = None  # the input version this run read (input.watermark delta_version)
    planned: object = None  # valid notes with their action (Spark, persisted)
    rejected: object = None  # rejected rows, classified (Spark, persisted)
    summary: PlanSummary | None = None
    selected: int = 0  # notes this run extracts (new and retried, cut by --limit)
    gone: dict[str, int] = field(default_factory=dict)  # notes deleted at the source: note_id -> note_bucket
    counts: TaskCounts = field(default_factory=TaskCounts)
    record: RunRecord | None = None

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def prompts(self) -> int:
        """Estimated prompts of this run's selection."""
        return self.summary.prompts_of(self.selected)

    @property
    def lineage(self) -> Lineage:
        return self.identity.lineage(self.run_id)

    def retry_ids(self, max_attempts: int):
        """Note ids whose last attempt on this fingerprint failed and may be tried again (None before a ledger)."""
        from pyspark.sql import functions as F

        if self.state is None:
            return None
        return self.state.where((F.col("l_status") == "failed") & (F.col("l_attempts") < max_attempts)
                                & (F.col("l_fingerprint") == self.identity.fingerprint)).select("note_id")

    def complete(self, finished: bool) -> bool:
        """Every selected note was extracted: no ``--limit`` cut and (``finished``) no ``--max-runtime`` stop."""
        return finished and self.selected == self.summary.new

    def next_watermark(self, finished: bool) -> datetime | None:
        """The watermark this run records: the latest updated_at read, at most the run's start (a row stamped in
        the future cannot move the mark past rows committed after this run), never below the one it read from. It
        moves only when the run is :meth:`complete`: otherwise the next run reads the same window again, and the
        ledger skips what is done."""
        if not self.complete(finished):
            return self.since
        return max((mark for mark in (self.summary.watermark, self.since) if mark), default=None)

    def next_source_version(self, finished: bool) -> int | None:
        """The input version this run records (input.watermark delta_version): the one it read when it is
        :meth:`complete`, else the one it read from."""
        return self.read_version if self.complete(finished) and self.read_version is not None else self.since_version


def last_watermark(history: list[RunRecord]) -> datetime | None:
    """The latest watermark a succeeded run recorded (None: read the whole input)."""
    return max((record.watermark for record in history if record.watermark), default=None)


def last_source_version(history: list[RunRecord]) -> int | None:
    """The input version the latest succeeded run recorded (None: read the whole input). The latest, not the
    largest: a replaced input table starts its versions again."""
    return next((record.source_version for record in reversed(history) if record.source_version is not None), None)


def ledger_state(spark, warehouse: Warehouse, task: str):
    """The ledger's current row per note of ``task`` (Spark, columns prefixed ``l_``), or None before the first
    run."""
    from pyspark.sql import functions as F

    from notelake.jobs.warehouse import read_snapshot_spark

    ledger = read_snapshot_spark(spark, warehouse.path("ledger"), warehouse.storage_options)
    if ledger is None:
        return None
    return ledger.where(F.col("task") == task).select(
        "note_id", *[F.col(c).alias(f"l_{c}") for c in
                     ("note_bucket", "text_sha256", "fingerprint", "passthrough_sha256", "status", "attempts",
                      "has_output")])


def plan_actions(valid, state, fingerprint: str, passthrough: tuple[str, ...], rules: PlanRules):
    """Each valid note with what this run does with it (``action``) and how:

    * ``extract``: new, its text or the extraction fingerprint changed, or a full refresh;
    * ``retry``: its last attempt on this text and fingerprint failed and fewer than ``max_attempts`` were made;
    * ``given_up``: failed ``max_attempts`` times on this text and fingerprint (reported, not selected);
    * ``refresh``: extracted, but its pass-through columns changed (the rows are updated, the model not called);
    * ``unchanged``.

    ``passthrough_stale``: the note has rows and its pass-through columns changed, whatever its action: its rows
    are refreshed before the rounds, so a note whose extraction fails (or was given up) does not keep a corrected
    patient_id wrong on its old rows.
    """
    from pyspark.sql import functions as F

    planned = valid.withColumn("note_bucket", note_bucket_col(rules.buckets)) \
        .withColumn("passthrough_sha256", passthrough_hash_col(passthrough))
    if state is None:
        return planned.select("*", F.lit("extract").alias("action"), F.lit(1).alias("attempt"),
                              F.lit(False).alias("has_output"), F.lit(False).alias("in_ledger"),
                              F.lit(False).alias("passthrough_stale"))
    joined = planned.join(state, "note_id", "left")
    same = (F.col("l_text_sha256") == F.col("text_sha256")) & (F.col("l_fingerprint") == F.lit(fingerprint))
    failed = same & (F.col("l_status") == "failed")
    action = (F.when(F.lit(rules.full_refresh) | F.col("l_status").isNull(), "extract")
              .when(~same | (F.col("l_status") == "rejected"), "extract")
              .when(failed & (F.col("l_attempts") < rules.max_attempts), "retry")
              .when(failed, "given_up")
              .when(~F.col("l_passthrough_sha256").eqNullSafe(F.col("passthrough_sha256")), "refresh")
              .otherwise("unchanged"))
    # the attempt this run makes (a given-up note keeps the count it was given up at)
    attempt = (F.when(action == "retry", F.col("l_attempts") + 1)
               .when(action == "given_up", F.col("l_attempts")).otherwise(1))
    return joined.select(
        *planned.columns, action.alias("action"), attempt.cast("int").alias("attempt"),
        F.coalesce(F.col("l_has_output"), F.lit(False)).alias("has_output"),
        F.col("l_status").isNotNull().alias("in_ledger"),
        (F.coalesce(F.col("l_has_output"), F.lit(False))
         & ~F.col("l_passthrough_sha256").eqNullSafe(F.col("passthrough_sha256"))).alias("passthrough_stale"))


def note_bucket_col(buckets: int):
    """Spark twin of :func:`notelake.udfs.hashing.note_bucket`."""
    from pyspark.sql import functions as F

    return F.pmod(F.conv(F.substring(F.sha2(F.col("note_id"), 256), 1, 8), 16, 10).cast("long"),
                  F.lit(buckets)).cast("int")


def passthrough_hash_col(passthrough: tuple[str, ...]):
    """sha256 of the note's pass-through values (null without pass-through columns)."""
    from pyspark.sql import functions as F

    if not passthrough:
        return F.lit(None).cast("string")
    return F.sha2(F.to_json(F.struct(*[F.col(c) for c in passthrough])), 256)


def classify_rejected(rejected, state, input_errors, buckets: int):
    """Rejected rows marked ``is_new`` (no earlier error row for this note id, text sha256 and reason: a rejection
    is recorded once) and ``has_output`` (the note had rows, which must go: a rejected note is not in cohorts)."""
    from pyspark.sql import functions as F

    marked = rejected.withColumn("note_bucket", note_bucket_col(buckets))
    if input_errors is None:
        marked = marked.withColumn("is_new", F.lit(True))
    else:
        seen = input_errors.select(F.col("note_id").alias("e_note_id"), F.col("text_sha256").alias("e_sha"),
                                   F.col("error_type").alias("e_type")).distinct()
        cond = (marked["note_id"].eqNullSafe(seen["e_note_id"]) & marked["text_sha256"].eqNullSafe(seen["e_sha"])
                & (marked["error_type"] == seen["e_type"]))
        marked = marked.join(seen, cond, "left").select(*marked.columns, F.col("e_type").isNull().alias("is_new"))
    if state is None:
        return marked.select("*", F.lit(False).alias("has_output"), F.lit(False).alias("in_ledger"),
                             F.lit(None).cast("string").alias("l_status"))
    return marked.join(state.select("note_id", "l_has_output", "l_status"), "note_id", "left").select(
        *marked.columns, F.coalesce(F.col("l_has_output"), F.lit(False)).alias("has_output"),
        F.col("l_status").isNotNull().alias("in_ledger"), "l_status")


def select_notes(planned, limit: int | None = None):
    """Notes to extract this run (new, changed or retried); ``limit`` caps the count."""
    from pyspark.sql import functions as F

    selected = planned.where(F.col("action").isin("extract", "retry")).drop(WATERMARK, "passthrough_stale")
    if limit is not None:
        selected = selected.orderBy("note_id").limit(limit)
    return selected


def chunks_col(task: Task, overlap: int):
    """Chunks (prompts) a note of ``text_chars`` characters gives: udfs.chunking's count without its word-boundary
    adjustments, ceil((length - overlap) / (max_chunk_chars - overlap)) with the overlap capped at half a chunk, at
    least one."""
    from pyspark.sql import functions as F

    stride = max(1, task.max_chunk_chars - min(overlap, task.max_chunk_chars // 2))
    return F.greatest(F.lit(1), F.ceil((F.col("text_chars") - overlap) / stride))


def summarize_plan(planned, rejected, chunks, cap: datetime | None = None) -> PlanSummary:
    """Note counts per action, rejection counts and the new notes' prompts in one Spark action (each separate
    count would re-read the input and re-run the duplicate-id shuffle). ``chunks``: :func:`chunks_col`; ``cap``:
    the latest watermark to report (the run's start). Nothing but counts reaches the driver."""
    from pyspark.sql import functions as F

    def updated_at(frame):
        return F.col(WATERMARK) if WATERMARK in frame.columns else F.lit(None).cast("timestamp")

    no_prompts = F.lit(0).cast("long").alias("prompts")
    rows = planned.select(F.col("action").alias("kind"), updated_at(planned).alias("updated_at"),
                          chunks.cast("long").alias("prompts")).unionByName(
        rejected.select(F.when(F.col("is_new"), "rejected").otherwise("rejected_known").alias("kind"),
                        updated_at(rejected).alias("updated_at"), no_prompts))
    stale = rejected.where(F.col("has_output") & (F.col("note_id").isNotNull())).select("note_id").distinct() \
        .select(F.lit("stale").alias("kind"), F.lit(None).cast("timestamp").alias("updated_at"), no_prompts)
    passthrough_stale = planned.where(F.col("passthrough_stale")).select(
        F.lit("passthrough_stale").alias("kind"), F.lit(None).cast("timestamp").alias("updated_at"), no_prompts)
    totals = rows.unionByName(stale).unionByName(passthrough_stale).groupBy("kind").agg(
        F.count(F.lit(1)).alias("n"), F.max("updated_at").alias("latest"), F.sum("prompts").alias("prompts")).collect()
    counts = {r["kind"]: int(r["n"]) for r in totals}
    latest = max((r["latest"] for r in totals if r["latest"] is not None and r["kind"] != "stale"), default=None)
    # naive, in the session time zone: UTC (start_spark)
    latest = latest.replace(tzinfo=timezone.utc) if latest else None
    if latest and cap:
        latest = min(latest, cap)
    actions = {k: counts.get(k, 0) for k in ACTIONS}
    return PlanSummary(valid=sum(actions.values()), actions=actions, rejected=counts.get("rejected", 0),
                       rejected_known=counts.get("rejected_known", 0), stale=counts.get("stale", 0),
                       passthrough_stale=counts.get("passthrough_stale", 0),
                       watermark=latest,
                       prompts=sum(int(r["prompts"] or 0) for r in totals if r["kind"] in ("extract", "retry")))


class DeleteBrakeError(InputError):
    """``--propagate-deletes`` stopped before deleting: the input holds no note, or lost more of the ledger's notes
    than ``job.max_delete_fraction`` (a truncated or half-loaded input looks exactly like mass deletion)."""


def source_deletes(present, state, task: str, max_fraction: float) -> dict[str, int]:
    """{note_id: note_bucket} of the ledger's notes (``state``) that the input's ids (``present``) no longer hold.
    :class:`DeleteBrakeError` (nothing deleted) when the input holds no note id while the ledger has notes, or when
    more than ``max_fraction`` of the ledger's notes would go; both counts are taken before any id is collected."""
    from pyspark.sql import functions as F

    if state is None:
        return {}
    flagged = present.select("note_id", F.lit(True).alias("_present"))
    counts = state.select("note_id", "l_note_bucket").join(flagged, "note_id", "left").agg(
        F.count(F.lit(1)).alias("ledger"), F.count(F.when(F.col("_present").isNull(), 1)).alias("gone")).first()
    ledger, n_gone = int(counts["ledger"]), int(counts["gone"])
    if not n_gone:
        return {}
    if n_gone == ledger and present.isEmpty():
        raise DeleteBrakeError(f"--propagate-deletes: the input holds no note id, so every one of the {ledger} notes "
                               f"of task {task} would be deleted; an empty input never deletes (nothing was deleted "
                               "or written)")
    if n_gone > max_fraction * ledger:
        raise DeleteBrakeError(
            f"--propagate-deletes would delete {n_gone} of the {ledger} notes of task {task} ({n_gone / ledger:.1%}), "
            f"more than job.max_delete_fraction {max_fraction}: nothing was deleted or written. If the input really "
            f"lost them, rerun with job.max_delete_fraction {math.ceil(100 * n_gone / ledger) / 100:g}")
    gone = state.select("note_id", "l_note_bucket").join(present, "note_id", "left_anti")
    return {r["note_id"]: r["l_note_bucket"] for r in gone.collect()}


def start_plan(p: Pass, task: Task, identity: ExtractionIdentity, run_id: str) -> TaskPlan:
    """A task's plan before the input is read: its run's history under this fingerprint, the watermark it reads
    from (none on ``--full-refresh``, or without ``input.updated_at_column`` or ``input.watermark:
    delta_version``) and its ledger state."""
    history = succeeded_runs(p.warehouse, task.name, identity.fingerprint)
    cfg, incremental = p.settings.input, not p.options.full_refresh
    return TaskPlan(task=task, identity=identity, run_id=run_id, history=history,
                    since=last_watermark(history) if incremental and cfg.updated_at_column else None,
                    since_version=last_source_version(history) if incremental and cfg.watermark == "delta_version"
                    else None, state=ledger_state(p.spark, p.warehouse, task.name))


def input_window(plans: list[TaskPlan], max_attempts: int) -> ReadWindow:
    """One read of the input serving every task: from the oldest of their watermarks (or input versions), with the
    notes any of them retries (a task that saw a row already finds it unchanged in its ledger)."""
    from functools import reduce

    from pyspark.sql import DataFrame

    def oldest(marks: list):
        return None if any(mark is None for mark in marks) else min(marks)

    retries = [ids for ids in (plan.retry_ids(max_attempts) for plan in plans) if ids is not None]
    return ReadWindow(since=oldest([plan.since for plan in plans]),
                      since_version=oldest([plan.since_version for plan in plans]),
                      retry=reduce(DataFrame.unionByName, retries).distinct() if retries else None)


def plan_task(plan: TaskPlan, checked: CheckedInput, errors, present, p: Pass) -> None:
    """Fill ``plan`` from the checked input: each note's action, the rejected rows classified against the errors
    table (``errors``, Spark; None before any), the summary, the selection's size, its counts, and with ``present``
    (the input's note ids, ``--propagate-deletes``) the notes deleted at the source. The planned and rejected frames
    are persisted: the caller unpersists them."""
    from pyspark.sql import functions as F

    job = p.settings.job
    rules = PlanRules(buckets=p.buckets, max_attempts=job.max_attempts, full_refresh=p.options.full_refresh)
    # plans carry no text (one persisted copy of it, in `checked`, is joined back to the selection)
    plan.planned = plan_actions(checked.valid.drop("text"), plan.state, plan.identity.fingerprint,
                                checked.passthrough, rules).persist()
    input_errors = None if errors is None else errors.where((F.col("stage") == "input") & (F.col("task") == plan.name))
    plan.rejected = classify_rejected(checked.rejected, plan.state, input_errors, p.buckets).persist()
    plan.summary = summary = summarize_plan(plan.planned, plan.rejected,
                                            chunks_col(plan.task, plan.task.overlap(job.chunk_overlap_chars)),
                                            cap=p.started)
    plan.read_version = checked.version
    limit = p.options.limit
    plan.selected = summary.new if limit is None else min(limit, summary.new)
    plan.gone = source_deletes(present, plan.state, plan.name, job.max_delete_fraction) if present is not None else {}
    plan.counts = TaskCounts(selected=plan.selected, skipped=summary.valid - plan.selected,
                             rejected=summary.rejected, retried=summary.actions["retry"],
                             given_up=summary.actions["given_up"])
