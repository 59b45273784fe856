"""The nightly extraction job: note table -> Spark -> Ray vLLM actors -> Delta tables.

    spark-submit jobs/extract.py --conf conf/local.yaml --input <note table> --output <warehouse dir> \\
        --task phee [--adapter models/adapters/notelake-mt] [--limit N | --max-notes N] [--max-runtime 6h] [--full-refresh]
        [--propagate-deletes] [--dry-run]

(also ``notelake extract`` with the same flags). Stages, each testable alone:

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
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from notelake.conf import ConfigError, Settings, load_settings
from notelake.conf.task import Task, load_task
from notelake.udfs import schemas
from notelake.udfs.hashing import fingerprint as extraction_fingerprint
from notelake.udfs.parsing import PARSER_VERSION
from notelake.udfs.prompts import prompt_version

log = logging.getLogger("notelake.extract")

EXIT_OK, EXIT_ERROR_RATE, EXIT_USAGE, EXIT_LOCKED, EXIT_WRITE_FAILED, EXIT_FAILED = 0, 1, 2, 3, 4, 5
WATERMARK = "source_updated_at"  # input.updated_at_column as a timestamp, carried to the watermark aggregate
SUMMARY_SCHEMA = pa.schema([
    ("note_id", pa.string()), ("status", pa.string()), ("n_chunks", pa.int32()), ("n_concepts", pa.int32()),
    ("n_relations", pa.int32()), ("n_errors", pa.int32()), ("tokens_in", pa.int64()), ("tokens_out", pa.int64()),
])
SUMMARY_DDL = ", ".join(f"{f.name} {'string' if f.type == pa.string() else 'int' if f.type == pa.int32() else 'bigint'}"
                        for f in SUMMARY_SCHEMA)


class InputError(ValueError):
    """The input table cannot be used (missing column, unreadable path): raised before any work starts."""


# ---------------------------------------------------------------------------------------------- run context
@dataclass(frozen=True)
class RunContext:
    """Everything the executors need, picklable (no Spark or Ray objects)."""

    run_id: str
    task_def: dict
    settings: dict
    gcs_address: str | None
    staging_dir: str
    passthrough: tuple[str, ...]
    lineage: dict = field(default_factory=dict)

    @property
    def task(self) -> Task:
        return Task.model_validate(self.task_def)


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
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    conf = SparkConf()
    builder = SparkSession.builder.appName(app_name)
    if not conf.contains("spark.master"):  # spark-submit --master wins over the YAML
        builder = builder.master(settings.spark.master)
    defaults = {
        "spark.sql.shuffle.partitions": str(settings.spark.shuffle_partitions),
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(settings.spark.arrow_batch_size),
        "spark.sql.session.timeZone": "UTC",
        "spark.python.worker.reuse": "true",
        "spark.ui.showConsoleProgress": "false",
        # files Spark itself writes (delta-spark writer, local dirs) get the same restrictive umask as ours
        "spark.hadoop.fs.permissions.umask-mode": settings.job.umask[-3:],
        **settings.spark.extra,
    }
    for key, value in defaults.items():
        if not conf.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _detect_format(spark, source: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    path = Path(source)
    if (path / "_delta_log").is_dir():
        return "delta"
    if source.endswith((".jsonl", ".json")):
        return "jsonl"
    if path.exists() or any(ch in source for ch in "*?") or "://" in source:
        return "parquet"
    if spark.catalog.tableExists(source):
        return "table"
    raise InputError(f"input {source!r} is neither a path nor a catalog table")


def read_notes(spark, source: str, settings: Settings):
    """Read the note table as a Spark DataFrame (Delta through its current snapshot)."""
    from notelake.jobs.warehouse import read_snapshot_spark

    fmt = _detect_format(spark, source, settings.input.format)
    if fmt == "table":
        return spark.table(source)
    if fmt == "jsonl":
        return spark.read.json(source)
    if fmt == "delta":
        if settings.spark.delta_writer == "delta-spark":
            return spark.read.format("delta").load(source)
        notes = read_snapshot_spark(spark, source)
        if notes is None:
            raise InputError(f"Delta table {source} has no data files")
        return notes
    return spark.read.parquet(source)


# ---------------------------------------------------------------------------------------------- extract
def extract(spark, settings: Settings, source: str, since: datetime | None = None):
    """Read and validate the note table. Returns (valid notes, rejected rows, passthrough column names).

    valid: note_id, text, text_sha256, passthrough...; rejected: note_id, text_sha256, error_type, message; both
    also carry ``source_updated_at`` with ``input.updated_at_column``. ``since``: only rows updated after it
    (and rows whose updated_at is null: they cannot be placed before the watermark).
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
            df = df.where(updated.isNull() | (updated > F.lit(since)))
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
    checked = notes.withColumn("error_type", reason).withColumn("text_sha256", F.sha2(F.col("text"), 256))
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
    tail = [WATERMARK] if watermark else []
    rejected = checked.where(F.col("error_type").isNotNull()).select(
        "note_id", "text_sha256", "error_type", message.alias("message"), *tail)
    valid = checked.where(F.col("error_type").isNull()).select("note_id", "text", "text_sha256", *passthrough, *tail)
    return valid, rejected, passthrough


