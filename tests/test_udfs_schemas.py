from datetime import datetime, timezone

import pyarrow as pa
import pytest

from notelake.udfs.schemas import (
    ERRORS_SCHEMA,
    LEDGER_SCHEMA,
    LINEAGE_FIELDS,
    RUNS_SCHEMA,
    concepts_schema,
    error_row,
    relations_schema,
    rows_to_table,
)

UTC_US = pa.timestamp("us", tz="UTC")


def test_lineage_fields():
    names = [f.name for f in LINEAGE_FIELDS]
    assert names == ["run_id", "model", "adapter", "adapter_sha256", "prompt_version", "fingerprint", "text_sha256", "extracted_at"]
    assert LINEAGE_FIELDS[-1].type == UTC_US
    assert [f.name for f in LINEAGE_FIELDS if f.nullable] == ["adapter", "adapter_sha256"]


def test_concepts_and_relations_schemas():
    cs = concepts_schema()
    assert cs.names[:14] == ["note_id", "concept_id", "task", "note_bucket", "label", "text", "start", "end", "spans",
                             "assertion", "grounded", "grounding_method", "grounding_score", "chunk_index"]
    spans = cs.field("spans")
    assert spans.nullable and pa.types.is_list(spans.type)
    assert [(f.name, f.type) for f in spans.type.value_type] == [("start", pa.int64()), ("end", pa.int64())]
    assert cs.field("chunk_index").type == pa.int32() and cs.field("start").nullable
    rs = relations_schema(pa.schema([("patient_id", pa.string())]))
    assert rs.names[-1] == "patient_id" and "relation_id" in rs.names and rs.field("chunk_index").type == pa.int32()
    with pytest.raises(ValueError):
        concepts_schema(pa.schema([("label", pa.string())]))


def test_errors_ledger_runs_round_trip():
    now = datetime.now(timezone.utc)
    row = error_row(run_id="r", task="phee", stage="input", error_type="duplicate_note_id", message="2 rows", note_id="n1")
    t = rows_to_table([row, error_row(run_id="r", task="phee", stage="input", error_type="empty_text", message="0 chars")],
                      ERRORS_SCHEMA)
    assert t.schema == ERRORS_SCHEMA and t.column("attempt").to_pylist() == [1, 1]
    assert t.column("note_id").to_pylist() == ["n1", None]
    ledger = {"note_id": "n1", "task": "phee", "note_bucket": 7, "text_sha256": "s", "fingerprint": "f",
              "passthrough_sha256": None, "run_id": "r", "status": "succeeded", "attempts": 1, "has_output": True,
              "error_type": None, "n_chunks": 1, "n_concepts": 3, "n_relations": 2, "n_warnings": 0, "n_ungrounded": 1,
              "n_dropped_relations": 0, "n_truncated_chunks": 0, "processed_at": now}
    assert rows_to_table([ledger], LEDGER_SCHEMA).num_rows == 1
    run = {"run_id": "r", "task": "phee", "fingerprint": "f", "status": "succeeded", "model": "m", "adapter": None,
           "adapter_sha256": None, "prompt_version": "p", "git_sha": None, "config_json": "{}", "table_versions_json": "{}",
           "started_at": now, "ended_at": now, "selected": 1, "succeeded": 1, "failed": 0, "skipped": 0, "rejected": 0,
           "tokens_in": 10, "tokens_out": 5, "deleted": 0, "watermark": None, "retried": 0, "given_up": 0,
           "refreshed": 0, "stale_removed": 0, "rounds_json": None, "omop_json": None,
           "no_concept": 0, "windows_no_prose": 0, "windows_split": 0, "warnings_json": None,
           "source_version": None, "retry_failed": 0, "engine_errors": 0,
           "extractors_json": None}
    assert rows_to_table([run], RUNS_SCHEMA).column("ended_at").type == UTC_US


def test_rows_to_table_rejects_wrong_columns_and_nulls():
    row = error_row(run_id="r", task="phee", stage="s", error_type="e", message="m")
    with pytest.raises(ValueError, match="missing"):
        rows_to_table([{k: v for k, v in row.items() if k != "stage"}], ERRORS_SCHEMA)
    with pytest.raises(ValueError, match="unexpected"):
        rows_to_table([{**row, "extra": 1}], ERRORS_SCHEMA)
    with pytest.raises(ValueError, match="not nullable"):
        rows_to_table([{**row, "task": None}], ERRORS_SCHEMA)
    assert rows_to_table([], ERRORS_SCHEMA).num_rows == 0
