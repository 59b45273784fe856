"""The Delta writes of a pass, each task's ledger last: a round's staged rows, the input's rejections, the
source's deletes and the pass-through refreshes. One builder makes every ledger row (:func:`ledger_row`).

What is committed arrives as staged files (:mod:`.staging`), never through ``collect``: note text and
note-derived rows do not pass through the driver's Spark results. Rejections and refreshes are staged in rounds as
the extraction's notes are (whole buckets, about ``job.round_notes`` notes each) and committed round by round, so
the driver holds one round's rows and each commit names only that round's buckets and notes. A crash between a
round's row commits and its ledger commit is repaired by the next run (``Warehouse.recover``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import pyarrow as pa

from notelake.jobs import storage
from notelake.jobs.extraction.faults import LEDGER_OUTCOMES
from notelake.jobs.extraction.identity import Lineage
from notelake.jobs.extraction.staging import read_staged, refuse_duplicate_notes, stage_rounds
from notelake.udfs import schemas
from notelake.udfs.assemble import NoteResult

if TYPE_CHECKING:
    from notelake.jobs.extraction.plan import TaskPlan
    from notelake.jobs.extraction.stage import StageContext
    from notelake.jobs.warehouse import Warehouse

log = logging.getLogger("notelake.extract")


def ledger_row(lineage: Lineage, task: str, note: Mapping[str, Any], status: str, result: NoteResult,
               processed_at: datetime) -> dict:
    """The ledger row of one note: ``status`` succeeded or failed after an extraction attempt (``note`` carries
    its ``attempt``, ``passthrough_sha256`` and ``has_output``, whether it had rows before), or rejected by the
    input check (``note`` carries its ``error_type``). ``result``: the note's parse figures (empty when rejected).
    ``note`` always carries ``note_id``, ``note_bucket`` and ``text_sha256``."""
    rejected = status == "rejected"
    return {
        "note_id": note["note_id"], "task": task, "note_bucket": note["note_bucket"],
        "text_sha256": note["text_sha256"], "fingerprint": lineage.fingerprint,
        "passthrough_sha256": None if rejected else note["passthrough_sha256"], "run_id": lineage.run_id,
        "status": status, "attempts": 0 if rejected else note["attempt"],
        # a failed note keeps the rows of its earlier success; a rejected note's rows are removed
        "has_output": status == "succeeded" or (not rejected and bool(note["has_output"])),
        "error_type": note["error_type"] if rejected else None,
        "n_chunks": result.n_chunks, "n_concepts": len(result.concepts), "n_relations": len(result.relations),
        "n_warnings": result.warnings, "n_ungrounded": result.ungrounded,
        "n_dropped_relations": result.dropped_relations, "n_truncated_chunks": result.truncated_chunks,
        "processed_at": processed_at,
    }


def commit_round(warehouse: Warehouse, staging_dir: str, outcomes: list[dict], passthrough_schema: pa.Schema,
                 opts: dict | None = None) -> None:
    """Commit one round from the files of the Spark task attempts in ``outcomes`` (those whose results Spark
    kept), task by task: succeeded notes' rows replace their old ones (appended for notes without rows yet),
    failed notes keep theirs, errors are appended, each task's ledger goes after its rows. A round whose staged
    rows hold a note twice is refused before any commit (:class:`~.staging.DuplicateStagedRowsError`)."""
    import pyarrow.compute as pc

    tags = {r["attempt_tag"] for r in outcomes}
    table_schemas = {"concepts": schemas.concepts_schema(passthrough_schema),
                     "relations": schemas.relations_schema(passthrough_schema),
                     "errors": schemas.ERRORS_SCHEMA, "ledger": schemas.LEDGER_SCHEMA}
    staged, ignored = {}, 0
    for name, schema in table_schemas.items():
        staged[name], n = read_staged(staging_dir, name, tags, schema, opts)
        ignored += n
    if ignored:
        log.warning("ignored %d staged file(s) of Spark task attempts that did not finish (retried elsewhere)",
                    ignored)
    refuse_duplicate_notes(staged["ledger"], outcomes)
    for task in sorted({r["task"] for r in outcomes}):
        notes = [r for r in outcomes if r["task"] == task]
        ok = [r for r in notes if r["status"] == "succeeded"]
        warehouse.commit_round(
            {name: rows.filter(pc.equal(rows["task"], task)) for name, rows in staged.items()}, task,
            replaced=[r["note_id"] for r in ok if r["has_output_before"]],
            first=[r["note_id"] for r in ok if not r["has_output_before"]],
            # a note left for the next run (engine fault, deadline) has no ledger row staged: its old one stays
            ledger_known=[r["note_id"] for r in notes if r["in_ledger"] and r["status"] in LEDGER_OUTCOMES],
            buckets={r["note_bucket"] for r in notes})


def commit_planned_changes(plan: TaskPlan, warehouse: Warehouse, ctx: StageContext, buckets: int) -> None:
    """Commit what a task's plan decided without the engines: rejections, deletes at the source and pass-through
    refreshes; their counts go to ``plan.counts``. ``buckets``: the output's note buckets (the rounds' layout).
    Each staging step runs a Spark job, so a step the plan counted nothing for is skipped (an unchanged rerun runs
    no Spark job after planning)."""
    summary = plan.summary
    if summary.rejected or summary.rejected_known:
        plan.counts.stale_removed = commit_rejections(plan.rejected, warehouse, ctx, plan.task.name,
                                                      Rounds(summary.rejected + summary.rejected_known, buckets))
    if plan.gone:
        warehouse.delete_notes(plan.name, plan.gone)
        plan.counts.deleted = len(plan.gone)
    if summary.passthrough_stale:
        plan.counts.refreshed = commit_refresh(plan.planned, warehouse, ctx, plan.task.name,
                                               Rounds(summary.passthrough_stale, buckets))


@dataclass(frozen=True)
class Rounds:
    """How a side path stages its notes in rounds: about ``notes`` of them over the output's ``buckets``."""

    notes: int
    buckets: int