def done_notes(spark, ledger_path: str, fingerprint: str, full_refresh: bool = False):
    """(note_id, text_sha256) already extracted under ``fingerprint``, or None (no ledger yet, or full refresh)."""
    from pyspark.sql import functions as F

    from notelake.jobs.warehouse import read_snapshot_spark

    ledger = None if full_refresh else read_snapshot_spark(spark, ledger_path)
    if ledger is None:
        return None
    return ledger.where(F.col("fingerprint") == fingerprint).select("note_id", "text_sha256").distinct()


def select(valid, done, limit: int | None = None):
    """Notes whose (note_id, text sha256) is not in ``done``; ``limit`` caps the count."""
    valid = valid.drop(WATERMARK)
    selected = valid if done is None else valid.join(done, ["note_id", "text_sha256"], "left_anti")
    if limit is not None:
        selected = selected.orderBy("note_id").limit(limit)
    return selected


@dataclass(frozen=True)
class InputSummary:
    valid: int
    new: int
    rejected_rows: list  # ids, hashes and reasons only: never text
    watermark: datetime | None = None  # the latest updated_at read (input.updated_at_column)


def summarize_input(valid, rejected, done) -> InputSummary:
    """Valid and new (not in ``done``) note counts plus the rejected rows, in one Spark action: every separate
    count or collect re-reads the input and re-runs the duplicate-id shuffle."""
    from pyspark.sql import functions as F

    def updated_at(frame):
        return F.col(WATERMARK) if WATERMARK in frame.columns else F.lit(None).cast("timestamp")

    marked = valid.select("note_id", "text_sha256", updated_at(valid).alias("updated_at"))
    if done is None:
        marked = marked.withColumn("is_new", F.lit(True))
    else:
        marked = marked.join(done.withColumn("is_done", F.lit(True)), ["note_id", "text_sha256"], "left") \
            .select("note_id", "text_sha256", "updated_at", F.col("is_done").isNull().alias("is_new"))
    none = F.lit(None).cast("string")
    rows = marked.select("note_id", "text_sha256", none.alias("error_type"), none.alias("message"), "updated_at",
                         F.lit(True).alias("is_valid"), "is_new").unionByName(
        rejected.select("note_id", "text_sha256", "error_type", "message", updated_at(rejected).alias("updated_at"),
                        F.lit(False).alias("is_valid"), F.lit(False).alias("is_new")))
    totals = rows.agg(
        F.sum(F.col("is_valid").cast("long")).alias("valid"),
        F.sum(F.col("is_new").cast("long")).alias("new"),
        F.collect_list(F.when(~F.col("is_valid"), F.struct("note_id", "text_sha256", "error_type", "message")))
        .alias("rejected"),
        F.max("updated_at").alias("watermark"),
    ).collect()[0]
    latest = totals["watermark"]  # naive, in the session time zone: UTC (start_spark)
    return InputSummary(valid=int(totals["valid"] or 0), new=int(totals["new"] or 0),
                        rejected_rows=list(totals["rejected"]),
                        watermark=latest.replace(tzinfo=timezone.utc) if latest else None)


