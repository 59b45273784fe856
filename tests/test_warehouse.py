"""Delta write semantics of the output tables (deltalake, real tables in tmp)."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from notelake.jobs.warehouse import Warehouse, open_warehouse, read_delta_arrow
from notelake.udfs import schemas

SCHEMA = pa.schema([("note_id", pa.string()), ("concept_id", pa.string()), ("task", pa.string()),
                    ("label", pa.string())])


def rows(*items):
    return pa.Table.from_pylist([dict(zip(SCHEMA.names, i)) for i in items], schema=SCHEMA)


def snapshot(wh):
    return sorted(tuple(r.values()) for r in read_delta_arrow(wh.path("concepts")).to_pylist())


def test_replace_notes_is_scoped_to_batch_notes_and_task(tmp_path):
    wh = Warehouse(tmp_path, {"notelake.run_id": "r1"})
    wh.replace_notes("concepts", rows(("n1", "a", "phee", "Drug"), ("n1", "b", "phee", "Effect"),
                                      ("n2", "c", "phee", "Drug")), "phee", ["n1", "n2"])
    wh.replace_notes("concepts", rows(("n1", "x", "other", "drug")), "other", ["n1"])
    # n1 re-extracted for phee: "b" disappears, "d" appears; n2 and n1's other-task rows are untouched.
    wh.replace_notes("concepts", rows(("n1", "a", "phee", "Drug"), ("n1", "d", "phee", "Subject")), "phee", ["n1"])
    assert snapshot(wh) == sorted([("n1", "a", "phee", "Drug"), ("n1", "d", "phee", "Subject"),
                                   ("n2", "c", "phee", "Drug"), ("n1", "x", "other", "drug")])
    # A note whose new output is empty loses its old rows.
    wh.replace_notes("concepts", SCHEMA.empty_table(), "phee", ["n2"])
    assert ("n2", "c", "phee", "Drug") not in snapshot(wh)


def test_commits_carry_run_metadata(tmp_path):
    from deltalake import DeltaTable

    wh = Warehouse(tmp_path, {"notelake.run_id": "r42"})
    wh.replace_notes("concepts", rows(("n1", "a", "phee", "Drug")), "phee", ["n1"])
    wh.replace_notes("concepts", rows(("n1", "b", "phee", "Drug")), "phee", ["n1"])
    history = DeltaTable(wh.path("concepts")).history()
    assert all(h.get("notelake.run_id") == "r42" for h in history)
    assert history[0]["notelake.operation"] == "replace_notes"


def test_concurrent_writers_are_retried_not_corrupted(tmp_path):
    """Two writers committing rounds at once on one table: optimistic-concurrency conflicts are retried;
    the final table holds every row exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    def writer(name: str) -> None:
        wh = Warehouse(tmp_path, {"notelake.run_id": name})
        for i in range(6):
            note = f"{name}-n{i}"
            wh.replace_notes("concepts", rows((note, f"{note}-a", "phee", "Drug"), (note, f"{note}-b", "phee", "Effect")),
                             "phee", [note])

    Warehouse(tmp_path, {}).replace_notes("concepts", rows(("seed", "seed-a", "phee", "Drug")), "phee", ["seed"])
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(writer, ["w1", "w2"]))
    ids = [r[1] for r in snapshot(Warehouse(tmp_path, {}))]
    expected = ["seed-a"] + [f"w{w}-n{i}-{s}" for w in (1, 2) for i in range(6) for s in "ab"]
    assert sorted(ids) == sorted(expected)  # 0 missing, 0 duplicated


def test_unwritable_table_is_a_clear_write_error(tmp_path):
    import pytest

    from notelake.jobs.warehouse import OutputWriteError

    (tmp_path / "concepts").write_text("not a directory")  # any write below it fails, even for root
    with pytest.raises(OutputWriteError, match=r"cannot write table concepts at .*concepts"):
        Warehouse(tmp_path, {}).replace_notes("concepts", rows(("n1", "a", "phee", "Drug")), "phee", ["n1"])


def test_runs_table_of_an_older_release_gains_the_new_columns(tmp_path):
    """A runs table written before schema 2 (no deleted / watermark columns) takes the new rows."""
    old_schema = pa.schema([f for f in schemas.RUNS_SCHEMA if f.name not in ("deleted", "watermark")])
    wh = open_warehouse(tmp_path / "out", "deltalake", {"notelake.run_id": "r"})
    row = {f.name: None for f in schemas.RUNS_SCHEMA}
    row.update(run_id="old", task="phee", fingerprint="f", status="succeeded", model="m", prompt_version="p",
               config_json="{}", table_versions_json="{}", started_at=datetime(2026, 11, 1, tzinfo=timezone.utc),
               **{k: 0 for k in ("selected", "succeeded", "failed", "skipped", "rejected", "tokens_in", "tokens_out")})
    wh.upsert("runs", schemas.rows_to_table([{k: v for k, v in row.items() if k in old_schema.names}], old_schema))
    new = {**row, "run_id": "new", "deleted": 2, "watermark": datetime(2026, 11, 2, tzinfo=timezone.utc)}
    wh.upsert("runs", schemas.rows_to_table([new], schemas.RUNS_SCHEMA))
    runs = {r["run_id"]: r for r in read_delta_arrow(tmp_path / "out" / "runs").to_pylist()}
    assert (runs["old"]["deleted"], runs["old"]["watermark"]) == (None, None)
    assert (runs["new"]["deleted"], runs["new"]["watermark"]) == (2, datetime(2026, 11, 2, tzinfo=timezone.utc))


def test_delete_notes_is_scoped_to_task_and_ids(tmp_path):
    wh = Warehouse(tmp_path, {"notelake.run_id": "r1"})
    wh.replace_notes("concepts", rows(("n1", "a", "phee", "Drug"), ("n2", "b", "phee", "Drug"),
                                      ("it's", "c", "phee", "Drug")), "phee", ["n1", "n2", "it's"])
    wh.replace_notes("concepts", rows(("n1", "x", "other", "drug")), "other", ["n1"])
    wh.delete_notes("phee", ["n1", "it's", "never-seen"])  # quotes escaped; tables without rows are skipped
    assert snapshot(wh) == sorted([("n2", "b", "phee", "Drug"), ("n1", "x", "other", "drug")])
