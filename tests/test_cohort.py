"""`notelake sql` reads one consistent set of table versions: those of the last finished run (jobs/cohort.py).

The tables are written through the job's own commit methods (Warehouse), run after run, the way the job records
its runs: rows first, the run's table versions when it ends, the runs row last.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa

from notelake.jobs.cohort import main, run_duckdb, run_spark
from notelake.jobs.warehouse import Warehouse
from notelake.udfs import schemas
from notelake.udfs.hashing import note_bucket

BUCKETS = 4
CONCEPTS = pa.schema([("note_id", pa.string()), ("concept_id", pa.string()), ("task", pa.string()),
                      ("note_bucket", pa.int32()), ("label", pa.string()), ("run_id", pa.string())])
ERRORS = pa.schema([("note_id", pa.string()), ("task", pa.string()), ("error_type", pa.string()),
                    ("run_id", pa.string())])
T0 = datetime(2026, 11, 1, 2, tzinfo=timezone.utc)
CONCEPTS_SQL = "select note_id, label from concepts order by note_id"


def concepts(run_id: str, *items: tuple[str, str]) -> pa.Table:
    return pa.Table.from_pylist([{"note_id": n, "concept_id": f"{n}-{label}", "task": "phee",
                                  "note_bucket": note_bucket(n, BUCKETS), "label": label, "run_id": run_id}
                                 for n, label in items], schema=CONCEPTS)


def record_run(wh: Warehouse, run_id: str, status: str, night: int, versions: dict | None = None) -> None:
    """The run's row as the job writes it: ``running`` at the start; at the end its status with the tables'
    versions (read after its last row commit, before this runs commit)."""
    row = {f.name: None for f in schemas.RUNS_SCHEMA}
    row.update(run_id=run_id, task="phee", fingerprint="f", status=status, model="m", prompt_version="p",
               config_json="{}", table_versions_json=json.dumps(versions if versions is not None else {}),
               started_at=T0 + timedelta(days=night),
               ended_at=None if status == "running" else T0 + timedelta(days=night, hours=1),
               **{k: 0 for k in ("selected", "succeeded", "failed", "skipped", "rejected", "tokens_in", "tokens_out")})
    wh.upsert("runs", schemas.rows_to_table([row], schemas.RUNS_SCHEMA))


def night_one(wh: Warehouse) -> None:
    """A run that finished: n1 and n2 extracted, one input error."""
    record_run(wh, "r1", "running", 1)
    wh.replace_notes("concepts", concepts("r1", ("n1", "Drug"), ("n2", "Drug")), "phee", ["n1", "n2"],
                     {note_bucket(n, BUCKETS) for n in ("n1", "n2")})
    wh.append("errors", pa.Table.from_pylist([{"note_id": "bad1", "task": "phee", "error_type": "empty_text",
                                               "run_id": "r1"}], schema=ERRORS))
    record_run(wh, "r1", "succeeded", 1, wh.versions())


def night_two_in_progress(wh: Warehouse) -> None:
    """A run whose first round is committed (n1 re-extracted, n3 new, one error) and whose second is not."""
    record_run(wh, "r2", "running", 2)
    wh.replace_notes("concepts", concepts("r2", ("n1", "Effect")), "phee", ["n1"], {note_bucket("n1", BUCKETS)})
    wh.append("concepts", concepts("r2", ("n3", "Drug")))
    wh.append("errors", pa.Table.from_pylist([{"note_id": "n4", "task": "phee", "error_type": "unparseable",
                                               "run_id": "r2"}], schema=ERRORS))


NIGHT_ONE = [{"note_id": "n1", "label": "Drug"}, {"note_id": "n2", "label": "Drug"}]
NIGHT_TWO = [{"note_id": "n1", "label": "Effect"}, {"note_id": "n2", "label": "Drug"}, {"note_id": "n3", "label": "Drug"}]


def test_a_run_in_progress_is_invisible_to_sql(tmp_path, capsys):
    wh = Warehouse(str(tmp_path), {})
    night_one(wh)
    night_two_in_progress(wh)

    assert run_duckdb(tmp_path, CONCEPTS_SQL).to_pylist() == NIGHT_ONE
    assert run_duckdb(tmp_path, "select note_id from errors").to_pylist() == [{"note_id": "bad1"}]
    # the runs table is the audit trail: read at its latest version, the run in progress shows
    assert run_duckdb(tmp_path, "select run_id, status from runs order by run_id").to_pylist() == [
        {"run_id": "r1", "status": "succeeded"}, {"run_id": "r2", "status": "running"}]
    assert run_duckdb(tmp_path, CONCEPTS_SQL, latest=True).to_pylist() == NIGHT_TWO

    assert main(["--output", str(tmp_path), "--query", CONCEPTS_SQL]) == 0
    shown = capsys.readouterr().out
    assert "Drug" in shown and "Effect" not in shown and "n3" not in shown
    assert main(["--output", str(tmp_path), "--query", CONCEPTS_SQL, "--latest"]) == 0
    shown = capsys.readouterr().out
    assert "Effect" in shown and "n3" in shown

    # the run ends (failed on the error rate after committing every round: its rows are whole): now visible
    record_run(wh, "r2", "failed", 2, wh.versions())
    assert run_duckdb(tmp_path, CONCEPTS_SQL).to_pylist() == NIGHT_TWO


def test_before_any_run_has_finished_the_tables_read_as_empty(tmp_path, capsys):
    """A first run in progress, and a run that stopped on a write error (no versions recorded): no finished run,
    so no rows -- the query still parses against the tables' schemas."""
    wh = Warehouse(str(tmp_path), {})
    record_run(wh, "r0", "failed", 0)  # a write error: its versions are never recorded
    night_two_in_progress(wh)
    assert run_duckdb(tmp_path, CONCEPTS_SQL).to_pylist() == []
    assert run_duckdb(tmp_path, "select count(*) as n from errors").to_pylist() == [{"n": 0}]
    assert main(["--output", str(tmp_path), "--query", CONCEPTS_SQL]) == 0
    assert "no run has finished on this output yet" in capsys.readouterr().err


def test_a_recorded_version_that_is_gone_is_a_clear_error(tmp_path, capsys):
    wh = Warehouse(str(tmp_path), {})
    night_one(wh)
    record_run(wh, "r9", "succeeded", 9, {"concepts": 99, "relations": None, "errors": 0})
    assert main(["--output", str(tmp_path), "--query", CONCEPTS_SQL]) == 2
    assert "version 99, recorded by the last finished run" in capsys.readouterr().err


def test_spark_sql_reads_the_same_versions(tmp_path, spark):
    wh = Warehouse(str(tmp_path), {})
    night_one(wh)
    night_two_in_progress(wh)

    def query(sql: str, latest: bool = False) -> list[dict]:
        return [r.asDict() for r in run_spark(spark, tmp_path, sql, latest=latest).collect()]

    assert query(CONCEPTS_SQL) == NIGHT_ONE
    assert query("select note_id from errors") == [{"note_id": "bad1"}]
    assert query(CONCEPTS_SQL, latest=True) == NIGHT_TWO