def source_deletes(spark, settings: Settings, source: str, ledger_path: str, task: str) -> list[str]:
    """Ids in the ledger for ``task`` that the input no longer holds (one scan of the input's id column)."""
    from pyspark.sql import functions as F

    from notelake.jobs.warehouse import read_snapshot_spark

    ledger = read_snapshot_spark(spark, ledger_path)
    if ledger is None:
        return []
    present = read_notes(spark, source, settings).select(
        F.col(settings.input.note_id_column).cast("string").alias("note_id")).where(F.col("note_id").isNotNull())
    known = ledger.where(F.col("task") == task).select("note_id").distinct()
    return sorted(r["note_id"] for r in known.join(present.distinct(), "note_id", "left_anti").collect())


def previous_runs(warehouse, task: str, fingerprint: str) -> list[dict]:
    """Succeeded runs of ``task`` under ``fingerprint`` (the runs table's small rows), oldest first."""
    from notelake.jobs.warehouse import read_delta_arrow

    runs = read_delta_arrow(warehouse.path("runs"))
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


# ---------------------------------------------------------------------------------------------- transform
_POOLS: dict = {}


def _executor_pool(ctx: RunContext):
    """One Ray connection and actor-pool handle per Python worker process (workers are reused)."""
    from notelake.models.actor import EnginePool

    key = (ctx.gcs_address, json.dumps(ctx.settings["engine"], sort_keys=True))
    if key not in _POOLS:
        _POOLS[key] = EnginePool.connect(ctx.gcs_address, Settings.model_validate(ctx.settings))
    return _POOLS[key]


def _write_staged(ctx: RunContext, table: str, rows: list[dict], schema: pa.Schema) -> None:
    if not rows:
        return
    out = Path(ctx.staging_dir) / table
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(schemas.rows_to_table(rows, schema), out / f"part-{uuid.uuid4().hex}.parquet")