def commit_rejections(rejected, warehouse: Warehouse, ctx: StageContext, task: str, rounds: Rounds) -> int:
    """Commit what the input rejected, round by round: new error rows (once per note id, text sha256 and reason),
    the removal of rows a now-rejected note still had, and its ledger row (last). Returns the notes whose stale
    rows were removed."""
    from pyspark.sql import functions as F

    now = schemas.utc_now()
    lineage = ctx.lineages[task]
    new = rejected.where(F.col("is_new")).select(
        "note_id", "note_bucket", "text_sha256", "error_type", "message", F.lit("input").alias("stage"))
    for errors in _staged_rounds(new, ctx, f"{task}-input_errors", rounds):
        n = errors.num_rows
        errors = errors.append_column("run_id", pa.array([lineage.run_id] * n, pa.string())) \
            .append_column("task", pa.array([task] * n, pa.string())) \
            .append_column("chunk_index", pa.nulls(n, pa.int32())) \
            .append_column("attempt", pa.array([1] * n, pa.int32())) \
            .append_column("created_at", pa.array([now] * n, schemas.TIMESTAMP))
        warehouse.append("errors", errors.select(schemas.ERRORS_SCHEMA.names).cast(schemas.ERRORS_SCHEMA))

    changed = rejected.where(F.col("note_id").isNotNull() & (
        F.col("is_new") | F.col("l_status").isNull() | (F.col("l_status") != "rejected")))
    notes_changed = changed.groupBy("note_id", "note_bucket").agg(
        F.min(F.coalesce("text_sha256", F.lit(""))).alias("text_sha256"), F.min("error_type").alias("error_type"),
        F.max("has_output").alias("had_output"), F.max("in_ledger").alias("in_ledger"))
    removed = 0
    for staged in _staged_rounds(notes_changed, ctx, f"{task}-input_ledger", rounds):
        notes = staged.to_pylist()
        stale = {r["note_id"]: r["note_bucket"] for r in notes if r["had_output"]}
        if stale:
            warehouse.delete_notes(task, stale, tables=("concepts", "relations"))
        ledger = schemas.rows_to_table([ledger_row(lineage, task, r, "rejected", NoteResult(), now) for r in notes],
                                       schemas.LEDGER_SCHEMA)
        known = [r["note_id"] for r in notes if r["in_ledger"]]
        warehouse.commit_ledger(ledger, task, known, {r["note_bucket"] for r in notes})
        removed += len(stale)
    return removed


def commit_refresh(planned, warehouse: Warehouse, ctx: StageContext, task: str, rounds: Rounds) -> int:
    """Update the pass-through columns (patient_id after an MRN merge, note_type, ...) on the rows of the notes
    that have rows and whose pass-through values changed, round by round, before any extraction: no model call.
    Those whose text or extraction is unchanged are done; a retried, given-up or re-extracted note's old rows stay
    true to the input while its extraction fails. Returns the notes refreshed."""
    from pyspark.sql import functions as F

    passthrough = ctx.passthrough
    refreshed = 0
    for staged in _staged_rounds(planned.where(F.col("passthrough_stale")).select(
            "note_id", "note_bucket", "passthrough_sha256", *passthrough), ctx, f"{task}-refresh", rounds):
        buckets = set(staged["note_bucket"].to_pylist())
        for table in ("concepts", "relations"):
            warehouse.update_columns(table, staged.select(["note_id", *passthrough]), task, buckets,
                                     list(passthrough))
        warehouse.update_columns("ledger", staged.select(["note_id", "passthrough_sha256"]), task, buckets,
                                 ["passthrough_sha256"])
        refreshed += staged.num_rows
    return refreshed


def _staged_rounds(frame, ctx: StageContext, name: str, rounds: Rounds) -> Iterator[pa.Table]:
    """``frame`` (a ``note_bucket`` column) staged by the executors under the pass's staging folder in rounds of
    whole buckets (:func:`~.staging.stage_rounds`, ``job.round_notes`` notes each), read back one round at a time."""
    folders = stage_rounds(frame, rounds.notes, storage.join(ctx.staging_dir, name), ctx.settings.job.round_notes,
                           rounds.buckets, ctx.storage_options, ctx.settings.job.umask)
    for folder in folders:
        yield storage.read_parquet_dir(folder, ctx.storage_options)
