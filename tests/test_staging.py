"""Staged files of a round (jobs/extraction/staging.py, commit.py): only the attempts Spark kept are read, and a
round whose kept rows still name a note twice is refused before anything is committed. No Spark: the files are
written as the executors write them."""

from __future__ import annotations

import pyarrow as pa
import pytest

from notelake.jobs import storage
from notelake.jobs.extraction.commit import commit_round, ledger_row
from notelake.jobs.extraction.identity import Lineage
from notelake.jobs.extraction.staging import DuplicateStagedRowsError, staged_file_name
from notelake.jobs.warehouse import OutputWriteError, open_warehouse, read_delta_arrow
from notelake.udfs import schemas
from notelake.udfs.assemble import NoteResult

LINEAGE = Lineage(run_id="run-1", model="m", adapter=None, adapter_sha256=None, prompt_version="p", fingerprint="f")


def stage_ledger(staging: str, tag: str, note_ids: list[str]) -> None:
    """The ledger file an executor's task attempt ``tag`` stages for ``note_ids`` (succeeded, no rows)."""
    now = schemas.utc_now()
    rows = [ledger_row(LINEAGE, "phee", {"note_id": n, "note_bucket": 1, "text_sha256": "s", "attempt": 1,
                                         "passthrough_sha256": None, "has_output": False}, "succeeded",
                       NoteResult(), now) for n in note_ids]
    storage.write_parquet(schemas.rows_to_table(rows, schemas.LEDGER_SCHEMA),
                          storage.join(staging, "ledger", staged_file_name(tag, 0)))


def outcome(note_id: str, tag: str) -> dict:
    return {"note_id": note_id, "task": "phee", "status": "succeeded", "attempt_tag": tag, "note_bucket": 1,
            "has_output_before": False, "in_ledger": False}


@pytest.mark.parametrize("case", ["two kept attempts staged one note", "one attempt staged a note twice"])
def test_a_round_whose_staged_rows_hold_a_note_twice_is_refused_and_nothing_is_committed(tmp_path, case):
    staging = str(tmp_path / "round-00000")
    if case == "two kept attempts staged one note":
        # a stage resubmitted after a lost executor: the old and new attempt both reported n2
        stage_ledger(staging, "s3-p0-t11", ["n1", "n2"])
        stage_ledger(staging, "s5-p0-t17", ["n2"])
        outcomes = [outcome("n1", "s3-p0-t11"), outcome("n2", "s3-p0-t11"), outcome("n2", "s5-p0-t17")]
    else:
        stage_ledger(staging, "s3-p0-t11", ["n1", "n1"])
        outcomes = [outcome("n1", "s3-p0-t11")]
    warehouse = open_warehouse(tmp_path / "wh", {})
    with pytest.raises(DuplicateStagedRowsError, match=r"1 note\(s\) twice \(phee/n[12]\)") as refused:
        commit_round(warehouse, staging, outcomes, pa.schema([]))
    assert isinstance(refused.value, OutputWriteError)  # exit 4, the runs marked failed, the ledger not advanced
    assert warehouse.versions() == {name: None for name in ("concepts", "relations", "errors", "runs", "ledger")}


def test_files_of_attempts_spark_discarded_are_not_committed(tmp_path):
    """A failed attempt's file is left behind (a lost executor): only the kept attempt's rows are committed, once."""
    staging = str(tmp_path / "round-00000")
    stage_ledger(staging, "s3-p0-t11", ["n1", "n2"])  # the lost attempt
    stage_ledger(staging, "s3-p0-t12", ["n1", "n2"])  # its retry, which Spark kept
    warehouse = open_warehouse(tmp_path / "wh", {})
    commit_round(warehouse, staging, [outcome("n1", "s3-p0-t12"), outcome("n2", "s3-p0-t12")], pa.schema([]))
    assert sorted(read_delta_arrow(warehouse.path("ledger"))["note_id"].to_pylist()) == ["n1", "n2"]
