"""Read the note table and check it: every row becomes a valid note or a rejected row with a reason.

The table is Delta (its current snapshot), Parquet, JSONL or a catalog table; its columns are checked before any
work starts (:class:`InputError`), the text is hashed on the executors (Spark ``sha2``) and nothing is collected on
the driver. With ``input.updated_at_column`` only the rows updated after a watermark are read, plus the notes a
task retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from notelake.conf import InputConfig, Settings
from notelake.jobs import storage

WATERMARK = "source_updated_at"  # input.updated_at_column as a timestamp, carried to the watermark aggregate


class InputError(ValueError):
    """The input table cannot be used (missing column, unreadable path): raised before any work starts."""


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


def read_note_ids(spark, settings: Settings, source: str):
    """The input's note ids (one scan of its id column), for ``--propagate-deletes``."""
    from pyspark.sql import functions as F

    return read_notes(spark, source, settings).select(
        F.col(settings.input.note_id_column).cast("string").alias("note_id")).where(
        F.col("note_id").isNotNull()).distinct()


@dataclass(frozen=True)
class CheckedInput:
    """The note table read and checked once: every row with its ``error_type`` (null when valid). Persist
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


def read_input(spark, settings: Settings, source: str, since: datetime | None = None, retry=None) -> CheckedInput:
    """Read and check the note table (lazily: nothing runs until an action).

    Valid notes: note_id, text, text_sha256, text_chars, passthrough...; rejected rows: note_id, text_sha256,
    error_type, message; both also carry ``source_updated_at`` with ``input.updated_at_column``. ``since``: only
    rows updated after it (and rows whose updated_at is null: they cannot be placed before the watermark), plus the
    notes of ``retry`` (a note_id DataFrame: failed notes to attempt again, wherever the watermark is).
    """
    from pyspark.sql import functions as F

    cfg = settings.input
    df = read_notes(spark, source, settings)
    missing = [c for c in (cfg.note_id_column, cfg.text_column) if c not in df.columns]
    if missing:
        raise InputError(f"input {source} lacks column(s) {missing}; it has {df.columns} "
                         f"(set input.note_id_column / input.text_column in the conf)")
    passthrough = tuple(c for c in cfg.passthrough_columns if c in df.columns)
    watermark = []
    if cfg.updated_at_column:
        df = _updated_after(df, cfg, since, retry)
        watermark = [F.col(cfg.updated_at_column).cast("timestamp").alias(WATERMARK)]
    text_type = df.schema[cfg.text_column].dataType
    text, type_error = _text_as_string(text_type, F.col(cfg.text_column))
    notes = df.select(F.col(cfg.note_id_column).cast("string").alias("note_id"), text.alias("text"),
                      type_error.alias("type_error"), *[F.col(c) for c in passthrough], *watermark)
    checked = notes.withColumn("error_type", _rejection_reason(cfg)) \
        .withColumn("text_sha256", F.sha2(F.col("text"), 256)).withColumn("text_chars", F.length("text"))
    messages = rejection_messages(cfg, text_type.simpleString())
    message = F.create_map(*[F.lit(x) for kv in messages.items() for x in kv])[F.col("error_type")]
    return CheckedInput(rows=checked.withColumn("message", message).drop("type_error"), passthrough=passthrough,
                        tail=(WATERMARK,) if watermark else ())


def _updated_after(df, cfg: InputConfig, since: datetime | None, retry):
    """``df`` cut to the rows updated after ``since`` (or with no update time) and the notes of ``retry``."""
    from pyspark.sql import functions as F

    if cfg.updated_at_column not in df.columns:
        raise InputError(f"input lacks the watermark column {cfg.updated_at_column!r}")
    if since is None:
        return df
    updated = F.col(cfg.updated_at_column).cast("timestamp")
    keep = updated.isNull() | (updated > F.lit(since))
    if retry is not None:
        flagged = retry.select(F.col("note_id").alias("_retry_id"), F.lit(True).alias("_retry"))
        df = df.join(flagged, F.col(cfg.note_id_column).cast("string") == F.col("_retry_id"), "left")
        keep = keep | F.col("_retry").isNotNull()
    return df.where(keep)


def _text_as_string(text_type, raw_text):
    """(the text column as a string, the reason it cannot be one or null): binary must be UTF-8, other types are
    rejected whole."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BinaryType, StringType

    if isinstance(text_type, BinaryType):
        valid_utf8 = F.is_valid_utf8(raw_text)
        return (F.when(valid_utf8, raw_text.cast("string")),
                F.when(raw_text.isNotNull() & ~valid_utf8, F.lit("invalid_utf8")))
    if isinstance(text_type, StringType):
        return raw_text, F.when(raw_text.isNotNull() & ~F.is_valid_utf8(raw_text), F.lit("invalid_utf8"))
    return F.lit(None).cast("string"), F.when(raw_text.isNotNull(), F.lit("non_string_text"))


def _rejection_reason(cfg: InputConfig):
    """The first rule a row breaks (null when it is a valid note); a duplicated id rejects every row with it."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    dup_count = F.count(F.lit(1)).over(Window.partitionBy("note_id"))
    return (
        F.when(F.col("note_id").isNull(), F.lit("null_note_id"))
        .when(F.col("type_error").isNotNull(), F.col("type_error"))
        .when(F.col("text").isNull(), F.lit("null_text"))
        .when(F.length(F.trim(F.regexp_replace("text", r"\s+", " "))) == 0, F.lit("empty_text"))
        .when(F.length("text") > cfg.max_text_chars, F.lit("text_too_long"))
        .when(dup_count > 1, F.lit("duplicate_note_id"))
    )


def rejection_messages(cfg: InputConfig, text_type: str) -> dict[str, str]:
    """The errors table's message per rejection reason (no note text)."""
    return {
        "null_note_id": "note id is null",
        "invalid_utf8": "text is not valid UTF-8",
        "non_string_text": f"text column has type {text_type}, expected string",
        "null_text": "text is null",
        "empty_text": "text is empty or whitespace only",
        "text_too_long": f"text longer than input.max_text_chars={cfg.max_text_chars}",
        "duplicate_note_id": "note id occurs more than once in the input; all its rows are rejected",
    }