def extract_batch(batch: pa.RecordBatch, ctx: RunContext, task: Task, pool) -> pa.RecordBatch:
    """Chunk, prompt, generate, parse and ground one Arrow batch of notes; stage rows; return per-note counts."""
    from notelake.models.engine import GenerationRequest
    from notelake.udfs.answer import answer_guide
    from notelake.udfs.assemble import assemble_note
    from notelake.udfs.chunking import chunk_text
    from notelake.udfs.prompts import build_messages

    engine_cfg = ctx.settings["engine"]
    job_cfg = ctx.settings["job"]
    max_tokens = engine_cfg.get("max_tokens") or task.max_tokens
    guided = engine_cfg.get("guided_decoding", "grounded")
    notes = batch.to_pylist()
    chunked = [chunk_text(n["text"], task.max_chunk_chars, job_cfg["chunk_overlap_chars"]) for n in notes]
    requests = [
        GenerationRequest(request_id=f"{i}:{c.index}", messages=build_messages(task, c.text),
                          guide=answer_guide(task, c.text, guided), max_tokens=max_tokens)
        for i, chunks in enumerate(chunked) for c in chunks
    ]
    results = iter(pool.generate(requests))

    passthrough_schema = pa.schema([batch.schema.field(c) for c in ctx.passthrough])
    concept_rows, relation_rows, error_rows, ledger_rows, summaries = [], [], [], [], []
    for note, chunks in zip(notes, chunked):
        outs = [next(results) for _ in chunks]
        lineage = {**ctx.lineage, "text_sha256": note["text_sha256"], "extracted_at": now_utc()}
        result = assemble_note(
            note_id=note["note_id"], text=note["text"], task=task, chunks=chunks,
            outputs=[o.text for o in outs], output_errors=[o.error for o in outs],
            truncated=[o.finish_reason == "length" for o in outs], lineage=lineage,
            passthrough={c: note[c] for c in ctx.passthrough},
        )
        status = "failed" if result.errors else "succeeded"
        concept_rows += result.concepts
        relation_rows += result.relations
        error_rows += result.errors
        ledger_rows.append({
            "note_id": note["note_id"], "task": task.name, "text_sha256": note["text_sha256"],
            "fingerprint": ctx.lineage["fingerprint"], "run_id": ctx.run_id, "status": status,
            "n_chunks": len(chunks), "n_concepts": len(result.concepts), "n_relations": len(result.relations),
            "processed_at": now_utc(),
        })
        summaries.append({
            "note_id": note["note_id"], "status": status, "n_chunks": len(chunks),
            "n_concepts": len(result.concepts), "n_relations": len(result.relations), "n_errors": len(result.errors),
            "tokens_in": sum(o.prompt_tokens for o in outs), "tokens_out": sum(o.output_tokens for o in outs),
        })
    _write_staged(ctx, "concepts", concept_rows, schemas.concepts_schema(passthrough_schema))
    _write_staged(ctx, "relations", relation_rows, schemas.relations_schema(passthrough_schema))
    _write_staged(ctx, "errors", error_rows, schemas.ERRORS_SCHEMA)
    _write_staged(ctx, "ledger", ledger_rows, schemas.LEDGER_SCHEMA)
    return pa.RecordBatch.from_pylist(summaries, schema=SUMMARY_SCHEMA)


def transform(selected, ctx: RunContext, partitions: int):
    """Lazy per-note summaries; staging files are written as a side effect when an action runs."""

    def run_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        os.umask(int(ctx.settings["job"]["umask"], 8))  # staged Parquet holds PHI: same modes as the tables
        task = ctx.task
        pool = None
        for batch in batches:
            if batch.num_rows == 0:
                continue
            pool = pool or _executor_pool(ctx)
            yield extract_batch(batch, ctx, task, pool)

    return selected.repartition(partitions).mapInArrow(run_partition, SUMMARY_DDL)


# ---------------------------------------------------------------------------------------------- load
def _staged_table(staging: Path, table: str, schema: pa.Schema) -> pa.Table:
    from notelake.jobs.warehouse import read_staged

    staged = read_staged(str(staging / table))
    return schema.empty_table() if staged is None else staged.cast(schema)


def load(warehouse, staging: Path, task: Task, note_ids: list[str], passthrough_schema: pa.Schema) -> None:
    """Commit one round: concepts and relations replaced per note, errors appended, ledger last."""
    staged = {
        "concepts": _staged_table(staging, "concepts", schemas.concepts_schema(passthrough_schema)),
        "relations": _staged_table(staging, "relations", schemas.relations_schema(passthrough_schema)),
        "errors": _staged_table(staging, "errors", schemas.ERRORS_SCHEMA),
        "ledger": _staged_table(staging, "ledger", schemas.LEDGER_SCHEMA),
    }
    warehouse.commit_round(staged, task.name, note_ids)


