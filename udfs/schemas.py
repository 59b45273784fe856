"""Arrow schemas of every output table, defined once (job, evaluation harness and tests import them).

Tables: ``concepts`` and ``relations`` (one row per extracted fact, with lineage), ``errors`` (one row per
rejected input row or failed chunk; never note text or model output), ``ledger`` (one current row per note and
task: the state the nightly selection compares against), ``runs`` (one row per run).

``note_bucket`` (a hash of the note id modulo the output's bucket count, jobs/warehouse.py) partitions concepts,
relations and the ledger with ``task``, so a round of notes touches only its buckets' files.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

LINEAGE_FIELDS: list[pa.Field] = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("adapter", pa.string(), nullable=True),
    pa.field("adapter_sha256", pa.string(), nullable=True),
    pa.field("prompt_version", pa.string(), nullable=False),
    pa.field("fingerprint", pa.string(), nullable=False),
    pa.field("text_sha256", pa.string(), nullable=False),
    pa.field("extracted_at", TIMESTAMP, nullable=False),
]
LINEAGE_COLUMNS: tuple[str, ...] = tuple(f.name for f in LINEAGE_FIELDS)

SPAN_TYPE = pa.struct([pa.field("start", pa.int64(), nullable=False), pa.field("end", pa.int64(), nullable=False)])

_CONCEPT_FIELDS: list[pa.Field] = [
    pa.field("note_id", pa.string(), nullable=False),
    pa.field("concept_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("note_bucket", pa.int32(), nullable=True),
    pa.field("label", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("start", pa.int64(), nullable=True),
    pa.field("end", pa.int64(), nullable=True),
    pa.field("spans", pa.list_(SPAN_TYPE), nullable=True),
    pa.field("assertion", pa.string(), nullable=False),
    pa.field("grounded", pa.bool_(), nullable=False),
    pa.field("grounding_method", pa.string(), nullable=False),
    pa.field("grounding_score", pa.float64(), nullable=False),
    pa.field("chunk_index", pa.int32(), nullable=False),
]

_RELATION_FIELDS: list[pa.Field] = [
    pa.field("note_id", pa.string(), nullable=False),
    pa.field("relation_id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("note_bucket", pa.int32(), nullable=True),
    pa.field("label", pa.string(), nullable=False),
    pa.field("head_concept_id", pa.string(), nullable=False),
    pa.field("tail_concept_id", pa.string(), nullable=False),
    pa.field("head_label", pa.string(), nullable=False),
    pa.field("head_text", pa.string(), nullable=False),
    pa.field("tail_label", pa.string(), nullable=False),
    pa.field("tail_text", pa.string(), nullable=False),
    pa.field("chunk_index", pa.int32(), nullable=False),
]


def _with_passthrough(fields: list[pa.Field], passthrough: pa.Schema | None) -> pa.Schema:
    fields = list(fields) + list(LINEAGE_FIELDS)
    if passthrough is not None:
        taken = {f.name for f in fields}
        for f in passthrough:
            if f.name in taken:
                raise ValueError(f"passthrough column {f.name!r} collides with an output column")
            taken.add(f.name)
            fields.append(f)
    return pa.schema(fields)


def concepts_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """Schema of the concepts table; ``passthrough`` fields (patient_id, note_date, ...) are appended."""
    return _with_passthrough(_CONCEPT_FIELDS, passthrough)


def relations_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """Schema of the relations table; ``passthrough`` fields are appended."""
    return _with_passthrough(_RELATION_FIELDS, passthrough)


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("note_id", pa.string(), nullable=True),
        pa.field("task", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("chunk_index", pa.int32(), nullable=True),
        pa.field("text_sha256", pa.string(), nullable=True),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("created_at", TIMESTAMP, nullable=False),
    ]
)

#: How a concept row was linked (jobs/linking/), in the linker's order: ``exact`` (normalized name or synonym of a
#: valid standard concept), ``maps_to`` (of a non-standard concept, through a valid 'Maps to'), ``fuzzy`` (similar
#: enough, and clearly more than to any other concept), ``ambiguous`` (several concepts fit equally: concept 0),
#: ``none`` (nothing fits: concept 0), ``unmapped_label`` (the task names no vocabulary target for the label).
MATCH_TYPES = ("exact", "maps_to", "fuzzy", "ambiguous", "none", "unmapped_label")
CONCEPT_LINKS_SCHEMA = pa.schema(
    [
        pa.field("concept_id", pa.string(), nullable=False),  # the concepts row (its key)
        pa.field("note_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("note_bucket", pa.int32(), nullable=True),  # as in concepts (partition column)
        pa.field("label", pa.string(), nullable=False),
        pa.field("omop_concept_id", pa.int32(), nullable=False),  # a valid standard concept; 0 = no matching concept
        pa.field("source_concept_id", pa.int32(), nullable=False),  # the concept matched (non-standard for maps_to)
        pa.field("vocabulary_id", pa.string(), nullable=True),  # of omop_concept_id; null when it is 0
        pa.field("domain_id", pa.string(), nullable=True),
        pa.field("match_type", pa.string(), nullable=False),  # MATCH_TYPES
        pa.field("match_score", pa.float64(), nullable=False),  # 1 for exact and maps_to; similarity 0..1 otherwise
        pa.field("link_fingerprint", pa.string(), nullable=False),
        pa.field("vocabulary_version", pa.string(), nullable=False),  # the vocabulary release linked against
        pa.field("linked_at", TIMESTAMP, nullable=False),
    ]
)

LEDGER_STATUSES = ("succeeded", "failed", "rejected")
LEDGER_SCHEMA = pa.schema(
    [
        pa.field("note_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("note_bucket", pa.int32(), nullable=False),
        pa.field("text_sha256", pa.string(), nullable=False),  # "" for a rejected row without text
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("passthrough_sha256", pa.string(), nullable=True),  # pass-through values the rows carry
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # LEDGER_STATUSES
        pa.field("attempts", pa.int32(), nullable=False),  # extraction attempts of this text and fingerprint
        pa.field("has_output", pa.bool_(), nullable=False),  # concepts/relations rows exist for the note
        pa.field("error_type", pa.string(), nullable=True),  # why it was rejected
        pa.field("n_chunks", pa.int32(), nullable=False),
        pa.field("n_concepts", pa.int32(), nullable=False),
        pa.field("n_relations", pa.int32(), nullable=False),
        # parser figures of the last attempt (answer quality per note, kept in the job's output)
        pa.field("n_warnings", pa.int32(), nullable=False),
        pa.field("n_ungrounded", pa.int32(), nullable=False),
        pa.field("n_dropped_relations", pa.int32(), nullable=False),
        pa.field("n_truncated_chunks", pa.int32(), nullable=False),
        pa.field("processed_at", TIMESTAMP, nullable=False),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("fingerprint", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("adapter", pa.string(), nullable=True),
        pa.field("adapter_sha256", pa.string(), nullable=True),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("git_sha", pa.string(), nullable=True),
        pa.field("config_json", pa.string(), nullable=False),
        pa.field("table_versions_json", pa.string(), nullable=False),
        pa.field("started_at", TIMESTAMP, nullable=False),
        pa.field("ended_at", TIMESTAMP, nullable=True),  # null while the run is in progress
        pa.field("selected", pa.int64(), nullable=False),
        pa.field("succeeded", pa.int64(), nullable=False),
        pa.field("failed", pa.int64(), nullable=False),
        pa.field("skipped", pa.int64(), nullable=False),
        pa.field("rejected", pa.int64(), nullable=False),
        pa.field("tokens_in", pa.int64(), nullable=False),
        pa.field("tokens_out", pa.int64(), nullable=False),
        # added in schema 2 (nullable: older runs tables gain them on the next write)
        pa.field("deleted", pa.int64(), nullable=True),      # notes removed because the source deleted them
        pa.field("watermark", TIMESTAMP, nullable=True),     # input.updated_at_column high-water mark read
        # added in schema 3
        pa.field("retried", pa.int64(), nullable=True),      # selected notes whose earlier attempt failed
        pa.field("given_up", pa.int64(), nullable=True),     # failed notes past job.max_attempts (not selected)
        pa.field("refreshed", pa.int64(), nullable=True),    # notes whose pass-through columns were updated
        pa.field("stale_removed", pa.int64(), nullable=True),  # rejected notes whose earlier rows were removed
        pa.field("rounds_json", pa.string(), nullable=True),  # per round: notes, seconds, commit seconds
        pa.field("omop_json", pa.string(), nullable=True),  # the pass's link and OMOP publish stats (counts, ids)
        pa.field("no_concept", pa.int64(), nullable=True),        # succeeded notes that got no concept
        pa.field("windows_no_prose", pa.int64(), nullable=True),  # windows answered without a model call
        pa.field("windows_split", pa.int64(), nullable=True),     # cut windows extracted again in smaller pieces
        pa.field("warnings_json", pa.string(), nullable=True),    # what the run warned of (JSON list), else null
        pa.field("source_version", pa.int64(), nullable=True),    # the Delta input's version read (delta_version)
        pa.field("retry_failed", pa.int64(), nullable=True),   # of failed: retries of known failures (not new ones)
        pa.field("engine_errors", pa.int64(), nullable=True),  # notes the engines failed: left for the next run
        pa.field("extractors_json", pa.string(), nullable=True),  # concepts / relations by method, figures compared
    ]
)
RUN_STATUSES = ("running", "succeeded", "failed", "abandoned")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def error_row(  # keyword-only, one per column of the errors table
    *,
    run_id: str,
    task: str,
    stage: str,
    error_type: str,
    message: str,
    note_id: str | None = None,
    chunk_index: int | None = None,
    text_sha256: str | None = None,
    attempt: int = 1,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """One row of the errors table. ``message`` must carry no note text and no model output (PHI)."""
    return {
        "run_id": run_id,
        "note_id": note_id,
        "task": task,
        "stage": stage,
        "error_type": error_type,
        "message": message,
        "chunk_index": chunk_index,
        "text_sha256": text_sha256,
        "attempt": attempt,
        "created_at": created_at or utc_now(),
    }


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts with exactly the schema's columns) -> an Arrow table of that schema.

    Raises ValueError naming the column when a row lacks a column, carries an extra one, or holds a null in
    a non-nullable column (instead of writing a silently wrong table).
    """
    names = schema.names
    expected = set(names)
    required = [f.name for f in schema if not f.nullable]
    for i, row in enumerate(rows):
        keys = row.keys()
        if keys != expected:
            missing = sorted(expected - set(keys))
            extra = sorted(set(keys) - expected)
            raise ValueError(f"row {i}: missing columns {missing}, unexpected columns {extra}")
        for name in required:
            if row[name] is None:
                raise ValueError(f"row {i}: column {name!r} is not nullable but is null")
    return pa.Table.from_pylist(rows, schema=schema)
