"""Read the note table and check it: every row becomes a valid note or a rejected row with a reason.

The table is Delta (its current snapshot), Parquet, JSONL or a catalog table; its columns are checked before any
work starts (:class:`InputError`), the text is hashed on the executors (Spark ``sha2``) and nothing is collected on
the driver. A :class:`ReadWindow` cuts the read to the rows that may have changed since the last complete run
(``input.updated_at_column`` at or after its high-water mark less a lookback, or, with ``input.watermark:
delta_version``, the notes the Delta input's change data feed names), plus the notes a task retries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from notelake.conf import InputConfig, Settings
from notelake.conf.settings import DEFAULT_PASSTHROUGH
from notelake.jobs import storage

WATERMARK = "source_updated_at"  # input.updated_at_column as a timestamp, carried to the watermark aggregate
#: the change data feed's row kinds that leave a note in the table as it is now
CHANGED_ROWS = ("insert", "update_postimage")

log = logging.getLogger("notelake.extract")


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


def read_notes(spark, source: str, settings: Settings, version: int | None = None):
    """Read the note table as a Spark DataFrame (Delta through its current snapshot, or ``version``). On an object
    store the ``notelake_table`` data source reads Delta and Parquet (Spark has no object-store connector here)."""
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
        notes = read_snapshot_spark(spark, source, opts, version=version)
        if notes is None:
            raise InputError(f"{source} is not a Delta table")
        return notes
    return storage.read_parquet(spark, source, opts)


def read_note_ids(spark, settings: Settings, source: str, version: int | None = None):
    """The input's note ids (one scan of its id column), for ``--propagate-deletes``: at ``version``, the one the
    notes were read at (``input.watermark: delta_version``), so that a note deleted after it is not taken as gone
    before the run has read what replaced it."""
    from pyspark.sql import functions as F

    return read_notes(spark, source, settings, version).select(
        F.col(settings.input.note_id_column).cast("string").alias("note_id")).where(
        F.col("note_id").isNotNull()).distinct()


@dataclass(frozen=True)
class ReadWindow:
    """Which rows one read of the input takes; the default, every row."""

    since: datetime | None = None  # input.watermark column: the high-water mark (the lookback is taken off here)
    since_version: int | None = None  # input.watermark delta_version: the input version the last complete run read
    retry: object = None  # note_id DataFrame (Spark): failed notes to attempt again, wherever the window is


@dataclass(frozen=True)
class CheckedInput:
    """The note table read and checked once: every row with its ``error_type`` (null when valid). Persist
    ``rows`` and both views read that one copy: the input is scanned, deduplicated and hashed once."""

    rows: object  # Spark DataFrame
    passthrough: tuple[str, ...]
    tail: tuple[str, ...]  # (WATERMARK,) with input.updated_at_column
    version: int | None = None  # the Delta input's version read (input.watermark delta_version)

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


def read_input(spark, settings: Settings, source: str, window: ReadWindow = ReadWindow()) -> CheckedInput:
    """Read and check the note table (lazily: nothing runs until an action), cut to ``window``.

    Valid notes: note_id, text, text_sha256, text_chars, passthrough...; rejected rows: note_id, text_sha256,
    error_type, message; both also carry ``source_updated_at`` with ``input.updated_at_column``. Rows whose
    updated_at is null are always read (they cannot be placed before a watermark). With ``input.watermark:
    delta_version`` the input is read at one version, returned as ``version``.
    """
    from pyspark.sql import functions as F

    cfg = settings.input
    version = input_version(spark, source, settings) if cfg.watermark == "delta_version" else None
    df = read_notes(spark, source, settings, version)
    missing = [c for c in (cfg.note_id_column, cfg.text_column) if c not in df.columns]
    if missing:
        raise InputError(f"input {source} lacks column(s) {missing}; it has {df.columns} "
                         f"(set input.note_id_column / input.text_column in the conf)")
    passthrough = passthrough_columns(cfg, df.columns, source)
    watermark = []
    if cfg.updated_at_column:
        df = _updated_since(df, cfg, window.since, window.retry)
        watermark = [F.col(cfg.updated_at_column).cast("timestamp").alias(WATERMARK)]
    elif version is not None:
        df = _changed_since(df, cfg, _ChangeFeed(spark, source, storage.settings_options(settings)), version, window)
    text_type = df.schema[cfg.text_column].dataType
    text, type_error = _text_as_string(text_type, F.col(cfg.text_column))
    notes = df.select(F.col(cfg.note_id_column).cast("string").alias("note_id"), text.alias("text"),
                      type_error.alias("type_error"), *[F.col(c) for c in passthrough], *watermark)
    checked = notes.withColumn("error_type", _rejection_reason(cfg)) \
        .withColumn("text_sha256", F.sha2(F.col("text"), 256)).withColumn("text_chars", F.length("text"))
    messages = rejection_messages(cfg, text_type.simpleString())
    message = F.create_map(*[F.lit(x) for kv in messages.items() for x in kv])[F.col("error_type")]
    return CheckedInput(rows=checked.withColumn("message", message).drop("type_error"), passthrough=passthrough,
                        tail=(WATERMARK,) if watermark else (), version=version)


def passthrough_columns(cfg: InputConfig, columns: list[str], source: str) -> tuple[str, ...]:
    """The pass-through columns of an input with ``columns``: every one input.passthrough_columns names
    (:class:`InputError` naming those the input lacks: a renamed upstream column would otherwise change every
    note's pass-through hash and refresh the whole warehouse), or, unset, the defaults the input has."""
    if cfg.passthrough_columns is None:
        return tuple(c for c in DEFAULT_PASSTHROUGH if c in columns)
    missing = [c for c in cfg.passthrough_columns if c not in columns]
    if missing:
        raise InputError(f"input {source} lacks the pass-through column(s) {missing} named in "
                         f"input.passthrough_columns; it has {columns} (fix the conf, or the input)")
    return tuple(cfg.passthrough_columns)


def input_version(spark, source: str, settings: Settings) -> int:
    """The Delta input's current version (``input.watermark: delta_version``); InputError for any other input."""
    from deltalake import DeltaTable

    opts = storage.settings_options(settings)
    if _detect_format(spark, source, settings.input.format, opts) != "delta":
        raise InputError(f"input.watermark delta_version needs a Delta input; {source} is not one (set "
                         "input.watermark: column)")
    return DeltaTable(source, storage_options=opts).version()


def _updated_since(df, cfg: InputConfig, since: datetime | None, retry):
    """``df`` cut to the rows updated at or after ``since`` less ``input.watermark_lookback_s`` (a date column:
    from that day on), the rows with no update time, and the notes of ``retry``. At or after, not after: a row
    stamped with the mark itself may have been committed after the run that set it."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import DateType

    if cfg.updated_at_column not in df.columns:
        raise InputError(f"input lacks the watermark column {cfg.updated_at_column!r}")
    if since is None:
        return df
    start = since - timedelta(seconds=cfg.watermark_lookback_s)
    column = F.col(cfg.updated_at_column)
    if isinstance(df.schema[cfg.updated_at_column].dataType, DateType):
        # a date says nothing about the hour: every note of the mark's day may have been edited after the run
        keep = column.isNull() | (column >= F.lit(start.date()))
    else:
        updated = column.cast("timestamp")
        keep = updated.isNull() | (updated >= F.lit(start))
    if retry is not None:
        flagged = retry.select(F.col("note_id").alias("_retry_id"), F.lit(True).alias("_retry"))
        df = df.join(flagged, F.col(cfg.note_id_column).cast("string") == F.col("_retry_id"), "left")
        keep = keep | F.col("_retry").isNotNull()
    return df.where(keep)


@dataclass(frozen=True)
class _ChangeFeed:
    """A Delta input's change data feed, read with delta-rs (note ids only)."""

    spark: object
    source: str
    opts: dict[str, str]

    def changed_ids(self, since: int, version: int, id_column: str):
        """The ids (Spark, ``note_id``) of the notes inserted or updated after version ``since`` up to
        ``version``, or None when the feed cannot say: it was off at either version (a commit made while it was
        off has no change files) or is unreadable (log or change files vacuumed)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        from deltalake import DeltaTable
        from deltalake.exceptions import DeltaError

        try:
            if not all(_feed_enabled(DeltaTable(self.source, version=v, storage_options=self.opts))
                       for v in (since, version)):
                log.info("input change data feed off between versions %d and %d: reading every note (the ledger "
                         "skips the unchanged)", since, version)
                return None
            reader = DeltaTable(self.source, storage_options=self.opts).load_cdf(
                starting_version=since + 1, ending_version=version, columns=[id_column, "_change_type"])
            changes = pa.table(pa.RecordBatchReader.from_stream(reader))
        except (DeltaError, OSError, ValueError) as exc:
            log.warning("input change data feed unreadable between versions %d and %d (%s): reading every note",
                        since, version, type(exc).__name__)
            return None
        # delta-rs hands strings over as string_view, which is_in and take have no kernels for
        kinds, note_ids = (pc.cast(changes[name], pa.string()) for name in ("_change_type", id_column))
        ids = pa.table({"note_id": note_ids.filter(pc.is_in(kinds, pa.array(CHANGED_ROWS)))})
        log.info("input change data feed: %d changed note row(s) between versions %d and %d", ids.num_rows, since,
                 version)
        return self.spark.createDataFrame(ids) if ids.num_rows else self.spark.createDataFrame([], "note_id string")


def _feed_enabled(table) -> bool:
    return table.metadata().configuration.get("delta.enableChangeDataFeed", "").lower() == "true"


def _changed_since(df, cfg: InputConfig, feed: _ChangeFeed, version: int, window: ReadWindow):
    """``df`` (the input at ``version``) cut to the notes changed since ``window.since_version`` and those of
    ``window.retry``: only the retries when the version did not move; every row on a first run, when the version
    went back (the table was replaced) or when the change data feed cannot say."""
    from functools import reduce

    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    since = window.since_version
    if since is None or since > version:
        return df
    changed = feed.changed_ids(since, version, cfg.note_id_column) if since < version else None
    if since < version and changed is None:
        return df
    wanted = [ids.select("note_id") for ids in (changed, window.retry) if ids is not None]
    if not wanted:
        return df.where(F.lit(False))
    ids = reduce(DataFrame.unionByName, wanted).distinct().withColumnRenamed("note_id", "_wanted_id")
    return df.join(ids, F.col(cfg.note_id_column).cast("string") == F.col("_wanted_id"), "left_semi")


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