def rejected_error_rows(rejected_rows: list, run_id: str, task: Task) -> list[dict]:
    return [
        schemas.error_row(run_id=run_id, task=task.name, stage="input", error_type=r["error_type"],
                          message=r["message"], note_id=r["note_id"], text_sha256=r["text_sha256"])
        for r in rejected_rows
    ]


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

    COUNTS: ClassVar[tuple[str, ...]] = ("selected", "succeeded", "failed", "skipped", "rejected", "tokens_in",
                                         "tokens_out", "deleted")

    def add(self, row) -> None:
        self.succeeded += row["succeeded"] or 0
        self.failed += row["failed"] or 0
        self.tokens_in += row["tokens_in"] or 0
        self.tokens_out += row["tokens_out"] or 0

    @property
    def error_rate(self) -> float:
        total = self.selected + self.rejected
        return (self.failed + self.rejected) / total if total else 0.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="notelake extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--conf", default=None, help="settings YAML (default: conf/local.yaml)")
    p.add_argument("--input", required=True, help="note table: Delta path, Parquet path/glob, JSONL, or catalog table")
    p.add_argument("--output", required=True, help="warehouse directory for the Delta output tables")
    p.add_argument("--task", default=None, help="task name (conf/tasks/<name>.yaml) or a task YAML path")
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
    from notelake.models.adapters import load_adapter
    from notelake.models.base_model import model_sha256, resolve_model

    model_path = resolve_model(settings.engine.model)
    base_sha = model_sha256(model_path)
    adapter = load_adapter(settings.engine.adapter, base_sha, task.name) if settings.engine.adapter else None
    version = prompt_version(task)
    max_tokens = settings.engine.max_tokens or task.max_tokens
    sampling = {"temperature": settings.engine.temperature, "max_tokens": max_tokens,
                "guided_decoding": settings.engine.guided_decoding, "seed": settings.engine.seed}
    chunking = {"max_chunk_chars": task.max_chunk_chars, "overlap": settings.job.chunk_overlap_chars}
    fp = extraction_fingerprint(base_sha, adapter.sha256 if adapter else None, version, sampling, chunking,
                                PARSER_VERSION)
    return {
        "model": settings.engine.model, "model_sha256": base_sha,
        "adapter": adapter.name if adapter else None, "adapter_sha256": adapter.sha256 if adapter else None,
        "prompt_version": version, "fingerprint": fp,
    }


def run(settings: Settings, source: str, output: str, *, limit: int | None = None, full_refresh: bool = False,
        dry_run: bool = False, spark=None) -> int:
    """Run the job once; returns the exit code. Raises InputError, ConfigError, LockedError, OutputWriteError."""
    from notelake.jobs.guards import RunLock, resolve_output, restrictive_umask

    out = resolve_output(output, settings.job.output_root)
    if settings.job.log_phi:
        log.warning("job.log_phi is on: failure tracebacks may quote note text; use for debugging only")
    with restrictive_umask(settings.job.umask):
        lock = contextlib.nullcontext() if dry_run else RunLock(out, settings.job.lock_timeout_s)
        with lock:
            return _run(settings, source, str(out), limit=limit, full_refresh=full_refresh, dry_run=dry_run,
                        spark=spark)


def _run(settings: Settings, source: str, output: str, *, limit: int | None, full_refresh: bool, dry_run: bool,
         spark) -> int:
    from pyspark.sql import functions as F

    from notelake.jobs.warehouse import OutputWriteError, open_warehouse

    task = load_task(settings.job.task)
    ident = describe_extraction(settings, task)
    run_id = f"{now_utc():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    started = now_utc()
    commit_sha = git_sha()
    spark = spark or start_spark(settings)
    warehouse = open_warehouse(output, settings.spark.delta_writer, {
        "notelake.run_id": run_id, "notelake.git_sha": commit_sha or "", "notelake.model": ident["model"],
        "notelake.adapter": ident["adapter"] or "", "notelake.prompt_version": ident["prompt_version"],
    }, spark=spark)

    history = previous_runs(warehouse, task.name, ident["fingerprint"])
    since = None
    if settings.input.updated_at_column and not full_refresh:
        since = max((r["watermark"] for r in history if r.get("watermark")), default=None)
    valid, rejected, passthrough = extract(spark, settings, source, since)
    done = done_notes(spark, warehouse.path("ledger"), ident["fingerprint"], full_refresh)
    summary = summarize_input(valid, rejected, done)
    selected = select(valid, done, limit).persist()
    n_selected = summary.new if limit is None else min(limit, summary.new)
    gone = source_deletes(spark, settings, source, warehouse.path("ledger"), task.name) \
        if settings.job.propagate_deletes else []
    stats = RunStats(selected=n_selected, skipped=summary.valid - n_selected, rejected=len(summary.rejected_rows))
    log.info("run %s task=%s: %d valid notes%s, %d selected, %d unchanged, %d rejected%s",
             run_id, task.name, summary.valid, f" updated after {since:%Y-%m-%dT%H:%M:%S}Z" if since else "",
             stats.selected, stats.skipped, stats.rejected,
             f", {len(gone)} deleted at the source" if settings.job.propagate_deletes else "")
    if dry_run:
        est = selected.agg(F.sum(F.ceil(F.length("text") / task.max_chunk_chars)).alias("chunks")).collect()[0]
        chunks = int(est["chunks"] or 0)
        print(json.dumps({"run_id": run_id, "selected": stats.selected, "unchanged": stats.skipped,
                          "rejected": stats.rejected, "to_delete": len(gone),
                          "updated_after": since.isoformat() if since else None, "estimated_prompts": chunks,
                          "estimated_output_tokens": chunks * (settings.engine.max_tokens or task.max_tokens),
                          "estimated_seconds": estimate_seconds(history, stats.selected)}))
        selected.unpersist()
        return EXIT_OK

    run_row = {
        "run_id": run_id, "task": task.name, "fingerprint": ident["fingerprint"], "status": "running",
        "model": ident["model"], "adapter": ident["adapter"], "adapter_sha256": ident["adapter_sha256"],
        "prompt_version": ident["prompt_version"], "git_sha": commit_sha,
        "config_json": settings.model_dump_json(), "table_versions_json": "{}",
        "started_at": started, "ended_at": None, "watermark": None, **{k: 0 for k in RunStats.COUNTS},
    }
    warehouse.upsert("runs", schemas.rows_to_table([run_row], schemas.RUNS_SCHEMA))
    try:
        warehouse.append("errors", schemas.rows_to_table(rejected_error_rows(summary.rejected_rows, run_id, task),
                                                         schemas.ERRORS_SCHEMA))
        if gone:
            warehouse.delete_notes(task.name, gone)
            stats.deleted = len(gone)
        finished = not stats.selected or \
            _extract_rounds(spark, settings, task, ident, selected, passthrough, warehouse, run_id, stats)
    except OutputWriteError:
        run_row.update(status="failed", ended_at=now_utc())
        with contextlib.suppress(OutputWriteError):  # best effort: the runs table may be unwritable too
            warehouse.upsert("runs", schemas.rows_to_table([run_row], schemas.RUNS_SCHEMA))
        raise
    finally:
        selected.unpersist()

    failed_run = stats.error_rate > settings.job.max_error_rate
    # The watermark moves past what was read only when every selected note was extracted (no --limit cut, no
    # --max-runtime stop): otherwise the next run reads the same window again (the ledger skips what is done).
    complete = finished and n_selected == summary.new
    run_row.update(status="failed" if failed_run else "succeeded", ended_at=now_utc(),
                   watermark=(summary.watermark or since) if complete else since,
                   **{k: getattr(stats, k) for k in RunStats.COUNTS})
    run_row["table_versions_json"] = json.dumps(warehouse.versions())
    warehouse.upsert("runs", schemas.rows_to_table([run_row], schemas.RUNS_SCHEMA))
    log.info("run %s %s: %d succeeded, %d failed, %d rejected, error rate %.3f (max %.3f)",
             run_id, run_row["status"], stats.succeeded, stats.failed, stats.rejected, stats.error_rate,
             settings.job.max_error_rate)
    if failed_run:
        log.error("error rate %.3f exceeds job.max_error_rate %.3f", stats.error_rate, settings.job.max_error_rate)
        return EXIT_ERROR_RATE
    return EXIT_OK


def _extract_rounds(spark, settings, task, ident, selected, passthrough, warehouse, run_id, stats) -> bool:
    """Extract and commit ``selected`` round by round; False when ``job.max_runtime_s`` stopped it early."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import to_arrow_type

    from notelake.models.actor import EnginePool, ensure_ray

    gcs_address = ensure_ray(settings.ray)
    pool = EnginePool.get_or_create(settings)
    pool.ready()
    lineage = {"run_id": run_id, "model": ident["model"], "adapter": ident["adapter"],
               "adapter_sha256": ident["adapter_sha256"], "prompt_version": ident["prompt_version"],
               "fingerprint": ident["fingerprint"]}
    passthrough_schema = pa.schema([(c, to_arrow_type(selected.schema[c].dataType)) for c in passthrough])
    n_rounds = max(1, math.ceil(stats.selected / settings.job.round_notes))
    partitions = settings.ray.num_actors * settings.ray.max_in_flight
    staging_root = Path(warehouse.root) / "_staging" / run_id
    done, t0 = 0, time.monotonic()
    limit_s = settings.job.max_runtime_s
    for round_index in range(n_rounds):
        if limit_s is not None and round_index and time.monotonic() - t0 > limit_s:
            log.warning("job.max_runtime_s %.0f reached after %d/%d rounds: %d notes left for the next run",
                        limit_s, round_index, n_rounds, stats.selected - done)
            shutil.rmtree(staging_root, ignore_errors=True)
            return False
        staging = staging_root / f"round-{round_index:05d}"
        ctx = RunContext(run_id=run_id, task_def=task.model_dump(mode="json"), settings=settings.model_dump(mode="json"),
            gcs_address=gcs_address, staging_dir=str(staging), passthrough=tuple(passthrough), lineage=lineage)
        part = selected.where(F.pmod(F.xxhash64("note_id"), F.lit(n_rounds)) == round_index) if n_rounds > 1 \
            else selected
        summary = transform(part, ctx, partitions).persist()
        totals = summary.agg(
            F.count(F.lit(1)).alias("notes"),
            F.sum((F.col("status") == "succeeded").cast("int")).alias("succeeded"),
            F.sum((F.col("status") == "failed").cast("int")).alias("failed"),
            F.sum("tokens_in").alias("tokens_in"), F.sum("tokens_out").alias("tokens_out"),
        ).collect()[0]
        note_ids = [r["note_id"] for r in summary.select("note_id").collect()]
        summary.unpersist()
        load(warehouse, staging, task, note_ids, passthrough_schema)
        shutil.rmtree(staging, ignore_errors=True)
        stats.add(totals)
        done += totals["notes"]
        elapsed = time.monotonic() - t0
        rate = done / elapsed if elapsed else 0.0
        eta = (stats.selected - done) / rate if rate else float("nan")
        log.info("round %d/%d: %d/%d notes, %.2f notes/s, %.1f output tok/s, %d failed, ETA %.0fs",
                 round_index + 1, n_rounds, done, stats.selected, rate, stats.tokens_out / max(elapsed, 1e-9),
                 stats.failed, eta)
    shutil.rmtree(staging_root, ignore_errors=True)
    return True


def main(argv: list[str] | None = None) -> int:
    # Our progress at INFO; libraries at WARNING (py4j logs benign socket resets at INFO through the root logger
    # when Ray's processes close inherited driver connections).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("notelake").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    from notelake.jobs.guards import LockedError
    from notelake.jobs.warehouse import OutputWriteError

    settings = None
    try:
        settings = _resolve_settings(args)
        return run(settings, args.input, args.output, limit=args.limit, full_refresh=args.full_refresh,
                   dry_run=args.dry_run)
    except (ConfigError, InputError) as exc:
        log.error("%s", exc)
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
